//! The admin router, driven with `oneshot`: no socket.

use std::sync::{atomic::AtomicBool, Arc};

use axum::{body::Body, http::Request};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;

async fn get(app: Router, uri: &str) -> (StatusCode, String) {
    let res = app.oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn state(config: &str) -> (AdminState, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.yaml"), config).unwrap();
    let cache = Arc::new(SnapshotCache::default());
    let metrics = Arc::new(Metrics::default());
    let reloader = Arc::new(ConfigReloader::new(dir.path().join("c.yaml"), cache.clone(), metrics.clone()));
    let s = AdminState {
        cache,
        tracker: Arc::new(AckTracker::new(metrics.clone())),
        reloader,
        metrics,
        xds_listening: Arc::new(AtomicBool::new(true)),
        shutdown: CancellationToken::new(),
        event_clients: Arc::new(tokio::sync::Semaphore::new(2)),
        allowed_hosts: Arc::new(vec!["filterplane.internal".into()]),
        auth: None,
        modules: None,
        rollouts: Arc::new(
            crate::rollouts::Rollouts::new(
                Box::<filterplane_state::MemoryStore>::default(),
                Arc::new(Metrics::default()),
                "memory",
                std::time::Duration::ZERO,
            )
            .unwrap(),
        ),
    };
    (s, dir)
}

const GOOD: &str = "version: 1\nextension_configs:\n  - name: a\n    typed_config: { \"@type\": type.googleapis.com/google.protobuf.Struct, value: { a: 1 } }\n";

#[tokio::test]
async fn readyz_waits_for_a_valid_config_and_config_shows_the_errors() {
    let (s, dir) = state("version: 1\nextension_configs: [ { name: a } ]\n");
    s.reloader.reload("test").await;
    assert_eq!(get(app(s.clone()), "/healthz").await.0, StatusCode::OK);
    assert_eq!(get(app(s.clone()), "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (code, body) = get(app(s.clone()), "/api/v1/config").await;
    assert_eq!(code, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["last_outcome"]["result"], "failed");
    assert!(v["last_outcome"]["errors"][0]["message"].as_str().unwrap().contains("typed_config"), "{body}");
    assert_eq!(v["serving_version"], serde_json::Value::Null);

    std::fs::write(dir.path().join("c.yaml"), GOOD).unwrap();
    s.reloader.reload("test").await;
    assert_eq!(get(app(s.clone()), "/readyz").await.0, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&get(app(s.clone()), "/api/v1/config").await.1).unwrap();
    assert_eq!(v["last_outcome"]["result"], "applied");
    assert_eq!(v["resources"][0]["name"], "a");
    assert_eq!(v["resources"][0]["line"], 3);
}

#[tokio::test]
async fn config_dump_is_envoy_native_json_and_unknown_proxy_is_404() {
    let (s, _dir) = state(GOOD);
    s.reloader.reload("test").await;
    let (code, body) = get(app(s.clone()), "/api/v1/config_dump").await;
    assert_eq!(code, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let r = &v["resources"][0]["resource"];
    assert_eq!(r["@type"], "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig");
    assert_eq!(r["typed_config"]["@type"], "type.googleapis.com/google.protobuf.Struct");
    let (code, body) = get(app(s.clone()), "/api/v1/proxies/nobody").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(body.contains("nobody"));
    assert_eq!(get(app(s), "/api/v1/rejects").await.1, "[]");
}

#[tokio::test]
async fn page_metrics_and_unknown_paths() {
    let (s, _dir) = state(GOOD);
    s.reloader.reload("test").await;
    let (code, body) = get(app(s.clone()), "/").await;
    assert_eq!(code, StatusCode::OK);
    assert!(body.contains("<title>Filterplane</title>") && body.contains("/api/v1/events"));
    assert!(!body.contains("http://") && !body.contains("https://"), "the page loads nothing from outside");
    let (code, body) = get(app(s.clone()), "/metrics").await;
    assert_eq!(code, StatusCode::OK);
    assert!(body.contains("filterplane_config_reloads_total{result=\"applied\"} 1"), "{body}");
    // A scraper that does not ask for OpenMetrics gets the Prometheus text format.
    assert!(body.contains("# TYPE filterplane_xds_rejects_total counter"), "{body}");
    let (code, body) = get(app(s), "/nope").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(body.contains("/api/v1"));
}

#[tokio::test]
async fn event_stream_announces_changes() {
    let (s, _dir) = state(GOOD);
    let res = app(s.clone()).oneshot(Request::get("/api/v1/events").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    // Events until one contains `what`.
    async fn until(body: &mut Body, what: &str) -> String {
        loop {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame()).await.unwrap().unwrap();
            let text = String::from_utf8_lossy(&frame.unwrap().into_data().unwrap()).into_owned();
            if text.contains(what) {
                return text;
            }
        }
    }
    // At once: "look now", and the proxies (none yet) with their summary.
    until(&mut body, "event: change\ndata: changed").await;
    let proxies = until(&mut body, "event: proxies").await;
    assert!(proxies.contains("\"summary\":{\"proxies\":0"), "{proxies}");
    // A reload produces another change.
    s.reloader.reload("test").await;
    until(&mut body, "event: change").await;
    // A proxy connecting produces a proxies event carrying it.
    let node = std::sync::Arc::new(crate::xds::stream::NodeInfo {
        facts: filterplane_config::NodeFacts { id: "evented".into(), ..Default::default() },
        ..Default::default()
    });
    s.tracker.connect(node, crate::tracker::StreamKind::Sotw, "127.0.0.1:9".into());
    let proxies = until(&mut body, "event: proxies").await;
    assert!(proxies.contains("\"node_id\":\"evented\"") && proxies.contains("\"total\":1"), "{proxies}");
    // Shutdown ends the stream, so a graceful shutdown does not wait on open pages.
    s.shutdown.cancel();
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame()).await.unwrap();
    assert!(end.is_none(), "{end:?}");
}

#[tokio::test]
async fn config_dump_never_shows_a_private_key() {
    let yaml = "version: 1\nlisteners:\n  - name: tls\n    address: { socket_address: { address: 127.0.0.1, port_value: 10443 } }\n    filter_chains:\n      - transport_socket:\n          name: envoy.transport_sockets.tls\n          typed_config:\n            \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n            common_tls_context:\n              tls_certificates:\n                - certificate_chain: { inline_string: \"PUBLIC-CERT\" }\n                  private_key: { inline_string: \"TOP-SECRET-KEY\" }\n        filters:\n          - name: envoy.filters.network.tcp_proxy\n            typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: t, cluster: c }\n";
    let (s, _dir) = state(yaml);
    s.reloader.reload("test").await;
    let (code, body) = get(app(s.clone()), "/api/v1/config_dump").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert!(!body.contains("TOP-SECRET-KEY"), "{body}");
    assert!(body.contains("[redacted]") && body.contains("PUBLIC-CERT"), "{body}");
}

#[tokio::test]
async fn a_host_name_nobody_allowed_is_refused_dns_rebinding() {
    let (s, _dir) = state(GOOD);
    s.reloader.reload("test").await;
    let with_host = |host: &'static str, path: &'static str| {
        let app = app(s.clone());
        async move {
            let req = Request::get(path).header("host", host).body(Body::empty()).unwrap();
            app.oneshot(req).await.unwrap().status()
        }
    };
    assert_eq!(with_host("evil.example:18001", "/api/v1/config").await, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(with_host("evil.example", "/").await, StatusCode::MISDIRECTED_REQUEST);
    for ok in
        ["127.0.0.1:18001", "localhost:18001", "[::1]:18001", "10.1.2.3:18001", "filterplane.internal", "LOCALHOST."]
    {
        assert_eq!(with_host(ok, "/api/v1/config").await, StatusCode::OK, "{ok}");
    }
    assert_eq!(with_host("evil.example", "/healthz").await, StatusCode::OK, "probes answer any name");
}

#[tokio::test]
async fn with_a_token_only_probes_and_public_metrics_are_open() {
    let (mut s, dir) = state(GOOD);
    s.reloader.reload("test").await;
    let token = dir.path().join("token");
    std::fs::write(&token, "tok\n").unwrap();
    for public in [false, true] {
        s.auth = Some(Arc::new(auth::AdminAuth::new(&token, public, false, s.metrics.clone()).unwrap()));
        assert_eq!(get(app(s.clone()), "/healthz").await.0, StatusCode::OK);
        assert_eq!(get(app(s.clone()), "/readyz").await.0, StatusCode::OK);
        assert_eq!(get(app(s.clone()), "/api/v1/config").await.0, StatusCode::UNAUTHORIZED);
        let (code, page) = get(app(s.clone()), "/").await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert!(page.contains("<form method=\"post\" action=\"/login\">"), "the page asks for the token");
        let metrics = get(app(s.clone()), "/metrics").await.0;
        assert_eq!(
            metrics,
            if public { StatusCode::OK } else { StatusCode::UNAUTHORIZED },
            "--metrics-public {public}"
        );
        let req = Request::get("/api/v1/config").header("authorization", "Bearer tok").body(Body::empty()).unwrap();
        assert_eq!(app(s.clone()).oneshot(req).await.unwrap().status(), StatusCode::OK);
        // A module path needs no token (Envoy cannot send one) and answers nothing unknown.
        assert_eq!(get(app(s.clone()), &format!("/modules/{}", "0".repeat(64))).await.0, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn rollout_actions_need_a_configured_token() {
    let (s, _dir) = state(GOOD);
    s.reloader.reload("test").await;
    let req = Request::post("/api/v1/rollouts/a/pause").body(Body::empty()).unwrap();
    let res = app(s.clone()).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let body = String::from_utf8_lossy(&res.into_body().collect().await.unwrap().to_bytes()).into_owned();
    assert!(body.contains("--admin-token-file"), "{body}");
    // Reading stays open.
    let (code, body) = get(app(s), "/api/v1/rollouts").await;
    assert_eq!(code, StatusCode::OK);
    assert!(body.starts_with(r#"{"rollouts":[],"history":[],"shared":{"store":"embedded""#), "{body}");
}
