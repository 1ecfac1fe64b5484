//! The xDS protocol, pure: snapshot values and the rollout plan they are served under,
//! wire encoding, node facts, subscriptions, and the state of the world, delta and hold
//! state machines that take requests, snapshots and the time in and give responses and
//! tracker events out. No I/O, no runtime, no clock: every `now` is passed in, so the
//! machines are tested with plain values. The server runs a loop around them.

#![deny(clippy::unwrap_used)]

pub mod delta;
pub mod hold;
pub mod plan;
pub mod protocol;
pub mod resource_map;
pub mod snapshot;
pub mod sotw;
pub mod stated_names;
pub mod stats;
pub mod stream;
#[cfg(test)]
mod test_support;
pub mod text;
pub mod vec_map;
pub mod wire;

/// A request the protocol cannot serve; ends the stream with a gRPC status (the server
/// maps it to one). An Envoy NACK is not one of these: it is stream state, recorded by
/// the tracker.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("the first request of a stream must carry the node")]
    MissingNode,
    #[error("type URL \"{got}\" is not served on this service")]
    WrongType { got: String },
    #[error("a subscription of {names} names is over the limit of {limit} for this type: what this proxy is served of it plus --max-subscribed-names")]
    TooManyNames { names: usize, limit: usize },
}

impl ProtocolError {
    /// The limit this error enforces, as the metrics name it.
    pub fn limit(&self) -> Option<&'static str> {
        matches!(self, ProtocolError::TooManyNames { .. }).then_some("subscribed_names")
    }
}
