//! The xDS port: the gRPC services around the protocol's state machines (which are
//! `filterplane_xds`'s) and the lean HTTP/2 transport they run on.

pub mod grpc_frames;
pub mod h2;
pub mod h2_output;
pub mod h2_request;
pub mod service;

pub use filterplane_xds::{delta, hold, sotw, stream, wire, ProtocolError};

/// The gRPC status a protocol error ends its stream with.
pub fn status_of(e: ProtocolError) -> tonic::Status {
    if e.exhausted() {
        tonic::Status::resource_exhausted(e.to_string())
    } else {
        tonic::Status::invalid_argument(e.to_string())
    }
}
