//! The quickstart, end to end: the real `filterplane` binary serving a real Envoy 1.40
//! started from `examples/quickstart/envoy.yaml`.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use filterplane_e2e::{
    filterplane_bin,
    quickstart::{example_yaml, yaml_envoy_refuses, yaml_with, Mode, Quickstart, ECDS, STAT, WAIT},
    wait_until,
};

fn epoch_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn extension_config_reaches_envoy_and_edits_roll_out(mode: Mode) {
    let q = Quickstart::start_with(&format!("rollout-{}", mode.stream_kind()), true, mode, |b| b);
    let served = q.fp.api("/api/v1/config")["serving_version"].clone();
    assert_eq!(q.fp.api(&format!("/api/v1/proxies/{}", q.node_id))[0]["stream_kind"], mode.stream_kind());
    let ecds = q.ecds_status();
    assert_eq!(ecds["subscribed"], serde_json::json!(["add-header"]));
    let acked = wait_until("the ACK of the first push", WAIT, || {
        let s = q.ecds_status();
        (!s["acked_version"].is_null() && s["acked_version"] == s["sent_version"]).then_some(s)
    });
    assert_eq!(q.envoy.stat(&format!("{STAT}.update_rejected")), Some(0));

    for (i, value) in ["v2", "v3", "v4"].into_iter().enumerate() {
        let before = epoch_ms();
        let start = Instant::now();
        q.write(&yaml_with(value));
        q.wait_for_header(value);
        let seen = start.elapsed();
        let applied = q.envoy.stat(&format!("{STAT}.update_time")).unwrap_or(0).saturating_sub(before);
        println!("rollout {i}: file write -> Envoy applied {applied} ms, -> curl sees it {} ms", seen.as_millis());
    }
    let after = q.ecds_status();
    assert_ne!(after["acked_version"], acked["acked_version"]);
    assert_eq!(after["acked_version"], after["sent_version"]);
    assert_ne!(q.fp.api("/api/v1/config")["serving_version"], served);
    assert_eq!(q.envoy.stat(&format!("{STAT}.update_success")), Some(4));
}

fn invalid_edit_leaves_envoy_serving_the_previous_config(mode: Mode) {
    let q = Quickstart::start_with(&format!("bad-edit-{}", mode.stream_kind()), true, mode, |b| b);
    let served = q.fp.api("/api/v1/config")["serving_version"].clone();
    let success = q.envoy.stat(&format!("{STAT}.update_success"));

    // A field Envoy's HeaderValue does not have, and then broken YAML.
    for (broken, path_part) in [
        (
            yaml_with("v2").replace("value: v2", "valu: v2"),
            "typed_config.mutations.response_mutations[0].append.header",
        ),
        (yaml_with("v2").replace("mutations:\n", "mutations: [\n"), ""),
    ] {
        q.write(&broken);
        let config = wait_until("the reload to fail", WAIT, || {
            let c = q.fp.api("/api/v1/config");
            (c["last_outcome"]["result"] == "failed" && c["last_outcome"]["errors"][0]["file"].is_string()).then_some(c)
        });
        let err = &config["last_outcome"]["errors"][0];
        assert!(err["file"].as_str().unwrap().ends_with("filterplane.yaml"), "{err}");
        assert!(err["line"].as_u64().is_some(), "{err}");
        assert!(err["path"].as_str().unwrap().contains(path_part), "{err}");
        assert_eq!(config["serving_version"], served, "the last good config keeps serving");
        assert_eq!(q.header().as_deref(), Some("v1"));
        // Reset the outcome so the next case waits for its own failure.
        q.write(&example_yaml());
        wait_until("the unchanged reload", WAIT, || {
            (q.fp.api("/api/v1/config")["last_outcome"]["result"] == "unchanged").then_some(())
        });
    }
    assert_eq!(q.envoy.stat(&format!("{STAT}.update_success")), success, "Envoy got nothing new");
}

fn config_envoy_refuses_is_nacked_and_recorded_with_envoys_message(mode: Mode) {
    let q = Quickstart::start_with(&format!("nacker-{}", mode.stream_kind()), false, mode, |b| b);
    let good = q.wait_synced()["acked_version"].clone();
    let rejects_metric = format!("filterplane_xds_rejects_total{{type_url=\"{ECDS}\"}}");
    assert_eq!(q.fp.metric(&rejects_metric), Some(0.0));

    // Valid for Filterplane, refused by Envoy: twice, with two different configs.
    q.write(&yaml_envoy_refuses(1024));
    let rejects = q.wait_rejects(1);
    let reject = &rejects[0];
    assert_eq!(reject["node_id"], q.node_id.as_str());
    assert_eq!(reject["type_url"], ECDS);
    assert_eq!(reject["resources"], serde_json::json!(["add-header"]));
    assert_eq!(reject["code"], 13);
    assert_eq!(reject["kept_version"], good);
    let message = reject["message"].as_str().unwrap();
    assert!(message.contains("type URL") && message.contains("Buffer"), "Envoy's own message: {message}");

    let status = q.ecds_status();
    assert_eq!(status["state"], "nacked");
    assert_eq!(status["last_nack"]["version"], reject["version"]);
    assert_eq!(status["last_nack"]["message"], reject["message"]);
    assert_eq!(status["acked_version"], good, "the proxy keeps its last ACKed version");
    assert_eq!(q.envoy.stat(&format!("{STAT}.update_rejected")), Some(1));
    assert_eq!(q.header().as_deref(), Some("v1"), "Envoy keeps serving the last good config");
    assert!(q.fp.log_text().contains("NACK"));

    q.write(&yaml_envoy_refuses(2048));
    let rejects = q.wait_rejects(2);
    assert_ne!(rejects[0]["version"], rejects[1]["version"], "newest first, each its own version");
    assert_eq!(q.fp.metric(&rejects_metric), Some(2.0), "one count per reject, no resend loop");

    // `filterplane status` shows the refusal.
    let out = Command::new(filterplane_bin()).args(["status", "--admin", &q.fp.url("")]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let row = table.lines().find(|l| l.starts_with(q.node_id.as_str())).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("NACKED"), "{table}");
    assert!(table.contains("2 recent reject(s)"), "{table}");

    // Fixing the YAML clears the NACK state; the history and the counter stay.
    q.write(&yaml_with("v2"));
    q.wait_for_header("v2");
    let status = q.wait_synced();
    assert!(status["last_nack"].is_null(), "fixing the YAML clears the NACK state: {status}");
    assert!(status["resources"]["add-header"]["nacked_version"].is_null(), "{status}");
    assert_eq!(q.fp.api("/api/v1/rejects").as_array().unwrap().len(), 2);
    assert_eq!(q.fp.metric(&rejects_metric), Some(2.0));
    assert_eq!(q.envoy.stat(&format!("{STAT}.update_rejected")), Some(2));
    let out = Command::new(filterplane_bin()).args(["status", "--admin", &q.fp.url("")]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.lines().any(|l| l.starts_with(q.node_id.as_str()) && l.contains("SYNCED")), "{table}");
}

fn restart_on_the_same_yaml_does_not_make_envoy_reload(mode: Mode) {
    let mut q = Quickstart::start_with(&format!("restart-{}", mode.stream_kind()), false, mode, |b| b);
    let acked = q.wait_synced()["acked_version"].clone();
    let reloads = q.envoy.stat(&format!("{STAT}.config_reload"));
    let successes = q.envoy.stat(&format!("{STAT}.update_success"));
    let version = q.envoy.admin(&format!("/stats?filter={STAT}.version_text")).unwrap().body;

    q.fp.restart();
    // Envoy reconnects and resubscribes with the version it has; Filterplane, having the
    // same version, answers nothing.
    let status = wait_until("Envoy to resubscribe after the restart", Duration::from_secs(30), || {
        let s = q.ecds_status();
        (s["subscribed"] == serde_json::json!(["add-header"])).then_some(s)
    });
    assert!(status["sent_version"].is_null(), "nothing was pushed: {status}");
    assert_eq!(status["state"], "synced", "{status}");
    assert_eq!(status["acked_version"], acked, "shown as running the version it had");
    assert_eq!(q.envoy.stat("control_plane.connected_state"), Some(1));
    assert_eq!(q.envoy.stat(&format!("{STAT}.config_reload")), reloads);
    assert_eq!(q.envoy.stat(&format!("{STAT}.update_success")), successes);
    assert_eq!(q.envoy.admin(&format!("/stats?filter={STAT}.version_text")).unwrap().body, version);

    // The new process still rolls out changes.
    q.write(&yaml_with("after-restart"));
    q.wait_for_header("after-restart");
}

#[test]
fn sighup_forces_a_reload() {
    let q = Quickstart::start("hup", false);
    let unchanged = r#"filterplane_config_reloads_total{result="unchanged"}"#;
    let before = q.fp.metric(unchanged).unwrap_or(0.0);
    q.fp.signal("-HUP");
    // Counted, not read from "last": any other reload after the signal would hide it.
    let mut seen = serde_json::Value::Null;
    let waited = std::time::Instant::now();
    while q.fp.metric(unchanged).unwrap_or(0.0) <= before {
        seen = q.fp.api("/api/v1/config");
        assert!(waited.elapsed() < WAIT, "no reload after SIGHUP within {WAIT:?}; /api/v1/config: {seen}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let config = q.fp.api("/api/v1/config");
    assert_eq!(config["last_trigger"], "SIGHUP", "{config} (before: {seen})");
    assert_eq!(config["last_outcome"]["result"], "unchanged", "{config}");
    assert!(q.fp.log_text().contains(r#"config unchanged"#));
}

#[test]
fn validate_prints_every_error_and_sets_the_exit_code() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart/filterplane.yaml");
    let ok = Command::new(filterplane_bin()).arg("validate").arg("--config").arg(&example).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("valid, 1 resource(s)"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = example_yaml().replace("value: v1", "valu: v1")
        + "  - name: add-header\n    typed_config: { \"@type\": type.googleapis.com/envoy.Nope }\n";
    fs::write(&bad, text).unwrap();
    let out = Command::new(filterplane_bin()).arg("validate").arg("--config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.yaml:10: extension_configs[0].typed_config.mutations.response_mutations[0].append.header: unrecognized field name 'valu'"), "{stderr}");
    assert!(stderr.contains("extension_configs[1].name: duplicate extension config name"), "{stderr}");
    assert!(stderr.contains("extension_configs[1].typed_config.@type: unknown type"), "{stderr}");
    assert!(stderr.contains("3 error(s)"), "{stderr}");
}

/// After the extension config leaves the YAML: with delta, Filterplane names it in
/// `removed_resources` and Envoy falls back to the filter's `default_config`. State of the
/// world cannot say "removed" for ECDS (xDS protocol, "Deleting resources": absence
/// deletes only LDS/CDS resources), so Envoy keeps the last config it had.
fn removal_falls_back_to_default_config(mode: Mode) {
    let discovery = "config_discovery:\n";
    let q = Quickstart::start_with(&format!("removal-{}", mode.stream_kind()), false, mode, |b| {
        assert!(b.contains(discovery));
        b.replace(
            discovery,
            &format!("{discovery}                      default_config:\n                        \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n                        mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-plugin, value: default }} }} }} ] }}\n"),
        )
    });
    // Removing everything served is held by the removal guard until confirmed; SIGHUP is
    // the operator's confirmation (as `filterplane reload --confirm` is).
    q.write("version: 1\nextension_configs: []\n");
    wait_until("the removal to be held", WAIT, || {
        (q.fp.api("/api/v1/config")["last_outcome"]["result"] == "held").then_some(())
    });
    assert_eq!(q.header().as_deref(), Some("v1"), "nothing changed while held");
    match mode {
        Mode::Delta => q.fp.signal("-HUP"),
        Mode::Sotw => {
            let out = std::process::Command::new(filterplane_e2e::filterplane_bin())
                .args(["reload", "--confirm", "--admin", &q.fp.url("")])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.starts_with("applied"),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    match mode {
        Mode::Delta => q.wait_for_header("default"),
        Mode::Sotw => {
            wait_until("Envoy to ACK the response without add-header", WAIT, || {
                let s = q.ecds_status();
                (s["state"] == "synced" && s["resources"].as_object().is_some_and(|r| r.is_empty())).then_some(())
            });
            assert_eq!(q.header().as_deref(), Some("v1"), "SotW cannot remove an ECDS config from Envoy");
        }
    }
    q.write(&yaml_with("back"));
    q.wait_for_header("back");
}

/// Every scenario runs against Envoy in both xDS modes.
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod sotw {
            $(#[test] fn $name() { super::$name(super::Mode::Sotw) })*
        }
        mod delta {
            $(#[test] fn $name() { super::$name(super::Mode::Delta) })*
        }
    };
}

in_both_modes!(
    extension_config_reaches_envoy_and_edits_roll_out,
    invalid_edit_leaves_envoy_serving_the_previous_config,
    config_envoy_refuses_is_nacked_and_recorded_with_envoys_message,
    restart_on_the_same_yaml_does_not_make_envoy_reload,
    removal_falls_back_to_default_config,
);
