//! Wasm the way Istio users write it, against a real Envoy: an Envoy-native Wasm filter
//! config whose code is `remote` (in a `udpa.type.v1.TypedStruct`, as Istio's docs write
//! it) is fetched by Filterplane, checked and served inline; Envoy never sees the URL.
//! A wrong SHA-256 or a dead server keeps the previous version. TypedStruct elsewhere.

use std::{fs, path::Path, process::Command, time::Duration};

use filterplane_e2e::{
    direct_response_listener, example_bootstrap, free_port,
    services::{header_module, sha256_hex, FileServer},
    wait_until, Envoy, EnvoyPorts, Filterplane,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// The shape of Istio's docs: a Wasm filter config in a TypedStruct, code `remote`.
fn native_wasm(url: &str, sha: &str, greeting: &str) -> String {
    format!(
        r#"version: 1
extension_configs:
  - name: add-header
    typed_config:
      "@type": type.googleapis.com/udpa.type.v1.TypedStruct
      type_url: type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
      value:
        config:
          name: add-header
          root_id: add_header
          configuration:
            "@type": type.googleapis.com/google.protobuf.StringValue
            value: '{{"greeting":"{greeting}"}}'
          vm_config:
            runtime: envoy.wasm.runtime.v8
            code:
              remote:
                http_uri: {{ uri: "{url}", cluster: outbound_modules, timeout: 10s }}
                sha256: {sha}
"#
    )
}

struct Setup {
    fp: Filterplane,
    envoy: Envoy,
    yaml: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn start(config: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    fs::write(&yaml, config).unwrap();
    let fp = Filterplane::start_with_args(&yaml, dir.path(), free_port(), free_port(), &[]);
    let ports = EnvoyPorts::new(fp.xds_port);
    let bootstrap = example_bootstrap("wasm/envoy.yaml", ports, "native-wasm")
        .replace("port_value: 18001", &format!("port_value: {}", fp.admin_port));
    let envoy = Envoy::start(&bootstrap, ports, dir.path(), "envoy");
    Setup { fp, envoy, yaml, _dir: dir }
}

fn x_wasm(envoy: &Envoy) -> Option<String> {
    envoy.get("/").and_then(|r| r.header("x-wasm").map(str::to_owned))
}

fn wasm_errors(fp: &Filterplane, kind: &str) -> Vec<Value> {
    wait_until(&format!("a {kind} in /api/v1/config"), WAIT, || {
        let errs = fp.api("/api/v1/config")["wasm_errors"].as_array().cloned().unwrap_or_default();
        errs.iter().any(|e| e["kind"] == kind).then_some(errs)
    })
}

#[test]
fn envoy_native_remote_wasm_in_a_typed_struct_is_fetched_centrally() {
    let scratch = tempfile::tempdir().unwrap();
    let www = scratch.path().join("www");
    fs::create_dir(&www).unwrap();
    let v1 = header_module("native-v1");
    let v2 = header_module("native-v2");
    fs::write(www.join("v1.wasm"), &v1).unwrap();
    fs::write(www.join("v2.wasm"), &v2).unwrap();
    let (sha1, sha2) = (sha256_hex(&v1), sha256_hex(&v2));
    // Envoy's bootstrap has no cluster for this server: only Filterplane can reach it.
    let server = FileServer::start(&www, scratch.path());
    let url = |f: &str| format!("{}/{f}", server.url);

    let s = start(&native_wasm(&url("v1.wasm"), &sha1, "hi"));
    wait_until("the module to run in Envoy", WAIT, || (x_wasm(&s.envoy).as_deref() == Some("native-v1")).then_some(()));
    assert_eq!(server.gets("/v1.wasm"), 1, "Filterplane fetched it once");
    let dump = s.fp.api("/api/v1/config_dump").to_string();
    assert!(!dump.contains(&server.url) && !dump.contains("outbound_modules"), "the URL never reaches Envoy: {dump}");
    assert!(dump.contains("inline_bytes"), "{dump}");
    let conversions = |r: &str| s.fp.metric(&format!("filterplane_wasm_config_conversions_total{{result=\"{r}\"}}"));
    assert_eq!(conversions("success"), Some(1.0));

    // A wrong sha256 (of a module never fetched: a cached one would be served by its
    // hash): refused, reported with the entry's file, line and path; Envoy keeps v1.
    let applied = s.envoy.stat("extension_config_discovery.http_filter.add-header.update_success");
    let other = sha256_hex(&header_module("never-served"));
    fs::write(&s.yaml, native_wasm(&url("v2.wasm"), &other, "hi")).unwrap();
    let errs = wasm_errors(&s.fp, "checksum_mismatch");
    assert_eq!(errs[0]["path"], "extension_configs[0].typed_config.config.vm_config.code", "{errs:?}");
    assert_eq!(errs[0]["line"], 3);
    assert!(errs[0]["file"].as_str().unwrap().ends_with("filterplane.yaml"));
    assert!(errs[0]["serving_version"].is_string(), "the previous version keeps serving: {errs:?}");
    assert_eq!(conversions("checksum_mismatch"), Some(1.0));
    // A dead server: the same.
    fs::write(&s.yaml, native_wasm("http://127.0.0.1:9/gone.wasm", &sha2, "hi")).unwrap();
    wasm_errors(&s.fp, "download_failure");
    assert_eq!(x_wasm(&s.envoy).as_deref(), Some("native-v1"));
    assert_eq!(s.envoy.stat("extension_config_discovery.http_filter.add-header.update_success"), applied);
    assert_eq!(s.envoy.stat("extension_config_discovery.http_filter.add-header.update_rejected"), Some(0));

    // The right module and sha256: rolled out, with keep-alive clients on the listener
    // the whole time (the plugin is FAIL_CLOSE by default: every response carries it).
    let traffic = filterplane_e2e::traffic::Traffic::start(s.envoy.listener_port, 2, "/", "x-wasm");
    fs::write(&s.yaml, native_wasm(&url("v2.wasm"), &sha2, "hi")).unwrap();
    wait_until("v2 to run", WAIT, || (x_wasm(&s.envoy).as_deref() == Some("native-v2")).then_some(()));
    traffic.wait_for_header("native-v2", 50, WAIT);
    let tally = traffic.stop();
    println!("Envoy-native Wasm v1 -> v2: {tally}");
    assert_eq!((tally.not_ok(), tally.without_header()), (0, 0), "{tally}");
    assert!(tally.by_header.contains_key("native-v2"), "{tally}");

    // Opting out: Envoy is handed the config as written (and fetches by itself).
    let out = native_wasm(&url("v2.wasm"), &sha2, "hi").replace(
        "    typed_config:\n      \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct",
        "    wasm_fetch: envoy\n    typed_config:\n      \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct",
    );
    fs::write(&s.yaml, out).unwrap();
    wait_until("the config as written in the dump", WAIT, || {
        s.fp.api("/api/v1/config_dump").to_string().contains("outbound_modules").then_some(())
    });
}

#[test]
fn typed_struct_around_a_header_mutation_and_a_wrong_field_in_it() {
    let quick = filterplane_e2e::example_text("quickstart/filterplane.yaml");
    let from = "      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations:";
    assert!(quick.contains(from), "the quickstart config changed shape");
    let typed_struct = |value: &str| {
        quick
            .replace(from, "      \"@type\": type.googleapis.com/xds.type.v3.TypedStruct\n      type_url: type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      value:\n        mutations:")
            .replace("        response_mutations:", "          response_mutations:")
            .replace("          - append: { header: { key: x-plugin, value: v1 } }", &format!("            - append: {{ header: {{ key: x-plugin, {value} }} }}"))
    };
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    fs::write(&yaml, typed_struct("value: from-typed-struct")).unwrap();
    let fp = Filterplane::start_with_args(&yaml, dir.path(), free_port(), free_port(), &[]);
    let ports = EnvoyPorts::new(fp.xds_port);
    let envoy = Envoy::start(&example_bootstrap("quickstart/envoy.yaml", ports, "ts"), ports, dir.path(), "envoy");
    wait_until("the TypedStruct config through Envoy", WAIT, || {
        envoy.get("/").and_then(|r| r.header("x-plugin").map(str::to_owned)).filter(|v| v == "from-typed-struct")
    });
    // The same config as a typed message has the same version.
    let version = fp.api("/api/v1/config")["resources"][0]["version"].clone();
    let quick_typed = quick.replace("value: v1", "value: from-typed-struct");
    let check = dir.path().join("typed.yaml");
    fs::write(&check, &quick_typed).unwrap();
    fs::write(&yaml, &quick_typed).unwrap();
    wait_until("the typed twin to load", WAIT, || {
        (fp.api("/api/v1/config")["last_attempt_at"] != Value::Null
            && fp.api("/api/v1/config")["last_outcome"]["result"] == "unchanged")
            .then_some(())
    });
    assert_eq!(fp.api("/api/v1/config")["resources"][0]["version"], version);

    // A wrong field inside the TypedStruct's value: refused, with the path into it.
    fs::write(&yaml, typed_struct("valu: nope")).unwrap();
    let errors = wait_until("the refusal", WAIT, || {
        let c = fp.api("/api/v1/config");
        (c["last_outcome"]["result"] == "failed").then(|| c["last_outcome"]["errors"].clone())
    });
    let e = &errors[0];
    assert_eq!(
        e["path"], "extension_configs[0].typed_config.value.mutations.response_mutations[0].append.header",
        "{errors}"
    );
    assert!(e["message"].as_str().unwrap().contains("'valu'"), "{errors}");
    assert!(e["line"].as_u64().is_some(), "{errors}");
}

/// `filterplane wasm push` to a registry over TLS with credentials in `CREDS`.
fn push_secure(registry: &str, ca: &Path, dir: &Path, value: &str, tag: &str) -> String {
    let file = dir.join(format!("{value}.wasm"));
    fs::write(&file, header_module(value)).unwrap();
    let out = Command::new(filterplane_e2e::filterplane_bin())
        .args(["wasm", "push"])
        .arg(&file)
        .arg(format!("oci://{registry}/plugins/hdr:{tag}"))
        .args(["--credentials-env", "CREDS", "--registry-ca-file"])
        .arg(ca)
        .env("CREDS", "puller:pa55-w0rd")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "push: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().find_map(|l| l.strip_prefix("sha256: ")).unwrap().to_owned()
}

#[test]
fn a_registry_with_htpasswd_over_tls_pulls_with_docker_config_and_kubernetes_secrets() {
    use filterplane_e2e::{
        pki::Ca,
        services::{Registry, RegistrySecurity},
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "registry");
    let cert = ca.server("registry");
    let registry = Registry::start_with(
        dir.path(),
        Some(RegistrySecurity { cert: &cert.cert, key: &cert.key, user: ("puller", "pa55-w0rd") }),
    );
    let r = &registry.addr;
    push_secure(r, &ca.cert, dir.path(), "from-config-json", "v1");
    push_secure(r, &ca.cert, dir.path(), "from-k8s-secret", "v2");
    push_secure(r, &ca.cert, dir.path(), "anonymous", "v3");

    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("puller:pa55-w0rd");
    let config_json = dir.path().join("config.json");
    fs::write(
        &config_json,
        format!(r#"{{"auths": {{"https://{r}/v2/": {{"auth": "{auth}"}}, "other.example": {{"auth": "eDp5"}}}}}}"#),
    )
    .unwrap();
    let dockerconfigjson = base64::engine::general_purpose::STANDARD
        .encode(format!(r#"{{"auths": {{"{r}": {{"username": "puller", "password": "pa55-w0rd"}}}}}}"#));
    let secret = dir.path().join("pull-secret.yaml");
    fs::write(&secret, format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: pull\ntype: kubernetes.io/dockerconfigjson\ndata:\n  .dockerconfigjson: {dockerconfigjson}\n")).unwrap();

    let plugin = |tag: &str, secret: Option<&Path>| {
        let pull = secret.map(|p| format!("    image_pull_secret: {{ file: {} }}\n", p.display())).unwrap_or_default();
        format!("version: 1\nwasm_plugins:\n  - name: add-header\n    url: oci://{r}/plugins/hdr:{tag}\n{pull}")
    };
    let yaml = dir.path().join("filterplane.yaml");
    fs::write(&yaml, plugin("v1", Some(&config_json))).unwrap();
    let fp = Filterplane::start_with_args(
        &yaml,
        dir.path(),
        free_port(),
        free_port(),
        &["--registry-ca-file", ca.cert.to_str().unwrap()],
    );
    let ports = EnvoyPorts::new(fp.xds_port);
    let bootstrap = example_bootstrap("wasm/envoy.yaml", ports, "registry-auth")
        .replace("port_value: 18001", &format!("port_value: {}", fp.admin_port));
    let envoy = Envoy::start(&bootstrap, ports, dir.path(), "envoy");
    let wait = |value: &str| {
        wait_until(&format!("x-wasm: {value}"), WAIT, || (x_wasm(&envoy).as_deref() == Some(value)).then_some(()))
    };
    wait("from-config-json");
    fs::write(&yaml, plugin("v2", Some(&secret))).unwrap();
    wait("from-k8s-secret");

    // No credentials: a clear download_failure, and the previous version keeps serving.
    fs::write(&yaml, plugin("v3", None)).unwrap();
    let errs = wasm_errors(&fp, "download_failure");
    let message = errs[0]["message"].as_str().unwrap();
    assert!(message.contains("401") || message.to_lowercase().contains("unauthorized"), "{message}");
    assert_eq!(x_wasm(&envoy).as_deref(), Some("from-k8s-secret"));
    // The credentials never show: not in the API, not in the log.
    let shown = [fp.api("/api/v1/config").to_string(), fp.log_text()];
    for text in shown {
        assert!(!text.contains("pa55-w0rd") && !text.contains(&auth) && !text.contains(&dockerconfigjson));
    }
}

const ISTIO_DOCS: &str = r#"# What an Istio user already has, as it is.
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: add-header
  namespace: edge
spec:
  selector:
    matchLabels:
      app: canary
  url: file://hdr.wasm
  phase: AUTHN
  pluginConfig:
    greeting: hello
  failStrategy: FAIL_CLOSE
---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: stamp
  namespace: istio-system
spec:
  configPatches:
    - applyTo: EXTENSION_CONFIG
      patch:
        operation: ADD
        value:
          name: stamp-response
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
            mutations:
              response_mutations:
                - append: { header: { key: x-envoyfilter, value: "yes" } }
    - applyTo: HTTP_FILTER
      match:
        context: GATEWAY
        listener:
          filterChain:
            filter:
              name: envoy.filters.network.http_connection_manager
              subFilter: { name: envoy.filters.http.router }
      patch:
        operation: INSERT_BEFORE
        value:
          name: stamp-response
          config_discovery:
            config_source: { ads: {} }
            type_urls: [ type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation ]
"#;

#[test]
fn istio_wasm_plugin_and_envoy_filter_documents_run_in_envoy_by_label() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    fs::create_dir(&conf).unwrap();
    fs::write(conf.join("hdr.wasm"), header_module("from-wasmplugin")).unwrap();
    let (xds, admin) = (free_port(), free_port());
    let (canary_ports, stable_ports) = (EnvoyPorts::new(xds), EnvoyPorts::new(xds));
    let listeners = format!(
        "version: 1\nlisteners:\n{}{}",
        direct_response_listener("edge-canary", "canary-proxy", canary_ports.listener),
        direct_response_listener("edge-stable", "stable-proxy", stable_ports.listener)
    );
    fs::write(conf.join("listeners.yaml"), listeners).unwrap();
    fs::write(conf.join("istio.yaml"), ISTIO_DOCS).unwrap();
    let fp = Filterplane::start_with_args(&conf, dir.path(), xds, admin, &[]);
    let envoy = |ports: EnvoyPorts, node: &str, app: &str| {
        let text = example_bootstrap("gateway/envoy.yaml", ports, node);
        assert!(text.contains("  cluster: gateway\n"));
        let text = text.replace(
            "  cluster: gateway\n",
            &format!("  cluster: gateway\n  metadata: {{ LABELS: {{ app: {app} }} }}\n"),
        );
        Envoy::start(&text, ports, dir.path(), node)
    };
    let canary = envoy(canary_ports, "canary-proxy", "canary");
    let stable = envoy(stable_ports, "stable-proxy", "stable");
    let headers = |e: &Envoy| {
        e.get("/").map(|r| (r.header("x-wasm").map(str::to_owned), r.header("x-envoyfilter").map(str::to_owned)))
    };
    wait_until("the canary to run both", WAIT, || {
        (headers(&canary)? == (Some("from-wasmplugin".into()), Some("yes".into()))).then_some(())
    });
    wait_until("the stable proxy to run the EnvoyFilter only", WAIT, || {
        (headers(&stable)? == (None, Some("yes".into()))).then_some(())
    });
    // Served under Istio's names: NAMESPACE.NAME for the WasmPlugin, value.name for the patch.
    let names: Vec<String> = fp.api("/api/v1/config")["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(names.contains(&"edge.add-header".to_owned()) && names.contains(&"stamp-response".to_owned()), "{names:?}");

    // A field Filterplane does not implement: refused, named, with its line.
    fs::write(
        conf.join("istio.yaml"),
        ISTIO_DOCS.replace("  failStrategy: FAIL_CLOSE\n", "  failStrategy: FAIL_CLOSE\n  verificationKey: abc\n"),
    )
    .unwrap();
    let errors = wait_until("the refusal", WAIT, || {
        let c = fp.api("/api/v1/config");
        (c["last_outcome"]["result"] == "failed").then(|| c["last_outcome"]["errors"].clone())
    });
    assert_eq!(errors[0]["path"], "spec.verificationKey", "{errors}");
    assert_eq!(errors[0]["line"], 16, "{errors}");
    assert!(errors[0]["file"].as_str().unwrap().ends_with("istio.yaml"));
    assert_eq!(headers(&canary).unwrap().0.as_deref(), Some("from-wasmplugin"), "the last good config keeps serving");
}
