//! The admin HTTP server: the page, health, readiness, metrics and the JSON API over the
//! tracker, the cache and the reload status. `app()` builds the router so tests need no
//! socket.

mod api;
pub mod auth;
mod backoff;
pub mod origin;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{
        sse::{Event, KeepAlive, Sse},
        Html, IntoResponse,
    },
    routing::get,
    Router,
};
use tokio_stream::{wrappers::WatchStream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::{cache::SnapshotCache, metrics::Metrics, reload::ConfigReloader, tracker::AckTracker};

/// The client address of an admin request (`ConnectInfo`), for the sign-in backoff.
#[derive(Debug, Clone, Copy)]
pub struct AdminPeer(pub std::net::SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::limits::CappedListener>>
    for AdminPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, crate::limits::CappedListener>) -> Self {
        AdminPeer(*stream.remote_addr())
    }
}

/// What the admin handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub cache: Arc<SnapshotCache>,
    pub tracker: Arc<AckTracker>,
    pub reloader: Arc<ConfigReloader>,
    pub metrics: Arc<Metrics>,
    /// Set once the xDS listener is bound.
    pub xds_listening: Arc<AtomicBool>,
    /// Ends the page's event streams, so a graceful shutdown does not wait on them.
    pub shutdown: CancellationToken,
    /// One permit per `/api/v1/events` client (`--max-event-clients`).
    pub event_clients: Arc<tokio::sync::Semaphore>,
    /// Host names (lowercase, no port) the admin answers to besides IP literals and
    /// `localhost`: the module URL's host and `--admin-allowed-host`.
    pub allowed_hosts: Arc<Vec<String>>,
    /// `--admin-token-file`: who may use everything but the probes.
    pub auth: Option<Arc<auth::AdminAuth>>,
    /// Modules for remote delivery, when no `--modules-addr` serves them.
    pub modules: Option<crate::modules::ModuleServer>,
    pub rollouts: Arc<crate::rollouts::Rollouts>,
}

pub fn app(state: AdminState) -> Router {
    let allowed = state.allowed_hosts.clone();
    let auth = state.auth.clone();
    let login_auth = state.auth.clone();
    let mut router = Router::new()
        .route("/", get(|| async { Html(include_str!("page.html")) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/events", get(events))
        .route(
            "/login",
            axum::routing::post(move |body: axum::body::Bytes| {
                let auth = login_auth.clone();
                async move {
                    match auth {
                        Some(a) => a.login(&body),
                        None => axum::response::Redirect::to("/").into_response(),
                    }
                }
            }),
        )
        .nest("/api/v1", api::routes())
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such page; see / and /api/v1/*\n") })
        .with_state(state.clone());
    if let Some(modules) = state.modules.clone() {
        router = router.merge(crate::modules::routes(modules));
    }
    router
        .layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            auth::require(auth.clone(), req, next)
        }))
        .layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let allowed = allowed.clone();
            async move {
                // Probes may use any name (a Kubernetes service, a load balancer).
                let probe = matches!(req.uri().path(), "/healthz" | "/readyz");
                if !probe && !origin::request_hosts(&req).all(|h| origin::host_allowed(h, &allowed)) {
                    return (
                        StatusCode::MISDIRECTED_REQUEST,
                        "this admin server does not answer to that host name (DNS rebinding); use its address, localhost, or --admin-allowed-host\n",
                    )
                        .into_response();
                }
                if let Some(why) = origin::cross_site(&req) {
                    return (
                        StatusCode::FORBIDDEN,
                        format!("{why}: requests that change something come from the admin page itself or carry the bearer token\n"),
                    )
                        .into_response();
                }
                next.run(req).await
            }
        }))
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    match (s.cache.current().is_some(), s.xds_listening.load(Ordering::Relaxed)) {
        (true, true) => (StatusCode::OK, "ready\n"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "no valid configuration loaded yet\n"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "xDS listener not bound yet\n"),
    }
}

/// `/metrics`: OpenMetrics when the scraper asks for it, else the Prometheus text format.
/// The gauges that describe the fleet and rollouts are counted now, when asked.
async fn metrics(State(s): State<AdminState>, headers: HeaderMap) -> impl IntoResponse {
    use crate::exposition;
    for (rt, n) in s.tracker.not_synced_by_type() {
        s.metrics
            .proxies_not_synced
            .get_or_create(&crate::metrics::TypeLabel { type_url: rt.type_url() })
            .set(n as i64);
    }
    let mut states = [("running", 0i64), ("paused", 0), ("failed", 0)];
    for r in s.rollouts.view(&s.tracker).rollouts {
        let i = match r.status {
            filterplane_rollout::state::Status::Running => 0,
            filterplane_rollout::state::Status::Paused => 1,
            filterplane_rollout::state::Status::Failed => 2,
        };
        states[i].1 += 1;
    }
    for (state, n) in states {
        s.metrics.rollouts_active.get_or_create(&crate::metrics::StateLabel { state }).set(n);
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if exposition::wants_openmetrics(accept) {
        ([(header::CONTENT_TYPE, exposition::OPENMETRICS)], s.metrics.render())
    } else {
        ([(header::CONTENT_TYPE, exposition::PROMETHEUS_TEXT)], s.metrics.render_prometheus())
    }
}

/// Server-sent events, at most four a second (bursts coalesce):
/// - `proxies`: `{"summary": …, "page": …, "rejects": bool}` whenever the proxies moved:
///   the summary and the page the client follows (`?state=&q=&limit=&cursor=`, as
///   `/api/v1/proxies`), each only when it differs from what this client got last (`null`
///   otherwise), and whether new rejects came. The page never refetches proxies.
/// - `change`: the config, a reload, rollouts or rejects changed (small: refetch those).
async fn events(
    State(s): State<AdminState>,
    axum::extract::Query(mut query): axum::extract::Query<crate::fleet::ProxyQuery>,
) -> axum::response::Response {
    // Each client holds a connection for as long as it watches: a bounded number of them.
    let Ok(permit) = s.event_clients.clone().try_acquire_owned() else {
        s.metrics.limit_hit("event_clients");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many event-stream clients; the page polls instead\n")
            .into_response();
    };
    query.limit.get_or_insert(100);
    if let Err(e) = crate::fleet::page(&s.tracker, &query) {
        return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
    }
    let every = Duration::from_millis(250);
    let reloads = WatchStream::new(s.reloader.changes()).map(|_| Kind::Change);
    let rollouts = WatchStream::new(s.rollouts.changes()).map(|_| Kind::Change);
    let proxies = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(every)).map(|_| Kind::Proxies);
    let (tracker, rejects_seen) = (s.tracker.clone(), std::sync::atomic::AtomicUsize::new(usize::MAX));
    let replicas = s.rollouts.replicas().clone();
    let (mut last_summary, mut last_page) = (String::new(), String::new());
    // What an open page may cost: after a look that took `t`, the next comes no sooner
    // than 20 t later (at most 5 % of one core, whatever the fleet's size), and only when
    // the proxies moved.
    let (mut last_seq, mut next_at) = (0u64, std::time::Instant::now());
    let stream = reloads
        .merge(rollouts)
        .throttle(every)
        .merge(proxies)
        .filter_map(move |kind| {
            let _held = &permit;
            match kind {
                Kind::Change => Some(Event::default().event("change").data("changed")),
                Kind::Proxies => {
                    let seq = tracker.seq() ^ replicas.others_seq();
                    if seq == last_seq || std::time::Instant::now() < next_at {
                        return None;
                    }
                    last_seq = seq;
                    let started = std::time::Instant::now();
                    let full = crate::replicas::fleet_summary(&tracker, &replicas);
                    let mut summary = serde_json::to_string(&full).unwrap_or_default();
                    // Whether the client saw this already: all but the sequence number and
                    // the report ages, which move every time.
                    let mut bare = full;
                    bare.seq = 0;
                    bare.replicas.iter_mut().for_each(|r| r.age_ms = 0);
                    let stable = serde_json::to_string(&bare).unwrap_or_default();
                    let mut page = match crate::fleet::page(&tracker, &query) {
                        Ok(p) => serde_json::to_string(&p).unwrap_or_default(),
                        Err(_) => String::new(),
                    };
                    let summary_same = stable == last_summary;
                    last_summary = stable;
                    if page == last_page {
                        page = "null".into();
                    } else {
                        last_page = page.clone();
                    }
                    if summary_same {
                        summary = "null".into();
                    }
                    // Rejects live in the tracker too: a new one is a `change`.
                    let rejects = tracker.rejects_len();
                    let rejects_moved = rejects_seen.swap(rejects, std::sync::atomic::Ordering::Relaxed) != rejects;
                    next_at = std::time::Instant::now() + started.elapsed() * 20;
                    if summary == "null" && page == "null" {
                        return rejects_moved.then(|| Event::default().event("change").data("changed"));
                    }
                    // `rejects`: a NACK came with these (the page then fetches the rejects).
                    Some(
                        Event::default()
                            .event("proxies")
                            .data(format!("{{\"summary\":{summary},\"page\":{page},\"rejects\":{rejects_moved}}}")),
                    )
                }
            }
        })
        .map(Ok::<_, Infallible>);
    let stream = futures_util::StreamExt::take_until(stream, s.shutdown.cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Change,
    Proxies,
}

#[cfg(test)]
mod tests;
