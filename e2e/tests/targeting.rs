//! Node selectors and the standalone ECDS service, against real Envoys.

use std::{fs, path::Path, time::Duration};

use filterplane_e2e::{example_bootstrap, wait_until, Envoy, EnvoyPorts, Filterplane};

const WAIT: Duration = Duration::from_secs(15);

fn example(name: &str) -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name)).unwrap()
}

fn header_of(envoy: &Envoy) -> Option<String> {
    envoy.get("/")?.header("x-plugin").map(str::to_owned)
}

fn wait_for(envoy: &Envoy, value: &str) {
    wait_until(&format!("x-plugin: {value}"), WAIT, || (header_of(envoy).as_deref() == Some(value)).then_some(()));
}

#[test]
fn selector_gives_a_canary_cluster_its_own_version_of_the_same_filter() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    let stable = example("quickstart/filterplane.yaml");
    let entries = stable.split_once("extension_configs:\n").unwrap().1;
    let canary = entries
        .replace("value: v1", "value: canary")
        .replace("    typed_config:", "    node_selector: { clusters: [canary] }\n    typed_config:");
    fs::write(&yaml, stable.replace(entries, &format!("{canary}{entries}"))).unwrap();

    let fp = Filterplane::start(&yaml, dir.path());
    let start = |name: &str, cluster: &str| {
        let ports = EnvoyPorts::new(fp.xds_port);
        let boot = example_bootstrap("quickstart/envoy.yaml", ports, name)
            .replace("cluster: quickstart", &format!("cluster: {cluster}"));
        Envoy::start(&boot, ports, dir.path(), name)
    };
    let a = start("envoy-canary", "canary");
    let b = start("envoy-stable", "stable");
    wait_for(&a, "canary");
    wait_for(&b, "v1");

    // Changing only the stable entry pushes only to the stable proxy.
    let before = fp.api("/api/v1/proxies/envoy-canary")[0]["types"]
        ["type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"]["sent_nonce"]
        .clone();
    let text = fs::read_to_string(&yaml).unwrap();
    let (head, tail) = text.rsplit_once("value: v1").unwrap();
    fs::write(&yaml, format!("{head}value: v2{tail}")).unwrap();
    wait_for(&b, "v2");
    assert_eq!(header_of(&a).as_deref(), Some("canary"));
    let after = fp.api("/api/v1/proxies/envoy-canary")[0]["types"]
        ["type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"]["sent_nonce"]
        .clone();
    assert_eq!(before, after, "the canary proxy was not pushed anything");
}

#[test]
fn standalone_ecds_service_serves_envoy_without_ads() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    fs::write(&yaml, example("quickstart/filterplane.yaml")).unwrap();
    let fp = Filterplane::start(&yaml, dir.path());
    let ports = EnvoyPorts::new(fp.xds_port);
    let ads = "config_source: { ads: {}, resource_api_version: V3 }";
    let boot = example_bootstrap("quickstart/envoy.yaml", ports, "ecds-only");
    assert!(boot.contains(ads));
    let boot = boot.replace(
        ads,
        "config_source: { resource_api_version: V3, api_config_source: { api_type: GRPC, transport_api_version: V3, grpc_services: [ { envoy_grpc: { cluster_name: filterplane } } ] } }",
    );
    let envoy = Envoy::start(&boot, ports, dir.path(), "envoy");
    wait_for(&envoy, "v1");
    fs::write(&yaml, example("quickstart/filterplane.yaml").replace("value: v1", "value: v2")).unwrap();
    wait_for(&envoy, "v2");
    // Two streams from this node: the (idle) ADS one and the ECDS one.
    let streams = fp.api("/api/v1/proxies/ecds-only");
    assert!(streams.as_array().unwrap().iter().any(|s| {
        s["types"]["type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"]["acked_version"].is_string()
    }));
}
