//! The admin HTTP server: health, readiness and the JSON API over the tracker, the
//! cache and the reload status. `app()` builds the router so tests need no socket.

mod api;

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use axum::{http::StatusCode, routing::get, Router};

use crate::{cache::SnapshotCache, reload::ConfigReloader, tracker::AckTracker};

/// What the admin handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub cache: Arc<SnapshotCache>,
    pub tracker: Arc<AckTracker>,
    pub reloader: Arc<ConfigReloader>,
    /// Set once the xDS listener is bound.
    pub xds_listening: Arc<AtomicBool>,
}

pub fn app(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .nest("/api/v1", api::routes())
        .with_state(state)
}

async fn readyz(
    axum::extract::State(s): axum::extract::State<AdminState>,
) -> (StatusCode, &'static str) {
    match (
        s.cache.current().is_some(),
        s.xds_listening.load(Ordering::Relaxed),
    ) {
        (true, true) => (StatusCode::OK, "ready\n"),
        (false, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no valid configuration loaded yet\n",
        ),
        (true, false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "xDS listener not bound yet\n",
        ),
    }
}

#[cfg(test)]
mod tests;
