//! Protocol rules of the SotW state machine, driven by a scripted client: plain values
//! in, plain values out.

// Tests read the clock to check the times the machine computed from the one passed in.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;

use filterplane_api::{
    envoy_types::pb::{
        envoy::{config::core::v3::Node, service::discovery::v3::DiscoveryRequest},
        google::rpc::Status,
    },
    ResourceType,
};

use super::*;
use crate::stream::Step;
use crate::test_support::{now, remote_wasm_snapshot, route_snapshot, snapshot};

const ECDS: ResourceType = ResourceType::ExtensionConfig;

fn request(rt: ResourceType, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node { id: "envoy-1".into(), cluster: "edge".into(), ..Default::default() }),
        type_url: rt.type_url().into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn nack(rt: ResourceType, names: &[&str], kept: &str, nonce: &str, message: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(Status { code: 13, message: message.into(), details: vec![] }),
        ..request(rt, names, kept, nonce)
    }
}

fn names_of(step: &Step<DiscoveryResponse>) -> Vec<Vec<String>> {
    step.responses
        .iter()
        .map(|r| {
            r.resources
                .iter()
                .map(|a| {
                    let tec: filterplane_api::envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig =
                        prost::Message::decode(a.value.as_slice()).unwrap();
                    tec.name
                })
                .collect()
        })
        .collect()
}

fn stream_with(snap: Arc<Snapshot>) -> SotwStream {
    let mut s = SotwStream::new(None, "test");
    assert!(s.on_snapshot(snap, now()).responses.is_empty(), "nothing is pushed before a request");
    s
}

#[test]
fn first_request_gets_the_subscribed_resources_and_the_ack_is_recorded() {
    let mut s = stream_with(snapshot(&[("a", "v1"), ("b", "v1")]));
    let step = s.on_request(request(ECDS, &["a"], "", ""), now()).unwrap();
    assert_eq!(names_of(&step), [["a"]]);
    let r = &step.responses[0];
    assert_eq!(r.type_url, ECDS.type_url());
    assert!(!r.nonce.is_empty() && !r.version_info.is_empty());
    assert_eq!(s.core.node().unwrap().facts.id, "envoy-1");

    let ack = s.on_request(request(ECDS, &["a"], &r.version_info, &r.nonce), now()).unwrap();
    assert!(ack.responses.is_empty(), "an ACK is not answered");
    assert!(ack.events.contains(&StreamEvent::Acked {
        rt: ECDS,
        version: r.version_info.clone(),
        nonce: r.nonce.clone(),
        resources: None,
    }));
}

#[test]
fn nack_is_recorded_with_envoys_message_and_never_resent() {
    let mut s = stream_with(snapshot(&[("a", "v1")]));
    let r = s.on_request(request(ECDS, &["a"], "", ""), now()).unwrap().responses.remove(0);
    let step =
        s.on_request(nack(ECDS, &["a"], "", &r.nonce, "filter config has type URL x but expect y"), now()).unwrap();
    assert!(step.responses.is_empty(), "no resend loop after a NACK");
    let Some(StreamEvent::Nacked { version, message, code, resources, .. }) =
        step.events.iter().find(|e| matches!(e, StreamEvent::Nacked { .. }))
    else {
        panic!("no NACK event in {:?}", step.events)
    };
    assert_eq!((version, code, resources.as_slice()), (&r.version_info, &13, ["a".to_string()].as_slice()));
    assert!(message.contains("expect y"));
    // The same snapshot again (e.g. a reload that changed nothing for this node) sends nothing.
    assert!(s.on_snapshot(snapshot(&[("a", "v1")]), now()).responses.is_empty());
}

#[test]
fn nack_then_fixed_config_sends_the_new_version() {
    let mut s = stream_with(snapshot(&[("a", "v1")]));
    let r1 = s.on_request(request(ECDS, &["a"], "", ""), now()).unwrap().responses.remove(0);
    s.on_request(nack(ECDS, &["a"], "", &r1.nonce, "bad"), now()).unwrap();
    let step = s.on_snapshot(snapshot(&[("a", "v2")]), now());
    assert_eq!(step.responses.len(), 1);
    let r2 = &step.responses[0];
    assert_ne!(r2.version_info, r1.version_info);
    assert_ne!(r2.nonce, r1.nonce);
    let ack = s.on_request(request(ECDS, &["a"], &r2.version_info, &r2.nonce), now()).unwrap();
    assert!(matches!(ack.events.last(), Some(StreamEvent::Acked { .. })));
}

#[test]
fn stale_nonce_is_ignored() {
    let mut s = stream_with(snapshot(&[("a", "v1")]));
    let r1 = s.on_request(request(ECDS, &["a"], "", ""), now()).unwrap().responses.remove(0);
    let r2 = s.on_snapshot(snapshot(&[("a", "v2")]), now()).responses.remove(0);
    // The ACK of r1 arrives after r2 was sent: superseded, ignored entirely.
    let step = s.on_request(request(ECDS, &["a", "b"], &r1.version_info, &r1.nonce), now()).unwrap();
    assert!(step.responses.is_empty() && step.events.is_empty(), "{step:?}");
    let step = s.on_request(request(ECDS, &["a"], &r2.version_info, &r2.nonce), now()).unwrap();
    assert!(matches!(step.events.last(), Some(StreamEvent::Acked { .. })));
}

#[test]
fn unsubscribe_drops_the_resource_from_the_next_response() {
    let mut s = stream_with(snapshot(&[("a", "v1"), ("b", "v1")]));
    let r1 = s.on_request(request(ECDS, &["a", "b"], "", ""), now()).unwrap().responses.remove(0);
    assert_eq!(r1.resources.len(), 2);
    let step = s.on_request(request(ECDS, &["a"], &r1.version_info, &r1.nonce), now()).unwrap();
    // The version of what it subscribes to changed; it has "a" already (ECDS carries only
    // what changed), so the response is empty.
    assert_eq!(names_of(&step), [Vec::<String>::new()]);
    assert_ne!(step.responses[0].version_info, r1.version_info);
    assert!(step.events.iter().any(|e| matches!(e, StreamEvent::Subscribed { names, .. } if names == &["a"])));
    // A change to the resource no longer subscribed is not pushed.
    let r2 = &step.responses[0];
    s.on_request(request(ECDS, &["a"], &r2.version_info, &r2.nonce), now()).unwrap();
    assert!(s.on_snapshot(snapshot(&[("a", "v1"), ("b", "v2")]), now()).responses.is_empty());
}

#[test]
fn only_a_change_to_what_the_proxy_subscribed_to_is_pushed() {
    let mut s = stream_with(snapshot(&[("a", "v1"), ("b", "v1")]));
    let r = s.on_request(request(ECDS, &["a"], "", ""), now()).unwrap().responses.remove(0);
    s.on_request(request(ECDS, &["a"], &r.version_info, &r.nonce), now()).unwrap();
    assert!(s.on_snapshot(snapshot(&[("a", "v1"), ("b", "v9"), ("c", "v1")]), now()).responses.is_empty());
    assert_eq!(names_of(&s.on_snapshot(snapshot(&[("a", "v2")]), now())), [["a"]]);
}

#[test]
fn reconnect_with_the_current_version_gets_no_response() {
    let snap = snapshot(&[("a", "v1")]);
    let mut first = stream_with(snap.clone());
    let r = first.on_request(request(ECDS, &["a"], "", ""), now()).unwrap().responses.remove(0);

    // The control plane restarted: Envoy resubscribes with its version and no nonce.
    let mut again = stream_with(snap);
    let step = again.on_request(request(ECDS, &["a"], &r.version_info, ""), now()).unwrap();
    assert!(step.responses.is_empty(), "same version: Envoy must not reload");
    assert!(
        matches!(&step.events[..], [StreamEvent::Subscribed { .. }, StreamEvent::Current { version, .. }] if *version == r.version_info),
        "{:?}",
        step.events
    );
    // ... but a later change still reaches it.
    assert_eq!(again.on_snapshot(snapshot(&[("a", "v2")]), now()).responses.len(), 1);

    // A reconnect with an old version is answered at once.
    let mut stale = stream_with(snapshot(&[("a", "v2")]));
    assert_eq!(stale.on_request(request(ECDS, &["a"], &r.version_info, ""), now()).unwrap().responses.len(), 1);
}

#[test]
fn unknown_resource_name_gets_an_answer_without_it() {
    let mut s = stream_with(snapshot(&[("a", "v1")]));
    let r = s.on_request(request(ECDS, &["a"], "", ""), now()).unwrap().responses.remove(0);
    let step = s.on_request(request(ECDS, &["a", "missing"], &r.version_info, &r.nonce), now()).unwrap();
    assert_eq!(names_of(&step), [Vec::<String>::new()], "SotW says 'missing' does not exist by leaving it out");
    // A name asked for anew that exists is sent, alone (the client has "a").
    let r = &step.responses[0];
    let step = s.on_request(request(ECDS, &["a", "missing"], &r.version_info, &r.nonce), now()).unwrap();
    assert!(step.responses.is_empty());
    let step = s.on_snapshot(snapshot(&[("a", "v1"), ("missing", "v1")]), now());
    assert_eq!(names_of(&step), [["missing"]]);
}

/// xDS protocol: in state of the world only LDS and CDS must carry every resource; the
/// client keeps other types' resources a response leaves out, so a change to one
/// extension config (or endpoint assignment, route, secret) costs each proxy that one.
#[test]
fn a_change_carries_only_what_changed_since_the_last_ack_except_for_lds_and_cds() {
    let mut s = stream_with(snapshot(&[("a", "v1"), ("b", "v1"), ("c", "v1")]));
    let r1 = s.on_request(request(ECDS, &["a", "b", "c"], "", ""), now()).unwrap().responses.remove(0);
    assert_eq!(r1.resources.len(), 3, "the first response carries everything");
    s.on_request(request(ECDS, &["a", "b", "c"], &r1.version_info, &r1.nonce), now()).unwrap();

    let next = snapshot(&[("a", "v1"), ("b", "v2"), ("c", "v1")]);
    let step = s.on_snapshot(next.clone(), now());
    assert_eq!(names_of(&step), [["b"]]);
    let r2 = step.responses[0].clone();
    // Its version is that of the whole selection, as a full response's would be.
    let mut full = stream_with(next);
    let whole = full.on_request(request(ECDS, &["a", "b", "c"], "", ""), now()).unwrap().responses.remove(0);
    assert_eq!(r2.version_info, whole.version_info);
    // The tracker learns what changed in what the proxy holds.
    let sent = step.events.iter().find_map(|e| match e {
        StreamEvent::Sent { resources, incremental, .. } => Some((resources.len(), *incremental)),
        _ => None,
    });
    assert_eq!(sent, Some((1, true)));

    // Not ACKed yet when the next change comes: the next response carries both changes
    // (it may replace the unsent one in the output queue).
    let step = s.on_snapshot(snapshot(&[("a", "v1"), ("b", "v2"), ("c", "v2")]), now());
    assert_eq!(names_of(&step), [["b", "c"]]);
    let r3 = step.responses[0].clone();
    // The ACK of r2 is stale (r3 is out); once r3 is ACKed only new changes go.
    s.on_request(request(ECDS, &["a", "b", "c"], &r3.version_info, &r3.nonce), now()).unwrap();
    let step = s.on_snapshot(snapshot(&[("a", "v3"), ("b", "v2"), ("c", "v2")]), now());
    assert_eq!(names_of(&step), [["a"]]);

    // A NACK names only what the response carried, and what it carried goes again with
    // the next change (the client kept its old version).
    let r4 = step.responses[0].clone();
    let step = s.on_request(nack(ECDS, &["a", "b", "c"], &r3.version_info, &r4.nonce, "bad a"), now()).unwrap();
    let nacked = step.events.iter().find_map(|e| match e {
        StreamEvent::Nacked { resources, .. } => Some(resources.clone()),
        _ => None,
    });
    assert_eq!(nacked, Some(vec!["a".to_string()]));
    let step = s.on_snapshot(snapshot(&[("a", "v3"), ("b", "v2"), ("c", "v4")]), now());
    assert_eq!(names_of(&step), [["a", "c"]]);

    // A new stream (a reconnect) gets everything again.
    let mut again = stream_with(snapshot(&[("a", "v3"), ("b", "v2"), ("c", "v4")]));
    let r = again.on_request(request(ECDS, &["a", "b", "c"], &r3.version_info, ""), now()).unwrap();
    assert_eq!(names_of(&r), [["a", "b", "c"]]);

    // CDS is always the whole state: a new cluster comes with the others.
    let mut s = stream_with(route_snapshot("a", &["a", "b"]));
    let cds = ResourceType::Cluster;
    let r = s.on_request(request(cds, &[], "", ""), now()).unwrap().responses.remove(0);
    assert_eq!(cluster_names(&r), ["a", "b"]);
    s.on_request(request(cds, &[], &r.version_info, &r.nonce), now()).unwrap();
    let step = s.on_snapshot(route_snapshot("a", &["a", "b", "c"]), now());
    let cds_response = step.responses.iter().find(|r| r.type_url == cds.type_url()).expect("a CDS response");
    assert_eq!(cluster_names(cds_response), ["a", "b", "c"]);
}

#[test]
fn empty_names_are_wildcard_for_lds_and_cds_only() {
    let mut s = stream_with(snapshot(&[("a", "v1")]));
    let lds = s.on_request(request(ResourceType::Listener, &[], "", ""), now()).unwrap();
    assert!(lds.events.iter().any(|e| matches!(e, StreamEvent::Subscribed { wildcard: true, .. })));
    assert_eq!(lds.responses.len(), 1, "wildcard LDS is answered even when empty");
    let ecds = s.on_request(request(ECDS, &[], "", ""), now()).unwrap();
    assert!(ecds.events.iter().any(|e| matches!(e, StreamEvent::Subscribed { wildcard: false, .. })));
    assert!(names_of(&ecds).iter().all(|n| n.is_empty()));
    let explicit = s.on_request(request(ECDS, &["*"], "", &ecds.responses[0].nonce), now()).unwrap();
    assert_eq!(names_of(&explicit), [["a"]], "`*` is the explicit wildcard for any type");
}

#[test]
fn several_types_share_one_stream_with_their_own_nonces() {
    let mut s = stream_with(snapshot(&[("a", "v1")]));
    let cds = s.on_request(request(ResourceType::Cluster, &[], "", ""), now()).unwrap().responses.remove(0);
    let ecds = s.on_request(request(ECDS, &["a"], "", ""), now()).unwrap().responses.remove(0);
    assert_ne!(cds.nonce, ecds.nonce);
    // An ECDS request quoting the CDS nonce is stale for ECDS.
    assert!(s.on_request(request(ECDS, &["a"], "", &cds.nonce), now()).unwrap().events.is_empty());
    let ack = s.on_request(request(ResourceType::Cluster, &[], &cds.version_info, &cds.nonce), now()).unwrap();
    assert!(matches!(ack.events.last(), Some(StreamEvent::Acked { rt: ResourceType::Cluster, .. })));
}

#[test]
fn requests_wait_for_the_first_snapshot() {
    let mut s = SotwStream::new(None, "test");
    assert!(s.on_request(request(ECDS, &["a"], "", ""), now()).unwrap().responses.is_empty());
    assert_eq!(names_of(&s.on_snapshot(snapshot(&[("a", "v1")]), now())), [["a"]]);
}

#[test]
fn protocol_errors() {
    let mut s = SotwStream::new(None, "test");
    let no_node = DiscoveryRequest { node: None, ..request(ECDS, &["a"], "", "") };
    assert_eq!(s.on_request(no_node, now()).unwrap_err(), ProtocolError::MissingNode);

    let mut ecds_only = SotwStream::new(Some(ECDS), "test");
    let err = ecds_only.on_request(request(ResourceType::Listener, &[], "", ""), now()).unwrap_err();
    assert!(matches!(err, ProtocolError::WrongType { .. }));

    let mut ads = SotwStream::new(None, "test");
    let mut odd = request(ECDS, &[], "", "");
    odd.type_url = "type.googleapis.com/envoy.service.runtime.v3.Runtime".into();
    let step = ads.on_request(odd, now()).unwrap();
    assert!(matches!(&step.events[..], [StreamEvent::UnsupportedType { .. }]));
}

#[test]
fn a_remote_wasm_config_nacked_while_envoy_fetches_is_sent_again_until_acked() {
    let mut s = stream_with(remote_wasm_snapshot(&"a".repeat(64)));
    let first = s.on_request(request(ECDS, &["w"], "", ""), now()).unwrap().responses.remove(0);
    let step = s.on_request(nack(ECDS, &["w"], "", &first.nonce, "Unable to create Wasm plugin w"), now()).unwrap();
    assert!(step.responses.is_empty(), "not at once: Envoy is fetching the module");
    assert!(matches!(step.events.as_slice(), [StreamEvent::CodeFetchPending { attempt: 1, .. }]), "{:?}", step.events);
    let due = s.next_wakeup().expect("a resend is due");
    assert!(due > std::time::Instant::now(), "after a backoff");
    let again = s.on_timer(due).responses.remove(0);
    assert_eq!(
        (again.version_info.as_str(), names_of(&Step { responses: vec![again.clone()], ..Default::default() })),
        (first.version_info.as_str(), vec![vec!["w".to_string()]])
    );
    assert_ne!(again.nonce, first.nonce);
    assert_ne!(again.resources, first.resources, "Envoy skips a config it saw NACKed: the resend must differ");
    assert_eq!(s.next_wakeup(), None, "one resend at a time");
    // Envoy has the module now and ACKs: done.
    let step = s.on_request(request(ECDS, &["w"], &again.version_info, &again.nonce), now()).unwrap();
    assert!(matches!(step.events.as_slice(), [StreamEvent::Acked { .. }]), "{:?}", step.events);
    assert_eq!(s.next_wakeup(), None);
}

#[test]
fn a_new_version_replaces_a_pending_resend() {
    let mut s = stream_with(remote_wasm_snapshot(&"a".repeat(64)));
    let first = s.on_request(request(ECDS, &["w"], "", ""), now()).unwrap().responses.remove(0);
    s.on_request(nack(ECDS, &["w"], "", &first.nonce, "Unable to create Wasm plugin w"), now()).unwrap();
    assert!(s.next_wakeup().is_some());
    let newer = s.on_snapshot(remote_wasm_snapshot(&"b".repeat(64)), now()).responses.remove(0);
    assert_ne!(newer.version_info, first.version_info);
    assert_eq!(s.next_wakeup(), None, "the new version is what Envoy answers next");
}

fn cluster_names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| {
            let c: filterplane_api::envoy_types::pb::envoy::config::cluster::v3::Cluster =
                prost::Message::decode(a.value.as_slice()).unwrap();
            c.name
        })
        .collect()
}

#[test]
fn a_removed_cluster_is_still_sent_until_the_route_that_left_it_is_acked() {
    const CDS: ResourceType = ResourceType::Cluster;
    const RDS: ResourceType = ResourceType::RouteConfiguration;
    let mut s = stream_with(route_snapshot("c1", &["c1", "c2"]));
    let cds = s.on_request(request(CDS, &[], "", ""), now()).unwrap().responses.remove(0);
    s.on_request(request(CDS, &[], &cds.version_info, &cds.nonce), now()).unwrap();
    let rds = s.on_request(request(RDS, &["r"], "", ""), now()).unwrap().responses.remove(0);
    s.on_request(request(RDS, &["r"], &rds.version_info, &rds.nonce), now()).unwrap();

    // The route moves to c2 and c1 leaves: the route goes out, the cluster list keeps c1.
    let step = s.on_snapshot(route_snapshot("c2", &["c2"]), now());
    let types: Vec<&str> = step.responses.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(types, [RDS.type_url()], "c2 was there already and c1 is kept: no cluster change yet");
    let rds = step.responses[0].clone();
    let step = s.on_request(request(RDS, &["r"], &rds.version_info, &rds.nonce), now()).unwrap();
    assert_eq!(step.responses.len(), 1, "{:?}", step.events);
    assert_eq!(cluster_names(&step.responses[0]), ["c2"], "now without c1");
}

#[test]
fn only_the_nonce_as_written_answers_a_response() {
    let mut s = stream_with(snapshot(&[("a", "v1")]));
    let r = s.on_request(request(ECDS, &["a"], "", ""), now()).unwrap().responses.remove(0);
    assert_eq!(r.nonce, "1");
    for lookalike in ["01", "+1", "1 ", "0", "18446744073709551617"] {
        let step = s.on_request(request(ECDS, &["a"], &r.version_info, lookalike), now()).unwrap();
        assert!(step.events.is_empty() && step.responses.is_empty(), "{lookalike:?} is a stale nonce: {step:?}");
    }
    let ack = s.on_request(request(ECDS, &["a"], &r.version_info, "1"), now()).unwrap();
    assert!(matches!(ack.events.as_slice(), [StreamEvent::Acked { .. }]), "{ack:?}");
}

/// Envoy states its names in no set order (a hash set's), and each ACK may order them
/// differently: the subscription stays the same one, and a push carries what changed,
/// worked out once per snapshot (`incremental` for the tracker), not per stream.
#[test]
fn names_in_any_order_keep_the_subscription_and_pushes_carry_what_changed() {
    let mut s = stream_with(snapshot(&[("a", "v1"), ("b", "v1"), ("c", "v1")]));
    let r = s.on_request(request(ECDS, &["c", "a", "b"], "", ""), now()).unwrap().responses.remove(0);
    let step = s.on_request(request(ECDS, &["b", "c", "a"], &r.version_info, &r.nonce), now()).unwrap();
    assert!(step.responses.is_empty());
    assert!(!step.events.iter().any(|e| matches!(e, StreamEvent::Subscribed { .. })), "{:?}", step.events);
    let step = s.on_snapshot(snapshot(&[("a", "v1"), ("b", "v2")]), now());
    assert_eq!(names_of(&step), [["b"]]);
    let sent = step.events.iter().find_map(|e| match e {
        StreamEvent::Sent { resources, removed, incremental, .. } => {
            Some((resources.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), removed.clone(), *incremental))
        }
        _ => None,
    });
    assert_eq!(sent, Some((vec!["b".to_string()], vec!["c".to_string()], true)));
    let r = &step.responses[0];
    s.on_request(request(ECDS, &["a", "c", "b"], &r.version_info, &r.nonce), now()).unwrap();
    // A change to nothing it subscribes to sends nothing; "c" coming back is sent.
    assert!(s.on_snapshot(snapshot(&[("a", "v1"), ("b", "v2"), ("d", "v1")]), now()).responses.is_empty());
    assert_eq!(names_of(&s.on_snapshot(snapshot(&[("a", "v1"), ("b", "v2"), ("c", "v1")]), now())), [["c"]]);
}

/// Streams that name the same resources, in any order, share one subscription (a push
/// reads it for every stream: one copy stays in cache); another list is another one.
#[test]
fn streams_that_subscribe_alike_share_one_subscription() {
    let subscription = |s: &SotwStream| s.types.get(&ECDS).map(|t| t.subscription.clone());
    let mut streams: Vec<SotwStream> = (0..3).map(|_| stream_with(snapshot(&[("a", "v1"), ("b", "v1")]))).collect();
    streams[0].on_request(request(ECDS, &["a", "b"], "", ""), now()).unwrap();
    streams[1].on_request(request(ECDS, &["b", "a", "b"], "", ""), now()).unwrap();
    streams[2].on_request(request(ECDS, &["a"], "", ""), now()).unwrap();
    let [first, second, other] = [0, 1, 2].map(|i| subscription(&streams[i]).unwrap());
    assert!(Arc::ptr_eq(&first, &second));
    assert!(!Arc::ptr_eq(&first, &other));
    assert_eq!(other.names(), ["a"]);
}

/// An ACK states the list again (recognised by its hash, without the subscription being
/// read); a list that differs resubscribes, and the empty list keeps its meaning of the
/// moment (LDS's legacy wildcard only while nothing else was named).
#[test]
fn a_list_stated_again_changes_nothing_and_another_list_resubscribes() {
    let subscribed = |step: &Step<DiscoveryResponse>| {
        step.events.iter().find_map(|e| match e {
            StreamEvent::Subscribed { wildcard, names, .. } => Some((*wildcard, names.clone())),
            _ => None,
        })
    };
    let lds = ResourceType::Listener;
    let mut s = stream_with(snapshot(&[("a", "v1")]));
    let first = s.on_request(request(lds, &[], "", ""), now()).unwrap();
    assert_eq!(subscribed(&first), Some((true, vec![])));
    let r = &first.responses[0];
    let ack = s.on_request(request(lds, &[], &r.version_info, &r.nonce), now()).unwrap();
    assert_eq!(subscribed(&ack), None, "{ack:?}");
    assert!(ack.responses.is_empty());
    let named = s.on_request(request(lds, &["a"], &r.version_info, ""), now()).unwrap();
    assert_eq!(subscribed(&named), Some((false, vec!["a".to_string()])));
    let again = s.on_request(request(lds, &["a"], &r.version_info, ""), now()).unwrap();
    assert_eq!(subscribed(&again), None, "{again:?}");
    // Empty after names: no longer the legacy wildcard, and stays so when stated again.
    let emptied = s.on_request(request(lds, &[], &r.version_info, ""), now()).unwrap();
    assert_eq!(subscribed(&emptied), Some((false, vec![])));
    let again = s.on_request(request(lds, &[], &r.version_info, ""), now()).unwrap();
    assert_eq!(subscribed(&again), None, "{again:?}");
}
