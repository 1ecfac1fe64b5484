//! Istio users' documents as Istio's docs write them, served to a real Envoy: a
//! TrafficExtension with inline Lua and one with a Wasm module from an http(s) URL without
//! a digest (fetched again at each reload, as `imagePullPolicy: Always` says), and an
//! EnvoyFilter inserted `INSERT_BEFORE` without a `subFilter` (the front of the chain) for
//! the proxies whose Envoy version its `proxyVersion` matches. And the quickstart's own
//! topology: a document no served listener takes is served over ECDS for the bootstrap's
//! listener, and `validate`, the API and the log say nothing was placed.

use std::{fs, process::Command, time::Duration};

use filterplane_e2e::{
    direct_response_listener, example_bootstrap, filterplane_bin, free_port,
    services::{header_module, sha256_hex, FileServer},
    wait_until, Envoy, EnvoyPorts, Filterplane,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn istio_docs(port: u16, module_url: &str) -> String {
    format!(
        r#"apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata:
  name: conditional-header-modifier
  namespace: istio-ingress
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  match:
  - mode: CLIENT
    ports:
    - number: {port}
  phase: AUTHN
  priority: 1000
  lua:
    inlineCode: |
      function envoy_on_response(response_handle)
        response_handle:headers():add("x-lua", "from-lua")
      end
---
apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata:
  name: openid-connect
  namespace: istio-ingress
spec:
  selector:
    matchLabels:
      istio: ingressgateway
  phase: AUTHN
  wasm:
    url: {module_url}
    imagePullPolicy: Always
    pluginConfig:
      openid_server: authn
---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: front-stamp
  namespace: istio-system
spec:
  workloadSelector:
    labels:
      istio: ingressgateway
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: GATEWAY
        proxy:
          proxyVersion: '^1\.40.*'
        listener:
          filterChain:
            filter:
              name: "envoy.filters.network.http_connection_manager"
      patch:
        operation: INSERT_BEFORE
        value:
          name: front-stamp
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
            mutations:
              response_mutations:
                - append: {{ header: {{ key: x-front, value: "yes" }} }}
---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: old-proxies-only
  namespace: istio-system
spec:
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: ANY
        proxy:
          proxyVersion: '^1\.39\.'
      patch:
        operation: INSERT_FIRST
        value:
          name: old-stamp
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
            mutations:
              response_mutations:
                - append: {{ header: {{ key: x-old, value: "yes" }} }}
"#
    )
}

fn header(envoy: &Envoy, name: &str) -> Option<String> {
    envoy.get("/").and_then(|r| r.header(name).map(str::to_owned))
}

fn entry<'a>(config: &'a Value, name: &str) -> &'a Value {
    config["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {config}"))
}

#[test]
fn traffic_extensions_and_an_envoy_filter_as_istio_writes_them_run_in_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let (conf, modules) = (dir.path().join("conf"), dir.path().join("modules"));
    fs::create_dir(&conf).unwrap();
    fs::create_dir(&modules).unwrap();
    fs::write(modules.join("openid.wasm"), header_module("wasm-v1")).unwrap();
    let server = FileServer::start(&modules, dir.path());
    let xds = free_port();
    let ports = EnvoyPorts::new(xds);
    let listener = format!("version: 1\nlisteners:\n{}", direct_response_listener("edge", "gw", ports.listener));
    fs::write(conf.join("listeners.yaml"), listener).unwrap();
    let docs = istio_docs(ports.listener, &format!("{}/openid.wasm", server.url));
    fs::write(conf.join("istio.yaml"), &docs).unwrap();
    let fp = Filterplane::start_with_args(&conf, dir.path(), xds, free_port(), &[]);
    let bootstrap = example_bootstrap("gateway/envoy.yaml", ports, "gw")
        .replace("  cluster: gateway\n", "  cluster: gateway\n  metadata: { LABELS: { istio: ingressgateway } }\n");
    let envoy = Envoy::start(&bootstrap, ports, dir.path(), "gw");

    wait_until("Lua, Wasm and the EnvoyFilter in Envoy", WAIT, || {
        let r = envoy.get("/")?;
        (r.header("x-lua") == Some("from-lua")
            && r.header("x-wasm") == Some("wasm-v1")
            && r.header("x-front") == Some("yes"))
        .then_some(())
    });
    assert_eq!(header(&envoy, "x-old"), None, "proxyVersion ^1.39 does not match Envoy 1.40");

    // INSERT_BEFORE without a subFilter: at the front of the chain, as Istio inserts it;
    // the Lua filter (AUTHN, priority 1000) and the Wasm one (AUTHN) by phase and priority.
    let dump = fp.api("/api/v1/config_dump?node_id=gw");
    let listener = dump["resources"].as_array().unwrap().iter().find(|r| r["name"] == "edge").unwrap();
    let filters: Vec<&str> = listener["resource"]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(filters.last(), Some(&"envoy.filters.http.router"), "{filters:?}");
    assert_eq!(filters.len(), 4, "{filters:?}");
    for name in ["front-stamp", "istio-ingress.conditional-header-modifier", "istio-ingress.openid-connect"] {
        assert!(filters[..3].contains(&name), "{filters:?}");
    }

    // The module's author pinned no digest: served pinned to what was fetched, and said so.
    let config = fp.api("/api/v1/config");
    let module = &entry(&config, "istio-ingress.openid-connect")["module"];
    assert_eq!(module["pinned"], false, "{module}");
    assert_eq!(module["sha256"], sha256_hex(&header_module("wasm-v1")), "{module}");
    assert_eq!(
        entry(&config, "istio-ingress.conditional-header-modifier")["config_type_url"],
        "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
    );

    // imagePullPolicy: Always: fetched again at the next reload.
    fs::write(modules.join("openid.wasm"), header_module("wasm-v2")).unwrap();
    fs::write(conf.join("istio.yaml"), format!("# reloaded\n{docs}")).unwrap();
    wait_until("the module fetched again", WAIT, || (header(&envoy, "x-wasm")? == "wasm-v2").then_some(()));
    assert_eq!(header(&envoy, "x-lua").as_deref(), Some("from-lua"));
}

const BOOTSTRAP_ONLY: &str = r#"apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata:
  name: lua-stamp
spec:
  lua:
    inlineCode: |
      function envoy_on_response(response_handle)
        response_handle:headers():add("x-lua", "bootstrap")
      end
"#;

#[test]
fn a_document_no_served_listener_takes_reaches_the_bootstraps_listener_and_is_noted() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("istio.yaml");
    fs::write(&yaml, BOOTSTRAP_ONLY).unwrap();

    let out = Command::new(filterplane_bin()).args(["validate", "--config"]).arg(&yaml).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("note: ") && text.contains("istio.yaml:5: spec: placed in no listener"), "{text}");

    let fp = Filterplane::start(&yaml, dir.path());
    let ports = EnvoyPorts::new(fp.xds_port);
    // The quickstart's bootstrap, its listener discovering the Lua filter by Istio's name.
    let bootstrap = example_bootstrap("quickstart/envoy.yaml", ports, "quickstart-envoy")
        .replace("- name: add-header", "- name: default.lua-stamp")
        .replace(
            "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        );
    let envoy = Envoy::start(&bootstrap, ports, dir.path(), "envoy");
    wait_until("the Lua filter in the bootstrap's listener", WAIT, || {
        (header(&envoy, "x-lua")? == "bootstrap").then_some(())
    });
    let config = fp.api("/api/v1/config");
    assert!(
        entry(&config, "default.lua-stamp")["notice"].as_str().unwrap().contains("placed in no listener"),
        "{config}"
    );
    assert_eq!(config["notices"][0]["line"], 5, "{config}");
    assert!(fp.log_text().contains("config note"));
}
