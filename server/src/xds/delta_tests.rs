//! Rules of the delta state machine that need no server: plain values in and out.

use std::sync::Arc;

use filterplane_api::{
    envoy_types::pb::{
        envoy::{config::core::v3::Node, service::discovery::v3::DeltaDiscoveryRequest},
        google::rpc::Status,
    },
    ResourceType,
};

use super::*;
use crate::xds::test_support::snapshot;

const ECDS: ResourceType = ResourceType::ExtensionConfig;

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
    s.on_snapshot(snap);
    s
}

#[test]
fn empty_wildcard_is_answered_once_so_envoy_can_finish_initializing() {
    let mut s = stream(snapshot(&[("a", "1")]));
    let step = s.on_request(req(ResourceType::Listener, &[], &[], "")).unwrap();
    assert_eq!(step.responses.len(), 1);
    assert!(step.responses[0].resources.is_empty() && step.responses[0].removed_resources.is_empty());
    let nonce = step.responses[0].nonce.clone();
    assert!(s.on_request(req(ResourceType::Listener, &[], &[], &nonce)).unwrap().responses.is_empty());
    assert!(s.on_snapshot(snapshot(&[("a", "2")])).responses.is_empty(), "no listener changed");
}

#[test]
fn explicit_wildcard_can_be_unsubscribed() {
    let mut s = stream(snapshot(&[("a", "1"), ("b", "1")]));
    let r = s.on_request(req(ECDS, &["*"], &[], "")).unwrap().responses.remove(0);
    assert_eq!(names(&r), ["a", "b"]);
    let step = s.on_request(req(ECDS, &["a"], &["*"], &r.nonce)).unwrap();
    assert!(step.responses.is_empty(), "a is already there; b is dropped by the client itself");
    assert_eq!(names(&s.on_snapshot(snapshot(&[("a", "2"), ("b", "2")])).responses[0]), ["a"]);
}

#[test]
fn nack_keeps_the_acked_version_and_the_rejected_one_is_not_resent() {
    let mut s = stream(snapshot(&[("a", "1")]));
    let r1 = s.on_request(req(ECDS, &["a"], &[], "")).unwrap().responses.remove(0);
    s.on_request(req(ECDS, &[], &[], &r1.nonce)).unwrap();
    let r2 = s.on_snapshot(snapshot(&[("a", "2")])).responses.remove(0);
    let mut nack = req(ECDS, &[], &[], &r2.nonce);
    nack.error_detail = Some(Status { code: 13, message: "no".into(), details: vec![] });
    let step = s.on_request(nack).unwrap();
    assert!(step.responses.is_empty());
    let Some(StreamEvent::Nacked { version, kept_version, resources, .. }) = step.events.first() else {
        panic!("{:?}", step.events)
    };
    assert_eq!(
        (version, kept_version, resources.as_slice()),
        (&r2.system_version_info, &r1.system_version_info, ["a".to_string()].as_slice())
    );
    assert!(s.on_snapshot(snapshot(&[("a", "2")])).responses.is_empty());
}

#[test]
fn resource_that_stops_matching_is_removed() {
    let mut s = stream(snapshot(&[("a", "1"), ("b", "1")]));
    let r = s.on_request(req(ECDS, &["a", "b"], &[], "")).unwrap().responses.remove(0);
    s.on_request(req(ECDS, &[], &[], &r.nonce)).unwrap();
    let r = s.on_snapshot(snapshot(&[("b", "1")])).responses.remove(0);
    assert_eq!(r.removed_resources, ["a"]);
    // Coming back, it is sent again.
    assert_eq!(names(&s.on_snapshot(snapshot(&[("a", "1"), ("b", "1")])).responses[0]), ["a"]);
}
