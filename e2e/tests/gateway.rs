//! The gateway example: listeners, routes, clusters and endpoints served from the YAML to
//! an Envoy whose bootstrap holds only the way to Filterplane, and plugins placed into
//! the listener's filter chain by phase.

use std::{fs, time::Duration};

use filterplane_e2e::{
    example_bootstrap, free_port,
    gateway::{edge_filters, gateway_config, http_filters, names},
    wait_until, Envoy, EnvoyPorts, Filterplane,
};

const WAIT: Duration = Duration::from_secs(15);
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

fn without_plugins(config: &str) -> String {
    let start = config.find("extension_configs:").expect("the example has plugins");
    let end = config.find("\nlisteners:").expect("the example has listeners");
    format!("{}{}", &config[..start], &config[end + 1..])
}

#[test]
fn gateway_serves_everything_and_places_plugins_by_phase() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    let (xds_port, admin_port) = (free_port(), free_port());
    let ports = EnvoyPorts::new(xds_port);
    let config = gateway_config(&ports, admin_port);
    fs::write(&yaml, without_plugins(&config)).unwrap();
    let fp = Filterplane::start_on(&yaml, dir.path(), xds_port, admin_port);
    let envoy = Envoy::start(&example_bootstrap("gateway/envoy.yaml", ports, "gateway"), ports, dir.path(), "envoy");

    // Listener, route, cluster and endpoints all came over ADS.
    let hello = wait_until("the served listener to answer", WAIT, || envoy.get("/").filter(|r| r.status == 200));
    assert_eq!(hello.body, "hello from the gateway\n");
    assert!(hello.header("x-served-by").is_none());
    let backend = wait_until("the EDS backend", WAIT, || envoy.get("/backend/healthz").filter(|r| r.status == 200));
    assert_eq!(backend.body, "ok\n");
    assert_eq!(http_filters(&envoy), ["envoy.filters.http.router"]);

    // Adding the plugins inserts them by phase: AUTHZ first, the default phase before the router.
    fs::write(&yaml, &config).unwrap();
    wait_until("the plugins in Envoy's listener", WAIT, || {
        (http_filters(&envoy) == ["block-flagged", "stamp-response", "envoy.filters.http.router"]).then_some(())
    });
    wait_until("x-served-by through Envoy", WAIT, || {
        envoy.get("/").filter(|r| r.header("x-served-by") == Some("filterplane-gateway"))
    });
    // Filterplane's own dump of what this proxy is served shows the same chain.
    let dump = fp.api("/api/v1/config_dump?node_id=gateway");
    let edge =
        dump["resources"].as_array().unwrap().iter().find(|r| r["name"] == "edge" && r["type_url"] == LDS).unwrap();
    let served: Vec<&str> = edge["resource"]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(served, ["block-flagged", "stamp-response", "envoy.filters.http.router"]);
    let blocked = envoy.get_with("/", &[("x-blocked", "1")]).expect("answer");
    assert_eq!(blocked.status, 403, "the AUTHZ plugin denies flagged requests");

    // Changing only a plugin's config goes over ECDS; the listener is not touched.
    let lds_before = fp.api("/api/v1/proxies/gateway")[0]["types"][LDS]["sent_version"].clone();
    assert!(lds_before.is_string(), "{lds_before}");
    let modified = envoy.stat("listener_manager.listener_modified");
    let drained = envoy.stat("listener_manager.total_filter_chains_draining");
    fs::write(&yaml, config.replace("value: filterplane-gateway", "value: changed")).unwrap();
    wait_until("the new header value", WAIT, || envoy.get("/").filter(|r| r.header("x-served-by") == Some("changed")));
    assert_eq!(fp.api("/api/v1/proxies/gateway")[0]["types"][LDS]["sent_version"], lds_before, "no LDS push");
    assert_eq!(envoy.stat("listener_manager.listener_modified"), modified, "the listener was not modified");
    assert_eq!(envoy.stat("listener_manager.total_filter_chains_draining"), drained);

    // Removing the plugins takes them out of the chain.
    fs::write(&yaml, without_plugins(&config)).unwrap();
    wait_until("the plugins to leave the listener", WAIT, || {
        (http_filters(&envoy) == ["envoy.filters.http.router"]).then_some(())
    });
    let plain = envoy.get_with("/", &[("x-blocked", "1")]).expect("answer");
    assert_eq!(plain.status, 200);
    assert!(plain.header("x-served-by").is_none());
}

/// A network filter placed into the served listener's filter chain, ahead of the HTTP
/// connection manager, discovered over ECDS like the HTTP ones.
#[test]
fn network_filter_is_placed_before_the_terminal_filter() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    let (xds_port, admin_port) = (free_port(), free_port());
    let ports = EnvoyPorts::new(xds_port);
    let config = gateway_config(&ports, admin_port).replace(
            "extension_configs:\n",
            "extension_configs:\n  - name: conn-limit\n    placement: { listeners: [edge] }\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit\n      stat_prefix: conn_limit\n      token_bucket: { max_tokens: 1000, tokens_per_fill: 1000, fill_interval: 1s }\n",
        );
    fs::write(&yaml, &config).unwrap();
    let _fp = Filterplane::start_on(&yaml, dir.path(), xds_port, admin_port);
    let envoy = Envoy::start(&example_bootstrap("gateway/envoy.yaml", ports, "net"), ports, dir.path(), "envoy");
    wait_until("the network filter in Envoy's listener", WAIT, || {
        (names(&edge_filters(&envoy)) == ["conn-limit", "envoy.filters.network.http_connection_manager"]).then_some(())
    });
    let r = wait_until("a response through the chain", WAIT, || envoy.get("/").filter(|r| r.status == 200));
    assert_eq!(r.header("x-served-by"), Some("filterplane-gateway"));
    wait_until("the ECDS network filter config applied", WAIT, || {
        envoy.stat("extension_config_discovery.network_filter.conn-limit.update_success").filter(|n| *n >= 1)
    });
}
