//! What proxies say about their own traffic, from Envoy's metrics service sink
//! (`envoy.service.metrics.v3.MetricsService/StreamMetrics` on the xDS port): per proxy,
//! only the few series rollout health gates read (downstream requests completed, 5xx,
//! request time p99, Wasm VM failures), as running totals sampled at each flush. Bounded
//! per proxy (the last `MAX_SAMPLES` flushes) and in proxies (`MAX_PROXIES`). Reading a
//! message is the protocol's (`filterplane_xds::stats`); keeping the figures is here.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

pub use filterplane_rollout::Traffic;
pub use filterplane_xds::stats::{read_message, Flush};

/// Flushes kept per proxy: 10 minutes at Envoy's default 5 s flush, 2 minutes at 1 s.
pub const MAX_SAMPLES: usize = 120;
/// Proxies whose stats are kept at once; a stream beyond it is refused.
pub const MAX_PROXIES: usize = 100_000;
/// How long a proxy's stats are kept after its last stats stream ended (a reconnect
/// within it keeps its history); then they go.
pub const RETAIN_AFTER_END_MS: u64 = 10 * 60 * 1000;
/// Departed proxies are looked for at most this often.
const SWEEP_EVERY_MS: u64 = 10_000;

/// A running total at one flush.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    pub requests: f64,
    pub errors_5xx: f64,
    pub wasm_failures: f64,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Default)]
struct ProxyStats {
    /// Counters read as deltas (`report_counters_as_deltas: true`), else cumulative.
    deltas: bool,
    /// The last cumulative values Envoy sent, to take differences from (a smaller one is
    /// a restart: counted from zero).
    last_raw: Option<Flush>,
    samples: VecDeque<Sample>,
    /// Stats streams open now (a reconnect may overlap the old stream's end).
    streams: u32,
    /// When the last one ended, while none is open.
    ended_ms: Option<u64>,
}

/// Every proxy's recent health, by node id.
#[derive(Debug, Default)]
pub struct HealthStore {
    proxies: Mutex<HashMap<String, ProxyStats>>,
    last_sweep_ms: std::sync::atomic::AtomicU64,
}

impl HealthStore {
    /// Opens a proxy's stats (a stats stream began at `now_ms`); `false` when
    /// `MAX_PROXIES` are kept already. `deltas`: its counters come as deltas.
    pub fn open(&self, node_id: &str, deltas: bool, now_ms: u64) -> bool {
        let mut proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        let full = proxies.len() >= MAX_PROXIES;
        self.sweep(&mut proxies, now_ms, full);
        if !proxies.contains_key(node_id) && proxies.len() >= MAX_PROXIES {
            return false;
        }
        let p = proxies.entry(node_id.to_owned()).or_default();
        if p.deltas != deltas {
            p.deltas = deltas;
            p.last_raw = None;
        }
        p.streams += 1;
        p.ended_ms = None;
        true
    }

    /// A stats stream of `node_id` ended at `now_ms`.
    pub fn close(&self, node_id: &str, now_ms: u64) {
        let mut proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = proxies.get_mut(node_id) {
            p.streams = p.streams.saturating_sub(1);
            if p.streams == 0 {
                p.ended_ms = Some(now_ms);
            }
        }
    }

    /// Forgets proxies whose last stats stream ended over `RETAIN_AFTER_END_MS` ago; at
    /// most every `SWEEP_EVERY_MS` unless `now` (the store is full).
    fn sweep(&self, proxies: &mut HashMap<String, ProxyStats>, now_ms: u64, now: bool) {
        use std::sync::atomic::Ordering;
        let last = self.last_sweep_ms.load(Ordering::Relaxed);
        if !now && now_ms.saturating_sub(last) < SWEEP_EVERY_MS {
            return;
        }
        self.last_sweep_ms.store(now_ms, Ordering::Relaxed);
        proxies.retain(|_, p| p.ended_ms.is_none_or(|end| now_ms.saturating_sub(end) < RETAIN_AFTER_END_MS));
    }

    /// Proxies whose stats are kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.proxies.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// One flush of `node_id` at `now_ms`.
    pub fn record(&self, node_id: &str, flush: Flush, now_ms: u64) {
        if !flush.seen {
            return;
        }
        let mut proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = proxies.get_mut(node_id) else { return };
        let last = p.samples.back().copied().unwrap_or_default();
        let (requests, errors_5xx, wasm_failures) = if p.deltas {
            (flush.requests, flush.errors_5xx, flush.wasm_failures)
        } else {
            let prev = p.last_raw.unwrap_or_default();
            let step = |now: f64, before: f64| if now >= before { now - before } else { now };
            p.last_raw = Some(flush);
            (
                step(flush.requests, prev.requests),
                step(flush.errors_5xx, prev.errors_5xx),
                step(flush.wasm_failures, prev.wasm_failures),
            )
        };
        if p.samples.len() >= MAX_SAMPLES {
            p.samples.pop_front();
        }
        p.samples.push_back(Sample {
            at_ms: now_ms,
            requests: last.requests + requests,
            errors_5xx: last.errors_5xx + errors_5xx,
            wasm_failures: last.wasm_failures + wasm_failures,
            p99_ms: if requests > 0.0 { flush.p99_ms } else { None },
        });
    }

    /// What `node_id` did since `since_ms`, counted from its first flush at or after it (a
    /// window reaching further back than what is kept counts from the oldest kept);
    /// `None` without stats.
    pub fn window(&self, node_id: &str, since_ms: u64) -> Option<Traffic> {
        let proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        let p = proxies.get(node_id)?;
        let last = p.samples.back()?;
        // The running total at the first flush at or after the start: the flush before
        // it also counts traffic from before the start (when the proxy ran another
        // version), so that interval is left out rather than mixed in.
        let Some(base) = p.samples.iter().find(|s| s.at_ms >= since_ms).copied() else {
            return Some(Traffic { proxies: 1, ..Traffic::default() });
        };
        let p99_ms = p.samples.iter().filter(|s| s.at_ms > base.at_ms).filter_map(|s| s.p99_ms).reduce(f64::max);
        Some(Traffic {
            requests: last.requests - base.requests,
            errors_5xx: last.errors_5xx - base.errors_5xx,
            wasm_failures: last.wasm_failures - base.wasm_failures,
            p99_ms,
            proxies: 1,
        })
    }
}

#[cfg(test)]
mod tests;
