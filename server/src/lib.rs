//! Filterplane's server: snapshot cache, xDS protocol, ACK/NACK tracker, admin HTTP and
//! config reloading, wired together by `serve`.

pub mod admin;
pub mod cache;
pub mod cli;
pub mod limits;
pub mod metrics;
pub mod ports;
pub mod reload;
pub mod status;
pub mod tracker;
pub mod vec_map;
pub mod wasm;
pub mod xds;

use std::sync::{atomic::AtomicBool, Arc};

use anyhow::Context;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::AdminState,
    cache::SnapshotCache,
    cli::{DeliveryArg, ServeArgs},
    metrics::Metrics,
    reload::ConfigReloader,
    tracker::AckTracker,
    wasm::{
        cache::WasmModuleCache,
        fetch::{FetchSettings, WasmFetcher},
        DeliverySettings, WasmSupport,
    },
    xds::{
        grpc::{AdsServer, EcdsServer},
        service::{XdsContext, XdsServices},
        stream::StreamSettings,
    },
};
use filterplane_config::model::Delivery;

/// Runs the server until `shutdown` is cancelled, then stops in order: stop accepting,
/// end the streams, wait for the tasks.
pub async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
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

/// Wasm fetching and delivery as the command line sets them up.
fn wasm_support(args: &ServeArgs, admin: std::net::SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<WasmSupport> {
    let w = &args.wasm;
    let cache_dir = w.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let cache = WasmModuleCache::open(&cache_dir, w.cache_max_bytes)
        .with_context(|| format!("open the Wasm module cache in {}", cache_dir.display()))?;
    let file_root =
        w.wasm_file_root.clone().unwrap_or_else(|| filterplane_config::load::config_dir(&args.config).to_path_buf());
    let settings = FetchSettings {
        file_root,
        insecure_registries: w.insecure_registries.clone(),
        timeout: std::time::Duration::from_secs(w.wasm_fetch_timeout_secs),
        attempts: w.wasm_fetch_attempts.max(1),
        max_module_bytes: w.wasm_max_module_bytes,
        deadline: std::time::Duration::from_secs(w.wasm_fetch_deadline_secs),
    };
    let fetcher = Arc::new(WasmFetcher::new(cache, settings, metrics)?);
    let reachable =
        if admin.ip().is_unspecified() { std::net::SocketAddr::from(([127, 0, 0, 1], admin.port())) } else { admin };
    let delivery = DeliverySettings {
        default: match w.wasm_delivery {
            DeliveryArg::Inline => Delivery::Inline,
            DeliveryArg::Remote => Delivery::Remote,
        },
        module_base_url: w.wasm_module_url.clone().unwrap_or_else(|| format!("http://{reachable}")),
        module_cluster: w.wasm_module_cluster.clone(),
    };
    Ok(WasmSupport { fetcher, delivery })
}

/// `serve` on listeners the caller bound (tests bind port 0).
pub async fn serve_on(
    args: ServeArgs,
    xds_listener: tokio::net::TcpListener,
    admin_listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = args.config.clone();
    let cache = Arc::new(SnapshotCache::default());
    let metrics = Arc::new(Metrics::default());
    let tracker = Arc::new(AckTracker::new(metrics.clone()));
    let wasm = wasm_support(&args, admin_listener.local_addr()?, metrics.clone())?;
    let reloader = Arc::new(
        ConfigReloader::new(config.clone(), cache.clone(), metrics.clone())
            .with_wasm(wasm)
            .with_removal_guard(args.max_removal_percent)
            .with_max_config_bytes(args.max_config_bytes),
    );
    let xds_listening = Arc::new(AtomicBool::new(false));
    let tasks = TaskTracker::new();
    tracing::info!(xds = %xds_listener.local_addr()?, admin = %admin_listener.local_addr()?, config = %config.display(), "listening");
    ports::log_at_start(xds_listener.local_addr()?, admin_listener.local_addr()?);

    // A bad config at start is not fatal: nothing is served until a good one appears,
    // so connected Envoys keep what they have.
    // The watch starts first, so an edit made during the first load is not missed.
    tasks.spawn(reloader.start_watch().run(shutdown.clone()));
    reloader.reload("startup").await;

    let settings = Arc::new(StreamSettings {
        drain_grace: std::time::Duration::from_secs(args.drain_grace_secs),
        code_fetch_retries: args.wasm.wasm_code_fetch_retries,
        max_subscribed_names: args.max_subscribed_names,
        max_nack_message_bytes: args.max_nack_message_bytes,
    });
    let ctx = XdsContext { cache: cache.clone(), tracker: tracker.clone(), shutdown: shutdown.clone(), settings };
    let services = XdsServices::new(ctx);
    let limits = args.connection_limits();
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .max_concurrent_streams(limits.max_streams_per_connection)
        .add_service(AdsServer(services.clone()))
        .add_service(EcdsServer(services))
        .serve_with_incoming_shutdown(
            // Responses are small and latency matters: no Nagle (it added ~40 ms to the
            // first response, against the client's delayed ACK).
            {
                let metrics = metrics.clone();
                tokio_stream::StreamExt::map(
                    tonic::transport::server::TcpIncoming::from(xds_listener)
                        .with_nodelay(Some(true))
                        .with_keepalive(Some(std::time::Duration::from_secs(60))),
                    move |accepted| {
                        accepted.map(|io| limits::Handshake::new(io, limits.handshake_timeout, metrics.clone()))
                    },
                )
            },
            shutdown.clone().cancelled_owned(),
        );
    xds_listening.store(true, std::sync::atomic::Ordering::Relaxed);

    let event_clients = Arc::new(tokio::sync::Semaphore::new(limits.max_event_clients));
    // The names the admin answers to: the module URL's host (Envoys download from it) and
    // the operator's --admin-allowed-host.
    let module_host = args
        .wasm
        .wasm_module_url
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
    let admin = axum::serve(
        limits::CappedListener::new(admin_listener, limits, metrics.clone()),
        admin::app(AdminState {
            cache,
            tracker,
            reloader,
            metrics,
            xds_listening,
            shutdown: shutdown.clone(),
            event_clients,
            allowed_hosts,
        }),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());

    let result =
        tokio::try_join!(async { grpc.await.context("xDS server") }, async { admin.await.context("admin server") },);
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    result.map(|_| ())
}

/// `filterplane validate`: prints every error; true when the config is valid.
pub fn validate(path: &std::path::Path) -> bool {
    match filterplane_config::load(path) {
        Ok(c) => {
            println!(
                "{}: valid, {} resource(s), {} Wasm plugin(s) (modules are fetched by serve), version {}",
                path.display(),
                c.resources.len(),
                c.wasm_plugins.len(),
                c.version
            );
            true
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.0.len());
            false
        }
    }
}

/// `filterplane wasm push`: checks the module, pushes it as a Wasm OCI artifact and
/// prints what to put in the YAML.
pub async fn wasm_push(
    file: &std::path::Path,
    reference: &str,
    insecure: bool,
    credentials_env: Option<&str>,
) -> anyhow::Result<()> {
    use filterplane_config::wasm::ModuleSource;
    let bytes = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    wasm::check::check_module(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let ModuleSource::Oci { registry, repository, tag, digest: None } =
        ModuleSource::parse(reference, std::path::Path::new(".")).map_err(anyhow::Error::msg)?
    else {
        anyhow::bail!("{reference}: push to oci://REGISTRY/REPOSITORY:TAG");
    };
    let auth = wasm::fetch::registry_auth(
        credentials_env.map(|v| filterplane_config::model::PullSecret::Env(v.to_owned())).as_ref(),
    )?;
    let settings = FetchSettings {
        file_root: ".".into(),
        insecure_registries: if insecure { vec![registry.clone()] } else { vec![] },
        timeout: std::time::Duration::from_secs(60),
        attempts: 1,
        max_module_bytes: u64::MAX,
        deadline: std::time::Duration::from_secs(60),
    };
    let client = wasm::oci::client(&settings);
    let target = wasm::oci::reference(&registry, &repository, tag.as_deref(), None);
    let sha256 = wasm::cache::sha256_hex(&bytes);
    let manifest_digest = wasm::oci::push(&client, &target, &auth, bytes).await?;
    println!("pushed {} to {}", file.display(), target.whole());
    println!("digest: {manifest_digest}");
    println!("sha256: {sha256}");
    println!("\nwasm_plugins:\n  - name: my-plugin\n    url: oci://{registry}/{repository}@{manifest_digest}\n    sha256: {sha256}");
    Ok(())
}
