//! What fetching and checking modules counts. The server registers these with its
//! Prometheus registry (`register`); clones share their values.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

/// A result, as the Wasm metrics label them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

impl ResultLabel {
    pub fn new(result: &'static str) -> Self {
        Self { result }
    }
}

#[derive(Debug, Clone)]
pub struct WasmMetrics {
    pub cache_lookups: Family<ResultLabel, Counter>,
    pub cache_entries: Gauge,
    pub cache_bytes: Gauge,
    pub fetches: Family<ResultLabel, Counter>,
    pub fetch_duration: Histogram,
    pub compile_duration: Histogram,
    pub conversions: Family<ResultLabel, Counter>,
    pub conversion_duration: Histogram,
    /// Module signatures checked, by result (`verified`, `unsigned`, `signature_missing`,
    /// `signature_invalid`, `signature_untrusted_key`).
    pub signature_verifications: Family<ResultLabel, Counter>,
}

impl Default for WasmMetrics {
    fn default() -> Self {
        let m = Self {
            cache_lookups: Family::default(),
            cache_entries: Gauge::default(),
            cache_bytes: Gauge::default(),
            fetches: Family::default(),
            fetch_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            compile_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            conversions: Family::default(),
            signature_verifications: Family::default(),
            conversion_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
        };
        // Every label value shows from the start, at zero.
        for result in ["hit", "miss"] {
            let _ = m.cache_lookups.get_or_create(&ResultLabel { result });
        }
        for result in ["success", "download_failure", "checksum_mismatch", "invalid_module"] {
            let _ = m.fetches.get_or_create(&ResultLabel { result });
            let _ = m.conversions.get_or_create(&ResultLabel { result });
        }
        m
    }
}

impl WasmMetrics {
    pub fn cache_lookup(&self, result: &'static str) {
        self.cache_lookups.get_or_create(&ResultLabel { result }).inc();
    }

    /// Registers every metric under `registry`'s prefix.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "wasm_cache_lookups",
            "Wasm module cache lookups, by result (hit, miss)",
            self.cache_lookups.clone(),
        );
        registry.register(
            "wasm_signature_verifications",
            "Wasm module signatures checked against the trusted keys, by result (verified, unsigned, signature_missing, signature_invalid, signature_untrusted_key)",
            self.signature_verifications.clone(),
        );
        registry.register("wasm_cache_entries", "Modules in the Wasm module cache", self.cache_entries.clone());
        registry.register("wasm_cache_bytes", "Bytes in the Wasm module cache", self.cache_bytes.clone());
        registry.register(
            "wasm_remote_fetches",
            "Wasm module fetches, by result (success, download_failure, checksum_mismatch, invalid_module)",
            self.fetches.clone(),
        );
        registry.register("wasm_fetch_duration_seconds", "Time to fetch a Wasm module", self.fetch_duration.clone());
        registry.register(
            "wasm_compile_duration_seconds",
            "Time to parse and check a Wasm module before serving it",
            self.compile_duration.clone(),
        );
        registry.register(
            "wasm_config_conversions",
            "Envoy-native Wasm configs whose modules Filterplane fetched and rewrote to its delivery, by result (success, download_failure, checksum_mismatch, invalid_module)",
            self.conversions.clone(),
        );
        registry.register(
            "wasm_config_conversion_duration_seconds",
            "Time to fetch, check and rewrite the modules of one Envoy-native Wasm config",
            self.conversion_duration.clone(),
        );
    }

    /// The Prometheus text of these metrics alone (tests).
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix("filterplane");
        self.register(&mut registry);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
