//! Signed Wasm modules, checked before any Envoy runs them. Keys and signatures are made by
//! openssl (code that is not Filterplane's), as `cosign sign-blob` writes them: base64 of
//! the signature over the module's bytes, in `MODULE.sig`. A module signed by a trusted
//! key runs in a real Envoy and the API names the key; one signed by another key, one
//! whose signature is not base64, and one without a signature under `require: true` are
//! each refused with their reason while the previous version keeps serving; an http
//! module's `.sig` is fetched beside it.

use std::{fs, path::Path, process::Command, time::Duration};

use filterplane_e2e::{
    direct_response_listener, example_bootstrap, free_port,
    services::{header_module, FileServer},
    wait_until, Envoy, EnvoyPorts, Filterplane,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn openssl(args: &[&str], dir: &Path) {
    let ok = Command::new("openssl").args(args).current_dir(dir).status().unwrap().success();
    assert!(ok, "openssl {args:?}");
}

/// A P-256 key pair NAME.key / NAME.pub in `dir`.
fn key_pair(dir: &Path, name: &str) {
    openssl(
        &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &format!("{name}.key")],
        dir,
    );
    openssl(&["pkey", "-pubout", "-in", &format!("{name}.key"), "-out", &format!("{name}.pub")], dir);
}

/// `module` written to `dir/file`, with `file.sig` signed by `key` (as cosign sign-blob).
fn signed(dir: &Path, file: &str, module: &[u8], key: &str) {
    fs::write(dir.join(file), module).unwrap();
    openssl(&["dgst", "-sha256", "-sign", &format!("{key}.key"), "-out", &format!("{file}.der"), file], dir);
    openssl(&["base64", "-A", "-in", &format!("{file}.der"), "-out", &format!("{file}.sig")], dir);
}

fn config(listener: &str, url: &str) -> String {
    format!(
        "version: 1\nwasm_verification:\n  keys: [release.pub]\n  require: true\nlisteners:\n{listener}wasm_plugins:\n  - name: authz\n    url: {url}\n    placement: {{ phase: AUTHN }}\n"
    )
}

/// The plugin's refusal of `kind` whose message contains `naming`, once there is one.
fn refusal(fp: &Filterplane, kind: &str, naming: &str) -> Value {
    wait_until(&format!("a {kind} refusal naming {naming}"), WAIT, || {
        let errors = fp.api("/api/v1/config")["wasm_errors"].as_array().cloned().unwrap_or_default();
        errors.into_iter().find(|e| e["kind"] == kind && e["message"].as_str().is_some_and(|m| m.contains(naming)))
    })
}

#[test]
fn only_modules_signed_by_a_trusted_key_reach_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    key_pair(d, "release");
    key_pair(d, "stranger");
    signed(d, "good.wasm", &header_module("signed"), "release");
    signed(d, "other.wasm", &header_module("by-a-stranger"), "stranger");
    fs::write(d.join("unsigned.wasm"), header_module("unsigned")).unwrap();
    fs::write(d.join("garbled.wasm"), header_module("garbled")).unwrap();
    fs::write(d.join("garbled.wasm.sig"), "not a signature!").unwrap();

    let xds = free_port();
    let ports = EnvoyPorts::new(xds);
    let listener = direct_response_listener("edge", "gw", ports.listener);
    let yaml = d.join("filterplane.yaml");
    fs::write(&yaml, config(&listener, "file://good.wasm")).unwrap();
    let fp = Filterplane::start_with_args(&yaml, d, xds, free_port(), &[]);
    let envoy = Envoy::start(&example_bootstrap("gateway/envoy.yaml", ports, "gw"), ports, d, "gw");
    let x_wasm = || envoy.get("/").and_then(|r| r.header("x-wasm").map(str::to_owned));
    wait_until("the signed module in Envoy", WAIT, || (x_wasm()? == "signed").then_some(()));
    let config_view = fp.api("/api/v1/config");
    let entry = config_view["resources"].as_array().unwrap().iter().find(|r| r["name"] == "authz").unwrap().clone();
    assert_eq!(entry["module"]["verified_by"], "release.pub", "{entry}");

    // Each refused before Envoy, with its reason; the signed version keeps serving.
    for (file, kind) in [
        ("other.wasm", "signature_untrusted_key"),
        ("garbled.wasm", "signature_invalid"),
        ("unsigned.wasm", "signature_missing"),
    ] {
        fs::write(&yaml, config(&listener, &format!("file://{file}"))).unwrap();
        let e = refusal(&fp, kind, file);
        let message = e["message"].as_str().unwrap();
        assert!(e["file"].as_str().unwrap().ends_with("filterplane.yaml") && e["line"].is_u64(), "{e}");
        assert_eq!(e["plugin"], "authz", "{e}");
        assert!(kind != "signature_untrusted_key" || message.contains("release.pub"), "names the key: {e}");
        assert!(kind == "signature_invalid" || message.contains("sha256"), "names the digest: {e}");
        assert_eq!(x_wasm().as_deref(), Some("signed"), "{file}: the previous version keeps serving");
    }
    let metrics = filterplane_e2e::http_get(&fp.url("/metrics")).unwrap().body;
    for result in ["verified", "signature_untrusted_key", "signature_invalid", "signature_missing"] {
        assert!(
            metrics.contains(&format!("filterplane_wasm_signature_verifications_total{{result=\"{result}\"}}")),
            "{result}"
        );
    }

    // Over HTTP: the `.sig` beside the module is fetched and checked; none there is missing.
    let served = d.join("served");
    fs::create_dir(&served).unwrap();
    fs::copy(d.join("release.key"), served.join("release.key")).unwrap();
    signed(&served, "http.wasm", &header_module("over-http"), "release");
    fs::write(served.join("bare.wasm"), header_module("bare")).unwrap();
    let server = FileServer::start(&served, d);
    fs::write(&yaml, config(&listener, &format!("{}/http.wasm", server.url))).unwrap();
    wait_until("the signed http module in Envoy", WAIT, || (x_wasm()? == "over-http").then_some(()));
    fs::write(&yaml, config(&listener, &format!("{}/bare.wasm", server.url))).unwrap();
    refusal(&fp, "signature_missing", "bare.wasm.sig");
    assert_eq!(x_wasm().as_deref(), Some("over-http"));
}

/// `filterplane wasm sign` writes what openssl (and so cosign) verifies, and
/// `filterplane wasm verify` names the key or says why not.
#[test]
fn wasm_sign_and_verify_agree_with_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    key_pair(d, "release");
    key_pair(d, "stranger");
    fs::write(d.join("m.wasm"), header_module("m")).unwrap();
    let fp =
        |args: &[&str]| Command::new(filterplane_e2e::filterplane_bin()).args(args).current_dir(d).output().unwrap();
    let out = fp(&["wasm", "sign", "m.wasm", "--key", "release.key"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    openssl(&["base64", "-d", "-A", "-in", "m.wasm.sig", "-out", "m.wasm.der"], d);
    let check = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify", "release.pub", "-signature", "m.wasm.der", "m.wasm"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&check.stdout).contains("Verified OK"), "openssl verifies ours");
    let ok = fp(&["wasm", "verify", "m.wasm", "--key", "stranger.pub", "--key", "release.pub"]);
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("signed by release.pub"));
    let refused = fp(&["wasm", "verify", "m.wasm", "--key", "stranger.pub"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("signature_untrusted_key"));
}

/// Pushes `module` to `oci://REGISTRY/plugins/authz:TAG` with `filterplane wasm push`: the
/// manifest digest.
fn push(registry: &filterplane_e2e::services::Registry, d: &Path, module: &[u8], tag: &str) -> String {
    push_with(registry, d, module, tag, &[])
}

fn push_with(
    registry: &filterplane_e2e::services::Registry,
    d: &Path,
    module: &[u8],
    tag: &str,
    args: &[&str],
) -> String {
    let file = d.join(format!("{tag}.wasm"));
    fs::write(&file, module).unwrap();
    let target = format!("oci://{}/plugins/authz:{tag}", registry.addr);
    let out = Command::new(filterplane_e2e::filterplane_bin())
        .args(["wasm", "push"])
        .arg(&file)
        .args([&target, "--insecure"])
        .args(args)
        .current_dir(d)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout.lines().find_map(|l| l.strip_prefix("digest: ")).unwrap().to_owned()
}

/// cosign's signature of `digest`, pushed by the test's own script (registry HTTP API and
/// openssl); `extra`: the digest the payload names instead, and `tamper`.
fn cosign_sign(registry: &filterplane_e2e::services::Registry, d: &Path, digest: &str, key: &str, extra: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cosign_sign.py");
    let out = Command::new("python3")
        .arg(script)
        .args([&registry.addr, "plugins/authz", digest, &format!("{key}.key")])
        .args(extra)
        .current_dir(d)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// OCI modules signed as cosign signs images: the signature manifest beside the module's,
/// its payload naming the manifest digest. Trusted: served; by another key, over another
/// digest, tampered or absent: refused, the previous version serving; a tag moved to an
/// unsigned module is refused, moved back it is served again.
#[test]
fn oci_modules_signed_as_cosign_signs_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    key_pair(d, "release");
    key_pair(d, "stranger");
    let registry = filterplane_e2e::services::Registry::start(d);
    let good = push(&registry, d, &header_module("oci-signed"), "v1");
    cosign_sign(&registry, d, &good, "release", &[]);
    let xds = free_port();
    let ports = EnvoyPorts::new(xds);
    let listener = direct_response_listener("edge", "gw", ports.listener);
    let yaml = d.join("filterplane.yaml");
    let url = |tag: &str| format!("oci://{}/plugins/authz:{tag}", registry.addr);
    // Always: the tag is resolved at each reload, so a moved tag is seen.
    let oci_config = |url: &str| format!("{}    image_pull_policy: Always\n", config(&listener, url));
    fs::write(&yaml, oci_config(&url("v1"))).unwrap();
    let insecure = registry.addr.clone();
    let fp = Filterplane::start_with_args(&yaml, d, xds, free_port(), &["--insecure-registry", &insecure]);
    let envoy = Envoy::start(&example_bootstrap("gateway/envoy.yaml", ports, "gw"), ports, d, "gw");
    let x_wasm = || envoy.get("/").and_then(|r| r.header("x-wasm").map(str::to_owned));
    wait_until("the cosign-signed OCI module in Envoy", WAIT, || (x_wasm()? == "oci-signed").then_some(()));
    // Envoy's own count of configs it refused, summed over its subscriptions.
    let rejected = || -> u64 {
        let stats =
            filterplane_e2e::http_get(&format!("http://127.0.0.1:{}/stats?filter=update_rejected", ports.admin));
        let body = stats.map(|r| r.body).unwrap_or_default();
        body.lines().filter_map(|l| l.rsplit_once(": ")?.1.trim().parse::<u64>().ok()).sum()
    };
    let rejected_before = rejected();

    for (tag, key, extra, kind) in [
        ("v2", "stranger", &[][..], "signature_untrusted_key"),
        (
            "v3",
            "release",
            &["sha256:0000000000000000000000000000000000000000000000000000000000000000"][..],
            "signature_invalid",
        ),
        ("v4", "release", &["-", "tamper"][..], "signature_untrusted_key"),
        ("v5", "", &[][..], "signature_missing"),
    ] {
        let digest = push(&registry, d, &header_module(tag), tag);
        if !key.is_empty() {
            let extra: Vec<&str> = extra.iter().map(|e| if *e == "-" { digest.as_str() } else { e }).collect();
            cosign_sign(&registry, d, &digest, key, &extra);
        }
        fs::write(&yaml, oci_config(&url(tag))).unwrap();
        refusal(&fp, kind, &digest);
        assert_eq!(x_wasm().as_deref(), Some("oci-signed"), "{tag}: the previous version keeps serving");
    }

    assert_eq!(rejected(), rejected_before, "Envoy never saw a refused module");

    // The tag moved to an unsigned module, then back.
    fs::write(&yaml, oci_config(&url("v1"))).unwrap();
    wait_until("v1 again", WAIT, || (fp.api("/api/v1/config")["wasm_errors"] == serde_json::json!([])).then_some(()));
    let moved = push(&registry, d, &header_module("moved"), "v1");
    fs::write(&yaml, format!("{}# again\n", oci_config(&url("v1")))).unwrap();
    refusal(&fp, "signature_missing", &moved);
    assert_eq!(x_wasm().as_deref(), Some("oci-signed"));
    let back = push(&registry, d, &header_module("oci-signed"), "v1");
    if back != good {
        cosign_sign(&registry, d, &back, "release", &[]);
    }
    fs::write(&yaml, oci_config(&url("v1"))).unwrap();
    wait_until("served again", WAIT, || {
        (fp.api("/api/v1/config")["wasm_errors"] == serde_json::json!([])).then_some(())
    });
    assert_eq!(x_wasm().as_deref(), Some("oci-signed"));
}
