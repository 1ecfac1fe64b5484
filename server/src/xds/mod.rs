//! The xDS protocol: state machines (pure) and the gRPC services around them.

pub mod delta;
pub mod grpc_frames;
pub mod h2;
pub mod h2_output;
pub mod h2_request;
pub mod hold;
pub mod service;
pub mod sotw;
pub mod stream;
#[cfg(test)]
mod test_support;
pub mod wire;

/// A request the protocol cannot serve; ends the stream with a gRPC status. Converted to
/// `tonic::Status` here and nowhere else. (An Envoy NACK is not one of these: it is
/// stream state, recorded by the tracker.)
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("the first request of a stream must carry the node")]
    MissingNode,
    #[error("type URL \"{got}\" is not served on this service")]
    WrongType { got: String },
    #[error("a subscription of {names} names is over the limit of {limit} per type (--max-subscribed-names)")]
    TooManyNames { names: usize, limit: usize },
}

impl ProtocolError {
    /// The limit this error enforces, as the metrics name it.
    pub fn limit(&self) -> Option<&'static str> {
        matches!(self, ProtocolError::TooManyNames { .. }).then_some("subscribed_names")
    }
}

impl From<ProtocolError> for tonic::Status {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::TooManyNames { .. } => tonic::Status::resource_exhausted(e.to_string()),
            _ => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}
