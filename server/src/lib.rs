//! Filterplane's server: snapshot cache, xDS protocol, ACK/NACK tracker, admin HTTP and
//! config reloading, wired together by `serve`.

pub mod admin;
pub mod cache;
pub mod cli;
pub mod metrics;
pub mod reload;
pub mod status;
pub mod tracker;
pub mod xds;

use std::sync::{atomic::AtomicBool, Arc};

use anyhow::Context;
use filterplane_api::envoy_types::pb::envoy::service::{
    discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer,
    extension::v3::extension_config_discovery_service_server::ExtensionConfigDiscoveryServiceServer,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::AdminState,
    cache::SnapshotCache,
    cli::ServeArgs,
    metrics::Metrics,
    reload::ConfigReloader,
    tracker::AckTracker,
    xds::service::{XdsContext, XdsServices},
};

/// Runs the server until `shutdown` is cancelled, then stops in order: stop accepting,
/// end the streams, wait for the tasks.
pub async fn serve(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let xds_listener = tokio::net::TcpListener::bind(args.xds_addr)
        .await
        .with_context(|| format!("bind xDS address {}", args.xds_addr))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("bind admin address {}", args.admin_addr))?;
    serve_on(args.config, xds_listener, admin_listener, shutdown).await
}

/// `serve` on listeners the caller bound (tests bind port 0).
pub async fn serve_on(
    config: std::path::PathBuf,
    xds_listener: tokio::net::TcpListener,
    admin_listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cache = Arc::new(SnapshotCache::default());
    let metrics = Arc::new(Metrics::default());
    let tracker = Arc::new(AckTracker::new(metrics.clone()));
    let reloader = Arc::new(ConfigReloader::new(config.clone(), cache.clone(), metrics.clone()));
    let xds_listening = Arc::new(AtomicBool::new(false));
    let tasks = TaskTracker::new();
    tracing::info!(xds = %xds_listener.local_addr()?, admin = %admin_listener.local_addr()?, config = %config.display(), "listening");

    // A bad config at start is not fatal: nothing is served until a good one appears,
    // so connected Envoys keep what they have.
    reloader.reload("startup").await;
    let watch = tasks.spawn(reloader.clone().watch(shutdown.clone()));

    let ctx =
        XdsContext { cache: cache.clone(), tracker: tracker.clone(), shutdown: shutdown.clone(), tasks: tasks.clone() };
    let services = XdsServices::new(ctx);
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(AggregatedDiscoveryServiceServer::new(services.clone()))
        .add_service(ExtensionConfigDiscoveryServiceServer::new(services))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(xds_listener),
            shutdown.clone().cancelled_owned(),
        );
    xds_listening.store(true, std::sync::atomic::Ordering::Relaxed);

    let admin = axum::serve(
        admin_listener,
        admin::app(AdminState { cache, tracker, reloader, metrics, xds_listening, shutdown: shutdown.clone() }),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());

    let result =
        tokio::try_join!(async { grpc.await.context("xDS server") }, async { admin.await.context("admin server") },);
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    if let Ok(Err(e)) = watch.await {
        tracing::warn!(error = %e, "config watcher stopped with an error");
    }
    result.map(|_| ())
}

/// `filterplane validate`: prints every error; true when the config is valid.
pub fn validate(path: &std::path::Path) -> bool {
    match filterplane_config::load(path) {
        Ok(c) => {
            println!("{}: valid, {} resource(s), version {}", path.display(), c.resources.len(), c.version);
            true
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.0.len());
            false
        }
    }
}
