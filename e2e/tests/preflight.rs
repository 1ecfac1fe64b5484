//! Pre-flight validation with a real Envoy: what passes the descriptor checks but breaks
//! one of Envoy's own rules is refused before any proxy gets it, and what it costs a
//! reload of 10 and 100 changed configs.

use std::{fs, process::Command, time::Duration};

use filterplane_e2e::{
    envoy_bin, filterplane_bin, free_port,
    quickstart::{yaml_with, Quickstart, STAT},
    wait_until, Filterplane,
};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn an_empty_header_key_is_refused_before_any_proxy_sees_it() {
    let mut q = Quickstart::start_with("preflight", false, filterplane_e2e::quickstart::Mode::Sotw, |b| b);
    // The same Filterplane, restarted with the pre-flight Envoy.
    q.fp.extra_args.extend(["--preflight-envoy".to_owned(), envoy_bin().display().to_string()]);
    q.fp.restart();
    let fp = &q.fp;
    let bad = yaml_with("v1").replace("key: x-plugin", "key: \"\"");
    fs::write(&q.yaml, &bad).unwrap();
    let errors = wait_until("the refusal", WAIT, || {
        let c = fp.api("/api/v1/config");
        (c["last_outcome"]["result"] == "failed").then(|| c["last_outcome"]["errors"].clone())
    });
    let e = &errors[0];
    assert!(e["message"].as_str().unwrap().contains("Envoy refuses it (--preflight-envoy)"), "{errors}");
    assert!(e["message"].as_str().unwrap().contains("value length must be at least 1"), "Envoy's own words: {errors}");
    assert_eq!(e["path"], "extension_configs[0]");
    assert_eq!(e["line"], 5);
    // No NACK anywhere: Envoy never got it.
    assert_eq!(q.envoy.stat(&format!("{STAT}.update_rejected")), Some(0));
    assert_eq!(
        fp.metric(
            r#"filterplane_xds_rejects_total{type_url="type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"}"#
        ),
        Some(0.0)
    );
    assert_eq!(q.header().as_deref(), Some("v1"));
    // A good edit still goes through it.
    fs::write(&q.yaml, yaml_with("after-preflight")).unwrap();
    q.wait_for_header("after-preflight");

    // `validate` does the same with --preflight-envoy, and cannot without.
    let file = q.dir.path().join("bad.yaml");
    fs::write(&file, &bad).unwrap();
    let plain = Command::new(filterplane_bin()).args(["validate", "--config"]).arg(&file).output().unwrap();
    assert!(plain.status.success(), "the descriptors allow it");
    let out = Command::new(filterplane_bin())
        .args(["validate", "--config"])
        .arg(&file)
        .arg("--preflight-envoy")
        .arg(envoy_bin())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("bad.yaml:5: extension_configs[0]: Envoy refuses it"), "{stderr}");
}

fn many(n: usize, value: &str) -> String {
    let mut y = String::from("version: 1\nextension_configs:\n");
    for i in 0..n {
        y.push_str(&format!("  - name: hm-{i}\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-{i}, value: \"{value}\" }} }} }} ] }}\n"));
    }
    y
}

/// Reload time with and without pre-flight, for 10 and 100 changed configs (printed; the
/// machines here are too noisy for timed assertions).
#[test]
fn what_pre_flight_adds_to_a_reload() {
    for n in [10, 100] {
        let mut row = Vec::new();
        for preflight in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let yaml = dir.path().join("c.yaml");
            fs::write(&yaml, many(n, "a")).unwrap();
            let envoy = envoy_bin().display().to_string();
            let args: Vec<&str> = if preflight { vec!["--preflight-envoy", &envoy] } else { vec![] };
            let fp = Filterplane::start_with_args(&yaml, dir.path(), free_port(), free_port(), &args);
            wait_until("the first load", WAIT, || {
                (fp.api("/api/v1/config")["last_outcome"]["result"] == "applied").then_some(())
            });
            let mut times = Vec::new();
            for round in 0..3 {
                let before = fp.api("/api/v1/config")["last_attempt_at"].clone();
                fs::write(&yaml, many(n, &format!("r{round}"))).unwrap();
                let ms = wait_until("the reload", WAIT, || {
                    let c = fp.api("/api/v1/config");
                    (c["last_attempt_at"] != before && c["last_outcome"]["result"] == "applied")
                        .then(|| c["last_duration_ms"].as_f64())
                        .flatten()
                });
                times.push(ms);
            }
            times.sort_by(f64::total_cmp);
            row.push(times[1]);
        }
        println!(
            "reload of {n} changed extension configs: {:.1} ms without pre-flight, {:.1} ms with (median of 3)",
            row[0], row[1]
        );
    }
}
