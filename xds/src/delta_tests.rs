//! Rules of the delta state machine that need no server: plain values in and out.

// Tests read the clock to check the times the machine computed from the one passed in.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;

use filterplane_api::{
    envoy_types::pb::{
        envoy::{config::core::v3::Node, service::discovery::v3::DeltaDiscoveryRequest},
        google::rpc::Status,
    },
    ResourceType,
};

use super::*;
use crate::test_support::{listener_snapshot, now, remote_wasm_snapshot, route_snapshot, snapshot};

const ECDS: ResourceType = ResourceType::ExtensionConfig;
const LDS: ResourceType = ResourceType::Listener;

fn req(rt: ResourceType, subscribe: &[&str], unsubscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node { id: "n".into(), ..Default::default() }),
        type_url: rt.type_url().into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|x| x.name.as_str()).collect()
}

fn stream(snap: Arc<Snapshot>) -> DeltaStream {
    let mut s = DeltaStream::new(None, "test");
    s.on_snapshot(snap, now());
    s
}

#[test]
fn empty_wildcard_is_answered_once_so_envoy_can_finish_initializing() {
    let mut s = stream(snapshot(&[("a", "1")]));
    let step = s.on_request(req(ResourceType::Listener, &[], &[], ""), now()).unwrap();
    assert_eq!(step.responses.len(), 1);
    assert!(step.responses[0].resources.is_empty() && step.responses[0].removed_resources.is_empty());
    let nonce = step.responses[0].nonce.clone();
    assert!(s.on_request(req(ResourceType::Listener, &[], &[], &nonce), now()).unwrap().responses.is_empty());
    assert!(s.on_snapshot(snapshot(&[("a", "2")]), now()).responses.is_empty(), "no listener changed");
}

#[test]
fn explicit_wildcard_can_be_unsubscribed() {
    let mut s = stream(snapshot(&[("a", "1"), ("b", "1")]));
    let r = s.on_request(req(ECDS, &["*"], &[], ""), now()).unwrap().responses.remove(0);
    assert_eq!(names(&r), ["a", "b"]);
    let step = s.on_request(req(ECDS, &["a"], &["*"], &r.nonce), now()).unwrap();
    assert!(step.responses.is_empty(), "a is already there; b is dropped by the client itself");
    assert_eq!(names(&s.on_snapshot(snapshot(&[("a", "2"), ("b", "2")]), now()).responses[0]), ["a"]);
}

#[test]
fn nack_keeps_the_acked_version_and_the_rejected_one_is_not_resent() {
    let mut s = stream(snapshot(&[("a", "1")]));
    let r1 = s.on_request(req(ECDS, &["a"], &[], ""), now()).unwrap().responses.remove(0);
    s.on_request(req(ECDS, &[], &[], &r1.nonce), now()).unwrap();
    let r2 = s.on_snapshot(snapshot(&[("a", "2")]), now()).responses.remove(0);
    let mut nack = req(ECDS, &[], &[], &r2.nonce);
    nack.error_detail = Some(Status { code: 13, message: "no".into(), details: vec![] });
    let step = s.on_request(nack, now()).unwrap();
    assert!(step.responses.is_empty());
    let Some(StreamEvent::Nacked { version, kept_version, resources, .. }) = step.events.first() else {
        panic!("{:?}", step.events)
    };
    assert_eq!(
        (version, kept_version, resources.as_slice()),
        (&r2.system_version_info, &r1.system_version_info, ["a".to_string()].as_slice())
    );
    assert!(s.on_snapshot(snapshot(&[("a", "2")]), now()).responses.is_empty());
}

#[test]
fn resource_that_stops_matching_is_removed() {
    let mut s = stream(snapshot(&[("a", "1"), ("b", "1")]));
    let r = s.on_request(req(ECDS, &["a", "b"], &[], ""), now()).unwrap().responses.remove(0);
    s.on_request(req(ECDS, &[], &[], &r.nonce), now()).unwrap();
    let r = s.on_snapshot(snapshot(&[("b", "1")]), now()).responses.remove(0);
    assert_eq!(r.removed_resources, ["a"]);
    // Coming back, it is sent again.
    assert_eq!(names(&s.on_snapshot(snapshot(&[("a", "1"), ("b", "1")]), now()).responses[0]), ["a"]);
}

fn nack(rt: ResourceType, nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(Status { code: 13, message: "Unable to create Wasm plugin w".into(), details: vec![] }),
        ..req(rt, &[], &[], nonce)
    }
}

/// An ADS stream that has listener `l` and extension configs `a` and `b` (both placed
/// into `l`, unless `placed` says otherwise), everything ACKed.
fn ads_with_listener(placed: &[&str], grace: std::time::Duration) -> DeltaStream {
    let settings = StreamSettings { drain_grace: grace, ..Default::default() };
    let mut s = DeltaStream::with_settings(None, "test", Arc::new(settings));
    s.on_snapshot(listener_snapshot(&[("a", "1"), ("b", "1")], placed), now());
    let lds = s.on_request(req(LDS, &[], &[], ""), now()).unwrap().responses.remove(0);
    assert_eq!(names(&lds), ["l"]);
    s.on_request(req(LDS, &[], &[], &lds.nonce), now()).unwrap();
    let ecds = s.on_request(req(ECDS, &["a", "b"], &[], ""), now()).unwrap().responses.remove(0);
    assert_eq!(names(&ecds), ["a", "b"]);
    s.on_request(req(ECDS, &[], &[], &ecds.nonce), now()).unwrap();
    s
}

fn removed_anywhere(step: &Step<DeltaDiscoveryResponse>) -> Vec<String> {
    step.responses.iter().flat_map(|r| r.removed_resources.clone()).collect()
}

const GRACE: std::time::Duration = std::time::Duration::from_secs(30);

#[test]
fn a_placed_filter_removed_keeps_its_config_until_envoy_unsubscribes_it() {
    let mut s = ads_with_listener(&["a", "b"], GRACE);
    // `a` leaves the config: the listener without it goes out, the config stays.
    let step = s.on_snapshot(listener_snapshot(&[("b", "1")], &["b"]), now());
    assert_eq!(step.responses.len(), 1, "{step:?}");
    assert_eq!(step.responses[0].type_url, LDS.type_url());
    assert!(removed_anywhere(&step).is_empty(), "nothing removed while a draining listener may use it");
    let lds = step.responses[0].nonce.clone();
    assert!(s.on_request(req(LDS, &[], &[], &lds), now()).unwrap().responses.is_empty());
    assert!(s.next_wakeup().is_some(), "the grace runs from the listener ACK");
    // The old listener drained away: Envoy unsubscribes by itself. Nothing to send.
    let step = s.on_request(req(ECDS, &[], &["a"], ""), now()).unwrap();
    assert!(step.responses.is_empty(), "{step:?}");
    assert_eq!(s.next_wakeup(), None, "the hold is over");
    // It stays gone.
    assert!(s
        .on_snapshot(listener_snapshot(&[("b", "2")], &["b"]), now())
        .responses
        .iter()
        .all(|r| r.removed_resources.is_empty()));
}

#[test]
fn a_held_removal_goes_out_once_the_grace_after_the_listener_ack_is_over() {
    let mut s = ads_with_listener(&["a", "b"], GRACE);
    let step = s.on_snapshot(listener_snapshot(&[("b", "1")], &["b"]), now());
    assert_eq!(s.next_wakeup(), None, "no grace before the listener update is ACKed");
    let acked_at = std::time::Instant::now();
    s.on_request(req(LDS, &[], &[], &step.responses[0].nonce), now()).unwrap();
    let due = s.next_wakeup().expect("a release time");
    assert!(due >= acked_at + GRACE && due <= std::time::Instant::now() + GRACE, "grace after the ACK");
    assert!(s.on_timer(due - std::time::Duration::from_secs(1)).responses.is_empty(), "not yet");
    let step = s.on_timer(due);
    assert_eq!(step.responses.len(), 1);
    assert_eq!(
        (step.responses[0].type_url.as_str(), step.responses[0].removed_resources.as_slice()),
        (ECDS.type_url(), ["a".to_string()].as_slice())
    );
    assert_eq!(s.next_wakeup(), None);
}

#[test]
fn a_refused_listener_update_keeps_the_config_held() {
    let mut s = ads_with_listener(&["a", "b"], GRACE);
    let step = s.on_snapshot(listener_snapshot(&[("b", "1")], &["b"]), now());
    let mut refused = req(LDS, &[], &[], &step.responses[0].nonce);
    refused.error_detail = Some(Status { code: 13, message: "no".into(), details: vec![] });
    s.on_request(refused, now()).unwrap();
    assert_eq!(s.next_wakeup(), None, "Envoy still runs the listener with the filter");
}

#[test]
fn a_held_config_added_back_is_not_sent_again() {
    let mut s = ads_with_listener(&["a", "b"], GRACE);
    let step = s.on_snapshot(listener_snapshot(&[("b", "1")], &["b"]), now());
    s.on_request(req(LDS, &[], &[], &step.responses[0].nonce), now()).unwrap();
    let step = s.on_snapshot(listener_snapshot(&[("a", "1"), ("b", "1")], &["a", "b"]), now());
    assert_eq!(step.responses.len(), 1, "only the listener: Envoy still has a's config");
    assert_eq!(step.responses[0].type_url, LDS.type_url());
    assert_eq!(s.next_wakeup(), None, "no hold left");
}

#[test]
fn a_config_no_served_listener_placed_is_removed_at_once() {
    // Referred to only by a bootstrap listener: removal makes Envoy use the filter's
    // default_config, as before.
    let mut s = ads_with_listener(&[], GRACE);
    let step = s.on_snapshot(listener_snapshot(&[("b", "1")], &[]), now());
    assert_eq!(removed_anywhere(&step), ["a"]);
    assert_eq!(s.next_wakeup(), None);
}

#[test]
fn a_stream_without_listeners_holds_for_the_grace_from_the_removal() {
    // The standalone ECDS service: the listener update travels elsewhere.
    let settings = StreamSettings { drain_grace: GRACE, ..Default::default() };
    let mut s = DeltaStream::with_settings(Some(ECDS), "test", Arc::new(settings));
    s.on_snapshot(listener_snapshot(&[("a", "1"), ("b", "1")], &["a", "b"]), now());
    let r = s.on_request(req(ECDS, &["a", "b"], &[], ""), now()).unwrap().responses.remove(0);
    s.on_request(req(ECDS, &[], &[], &r.nonce), now()).unwrap();
    assert!(s.on_snapshot(listener_snapshot(&[("b", "1")], &["b"]), now()).responses.is_empty());
    let due = s.next_wakeup().expect("the grace runs from the removal");
    assert_eq!(removed_anywhere(&s.on_timer(due)), ["a"]);
}

#[test]
fn a_resuming_client_keeps_configs_it_may_still_drain() {
    let settings = StreamSettings { drain_grace: GRACE, ..Default::default() };
    let mut s = DeltaStream::with_settings(None, "test", Arc::new(settings));
    s.on_snapshot(listener_snapshot(&[("b", "1")], &["b"]), now());
    // After a control-plane restart Envoy names what it has; `a` is gone meanwhile.
    s.on_request(req(LDS, &[], &[], ""), now()).unwrap();
    let mut resume = req(ECDS, &["a", "b"], &[], "");
    resume.initial_resource_versions = [("a".to_string(), "x".to_string()), ("b".to_string(), "y".to_string())].into();
    let step = s.on_request(resume, now()).unwrap();
    assert!(removed_anywhere(&step).is_empty(), "{step:?}");
    assert_eq!(names(&step.responses[0]), ["b"], "b's version differs: sent");
    // Unless Envoy unsubscribes first, the removal goes out after the grace.
    let due = s.next_wakeup().expect("the grace runs from the resume");
    assert_eq!(removed_anywhere(&s.on_timer(due)), ["a"]);
}

#[test]
fn a_remote_wasm_config_nacked_while_envoy_fetches_is_sent_again_until_acked() {
    let settings = StreamSettings { code_fetch_retries: 2, ..Default::default() };
    let mut s = DeltaStream::with_settings(None, "test", Arc::new(settings));
    s.on_snapshot(remote_wasm_snapshot(&"a".repeat(64)), now());
    let r = s.on_request(req(ECDS, &["w", "plain"], &[], ""), now()).unwrap().responses.remove(0);
    let step = s.on_request(nack(ECDS, &r.nonce), now()).unwrap();
    assert!(step.responses.is_empty(), "not at once: Envoy is fetching");
    assert!(
        matches!(step.events.last(), Some(StreamEvent::CodeFetchPending { attempt: 1, retries: 2, .. })),
        "{:?}",
        step.events
    );
    let due = s.next_wakeup().expect("a resend is due");
    let again = s.on_timer(due).responses.remove(0);
    assert_eq!(names(&again), ["plain", "w"], "what the NACKed response carried, as it is now");
    let w = |r: &DeltaDiscoveryResponse| r.resources.iter().find(|x| x.name == "w").cloned().unwrap();
    assert_ne!(w(&again).resource, w(&r).resource, "Envoy skips a config it saw NACKed: the resend must differ");
    assert_eq!(w(&again).version, w(&r).version, "same version all the same");
    // A second NACK: the last resend.
    assert!(matches!(
        s.on_request(nack(ECDS, &again.nonce), now()).unwrap().events.last(),
        Some(StreamEvent::CodeFetchPending { attempt: 2, .. })
    ));
    let last = s.on_timer(s.next_wakeup().unwrap()).responses.remove(0);
    // Resends used up: this NACK counts.
    let step = s.on_request(nack(ECDS, &last.nonce), now()).unwrap();
    assert!(matches!(step.events.last(), Some(StreamEvent::Nacked { .. })), "{:?}", step.events);
    assert_eq!(s.next_wakeup(), None);
}

#[test]
fn a_nack_of_configs_envoy_does_not_fetch_is_not_retried() {
    let mut s = stream(snapshot(&[("a", "1")]));
    let r = s.on_request(req(ECDS, &["a"], &[], ""), now()).unwrap().responses.remove(0);
    let step = s.on_request(nack(ECDS, &r.nonce), now()).unwrap();
    assert!(matches!(step.events.last(), Some(StreamEvent::Nacked { .. })));
    assert_eq!(s.next_wakeup(), None);
}

const CDS: ResourceType = ResourceType::Cluster;
const RDS: ResourceType = ResourceType::RouteConfiguration;

/// An ADS stream with route `r` to cluster `c1`, clusters `c1` and `c2`, all ACKed.
fn ads_with_route() -> DeltaStream {
    let mut s = stream(route_snapshot("c1", &["c1", "c2"]));
    let cds = s.on_request(req(CDS, &[], &[], ""), now()).unwrap().responses.remove(0);
    assert_eq!(names(&cds), ["c1", "c2"]);
    s.on_request(req(CDS, &[], &[], &cds.nonce), now()).unwrap();
    let rds = s.on_request(req(RDS, &["r"], &[], ""), now()).unwrap().responses.remove(0);
    s.on_request(req(RDS, &[], &[], &rds.nonce), now()).unwrap();
    s
}

#[test]
fn a_cluster_is_removed_only_once_the_route_that_left_it_is_acked() {
    let mut s = ads_with_route();
    // The route moves to c2 and c1 leaves: the route goes out, c1 stays for now.
    let step = s.on_snapshot(route_snapshot("c2", &["c2"]), now());
    assert_eq!(step.responses.len(), 1, "{step:?}");
    assert_eq!(step.responses[0].type_url, RDS.type_url());
    let step = s.on_request(req(RDS, &[], &[], &step.responses[0].nonce), now()).unwrap();
    // No listener changed, so nothing drains: c1 goes at once.
    assert_eq!(removed_anywhere(&step), ["c1"]);
    assert_eq!(step.responses[0].type_url, CDS.type_url());
    assert_eq!(s.next_wakeup(), None);
}

#[test]
fn a_cluster_no_route_changed_for_is_removed_at_once() {
    let mut s = ads_with_route();
    let step = s.on_snapshot(route_snapshot("c1", &["c1"]), now());
    assert_eq!(removed_anywhere(&step), ["c2"]);
    assert_eq!(step.responses.len(), 1);
}

#[test]
fn a_refused_route_update_keeps_the_cluster() {
    let mut s = ads_with_route();
    let step = s.on_snapshot(route_snapshot("c2", &["c2"]), now());
    let mut refused = req(RDS, &[], &[], &step.responses[0].nonce);
    refused.error_detail = Some(Status { code: 13, message: "no".into(), details: vec![] });
    let step = s.on_request(refused, now()).unwrap();
    assert!(removed_anywhere(&step).is_empty(), "Envoy still routes to c1");
    // The next route update is what the removal then waits for.
    let step = s.on_snapshot(route_snapshot("c2", &["c2"]), now());
    assert!(removed_anywhere(&step).is_empty());
}

/// Issue 26: subscriptions are bounded by what the proxy is served plus
/// `max_subscribed_names` names that do not exist, not by a fixed count a mesh-sized
/// Envoy exceeds.
#[test]
fn a_subscription_may_name_everything_served_plus_a_bounded_number_of_unknown_names() {
    let settings = StreamSettings { max_subscribed_names: 3, ..Default::default() };
    let served: Vec<(String, String)> = (0..10).map(|i| (format!("c{i}"), "1".to_owned())).collect();
    let entries: Vec<(&str, &str)> = served.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let names: Vec<String> = (0..10).map(|i| format!("c{i}")).chain((0..3).map(|i| format!("missing-{i}"))).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut s = DeltaStream::with_settings(None, "test", Arc::new(settings.clone()));
    s.on_snapshot(snapshot(&entries), now());
    let r = s.on_request(req(ECDS, &refs, &[], ""), now()).unwrap().responses.remove(0);
    assert_eq!(r.resources.len(), 10, "13 names: the 10 served and 3 that do not exist");
    let mut greedy = DeltaStream::with_settings(None, "test", Arc::new(settings));
    greedy.on_snapshot(snapshot(&entries), now());
    let more: Vec<&str> = refs.iter().copied().chain(["missing-3"]).collect();
    let e = greedy.on_request(req(ECDS, &more, &[], ""), now()).unwrap_err();
    assert!(matches!(e, ProtocolError::TooManyNames { names: 14, limit: 13 }), "{e}");
}
