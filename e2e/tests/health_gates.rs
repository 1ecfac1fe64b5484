//! Rollouts gated on the proxies' own traffic: four real Envoys stream their stats to
//! Filterplane (the metrics service sink, as docs/rollouts.md writes it), keep-alive
//! clients on each. A version Envoy accepts but that fails requests (Envoy's fault filter
//! aborting with 503) fails its first step's 5xx gate and rolls back: only the step's
//! proxy ever answered 503. The same version without `health:` reaches all four. A
//! healthy version passes every gate and completes.

use std::{
    fs,
    time::{Duration, Instant},
};

use filterplane_e2e::{
    direct_response_listener, example_bootstrap, free_port,
    services::{header_module, trapping_module},
    traffic::Traffic,
    wait_until, workspace_root, Envoy, EnvoyPorts, Filterplane,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const GATED: &str = "{ steps: [25, 100], bake: 15s, health: { max_5xx_ratio: 0.05, min_requests: 50 } }";

/// The bootstrap lines docs/rollouts.md gives for the metrics service sink.
fn sink_snippet() -> String {
    let doc = fs::read_to_string(workspace_root().join("docs/rollouts.md")).unwrap();
    let at = doc.find("**Envoy's side.**").expect("the sink section");
    let block = &doc[at..];
    let start = block.find("```yaml\n").unwrap() + "```yaml\n".len();
    let end = start + block[start..].find("```").unwrap();
    block[start..end].to_owned()
}

/// The fault filter: `abort` percent of requests answered `status`.
fn config(listeners: &str, abort: u32, status: u32, rollout: &str) -> String {
    format!(
        r#"version: 1
listeners:
{listeners}extension_configs:
  - name: fault
    rollout: {rollout}
    placement: {{ phase: AUTHN }}
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
      abort:
        http_status: {status}
        percentage: {{ numerator: {abort}, denominator: HUNDRED }}
"#
    )
}

fn rollouts(fp: &Filterplane) -> Value {
    fp.api("/api/v1/rollouts")
}

/// `n` Envoys with the metrics sink, each with its own served listener (in `listeners`),
/// started on `yaml` as `config(listeners)` writes it, with keep-alive clients on each.
struct Gated {
    fp: Filterplane,
    envoys: Vec<Envoy>,
    traffic: Vec<Traffic>,
    listeners: String,
    yaml: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn start(n: usize, config: impl Fn(&str) -> String, files: &[(&str, Vec<u8>)]) -> Gated {
    start_with(n, config, files, false)
}

/// As `start`; with `deltas`, each sink reports counters as deltas and the node says so.
fn start_with(n: usize, config: impl Fn(&str) -> String, files: &[(&str, Vec<u8>)], deltas: bool) -> Gated {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        fs::write(dir.path().join(name), bytes).unwrap();
    }
    let xds = free_port();
    let ports: Vec<EnvoyPorts> = (0..n).map(|_| EnvoyPorts::new(xds)).collect();
    let listeners: String = ports
        .iter()
        .enumerate()
        .map(|(i, p)| direct_response_listener(&format!("l{i}"), &format!("e{i}"), p.listener))
        .collect();
    let yaml = dir.path().join("filterplane.yaml");
    fs::write(&yaml, config(&listeners)).unwrap();
    let fp = Filterplane::start_with_args(&yaml, dir.path(), xds, free_port(), &[]);
    let mut sink = sink_snippet();
    if deltas {
        sink = sink.replace(
            "transport_api_version: V3\n",
            "transport_api_version: V3\n      report_counters_as_deltas: true\n",
        );
        assert!(sink.contains("report_counters_as_deltas"), "{sink}");
    }
    let envoys: Vec<Envoy> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut bootstrap = example_bootstrap("gateway/envoy.yaml", *p, &format!("e{i}"))
                .replace("static_resources:", &format!("{sink}static_resources:"));
            if deltas {
                bootstrap = bootstrap.replace(
                    "  cluster: gateway\n",
                    "  cluster: gateway\n  metadata: { filterplane.stats_counters: deltas }\n",
                );
            }
            Envoy::start(&bootstrap, *p, dir.path(), &format!("e{i}"))
        })
        .collect();
    for e in &envoys {
        wait_until("the listener with the first version", WAIT, || (e.get("/")?.status == 200).then_some(()));
    }
    let traffic: Vec<Traffic> = ports.iter().map(|p| Traffic::start(p.listener, 1, "/", "x-wasm")).collect();
    wait_until("stats from every Envoy", WAIT, || {
        fp.log_text().matches("stats stream opened").count().ge(&n).then_some(())
    });
    Gated { fp, envoys, traffic, listeners, yaml, _dir: dir }
}

#[test]
fn a_version_that_fails_requests_fails_its_step_gate_and_rolls_back() {
    let Gated { fp, envoys, traffic, listeners, yaml, _dir } = start(4, |l| config(l, 0, 503, GATED), &[]);

    // A version Envoy accepts and that answers every request 503.
    let written = Instant::now();
    fs::write(&yaml, config(&listeners, 100, 503, GATED)).unwrap();
    let mut first_503 = None;
    let failed = wait_until("the rollout to fail its health gate", WAIT, || {
        if first_503.is_none() && envoys.iter().any(|e| e.get("/").is_some_and(|r| r.status == 503)) {
            first_503 = Some(Instant::now());
        }
        let r = rollouts(&fp);
        (r["history"][0]["outcome"] == "rolled_back").then(|| r["history"][0].clone())
    });
    let rolled_back = Instant::now();
    let failure = &failed["failures"][0];
    assert_eq!(failure["node_id"], "health gate", "{failed}");
    assert!(failure["message"].as_str().unwrap().contains("over max_5xx_ratio 0.05"), "{failed}");
    let metrics = filterplane_e2e::http_get(&fp.url("/metrics")).unwrap().body;
    assert!(metrics.contains("filterplane_rollout_gate_failures_total{gate=\"max_5xx_ratio\"} 1"), "{metrics}");
    // Every Envoy answers 200 again; only the step's proxy ever answered 503.
    for e in &envoys {
        wait_until("200 again", WAIT, || (e.get("/")?.status == 200).then_some(()));
    }
    std::thread::sleep(Duration::from_millis(500));
    let tallies: Vec<_> = traffic.iter().map(Traffic::take).collect();
    let saw_503: Vec<u64> = tallies.iter().map(|t| t.by_status.get(&503).copied().unwrap_or(0)).collect();
    assert_eq!(saw_503.iter().filter(|n| **n > 0).count(), 1, "one proxy served the bad version: {saw_503:?}");
    let first_503 = first_503.expect("the step's proxy answered 503 before the rollback");
    eprintln!(
        "first 503 seen {:?} after the write; rolled back {:?} after it ({:?} after the write); 503s per Envoy {saw_503:?}",
        first_503 - written,
        rolled_back - first_503,
        rolled_back - written
    );

    // A healthy version passes every gate and completes.
    fs::write(&yaml, config(&listeners, 0, 500, GATED)).unwrap();
    let live = wait_until("live health of the step", WAIT, || {
        let r = rollouts(&fp);
        let h = &r["rollouts"][0]["health"];
        (h["requests"].as_f64()? > 0.0).then(|| h.clone())
    });
    assert_eq!(live["errors_5xx"], 0.0, "{live}");
    // The page shows it beside the ACK counts (a real browser).
    let browser = filterplane_e2e::browser::Browser::start(_dir.path());
    browser.goto(&fp.url("/"));
    wait_until("the page's step health", WAIT, || {
        let t = browser.text("#rollouts");
        (t.contains("health: ") && t.contains("with stats, 5xx 0.00 %")).then_some(())
    });
    drop(browser);
    wait_until("the healthy rollout to complete", WAIT, || {
        (rollouts(&fp)["history"][0]["outcome"] == "completed").then_some(())
    });

    // The bad version without `health:` reaches all four.
    fs::write(&yaml, config(&listeners, 100, 503, "{ steps: [25, 100], bake: 2s }")).unwrap();
    for e in &envoys {
        wait_until("503 everywhere without gates", WAIT, || (e.get("/")?.status == 503).then_some(()));
    }
    assert_eq!(rollouts(&fp)["history"][0]["outcome"], "completed", "ACKs alone let it through");
    for t in traffic {
        t.stop();
    }
}

/// A Wasm plugin whose new module traps on every request (Envoy accepts it): with
/// `FAIL_RELOAD`, Envoy counts its VM reloads, and `max_wasm_failures: 0` rolls it back.
#[test]
fn a_wasm_plugin_that_traps_fails_the_wasm_gate() {
    let plugin = |listeners: &str, module: &str| {
        format!(
            "version: 1\nlisteners:\n{listeners}wasm_plugins:\n  - name: authz\n    url: file://{module}\n    fail_strategy: FAIL_RELOAD\n    placement: {{ phase: AUTHN }}\n    rollout: {{ steps: [50, 100], bake: 10s, health: {{ max_wasm_failures: 0, min_requests: 10 }} }}\n"
        )
    };
    let files = [("good.wasm", header_module("good")), ("trap.wasm", trapping_module())];
    let g = start(2, |l| plugin(l, "good.wasm"), &files);
    for e in &g.envoys {
        wait_until("the good module", WAIT, || (e.get("/")?.header("x-wasm")? == "good").then_some(()));
    }
    fs::write(&g.yaml, plugin(&g.listeners, "trap.wasm")).unwrap();
    let failed = wait_until("the rollout to fail its Wasm gate", WAIT, || {
        let r = rollouts(&g.fp);
        (r["history"][0]["outcome"] == "rolled_back").then(|| r["history"][0].clone())
    });
    assert!(failed["failures"][0]["message"].as_str().unwrap().contains("Wasm VM failures"), "{failed}");
    for e in &g.envoys {
        wait_until("the good module back", WAIT, || (e.get("/")?.header("x-wasm")? == "good").then_some(()));
    }
    std::thread::sleep(Duration::from_millis(300));
    let not_ok: Vec<u64> = g.traffic.into_iter().map(|t| t.stop().not_ok()).collect();
    assert_eq!(
        not_ok.iter().filter(|n| **n > 0).count(),
        1,
        "only the step's proxy ran the trapping module: {not_ok:?}"
    );
}

/// Background errors on every proxy (the old version fails 2 % of requests too): judged
/// against the proxies still on the old version, a new version that adds no errors
/// completes; judged by the ratio alone, the same change fails its 1 % gate.
#[test]
fn with_background_errors_the_baseline_lets_a_version_that_adds_none_through() {
    let with_baseline =
        "{ steps: [25, 100], bake: 5s, health: { max_5xx_ratio: 0.01, min_requests: 200, baseline_margin: 0.02 } }";
    let ratio_only = "{ steps: [25, 100], bake: 5s, health: { max_5xx_ratio: 0.01, min_requests: 200 } }";
    let g = start(4, |l| config(l, 2, 503, with_baseline), &[]);
    fs::write(&g.yaml, config(&g.listeners, 2, 500, with_baseline)).unwrap();
    let done = wait_until("the rollout judged against its baseline", WAIT, || {
        let h = rollouts(&g.fp)["history"][0].clone();
        (h["to_version"].is_string() && h["outcome"] != "superseded").then_some(h)
    });
    assert_eq!(done["outcome"], "completed", "{done}");
    fs::write(&g.yaml, config(&g.listeners, 2, 503, ratio_only)).unwrap();
    let failed = wait_until("the same change judged by its ratio alone", WAIT, || {
        let h = rollouts(&g.fp)["history"][0].clone();
        (h["to_version"] != done["to_version"]).then_some(h)
    });
    assert_eq!(failed["outcome"], "rolled_back", "{failed}");
    assert!(failed["failures"][0]["message"].as_str().unwrap().contains("over max_5xx_ratio 0.01"), "{failed}");
    for t in g.traffic {
        t.stop();
    }
}

/// The sink with `report_counters_as_deltas: true` (and the node saying so): the same
/// failing version fails the same gate.
#[test]
fn delta_counters_are_added_up_and_fail_the_gate_the_same() {
    let g = start_with(2, |l| config(l, 0, 503, GATED), &[], true);
    assert!(g.fp.log_text().contains("deltas=true"), "the stats streams read deltas");
    fs::write(&g.yaml, config(&g.listeners, 100, 503, GATED)).unwrap();
    let failed = wait_until("the rollout to fail its health gate", WAIT, || {
        let r = rollouts(&g.fp);
        (r["history"][0]["outcome"] == "rolled_back").then(|| r["history"][0].clone())
    });
    assert!(failed["failures"][0]["message"].as_str().unwrap().contains("over max_5xx_ratio 0.05"), "{failed}");
    for t in g.traffic {
        t.stop();
    }
}

/// A version that answers slowly (the fault filter delaying every request 400 ms): the
/// step's request time p99, from Envoy's own histogram, crosses `max_p99_latency`.
#[test]
fn a_slow_version_fails_the_latency_gate() {
    let slow = |listeners: &str, delay: &str| {
        format!(
            "version: 1\nlisteners:\n{listeners}extension_configs:\n  - name: fault\n    rollout: {{ steps: [50, 100], bake: 15s, health: {{ max_p99_latency: 250ms, min_requests: 5 }} }}\n    placement: {{ phase: AUTHN }}\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault\n      delay: {{ fixed_delay: {delay}, percentage: {{ numerator: 100, denominator: HUNDRED }} }}\n"
        )
    };
    let g = start(2, |l| slow(l, "0.001s"), &[]);
    fs::write(&g.yaml, slow(&g.listeners, "0.4s")).unwrap();
    let failed = wait_until("the rollout to fail its latency gate", WAIT, || {
        let r = rollouts(&g.fp);
        (r["history"][0]["outcome"] == "rolled_back").then(|| r["history"][0].clone())
    });
    let message = failed["failures"][0]["message"].as_str().unwrap();
    assert!(message.contains("over max_p99_latency 250ms"), "{failed}");
    for t in g.traffic {
        t.stop();
    }
}
