//! Where placed filters land in a chain.

use serde_json::json;

use super::*;

fn placement(name: &str, phase: Phase, priority: i32) -> Placement {
    Placement {
        filter_name: name.into(),
        chain: ChainKind::Http,
        listeners: vec![],
        ports: vec![],
        route_configs: vec![],
        phase,
        priority,
        type_url: "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation".into(),
        default_config: None,
        apply_default_config_without_warming: false,
        implied: false,
    }
}

fn listener(name: &str, port: u64, route_config: &str, own: &[&str]) -> Value {
    let mut filters: Vec<Value> = own.iter().map(|n| json!({ "name": n })).collect();
    filters.push(json!({ "name": "envoy.filters.http.router" }));
    json!({
        "name": name,
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": port } },
        "filter_chains": [ { "filters": [ {
            "name": "hcm",
            "typed_config": { "@type": HCM_TYPE, "rds": { "route_config_name": route_config }, "http_filters": filters },
        } ] } ],
    })
}

fn http_filter_names(l: &Value) -> Vec<String> {
    l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn phases_order_the_chain_and_priority_orders_a_phase() {
    let ps = [
        placement("late", Phase::Unspecified, 0),
        placement("stats", Phase::Stats, 0),
        placement("authz", Phase::Authz, 0),
        placement("authn-low", Phase::Authn, 1),
        placement("authn-high", Phase::Authn, 5),
        placement("authn-b", Phase::Authn, 1),
    ];
    let refs: Vec<&Placement> = ps.iter().collect();
    let placed = place(&listener("edge", 10000, "r", &["own"]), &refs).unwrap();
    assert_eq!(
        http_filter_names(&placed.listener),
        ["authn-high", "authn-b", "authn-low", "authz", "stats", "own", "late", "envoy.filters.http.router"]
    );
    assert_eq!(placed.hits, [1; 6]);
    // The same placements in another order give the same chain.
    let reversed: Vec<&Placement> = ps.iter().rev().collect();
    assert_eq!(place(&listener("edge", 10000, "r", &["own"]), &reversed).unwrap().listener, placed.listener);
}

#[test]
fn discovered_filter_asks_ads_for_exactly_its_type() {
    let mut p = placement("x", Phase::Unspecified, 0);
    p.default_config = Some(json!({ "@type": p.type_url.clone() }));
    p.apply_default_config_without_warming = true;
    let placed = place(&listener("edge", 1, "r", &[]), &[&p]).unwrap();
    let f = &placed.listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0];
    assert_eq!(f["name"], "x");
    assert_eq!(f["config_discovery"]["config_source"], json!({ "ads": {}, "resource_api_version": "V3" }));
    assert_eq!(f["config_discovery"]["type_urls"], json!([p.type_url]));
    assert_eq!(f["config_discovery"]["apply_default_config_without_warming"], true);
    assert!(f["config_discovery"]["default_config"].is_object());
}

#[test]
fn targets_by_listener_port_and_route_config() {
    let mut by_name = placement("by-name", Phase::Unspecified, 0);
    by_name.listeners = vec!["other".into()];
    let mut by_port = placement("by-port", Phase::Unspecified, 0);
    by_port.ports = vec![10000];
    let mut by_rc = placement("by-rc", Phase::Unspecified, 0);
    by_rc.route_configs = vec!["r".into()];
    let placed = place(&listener("edge", 10000, "r", &[]), &[&by_name, &by_port, &by_rc]).unwrap();
    assert_eq!(http_filter_names(&placed.listener), ["by-port", "by-rc", "envoy.filters.http.router"]);
    assert_eq!(placed.hits, [0, 1, 1]);
}

#[test]
fn same_name_in_one_chain_is_an_error() {
    let errs = place(&listener("edge", 1, "r", &["dup"]), &[&placement("dup", Phase::Authn, 0)]).unwrap_err();
    assert_eq!(errs[0].0, "filter_chains[0].filters[0].typed_config.http_filters");
    assert!(errs[0].1.contains("already has a filter named \"dup\""), "{errs:?}");
}

#[test]
fn chain_kind_follows_the_type() {
    assert_eq!(chain_of_type("type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"), Some(ChainKind::Http));
    assert_eq!(
        chain_of_type("type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"),
        Some(ChainKind::Network)
    );
    assert_eq!(chain_of_type("type.googleapis.com/google.protobuf.Struct"), None);
}

#[test]
fn network_filters_go_before_the_terminal_filter() {
    let mut p = placement("net", Phase::Unspecified, 0);
    p.chain = ChainKind::Network;
    let l = listener("edge", 1, "r", &[]);
    let placed = place(&l, &[&p]).unwrap();
    let names: Vec<&str> = placed.listener["filter_chains"][0]["filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["net", "hcm"]);
}
