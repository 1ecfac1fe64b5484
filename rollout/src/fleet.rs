//! The fleet as the rollout engine reads it: every proxy, wherever it is connected, read
//! in place through a trait (the server's tracker for its own proxies, the other
//! replicas' reports for theirs).

use filterplane_config::NodeFacts;
use filterplane_xds::plan::rank;

use crate::state::EntryState;

/// One proxy of the fleet.
pub trait Member {
    fn facts(&self) -> &NodeFacts;
    /// When it connected, in ms since the epoch.
    fn connected_ms(&self) -> u64;
    /// The replica it is connected to.
    fn replica(&self) -> &str;
    /// Whether it ACKed, and whether it NACKed, `version` of extension config `name`;
    /// `None` when it has not been sent that config.
    fn status(&self, name: &str, version: &str) -> Option<(bool, bool)>;
    /// Envoy's message with its last NACK of extension configs.
    fn nack_message(&self) -> Option<&str>;
    /// What its traffic was since `since_ms`, from the stats it sends; `None` when it
    /// sends none (or they are not known here).
    fn traffic(&self, _since_ms: u64) -> Option<Traffic> {
        None
    }
}

/// What proxies' traffic was in a window, summed over them, from their own stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    /// Downstream requests completed.
    pub requests: f64,
    /// Of them, answered 5xx.
    pub errors_5xx: f64,
    /// Wasm VM failures.
    pub wasm_failures: f64,
    /// The largest downstream request time p99 reported in the window (ms).
    pub p99_ms: Option<f64>,
    /// Proxies whose stats are in it.
    pub proxies: usize,
}

impl Traffic {
    pub fn add(&mut self, other: &Traffic) {
        self.requests += other.requests;
        self.errors_5xx += other.errors_5xx;
        self.wasm_failures += other.wasm_failures;
        self.p99_ms = match (self.p99_ms, other.p99_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.proxies += other.proxies;
    }

    /// 5xx / requests (0 without requests).
    pub fn ratio_5xx(&self) -> f64 {
        if self.requests > 0.0 {
            self.errors_5xx / self.requests
        } else {
            0.0
        }
    }
}

/// Where the rollout engine finds the fleet's proxies.
pub trait Fleet {
    fn visit(&self, f: &mut dyn FnMut(&dyn Member));
    /// Whether every replica reported its proxies since `ms` (a step's members are picked
    /// from the whole fleet, so not before every replica has said who it has).
    fn reported_since(&self, ms: u64) -> bool;
    /// Whether several replicas share the fleet (failures then name the replica).
    fn shared(&self) -> bool;
}

/// The proxies entry `e` is for, each once (by rank, a hash of node id and entry name),
/// with their rank.
pub(crate) fn each_matching(fleet: &dyn Fleet, e: &EntryState, f: &mut dyn FnMut(&dyn Member, u64)) {
    let mut seen = std::collections::HashSet::new();
    fleet.visit(&mut |m: &dyn Member| {
        if !e.selector.matches(m.facts()) {
            return;
        }
        let r = rank(&m.facts().id, &e.name);
        if seen.insert(r) {
            f(m, r);
        }
    });
}

/// The rank of the k-th proxy (k = ceil(percent of them), at least one), or, without
/// proxies, that share of the rank space.
pub(crate) fn threshold_for(percent: u8, mut ranks: Vec<u64>) -> u64 {
    if percent >= 100 {
        return u64::MAX;
    }
    if ranks.is_empty() {
        return (u64::MAX / 100) * u64::from(percent);
    }
    ranks.sort_unstable();
    let k = (ranks.len() * usize::from(percent)).div_ceil(100).max(1);
    ranks[k - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use filterplane_xds::plan::rank;

    #[test]
    fn thresholds_pick_about_p_percent_and_never_none() {
        let ranks: Vec<u64> = (0..1000).map(|i| rank(&format!("node-{i}"), "p")).collect();
        for p in [1u8, 5, 10, 25, 50] {
            let t = threshold_for(p, ranks.clone());
            let n = ranks.iter().filter(|r| **r <= t).count();
            assert_eq!(n, usize::from(p) * 10, "{p}%");
        }
        let few = vec![rank("a", "p"), rank("b", "p"), rank("c", "p")];
        let t = threshold_for(5, few.clone());
        assert_eq!(few.iter().filter(|r| **r <= t).count(), 1, "never none while p > 0");
        assert_eq!(threshold_for(100, few), u64::MAX);
        assert_eq!(rank("a", "p"), rank("a", "p"), "stable");
    }
}
