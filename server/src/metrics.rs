//! Every Prometheus metric Filterplane exports, registered in one place and named
//! `filterplane_*`. Labels are bounded: type URLs (six), stream kinds (two), reload
//! results (three); never node ids.

use std::time::Duration;

use prometheus_client::{
    encoding::{
        text::{encode_eof, encode_registry},
        EncodeLabelSet,
    },
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
        info::Info,
    },
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub type_url: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub stream_kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: &'static str,
}

/// Every limit that counts its hits, pre-created at zero.
pub const LIMITS: [&str; 9] = [
    "subscribed_names",
    "nack_message_bytes",
    "handshake_timeout",
    "tls_handshake_timeout",
    "admin_connections",
    "module_connections",
    "admin_idle",
    "event_clients",
    "refusals_kept",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

impl ResultLabel {
    pub fn new(result: &'static str) -> Self {
        Self { result }
    }
}

/// An entry's name: bounded by the config, never by clients.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

impl OutcomeLabel {
    pub fn new(outcome: &str) -> Self {
        let outcome = match outcome {
            "completed" => "completed",
            "promoted" => "promoted",
            "rolled_back" => "rolled_back",
            "halted" => "halted",
            "aborted" => "aborted",
            "reverted" => "reverted",
            _ => "superseded",
        };
        Self { outcome }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GateLabel {
    pub gate: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
}

/// The process's own metrics, in a registry without the `filterplane` prefix.
#[derive(Debug)]
struct ProcessMetrics {
    registry: Registry,
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    cpu_seen: std::sync::Mutex<f64>,
    resident: Gauge,
    virtual_bytes: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
}

impl ProcessMetrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let cpu_seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        let (resident, virtual_bytes, open_fds, max_fds) =
            (Gauge::default(), Gauge::default(), Gauge::default(), Gauge::default());
        let start = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        start.set(crate::exposition::epoch_seconds(std::time::SystemTime::now()));
        registry.register("process_cpu_seconds", "User and system CPU time spent, in seconds", cpu_seconds.clone());
        registry.register("process_resident_memory_bytes", "Resident memory, in bytes", resident.clone());
        registry.register("process_virtual_memory_bytes", "Virtual memory, in bytes", virtual_bytes.clone());
        registry.register("process_open_fds", "Open file descriptors", open_fds.clone());
        registry.register("process_max_fds", "The file descriptor limit (soft)", max_fds.clone());
        registry.register("process_start_time_seconds", "When the server started, in seconds since the epoch", start);
        Self { registry, cpu_seconds, cpu_seen: Default::default(), resident, virtual_bytes, open_fds, max_fds }
    }

    fn update(&self) {
        let s = crate::exposition::ProcessStats::read();
        let mut seen = self.cpu_seen.lock().unwrap_or_else(|p| p.into_inner());
        if s.cpu_seconds > *seen {
            self.cpu_seconds.inc_by(s.cpu_seconds - *seen);
            *seen = s.cpu_seconds;
        }
        self.resident.set(s.resident_bytes as i64);
        self.virtual_bytes.set(s.virtual_bytes as i64);
        self.open_fds.set(s.open_fds as i64);
        self.max_fds.set(s.max_fds as i64);
    }
}

/// The commit this binary was built from (`build.rs`), or `unknown`.
pub const COMMIT: &str = env!("FILTERPLANE_COMMIT");

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabel {
    pub port: &'static str,
}

impl PortLabel {
    pub fn new(port: &'static str) -> Self {
        Self { port }
    }
}

/// Buckets from 1 ms to ~16 s.
#[derive(Debug, Clone, Copy)]
pub struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.001, 2.0, 15))
    }
}

/// One type URL's xDS metrics, looked up once at start so the per-push path does no
/// label hashing or locking.
#[derive(Debug, Clone)]
pub struct TypeMetrics {
    pub rejects: Counter,
    pub pushes: Counter,
    pub pushed_bytes: Counter,
    pub acks: Counter,
    pub push_ack_latency: Histogram,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    by_type: Vec<TypeMetrics>,
    pub xds_rejects: Family<TypeLabel, Counter>,
    pub xds_pushes: Family<TypeLabel, Counter>,
    pub xds_pushed_bytes: Family<TypeLabel, Counter>,
    pub xds_acks: Family<TypeLabel, Counter>,
    pub xds_push_ack_latency: Family<TypeLabel, Histogram, LatencyBuckets>,
    pub connected_proxies: Family<KindLabel, Gauge>,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub config_reload_duration: Histogram,
    /// From the xDS port's receipt of a new configuration to each stream's first response
    /// for it: how long a push takes to fan out over the fleet.
    pub xds_push_fanout: Histogram,
    /// Fetching and checking modules (registered here).
    pub wasm: filterplane_wasm::metrics::WasmMetrics,
    pub wasm_module_downloads: Counter,
    pub wasm_code_fetch_resends: Counter,
    pub limit_hits: Family<LimitLabel, Counter>,
    pub tls_reloads: Family<ResultLabel, Counter>,
    pub rollout_step: Family<NameLabel, Gauge>,
    pub rollouts: Family<OutcomeLabel, Counter>,
    pub rollout_gate_failures: Family<GateLabel, Counter>,
    /// Stats messages received from proxies' metrics service sinks.
    pub stats_messages: Counter,
    pub tls_handshake_failures: Family<PortLabel, Counter>,
    pub xds_identity_refusals: Counter,
    pub admin_unauthorized: Counter,
    /// Bytes of xDS responses waiting behind clients' flow-control windows.
    pub xds_queued_bytes: Gauge,
    /// Saves of the rollout state that failed (a full disk).
    pub rollout_state_save_failures: Counter,
    /// Open xDS connections.
    pub xds_connections: Gauge,
    /// xDS streams whose proxy does not run what it was last sent, by type (set when
    /// scraped).
    pub proxies_not_synced: Family<TypeLabel, Gauge>,
    /// Rollouts in progress, by state (set when scraped).
    pub rollouts_active: Family<StateLabel, Gauge>,
    /// `process_*`, unprefixed, as every exporter names them.
    process: ProcessMetrics,
    /// When each limit was last logged (they are logged at most once a minute).
    limit_logged: std::sync::Mutex<std::collections::HashMap<&'static str, std::time::Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("filterplane");
        let m = Metrics {
            xds_rejects: Family::default(),
            xds_pushes: Family::default(),
            xds_pushed_bytes: Family::default(),
            xds_acks: Family::default(),
            xds_push_ack_latency: Family::new_with_constructor(LatencyBuckets),
            connected_proxies: Family::default(),
            config_reloads: Family::default(),
            config_reload_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            // 1 ms to 36 s, each bucket a quarter wider than the last: a fleet's p99 is
            // read to within a bucket's width, interpolated.
            xds_push_fanout: Histogram::new(exponential_buckets(0.001, 1.25, 48)),
            wasm: Default::default(),
            wasm_module_downloads: Counter::default(),
            wasm_code_fetch_resends: Counter::default(),
            limit_hits: Family::default(),
            tls_reloads: Family::default(),
            rollout_step: Family::default(),
            rollouts: Family::default(),
            rollout_gate_failures: Family::default(),
            stats_messages: Counter::default(),
            tls_handshake_failures: Family::default(),
            xds_identity_refusals: Counter::default(),
            admin_unauthorized: Counter::default(),
            xds_queued_bytes: Gauge::default(),
            rollout_state_save_failures: Counter::default(),
            xds_connections: Gauge::default(),
            limit_logged: Default::default(),
            proxies_not_synced: Family::default(),
            rollouts_active: Family::default(),
            process: ProcessMetrics::new(),
            registry: Registry::default(),
            by_type: Vec::new(),
        };
        registry.register("xds_rejects", "xDS responses a proxy rejected (NACK), by type URL", m.xds_rejects.clone());
        registry.register("xds_pushes", "xDS responses sent, by type URL", m.xds_pushes.clone());
        registry.register(
            "xds_pushed_bytes",
            "Encoded bytes of xDS responses sent, by type URL",
            m.xds_pushed_bytes.clone(),
        );
        registry.register("xds_acks", "xDS responses a proxy accepted (ACK), by type URL", m.xds_acks.clone());
        registry.register(
            "xds_push_ack_latency_seconds",
            "Time from sending an xDS response to its ACK or NACK, by type URL",
            m.xds_push_ack_latency.clone(),
        );
        registry.register(
            "xds_push_fanout_seconds",
            "Time from a new configuration reaching the xDS port to each stream's first response for it",
            m.xds_push_fanout.clone(),
        );
        registry.register(
            "xds_connected_proxies",
            "Open xDS streams that identified their node, by stream kind",
            m.connected_proxies.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reload attempts, by result (applied, unchanged, failed)",
            m.config_reloads.clone(),
        );
        registry.register(
            "config_reload_duration_seconds",
            "Time to read, validate and compile the config",
            m.config_reload_duration.clone(),
        );
        m.wasm.register(&mut registry);
        registry.register(
            "wasm_module_downloads",
            "Modules Envoys downloaded from /modules (remote delivery)",
            m.wasm_module_downloads.clone(),
        );
        registry.register(
            "xds_queued_bytes",
            "Bytes of xDS responses waiting to be sent behind clients' flow-control windows",
            m.xds_queued_bytes.clone(),
        );
        registry.register(
            "rollout_state_save_failures",
            "Saves of the rollout state that failed (retried every second until one works)",
            m.rollout_state_save_failures.clone(),
        );
        registry.register("xds_connections", "Open xDS connections (TLS handshake done)", m.xds_connections.clone());
        registry.register(
            "proxies_not_synced",
            "xDS streams whose proxy does not run what it was last sent (applying it, refused it, or not sent it yet), by type URL",
            m.proxies_not_synced.clone(),
        );
        registry.register(
            "rollouts_active",
            "Rollouts in progress, by state (running, paused, failed: stays until the entry is edited)",
            m.rollouts_active.clone(),
        );
        registry.register(
            "build",
            "The running build: its version and commit",
            Info::new(BuildLabels { version: env!("CARGO_PKG_VERSION"), commit: COMMIT }),
        );
        registry.register(
            "limit_hits",
            "Inputs refused or cut at a limit (see docs/operations.md, Limits and hardening), by limit",
            m.limit_hits.clone(),
        );
        registry.register(
            "wasm_code_fetch_resends",
            "Wasm configs sent again because Envoy NACKed them while fetching the module (remote delivery)",
            m.wasm_code_fetch_resends.clone(),
        );
        registry.register(
            "rollout_step",
            "Percent of an entry's matching proxies meant to be on its new version (100: no rollout in progress), by entry name",
            m.rollout_step.clone(),
        );
        registry.register(
            "rollouts",
            "Rollouts that ended, by outcome (completed, promoted, rolled_back, halted, aborted, reverted, superseded)",
            m.rollouts.clone(),
        );
        registry.register(
            "stats_messages",
            "Stats messages received from proxies' metrics service sinks (StreamMetrics), read for rollout health gates",
            m.stats_messages.clone(),
        );
        registry.register(
            "rollout_gate_failures",
            "Rollouts failed by a health gate on their proxies' own traffic, by gate (max_5xx_ratio, max_p99_latency, max_wasm_failures, min_requests)",
            m.rollout_gate_failures.clone(),
        );
        registry.register(
            "tls_reloads",
            "TLS certificate, key or client CA files read again after they changed, by result (applied, failed)",
            m.tls_reloads.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed (no or an untrusted client certificate, no common protocol), by port",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "xds_identity_refusals",
            "xDS streams ended because the node they named does not match their client certificate",
            m.xds_identity_refusals.clone(),
        );
        registry.register(
            "admin_unauthorized",
            "Admin requests refused for want of the bearer token (--admin-token-file)",
            m.admin_unauthorized.clone(),
        );
        // Start every per-type counter at zero, so `rate()` and alerts see a series from
        // the first scrape instead of an absent one.
        let by_type = filterplane_api::ResourceType::ALL
            .iter()
            .map(|rt| {
                let t = TypeLabel { type_url: rt.type_url() };
                TypeMetrics {
                    rejects: m.xds_rejects.get_or_create(&t).clone(),
                    pushes: m.xds_pushes.get_or_create(&t).clone(),
                    pushed_bytes: m.xds_pushed_bytes.get_or_create(&t).clone(),
                    acks: m.xds_acks.get_or_create(&t).clone(),
                    push_ack_latency: m.xds_push_ack_latency.get_or_create(&t).clone(),
                }
            })
            .collect();
        for result in ["applied", "unchanged", "failed", "held"] {
            let _ = m.config_reloads.get_or_create(&ResultLabel { result });
        }
        for result in ["applied", "failed"] {
            let _ = m.tls_reloads.get_or_create(&ResultLabel { result });
        }
        for outcome in ["completed", "promoted", "rolled_back", "halted", "aborted", "reverted", "superseded"] {
            let _ = m.rollouts.get_or_create(&OutcomeLabel::new(outcome));
        }
        for port in ["xds", "admin", "modules"] {
            let _ = m.tls_handshake_failures.get_or_create(&PortLabel { port });
        }
        for limit in LIMITS {
            let _ = m.limit_hits.get_or_create(&LimitLabel { limit });
        }
        for kind in ["sotw", "delta"] {
            let _ = m.connected_proxies.get_or_create(&KindLabel { stream_kind: kind });
        }
        Metrics { registry, by_type, ..m }
    }
}

impl Metrics {
    pub fn reload(&self, result: &'static str, took: Duration) {
        self.config_reloads.get_or_create(&ResultLabel { result }).inc();
        self.config_reload_duration.observe(took.as_secs_f64());
    }

    /// The metrics of one xDS type.
    pub fn of_type(&self, rt: filterplane_api::ResourceType) -> &TypeMetrics {
        &self.by_type[rt.index()]
    }

    /// A limit was hit: counted, and logged at most once per limit and minute.
    pub fn limit_hit(&self, limit: &'static str) {
        self.limit_hits.get_or_create(&LimitLabel { limit }).inc();
        let now = std::time::Instant::now();
        let mut last = self.limit_logged.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.get(limit).is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(60));
        if due {
            last.insert(limit, now);
            tracing::warn!(limit, "a limit was hit (counted in filterplane_limit_hits_total; logged once a minute)");
        }
    }

    /// Every metric in the OpenMetrics text format, the process's included.
    pub fn render(&self) -> String {
        self.process.update();
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &self.process.registry);
        let _ = encode_eof(&mut out);
        out
    }

    /// The same in the Prometheus text format 0.0.4.
    pub fn render_prometheus(&self) -> String {
        crate::exposition::to_prometheus_text(&self.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_names_with_bounded_labels() {
        let m = Metrics::default();
        let t = TypeLabel { type_url: "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig" };
        m.xds_rejects.get_or_create(&t).inc();
        m.reload("applied", Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains(
            "filterplane_xds_rejects_total{type_url=\"type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig\"} 1"
        ), "{text}");
        assert!(text.contains("filterplane_config_reloads_total{result=\"applied\"} 1"), "{text}");
        assert!(text.contains("# TYPE filterplane_config_reload_duration_seconds histogram"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
