//! The xDS port: the gRPC services around the protocol's state machines (which are
//! `filterplane_xds`'s), run on the lean HTTP/2 transport (`filterplane_h2`).

pub mod csds;
pub mod fallback;
pub mod metrics_service;
pub mod port;
pub mod service;

pub use filterplane_xds::{delta, sotw, stream, wire, ProtocolError};

/// The gRPC status a protocol error ends its stream with: a limit the client went over
/// is `RESOURCE_EXHAUSTED`, a wrong request `INVALID_ARGUMENT`.
pub fn status_of(e: ProtocolError) -> filterplane_h2::Status {
    if e.limit().is_some() {
        filterplane_h2::Status::resource_exhausted(e.to_string())
    } else {
        filterplane_h2::Status::invalid_argument(e.to_string())
    }
}
