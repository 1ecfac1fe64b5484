//! Routine changes under traffic: clients hold keep-alive connections through a real
//! Envoy (started with a short `--drain-time-s`) while a placed HTTP filter and a placed
//! network filter are edited, removed and added back, over SotW and delta. Every response
//! must be a 200, and each change must be visible afterwards.

use std::{fs, time::Duration};

use filterplane_e2e::{
    example_bootstrap, free_port,
    gateway::{edge_filters, gateway_config, http_filters, names},
    traffic::{Tally, Traffic},
    wait_until, Envoy, EnvoyPorts, Filterplane,
};

const WAIT: Duration = Duration::from_secs(20);
const DRAIN_SECS: &str = "2";
const CLIENTS: usize = 4;
const ECDS: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

/// A network filter placed ahead of the connection manager, with a bucket no test
/// connection rate empties.
const CONN_LIMIT: &str = "  - name: conn-limit\n    placement: { listeners: [edge] }\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit\n      stat_prefix: conn_limit\n      token_bucket: { max_tokens: 100000, tokens_per_fill: 100000, fill_interval: 1s }\n";

/// The text of the entry named `name` in `config`: from its `- name:` line to the next
/// entry or section.
fn entry<'a>(config: &'a str, name: &str) -> &'a str {
    let start = config.find(&format!("  - name: {name}\n")).unwrap_or_else(|| panic!("no entry {name}"));
    let rest = &config[start + 1..];
    let end = rest.find("\n  - name: ").into_iter().chain(rest.find("\nlisteners:")).min().expect("an end");
    &config[start..start + 1 + end + 1]
}

fn without(config: &str, name: &str) -> String {
    config.replacen(entry(config, name), "", 1)
}

struct Gateway {
    fp: Filterplane,
    envoy: Envoy,
    yaml: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn start(config: impl Fn(&EnvoyPorts, u16) -> String, api_type: &str, node: &str) -> (Self, String) {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("filterplane.yaml");
        let (xds_port, admin_port) = (free_port(), free_port());
        let ports = EnvoyPorts::new(xds_port);
        let text = config(&ports, admin_port);
        fs::write(&yaml, &text).unwrap();
        let fp = Filterplane::start_on(&yaml, dir.path(), xds_port, admin_port);
        let bootstrap = example_bootstrap("gateway/envoy.yaml", ports, node)
            .replace("api_type: GRPC", &format!("api_type: {api_type}"));
        let envoy = Envoy::start_with_args(&bootstrap, ports, dir.path(), "envoy", &["--drain-time-s", DRAIN_SECS]);
        (Gateway { fp, envoy, yaml, _dir: dir }, text)
    }

    fn write(&self, text: &str) {
        fs::write(&self.yaml, text).unwrap();
    }

    /// Waits until the proxy has ACKed the listeners it was last sent. (Other types may
    /// wait longer on purpose: a removed cluster is held while a drain may use it.)
    fn wait_listeners_synced(&self) {
        const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
        wait_until("the listeners ACKed", WAIT, || {
            let proxies = self.fp.api("/api/v1/proxies");
            (proxies.as_array()?.first()?["types"][LDS]["state"] == "synced").then_some(())
        });
    }

    /// Waits until Envoy has no listener or filter chain draining: the change is done
    /// with, old connections included.
    fn wait_drained(&self) {
        wait_until("Envoy's drains to end", WAIT, || {
            let listeners = self.envoy.stat("listener_manager.total_listeners_draining")?;
            let chains = self.envoy.stat("listener_manager.total_filter_chains_draining")?;
            (listeners == 0 && chains == 0).then_some(())
        });
    }
}

fn served_by(envoy: &Envoy) -> Option<String> {
    envoy.get("/").and_then(|r| r.header("x-served-by").map(str::to_owned))
}

/// Runs one change under traffic: `change`, then `done` until it holds, then until every
/// drain is over. Returns what the clients saw meanwhile.
fn phase(gw: &Gateway, traffic: &Traffic, what: &str, change: impl FnOnce(), done: impl Fn() -> bool) -> Tally {
    traffic.take();
    change();
    wait_until(what, WAIT, || done().then_some(()));
    // A drain starts when Envoy applies a listener, before it ACKs it: once the listeners
    // are ACKed, any drain the change started is counted.
    gw.wait_listeners_synced();
    gw.wait_drained();
    let tally = traffic.take();
    println!("{what}: {tally}");
    tally
}

fn placed_filter_changes_under_traffic(api_type: &str, node: &str) {
    let (gw, config) = Gateway::start(
        |p, a| gateway_config(p, a).replace("extension_configs:\n", &format!("extension_configs:\n{CONN_LIMIT}")),
        api_type,
        node,
    );
    wait_until("the gateway with its plugins", WAIT, || {
        (served_by(&gw.envoy).as_deref() == Some("filterplane-gateway")
            && names(&edge_filters(&gw.envoy)) == ["conn-limit", "envoy.filters.network.http_connection_manager"])
        .then_some(())
    });
    let traffic = Traffic::start(gw.envoy.listener_port, CLIENTS, "/", "x-served-by");
    let mut results: Vec<(&str, Tally)> = Vec::new();

    // The HTTP filter: edit (ECDS only), remove (LDS, and for delta an ECDS removal),
    // add back.
    let edited = config.replace("value: filterplane-gateway", "value: edited");
    results.push((
        "HTTP filter edited",
        phase(
            &gw,
            &traffic,
            "HTTP filter edited",
            || gw.write(&edited),
            || served_by(&gw.envoy).as_deref() == Some("edited"),
        ),
    ));
    let removed = without(&edited, "stamp-response");
    results.push((
        "HTTP filter removed",
        phase(
            &gw,
            &traffic,
            "HTTP filter removed",
            || gw.write(&removed),
            || !http_filters(&gw.envoy).iter().any(|f| f == "stamp-response") && served_by(&gw.envoy).is_none(),
        ),
    ));
    // Once the old listener drained away, Envoy unsubscribed the filter's config by itself
    // (over delta, that is what ended Filterplane's hold on its removal).
    wait_until("Envoy to unsubscribe stamp-response", WAIT, || {
        let proxy = gw.fp.api(&format!("/api/v1/proxies/{node}"));
        let subscribed = proxy[0]["types"][ECDS]["subscribed"].as_array().cloned().unwrap_or_default();
        (!subscribed.is_empty() && !subscribed.iter().any(|n| n == "stamp-response")).then_some(())
    });
    results.push((
        "HTTP filter added back",
        phase(
            &gw,
            &traffic,
            "HTTP filter added back",
            || gw.write(&edited),
            || served_by(&gw.envoy).as_deref() == Some("edited"),
        ),
    ));

    // The network filter, the same three changes.
    let applied =
        |n: u64| gw.envoy.stat("extension_config_discovery.network_filter.conn-limit.update_success") >= Some(n);
    let before = gw.envoy.stat("extension_config_discovery.network_filter.conn-limit.update_success").unwrap_or(0);
    let net_edited = edited.replace("max_tokens: 100000", "max_tokens: 200000");
    results.push((
        "network filter edited",
        phase(&gw, &traffic, "network filter edited", || gw.write(&net_edited), || applied(before + 1)),
    ));
    let net_removed = without(&net_edited, "conn-limit");
    let chain = || names(&edge_filters(&gw.envoy));
    results.push((
        "network filter removed",
        phase(
            &gw,
            &traffic,
            "network filter removed",
            || gw.write(&net_removed),
            || chain() == ["envoy.filters.network.http_connection_manager"],
        ),
    ));
    results.push((
        "network filter added back",
        phase(
            &gw,
            &traffic,
            "network filter added back",
            || gw.write(&net_edited),
            || chain() == ["conn-limit", "envoy.filters.network.http_connection_manager"],
        ),
    ));
    traffic.stop();

    let rows: Vec<String> = results.iter().map(|(what, t)| format!("{api_type} {what}: {t}")).collect();
    println!("{}", rows.join("\n"));
    for (what, t) in &results {
        assert!(t.responses > 0, "{api_type} {what}: no traffic went through during the change: {t}");
        assert_eq!(t.not_ok(), 0, "{api_type} {what}: responses other than 200 during the change: {t}");
    }
    // Filterplane saw the proxy NACK nothing.
    assert_eq!(gw.fp.api("/api/v1/rejects"), serde_json::json!([]));
}

#[test]
fn placed_filter_changes_never_fail_a_request_over_sotw() {
    placed_filter_changes_under_traffic("GRPC", "traffic-sotw");
}

#[test]
fn placed_filter_changes_never_fail_a_request_over_delta() {
    placed_filter_changes_under_traffic("DELTA_GRPC", "traffic-delta");
}

/// A Wasm plugin entry placed into the gateway's listener, its module at `url`.
fn placed_wasm(url: &str, delivery: &str) -> String {
    format!(
        "wasm_plugins:\n  - name: stamp-wasm\n    url: {url}\n    delivery: {delivery}\n    placement: {{ listeners: [edge] }}\n"
    )
}

/// A placed Wasm plugin whose module cannot be had is not placed at all: the listener
/// keeps answering 200 without it, and the error is shown. Once the module is there, the
/// plugin is placed and runs, with every response a 200 meanwhile.
fn placed_wasm_plugin_under_traffic(delivery: &str, api_type: &str, node: &str) {
    // Remote delivery: the cluster Envoy downloads modules through (Filterplane's admin),
    // served over CDS like the rest of the gateway.
    let (gw, config) = Gateway::start(
        |p, admin| {
            gateway_config(p, admin).replace(
                "clusters:\n",
                &format!("clusters:\n  - name: filterplane_modules\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: filterplane_modules\n      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }} }} ] }} ]\n"),
            )
        },
        api_type,
        node,
    );
    wait_until("the gateway", WAIT, || (served_by(&gw.envoy).as_deref() == Some("filterplane-gateway")).then_some(()));
    let dir = gw.yaml.parent().unwrap().to_path_buf();
    let with_plugin = format!("{config}\n{}", placed_wasm("file://stamp.wasm", delivery));
    let traffic = Traffic::start(gw.envoy.listener_port, CLIENTS, "/", "x-wasm");

    // The module file does not exist.
    let missing = phase(
        &gw,
        &traffic,
        "placed Wasm plugin whose module is missing",
        || gw.write(&with_plugin),
        || {
            let errors = gw.fp.api("/api/v1/config")["wasm_errors"].clone();
            errors[0]["plugin"] == "stamp-wasm" && errors[0]["kind"] == "download_failure"
        },
    );
    assert!(!http_filters(&gw.envoy).iter().any(|f| f == "stamp-wasm"), "not placed: {:?}", http_filters(&gw.envoy));
    assert_eq!(gw.envoy.get("/").map(|r| r.status), Some(200));

    // The module arrives (a reload, as an operator would do after fixing it).
    fs::write(dir.join("stamp.wasm"), filterplane_e2e::services::header_module("stamped")).unwrap();
    let arrived = phase(
        &gw,
        &traffic,
        "placed Wasm plugin once its module is there",
        || gw.write(&format!("{with_plugin}    plugin_config: {{ now: there }}\n")),
        || gw.envoy.get("/").is_some_and(|r| r.header("x-wasm") == Some("stamped")),
    );
    traffic.stop();
    for (what, t) in [("module missing", &missing), ("module there", &arrived)] {
        println!("{api_type} {delivery} placed Wasm plugin, {what}: {t}");
        assert!(t.responses > 0, "{what}: no traffic: {t}");
        assert_eq!(t.not_ok(), 0, "{delivery} {what}: responses other than 200: {t}");
    }
    assert_eq!(missing.by_header.get("-"), Some(&missing.responses), "the plugin never ran while missing");
}

#[test]
fn a_placed_wasm_plugin_whose_module_cannot_be_had_is_left_out_of_the_listener() {
    placed_wasm_plugin_under_traffic("inline", "GRPC", "wasm-missing-inline");
}

#[test]
fn a_placed_remote_wasm_plugin_is_added_without_failing_a_request_over_delta() {
    placed_wasm_plugin_under_traffic("remote", "DELTA_GRPC", "wasm-remote-delta");
}

#[test]
fn a_placed_remote_wasm_plugin_is_added_without_failing_a_request_over_sotw() {
    placed_wasm_plugin_under_traffic("remote", "GRPC", "wasm-remote-sotw");
}

/// A route moved to a new cluster while the old cluster (and its endpoints) leave the
/// config in the same edit: requests on that route keep getting answers.
fn route_moved_and_old_cluster_removed(api_type: &str, node: &str) {
    let (gw, config) = Gateway::start(gateway_config, api_type, node);
    wait_until("the backend through the gateway", WAIT, || {
        gw.envoy.get("/backend/healthz").filter(|r| r.status == 200)
    });
    let admin = gw.fp.admin_port;
    let backend2 = format!("  - name: backend2\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: backend2\n      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }} }} ] }} ]\n");
    let start = config.find("\nclusters:\n").expect("clusters") + 1;
    let moved = format!(
        "{}clusters:\n{backend2}",
        config[..start]
            .replace("route: { cluster: backend, prefix_rewrite", "route: { cluster: backend2, prefix_rewrite")
    );
    let traffic = Traffic::start(gw.envoy.listener_port, CLIENTS, "/backend/healthz", "x-served-by");
    let t = phase(
        &gw,
        &traffic,
        "route moved to a new cluster, old cluster removed",
        || gw.write(&moved),
        || {
            let dump =
                gw.envoy.admin("/config_dump?resource=dynamic_active_clusters").map(|r| r.body).unwrap_or_default();
            dump.contains("\"backend2\"") && !dump.contains("\"name\": \"backend\"")
        },
    );
    traffic.stop();
    println!("{api_type} route moved, old cluster removed: {t}");
    assert!(t.responses > 0);
    assert_eq!(t.not_ok(), 0, "{api_type}: responses other than 200: {t}");
}

#[test]
fn a_route_moved_off_a_removed_cluster_never_fails_a_request_over_sotw() {
    route_moved_and_old_cluster_removed("GRPC", "cluster-sotw");
}

#[test]
fn a_route_moved_off_a_removed_cluster_never_fails_a_request_over_delta() {
    route_moved_and_old_cluster_removed("DELTA_GRPC", "cluster-delta");
}
