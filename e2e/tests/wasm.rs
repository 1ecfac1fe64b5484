//! Wasm plugins end to end: a real Envoy, a real OCI registry (Debian's docker-registry),
//! a real HTTP server, and proxy-wasm modules built from WebAssembly text at test time.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use filterplane_e2e::{
    example_bootstrap, example_text, filterplane_bin, free_port, http_get,
    services::{header_module, FileServer, Registry},
    traffic::{Tally, Traffic},
    wait_until, Envoy, EnvoyPorts, Filterplane,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Publishes a module with `filterplane wasm push`; returns (manifest digest, sha256).
fn push(registry: &Registry, dir: &Path, value: &str, tag: &str) -> (String, String) {
    let file = dir.join(format!("{value}.wasm"));
    fs::write(&file, header_module(value)).unwrap();
    let target = format!("oci://{}/plugins/add-header:{tag}", registry.addr);
    let out = Command::new(filterplane_bin())
        .args(["wasm", "push"])
        .arg(&file)
        .args([&target, "--insecure"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wasm push: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    let field = |k: &str| {
        stdout.lines().find_map(|l| l.strip_prefix(k)).map(str::to_owned).unwrap_or_else(|| panic!("{stdout}"))
    };
    (field("digest: "), field("sha256: "))
}

fn plugin_yaml(url: &str, extra: &str) -> String {
    format!("version: 1\nwasm_plugins:\n  - name: add-header\n    url: {url}\n{extra}")
}

fn x_wasm(envoy: &Envoy) -> Option<String> {
    envoy.get("/").and_then(|r| r.header("x-wasm").map(str::to_owned))
}

fn wait_for(envoy: &Envoy, value: &str) -> Duration {
    let start = Instant::now();
    wait_until(&format!("x-wasm: {value} through Envoy"), WAIT, || {
        (x_wasm(envoy).as_deref() == Some(value)).then_some(())
    });
    start.elapsed()
}

/// The last reload's Wasm errors, once there are some.
fn wasm_errors(fp: &Filterplane, kind: &str) -> Vec<Value> {
    wait_until(&format!("a {kind} in /api/v1/config"), WAIT, || {
        let errs = fp.api("/api/v1/config")["wasm_errors"].as_array().cloned().unwrap_or_default();
        errs.iter().any(|e| e["kind"] == kind).then_some(errs)
    })
}

struct Setup {
    fp: Filterplane,
    envoy: Envoy,
    yaml: std::path::PathBuf,
    dir: tempfile::TempDir,
}

fn start(first_config: &str, extra_args: &[&str]) -> Setup {
    start_in(tempfile::tempdir().unwrap(), first_config, extra_args, "GRPC")
}

/// As `start`, in `dir` (which may hold modules the config names).
fn start_in(dir: tempfile::TempDir, first_config: &str, extra_args: &[&str], api_type: &str) -> Setup {
    let yaml = dir.path().join("filterplane.yaml");
    fs::write(&yaml, first_config).unwrap();
    let (xds_port, admin_port) = (free_port(), free_port());
    let fp = Filterplane::start_with_args(&yaml, dir.path(), xds_port, admin_port, extra_args);
    let ports = EnvoyPorts::new(xds_port);
    let bootstrap = example_bootstrap("wasm/envoy.yaml", ports, "wasm-envoy")
        .replace("port_value: 18001", &format!("port_value: {admin_port}"))
        .replace("api_type: GRPC", &format!("api_type: {api_type}"));
    let envoy = Envoy::start(&bootstrap, ports, dir.path(), "envoy");
    Setup { fp, envoy, yaml, dir }
}

#[test]
fn oci_rollout_by_tag_and_bad_modules_never_reach_envoy() {
    let scratch = tempfile::tempdir().unwrap();
    let registry = Registry::start(scratch.path());
    let (_, sha_v1) = push(&registry, scratch.path(), "v1", "v1");
    let (digest_v2, _) = push(&registry, scratch.path(), "v2", "v2");
    let url = |tag: &str| format!("oci://{}/plugins/add-header:{tag}", registry.addr);

    let s = start(&plugin_yaml(&url("v1"), ""), &["--insecure-registry", &registry.addr]);
    let took = wait_for(&s.envoy, "v1");
    println!("OCI v1: Filterplane start -> Envoy serves it: {} ms", took.as_millis());

    let write = |text: String| fs::write(&s.yaml, text).unwrap();
    write(plugin_yaml(&url("v2"), ""));
    let took = wait_for(&s.envoy, "v2");
    println!("OCI rollout v1 -> v2 by tag: file write -> curl sees it: {} ms", took.as_millis());

    // Pinned to v2's digest: same module, no download, nothing for Envoy to do.
    write(plugin_yaml(&format!("oci://{}/plugins/add-header@{digest_v2}", registry.addr), ""));
    wait_until("the digest reload", WAIT, || {
        (s.fp.api("/api/v1/config")["last_trigger"] == "file change"
            && s.fp.api("/api/v1/config")["wasm_errors"] == serde_json::json!([]))
        .then_some(())
    });

    // A SHA-256 that does not match: v2 keeps serving, the error is shown and counted.
    write(plugin_yaml(&url("v1"), &format!("    sha256: {}\n", "0".repeat(64))));
    let errs = wasm_errors(&s.fp, "checksum_mismatch");
    assert_eq!(errs[0]["plugin"], "add-header");
    assert!(errs[0]["message"].as_str().unwrap().contains(&sha_v1), "{errs:?}");
    assert!(errs[0]["serving_version"].is_string(), "the previous version keeps serving: {errs:?}");
    assert_eq!(x_wasm(&s.envoy).as_deref(), Some("v2"));

    // An unreachable registry: the same.
    write(plugin_yaml("oci://127.0.0.1:1/plugins/add-header:v3", "    image_pull_policy: Always\n"));
    wasm_errors(&s.fp, "download_failure");
    assert_eq!(x_wasm(&s.envoy).as_deref(), Some("v2"));
    let metrics =
        |k: &str| s.fp.metric(&format!("filterplane_wasm_remote_fetches_total{{result=\"{k}\"}}")).unwrap_or(0.0);
    assert_eq!(metrics("checksum_mismatch"), 1.0);
    assert!(metrics("download_failure") >= 1.0);
    assert!(metrics("success") >= 2.0);

    // The page shows it too, and Envoy never saw a bad module.
    let page_data = s.fp.api("/api/v1/config");
    assert_eq!(page_data["wasm_errors"][0]["kind"], "download_failure");
    assert_eq!(s.envoy.stat("extension_config_discovery.http_filter.add-header.update_rejected"), Some(0));
    drop(s.dir);
}

#[test]
fn http_module_with_remote_delivery_is_downloaded_once() {
    let scratch = tempfile::tempdir().unwrap();
    let modules = scratch.path().join("www");
    fs::create_dir(&modules).unwrap();
    let bytes = header_module("from-http");
    fs::write(modules.join("hdr.wasm"), &bytes).unwrap();
    let sha = filterplane_e2e::services::sha256_hex(&bytes);
    let server = FileServer::start(&modules, scratch.path());
    let url = format!("{}/hdr.wasm", server.url);
    let config = |greeting: &str| {
        plugin_yaml(
            &url,
            &format!("    sha256: {sha}\n    delivery: remote\n    plugin_config: {{ greeting: {greeting} }}\n"),
        )
    };
    let s = start(&config("hello"), &[]);
    wait_for(&s.envoy, "from-http");

    // The ECDS resource points Envoy at Filterplane's /modules endpoint.
    let dump = s.fp.api("/api/v1/config_dump");
    let code = &dump["resources"][0]["resource"]["typed_config"]["config"]["vm_config"]["code"]["remote"];
    assert_eq!(code["sha256"], sha.as_str());
    // At a path that cannot be worked out from the module's public SHA-256.
    let uri = code["http_uri"]["uri"].as_str().unwrap();
    let key = uri.rsplit_once("/modules/").map(|(_, k)| k).unwrap_or_default();
    assert!(key.len() == 64 && !uri.contains(&sha), "{uri}");
    for guess in [format!("/modules/sha256/{sha}"), format!("/modules/{sha}")] {
        assert_eq!(http_get(&s.fp.url(&guess)).map(|r| r.status), Some(404), "{guess}");
    }
    assert_eq!(code["http_uri"]["cluster"], "filterplane_modules");

    // A new plugin config: a new ECDS version, same module. Neither Filterplane nor Envoy
    // downloads it again.
    let before = s.envoy.stat("extension_config_discovery.http_filter.add-header.update_success");
    fs::write(&s.yaml, config("bonjour")).unwrap();
    wait_until("Envoy to apply the new plugin config", WAIT, || {
        (s.envoy.stat("extension_config_discovery.http_filter.add-header.update_success") > before).then_some(())
    });
    assert_eq!(x_wasm(&s.envoy).as_deref(), Some("from-http"));
    assert_eq!(server.gets("/hdr.wasm"), 1, "Filterplane fetched the module once");
    assert_eq!(s.fp.metric("filterplane_wasm_module_downloads_total"), Some(1.0), "Envoy downloaded it once");
    drop(s.dir);
}

#[test]
fn example_config_validates() {
    let text = example_text("wasm/filterplane.yaml");
    assert!(text.contains("wasm_plugins"));
    let out = Command::new(filterplane_bin())
        .args(["validate", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wasm/filterplane.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A module file `m-VALUE.wasm` in `dir` that adds `x-wasm: VALUE`.
fn module_file(dir: &Path, value: &str) -> String {
    fs::write(dir.join(format!("m-{value}.wasm")), header_module(value)).unwrap();
    format!("file://m-{value}.wasm")
}

const ECDS: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

/// A module update with every kind of delivery, made while clients send requests on
/// keep-alive connections: inline -> remote, remote -> remote (a new module), remote ->
/// inline. Each new module runs, and no response goes out without the plugin (which is
/// FAIL_CLOSE) having run.
#[test]
fn wasm_updates_run_in_every_delivery_mode_and_no_response_skips_the_plugin_over_sotw() {
    wasm_updates_under_traffic("GRPC");
}

#[test]
fn wasm_updates_run_in_every_delivery_mode_and_no_response_skips_the_plugin_over_delta() {
    wasm_updates_under_traffic("DELTA_GRPC");
}

fn wasm_updates_under_traffic(api_type: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let config = |value: &str, delivery: &str| {
        plugin_yaml(&module_file(&root, value), &format!("    delivery: {delivery}\n    fail_strategy: FAIL_CLOSE\n"))
    };
    let first = config("v1", "inline");
    let s = start_in(dir, &first, &[], api_type);
    wait_for(&s.envoy, "v1");
    let downloads = || s.fp.metric("filterplane_wasm_module_downloads_total").unwrap_or(0.0);
    assert_eq!(downloads(), 0.0);

    let traffic = Traffic::start(s.envoy.listener_port, 4, "/", "x-wasm");
    let mut results: Vec<(&str, Tally)> = Vec::new();
    for (what, value, delivery, downloaded) in [
        ("inline -> remote", "v2", "remote", 1.0),
        ("remote -> remote", "v3", "remote", 2.0),
        ("remote -> inline", "v4", "inline", 2.0),
    ] {
        traffic.take();
        fs::write(&s.yaml, config(value, delivery)).unwrap();
        let took = wait_for(&s.envoy, value);
        // Traffic on the new module too: every client through it.
        traffic.wait_for_header(value, 50, WAIT);
        let tally = traffic.take();
        println!("Wasm {api_type} {what}: {} ms to run the new module; {tally}", took.as_millis());
        assert_eq!(downloads(), downloaded, "{what}: Envoy downloaded each remote module once");
        // The proxy is SYNCED, which now means it runs the new module.
        let proxy = s.fp.api("/api/v1/proxies/wasm-envoy");
        assert_eq!(proxy[0]["types"][ECDS]["state"], "synced", "{what}: {proxy}");
        results.push((what, tally));
    }
    traffic.stop();
    for (what, t) in &results {
        assert!(t.responses > 0, "{what}: no traffic during the change");
        assert_eq!(t.not_ok(), 0, "{what}: responses other than 200: {t}");
        assert_eq!(t.without_header(), 0, "{what}: responses without the plugin having run: {t}");
    }
    // Envoy's NACKs while it fetched (remote) were resends, not rejects.
    assert_eq!(s.fp.api("/api/v1/rejects"), serde_json::json!([]));
    assert!(s.fp.metric("filterplane_wasm_code_fetch_resends_total").unwrap_or(0.0) >= 2.0);
}

/// `filterplane serve --config plugins.yaml`, typed in the config's directory, with a
/// `file://` module next to it.
#[test]
fn a_config_named_by_a_bare_file_name_serves_file_modules() {
    let dir = tempfile::tempdir().unwrap();
    let url = module_file(dir.path(), "bare");
    fs::write(dir.path().join("plugins.yaml"), plugin_yaml(&url, "")).unwrap();
    let fp = Filterplane::start_in(dir.path(), "plugins.yaml", dir.path(), &[]);
    let config = wait_until("the config loaded", WAIT, || {
        let c = fp.api("/api/v1/config");
        c["serving_version"].is_string().then_some(c)
    });
    assert_eq!(config["wasm_errors"], serde_json::json!([]), "{config}");
    let dump = fp.api("/api/v1/config_dump");
    assert_eq!(dump["resources"][0]["name"], "add-header", "{dump}");
}
