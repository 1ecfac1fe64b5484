//! A rollout plan as a generation serves it: for each entry under rollout, which nodes
//! get the new version (by rank, a hash of node id and entry name, against a threshold)
//! and what everybody else keeps. The rollout engine decides it; snapshots apply it.

use std::sync::Arc;

use filterplane_config::{CompiledResource, NodeSelector};
use sha2::Digest;

/// What a generation needs to serve rollouts in progress.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub entries: Vec<PlanEntry>,
}

/// One entry in a rollout.
#[derive(Debug, Clone)]
pub struct PlanEntry {
    pub name: String,
    pub selector: NodeSelector,
    /// Nodes whose rank is at most this get the new version; `None`: nobody (rolled back).
    pub threshold: Option<u64>,
    /// The last completed version, for everybody else (`None`: they do not get the entry).
    pub old: Option<Arc<CompiledResource>>,
}

/// Equal when they serve the same: versions are content hashes, so the old resource is
/// compared by its version, not its (possibly megabytes of inline Wasm) bytes.
impl PartialEq for PlanEntry {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.selector == other.selector
            && self.threshold == other.threshold
            && self.old.as_ref().map(|o| o.version) == other.old.as_ref().map(|o| o.version)
    }
}

impl PlanEntry {
    pub fn gets_new(&self, node_id: &str) -> bool {
        self.threshold.is_some_and(|t| rank(node_id, &self.name) <= t)
    }
}

/// A node's place in an entry's rollout order: stable across restarts and replicas.
pub fn rank(node_id: &str, entry: &str) -> u64 {
    let digest = sha2::Sha256::new()
        .chain_update(node_id.as_bytes())
        .chain_update([0])
        .chain_update(entry.as_bytes())
        .finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(b)
}
