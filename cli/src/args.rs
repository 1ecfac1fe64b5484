//! The command line: clap's types, turned into the server's `Settings`.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use filterplane_server::settings::{
    defaults, ClientAuth, ConnectionLimits, IdentityRule, SecuritySettings, Settings, StateSettings, WasmDelivery,
    WasmSettings, XdsHttp2,
};

/// Filterplane: a standalone xDS control plane for Envoy. Serves extension configs
/// (ECDS) and the resources around them from Envoy-native YAML, validated against
/// Envoy's own protobuf descriptors, with hot reload and ACK/NACK tracking.
#[derive(Debug, Parser)]
#[command(name = "filterplane", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text, or as one JSON object per line (the same fields) for a log
    /// pipeline. Text is coloured only on a terminal (and never with NO_COLOR set).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "FILTERPLANE_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// How a command prints what it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// How log lines are written (to standard error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of the `serve` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve ADS and ECDS to Envoy from a config file or directory, reloading it on change
    /// (and on SIGHUP). An invalid change is refused; the last good config keeps serving.
    Serve(ServeArgs),
    /// Show every connected proxy and whether it runs what was sent (SYNCED), is still
    /// applying it (STALE) or refused it (NACKED), per xDS type, like `istioctl
    /// proxy-status`. Reads the admin API of a running `filterplane serve`.
    ///
    /// With NODE: that proxy alone, each resource it was sent, its version, and whether
    /// Envoy ACKed or NACKed it (with Envoy's message).
    ///
    /// Exit status: 0; 1 when the server cannot be asked; 3 when the last reload failed;
    /// 4 with --wait-synced when a proxy NACKs or is not synced in time (or NODE is not
    /// connected).
    Status {
        /// One proxy's node id.
        node: Option<String>,
        /// table (for people), json or yaml (for scripts: every proxy, all pages).
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Wait (at most DURATION, e.g. 30s, 2m) until every proxy, or NODE, runs what it
        /// was sent; exit 4 as soon as one NACKs, or if time runs out.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        wait_synced: Option<std::time::Duration>,
        /// The admin address of the server.
        #[arg(long, default_value = "http://127.0.0.1:18001", env = "FILTERPLANE_ADMIN_URL")]
        admin: String,
        #[command(flatten)]
        client: AdminClientArgs,
    },
    /// What one connected proxy is sent, as Envoy-native JSON (or YAML): every resource,
    /// selectors applied and filters placed; private keys and other fields Envoy marks
    /// sensitive are redacted.
    ConfigDump {
        /// The proxy's node id.
        node: String,
        /// json or yaml.
        #[arg(long, short, value_enum, default_value_t = Output::Json)]
        output: Output,
        /// The admin address of the server.
        #[arg(long, default_value = "http://127.0.0.1:18001", env = "FILTERPLANE_ADMIN_URL")]
        admin: String,
        #[command(flatten)]
        client: AdminClientArgs,
    },
    /// Print a shell completion script: `filterplane completions bash > /etc/bash_completion.d/filterplane`.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff): `filterplane man | man -l -`.
    Man,
    /// Reload the config of a running `filterplane serve` now. A reload that would remove
    /// more than --max-removal-percent of what is served is held; --confirm applies it.
    Reload {
        /// Apply even a config the removal guard holds.
        #[arg(long)]
        confirm: bool,
        /// The admin address of the server.
        #[arg(long, default_value = "http://127.0.0.1:18001", env = "FILTERPLANE_ADMIN_URL")]
        admin: String,
        #[command(flatten)]
        client: AdminClientArgs,
    },
    /// Progressive rollouts of a running `filterplane serve`: status, and (with the
    /// server's admin token) pause, resume, promote and abort.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
        /// The admin address of the server.
        #[arg(long, global = true, default_value = "http://127.0.0.1:18001", env = "FILTERPLANE_ADMIN_URL")]
        admin: String,
        #[command(flatten)]
        client: AdminClientArgs,
    },
    /// Wasm module tools.
    Wasm {
        #[command(subcommand)]
        command: WasmCommand,
    },
    /// Check a config file or directory the way `serve` would, print every error, and
    /// exit non-zero if there is any. (Wasm modules are not fetched.)
    Validate {
        /// A YAML file, or a directory whose *.yaml / *.yml files are merged.
        #[arg(long, short)]
        config: PathBuf,
        /// Have this Envoy binary check the resources too (`--mode validate`).
        #[arg(long)]
        preflight_envoy: Option<PathBuf>,
    },
}

/// How the CLI reaches a protected admin API.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AdminClientArgs {
    /// A file holding the admin bearer token (the server's --admin-token-file).
    #[arg(long, global = true, env = "FILTERPLANE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust for an https:// admin address, besides the system's.
    #[arg(long, global = true, env = "FILTERPLANE_ADMIN_CA")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// A YAML file of these flags, keyed by their names without the dashes
    /// (`max-streams-per-connection: 64`; lists as YAML lists; on/off flags as true or
    /// false; paths relative to the file). The command line and FILTERPLANE_* variables
    /// override it; it overrides the defaults. An unknown key is an error.
    #[arg(long, env = "FILTERPLANE_SETTINGS", value_name = "FILE")]
    pub settings: Option<PathBuf>,
    /// Print every setting in effect and where it came from (command line, environment,
    /// settings file and line, default), as a settings file, and exit.
    #[arg(long)]
    pub print_settings: bool,
    /// A YAML file, or a directory whose *.yaml / *.yml files are merged.
    #[arg(long, short, env = "FILTERPLANE_CONFIG")]
    pub config: PathBuf,
    /// Where Envoy connects for xDS (gRPC, HTTP/2 cleartext).
    #[arg(long, default_value = defaults::XDS_ADDR, env = "FILTERPLANE_XDS_ADDR")]
    pub xds_addr: SocketAddr,
    /// The admin HTTP server: /healthz, /readyz, /api/v1/*.
    #[arg(long, default_value = defaults::ADMIN_ADDR, env = "FILTERPLANE_ADMIN_ADDR")]
    pub admin_addr: SocketAddr,
    /// The HTTP/2 implementation of the xDS port: `lean` (Filterplane's own, least memory
    /// per connection) or `tonic` (hyper's h2, a fallback should the lean one ever fail
    /// you). The same services, bounds and caps either way.
    #[arg(long, value_enum, default_value_t = Http2Arg::Lean, env = "FILTERPLANE_XDS_HTTP2")]
    pub xds_http2: Http2Arg,
    /// Make-before-break: seconds a resource that left a proxy's config (an extension config
    /// whose filter left its listeners, over delta; a cluster, endpoints or secret a changed
    /// listener may have used) stays served to that proxy after it ACKed the listener
    /// update, unless Envoy unsubscribes it first (it does once nothing, draining listeners
    /// included, refers to it). Set it to at least your Envoys' --drain-time-s (600 unless set).
    #[arg(long, default_value_t = defaults::DRAIN_GRACE.as_secs(), env = "FILTERPLANE_DRAIN_GRACE_SECS")]
    pub drain_grace_secs: u64,
    /// Names one xDS stream may subscribe to per type beyond what that proxy is served of
    /// the type (names that do not exist); a stream that asks for more is ended with
    /// RESOURCE_EXHAUSTED (counted in filterplane_limit_hits_total).
    #[arg(long, default_value_t = defaults::MAX_SUBSCRIBED_NAMES, env = "FILTERPLANE_MAX_SUBSCRIBED_NAMES")]
    pub max_subscribed_names: usize,
    /// A reload that would remove more than this percent of the served resources (a
    /// truncated file, an emptied directory) is held until `filterplane reload --confirm`
    /// or SIGHUP; 100 turns the guard off.
    #[arg(long, default_value_t = defaults::MAX_REMOVAL_PERCENT, value_parser = clap::value_parser!(u8).range(0..=100), env = "FILTERPLANE_MAX_REMOVAL_PERCENT")]
    pub max_removal_percent: u8,
    /// Seconds after a start during which rollout steps do not pick their proxies yet:
    /// proxies reconnecting are counted first, so a step never holds more than its share.
    #[arg(long, default_value_t = defaults::ROLLOUT_SETTLE.as_secs(), env = "FILTERPLANE_ROLLOUT_SETTLE_SECS")]
    pub rollout_settle_secs: u64,
    /// xDS streams one HTTP/2 connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, default_value_t = defaults::MAX_STREAMS_PER_CONNECTION, env = "FILTERPLANE_MAX_STREAMS_PER_CONNECTION")]
    pub max_streams_per_connection: u32,
    /// Seconds an xDS connection has to send the HTTP/2 preface before it is closed.
    #[arg(long, default_value_t = defaults::HANDSHAKE_TIMEOUT.as_secs(), env = "FILTERPLANE_HANDSHAKE_TIMEOUT_SECS")]
    pub handshake_timeout_secs: u64,
    /// xDS connections open at once, all clients together. 0: the file-descriptor limit
    /// less a reserve for the admin and module ports, probes and files (see docs/operations.md).
    /// When full, the oldest connection that has not sent a byte yet makes room, or the
    /// new one is closed.
    #[arg(long, default_value_t = defaults::MAX_XDS_CONNECTIONS, env = "FILTERPLANE_MAX_XDS_CONNECTIONS")]
    pub max_xds_connections: usize,
    /// xDS connections open at once from one client address (Envoys behind one NAT
    /// share one); more are closed at once.
    #[arg(long, default_value_t = defaults::MAX_XDS_CONNECTIONS_PER_ADDRESS, env = "FILTERPLANE_MAX_XDS_CONNECTIONS_PER_ADDRESS")]
    pub max_xds_connections_per_address: usize,
    /// Bytes of responses one xDS stream may have waiting behind its client's
    /// flow-control window; past it the stream is reset (ENHANCE_YOUR_CALM). A newer
    /// SotW response of a type replaces an unsent older one, so this is rarely reached.
    #[arg(long, default_value_t = defaults::MAX_QUEUED_BYTES_PER_STREAM, env = "FILTERPLANE_MAX_QUEUED_BYTES_PER_STREAM")]
    pub max_queued_bytes_per_stream: usize,
    /// The same for all streams of one xDS connection; past it, GOAWAY and close.
    #[arg(long, default_value_t = defaults::MAX_QUEUED_BYTES_PER_CONNECTION, env = "FILTERPLANE_MAX_QUEUED_BYTES_PER_CONNECTION")]
    pub max_queued_bytes_per_connection: usize,
    /// The same for the whole server; past it, streams held by a window their client
    /// keeps closed are reset.
    #[arg(long, default_value_t = defaults::MAX_QUEUED_BYTES, env = "FILTERPLANE_MAX_QUEUED_BYTES")]
    pub max_queued_bytes: usize,
    /// Admin connections open at once; more are answered 503 and closed, so admin
    /// clients never take the file descriptors Envoys need.
    #[arg(long, default_value_t = defaults::MAX_ADMIN_CONNECTIONS, env = "FILTERPLANE_MAX_ADMIN_CONNECTIONS")]
    pub max_admin_connections: usize,
    /// Clients of /api/v1/events (the page's live updates) at once; more get 503.
    #[arg(long, default_value_t = defaults::MAX_EVENT_CLIENTS, env = "FILTERPLANE_MAX_EVENT_CLIENTS")]
    pub max_event_clients: usize,
    /// A host name the admin server answers to besides its address, IP literals and
    /// localhost (a DNS-rebinding page uses a name of its own). Repeatable.
    #[arg(long = "admin-allowed-host", env = "FILTERPLANE_ADMIN_ALLOWED_HOST", value_delimiter = ',')]
    pub admin_allowed_hosts: Vec<String>,
    /// Seconds an admin connection has to send its first request before it is closed.
    #[arg(long, default_value_t = defaults::ADMIN_REQUEST_TIMEOUT.as_secs(), env = "FILTERPLANE_ADMIN_REQUEST_TIMEOUT_SECS")]
    pub admin_request_timeout_secs: u64,
    /// Seconds an admin connection may go without reading or writing before it is closed
    /// (event streams write a keep-alive every 15 s).
    #[arg(long, default_value_t = defaults::ADMIN_IDLE_TIMEOUT.as_secs(), env = "FILTERPLANE_ADMIN_IDLE_TIMEOUT_SECS")]
    pub admin_idle_timeout_secs: u64,
    /// Bytes of a NACK's message kept, logged and shown; the rest is cut (counted).
    #[arg(long, default_value_t = defaults::MAX_NACK_MESSAGE_BYTES, env = "FILTERPLANE_MAX_NACK_MESSAGE_BYTES")]
    pub max_nack_message_bytes: usize,
    /// Largest config file read, in bytes.
    #[arg(long, default_value_t = defaults::MAX_CONFIG_BYTES, env = "FILTERPLANE_MAX_CONFIG_BYTES")]
    pub max_config_bytes: u64,
    #[command(flatten)]
    pub wasm: WasmArgs,
    #[command(flatten)]
    pub security: SecurityArgs,
    /// An Envoy binary that checks every new or changed resource in `--mode validate`
    /// before any proxy gets it; what it refuses is a refused reload with its message.
    #[arg(long, env = "FILTERPLANE_PREFLIGHT_ENVOY")]
    pub preflight_envoy: Option<PathBuf>,
    /// Seconds one pre-flight Envoy run may take.
    #[arg(long, default_value_t = defaults::PREFLIGHT_TIMEOUT.as_secs(), env = "FILTERPLANE_PREFLIGHT_TIMEOUT_SECS")]
    pub preflight_timeout_secs: u64,
    /// Where rollout state is kept across restarts (an embedded database). Default:
    /// a directory per config path under `state/` in the module cache directory.
    #[arg(long, env = "FILTERPLANE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Share state with other replicas through etcd (v3):
    /// `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`, or `etcds://...` for TLS. Several
    /// members: calls go to the one that answered last, and on to the next when it cannot
    /// be reached. Rollout state lives there (instead of --state-dir); one replica at a
    /// time drives rollout steps; every replica publishes a summary of its proxies, so
    /// each shows the whole fleet. Give every replica the same value.
    #[arg(long, env = "FILTERPLANE_STATE_STORE", value_name = "URL")]
    pub state_store: Option<filterplane_state::etcd::EtcdUrl>,
    /// etcd over TLS (`etcds://`): the CA that signed the members' certificates (PEM).
    /// Without it, the public web roots are trusted.
    #[arg(long, env = "FILTERPLANE_STATE_STORE_CA_FILE", value_name = "FILE")]
    pub state_store_ca_file: Option<PathBuf>,
    /// etcd over TLS: a client certificate (PEM), for members that ask for one
    /// (`--client-cert-auth`); with --state-store-key-file.
    #[arg(long, env = "FILTERPLANE_STATE_STORE_CERT_FILE", value_name = "FILE", requires = "state_store_key_file")]
    pub state_store_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "FILTERPLANE_STATE_STORE_KEY_FILE", value_name = "FILE", requires = "state_store_cert_file")]
    pub state_store_key_file: Option<PathBuf>,
    /// etcd authentication: the user (with --state-store-password-file).
    #[arg(long, env = "FILTERPLANE_STATE_STORE_USER", requires = "state_store_password_file")]
    pub state_store_user: Option<String>,
    /// etcd authentication: a file holding the user's password (its first line).
    #[arg(long, env = "FILTERPLANE_STATE_STORE_PASSWORD_FILE", value_name = "FILE", requires = "state_store_user")]
    pub state_store_password_file: Option<PathBuf>,
    /// This replica's name among the others (default: HOSTNAME:XDS_PORT). Unique per
    /// replica.
    #[arg(long, env = "FILTERPLANE_REPLICA_NAME")]
    pub replica_name: Option<String>,
}

/// TLS, client certificates, node identity and admin authentication.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// xDS over TLS: the server certificate chain (PEM, leaf first). Read again when it
    /// changes: new connections use the new one, open streams go on.
    #[arg(long, requires = "xds_tls_key", env = "FILTERPLANE_XDS_TLS_CERT")]
    pub xds_tls_cert: Option<PathBuf>,
    /// xDS over TLS: the private key (PEM) of --xds-tls-cert.
    #[arg(long, requires = "xds_tls_cert", env = "FILTERPLANE_XDS_TLS_KEY")]
    pub xds_tls_key: Option<PathBuf>,
    /// mTLS: the CA certificates (PEM) proxies' client certificates must chain to; a
    /// client without a valid one is refused in the handshake. Read again when it changes.
    #[arg(long, requires = "xds_tls_cert", env = "FILTERPLANE_XDS_CLIENT_CA")]
    pub xds_client_ca: Option<PathBuf>,
    /// With --xds-client-ca: `optional` also lets clients without a certificate connect,
    /// unauthenticated (no node identity; no sensitive resources with
    /// --sensitive-to-authenticated-only).
    #[arg(long, value_enum, default_value_t = ClientAuthArg::Required, env = "FILTERPLANE_XDS_CLIENT_AUTH")]
    pub xds_client_auth: ClientAuthArg,
    /// Which node ids and clusters a client certificate may claim (needs --xds-client-ca),
    /// e.g. `uri=spiffe://example.org/node/*,node=$1` or
    /// `dns=*.edge.example.com,node=edge-$1-*,cluster=edge`. Repeatable; a stream must
    /// match one rule, else it is ended with PERMISSION_DENIED. See docs/network.md.
    #[arg(long = "node-identity", value_name = "RULE", env = "FILTERPLANE_NODE_IDENTITY")]
    pub node_identity: Vec<IdentityRule>,
    /// Serve secrets (SDS Secrets, and listeners, clusters or other resources holding a
    /// private key or other field Envoy marks sensitive) only to proxies that
    /// authenticated with a client certificate; others get the rest without them.
    #[arg(long, env = "FILTERPLANE_SENSITIVE_TO_AUTHENTICATED_ONLY")]
    pub sensitive_to_authenticated_only: bool,
    /// A file holding the admin API's bearer token: every endpoint but /healthz, /readyz
    /// (and /metrics with --metrics-public) then needs `Authorization: Bearer TOKEN` (the
    /// page asks for it once and keeps a session cookie). Read again when it changes.
    #[arg(long, env = "FILTERPLANE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// With --admin-token-file: /metrics stays open to scrapers without the token.
    #[arg(long, env = "FILTERPLANE_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// Admin over TLS: the server certificate chain (PEM). Read again when it changes.
    #[arg(long, requires = "admin_tls_key", env = "FILTERPLANE_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,
    /// Admin over TLS: the private key (PEM) of --admin-tls-cert.
    #[arg(long, requires = "admin_tls_cert", env = "FILTERPLANE_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,
    /// A listener of its own for remote Wasm delivery: it serves module bytes only (the
    /// modules served configs refer to, at unguessable paths), nothing of the admin API.
    /// Without it, the admin port serves them.
    #[arg(long, env = "FILTERPLANE_MODULES_ADDR")]
    pub modules_addr: Option<SocketAddr>,
    /// The module listener over TLS: the server certificate chain (PEM). Envoy's module
    /// cluster then needs a TLS transport socket.
    #[arg(long, requires = "modules_tls_key", env = "FILTERPLANE_MODULES_TLS_CERT")]
    pub modules_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --modules-tls-cert.
    #[arg(long, requires = "modules_tls_cert", env = "FILTERPLANE_MODULES_TLS_KEY")]
    pub modules_tls_key: Option<PathBuf>,
    /// The secret module paths are derived from (HMAC-SHA256 of the module's SHA-256), at
    /// least 32 bytes. Default: `module-path-secret` in the cache directory, created with
    /// random bytes on first start. Replicas serving the same proxies share it.
    #[arg(long, env = "FILTERPLANE_MODULES_SECRET_FILE")]
    pub modules_secret_file: Option<PathBuf>,
}

impl ServeArgs {
    /// What the server runs with.
    pub fn into_settings(self) -> Settings {
        let secs = std::time::Duration::from_secs;
        let w = self.wasm;
        let s = self.security;
        Settings {
            config: self.config,
            xds_addr: self.xds_addr,
            admin_addr: self.admin_addr,
            xds_http2: match self.xds_http2 {
                Http2Arg::Lean => XdsHttp2::Lean,
                Http2Arg::Tonic => XdsHttp2::Tonic,
            },
            drain_grace: secs(self.drain_grace_secs),
            max_subscribed_names: self.max_subscribed_names,
            max_removal_percent: self.max_removal_percent,
            rollout_settle: secs(self.rollout_settle_secs),
            limits: ConnectionLimits {
                max_streams_per_connection: self.max_streams_per_connection,
                handshake_timeout: secs(self.handshake_timeout_secs),
                max_xds_connections: self.max_xds_connections,
                max_xds_connections_per_address: self.max_xds_connections_per_address,
                max_queued_bytes_per_stream: self.max_queued_bytes_per_stream,
                max_queued_bytes_per_connection: self.max_queued_bytes_per_connection,
                max_queued_bytes: self.max_queued_bytes,
                max_admin_connections: self.max_admin_connections,
                max_event_clients: self.max_event_clients,
                admin_request_timeout: secs(self.admin_request_timeout_secs),
                admin_idle_timeout: secs(self.admin_idle_timeout_secs),
            },
            admin_allowed_hosts: self.admin_allowed_hosts,
            max_nack_message_bytes: self.max_nack_message_bytes,
            max_config_bytes: self.max_config_bytes,
            preflight_envoy: self.preflight_envoy,
            preflight_timeout: secs(self.preflight_timeout_secs),
            state: StateSettings {
                dir: self.state_dir,
                store: self.state_store,
                ca_file: self.state_store_ca_file,
                cert_file: self.state_store_cert_file,
                key_file: self.state_store_key_file,
                user: self.state_store_user,
                password_file: self.state_store_password_file,
                replica_name: self.replica_name,
            },
            wasm: WasmSettings {
                cache_dir: w.cache_dir,
                cache_max_bytes: w.cache_max_bytes,
                file_root: w.wasm_file_root,
                insecure_registries: w.insecure_registries,
                delivery: match w.wasm_delivery {
                    DeliveryArg::Inline => WasmDelivery::Inline,
                    DeliveryArg::Remote => WasmDelivery::Remote,
                },
                module_url: w.wasm_module_url,
                module_cluster: w.wasm_module_cluster,
                fetch_timeout: secs(w.wasm_fetch_timeout_secs),
                fetch_attempts: w.wasm_fetch_attempts,
                fetch_deadline: secs(w.wasm_fetch_deadline_secs),
                max_module_bytes: w.wasm_max_module_bytes,
                code_fetch_retries: w.wasm_code_fetch_retries,
                fetch_deny_cidr: w.wasm_fetch_deny_cidr,
                fetch_allow_cidr: w.wasm_fetch_allow_cidr,
                registry_auth_file: w.registry_auth_file,
                registry_ca_file: w.registry_ca_file,
            },
            security: SecuritySettings {
                xds_tls_cert: s.xds_tls_cert,
                xds_tls_key: s.xds_tls_key,
                xds_client_ca: s.xds_client_ca,
                xds_client_auth: match s.xds_client_auth {
                    ClientAuthArg::Required => ClientAuth::Required,
                    ClientAuthArg::Optional => ClientAuth::Optional,
                },
                node_identity: s.node_identity,
                sensitive_to_authenticated_only: s.sensitive_to_authenticated_only,
                admin_token_file: s.admin_token_file,
                metrics_public: s.metrics_public,
                admin_tls_cert: s.admin_tls_cert,
                admin_tls_key: s.admin_tls_key,
                modules_addr: s.modules_addr,
                modules_tls_cert: s.modules_tls_cert,
                modules_tls_key: s.modules_tls_key,
                modules_secret_file: s.modules_secret_file,
            },
        }
    }
}

/// Whether xDS clients must show a certificate from the client CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ClientAuthArg {
    /// A client without a valid certificate is refused in the handshake.
    #[default]
    Required,
    /// A client may connect without a certificate; it is then unauthenticated (no node
    /// identity, and no sensitive resources with --sensitive-to-authenticated-only). A
    /// certificate it does show must still be valid.
    Optional,
}

/// The xDS port's HTTP/2 implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Http2Arg {
    /// Filterplane's own: one task per connection, no buffer held while idle.
    #[default]
    Lean,
    /// tonic's (hyper and h2): the fallback.
    Tonic,
}

#[derive(Debug, Clone, Subcommand)]
pub enum RolloutCommand {
    /// Rollouts in progress (or of NAME) and the recent history.
    Status { name: Option<String> },
    /// Stop moving NAME's rollout to its next step.
    Pause { name: String },
    /// Let a paused rollout of NAME go on.
    Resume { name: String },
    /// Put every matching proxy on NAME's new version now; the rollout is complete.
    Promote { name: String },
    /// Send NAME's last completed version back to the proxies of the step, now.
    Abort { name: String },
}

impl RolloutCommand {
    /// The admin action, and the entry, of a state-changing command.
    pub fn action(&self) -> Option<(&'static str, &str)> {
        match self {
            RolloutCommand::Status { .. } => None,
            RolloutCommand::Pause { name } => Some(("pause", name)),
            RolloutCommand::Resume { name } => Some(("resume", name)),
            RolloutCommand::Promote { name } => Some(("promote", name)),
            RolloutCommand::Abort { name } => Some(("abort", name)),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum WasmCommand {
    /// Publish a module as a Wasm OCI artifact (one application/vnd.module.wasm.content.layer.v1+wasm
    /// layer) and print the digest and SHA-256 to put in the YAML. The module is checked first.
    Push {
        /// The .wasm file.
        file: PathBuf,
        /// Where to: oci://REGISTRY/REPOSITORY:TAG
        reference: String,
        /// The registry speaks plain HTTP (a local registry).
        #[arg(long)]
        insecure: bool,
        /// An environment variable holding USER:PASSWORD for the registry.
        #[arg(long)]
        credentials_env: Option<String>,
        /// PEM certificates of a private CA the registry's certificate comes from.
        #[arg(long)]
        registry_ca_file: Option<PathBuf>,
        /// Also push a signature of the module's manifest, in cosign's format (the tag
        /// sha256-DIGEST.sig beside it), made with this unencrypted PKCS#8 private key.
        #[arg(long)]
        sign_key: Option<PathBuf>,
    },
    /// Sign a module file with a private key (unencrypted PKCS#8 PEM: ECDSA P-256, RSA or
    /// Ed25519) and write the detached signature as `cosign sign-blob` does: base64, to
    /// FILE.sig beside it unless --output says where.
    Sign {
        /// The .wasm file.
        file: PathBuf,
        /// The private key.
        #[arg(long)]
        key: PathBuf,
        /// Where the signature goes (default: FILE.sig).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Check a module file's detached signature (FILE.sig unless --signature says) against
    /// trusted public keys; exit 0 and name the key that signed it, else exit 1 and say why.
    Verify {
        /// The .wasm file.
        file: PathBuf,
        /// A trusted PEM public key (repeatable).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// The signature file (default: FILE.sig).
        #[arg(long)]
        signature: Option<PathBuf>,
    },
}

/// How Envoy gets Wasm modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeliveryArg {
    /// The module's bytes inside the ECDS resource: nothing else to configure; every push
    /// carries the whole module to every proxy.
    Inline,
    /// Envoy downloads the module once from Filterplane's /modules/sha256/HEX (checked
    /// against the SHA-256); needs a cluster to Filterplane's admin address in the bootstrap.
    Remote,
}

/// Wasm fetching, caching and delivery.
#[derive(Debug, Clone, clap::Args)]
pub struct WasmArgs {
    /// Where fetched modules are kept, content-addressed; survives restarts.
    /// Default: $XDG_CACHE_HOME/filterplane, else ~/.cache/filterplane.
    #[arg(long, env = "FILTERPLANE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Size bound of the module cache; least recently used modules not being served go first.
    #[arg(long, default_value_t = defaults::CACHE_MAX_BYTES, env = "FILTERPLANE_CACHE_MAX_BYTES")]
    pub cache_max_bytes: u64,
    /// file:// modules must be under this directory. Default: the config's directory.
    #[arg(long, env = "FILTERPLANE_WASM_FILE_ROOT")]
    pub wasm_file_root: Option<PathBuf>,
    /// A registry (HOST:PORT) that may be reached over plain HTTP. Repeatable.
    #[arg(long = "insecure-registry", env = "FILTERPLANE_INSECURE_REGISTRY", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,
    /// Default delivery of modules to Envoy (a plugin's `delivery` overrides it).
    #[arg(long, value_enum, default_value_t = DeliveryArg::Inline, env = "FILTERPLANE_WASM_DELIVERY")]
    pub wasm_delivery: DeliveryArg,
    /// Base URL Envoy downloads modules from (remote delivery). Default: http://ADMIN-ADDR.
    #[arg(long, env = "FILTERPLANE_WASM_MODULE_URL")]
    pub wasm_module_url: Option<String>,
    /// The Envoy cluster that reaches --wasm-module-url (remote delivery).
    #[arg(long, default_value = defaults::WASM_MODULE_CLUSTER, env = "FILTERPLANE_WASM_MODULE_CLUSTER")]
    pub wasm_module_cluster: String,
    /// Timeout of one fetch attempt, in seconds.
    #[arg(long, default_value_t = defaults::WASM_FETCH_TIMEOUT.as_secs(), env = "FILTERPLANE_WASM_FETCH_TIMEOUT_SECS")]
    pub wasm_fetch_timeout_secs: u64,
    /// Attempts per fetch (with exponential backoff between them).
    #[arg(long, default_value_t = defaults::WASM_FETCH_ATTEMPTS, env = "FILTERPLANE_WASM_FETCH_ATTEMPTS")]
    pub wasm_fetch_attempts: u32,
    /// Seconds one reload waits for its modules; a fetch still running then fails for
    /// that reload (the plugin keeps its previous version) and the rest is applied.
    #[arg(long, default_value_t = defaults::WASM_FETCH_DEADLINE.as_secs(), env = "FILTERPLANE_WASM_FETCH_DEADLINE_SECS")]
    pub wasm_fetch_deadline_secs: u64,
    /// Largest module accepted, in bytes.
    #[arg(long, default_value_t = defaults::WASM_MAX_MODULE_BYTES, env = "FILTERPLANE_WASM_MAX_MODULE_BYTES")]
    pub wasm_max_module_bytes: u64,
    /// Remote delivery: how many times a Wasm config is sent again after Envoy NACKs it
    /// while it fetches the module into its cache (100 ms apart, doubling, at most 5 s),
    /// before the NACK counts as a reject.
    #[arg(long, default_value_t = defaults::WASM_CODE_FETCH_RETRIES, env = "FILTERPLANE_WASM_CODE_FETCH_RETRIES")]
    pub wasm_code_fetch_retries: u32,
    /// Addresses (CIDR) module downloads may not connect to, besides the default
    /// link-local and cloud metadata ranges; checked after DNS and on every redirect.
    /// Repeatable.
    #[arg(long, value_name = "CIDR", env = "FILTERPLANE_WASM_FETCH_DENY_CIDR", value_delimiter = ',')]
    pub wasm_fetch_deny_cidr: Vec<filterplane_wasm::guard::Cidr>,
    /// Addresses (CIDR) exempt from the deny list (e.g. a registry on a link-local
    /// address). Repeatable.
    #[arg(long, value_name = "CIDR", env = "FILTERPLANE_WASM_FETCH_ALLOW_CIDR", value_delimiter = ',')]
    pub wasm_fetch_allow_cidr: Vec<filterplane_wasm::guard::Cidr>,
    /// Registry credentials for plugins without `image_pull_secret`: a Docker
    /// config.json, a Kubernetes dockerconfigjson Secret, or USER:PASSWORD. Default:
    /// $DOCKER_CONFIG/config.json when it exists. A registry without an entry is pulled
    /// anonymously.
    #[arg(long, env = "FILTERPLANE_REGISTRY_AUTH_FILE")]
    pub registry_auth_file: Option<PathBuf>,
    /// PEM certificates of a private CA that registries and module servers use, trusted
    /// besides the system's.
    #[arg(long, env = "FILTERPLANE_REGISTRY_CA_FILE")]
    pub registry_ca_file: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every bound flag of `serve` is among the settings' bounds, whose README rows the
    /// server's tests check, so no bound escapes the limits table.
    #[test]
    fn every_bound_flag_of_serve_is_a_documented_bound() {
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("serve");
        let bounds: Vec<String> =
            filterplane_server::settings::bounds().into_iter().map(|b| b.key.to_owned()).collect();
        let missing: Vec<String> = serve
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| l.starts_with("max-") || l.ends_with("-timeout-secs") || l.ends_with("-bytes"))
            .map(|l| format!("--{l}"))
            .filter(|flag| !bounds.contains(flag))
            .collect();
        assert!(missing.is_empty(), "bound flags missing from settings::bounds: {missing:?}");
    }

    /// Every flag of `serve` reads its `FILTERPLANE_*` variable (the README says so).
    #[test]
    fn every_serve_flag_has_its_environment_variable() {
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("serve");
        let missing: Vec<String> = serve
            .get_arguments()
            .filter(|a| a.get_long().is_some_and(|l| l != "help" && l != "print-settings"))
            .filter(|a| {
                let want = format!("FILTERPLANE_{}", a.get_long().unwrap_or_default().to_uppercase().replace('-', "_"));
                a.get_env().and_then(|e| e.to_str()) != Some(want.as_str())
            })
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .collect();
        assert!(missing.is_empty(), "flags without their FILTERPLANE_* variable: {missing:?}");
    }

    /// The flags turn into the settings they name; defaults are the settings' own.
    #[test]
    fn flags_become_settings() {
        let Command::Serve(args) = Cli::parse_from([
            "filterplane",
            "serve",
            "--config",
            "c.yaml",
            "--max-streams-per-connection",
            "7",
            "--xds-http2",
            "tonic",
            "--wasm-fetch-deadline-secs",
            "3",
            "--xds-client-auth",
            "optional",
        ])
        .command
        else {
            panic!("serve")
        };
        let s = args.into_settings();
        let defaults = Settings::new("c.yaml");
        assert_eq!(s.limits.max_streams_per_connection, 7);
        assert_eq!(s.xds_http2, XdsHttp2::Tonic);
        assert_eq!(s.wasm.fetch_deadline, std::time::Duration::from_secs(3));
        assert_eq!(s.security.xds_client_auth, ClientAuth::Optional);
        assert_eq!(s.limits.max_queued_bytes, defaults.limits.max_queued_bytes);
        assert_eq!(s.drain_grace, defaults.drain_grace);
        assert_eq!(s.xds_addr, defaults.xds_addr);
        assert_eq!(s.admin_addr, defaults.admin_addr);
        assert_eq!(s.max_config_bytes, defaults.max_config_bytes);
        assert_eq!(s.wasm.module_cluster, defaults.wasm.module_cluster);
    }
}

/// Every `filterplane` command line the README and docs/ show in a shell block parses with
/// these very flags: the docs cannot drift from the binary.
#[cfg(test)]
mod docs_commands {
    use clap::Parser;

    use super::Cli;

    /// Shell words of `line` (quotes kept together, `#` comments dropped).
    fn words(line: &str) -> Vec<String> {
        let (mut out, mut cur, mut quote, mut any) = (Vec::new(), String::new(), None, false);
        for c in line.chars() {
            match (quote, c) {
                (None, '#') if cur.is_empty() => break,
                (None, '\'' | '"') => {
                    quote = Some(c);
                    any = true;
                }
                (Some(q), c) if c == q => quote = None,
                (None, c) if c.is_whitespace() => {
                    if any || !cur.is_empty() {
                        out.push(std::mem::take(&mut cur));
                        any = false;
                    }
                }
                (_, c) => cur.push(c),
            }
        }
        if any || !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// The `filterplane …` invocations of the shell blocks of `text`.
    fn commands(text: &str) -> Vec<Vec<String>> {
        let mut found = Vec::new();
        let mut in_sh = false;
        let mut joined = String::new();
        for line in text.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("```") {
                in_sh = matches!(trimmed, "```sh" | "```bash" | "```shell");
                continue;
            }
            if !in_sh {
                continue;
            }
            joined.push_str(trimmed.trim_end_matches('\\'));
            joined.push(' ');
            if trimmed.ends_with('\\') {
                continue;
            }
            let line = std::mem::take(&mut joined);
            for part in line.split(['|', ';', '&']) {
                let w = words(part);
                let start = if w.first().map(String::as_str) == Some("filterplane") {
                    Some(0)
                } else {
                    w.windows(4)
                        .position(|x| x[0] == "cargo" && x[1] == "run" && x[2] == "--bin" && x[3] == "filterplane")
                        .and_then(|i| w.iter().skip(i).position(|a| a == "--").map(|j| i + j))
                };
                if let Some(s) = start {
                    let mut args = vec!["filterplane".to_owned()];
                    args.extend(w[s + 1..].iter().cloned());
                    found.push(args);
                }
            }
        }
        found
    }

    #[test]
    fn every_command_line_in_the_docs_parses() {
        let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        let mut files = vec![root.join("README.md")];
        for e in std::fs::read_dir(root.join("docs")).expect("docs/").flatten() {
            if e.path().extension().is_some_and(|x| x == "md") {
                files.push(e.path());
            }
        }
        let mut checked = 0;
        let mut wrong = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).expect("read a doc");
            for args in commands(&text) {
                checked += 1;
                if let Err(e) = Cli::try_parse_from(&args) {
                    if !matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion)
                    {
                        let first = e.to_string().lines().next().unwrap_or_default().to_owned();
                        wrong.push(format!("{}: {}: {first}", file.display(), args.join(" ")));
                    }
                }
            }
        }
        assert!(checked >= 12, "only {checked} command lines found: the extractor broke");
        assert!(wrong.is_empty(), "command lines in the docs the binary refuses:\n{}", wrong.join("\n"));
    }

    #[test]
    fn words_and_commands_read_shell_as_written() {
        assert_eq!(words("a 'b c' \"d\" # e"), ["a", "b c", "d"]);
        let found = commands(
            "```sh\nfilterplane reload && filterplane status --wait-synced 2m || rollback.sh\n\
             cargo run --bin filterplane -- serve \\\n  --config x.yaml\n```\n```\nfilterplane nope\n```\n",
        );
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[2], ["filterplane", "serve", "--config", "x.yaml"]);
    }
}
