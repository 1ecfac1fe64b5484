//! `/api/v1/*`: JSON for scripts. Field names are part of the interface (see README).

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use filterplane_api::json::any_to_json_redacted;
use serde::Serialize;
use serde_json::{json, Value};

use super::AdminState;
use crate::reload::ReloadStatus;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/proxies", get(proxies))
        .route("/summary", get(summary))
        .route("/proxies/{node_id}", get(proxy))
        .route("/rejects", get(rejects))
        .route("/refusals", get(refusals))
        .route("/rollouts", get(rollouts))
        .route("/rollouts/{name}/{action}", axum::routing::post(rollout_action))
        .route("/config", get(config))
        .route("/config_dump", get(config_dump))
        .route("/reload", axum::routing::post(reload))
}

#[derive(serde::Deserialize)]
struct ReloadQuery {
    #[serde(default)]
    confirm: bool,
}

/// `POST /api/v1/reload[?confirm=true]`: reload now; with `confirm`, apply even what the
/// removal guard would hold. Answers with the outcome.
async fn reload(State(s): State<AdminState>, Query(q): Query<ReloadQuery>) -> Response {
    let outcome = if q.confirm {
        s.reloader.reload_confirmed("admin API (confirmed)").await
    } else {
        s.reloader.reload("admin API").await
    };
    Json(outcome).into_response()
}

/// Rollouts in progress (or failed and waiting for an edit), and the recent history.
async fn rollouts(State(s): State<AdminState>) -> Response {
    Json(s.rollouts.view(&s.tracker)).into_response()
}

/// `POST /api/v1/rollouts/{name}/{pause|resume|promote|abort}`. These change what
/// proxies run, so they need the admin token: without one configured they answer 403.
async fn rollout_action(State(s): State<AdminState>, Path((name, action)): Path<(String, String)>) -> Response {
    if s.auth.is_none() {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({ "error": "rollout actions change what proxies run, so they need a bearer token: start the server with --admin-token-file FILE and send it (the CLI's --token-file)" })),
        )
            .into_response();
    }
    if !matches!(action.as_str(), "pause" | "resume" | "promote" | "abort") {
        return (StatusCode::NOT_FOUND, Json(json!({ "error": "actions: pause, resume, promote, abort" })))
            .into_response();
    }
    match s.rollouts.act(&name, &action) {
        Ok(n) => {
            // Serve the new plan now rather than at the next tick.
            s.cache.replan(s.rollouts.plan());
            Json(json!({ "name": name, "action": action, "entries": n })).into_response()
        }
        Err(e) => (StatusCode::CONFLICT, Json(json!({ "error": e.to_string() }))).into_response(),
    }
}

/// Streams ended because the node they named does not match their client certificate.
async fn refusals(State(s): State<AdminState>) -> Response {
    Json(s.tracker.refusals()).into_response()
}

/// Without parameters: every proxy, by node id (for scripts; large at fleet scale). With
/// any of `state`, `q`, `limit`, `cursor`: one page (`fleet::page`).
async fn proxies(State(s): State<AdminState>, Query(q): Query<crate::fleet::ProxyQuery>) -> Response {
    if !q.is_paged() {
        return Json(s.tracker.proxies()).into_response();
    }
    match crate::fleet::page(&s.tracker, &q) {
        Ok(page) => Json(page).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({ "error": e.to_string() }))).into_response(),
    }
}

/// Proxies per state and version, resources per version, NACKing proxies.
async fn summary(State(s): State<AdminState>) -> Response {
    Json(crate::replicas::fleet_summary(&s.tracker, s.rollouts.replicas())).into_response()
}

async fn proxy(State(s): State<AdminState>, Path(node_id): Path<String>) -> Response {
    let streams = s.tracker.proxy(&node_id);
    if streams.is_empty() {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no connected proxy with node id \"{node_id}\"") })),
        )
            .into_response();
    }
    Json(streams).into_response()
}

async fn rejects(State(s): State<AdminState>) -> Response {
    Json(s.tracker.rejects()).into_response()
}

#[derive(Serialize)]
struct ConfigView {
    #[serde(flatten)]
    status: ReloadStatus,
    resources: Vec<ResourceView>,
    /// What is worth saying about the served config (an Istio document placed in no
    /// served listener), each with file, line and path.
    notices: Vec<Value>,
}

#[derive(Serialize)]
struct ResourceView {
    type_url: &'static str,
    name: String,
    version: String,
    config_type_url: String,
    node_selector: Value,
    file: String,
    line: Option<usize>,
    path: String,
    /// Wasm plugins: the module served, and whether its author pinned its digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    module: Option<Value>,
    /// Why this entry is placed in no listener, when it is not (an Istio document).
    #[serde(skip_serializing_if = "Option::is_none")]
    notice: Option<String>,
}

async fn config(State(s): State<AdminState>) -> Response {
    let current = s.cache.current();
    let notices = current.as_ref().map(|g| g.config.notices.clone()).unwrap_or_default();
    let resources = current
        .map(|g| {
            g.config
                .resources
                .iter()
                .map(|r| {
                    let plugin = g.config.wasm_plugins.iter().find(|w| w.name == r.name && w.origin == r.origin);
                    let served_as = format!("served over ECDS as \"{}\"", r.name);
                    ResourceView {
                        type_url: r.resource_type.type_url(),
                        name: r.name.clone(),
                        version: r.version.to_string(),
                        config_type_url: r.inner_type_url.clone(),
                        node_selector: selector_json(&r.selector),
                        file: r.origin.file.display().to_string(),
                        line: r.origin.line.get(),
                        path: r.origin.path.clone(),
                        module: plugin.map(|w| {
                            let verified_by = r
                                .wasm_sha256
                                .as_deref()
                                .and_then(|sha| s.reloader.wasm().and_then(|f| f.fetcher.verified_by(sha)));
                            json!({ "url": w.url, "sha256": r.wasm_sha256, "pinned": w.sha256.is_some(), "verified_by": verified_by })
                        }),
                        notice: notices.iter().find(|n| n.message.contains(&served_as)).map(|n| n.message.clone()),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let notices = notices
        .iter()
        .map(|n| json!({ "file": n.file.display().to_string(), "line": n.line, "path": n.path, "message": n.message }))
        .collect();
    Json(ConfigView { status: s.reloader.status(), resources, notices }).into_response()
}

fn selector_json(s: &filterplane_config::NodeSelector) -> Value {
    json!({
        "ids": s.ids, "clusters": s.clusters, "metadata": s.metadata, "labels": s.labels,
        "locality": { "region": s.locality.region, "zone": s.locality.zone, "sub_zone": s.locality.sub_zone },
        "envoy_version": s.envoy_version.as_ref().map(|p| p.as_str()),
    })
}

/// Every resource as served, decoded back to Envoy-native JSON.
#[derive(serde::Deserialize)]
struct DumpQuery {
    node_id: Option<String>,
}

/// `?node_id=X`: exactly what that connected proxy is served (selectors applied, filters
/// placed into its listeners). Without it: every entry of the config as written.
async fn config_dump(State(s): State<AdminState>, Query(q): Query<DumpQuery>) -> Response {
    let Some(g) = s.cache.current() else {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": "no configuration loaded yet" })))
            .into_response();
    };
    if let Some(node_id) = q.node_id {
        let Some(proxy) = s.tracker.proxy(&node_id).into_iter().next() else {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": format!("no connected proxy with node id \"{node_id}\"") })),
            )
                .into_response();
        };
        let snapshot = g.snapshot_for_stream(proxy.facts(), proxy.auth.sensitive_withheld);
        let resources: Vec<Value> = snapshot
            .all()
            .map(|(rt, r)| {
                let resource = any_to_json_redacted(&r.any).unwrap_or_else(|e| json!({ "error": e.to_string() }));
                json!({ "type_url": rt.type_url(), "name": r.name, "version": r.version.to_string(), "resource": resource })
            })
            .collect();
        return Json(json!({ "version": g.version().to_string(), "node_id": node_id, "resources": resources }))
            .into_response();
    }
    let resources: Vec<Value> = g
        .config
        .resources
        .iter()
        .map(|r| {
            let resource = any_to_json_redacted(&r.resource).unwrap_or_else(|e| json!({ "error": e.to_string() }));
            json!({ "type_url": r.resource_type.type_url(), "name": r.name, "version": r.version.to_string(), "resource": resource })
        })
        .collect();
    Json(json!({ "version": g.version().to_string(), "resources": resources })).into_response()
}
