//! The tracker, fed plain events.

use filterplane_api::{content_version, ResourceType};
use filterplane_config::NodeFacts;

use super::*;

const ECDS: ResourceType = ResourceType::ExtensionConfig;

fn tracker(limit: usize) -> (AckTracker, Arc<Metrics>) {
    let m = Arc::new(Metrics::default());
    (AckTracker::with_reject_limit(m.clone(), limit), m)
}

fn node(id: &str) -> std::sync::Arc<NodeInfo> {
    std::sync::Arc::new(NodeInfo {
        facts: NodeFacts { id: id.into(), ..Default::default() },
        user_agent: "envoy 1.40.0".into(),
    })
}

fn sent(version: &str, nonce: &str, names: &[&str]) -> StreamEvent {
    StreamEvent::Sent {
        rt: ECDS,
        version: version.into(),
        nonce: nonce.into(),
        resources: names.iter().map(|n| (n.to_string(), content_version([n.as_bytes(), version.as_bytes()]))).collect(),
        removed: vec![],
        incremental: false,
        bytes: 100,
    }
}

fn acked(version: &str, nonce: &str) -> StreamEvent {
    StreamEvent::Acked { rt: ECDS, version: version.into(), nonce: nonce.into(), resources: None }
}

fn nacked(version: &str, kept: &str, nonce: &str) -> StreamEvent {
    StreamEvent::Nacked {
        rt: ECDS,
        version: version.into(),
        kept_version: kept.into(),
        nonce: nonce.into(),
        code: 13,
        message: "bad".into(),
        resources: vec!["a".into()],
    }
}

fn ecds(t: &AckTracker) -> TypeStatus {
    t.proxies()[0].types[&ECDS].clone()
}

#[test]
fn ack_marks_the_type_and_its_resources_synced() {
    let (t, m) = tracker(10);
    let id = t.connect(node("n"), StreamKind::Sotw, "127.0.0.1:1".into());
    t.record(id, &sent("v1", "1", &["a", "b"]));
    assert_eq!(ecds(&t).state, SyncState::Pending);
    assert_eq!(ecds(&t).resources["a"].acked_version, None);
    t.record(id, &acked("v1", "1"));
    let s = ecds(&t);
    assert_eq!((s.state, s.acked_version.as_deref()), (SyncState::Synced, Some("v1")));
    assert_eq!(s.resources["a"].acked_version.as_ref(), Some(&s.resources["a"].sent_version));
    let text = m.render();
    assert!(
        text.contains(
            "filterplane_xds_acks_total{type_url=\"type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("filterplane_xds_pushed_bytes_total{type_url=\"type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig\"} 100"), "{text}");
    assert!(text.contains("filterplane_xds_push_ack_latency_seconds_count{type_url=\"type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig\"} 1"), "{text}");
}

#[test]
fn nack_keeps_last_acked_version_and_ack_of_a_fix_clears_it() {
    let (t, m) = tracker(10);
    let id = t.connect(node("n"), StreamKind::Sotw, String::new());
    t.record(id, &sent("v1", "1", &["a"]));
    t.record(id, &acked("v1", "1"));
    let good = ecds(&t).resources["a"].clone();
    t.record(id, &sent("v2", "2", &["a"]));
    t.record(id, &nacked("v2", "v1", "2"));
    let s = ecds(&t);
    assert_eq!(s.state, SyncState::Nacked);
    assert_eq!(s.acked_version.as_deref(), Some("v1"));
    assert_eq!(s.last_nack.as_ref().map(|n| n.version.as_str()), Some("v2"));
    assert_eq!(s.resources["a"].acked_version, good.acked_version, "runs the old version");
    assert_eq!(s.resources["a"].nacked_version.as_ref(), Some(&s.resources["a"].sent_version));
    assert!(m.render().contains(
        "filterplane_xds_rejects_total{type_url=\"type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig\"} 1"
    ));

    t.record(id, &sent("v3", "3", &["a"]));
    t.record(id, &acked("v3", "3"));
    let s = ecds(&t);
    assert!(s.last_nack.is_none() && s.resources["a"].nacked_version.is_none());
    assert_eq!(s.state, SyncState::Synced);
    assert_eq!(t.rejects().len(), 1, "history keeps the reject after the fix");
}

#[test]
fn unsubscribe_drops_the_resource_from_the_view() {
    let (t, _) = tracker(10);
    let id = t.connect(node("n"), StreamKind::Sotw, String::new());
    t.record(id, &StreamEvent::Subscribed { rt: ECDS, wildcard: false, names: vec!["a".into(), "b".into()] });
    t.record(id, &sent("v1", "1", &["a", "b"]));
    t.record(id, &StreamEvent::Subscribed { rt: ECDS, wildcard: false, names: vec!["a".into()] });
    t.record(id, &sent("v2", "2", &["a"]));
    let s = ecds(&t);
    assert_eq!(s.subscribed, ["a"]);
    assert_eq!(s.resources.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["a"]);
}

#[test]
fn reconnect_is_a_new_stream_and_an_up_to_date_client_shows_synced() {
    let (t, m) = tracker(10);
    let first = t.connect(node("n"), StreamKind::Sotw, String::new());
    t.record(first, &sent("v1", "1", &["a"]));
    t.disconnect(first);
    assert!(t.proxies().is_empty());
    let second = t.connect(node("n"), StreamKind::Sotw, String::new());
    assert_ne!(first, second);
    t.record(
        second,
        &StreamEvent::Current {
            rt: ECDS,
            version: "v1".into(),
            resources: vec![("a".into(), content_version([b"x".as_slice()]))],
        },
    );
    let s = ecds(&t);
    assert_eq!((s.state, s.acked_version.as_deref(), s.sent_nonce.as_deref()), (SyncState::Synced, Some("v1"), None));
    assert!(s.resources["a"].acked_version.is_some());
    assert!(m.render().contains("filterplane_xds_connected_proxies{stream_kind=\"sotw\"} 1"));
    // Events for a stream that is gone are ignored.
    t.record(first, &nacked("v2", "v1", "2"));
    assert!(t.rejects().is_empty());
}

#[test]
fn rejects_outlive_the_stream_and_history_is_bounded() {
    let (t, _) = tracker(3);
    let id = t.connect(node("n"), StreamKind::Sotw, String::new());
    for i in 0..5 {
        t.record(id, &nacked(&format!("v{i}"), "", &i.to_string()));
    }
    t.disconnect(id);
    assert!(t.proxies().is_empty());
    let versions: Vec<String> = t.rejects().into_iter().map(|r| r.version).collect();
    assert_eq!(versions, ["v4", "v3", "v2"]);
}

#[test]
fn every_change_wakes_watchers() {
    let (t, _) = tracker(3);
    let before = t.seq();
    let id = t.connect(node("n"), StreamKind::Sotw, String::new());
    let connected = t.seq();
    assert_ne!(connected, before);
    t.record(id, &nacked("v1", "", "1"));
    assert_ne!(t.seq(), connected);
}

#[test]
fn delta_ack_marks_only_what_that_response_carried() {
    let (t, _) = tracker(10);
    let id = t.connect(node("n"), StreamKind::Delta, String::new());
    let v = |s: &str| content_version([s.as_bytes()]);
    let sent = |version: &str, nonce: &str, res: &[(&str, &str)]| StreamEvent::Sent {
        rt: ECDS,
        version: version.into(),
        nonce: nonce.into(),
        resources: res.iter().map(|(n, x)| (n.to_string(), v(x))).collect(),
        removed: vec![],
        incremental: true,
        bytes: 1,
    };
    // Two responses in flight: a@1, b@1; then a@2.
    t.record(id, &sent("s1", "1", &[("a", "1"), ("b", "1")]));
    t.record(id, &sent("s2", "2", &[("a", "2")]));
    // The first one is ACKed: b runs 1, and a runs 1 while 2 is still on its way.
    t.record(
        id,
        &StreamEvent::Acked {
            rt: ECDS,
            version: "s1".into(),
            nonce: "1".into(),
            resources: Some(vec![("a".into(), v("1")), ("b".into(), v("1"))].into()),
        },
    );
    let s = ecds(&t);
    assert_eq!(s.state, SyncState::Pending, "the second response is still in flight");
    assert_eq!(s.resources["a"].acked_version, Some(v("1")));
    assert_eq!(s.resources["a"].sent_version, v("2"));
    assert_eq!(s.resources["b"].acked_version, Some(v("1")));
}

#[test]
fn a_proxy_shows_as_json_with_its_node_types_and_resources() {
    let (t, _) = tracker(10);
    let mut facts = NodeFacts { id: "n".into(), cluster: "edge".into(), region: "eu".into(), ..Default::default() };
    facts.metadata.insert("team".into(), "payments".into());
    let id = t.connect(Arc::new(NodeInfo { facts, user_agent: "envoy 1.40.0".into() }), StreamKind::Delta, "p".into());
    t.record(id, &sent("v1", "1", &["a"]));
    t.record(id, &acked("v1", "1"));
    let json = serde_json::to_value(&t.proxies()[0]).unwrap_or_default();
    assert_eq!(json["node_id"], "n");
    assert_eq!(json["cluster"], "edge");
    assert_eq!(json["metadata"]["team"], "payments");
    assert_eq!(json["locality"]["region"], "eu");
    assert_eq!(json["user_agent"], "envoy 1.40.0");
    assert_eq!(json["stream_kind"], "delta");
    assert!(json["connected_since"].as_str().is_some_and(|s| s.ends_with('Z')), "{json}");
    let ecds = &json["types"][ECDS.type_url()];
    assert_eq!(ecds["state"], "synced");
    let version = content_version([b"a".as_slice(), b"v1"]).to_string();
    assert_eq!(ecds["resources"]["a"]["sent_version"], version.as_str());
    assert_eq!(ecds["resources"]["a"]["acked_version"], version.as_str());
}

#[test]
fn a_nack_while_envoy_fetches_a_module_is_pending_not_a_reject() {
    let (t, m) = tracker(10);
    let id = t.connect(node("n"), StreamKind::Delta, "127.0.0.1:1".into());
    t.record(id, &sent("v1", "1", &["w"]));
    t.record(
        id,
        &StreamEvent::CodeFetchPending {
            rt: ECDS,
            version: "v1".into(),
            nonce: "1".into(),
            message: "Unable to create Wasm plugin w".into(),
            resources: vec!["w".into()],
            attempt: 1,
            retries: 10,
        },
    );
    let s = ecds(&t);
    assert_eq!(s.state, SyncState::Pending, "not synced, not refused: fetching");
    assert_eq!(s.code_fetch.as_ref().map(|c| (c.attempt, c.retries)), Some((1, 10)));
    assert!(t.rejects().is_empty());
    let text = m.render();
    assert!(text.contains("filterplane_wasm_code_fetch_resends_total 1"), "{text}");
    assert!(text.contains("filterplane_xds_rejects_total{type_url=\"type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig\"} 0"), "{text}");
    // The resend is ACKed: Envoy runs the module.
    t.record(id, &sent("v1", "2", &["w"]));
    t.record(id, &acked("v1", "2"));
    assert_eq!((ecds(&t).state, ecds(&t).code_fetch.is_none()), (SyncState::Synced, true));
}

/// Versions and nonces are kept in place up to 22 bytes (Filterplane's own are 16 hex
/// digits and a number), boxed beyond; either way they read, compare and serialize as
/// the text they were given, in the space of a `String`.
#[test]
fn versions_and_nonces_keep_their_text_short_or_long() {
    assert_eq!(std::mem::size_of::<Option<Text>>(), std::mem::size_of::<String>());
    let long = "a version another control plane wrote, longer than 22 bytes";
    for text in ["", "1", "0123456789abcdef", "exactly-22-bytes-long!", long] {
        let t = Text::from(text);
        assert_eq!((t.as_str(), &*t, t.to_string()), (text, text, text.to_owned()));
        assert_eq!(serde_json::to_value(&t).unwrap(), serde_json::json!(text));
        assert_eq!(t, Text::from(text));
        assert_eq!(matches!(t, Text::Long(_)), text.len() > 22, "{text}");
    }
    assert!(Text::from("a") < Text::from(long) && Text::from("b") > Text::from(long));
    // A time from the monotonic clock is shown as the wall time it was.
    let ago = std::time::Duration::from_secs(5);
    let then = Stamp(Instant::now() - ago).wall();
    let off = SystemTime::now().duration_since(then).unwrap();
    assert!(off >= ago && off < ago + std::time::Duration::from_secs(2), "{off:?}");
}
