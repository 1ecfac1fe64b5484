//! A bounded fuzz run of the SotW and delta state machines, in the test suite: random
//! request sequences (known and unknown types, names, stale and forged nonces, NACKs with
//! long messages, resumes) interleaved with config changes and timers. No panic, and the
//! responses stay well-formed. Deterministic: the seed is fixed.

#![allow(clippy::disallowed_methods)] // a test drives the machines with the real clock

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use filterplane_api::{
    envoy_types::pb::{
        envoy::{
            config::core::v3::Node,
            service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest},
        },
        google::rpc::Status,
    },
    ResourceType,
};
use filterplane_config::NodeFacts;
use filterplane_xds::{
    delta::DeltaStream,
    protocol::Protocol,
    snapshot::{Generation, Snapshot},
    sotw::{SotwRequest, SotwStream},
    stream::StreamSettings,
};

#[path = "../../config/tests/support/rng.rs"]
mod rng;

use prost::Message;
use rng::Rng;

/// Snapshots with a listener `l`, route `r`, clusters, and extension configs, some placed.
fn snapshot(variant: usize) -> Arc<Snapshot> {
    let (configs, placed, cluster) =
        [(&["a", "b"][..], "a", "c1"), (&["b"][..], "b", "c2"), (&["a", "b", "z"][..], "z", "c1")][variant % 3];
    let mut yaml = String::from("version: 1\nextension_configs:\n");
    for name in configs {
        let placement = if *name == placed { "    placement: { listeners: [l] }\n" } else { "" };
        yaml.push_str(&format!("  - name: {name}\n{placement}    typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation, mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x, value: \"{variant}\" }} }} }} ] }} }}\n"));
    }
    yaml.push_str(&format!("listeners:\n  - name: l\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 1 }} }}\n    filter_chains: [ {{ filters: [ {{ name: envoy.filters.network.http_connection_manager, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: l, rds: {{ route_config_name: r, config_source: {{ ads: {{}} }} }}, http_filters: [ {{ name: envoy.filters.http.router, typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }} }} ] }} }} ] }} ]\nroutes:\n  - name: r\n    virtual_hosts: [ {{ name: all, domains: [\"*\"], routes: [ {{ match: {{ prefix: \"/\" }}, route: {{ cluster: {cluster} }} }} ] }} ]\nclusters:\n  - name: {cluster}\n    type: STATIC\n    connect_timeout: 1s\n"));
    let parsed = filterplane_config::load::parse_file(Path::new("f.yaml"), &yaml).expect("fuzz seed parses");
    let config = filterplane_config::compile(&[parsed]).expect("fuzz seed compiles");
    Generation::new(config).snapshot_for(&NodeFacts::default())
}

const TYPES: [&str; 8] = [
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
    "type.googleapis.com/nonsense",
    "",
];
const NAMES: [&str; 9] = ["a", "b", "z", "l", "r", "c1", "c2", "*", "missing"];

fn node(rng: &mut Rng) -> Option<Node> {
    (rng.below(8) != 0).then(|| Node { id: "fuzz".into(), ..Default::default() })
}

fn names(rng: &mut Rng) -> Vec<String> {
    (0..rng.below(4)).map(|_| rng.pick(&NAMES).to_string()).collect()
}

fn error(rng: &mut Rng) -> Option<Status> {
    (rng.below(4) == 0).then(|| Status { code: 13, message: "x".repeat(rng.below(10_000)), details: vec![] })
}

fn nonce(rng: &mut Rng, sent: &[String]) -> String {
    match rng.below(4) {
        0 => String::new(),
        1 => "forged".into(),
        _ if !sent.is_empty() => rng.pick(sent).clone(),
        _ => "1".into(),
    }
}

#[test]
fn random_sotw_sequences_never_panic() {
    let mut rng = Rng(0x5eed_0000_0000_0501);
    let snaps: Vec<_> = (0..3).map(snapshot).collect();
    let settings = Arc::new(StreamSettings { max_subscribed_names: 5, ..Default::default() });
    for _ in 0..1000 {
        // Two streams in step: one given the requests decoded, one given them as the
        // server reads them off the wire (the names apart, `StatedNames`). Both answer
        // alike.
        let mut s = SotwStream::with_settings(None, "fuzz", settings.clone());
        let mut wire = SotwStream::with_settings(None, "fuzz", settings.clone());
        let mut sent: Vec<String> = Vec::new();
        let mut now = Instant::now();
        for _ in 0..40 {
            let (step, step_wire) = match rng.below(6) {
                0 => {
                    let snap = rng.pick(&snaps).clone();
                    (s.on_snapshot(snap.clone(), now), wire.on_snapshot(snap, now))
                }
                1 => {
                    now += Duration::from_millis(rng.below(20_000) as u64);
                    (s.on_timer(now), wire.on_timer(now))
                }
                _ => {
                    let req = DiscoveryRequest {
                        node: node(&mut rng),
                        type_url: rng.pick(&TYPES).to_string(),
                        resource_names: names(&mut rng),
                        version_info: ["", "x", "0000000000000000"][rng.below(3)].into(),
                        response_nonce: nonce(&mut rng, &sent),
                        error_detail: error(&mut rng),
                        ..Default::default()
                    };
                    let read = <SotwStream as Protocol>::decode_without_node(&req.encode_to_vec()).unwrap();
                    let read = SotwRequest { req: DiscoveryRequest { node: req.node.clone(), ..read.req }, ..read };
                    match (s.on_request(req, now), wire.on_request_wire(read, now).map(|step| step.decoded())) {
                        (Ok(a), Ok(b)) => (a, b),
                        (Err(a), Err(b)) => {
                            assert_eq!(a, b);
                            break; // the stream ends, as the service ends it
                        }
                        (a, b) => panic!("decoded {a:?}, off the wire {b:?}"),
                    }
                }
            };
            assert_eq!(step.responses, step_wire.responses);
            for r in &step.responses {
                assert!(!r.nonce.is_empty() && TYPES[..6].contains(&r.type_url.as_str()), "{r:?}");
                sent.push(r.nonce.clone());
            }
        }
    }
}

#[test]
fn random_delta_sequences_never_panic() {
    let mut rng = Rng(0x5eed_0000_0000_de17);
    let snaps: Vec<_> = (0..3).map(snapshot).collect();
    let settings =
        Arc::new(StreamSettings { max_subscribed_names: 5, drain_grace: Duration::from_secs(1), ..Default::default() });
    for _ in 0..1000 {
        let mut s = DeltaStream::with_settings(None, "fuzz", settings.clone());
        let mut sent: Vec<String> = Vec::new();
        let mut now = Instant::now();
        for _ in 0..40 {
            let step = match rng.below(6) {
                0 => s.on_snapshot(rng.pick(&snaps).clone(), now),
                1 => {
                    now += Duration::from_millis(rng.below(20_000) as u64);
                    s.on_timer(now)
                }
                _ => {
                    let initial = if rng.below(4) == 0 {
                        names(&mut rng).into_iter().map(|n| (n, "v".to_string())).collect()
                    } else {
                        Default::default()
                    };
                    let req = DeltaDiscoveryRequest {
                        node: node(&mut rng),
                        type_url: rng.pick(&TYPES).to_string(),
                        resource_names_subscribe: names(&mut rng),
                        resource_names_unsubscribe: names(&mut rng),
                        initial_resource_versions: initial,
                        response_nonce: nonce(&mut rng, &sent),
                        error_detail: error(&mut rng),
                        ..Default::default()
                    };
                    match s.on_request(req, now) {
                        Ok(step) => step,
                        Err(_) => break,
                    }
                }
            };
            for r in &step.responses {
                assert!(!r.nonce.is_empty() && ResourceType::from_type_url(&r.type_url).is_some(), "{r:?}");
                for res in &r.resources {
                    assert!(!r.removed_resources.contains(&res.name), "{} both sent and removed", res.name);
                }
                sent.push(r.nonce.clone());
            }
        }
    }
}
