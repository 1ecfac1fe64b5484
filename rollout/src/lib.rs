//! Progressive rollouts. When an extension config or Wasm plugin with a `rollout` gets a
//! new version, the proxies of the first step get it and every other matching proxy keeps
//! the last completed version; each step completes when its bake time has passed, every
//! proxy of the step ACKed and NACKs stayed within `max_nacks`; a failure halts or rolls
//! back. Step membership is a hash of node id and entry name against a threshold fixed at
//! the step's start (the hash of the k-th proxy, k = ceil(p% of the matching proxies)), so
//! it is stable as proxies come and go and never empty while p > 0.
//!
//! The engine is pure (`engine`): the server drives it, stores its state (`state`'s
//! rows) and gives it the fleet (`fleet`).

#![deny(clippy::unwrap_used)]

pub mod engine;
pub mod fleet;
pub mod gates;
pub mod state;

pub use engine::{Effects, Engine, HISTORY};
pub use filterplane_xds::plan::{rank, Plan, PlanEntry};
pub use fleet::{Fleet, Member, Traffic};
pub use state::{
    ActionError, DecodeError, EntryState, Failure, HistoryEntry, RolloutView, Status, StoredResource, StoredState,
    FAILURE_EXAMPLES, FAILURE_MESSAGE_BYTES,
};
