//! Micro-benchmarks of the hot paths: compiling a config, building and encoding one
//! proxy's response, and the per-push work across many streams (everything but the send).
//! `cargo bench -p filterplane-server`.

#![allow(clippy::disallowed_methods)] // a test drives the machines with the real clock

use std::{hint::black_box, path::Path, sync::Arc};

use criterion::{criterion_group, criterion_main, Criterion};
use filterplane_api::{
    envoy_types::pb::envoy::{config::core::v3::Node, service::discovery::v3::DiscoveryRequest},
    ResourceType,
};
use filterplane_config::NodeFacts;
use filterplane_xds::{snapshot::Generation, sotw::SotwStream};

/// `n` header-mutation configs, each about 1 KiB.
fn yaml(n: usize, tag: &str) -> String {
    let filler = "x".repeat(900);
    let mut y = String::from("version: 1\nextension_configs:\n");
    for i in 0..n {
        y.push_str(&format!(
            "  - name: cfg-{i}\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-{i}, value: \"{tag}{filler}\" }} }} }} ] }}\n"
        ));
    }
    y
}

fn generation(n: usize, tag: &str) -> Generation {
    let parsed = filterplane_config::load::parse_file(Path::new("bench.yaml"), &yaml(n, tag)).expect("valid");
    Generation::new(filterplane_config::compile(&[parsed]).expect("compiles"))
}

fn request(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node { id: "bench".into(), ..Default::default() }),
        type_url: ResourceType::ExtensionConfig.type_url().into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn benches(c: &mut Criterion) {
    let text = yaml(100, "a");
    c.bench_function("compile 100 extension configs", |b| {
        b.iter(|| {
            let parsed =
                filterplane_config::load::parse_file(Path::new("bench.yaml"), black_box(&text)).expect("valid");
            black_box(filterplane_config::compile(&[parsed]).expect("compiles"))
        })
    });

    let g1 = generation(1, "a");
    let g2 = generation(1, "b");
    let facts = NodeFacts::default();
    c.bench_function("snapshot_for (cached group)", |b| b.iter(|| black_box(g1.snapshot_for(black_box(&facts)))));

    let (s1, s2) = (g1.snapshot_for(&facts), g2.snapshot_for(&facts));
    c.bench_function("one stream: push a 1 KiB config and encode it", |b| {
        let mut stream = SotwStream::new(None, "bench");
        stream.on_snapshot(s1.clone(), now());
        let first = stream.on_request(request(&["cfg-0"]), now()).expect("ok");
        assert_eq!(first.responses.len(), 1);
        let mut flip = false;
        b.iter(|| {
            flip = !flip;
            let step = stream.on_snapshot_wire(if flip { s2.clone() } else { s1.clone() }, now());
            black_box(step.responses.into_iter().map(|w| w.into_grpc()).collect::<Vec<_>>())
        })
    });

    // The per-push work for 1,000 streams: look up the group's snapshot, decide and write
    // the response (sending happens per connection and is not here).
    let mut streams: Vec<SotwStream> = (0..1000)
        .map(|_| {
            let mut s = SotwStream::new(None, "bench");
            s.on_snapshot(s1.clone(), now());
            s.on_request(request(&["cfg-0"]), now()).expect("ok");
            s
        })
        .collect();
    let gens = [Arc::new(g1), Arc::new(g2)];
    let mut flip = false;
    c.bench_function("fan-out: 1,000 streams, one change", |b| {
        b.iter(|| {
            flip = !flip;
            let g = &gens[usize::from(flip)];
            for s in streams.iter_mut() {
                black_box(s.on_snapshot_wire(g.snapshot_for(&facts), now()));
            }
        })
    });
}

criterion_group!(hot_paths, benches);
criterion_main!(hot_paths);

/// The time a step happens at: read once, so the benchmarks time the machines, not the
/// clock (the server reads it once per new configuration, not per stream).
fn now() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}
