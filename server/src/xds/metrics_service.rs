//! Envoy's metrics service sink, received on the xDS port
//! (`envoy.service.metrics.v3.MetricsService/StreamMetrics`): the first message names the
//! node, which must go with the client's certificate under `--node-identity` like an xDS
//! stream's; each flush is read for the few series rollout health gates use (see
//! `health`) and kept per node. A stream commits at most one flush per
//! `MIN_FLUSH_GAP_MS` (others are merged into it), so a flood costs a parse, never memory.

use std::time::{SystemTime, UNIX_EPOCH};

use filterplane_h2::{OutMessage, Output, Status};

use crate::{
    health::{read_message, Flush},
    log_limit::{self, Cut},
    xds::{
        service::{ConnPeer, XdsContext, MAX_NODE_ID_BYTES},
        stream::NodeInfo,
    },
};

/// Flushes closer together than this are merged before they are kept.
pub const MIN_FLUSH_GAP_MS: u64 = 1_000;

/// Node metadata a proxy sets (`"filterplane.stats_counters": deltas`) when its sink has
/// `report_counters_as_deltas: true`; counters are read as cumulative otherwise.
pub const DELTAS_METADATA: &str = "filterplane.stats_counters";

/// One stats stream.
#[derive(Debug, Default)]
pub struct MetricsStream {
    /// Where its node's stats are kept, once the node is known (its end is told there).
    store: Option<std::sync::Arc<crate::health::HealthStore>>,
    node_id: Option<String>,
    deltas: bool,
    /// Flushes not kept yet, merged; and when the last one was kept.
    pending: Option<Flush>,
    last_commit_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl MetricsStream {
    pub fn on_message(&mut self, ctx: &XdsContext, peer: &ConnPeer, bytes: &[u8], out: &mut Output) {
        ctx.tracker.metrics().stats_messages.inc();
        let (node, flush) = match read_message(bytes) {
            Ok(m) => m,
            Err(e) => {
                out.end = Some(Status::invalid_argument(format!("could not decode the stats message: {e}")));
                return;
            }
        };
        if self.node_id.is_none() {
            let Some(node) = node else {
                out.end = Some(Status::invalid_argument("the first stats message names the node (identifier.node)"));
                return;
            };
            if node.id.len().max(node.cluster.len()) > MAX_NODE_ID_BYTES {
                ctx.tracker.metrics().limit_hit("node_id_bytes");
                out.end = Some(Status::invalid_argument(format!(
                    "the node's id or cluster is over the limit of {MAX_NODE_ID_BYTES} bytes"
                )));
                return;
            }
            let info = NodeInfo::from(&node);
            if let Err(status) = ctx.security.admit(&ctx.tracker, &peer.info, &info.facts) {
                out.end = Some(status);
                return;
            }
            self.deltas = info.facts.metadata.get(DELTAS_METADATA).is_some_and(|v| v == "deltas");
            if !ctx.health.open(&info.facts.id, self.deltas, now_ms()) {
                ctx.tracker.metrics().limit_hit("stats_proxies");
                out.end = Some(Status::resource_exhausted(format!(
                    "stats are kept for at most {} proxies",
                    crate::health::MAX_PROXIES
                )));
                return;
            }
            if let Some(left_out) = log_limit::CONNECTS.admit() {
                tracing::info!(node_id = %Cut(&info.facts.id), peer = %peer.addr, deltas = self.deltas, left_out, "stats stream opened");
            }
            self.node_id = Some(info.facts.id);
            self.store = Some(ctx.health.clone());
        }
        self.merge(flush);
        let now = now_ms();
        if now.saturating_sub(self.last_commit_ms) >= MIN_FLUSH_GAP_MS {
            if let (Some(id), Some(f)) = (&self.node_id, self.pending.take()) {
                ctx.health.record(id, f, now);
                self.last_commit_ms = now;
            }
        } else {
            ctx.tracker.metrics().limit_hit("stats_flushes_merged");
        }
    }

    /// Adds a flush to the one waiting: deltas add up, cumulative values replace.
    fn merge(&mut self, f: Flush) {
        let Some(p) = &mut self.pending else {
            self.pending = Some(f);
            return;
        };
        let p99_ms = match (p.p99_ms, f.p99_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if self.deltas {
            p.requests += f.requests;
            p.errors_5xx += f.errors_5xx;
            p.wasm_failures += f.wasm_failures;
        } else if f.seen {
            (p.requests, p.errors_5xx, p.wasm_failures) = (f.requests, f.errors_5xx, f.wasm_failures);
        }
        p.p99_ms = p99_ms;
        p.seen |= f.seen;
    }

    /// The stream ended: Envoy's answer is an empty `StreamMetricsResponse`.
    pub fn on_end(&mut self, out: &mut Output) {
        out.messages.push(OutMessage { bytes: vec![0, 0, 0, 0, 0], supersedes: None });
        out.end = Some(Status::ok(""));
    }
}

impl Drop for MetricsStream {
    fn drop(&mut self) {
        if let (Some(store), Some(id)) = (&self.store, &self.node_id) {
            store.close(id, now_ms());
        }
    }
}
