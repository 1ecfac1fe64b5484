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
    /// Versions of rollouts this one superseded, newest first, each with its threshold: a
    /// node that does not get the new version keeps the newest of these it had (its rank
    /// at most that threshold), so an edit during a rollout never moves a proxy back.
    pub carried: Vec<(u64, Arc<CompiledResource>)>,
    /// The last completed version, for everybody else (`None`: they do not get the entry).
    pub old: Option<Arc<CompiledResource>>,
}

/// Which version of an entry a node gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    New,
    /// `carried[i]`.
    Carried(usize),
    Old,
}

/// Most versions carried at once (a chain of edits during rollouts); past it, the oldest
/// layer's proxies get the last completed version.
pub const MAX_CARRIED: usize = 8;

/// Equal when they serve the same: versions are content hashes, so the old resource is
/// compared by its version, not its (possibly megabytes of inline Wasm) bytes.
impl PartialEq for PlanEntry {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.selector == other.selector
            && self.threshold == other.threshold
            && self.old.as_ref().map(|o| o.version) == other.old.as_ref().map(|o| o.version)
            && self.carried.len() == other.carried.len()
            && self.carried.iter().zip(&other.carried).all(|(a, b)| a.0 == b.0 && a.1.version == b.1.version)
    }
}

impl PlanEntry {
    pub fn gets_new(&self, node_id: &str) -> bool {
        self.side(node_id) == Side::New
    }

    /// Which version `node_id` gets.
    pub fn side(&self, node_id: &str) -> Side {
        let r = rank(node_id, &self.name);
        if self.threshold.is_some_and(|t| r <= t) {
            return Side::New;
        }
        match self.carried.iter().take(MAX_CARRIED).position(|(t, _)| r <= *t) {
            Some(i) => Side::Carried(i),
            None => Side::Old,
        }
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
