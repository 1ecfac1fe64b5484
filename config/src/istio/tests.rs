//! Istio documents read as Filterplane entries.

use std::path::Path;

use super::*;
use crate::model::{FailStrategy, Phase, PullSecret};

fn read(text: &str) -> Result<ParsedFile, ConfigErrors> {
    parse(Path::new("/cfg/istio.yaml"), text)
}

#[test]
fn a_wasm_plugin_becomes_a_placed_plugin_named_namespace_dot_name() {
    let p = read(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: auth\n  namespace: edge\nspec:\n  selector:\n    matchLabels: { app: gw }\n  url: oci://r/p:v1\n  imagePullSecret: pull.yaml\n  phase: AUTHN\n  priority: 10\n  match:\n    - ports: [ { number: 8080 } ]\n  pluginName: root\n  pluginConfig: { a: 1 }\n  vmConfig:\n    env:\n      - { name: A, value: b }\n      - { name: HOME, valueFrom: HOST }\n  failStrategy: FAIL_RELOAD\n",
    )
    .unwrap();
    let w = &p.doc.wasm_plugins[0];
    assert_eq!(w.name, "edge.auth");
    assert_eq!(w.node_selector.labels["app"], "gw");
    assert_eq!(w.root_id, "root");
    assert_eq!(w.fail_strategy, FailStrategy::FailReload);
    assert_eq!(w.vm_config.env["A"], "b");
    assert_eq!(w.vm_config.host_env, ["HOME"]);
    assert_eq!(w.image_pull_secret, Some(PullSecret::File("/cfg/pull.yaml".into())));
    let placement = w.placement.as_ref().unwrap();
    assert_eq!((placement.phase, placement.priority, placement.ports.clone()), (Phase::Authn, 10, vec![8080]));
    assert_eq!(p.lines.original_path("wasm_plugins[0].url"), "spec.url");
    assert_eq!(p.lines.line_of("wasm_plugins[0].url"), Some(9));
}

#[test]
fn fields_not_implemented_are_named() {
    let e = read("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: { name: x }\nspec:\n  url: oci://r/p\n  targetRefs: []\n  match: [ { mode: SERVER } ]\n")
        .unwrap_err();
    let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["spec.targetRefs", "spec.match[0].mode"], "{e}");
    assert_eq!(e.0[0].line, Some(6));
    let e = read("apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: { name: x }\nspec:\n  configPatches:\n    - applyTo: CLUSTER\n      patch: { operation: ADD, value: {} }\n").unwrap_err();
    assert_eq!(e.0[0].path, "spec.configPatches[0].applyTo");
    let e = read("apiVersion: v1\nkind: Secret\nmetadata: { name: x }\n").unwrap_err();
    assert!(e.0[0].message.contains("WasmPlugin"), "{e}");
}

#[test]
fn an_envoy_filter_serves_its_extension_configs_placed_by_its_insertions() {
    let p = read(
        r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: { name: hm, namespace: istio-system }
spec:
  workloadSelector: { labels: { istio: ingressgateway } }
  configPatches:
    - applyTo: EXTENSION_CONFIG
      patch:
        operation: ADD
        value:
          name: stamp
          typed_config: { "@type": type.googleapis.com/google.protobuf.Struct, value: {} }
    - applyTo: HTTP_FILTER
      match:
        context: GATEWAY
        listener:
          portNumber: 8080
          filterChain: { filter: { name: envoy.filters.network.http_connection_manager, subFilter: { name: envoy.filters.http.router } } }
      patch:
        operation: INSERT_BEFORE
        value: { name: stamp, config_discovery: { config_source: { ads: {} }, type_urls: [ x ] } }
"#,
    )
    .unwrap();
    let c = &p.doc.extension_configs[0];
    assert_eq!(c.name, "stamp");
    assert_eq!(c.node_selector.labels["istio"], "ingressgateway");
    let placement = c.placement.as_ref().unwrap();
    assert_eq!((placement.phase, placement.ports.clone()), (Phase::Unspecified, vec![8080]));
    assert_eq!(
        p.lines.original_path("extension_configs[0].typed_config"),
        "spec.configPatches[0].patch.value.typed_config"
    );
}

/// Compiles one document as the whole config.
fn compiled(text: &str) -> Result<crate::CompiledConfig, ConfigErrors> {
    crate::compile(&[read(text)?])
}

#[test]
fn insert_before_without_a_sub_filter_goes_to_the_front_as_istio_inserts_it() {
    let p = read(
        r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: filter-ratelimit
  namespace: istio-system
spec:
  workloadSelector:
    labels:
      istio: ingressgateway
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: GATEWAY
        listener:
          filterChain:
            filter:
              name: "envoy.filters.network.http_connection_manager"
      patch:
        operation: INSERT_BEFORE
        value:
          name: envoy.filters.http.ratelimit
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
            domain: ratelimit
"#,
    )
    .unwrap();
    let c = &p.doc.extension_configs[0];
    assert_eq!(c.placement.as_ref().unwrap().phase, Phase::Authn);
}

#[test]
fn filter_class_places_an_added_filter_by_phase() {
    let p = read(
        "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: { name: x }\nspec:\n  configPatches:\n    - applyTo: HTTP_FILTER\n      patch:\n        operation: ADD\n        filterClass: AUTHZ\n        value: { name: x, typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer, max_request_bytes: 1024 } }\n",
    )
    .unwrap();
    assert_eq!(p.doc.extension_configs[0].placement.as_ref().unwrap().phase, Phase::Authz);
    let e = read("apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: { name: x }\nspec:\n  configPatches:\n    - applyTo: HTTP_FILTER\n      patch:\n        operation: INSERT_FIRST\n        filterClass: AUTHZ\n        value: { name: x, typed_config: {} }\n").unwrap_err();
    assert_eq!(e.0[0].path, "spec.configPatches[0].patch.filterClass", "{e}");
}

#[test]
fn an_extension_config_may_match_gateways_and_proxy_versions_not_sidecars() {
    let doc = |context: &str| {
        format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {{ name: x }}\nspec:\n  configPatches:\n    - applyTo: EXTENSION_CONFIG\n      match:\n        context: {context}\n        proxy:\n          proxyVersion: '^1\\.40.*'\n          metadata: {{ region: eu }}\n      patch:\n        operation: ADD\n        value: {{ name: x, typed_config: {{}} }}\n"
        )
    };
    for context in ["GATEWAY", "ANY"] {
        let p = read(&doc(context)).unwrap();
        let s = &p.doc.extension_configs[0].node_selector;
        assert_eq!(s.envoy_version.as_ref().map(|v| v.as_str()), Some(r"^1\.40.*"));
        assert_eq!(s.metadata["region"], "eu");
    }
    let e = read(&doc("SIDECAR_INBOUND")).unwrap_err();
    assert_eq!((e.0[0].path.as_str(), e.0[0].line), ("spec.configPatches[0].match.context", Some(8)));
    assert!(e.0[0].message.contains("sidecar") && e.0[0].message.contains("GATEWAY"), "{e}");
}

#[test]
fn generated_resources_and_kubernetes_targets_are_refused_with_why() {
    let e = read("apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: { name: x }\nspec:\n  configPatches:\n    - applyTo: HTTP_ROUTE\n      patch: { operation: MERGE, value: {} }\n    - applyTo: CLUSTER\n      patch: { operation: ADD, value: {} }\n").unwrap_err();
    assert!(e.0[0].message.contains("routes:"), "{e}");
    assert!(e.0[1].message.contains("clusters:"), "{e}");
    let e = read("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: { name: x }\nspec:\n  targetRefs:\n    - kind: Gateway\n      group: gateway.networking.k8s.io\n      name: gw\n  url: oci://r/p\n").unwrap_err();
    assert_eq!(e.0[0].path, "spec.targetRefs");
    assert!(e.0[0].message.contains("matchLabels"), "{e}");
}

#[test]
fn a_url_without_a_scheme_is_oci_and_an_http_module_needs_no_digest() {
    let p = read("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: { name: x }\nspec:\n  url: ghcr.io/istio-ecosystem/wasm-extensions/basic_auth:1.12.0\n").unwrap();
    assert_eq!(p.doc.wasm_plugins[0].url, "oci://ghcr.io/istio-ecosystem/wasm-extensions/basic_auth:1.12.0");
    let c = compiled("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: openid-connect\n  namespace: istio-ingress\nspec:\n  selector:\n    matchLabels:\n      istio: ingressgateway\n  url: https://private-bucket/filters/openid.wasm\n  imagePullPolicy: Always\n  phase: AUTHN\n").unwrap();
    let w = &c.wasm_plugins[0];
    assert_eq!((w.sha256.as_deref(), w.pull_policy), (None, crate::model::PullPolicy::Always));
}

#[test]
fn a_plugin_no_served_listener_takes_is_served_over_ecds_and_noted() {
    let c = compiled("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: add-header\n  namespace: default\nspec:\n  url: oci://127.0.0.1:5000/p:v1\n").unwrap();
    assert_eq!(c.wasm_plugins[0].name, "default.add-header");
    assert_eq!(c.notices.len(), 1);
    let n = &c.notices[0];
    assert_eq!((n.path.as_str(), n.line), ("spec", Some(6)), "{n}");
    assert!(n.message.contains("placed in no listener") && n.message.contains("\"default.add-header\""), "{n}");
}

const LUA_DOC: &str = r#"apiVersion: extensions.istio.io/v1alpha1
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
    - number: 8080
    - number: 8081
  phase: AUTHN
  priority: 1000
  lua:
    inlineCode: |
      function envoy_on_response(response_handle)
        response_handle:headers():add("x-lua", "v1")
      end
"#;

#[test]
fn a_traffic_extension_with_lua_is_envoys_lua_filter_placed_by_phase() {
    let c = compiled(LUA_DOC).unwrap();
    let r = &c.resources[0];
    assert_eq!(r.name, "istio-ingress.conditional-header-modifier");
    assert_eq!(r.inner_type_url, super::plugin::LUA_TYPE);
    let p = r.placement.as_ref().unwrap();
    assert_eq!((p.phase, p.priority, p.ports.clone()), (Phase::Authn, 1000, vec![8080, 8081]));
    assert_eq!(r.selector.labels["istio"], "ingressgateway");
    assert_eq!(c.notices.len(), 1, "no listener served here: noted");
    let big = LUA_DOC.replace("      end\n", &format!("      end\n      -- {}\n", "x".repeat(70_000)));
    let e = read(&big).unwrap_err();
    assert_eq!(e.0[0].path, "spec.lua.inlineCode");
    assert!(e.0[0].message.contains("65536"), "{e}");
}

#[test]
fn a_traffic_extension_with_wasm_is_a_wasm_plugin_and_takes_one_of_the_two() {
    let c = compiled("apiVersion: extensions.istio.io/v1alpha1\nkind: TrafficExtension\nmetadata:\n  name: acl-check\n  namespace: istio-ingress\nspec:\n  selector:\n    matchLabels:\n      istio: ingressgateway\n  phase: EXECUTION_PHASE_AUTHZ\n  priority: 1000\n  wasm:\n    url: oci://private-registry:5000/acl-check/acl:latest\n    imagePullPolicy: Always\n    pluginConfig:\n      acl_server: some_server\n").unwrap();
    let w = &c.wasm_plugins[0];
    assert_eq!(w.name, "istio-ingress.acl-check");
    let p = w.placement.as_ref().unwrap();
    assert_eq!((p.phase, p.priority), (Phase::Authz, 1000));
    let e = read("apiVersion: extensions.istio.io/v1alpha1\nkind: TrafficExtension\nmetadata: { name: x }\nspec:\n  wasm: { url: oci://r/p }\n  lua: { inlineCode: 'x' }\n").unwrap_err();
    assert!(e.0[0].message.contains("exactly one of wasm or lua"), "{e}");
    // Istio's verificationKey is the plugin's trusted key: a PEM public key.
    let e = compiled("apiVersion: extensions.istio.io/v1alpha1\nkind: TrafficExtension\nmetadata: { name: x }\nspec:\n  wasm: { url: oci://r/p, verificationKey: abc }\n").unwrap_err();
    assert_eq!(e.0[0].path, "spec.wasm.verificationKey", "{e}");
    assert!(e.0[0].message.contains("BEGIN PUBLIC KEY"), "{e}");
    let pem = "-----BEGIN PUBLIC KEY-----\\nMFkw\\n-----END PUBLIC KEY-----\\n";
    let c = compiled(&format!("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{ name: x }}\nspec:\n  url: oci://r/p\n  verificationKey: \"{pem}\"\n")).unwrap();
    let v = c.wasm_plugins[0].verification.as_ref().unwrap();
    assert_eq!((v.keys[0].0.as_str(), v.require), ("inline", true));
}
