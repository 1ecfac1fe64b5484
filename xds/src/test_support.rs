//! What the protocol state machines' unit tests share.

use std::{path::Path, sync::Arc};

use filterplane_config::NodeFacts;

use crate::snapshot::{Generation, Snapshot};

/// A snapshot holding one header-mutation extension config per (name, header value).
pub fn snapshot(entries: &[(&str, &str)]) -> Arc<Snapshot> {
    let mut yaml = String::from("version: 1\nextension_configs:\n");
    for (name, value) in entries {
        yaml.push_str(&format!(
            "  - name: {name}\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-plugin, value: \"{value}\" }} }} }} ] }}\n"
        ));
    }
    let parsed = filterplane_config::load::parse_file(Path::new("test.yaml"), &yaml).expect("test YAML parses");
    let config = filterplane_config::compile(&[parsed]).expect("test YAML compiles");
    Generation::new(config).snapshot_for(&NodeFacts::default())
}

/// A snapshot serving listener `l` with the extension configs `entries` (name, header
/// value); those named in `placed` are placed into its HTTP filter chain, the others are
/// left for a bootstrap listener to refer to.
pub fn listener_snapshot(entries: &[(&str, &str)], placed: &[&str]) -> Arc<Snapshot> {
    let yaml = listener_yaml(entries, placed);
    let parsed = filterplane_config::load::parse_file(Path::new("test.yaml"), &yaml).expect("test YAML parses");
    let config = filterplane_config::compile(&[parsed]).expect("test YAML compiles");
    Generation::new(config).snapshot_for(&NodeFacts::default())
}

/// The config of `listener_snapshot`, ending in its listeners' section.
pub fn listener_yaml(entries: &[(&str, &str)], placed: &[&str]) -> String {
    let mut yaml = String::from("version: 1\nextension_configs:\n");
    for (name, value) in entries {
        let placement = if placed.contains(name) { "    placement: { listeners: [l] }\n" } else { "" };
        yaml.push_str(&format!(
            "  - name: {name}\n{placement}    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-plugin, value: \"{value}\" }} }} }} ] }}\n"
        ));
    }
    yaml.push_str(
        "listeners:\n  - name: l\n    address: { socket_address: { address: 127.0.0.1, port_value: 10000 } }\n    filter_chains:\n      - filters:\n          - name: envoy.filters.network.http_connection_manager\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n              stat_prefix: l\n              route_config: { name: r }\n              http_filters:\n                - name: envoy.filters.http.router\n                  typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }\n",
    );
    yaml
}

/// A snapshot with one Wasm plugin `w` whose module (SHA-256 `sha`) Envoy downloads
/// itself (remote delivery), and a plain extension config `plain`.
pub fn remote_wasm_snapshot(sha: &str) -> Arc<Snapshot> {
    use filterplane_config::wasm::{build_wasm_resource, WasmCode, WasmPlugin};
    let yaml = "version: 1\nextension_configs:\n  - name: plain\n    typed_config: { \"@type\": type.googleapis.com/google.protobuf.StringValue, value: x }\n";
    let parsed = filterplane_config::load::parse_file(Path::new("test.yaml"), yaml).expect("test YAML parses");
    let config = filterplane_config::compile(&[parsed]).expect("test YAML compiles");
    let spec = serde_yaml::from_str(&format!("{{name: w, url: 'http://127.0.0.1:1/m.wasm', sha256: '{sha}'}}"))
        .expect("test plugin parses");
    let origin =
        filterplane_config::Origin { file: "test.yaml".into(), line: None.into(), path: "wasm_plugins[0]".into() };
    let plugin = WasmPlugin::from_spec(&spec, Path::new("."), origin).expect("test plugin is valid");
    let code = WasmCode::Remote { uri: "http://127.0.0.1:1/modules", cluster: "modules" };
    let config = config.with_resources(vec![Arc::new(build_wasm_resource(&plugin, code, sha))]);
    Generation::new(config).snapshot_for(&NodeFacts::default())
}

/// A snapshot with route config `r` sending everything to cluster `to`, and the static
/// clusters `clusters`.
pub fn route_snapshot(to: &str, clusters: &[&str]) -> Arc<Snapshot> {
    let mut yaml = format!(
        "version: 1\nroutes:\n  - name: r\n    virtual_hosts: [ {{ name: all, domains: [\"*\"], routes: [ {{ match: {{ prefix: \"/\" }}, route: {{ cluster: {to} }} }} ] }} ]\nclusters:\n"
    );
    for c in clusters {
        yaml.push_str(&format!(
            "  - name: {c}\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment: {{ cluster_name: {c}, endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 1 }} }} }} }} ] }} ] }}\n"
        ));
    }
    let parsed = filterplane_config::load::parse_file(Path::new("test.yaml"), &yaml).expect("test YAML parses");
    let config = filterplane_config::compile(&[parsed]).expect("test YAML compiles");
    Generation::new(config).snapshot_for(&NodeFacts::default())
}

/// The time a step happens at: the tests' one clock read.
#[allow(clippy::disallowed_methods)]
pub fn now() -> std::time::Instant {
    std::time::Instant::now()
}
