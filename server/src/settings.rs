//! Everything `serve` can be told, in one value: addresses, files, every bound and its
//! default. The command line (the `filterplane` binary) fills it in; tests build it
//! directly. `BOUNDS` lists each bound with its default as the README's "Limits and
//! hardening" table writes it, and a test checks the two agree.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use filterplane_state::etcd::EtcdUrl;
use filterplane_wasm::guard::Cidr;

pub use crate::{identity::IdentityRule, limits::ConnectionLimits, tls::ClientAuth};

/// The defaults of every setting that has one. The binary's flags use these.
pub mod defaults {
    use std::time::Duration;

    pub const XDS_ADDR: &str = "0.0.0.0:18000";
    pub const ADMIN_ADDR: &str = "127.0.0.1:18001";
    pub const DRAIN_GRACE: Duration = Duration::from_secs(600);
    pub const MAX_SUBSCRIBED_NAMES: usize = 10_000;
    pub const MAX_REMOVAL_PERCENT: u8 = 50;
    pub const ROLLOUT_SETTLE: Duration = Duration::from_secs(5);
    pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// 0: derived from the file-descriptor limit.
    pub const MAX_XDS_CONNECTIONS: usize = 0;
    pub const MAX_XDS_CONNECTIONS_PER_ADDRESS: usize = 1024;
    pub const MAX_QUEUED_BYTES_PER_STREAM: usize = filterplane_h2::output::DEFAULT_PER_STREAM;
    pub const MAX_QUEUED_BYTES_PER_CONNECTION: usize = filterplane_h2::output::DEFAULT_PER_CONNECTION;
    pub const MAX_QUEUED_BYTES: usize = filterplane_h2::output::DEFAULT_TOTAL;
    pub const MAX_ADMIN_CONNECTIONS: usize = 1024;
    pub const MAX_EVENT_CLIENTS: usize = 256;
    pub const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const MAX_NACK_MESSAGE_BYTES: usize = 4096;
    pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
    pub const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);
    pub const CACHE_MAX_BYTES: u64 = 1 << 30;
    pub const WASM_MODULE_CLUSTER: &str = "filterplane_modules";
    pub const WASM_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
    pub const WASM_FETCH_ATTEMPTS: u32 = 3;
    pub const WASM_FETCH_DEADLINE: Duration = Duration::from_secs(20);
    pub const WASM_MAX_MODULE_BYTES: u64 = 64 << 20;
    pub const WASM_CODE_FETCH_RETRIES: u32 = 10;
    /// The largest client status (CSDS) answer (fixed).
    pub const MAX_CSDS_RESPONSE_BYTES: usize = 64 << 20;
    /// The longest node id, and node cluster, a client may send (fixed).
    pub const MAX_NODE_ID_BYTES: usize = 1024;
    /// HTTP/2 keepalive: a PING this often; no answer by the next one closes the connection.
    pub const XDS_KEEPALIVE: Duration = Duration::from_secs(30);
    /// How long connections that answered a push hold back reading their clients' frames
    /// while others still have to answer it (`filterplane_h2::broadcast`), at most: about
    /// what a push to a million streams on two cores takes (fixed).
    pub const XDS_PUSH_READ_HOLD: Duration = Duration::from_secs(2);
}

/// Which HTTP/2 implementation serves the xDS port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdsHttp2 {
    /// Filterplane's own (`filterplane-h2`): one task per connection, no buffer held
    /// while idle.
    #[default]
    Lean,
    /// tonic's (hyper and h2): a fallback should the lean transport ever have a flaw.
    /// The same handlers, bounds and caps; more memory per connection.
    Tonic,
}

/// What `filterplane serve` runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A YAML file, or a directory whose *.yaml / *.yml files are merged.
    pub config: PathBuf,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub xds_http2: XdsHttp2,
    /// Make-before-break: how long a resource that left a proxy's config stays served.
    pub drain_grace: Duration,
    pub max_subscribed_names: usize,
    pub max_removal_percent: u8,
    /// After a start, how long rollout steps wait before picking their proxies (those
    /// reconnecting are counted first).
    pub rollout_settle: Duration,
    pub limits: ConnectionLimits,
    /// Host names the admin server answers to besides its address.
    pub admin_allowed_hosts: Vec<String>,
    pub max_nack_message_bytes: usize,
    pub max_config_bytes: u64,
    pub preflight_envoy: Option<PathBuf>,
    pub preflight_timeout: Duration,
    pub state: StateSettings,
    pub wasm: WasmSettings,
    pub security: SecuritySettings,
}

/// Where rollout state lives, and this replica's name.
#[derive(Debug, Clone, Default)]
pub struct StateSettings {
    /// The embedded database's directory (default: `state` in the cache directory).
    pub dir: Option<PathBuf>,
    /// Shared through etcd instead.
    pub store: Option<EtcdUrl>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Default: HOSTNAME:XDS_PORT.
    pub replica_name: Option<String>,
}

/// How Envoy gets Wasm modules by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WasmDelivery {
    #[default]
    Inline,
    Remote,
}

/// Wasm fetching, caching and delivery.
#[derive(Debug, Clone)]
pub struct WasmSettings {
    /// Default: $XDG_CACHE_HOME/filterplane, else ~/.cache/filterplane.
    pub cache_dir: Option<PathBuf>,
    pub cache_max_bytes: u64,
    /// Default: the config's directory.
    pub file_root: Option<PathBuf>,
    pub insecure_registries: Vec<String>,
    pub delivery: WasmDelivery,
    pub module_url: Option<String>,
    pub module_cluster: String,
    pub fetch_timeout: Duration,
    pub fetch_attempts: u32,
    pub fetch_deadline: Duration,
    pub max_module_bytes: u64,
    pub code_fetch_retries: u32,
    pub fetch_deny_cidr: Vec<Cidr>,
    pub fetch_allow_cidr: Vec<Cidr>,
    pub registry_auth_file: Option<PathBuf>,
    pub registry_ca_file: Option<PathBuf>,
}

/// TLS, client certificates, node identity and admin authentication.
#[derive(Debug, Clone, Default)]
pub struct SecuritySettings {
    pub xds_tls_cert: Option<PathBuf>,
    pub xds_tls_key: Option<PathBuf>,
    pub xds_client_ca: Option<PathBuf>,
    pub xds_client_auth: ClientAuth,
    pub node_identity: Vec<IdentityRule>,
    pub sensitive_to_authenticated_only: bool,
    pub admin_token_file: Option<PathBuf>,
    pub metrics_public: bool,
    pub admin_tls_cert: Option<PathBuf>,
    pub admin_tls_key: Option<PathBuf>,
    pub modules_addr: Option<SocketAddr>,
    pub modules_tls_cert: Option<PathBuf>,
    pub modules_tls_key: Option<PathBuf>,
    pub modules_secret_file: Option<PathBuf>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        use defaults::*;
        ConnectionLimits {
            max_streams_per_connection: MAX_STREAMS_PER_CONNECTION,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_xds_connections: MAX_XDS_CONNECTIONS,
            max_xds_connections_per_address: MAX_XDS_CONNECTIONS_PER_ADDRESS,
            max_queued_bytes_per_stream: MAX_QUEUED_BYTES_PER_STREAM,
            max_queued_bytes_per_connection: MAX_QUEUED_BYTES_PER_CONNECTION,
            max_queued_bytes: MAX_QUEUED_BYTES,
            max_admin_connections: MAX_ADMIN_CONNECTIONS,
            max_event_clients: MAX_EVENT_CLIENTS,
            admin_request_timeout: ADMIN_REQUEST_TIMEOUT,
            admin_idle_timeout: ADMIN_IDLE_TIMEOUT,
        }
    }
}

impl Default for WasmSettings {
    fn default() -> Self {
        use defaults::*;
        WasmSettings {
            cache_dir: None,
            cache_max_bytes: CACHE_MAX_BYTES,
            file_root: None,
            insecure_registries: vec![],
            delivery: WasmDelivery::Inline,
            module_url: None,
            module_cluster: WASM_MODULE_CLUSTER.into(),
            fetch_timeout: WASM_FETCH_TIMEOUT,
            fetch_attempts: WASM_FETCH_ATTEMPTS,
            fetch_deadline: WASM_FETCH_DEADLINE,
            max_module_bytes: WASM_MAX_MODULE_BYTES,
            code_fetch_retries: WASM_CODE_FETCH_RETRIES,
            fetch_deny_cidr: vec![],
            fetch_allow_cidr: vec![],
            registry_auth_file: None,
            registry_ca_file: None,
        }
    }
}

impl Settings {
    /// Every default, serving `config`.
    pub fn new(config: impl Into<PathBuf>) -> Settings {
        use defaults::*;
        Settings {
            config: config.into(),
            xds_addr: SocketAddr::from(([0, 0, 0, 0], 18000)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 18001)),
            xds_http2: XdsHttp2::Lean,
            drain_grace: DRAIN_GRACE,
            max_subscribed_names: MAX_SUBSCRIBED_NAMES,
            max_removal_percent: MAX_REMOVAL_PERCENT,
            rollout_settle: ROLLOUT_SETTLE,
            limits: ConnectionLimits::default(),
            admin_allowed_hosts: vec![],
            max_nack_message_bytes: MAX_NACK_MESSAGE_BYTES,
            max_config_bytes: MAX_CONFIG_BYTES,
            preflight_envoy: None,
            preflight_timeout: PREFLIGHT_TIMEOUT,
            state: StateSettings::default(),
            wasm: WasmSettings::default(),
            security: SecuritySettings::default(),
        }
    }
}

/// One bound, as the limits table (docs/operations.md) shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The flag that sets it, or, for a fixed bound, words its README row contains.
    pub key: &'static str,
    /// Whether `key` is a flag.
    pub flag: bool,
    /// The default as the README writes it (a bound with several values lists each).
    pub default: String,
}

/// `1,024`, `10,000`: how the README writes counts.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `16 MiB`, `4 KiB`, `512 bytes`: how the README writes sizes.
pub fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs())
}

/// Every bound `serve` enforces, with its default: those a flag sets and the fixed ones
/// other crates hold. The README's "Limits and hardening" table must agree.
pub fn bounds() -> Vec<Bound> {
    use defaults::*;
    let flag = |key, default: String| Bound { key, flag: true, default };
    let fixed = |key, default: String| Bound { key, flag: false, default };
    vec![
        flag("--max-config-bytes", size(MAX_CONFIG_BYTES)),
        flag("--max-removal-percent", format!("{MAX_REMOVAL_PERCENT} %")),
        flag("--max-subscribed-names", thousands(MAX_SUBSCRIBED_NAMES as u64)),
        flag("--max-nack-message-bytes", size(MAX_NACK_MESSAGE_BYTES as u64)),
        flag("--max-streams-per-connection", thousands(u64::from(MAX_STREAMS_PER_CONNECTION))),
        flag("--max-xds-connections", "the file-descriptor limit less".into()),
        flag("--max-xds-connections-per-address", thousands(MAX_XDS_CONNECTIONS_PER_ADDRESS as u64)),
        flag("--max-queued-bytes-per-stream", size(MAX_QUEUED_BYTES_PER_STREAM as u64)),
        flag("--max-queued-bytes-per-connection", size(MAX_QUEUED_BYTES_PER_CONNECTION as u64)),
        flag("--max-queued-bytes", size(MAX_QUEUED_BYTES as u64)),
        flag("--max-admin-connections", thousands(MAX_ADMIN_CONNECTIONS as u64)),
        flag("--max-event-clients", thousands(MAX_EVENT_CLIENTS as u64)),
        flag("--admin-request-timeout-secs", secs(ADMIN_REQUEST_TIMEOUT)),
        flag("--admin-idle-timeout-secs", secs(ADMIN_IDLE_TIMEOUT)),
        flag("--handshake-timeout-secs", secs(HANDSHAKE_TIMEOUT)),
        flag("--wasm-max-module-bytes", size(WASM_MAX_MODULE_BYTES)),
        flag("--cache-max-bytes", size(CACHE_MAX_BYTES)),
        flag("--wasm-fetch-timeout-secs", secs(WASM_FETCH_TIMEOUT)),
        flag("--wasm-fetch-deadline-secs", secs(WASM_FETCH_DEADLINE)),
        flag("--preflight-timeout-secs", secs(PREFLIGHT_TIMEOUT)),
        fixed("a gRPC request", size(filterplane_h2::MAX_REQUEST as u64)),
        fixed("a header block", size(filterplane_h2::MAX_HEADER_BLOCK as u64)),
        fixed("requests not complete yet", size(filterplane_h2::MAX_BUFFERED as u64)),
        fixed("a node's id or cluster", size(MAX_NODE_ID_BYTES as u64)),
        fixed("a client status (CSDS) answer", size(MAX_CSDS_RESPONSE_BYTES as u64)),
        fixed("client text in a log line", format!("{} characters", crate::log_limit::MAX_LOGGED_CHARS)),
        fixed(
            "a type URL Filterplane does not serve",
            format!("{} bytes", filterplane_xds::stream::MAX_LOGGED_TYPE_URL_BYTES),
        ),
        fixed("a client that does not answer", secs(XDS_KEEPALIVE)),
        fixed("reading a connection's input while a push goes out", secs(XDS_PUSH_READ_HOLD)),
        fixed("a replica's report to etcd", size(filterplane_state::reports::PART_BYTES as u64)),
        fixed("proxies whose stats (metrics service) are kept", thousands(crate::health::MAX_PROXIES as u64)),
        fixed("flushes of stats kept per proxy", thousands(crate::health::MAX_SAMPLES as u64)),
        fixed("a module signature", size(filterplane_wasm::sign::MAX_SIGNATURE_BYTES as u64)),
        fixed("a cosign payload", size(filterplane_wasm::oci::MAX_PAYLOAD_BYTES as u64)),
        fixed("payloads read per module", thousands(filterplane_wasm::oci::MAX_SIGNATURE_LAYERS as u64)),
        fixed("a TrafficExtension's inline Lua code", size(filterplane_config::istio::MAX_LUA_BYTES as u64)),
        fixed("a proxy version pattern", size(filterplane_config::VersionPattern::MAX_BYTES as u64)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_the_readme_writes_them() {
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(1024), "1,024");
        assert_eq!(thousands(100), "100");
        assert_eq!(size(16 << 20), "16 MiB");
        assert_eq!(size(4096), "4 KiB");
        assert_eq!(size(1 << 30), "1 GiB");
        assert_eq!(size(100), "100 bytes");
    }
}
