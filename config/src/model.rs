//! The YAML schema, one serde type per YAML mapping. Checked domain types come from
//! `compile`; nothing here is trusted yet.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The schema version this build reads. A file must say `version: 1`.
pub const SCHEMA_VERSION: u32 = 1;

/// One config file. A directory holds several, merged.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Schema version, so a future Filterplane can tell old files from new ones.
    pub version: u32,
    #[serde(default)]
    pub extension_configs: Vec<ExtensionConfigSpec>,
    /// Wasm plugins: modules Filterplane fetches, checks and serves over ECDS.
    #[serde(default)]
    pub wasm_plugins: Vec<WasmPluginSpec>,
    /// `envoy.config.listener.v3.Listener` resources (LDS).
    #[serde(default)]
    pub listeners: Vec<EnvoyResourceSpec>,
    /// `envoy.config.route.v3.RouteConfiguration` resources (RDS).
    #[serde(default)]
    pub routes: Vec<EnvoyResourceSpec>,
    /// `envoy.config.cluster.v3.Cluster` resources (CDS).
    #[serde(default)]
    pub clusters: Vec<EnvoyResourceSpec>,
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment` resources (EDS).
    #[serde(default)]
    pub endpoints: Vec<EnvoyResourceSpec>,
    /// `envoy.extensions.transport_sockets.tls.v3.Secret` resources (SDS over ADS).
    /// Redacted wherever Filterplane shows them; see --sensitive-to-authenticated-only.
    #[serde(default)]
    pub secrets: Vec<EnvoyResourceSpec>,
    /// How new versions of this file's extension configs and Wasm plugins roll out
    /// (an entry's own `rollout` wins). Absent: to every proxy at once.
    #[serde(default)]
    pub rollout: Option<RolloutSpec>,
    /// Who may have built the Wasm modules Filterplane fetches (plugins and Envoy-native
    /// Wasm configs): trusted public keys, and whether a signature is required.
    #[serde(default)]
    pub wasm_verification: Option<VerificationSpec>,
}

impl Document {
    /// The entries of the section holding Envoy resources of type `rt` (`endpoints` for
    /// ClusterLoadAssignments; types without a section have none).
    pub fn envoy_section(&self, rt: filterplane_api::ResourceType) -> &[EnvoyResourceSpec] {
        use filterplane_api::ResourceType as T;
        match rt {
            T::Listener => &self.listeners,
            T::RouteConfiguration => &self.routes,
            T::Cluster => &self.clusters,
            T::Secret => &self.secrets,
            T::ClusterLoadAssignment => &self.endpoints,
            _ => &[],
        }
    }
}

/// Trusted keys for module signatures (docs/wasm.md, Signed modules).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationSpec {
    /// PEM public keys (`PUBLIC KEY`: ECDSA P-256, RSA, Ed25519), relative to the file.
    #[serde(default)]
    pub keys: Vec<std::path::PathBuf>,
    /// A module without a valid signature by one of the keys is refused.
    #[serde(default)]
    pub require: bool,
}

/// A plugin's own verification: its keys replace the default ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginVerificationSpec {
    #[serde(default)]
    pub keys: Vec<std::path::PathBuf>,
    /// Default: `true` (a plugin that names its keys means them), else the config's.
    #[serde(default)]
    pub require: Option<bool>,
    /// Where the detached signature of an http(s) or file module is (default: the
    /// module's URL with `.sig` appended).
    #[serde(default)]
    pub signature_url: Option<String>,
    /// Keys written inline (Istio's `verificationKey`).
    #[serde(skip)]
    pub inline_keys: Vec<String>,
}

/// A progressive rollout: new versions go to a growing share of the matching proxies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// Percent of the matching proxies on the new version at each step; increasing, the
    /// last 100.
    pub steps: Vec<u8>,
    /// Time at a step, with every proxy of the step having ACKed, before the next.
    #[serde(default = "default_bake", with = "duration_text")]
    pub bake: std::time::Duration,
    /// NACKs of the new version tolerated before the rollout fails.
    #[serde(default)]
    pub max_nacks: u32,
    /// A proxy of the step that has not ACKed by then counts as failed.
    #[serde(default = "default_ack_timeout", with = "duration_text")]
    pub ack_timeout: std::time::Duration,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Gates on the step's own traffic, from Envoy's metrics service sink.
    #[serde(default)]
    pub health: Option<HealthSpec>,
}

/// A step's health gates: judged over the step's proxies' traffic since the step began
/// (docs/rollouts.md). A gate that fails is a failure of the rollout, like a NACK.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// Downstream 5xx / completed requests on the step's proxies.
    #[serde(default)]
    pub max_5xx_ratio: Option<Ratio>,
    /// Fewer requests than this on the step's proxies: no verdict yet.
    #[serde(default)]
    pub min_requests: u64,
    /// The largest downstream request time p99 a step's proxy reports (Envoy's histogram).
    #[serde(default, with = "opt_duration_text")]
    pub max_p99_latency: Option<std::time::Duration>,
    /// Wasm VM failures (Envoy's `wasm.*.vm_reload*` counters) tolerated on the step's
    /// proxies; any more fails the step, whatever the request count.
    #[serde(default)]
    pub max_wasm_failures: Option<u64>,
    /// Judge the 5xx ratio against the proxies still on the old version in the same
    /// window: the step fails only if its ratio exceeds theirs by more than this.
    #[serde(default)]
    pub baseline_margin: Option<Ratio>,
    /// How long after the bake a step without `min_requests` waits for them.
    #[serde(default = "default_max_wait", with = "duration_text")]
    pub max_wait: std::time::Duration,
    /// What a step that still has too few requests after `max_wait` does.
    #[serde(default)]
    pub insufficient_traffic: InsufficientTraffic,
}

fn default_max_wait() -> std::time::Duration {
    std::time::Duration::from_secs(600)
}

/// A fraction from 0 to 1 (compared and hashed by its bits).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct Ratio(pub f64);

impl Eq for Ratio {}

impl std::hash::Hash for Ratio {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

impl<'de> Deserialize<'de> for Ratio {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if (0.0..=1.0).contains(&v) {
            Ok(Ratio(v))
        } else {
            Err(serde::de::Error::custom(format!("{v}: a ratio from 0 to 1 (0.01 is 1 %)")))
        }
    }
}

/// What a step that never got `min_requests` does once `max_wait` is over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InsufficientTraffic {
    /// The rollout fails (too little traffic is not a pass).
    #[default]
    Fail,
    /// The step completes on its ACKs alone.
    Pass,
}

/// `Option<Duration>` written as `250ms`.
mod opt_duration_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<std::time::Duration>, D::Error> {
        // `null` is what `serialize` writes for none (stored rollout state reads it back).
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => humantime::parse_duration(&text)
                .map(Some)
                .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e} (write e.g. 250ms, 1s)"))),
        }
    }

    pub fn serialize<S: Serializer>(v: &Option<std::time::Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::duration_text::serialize(v, s),
            None => s.serialize_none(),
        }
    }
}

fn default_bake() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

fn default_ack_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

/// What a failed rollout does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// The step's proxies go back to the last completed version.
    #[default]
    Rollback,
    /// Stop where it is: the step keeps the new version, nobody else gets it.
    Halt,
}

/// Durations written as `60s`, `1m30s`, `500ms`.
mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e} (write e.g. 60s, 1m30s, 500ms)")))
    }

    pub fn serialize<S: Serializer>(v: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*v).to_string())
    }
}

/// An Envoy resource exactly as Envoy's docs write it (`"@type"` optional: the section
/// says it), plus one key of Filterplane's own, `node_selector`, removed before the
/// resource is checked against Envoy's descriptors.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct EnvoyResourceSpec(pub serde_json::Map<String, serde_json::Value>);

/// A `TypedExtensionConfig` served over ECDS under `name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionConfigSpec {
    /// The ECDS resource name, as the filter's `config_discovery` asks for it.
    pub name: String,
    /// Which proxies get this entry; absent means all.
    #[serde(default)]
    pub node_selector: NodeSelector,
    /// Any Envoy message, written as Envoy's own YAML/JSON writes it, with `"@type"`.
    /// Kept as JSON until the descriptors check it, so errors can point inside it.
    pub typed_config: serde_json::Value,
    /// Where Filterplane inserts a filter that discovers this config, in the listeners it
    /// serves. Absent: nowhere (a listener refers to it by itself).
    #[serde(default)]
    pub placement: Option<PlacementSpec>,
    /// Who fetches Wasm modules this config's code names (`remote`, `local.filename`):
    /// `filterplane` (default: fetched, checked and delivered like `wasm_plugins`) or
    /// `envoy` (passed to Envoy as written).
    #[serde(default)]
    pub wasm_fetch: Option<WasmFetch>,
    /// How new versions roll out (else the file's `rollout`, else all at once).
    #[serde(default)]
    pub rollout: Option<RolloutSpec>,
}

/// Who fetches the Wasm modules an extension config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WasmFetch {
    Filterplane,
    Envoy,
}

/// Which filter chains get the filter, and where in them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    /// `http` (an HTTP connection manager's `http_filters`) or `network` (a filter
    /// chain's `filters`). Absent: taken from the config's type
    /// (`envoy.extensions.filters.http.*` or `.network.*`).
    #[serde(default)]
    pub chain: Option<ChainKind>,
    /// Served listeners, by name. Empty: all.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// Served listeners, by the port of their address. Empty: all.
    #[serde(default)]
    pub ports: Vec<u32>,
    /// HTTP connection managers, by route config name (`rds.route_config_name` or
    /// `route_config.name`). Empty: all. HTTP only.
    #[serde(default)]
    pub route_configs: Vec<String>,
    #[serde(default)]
    pub phase: Phase,
    /// Order inside a phase: higher first; equal priorities go by name.
    #[serde(default)]
    pub priority: i32,
    /// Used until the config arrives over ECDS, and when it is removed (delta).
    #[serde(default)]
    pub default_config: Option<serde_json::Value>,
    /// Do not hold the listener back waiting for the first ECDS response.
    #[serde(default)]
    pub apply_default_config_without_warming: bool,
    /// Istio's documents place into whatever listeners the proxy has: a placement that
    /// lands nowhere is noted, not refused, and the config is served over ECDS anyway.
    #[serde(skip)]
    pub implied: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChainKind {
    Http,
    Network,
}

/// Where in the chain, in the spirit of Istio's WasmPlugin phases: `AUTHN`, then
/// `AUTHZ`, then `STATS` at the front of the chain, before the listener's own filters;
/// `UNSPECIFIED` (the default) at the end, just before the terminal filter (the router).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize)]
pub enum Phase {
    #[serde(rename = "AUTHN")]
    Authn,
    #[serde(rename = "AUTHZ")]
    Authz,
    #[serde(rename = "STATS")]
    Stats,
    #[default]
    #[serde(rename = "UNSPECIFIED")]
    Unspecified,
}

/// Matches Envoy nodes. Every criterion given must hold; a list matches if any item does.
/// Strings may use `*` as a wildcard (`edge-*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSelector {
    /// `node.id` values.
    #[serde(default)]
    pub ids: Vec<String>,
    /// `node.cluster` values.
    #[serde(default)]
    pub clusters: Vec<String>,
    /// Top-level keys of `node.metadata` and the value each must have (strings, numbers
    /// and booleans are compared by their text).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub locality: LocalitySelector,
    /// Workload labels, as Istio proxies carry them in `node.metadata.LABELS` (for a node
    /// without `LABELS`: its top-level metadata keys). All must match.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A regular expression the proxy's own version must match (Envoy's build version,
    /// `1.40.0`, from `node.user_agent_build_version`); Istio's `match.proxy.proxyVersion`.
    #[serde(default)]
    pub envoy_version: Option<crate::selector::VersionPattern>,
}

/// `node.locality` fields; each one given must be equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalitySelector {
    pub region: Option<String>,
    pub zone: Option<String>,
    pub sub_zone: Option<String>,
}

/// A Wasm plugin, in the spirit of Istio's WasmPlugin: compiled into an Envoy Wasm filter
/// config served over ECDS under `name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmPluginSpec {
    pub name: String,
    #[serde(default)]
    pub node_selector: NodeSelector,
    /// `file://PATH`, `http(s)://...`, `oci://REGISTRY/REPO:TAG` or `oci://REGISTRY/REPO@sha256:DIGEST`.
    pub url: String,
    /// Hex SHA-256 of the module, checked whenever given. Without it, an http(s) module is
    /// served pinned to the digest of what Filterplane fetched (see `image_pull_policy`).
    #[serde(default)]
    pub sha256: Option<String>,
    /// When to fetch again: `Always` at every reload, `IfNotPresent` only when the tag (or
    /// the unpinned http(s) URL) was not fetched before. Default: `Always` for an OCI tag
    /// `latest` (or none), else `IfNotPresent`.
    #[serde(default)]
    pub image_pull_policy: Option<PullPolicy>,
    /// Registry credentials, `USER:PASSWORD`, read from an environment variable or a file.
    #[serde(default)]
    pub image_pull_secret: Option<PullSecret>,
    /// Any YAML, handed to the plugin as JSON (its `configuration`).
    #[serde(default)]
    pub plugin_config: Option<serde_json::Value>,
    #[serde(default)]
    pub root_id: String,
    #[serde(default)]
    pub vm_config: WasmVmConfig,
    #[serde(default)]
    pub fail_strategy: FailStrategy,
    #[serde(default, rename = "type")]
    pub plugin_type: PluginType,
    /// `inline` (the module's bytes in the ECDS resource) or `remote` (Envoy downloads it
    /// from Filterplane). Default: the server's `--wasm-delivery`.
    #[serde(default)]
    pub delivery: Option<Delivery>,
    #[serde(default)]
    pub placement: Option<PlacementSpec>,
    /// How new versions roll out (else the file's `rollout`, else all at once).
    #[serde(default)]
    pub rollout: Option<RolloutSpec>,
    /// Keys that may have signed this plugin's module (else `wasm_verification`'s).
    #[serde(default)]
    pub verification: Option<PluginVerificationSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum PullPolicy {
    IfNotPresent,
    Always,
}

/// Where registry credentials are read from, written `{ env: VAR }` or `{ file: PATH }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PullSecret {
    /// The name of an environment variable holding `USER:PASSWORD`.
    Env(String),
    /// A file holding `USER:PASSWORD`.
    File(std::path::PathBuf),
}

impl<'de> Deserialize<'de> for PullSecret {
    // By hand: serde_yaml reads a derived enum only from a YAML tag (`!env VAR`), not from
    // the map everyone writes.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Spec {
            env: Option<String>,
            file: Option<std::path::PathBuf>,
        }
        match Spec::deserialize(d)? {
            Spec { env: Some(var), file: None } => Ok(PullSecret::Env(var)),
            Spec { env: None, file: Some(path) } => Ok(PullSecret::File(path)),
            _ => Err(serde::de::Error::custom("takes exactly one of `env` (a variable) or `file` (a path)")),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmVmConfig {
    /// Environment variables the plugin sees.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment variables of the Envoy process passed through to the plugin.
    #[serde(default)]
    pub host_env: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum FailStrategy {
    /// A failing plugin fails the request (503). The safe default.
    #[default]
    #[serde(rename = "FAIL_CLOSE")]
    FailClose,
    /// A failing plugin is skipped.
    #[serde(rename = "FAIL_OPEN")]
    FailOpen,
    /// A failing plugin's VM is started again (Envoy's FAIL_RELOAD).
    #[serde(rename = "FAIL_RELOAD")]
    FailReload,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum PluginType {
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "NETWORK")]
    Network,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    Inline,
    Remote,
}
