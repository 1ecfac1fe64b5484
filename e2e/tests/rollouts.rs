//! Progressive rollouts with ten real Envoys on the quickstart config: the first step's
//! proxies only, then all; a version Envoy refuses rolled back (or halted) with only the
//! step's proxies ever seeing it; pause, resume, promote, abort through the CLI with the
//! token; a restart mid-rollout resumes without any proxy changing version.

use std::{fs, process::Command, time::Duration};

use filterplane_e2e::{
    example_bootstrap, filterplane_bin, free_port,
    quickstart::{yaml_envoy_refuses, yaml_with, STAT},
    wait_until, Envoy, EnvoyPorts, Filterplane,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const PROXIES: usize = 10;

fn with_rollout(yaml: &str, rollout: &str) -> String {
    format!("{yaml}\nrollout: {rollout}\n")
}

struct Fleet {
    fp: Filterplane,
    envoys: Vec<Envoy>,
    yaml: std::path::PathBuf,
    token: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Fleet {
    fn headers(&self) -> Vec<Option<String>> {
        filterplane_e2e::plugin_headers(&self.envoys)
    }

    fn count(&self, value: &str) -> usize {
        filterplane_e2e::count_plugin(&self.envoys, value)
    }

    fn wait_count(&self, value: &str, n: usize) {
        filterplane_e2e::wait_plugin_count(&self.envoys, value, n, WAIT);
    }

    fn write(&self, text: &str) {
        fs::write(&self.yaml, text).unwrap();
    }

    fn rollout(&self) -> Value {
        self.fp.api("/api/v1/rollouts")
    }

    fn wait_rollout(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        // An answer missed under load (the admin client gives up after 5 s) is waited out
        // like one that does not match yet.
        wait_until(what, WAIT, || {
            let reply = self.fp.get("/api/v1/rollouts")?;
            let v: Value = serde_json::from_str(&reply.body).ok()?;
            f(&v).then_some(v)
        })
    }

    fn cli(&self, args: &[&str], token: bool) -> (bool, String) {
        let mut cmd = Command::new(filterplane_bin());
        cmd.args(["rollout"]).args(args).args(["--admin", &self.fp.url("")]);
        if token {
            cmd.arg("--token-file").arg(&self.token);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    fn rejected(&self) -> Vec<u64> {
        self.envoys.iter().map(|e| e.stat(&format!("{STAT}.update_rejected")).unwrap_or(0)).collect()
    }

    fn successes(&self) -> Vec<u64> {
        self.envoys.iter().map(|e| e.stat(&format!("{STAT}.update_success")).unwrap_or(0)).collect()
    }
}

fn start(rollout: &str) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    fs::write(&yaml, with_rollout(&yaml_with("v1"), rollout)).unwrap();
    let token = dir.path().join("token");
    fs::write(&token, "rollout-token\n").unwrap();
    let mut fp = Filterplane::start_with_args(
        &yaml,
        dir.path(),
        free_port(),
        free_port(),
        &["--admin-token-file", token.to_str().unwrap()],
    );
    fp.token = Some("rollout-token".into());
    let envoys = (0..PROXIES)
        .map(|i| {
            let ports = EnvoyPorts::new(fp.xds_port);
            let node = format!("fleet-{i}");
            Envoy::start(&example_bootstrap("quickstart/envoy.yaml", ports, &node), ports, dir.path(), &node)
        })
        .collect();
    let fleet = Fleet { fp, envoys, yaml, token, dir };
    fleet.wait_count("v1", PROXIES);
    fleet
}

/// The two tests here each load the 2 cores fully (ten Envoys; a thousand simulated
/// proxies ramping against a debug build): run side by side, each starved the other of
/// its timeouts in full-suite runs. One at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn ten_envoys_step_by_step_rollback_halt_and_operator_actions() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let spec = "{ steps: [10, 100], bake: 5s, ack_timeout: 20s, on_failure: rollback }";
    let f = start(spec);

    // Keep-alive clients on every Envoy through the rollout and the rollback below.
    let traffic: Vec<_> = f
        .envoys
        .iter()
        .map(|e| filterplane_e2e::traffic::Traffic::start(e.listener_port, 1, "/", "x-plugin"))
        .collect();

    // v2: one Envoy (10 % of 10) first, the others after the bake.
    f.write(&with_rollout(&yaml_with("v2"), spec));
    let v = f.wait_rollout("the first step ACKed", |v| v["rollouts"][0]["acked"] == 1);
    assert_eq!((v["rollouts"][0]["percent"].clone(), v["rollouts"][0]["on_new"].clone()), (10.into(), 1.into()), "{v}");
    assert_eq!((f.count("v2"), f.count("v1")), (1, PROXIES - 1), "during the first step only its proxy runs v2");
    f.wait_count("v2", PROXIES);
    let v = f.wait_rollout("the rollout to complete", |v| v["rollouts"].as_array().is_some_and(|a| a.is_empty()));
    assert_eq!(v["history"][0]["outcome"], "completed");

    // A version every Envoy refuses: only the step's proxy ever receives it; rolled back.
    let before = f.rejected();
    let nack_started = std::time::Instant::now();
    f.write(&with_rollout(&yaml_envoy_refuses(1024), spec));
    let v = f.wait_rollout("the rollback", |v| v["rollouts"][0]["status"] == "failed");
    let rollback_took = nack_started.elapsed();
    let r = &v["rollouts"][0];
    assert_eq!(r["percent"], 0, "{v}");
    assert!(r["reason"].as_str().unwrap().contains("rolled back"), "{v}");
    assert!(r["failures"][0]["message"].as_str().unwrap().contains("Buffer"), "Envoy's own message: {v}");
    let after = f.rejected();
    let saw: Vec<usize> = (0..PROXIES).filter(|i| after[*i] > before[*i]).collect();
    assert_eq!(saw.len(), 1, "only the first step's proxy ever received it: {saw:?}");
    assert_eq!(f.count("v2"), PROXIES, "everyone still runs v2");
    println!("refused version: write -> rolled back: {} ms", rollback_took.as_millis());
    assert_eq!(v["history"][0]["outcome"], "rolled_back");
    // The page shows it, Envoy's message included.
    let browser = filterplane_e2e::browser::Browser::start(f.dir.path());
    browser.goto(&f.fp.url("/"));
    browser.eval("document.getElementById('token').value = 'rollout-token'; document.getElementById('sign-in').click(); return true;");
    wait_until("the page to show the failed rollout", WAIT, || {
        let t = browser.text("#rollouts");
        (t.contains("add-header") && t.contains("failed") && t.contains("Buffer")).then_some(())
    });
    assert!(browser.text("#rollout-history").contains("rolled_back"));

    // Through the rollout and the rollback, every response a 200 with the plugin's header.
    let mut seen = filterplane_e2e::traffic::Tally::default();
    for t in traffic {
        let tally = t.stop();
        seen.responses += tally.responses;
        assert_eq!((tally.not_ok(), tally.without_header()), (0, 0), "{tally}");
        for (k, v) in tally.by_header {
            *seen.by_header.entry(k).or_default() += v;
        }
    }
    println!(
        "ten Envoys through the rollout and the rollback: {} responses, all 200: {:?}",
        seen.responses, seen.by_header
    );

    // The same with halt: the step keeps what it has (Envoy kept v2), nobody else gets it.
    let halt = spec.replace("rollback", "halt");
    let rolled_back = r["new_version"].clone();
    f.write(&with_rollout(&yaml_envoy_refuses(2048), &halt));
    let v = f.wait_rollout("the halt", |v| {
        v["rollouts"][0]["status"] == "failed" && v["rollouts"][0]["new_version"] != rolled_back
    });
    assert_eq!(v["rollouts"][0]["percent"], 10, "halted where it was: {v}");
    assert_eq!(v["history"][0]["outcome"], "halted");
    let halted = f.rejected();
    assert_eq!((0..PROXIES).filter(|i| halted[*i] > after[*i]).count(), 1);

    // Back to v2, the last completed version: over at once.
    f.write(&with_rollout(&yaml_with("v2"), spec));
    f.wait_rollout("the revert", |v| v["rollouts"].as_array().is_some_and(|a| a.is_empty()));

    // Operators: pause, resume, promote, abort; the token is required.
    let slow = "{ steps: [10, 100], bake: 10m, ack_timeout: 20s }";
    f.write(&with_rollout(&yaml_with("v3"), slow));
    f.wait_rollout("v3's first step", |v| v["rollouts"][0]["acked"] == 1);
    let (ok, out) = f.cli(&["pause", "add-header"], false);
    assert!(!ok && out.contains("--token-file"), "{out}");
    let (ok, out) = f.cli(&["pause", "add-header"], true);
    assert!(ok, "{out}");
    assert_eq!(f.rollout()["rollouts"][0]["status"], "paused");
    let (ok, out) = f.cli(&["status"], true);
    assert!(ok && out.contains("add-header  PAUSED  step 1/2 (10%"), "{out}");
    let (ok, out) = f.cli(&["resume", "add-header"], true);
    assert!(ok, "{out}");
    let (ok, out) = f.cli(&["promote", "add-header"], true);
    assert!(ok, "{out}");
    f.wait_count("v3", PROXIES);
    assert_eq!(f.rollout()["history"][0]["outcome"], "promoted");

    f.write(&with_rollout(&yaml_with("v4"), slow));
    f.wait_rollout("v4's first step", |v| v["rollouts"][0]["acked"] == 1);
    assert_eq!(f.count("v4"), 1);
    let (ok, out) = f.cli(&["abort", "add-header"], true);
    assert!(ok, "{out}");
    f.wait_count("v3", PROXIES);
    let v = f.rollout();
    assert_eq!(
        (v["rollouts"][0]["status"].clone(), v["history"][0]["outcome"].clone()),
        ("failed".into(), "aborted".into()),
        "{v}"
    );

    // A restart mid-rollout: the same step, and no proxy changes version.
    f.write(&with_rollout(&yaml_with("v5"), slow));
    f.wait_rollout("v5's first step", |v| v["rollouts"][0]["acked"] == 1);
    let headers = f.headers();
    let successes = f.successes();
    let mut f = f;
    f.fp.restart();
    f.wait_rollout("the proxies back after the restart", |v| {
        v["rollouts"][0]["matching_proxies"] == PROXIES && v["rollouts"][0]["acked"] == 1
    });
    let v = f.rollout();
    assert_eq!(v["rollouts"][0]["percent"], 10, "the same step: {v}");
    assert_eq!(f.headers(), headers, "no proxy changed version across the restart");
    assert_eq!(f.successes(), successes, "and none was sent anything new");
    assert!(f.fp.metric(r#"filterplane_rollout_step{name="add-header"}"#) == Some(10.0));
    drop(f.dir);
}

/// A thousand simulated proxies (xds-loadgen's engine, SotW, one connection each) through
/// `steps: [5, 25, 100]`: each step's share of the fleet, measured from the rollout view.
#[test]
fn a_thousand_proxies_step_by_step() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    let spec = "{ steps: [5, 25, 100], bake: 2s, ack_timeout: 60s }";
    fs::write(&yaml, with_rollout(&yaml_with("v1"), spec)).unwrap();
    let fp = Filterplane::start_with_args(&yaml, dir.path(), free_port(), free_port(), &[]);
    let load = filterplane_bench::LoadSpec {
        change: Some(filterplane_bench::Change {
            file: yaml.clone(),
            from: "value: v1".into(),
            to: "value: v2".into(),
        }),
        ..filterplane_bench::LoadSpec::sotw(format!("http://127.0.0.1:{}", fp.xds_port), 1000, "add-header", "sim")
    };
    let loadgen = std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(filterplane_bench::run(load)).map_err(|e| e.to_string())
    });
    // Each step's proxies on the new version, as the rollout view counts them.
    let mut seen: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
    while !loadgen.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        // A poll the admin does not answer within the harness's 5 s (the ramp's load on
        // a debug build) is a sample missed, not a step miscounted: the next one counts.
        let Some(v) = fp.get("/api/v1/rollouts").and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
        else {
            continue;
        };
        if let Some(r) = v["rollouts"].as_array().and_then(|a| a.first()) {
            let (p, on, of) = (
                r["percent"].as_u64().unwrap_or(0),
                r["on_new"].as_u64().unwrap_or(0),
                r["matching_proxies"].as_u64().unwrap_or(0),
            );
            let e = seen.entry(p).or_default();
            *e = (e.0.max(on), e.1.max(of));
        }
    }
    let report = loadgen.join().unwrap().unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    println!("1,000 proxies, steps [5, 25, 100]: on the new version at each step (of matching): {seen:?}");
    for (p, (on, of)) in seen.iter().filter(|(p, _)| **p < 100) {
        assert_eq!(*of, 1000, "every proxy matched");
        let share = *on as f64 / *of as f64 * 100.0;
        assert!((share - *p as f64).abs() <= 2.0, "step {p}%: {on} of {of} ({share:.1}%)");
    }
    assert!(seen.contains_key(&5) && seen.contains_key(&25), "{seen:?}");
    // The last step still bakes after every proxy has v2.
    wait_until("the rollout to complete", WAIT, || {
        (fp.api("/api/v1/rollouts")["history"][0]["outcome"] == "completed").then_some(())
    });
}
