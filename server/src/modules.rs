//! Serving modules to Envoys (remote delivery), on the module listener (`--modules-addr`)
//! or, without one, the admin port. A module's path is an HMAC of its SHA-256 under a
//! server secret: the SHA-256 is public (it is in every config and registry), the path is
//! not, so nobody can fetch a module by guessing. Only modules that the served config
//! refers to are served; anything else is 404, whatever is in the cache.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

use crate::{cache::SnapshotCache, metrics::Metrics, reload::ConfigReloader, secret};

/// What the module handler reads.
#[derive(Debug, Clone)]
pub struct ModuleServer {
    pub cache: Arc<SnapshotCache>,
    pub reloader: Arc<ConfigReloader>,
    pub secret: Arc<Vec<u8>>,
    pub metrics: Arc<Metrics>,
}

impl ModuleServer {
    /// The SHA-256 of the served module whose path key is `key`, if any.
    fn referenced(&self, key: &str) -> Option<String> {
        let generation = self.cache.current()?;
        // The config's resources, and the last completed versions rollouts still serve.
        let old = generation.plan.entries.iter().filter_map(|e| e.old.as_deref());
        generation
            .config
            .resources
            .iter()
            .map(Arc::as_ref)
            .chain(old)
            .filter(|r| r.envoy_fetches_code)
            .filter_map(|r| r.wasm_sha256.as_deref())
            .find(|sha| secret::equal(filterplane_wasm::module_key(&self.secret, sha).as_bytes(), key.as_bytes()))
            .map(str::to_owned)
    }
}

/// `GET /modules/{key}` and nothing else.
pub fn routes(server: ModuleServer) -> Router {
    Router::new().route("/modules/{key}", get(module)).with_state(server)
}

/// The router of the module listener: modules only, 404 for everything else.
pub fn listener_app(server: ModuleServer) -> Router {
    routes(server).fallback(|| async { (StatusCode::NOT_FOUND, "no such module\n") })
}

const NOT_FOUND: &str = "no such module\n";

async fn module(State(s): State<ModuleServer>, Path(key): Path<String>) -> Response {
    let Some(sha256) = s.referenced(&key) else {
        return (StatusCode::NOT_FOUND, NOT_FOUND).into_response();
    };
    let Some(path) = s.reloader.wasm().and_then(|w| w.fetcher.cache.file(&sha256)) else {
        return (StatusCode::NOT_FOUND, NOT_FOUND).into_response();
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            s.metrics.wasm_module_downloads.inc();
            ([(header::CONTENT_TYPE, "application/wasm")], bytes).into_response()
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read a cached module");
            (StatusCode::NOT_FOUND, NOT_FOUND).into_response()
        }
    }
}
