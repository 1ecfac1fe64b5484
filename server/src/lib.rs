//! Filterplane's server: the wiring and I/O around the other crates — ports, TLS and the
//! connection caps, the snapshot cache, the xDS services on the HTTP/2 transport, the
//! ACK/NACK tracker and fleet read model, replicas, the rollout driver, config reloading,
//! the module server, admin HTTP and metrics — put together by `serve`.

#![deny(clippy::unwrap_used)]

mod accept;
mod admin;
mod cache;
mod exposition;
mod fleet;
mod health;
mod identity;
mod limits;
mod log_limit;
mod metrics;
mod modules;
mod ports;
mod preflight;
mod reload;
mod replicas;
mod rollouts;
mod secret;
pub mod settings;
mod tls;
mod tracker;

mod xds;

use std::sync::{atomic::AtomicBool, Arc};

use anyhow::Context;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::AdminState,
    cache::SnapshotCache,
    identity::IdentityRules,
    metrics::Metrics,
    ports::PortSecurity,
    reload::ConfigReloader,
    settings::{Settings, WasmDelivery},
    tls::{ReloadingTls, TlsFiles},
    tracker::AckTracker,
    xds::{
        service::{XdsContext, XdsSecurity, XdsServices},
        stream::StreamSettings,
    },
};
use filterplane_config::model::Delivery;
use filterplane_wasm::{
    self as wasm,
    cache::WasmModuleCache,
    fetch::{FetchSettings, WasmFetcher},
    DeliverySettings, WasmSupport,
};

/// Runs the server until `shutdown` is cancelled, then stops in order: stop accepting,
/// end the streams, wait for the tasks.
pub async fn serve(args: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let xds_listener = tokio::net::TcpListener::bind(args.xds_addr)
        .await
        .with_context(|| format!("bind xDS address {}", args.xds_addr))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("bind admin address {}", args.admin_addr))?;
    serve_on(args, xds_listener, admin_listener, shutdown).await
}

/// The module cache directory when `--cache-dir` is not given.
fn default_cache_dir() -> std::path::PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("filterplane")
}

/// Wasm fetching and delivery as the command line sets them up; `modules_url` is where
/// Envoys reach the module server when `--wasm-module-url` does not say.
fn wasm_support(args: &Settings, modules_url: String, metrics: Arc<Metrics>) -> anyhow::Result<WasmSupport> {
    let w = &args.wasm;
    let cache_dir = w.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let cache = WasmModuleCache::open(&cache_dir, w.cache_max_bytes)
        .with_context(|| format!("open the Wasm module cache in {}", cache_dir.display()))?;
    let file_root =
        w.file_root.clone().unwrap_or_else(|| filterplane_config::load::config_dir(&args.config).to_path_buf());
    let settings = FetchSettings {
        file_root,
        insecure_registries: w.insecure_registries.clone(),
        timeout: w.fetch_timeout,
        attempts: w.fetch_attempts.max(1),
        max_module_bytes: w.max_module_bytes,
        deadline: w.fetch_deadline,
        guard: Arc::new(wasm::guard::AddressGuard::new(&w.fetch_deny_cidr, &w.fetch_allow_cidr)),
        registry_auth_file: w.registry_auth_file.clone().or_else(|| {
            let docker = std::path::Path::new(&std::env::var_os("DOCKER_CONFIG")?).join("config.json");
            docker.exists().then_some(docker)
        }),
        registry_ca_pem: match &w.registry_ca_file {
            Some(path) => Some(
                secret::read_small_file(path, secret::MAX_SMALL_FILE)
                    .with_context(|| format!("read --registry-ca-file {}", path.display()))?,
            ),
            None => None,
        },
    };
    let fetcher = Arc::new(WasmFetcher::new(cache, settings, metrics.wasm.clone())?);
    let secret_file = args.security.modules_secret_file.clone().unwrap_or_else(|| cache_dir.join("module-path-secret"));
    let module_secret = Arc::new(
        secret::load_or_create(&secret_file)
            .with_context(|| format!("the module path secret {}", secret_file.display()))?,
    );
    let delivery = DeliverySettings {
        default: match w.delivery {
            WasmDelivery::Inline => Delivery::Inline,
            WasmDelivery::Remote => Delivery::Remote,
        },
        module_base_url: w.module_url.clone().unwrap_or(modules_url),
        module_cluster: w.module_cluster.clone(),
        module_secret,
    };
    Ok(WasmSupport { fetcher, delivery })
}

/// `http(s)://ADDR` as a client on this host reaches `addr`.
fn local_url(addr: std::net::SocketAddr, tls: bool) -> String {
    let reachable =
        if addr.ip().is_unspecified() { std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
    format!("{}://{reachable}", if tls { "https" } else { "http" })
}

/// The TLS of each port, from the command line. Errors are the operator's to fix before
/// anything starts.
struct PortsTls {
    xds: Option<Arc<ReloadingTls>>,
    admin: Option<Arc<ReloadingTls>>,
    modules: Option<Arc<ReloadingTls>>,
}

fn ports_tls(args: &Settings, metrics: &Arc<Metrics>) -> anyhow::Result<PortsTls> {
    let s = &args.security;
    let load = |port: &'static str, files: Option<TlsFiles>, alpn: &[&[u8]]| -> anyhow::Result<_> {
        files.map(|f| ReloadingTls::new(port, f, alpn, metrics.clone())).transpose().map_err(anyhow::Error::from)
    };
    let xds = TlsFiles::from_flags(
        "xds",
        s.xds_tls_cert.as_ref(),
        s.xds_tls_key.as_ref(),
        s.xds_client_ca.as_ref(),
        s.xds_client_auth,
    )?;
    if !s.node_identity.is_empty() && xds.as_ref().and_then(|f| f.client_ca.as_ref()).is_none() {
        anyhow::bail!("--node-identity needs --xds-client-ca: without client certificates there is no identity to check a node against");
    }
    if s.sensitive_to_authenticated_only && xds.as_ref().and_then(|f| f.client_ca.as_ref()).is_none() {
        tracing::warn!("--sensitive-to-authenticated-only without --xds-client-ca: no client can authenticate, so no proxy gets secrets");
    }
    let admin = TlsFiles::from_flags(
        "admin",
        s.admin_tls_cert.as_ref(),
        s.admin_tls_key.as_ref(),
        None,
        tls::ClientAuth::Required,
    )?;
    let modules = TlsFiles::from_flags(
        "modules",
        s.modules_tls_cert.as_ref(),
        s.modules_tls_key.as_ref(),
        None,
        tls::ClientAuth::Required,
    )?;
    if modules.is_some() && s.modules_addr.is_none() {
        anyhow::bail!("--modules-tls-cert needs --modules-addr (without it the admin port serves modules; give it --admin-tls-cert)");
    }
    Ok(PortsTls {
        xds: load("xds", xds, &[b"h2"])?,
        admin: load("admin", admin, &[b"h2", b"http/1.1"])?,
        modules: load("modules", modules, &[b"h2", b"http/1.1"])?,
    })
}

/// Where rollout state lives without `--state-dir`: one directory per config path under
/// the cache directory (`state/NAME-HASH`), so two configs served from one user's
/// account never share rollouts and history. The path is written beside the state, for
/// people. State an earlier version kept in `state/` itself (for whichever config) is not
/// read; a warning names it.
fn default_state_dir(cache_dir: &std::path::Path, config: &std::path::Path) -> std::path::PathBuf {
    let canonical = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let text = canonical.to_string_lossy();
    let hash = filterplane_api::hmac_sha256_hex(b"filterplane state dir", text.as_bytes());
    let stem: String = canonical
        .file_stem()
        .map(|s| {
            s.to_string_lossy()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .take(32)
                .collect()
        })
        .unwrap_or_default();
    let base = cache_dir.join("state");
    let dir = base.join(format!("{stem}-{}", &hash[..12]));
    let _ = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join("config-path"), format!("{text}\n")));
    let legacy = base.join("rollouts.redb");
    if legacy.exists() {
        tracing::warn!(
            legacy = %legacy.display(),
            now = %dir.display(),
            "rollout state of an earlier version is not read: state is kept per config path now; if that file belongs to this config, move it into the new directory while the server is stopped"
        );
    }
    dir
}

/// The rollout state in `--state-dir`. A directory another `serve` holds is no reason not
/// to serve: rollouts then live in memory, and the rollouts view and a warning say so.
fn embedded_store(state_dir: &std::path::Path) -> anyhow::Result<Box<dyn filterplane_state::Store>> {
    use filterplane_state::{MemoryStore, RedbStore, StoreError};
    match RedbStore::open(state_dir) {
        Ok(store) => Ok(Box::new(store)),
        Err(e @ StoreError::InUse { .. }) => {
            let note = format!("{e}; rollout state is kept in memory only, and a restart starts rollouts over");
            tracing::warn!("{note}");
            Ok(Box::new(MemoryStore::with_note(note)))
        }
        Err(e) => {
            Err(anyhow::Error::from(e)
                .context(format!("open the rollout state in {} (--state-dir)", state_dir.display())))
        }
    }
}

/// How to reach etcd: its CA, a client certificate, a user and password.
fn etcd_access(args: &Settings) -> anyhow::Result<filterplane_state::etcd::EtcdAccess> {
    let read = |path: &std::path::Path, flag: &str| {
        secret::read_small_file(path, secret::MAX_SMALL_FILE).with_context(|| format!("{flag} {}", path.display()))
    };
    let ca = args.state.ca_file.as_deref().map(|p| read(p, "--state-store-ca-file")).transpose()?;
    let identity = match (&args.state.cert_file, &args.state.key_file) {
        (Some(cert), Some(key)) => Some((read(cert, "--state-store-cert-file")?, read(key, "--state-store-key-file")?)),
        _ => None,
    };
    let user = match (&args.state.user, &args.state.password_file) {
        (Some(user), Some(file)) => {
            let bytes = read(file, "--state-store-password-file")?;
            let text = String::from_utf8(bytes).context("--state-store-password-file: not UTF-8")?;
            let password = text.lines().next().unwrap_or_default().to_owned();
            Some((user.clone(), password))
        }
        _ => None,
    };
    if (ca.is_some() || identity.is_some()) && !args.state.store.as_ref().is_some_and(|u| u.tls) {
        anyhow::bail!("--state-store-ca-file and --state-store-cert-file need an etcds:// --state-store");
    }
    Ok(filterplane_state::etcd::EtcdAccess { ca, identity, user })
}

/// `serve` on listeners the caller bound (tests bind port 0).
pub async fn serve_on(
    args: Settings,
    xds_listener: tokio::net::TcpListener,
    admin_listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = args.config.clone();
    let metrics = Arc::new(Metrics::default());
    let state_dir = match args.state.dir.clone() {
        Some(dir) => dir,
        None => default_state_dir(&args.wasm.cache_dir.clone().unwrap_or_else(default_cache_dir), &config),
    };
    let replica_name = args.state.replica_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
        let port = xds_listener.local_addr().map(|a| a.port()).unwrap_or(0);
        format!("{}:{port}", if host.is_empty() { "filterplane" } else { host.as_str() })
    });
    let (replicas, store): (_, Box<dyn filterplane_state::Store>) = match &args.state.store {
        Some(url) => {
            let replicas = replicas::Replicas::shared(replica_name.clone(), url.clone(), &etcd_access(&args)?)?;
            let store = replicas
                .store(shutdown.clone())
                .await
                .with_context(|| {
                    format!("read the rollout state from etcd at {} (--state-store)", url.endpoint_list())
                })?
                .context("the etcd store")?;
            tracing::info!(etcd = %url.endpoint_list(), prefix = %url.prefix, replica = %replica_name, "state shared through etcd");
            (replicas, store)
        }
        None => (replicas::Replicas::alone(replica_name.clone()), embedded_store(&state_dir)?),
    };
    let where_state = match &args.state.store {
        Some(url) => format!("etcd at {}", url.endpoint_list()),
        None => state_dir.display().to_string(),
    };
    let rollouts = Arc::new(
        rollouts::Rollouts::new(store, metrics.clone(), &where_state, args.rollout_settle)
            .with_context(|| {
                let hint =
                    if args.state.store.is_none() { " (move rollouts.redb aside to start without it)" } else { "" };
                format!("read the rollout state in {where_state}{hint}")
            })?
            .with_replicas(replicas.clone()),
    );
    let cache = Arc::new(SnapshotCache::with_planner(rollouts.clone()));
    let tracker = Arc::new(AckTracker::new(metrics.clone()));
    let tls = ports_tls(&args, &metrics)?;
    let modules_listener = match args.security.modules_addr {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind module address {addr}"))?)
        }
        None => None,
    };
    let modules_url = match &modules_listener {
        Some(l) => local_url(l.local_addr()?, tls.modules.is_some()),
        None => local_url(admin_listener.local_addr()?, tls.admin.is_some()),
    };
    let wasm = wasm_support(&args, modules_url, metrics.clone())?;
    let module_secret = wasm.delivery.module_secret.clone();
    let auth = match &args.security.admin_token_file {
        Some(path) => Some(Arc::new(admin::auth::AdminAuth::new(
            path,
            args.security.metrics_public,
            tls.admin.is_some(),
            metrics.clone(),
        )?)),
        None => None,
    };
    let reloader = Arc::new(
        ConfigReloader::new(config.clone(), cache.clone(), metrics.clone())
            .with_wasm(wasm)
            .with_removal_guard(args.max_removal_percent)
            .with_max_config_bytes(args.max_config_bytes)
            .with_preflight(args.preflight_envoy.clone().map(|envoy| {
                Arc::new(preflight::Preflight::new(envoy, args.preflight_timeout, args.wasm.module_cluster.clone()))
            })),
    );
    let xds_listening = Arc::new(AtomicBool::new(false));
    let tasks = TaskTracker::new();
    let (xds_addr, admin_addr) = (xds_listener.local_addr()?, admin_listener.local_addr()?);
    tracing::info!(xds = %xds_addr, admin = %admin_addr, config = %config.display(), xds_http2 = ?args.xds_http2, "listening");
    let security = PortSecurity {
        xds_tls: tls.xds.as_ref().map(|t| t.files().security()),
        node_identity: !args.security.node_identity.is_empty(),
        sensitive_to_authenticated_only: args.security.sensitive_to_authenticated_only,
        admin_tls: tls.admin.is_some(),
        admin_token: auth.is_some(),
        metrics_public: args.security.metrics_public,
        modules: match &modules_listener {
            Some(l) => Some((l.local_addr()?, tls.modules.is_some())),
            None => None,
        },
    };
    ports::log_at_start(xds_addr, admin_addr, &security);

    // A bad config at start is not fatal: nothing is served until a good one appears,
    // so connected Envoys keep what they have.
    // The watch starts first, so an edit made during the first load is not missed.
    tasks.spawn(reloader.start_watch().run(shutdown.clone()));
    reloader.reload("startup").await;
    tasks.spawn(rollouts.clone().run(cache.clone(), tracker.clone(), shutdown.clone()));
    {
        let active = rollouts.clone();
        let input = move || active.active().then(|| active.gated_step_starts());
        tasks.spawn(replicas.clone().run(tracker.clone(), input, rollouts.health(), shutdown.clone()));
    }

    let settings = Arc::new(StreamSettings {
        drain_grace: args.drain_grace,
        code_fetch_retries: args.wasm.code_fetch_retries,
        max_subscribed_names: args.max_subscribed_names,
        max_nack_message_bytes: args.max_nack_message_bytes,
    });
    let xds_security = Arc::new(XdsSecurity {
        rules: IdentityRules(args.security.node_identity.clone()),
        sensitive_to_authenticated_only: args.security.sensitive_to_authenticated_only,
    });
    let health = rollouts.health();
    let ctx = XdsContext {
        cache: cache.clone(),
        tracker: tracker.clone(),
        settings,
        security: xds_security,
        health: health.clone(),
    };
    let services = XdsServices::new(ctx);
    let limits = args.limits;
    // Every connection is accepted, and its TLS handshake done, off the accept path; the
    // HTTP/2 preface then has its own deadline.
    let max_xds_connections = match limits.max_xds_connections {
        0 => {
            let fd_limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024);
            let other_ports = limits.max_admin_connections * if modules_listener.is_some() { 2 } else { 1 };
            accept::default_xds_cap(fd_limit, other_ports)
        }
        n => n,
    };
    tracing::info!(max_xds_connections, per_address = limits.max_xds_connections_per_address, "xDS connections capped");
    let accepted = accept::accept_loop(
        xds_listener,
        accept::AcceptSettings {
            port: "xds",
            tls: tls.xds.clone(),
            handshake_timeout: limits.handshake_timeout,
            max_connections: max_xds_connections,
            max_per_address: Some(limits.max_xds_connections_per_address),
            busy_reply: b"",
            cap_limit: "xds_connections",
            address_limit: "xds_connections_per_address",
            silent_limit: "handshake_timeout",
            gauge: Some(metrics.xds_connections.clone()),
        },
        metrics.clone(),
        shutdown.clone(),
    );
    let grpc = xds::port::serve(
        accepted,
        services,
        filterplane_h2::H2Settings {
            max_streams: limits.max_streams_per_connection,
            keepalive: settings::defaults::XDS_KEEPALIVE,
            output: Arc::new(filterplane_h2::OutputBudget::new(
                limits.max_queued_bytes_per_stream,
                limits.max_queued_bytes_per_connection,
                limits.max_queued_bytes,
                metrics.xds_queued_bytes.clone(),
            )),
        },
        args.xds_http2,
        limits.handshake_timeout,
        metrics.clone(),
        shutdown.clone(),
    );
    xds_listening.store(true, std::sync::atomic::Ordering::Relaxed);

    let event_clients = Arc::new(tokio::sync::Semaphore::new(limits.max_event_clients));
    // The names the admin answers to: the module URL's host (Envoys download from it) and
    // the operator's --admin-allowed-host.
    let module_host = args
        .wasm
        .module_url
        .as_deref()
        .and_then(|u| reqwest::Url::parse(u).ok())
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase));
    let allowed_hosts = Arc::new(
        args.admin_allowed_hosts
            .iter()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
            .chain(module_host)
            .collect(),
    );
    let module_server = modules::ModuleServer {
        cache: cache.clone(),
        reloader: reloader.clone(),
        secret: module_secret,
        metrics: metrics.clone(),
    };
    // Modules on a listener of their own, or on the admin port.
    let (modules, admin_modules) = match modules_listener {
        Some(listener) => {
            let listener = limits::CappedListener::new(
                listener,
                "modules",
                tls.modules.clone(),
                limits,
                metrics.clone(),
                shutdown.clone(),
            )?;
            let app = modules::listener_app(module_server);
            (Some(axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned())), None)
        }
        None => (None, Some(module_server)),
    };
    let admin = axum::serve(
        limits::CappedListener::new(
            admin_listener,
            "admin",
            tls.admin.clone(),
            limits,
            metrics.clone(),
            shutdown.clone(),
        )?,
        admin::app(AdminState {
            cache,
            tracker,
            reloader,
            metrics,
            xds_listening,
            shutdown: shutdown.clone(),
            event_clients,
            allowed_hosts,
            auth,
            modules: admin_modules,
            rollouts: rollouts.clone(),
        })
        .into_make_service_with_connect_info::<admin::AdminPeer>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());

    let result = tokio::try_join!(
        async {
            grpc.await;
            anyhow::Ok(())
        },
        async { admin.await.context("admin server") },
        async {
            match modules {
                Some(m) => m.await.context("module server"),
                None => Ok(()),
            }
        },
    );
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    // The last rollout state handed to the writer goes to disk before the process ends.
    let writer = rollouts.clone();
    let _ = tokio::task::spawn_blocking(move || writer.flush(std::time::Duration::from_secs(5))).await;
    result.map(|_| ())
}

/// `filterplane validate`: prints every error; true when the config is valid. With
/// `preflight_envoy`, that Envoy checks the resources too (Wasm plugins are not fetched,
/// so their configs are not among them).
pub fn validate(path: &std::path::Path, preflight_envoy: Option<&std::path::Path>) -> bool {
    let loaded = filterplane_config::load(path);
    let loaded = match (loaded, preflight_envoy) {
        (Ok(config), Some(envoy)) => {
            let p = Arc::new(preflight::Preflight::new(
                envoy.to_path_buf(),
                std::time::Duration::from_secs(30),
                "filterplane_modules".into(),
            ));
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(p.check(&config)).map(|()| config),
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return false;
                }
            }
        }
        (other, _) => other,
    };
    match loaded {
        Ok(c) => {
            println!(
                "{}: valid, {} resource(s), {} Wasm plugin(s) (modules are fetched by serve), version {}",
                path.display(),
                c.resources.len(),
                c.wasm_plugins.len(),
                c.version
            );
            for n in &c.notices {
                println!("note: {n}");
            }
            true
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.0.len());
            false
        }
    }
}

/// `filterplane wasm sign`: the module's detached signature (base64, as `cosign
/// sign-blob` writes it) written to `output` (default FILE.sig); where it went.
pub fn wasm_sign(
    file: &std::path::Path,
    key: &std::path::Path,
    output: Option<&std::path::Path>,
) -> anyhow::Result<std::path::PathBuf> {
    use base64::Engine;
    let bytes = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    let pem = std::fs::read_to_string(key).with_context(|| format!("read {}", key.display()))?;
    let sig = wasm::sign::sign(&pem, &bytes).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let at = output.map(std::path::Path::to_path_buf).unwrap_or_else(|| format!("{}.sig", file.display()).into());
    std::fs::write(&at, base64::engine::general_purpose::STANDARD.encode(sig))
        .with_context(|| format!("write {}", at.display()))?;
    Ok(at)
}

/// `filterplane wasm verify`: which of `keys` signed `file` (its signature in
/// `signature`, default FILE.sig).
pub fn wasm_verify(
    file: &std::path::Path,
    keys: &[std::path::PathBuf],
    signature: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    let bytes = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    let at = signature.map(std::path::Path::to_path_buf).unwrap_or_else(|| format!("{}.sig", file.display()).into());
    let text = std::fs::read(&at).with_context(|| format!("signature_missing: read {}", at.display()))?;
    let sig =
        wasm::sign::decode_signature(&text).map_err(|m| anyhow::anyhow!("signature_invalid: {}: {m}", at.display()))?;
    let mut trusted = Vec::new();
    for k in keys {
        let pem = std::fs::read_to_string(k).with_context(|| format!("read {}", k.display()))?;
        trusted.push(
            wasm::sign::PublicKey::from_pem(&k.display().to_string(), &pem)
                .map_err(|e| anyhow::anyhow!("{}: {e}", k.display()))?,
        );
    }
    match wasm::sign::verified_by(&trusted, &bytes, &sig) {
        Some(k) => Ok(k.name.clone()),
        None => anyhow::bail!(
            "signature_untrusted_key: {} over sha256 {} verifies with none of the keys",
            at.display(),
            wasm::cache::sha256_hex(&bytes)
        ),
    }
}

/// `filterplane wasm push`: checks the module, pushes it as a Wasm OCI artifact and
/// prints what to put in the YAML.
pub async fn wasm_push(
    file: &std::path::Path,
    reference: &str,
    insecure: bool,
    credentials_env: Option<&str>,
    registry_ca_file: Option<&std::path::Path>,
    sign_key: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use filterplane_config::wasm::ModuleSource;
    let bytes = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    let private = match sign_key {
        Some(k) => Some(std::fs::read_to_string(k).with_context(|| format!("read {}", k.display()))?),
        None => None,
    };
    wasm::check::check_module(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let ModuleSource::Oci { registry, repository, tag, digest: None } =
        ModuleSource::parse(reference, std::path::Path::new(".")).map_err(anyhow::Error::msg)?
    else {
        anyhow::bail!("{reference}: push to oci://REGISTRY/REPOSITORY:TAG");
    };
    let auth = wasm::fetch::registry_auth(
        credentials_env.map(|v| filterplane_config::model::PullSecret::Env(v.to_owned())).as_ref(),
        &registry,
        None,
    )?;
    let settings = FetchSettings {
        file_root: ".".into(),
        insecure_registries: if insecure { vec![registry.clone()] } else { vec![] },
        timeout: std::time::Duration::from_secs(60),
        attempts: 1,
        max_module_bytes: u64::MAX,
        deadline: std::time::Duration::from_secs(60),
        guard: Default::default(),
        registry_auth_file: None,
        registry_ca_pem: match registry_ca_file {
            Some(p) => Some(
                secret::read_small_file(p, secret::MAX_SMALL_FILE)
                    .with_context(|| format!("read --registry-ca-file {}", p.display()))?,
            ),
            None => None,
        },
    };
    let client = wasm::oci::client(&settings);
    let target = wasm::oci::reference(&registry, &repository, tag.as_deref(), None);
    let sha256 = wasm::cache::sha256_hex(&bytes);
    let manifest_digest = wasm::oci::push(&client, &target, &auth, bytes).await?;
    println!("pushed {} to {}", file.display(), target.whole());
    println!("digest: {manifest_digest}");
    println!("sha256: {sha256}");
    if let (Some(pem), Some(k)) = (private, sign_key) {
        let tag = wasm::oci::push_cosign_signature(&client, &target, &auth, &manifest_digest, &pem)
            .await
            .with_context(|| format!("sign with {}", k.display()))?;
        println!("signature: {tag} (cosign's format, key {})", k.display());
    }
    println!("\nwasm_plugins:\n  - name: my-plugin\n    url: oci://{registry}/{repository}@{manifest_digest}\n    sha256: {sha256}");
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Two configs served from one account keep their rollouts apart; one config keeps
    /// its own across restarts.
    #[test]
    fn each_config_path_has_its_own_default_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("quickstart.yaml"), dir.path().join("gateway.yaml"));
        std::fs::write(&a, "version: 1\n").unwrap();
        std::fs::write(&b, "version: 1\n").unwrap();
        let cache = dir.path().join("cache");
        let (sa, sb) = (super::default_state_dir(&cache, &a), super::default_state_dir(&cache, &b));
        assert_ne!(sa, sb);
        assert_eq!(super::default_state_dir(&cache, &a), sa, "stable");
        assert!(
            sa.starts_with(cache.join("state")) && sa.file_name().unwrap().to_string_lossy().starts_with("quickstart-")
        );
        let recorded = std::fs::read_to_string(sa.join("config-path")).unwrap();
        assert_eq!(recorded.trim(), std::fs::canonicalize(&a).unwrap().to_string_lossy());
    }
}
