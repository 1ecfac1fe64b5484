//! Three Filterplane replicas sharing state through a real etcd, with real Envoys spread
//! across them (each Envoy's xDS cluster lists two replicas, the second as failover): a
//! rollout steps fleet-wide; the leader killed mid-rollout, another continues at the same
//! step, and the Envoys that fail over reload nothing; etcd unreachable, every replica
//! keeps serving and rollouts pause, saying why; a NACK on proxies of other replicas fails
//! a rollout the leader drives, and so do their stats failing a health gate.

use std::{fs, path::PathBuf, time::Duration};

use filterplane_e2e::{
    example_text, free_port,
    quickstart::{yaml_envoy_refuses, yaml_with, STAT},
    services::EtcdServer,
    wait_until, Envoy, EnvoyPorts, Filterplane,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(40);
const ENVOYS: usize = 6;

/// The quickstart bootstrap, its xDS cluster on two replicas: `primary`, then `backup`
/// (priority 1, used once a TCP health check finds the primary gone; `no_traffic_interval`
/// too, since Envoy counts one long xDS stream as no traffic and would check every 60 s).
fn bootstrap(node: &str, ports: EnvoyPorts, primary: u16, backup: u16) -> String {
    let text = example_text("quickstart/envoy.yaml");
    let endpoints = "      load_assignment:\n        cluster_name: filterplane\n        endpoints:\n          - lb_endpoints:\n              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 18000 } } }";
    assert!(text.contains(endpoints), "the quickstart bootstrap changed shape");
    let two = format!(
        "      health_checks:\n        - timeout: 1s\n          interval: 1s\n          no_traffic_interval: 1s\n          unhealthy_interval: 1s\n          unhealthy_threshold: 1\n          healthy_threshold: 1\n          tcp_health_check: {{}}\n      load_assignment:\n        cluster_name: filterplane\n        endpoints:\n          - priority: 0\n            lb_endpoints:\n              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {primary} }} }} }}\n          - priority: 1\n            lb_endpoints:\n              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {backup} }} }} }}"
    );
    text.replace(endpoints, &two)
        .replace("port_value: 10000", &format!("port_value: {}", ports.listener))
        .replace("port_value: 9901", &format!("port_value: {}", ports.admin))
        .lines()
        .map(|l| if l.starts_with("  id: ") { format!("  id: {node}") } else { l.to_owned() })
        .collect::<Vec<_>>()
        .join("\n")
}

struct Fleet {
    etcd: EtcdServer,
    replicas: Vec<Option<Filterplane>>,
    envoys: Vec<Envoy>,
    yaml: PathBuf,
    _dir: tempfile::TempDir,
}

fn with_rollout(yaml: &str, rollout: &str) -> String {
    format!("{yaml}\nrollout: {rollout}\n")
}

impl Fleet {
    fn start(prefix: &str, config: &str) -> Fleet {
        Fleet::start_with(prefix, config, |b| b)
    }

    /// As `start`, each Envoy's bootstrap passed through `bootstrap` first.
    fn start_with(prefix: &str, config: &str, edit: impl Fn(String) -> String) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let etcd = EtcdServer::start(dir.path());
        let yaml = dir.path().join("filterplane.yaml");
        fs::write(&yaml, config).unwrap();
        let token = dir.path().join("token");
        fs::write(&token, "replica-token\n").unwrap();
        let store = etcd.url(prefix);
        let replicas: Vec<Option<Filterplane>> = (0..3)
            .map(|i| {
                let logs = dir.path().join(format!("r{i}"));
                fs::create_dir_all(&logs).unwrap();
                let name = format!("r{i}");
                let mut fp = Filterplane::start_with_args(
                    &yaml,
                    &logs,
                    free_port(),
                    free_port(),
                    &["--state-store", &store, "--replica-name", &name, "--admin-token-file", token.to_str().unwrap()],
                );
                fp.token = Some("replica-token".into());
                Some(fp)
            })
            .collect();
        let ports: Vec<u16> = replicas.iter().map(|r| r.as_ref().map_or(0, |r| r.xds_port)).collect();
        let envoys = (0..ENVOYS)
            .map(|i| {
                let node = format!("replicated-{i}");
                let p = EnvoyPorts::new(ports[i % 3]);
                Envoy::start(&edit(bootstrap(&node, p, ports[i % 3], ports[(i + 1) % 3])), p, dir.path(), &node)
            })
            .collect();
        Fleet { etcd, replicas, envoys, yaml, _dir: dir }
    }

    fn any(&self) -> &Filterplane {
        self.replicas.iter().flatten().next().expect("a replica runs")
    }

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

    /// `/api/v1/rollouts` of every running replica, once `f` holds for each.
    fn wait_all(&self, what: &str, f: impl Fn(&Value) -> bool) -> Vec<Value> {
        wait_until(what, WAIT, || {
            let views: Vec<Value> = self.replicas.iter().flatten().map(|r| r.api("/api/v1/rollouts")).collect();
            views.iter().all(&f).then_some(views)
        })
    }

    fn leader(&self) -> String {
        wait_until("one leader", WAIT, || {
            let v = self.any().api("/api/v1/rollouts");
            v["shared"]["leader"].as_str().filter(|l| !l.is_empty()).map(str::to_owned)
        })
    }
}

#[test]
fn three_replicas_step_fleet_wide_survive_their_leader_and_pause_without_etcd() {
    let spec = "{ steps: [50, 100], bake: 60s, ack_timeout: 30s }";
    let mut f = Fleet::start("steps", &with_rollout(&yaml_with("v1"), spec));
    f.wait_count("v1", ENVOYS);

    // Every replica's summary shows the whole fleet, and which replica has whom.
    let summary = wait_until("every replica's report", WAIT, || {
        let s = f.replicas[2].as_ref().unwrap().api("/api/v1/summary");
        (s["proxies"] == ENVOYS && s["replicas"].as_array().map(Vec::len) == Some(3)).then_some(s)
    });
    let shares: Vec<u64> =
        summary["replicas"].as_array().unwrap().iter().map(|r| r["proxies"].as_u64().unwrap()).collect();
    assert_eq!(shares, [2, 2, 2], "{summary}");
    assert_eq!(summary["replicas"].as_array().unwrap().iter().filter(|r| r["leader"] == true).count(), 1, "{summary}");
    let leader = f.leader();

    // v2: half of the fleet (3 of 6, wherever they are connected) first.
    f.write(&with_rollout(&yaml_with("v2"), spec));
    let views = f.wait_all("the first step ACKed on every replica's view", |v| {
        v["rollouts"][0]["percent"] == 50 && v["rollouts"][0]["acked"] == 3 && v["rollouts"][0]["matching_proxies"] == 6
    });
    println!("first step: {}", views[0]["rollouts"][0]);
    f.wait_count("v2", 3);
    assert_eq!(f.count("v1"), 3, "the other half keeps v1: {:?}", f.headers());
    let threshold = views[0]["rollouts"][0]["step_started_at"].clone();

    // The leader dies mid-step. Its Envoys fail over to their second replica.
    let dead: usize = leader.trim_start_matches('r').parse().unwrap();
    let failing_over: Vec<usize> = (0..ENVOYS).filter(|i| i % 3 == dead).collect();
    let counters = |i: usize| {
        let e = &f.envoys[i];
        [
            e.stat(&format!("{STAT}.update_success")).unwrap_or(0),
            e.stat("listener_manager.lds.update_success").unwrap_or(0),
            e.stat("cluster_manager.cds.update_success").unwrap_or(0),
        ]
    };
    let before: Vec<[u64; 3]> = failing_over.iter().map(|&i| counters(i)).collect();
    f.replicas[dead].take().unwrap().kill();
    let new_leader = wait_until("another replica to lead", WAIT, || {
        let v = f.any().api("/api/v1/rollouts");
        v["shared"]["leader"].as_str().filter(|l| !l.is_empty() && *l != leader).map(str::to_owned)
    });
    println!("leader {leader} killed; {new_leader} leads");
    wait_until("the failed-over Envoys on the other replicas", WAIT, || {
        (f.any().api("/api/v1/summary")["proxies"] == ENVOYS).then_some(())
    });
    // Reconnected: nothing reloaded (the same versions, so nothing was sent). A window
    // in which nothing may happen, so a fixed one.
    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<[u64; 3]> = failing_over.iter().map(|&i| counters(i)).collect();
    assert_eq!(before, after, "ECDS, LDS, CDS updates of the Envoys that failed over");
    let v = f.any().api("/api/v1/rollouts");
    assert_eq!(v["rollouts"][0]["percent"], 50, "the same step: {v}");
    assert_eq!(v["rollouts"][0]["step_started_at"], threshold, "not restarted: {v}");
    assert_eq!(f.count("v2"), 3, "{:?}", f.headers());

    // The new leader carries on: a shorter bake (same version) completes it.
    let short = "{ steps: [50, 100], bake: 1s, ack_timeout: 30s }";
    f.write(&with_rollout(&yaml_with("v2"), short));
    f.wait_all("the rollout completed", |v| v["rollouts"].as_array().is_some_and(Vec::is_empty));
    f.wait_count("v2", ENVOYS);
    let history = f.any().api("/api/v1/rollouts")["history"][0].clone();
    assert_eq!(history["outcome"], "completed", "{history}");

    // etcd unreachable: the replicas keep serving, a started rollout does not move, and
    // the API says why; back, it carries on.
    let short3 = "{ steps: [50, 100], bake: 2s, ack_timeout: 30s }";
    f.write(&with_rollout(&yaml_with("v3"), short3));
    f.wait_all("v3's first step", |v| v["rollouts"][0]["percent"] == 50 && v["rollouts"][0]["acked"] == 3);
    f.etcd.kill();
    let views = f.wait_all("the replicas to say etcd is unreachable", |v| {
        v["paused_because"].as_str().is_some_and(|r| r.contains("etcd is unreachable"))
    });
    println!("without etcd: {}", views[0]["paused_because"]);
    // Past the 2 s bake with nothing moving: a window in which nothing may happen.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(f.count("v3"), 3, "still half, past the bake: {:?}", f.headers());
    assert_eq!(f.count("v2"), 3, "{:?}", f.headers());
    let v = f.any().api("/api/v1/rollouts");
    assert_eq!(v["rollouts"][0]["percent"], 50, "paused at its step: {v}");
    f.etcd.restart();
    f.wait_count("v3", ENVOYS);
    f.wait_all("the rollout completed once etcd is back", |v| {
        v["paused_because"].is_null() && v["rollouts"].as_array().is_some_and(Vec::is_empty)
    });
}

#[test]
fn nacks_on_other_replicas_fail_the_rollout_the_leader_drives() {
    // Four NACKs are allowed: the leader's own two proxies cannot fail it alone.
    let spec = "{ steps: [100], bake: 1s, ack_timeout: 30s, max_nacks: 4, on_failure: rollback }";
    let f = Fleet::start("nacks", &with_rollout(&yaml_with("v1"), spec));
    f.wait_count("v1", ENVOYS);
    let leader = f.leader();
    f.write(&with_rollout(&yaml_envoy_refuses(1024), spec));
    let views =
        f.wait_all("the rollout rolled back on every replica's view", |v| v["history"][0]["outcome"] == "rolled_back");
    let failures: Vec<String> = views[0]["history"][0]["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["node_id"].as_str().unwrap_or("").to_owned())
        .collect();
    println!("leader {leader}; failures: {failures:?}");
    assert!(failures.len() > 4, "{failures:?}");
    assert!(
        failures.iter().any(|n| n.contains(" (on r") && !n.ends_with(&format!("(on {leader})"))),
        "NACKs of proxies on other replicas counted: {failures:?}"
    );
    // Envoy refused it, so every proxy still runs v1.
    f.wait_count("v1", ENVOYS);
}

/// The fault filter as `add-header` (the quickstart listener's discovered filter, its
/// type allowed instead of HeaderMutation), aborting `abort` % of requests with 503.
fn fault(abort: u32) -> String {
    format!(
        "  - name: add-header\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault\n      abort: {{ http_status: 503, percentage: {{ numerator: {abort}, denominator: HUNDRED }} }}\n"
    )
}

/// Issue 24: health gates count every replica's proxies. The gated entry is only for
/// proxies on replicas that do not lead, so the leader judges the step on the stats other
/// replicas report: a version that answers 503 rolls back.
#[test]
fn a_health_gate_fails_on_stats_of_proxies_on_replicas_that_do_not_lead() {
    let sink = {
        let doc = fs::read_to_string(filterplane_e2e::workspace_root().join("docs/rollouts.md")).unwrap();
        let at = doc.find("**Envoy's side.**").unwrap();
        let start = at + doc[at..].find("```yaml\n").unwrap() + "```yaml\n".len();
        doc[start..start + doc[start..].find("```").unwrap()].to_owned()
    };
    let config = |entries: &str| format!("version: 1\nextension_configs:\n{entries}");
    let f = Fleet::start_with("gates", &config(&fault(0)), |b| {
        b.replace(
            "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        )
        .replace("static_resources:", &format!("{sink}static_resources:"))
    });
    for e in &f.envoys {
        wait_until("the healthy fault filter", WAIT, || (e.get("/")?.status == 200).then_some(()));
    }
    let leader = f.leader();
    let others: Vec<String> =
        (0..ENVOYS).filter(|i| format!("r{}", i % 3) != leader).map(|i| format!("replicated-{i}")).collect();
    let gated = |abort: u32| {
        format!(
            "{}    node_selector: {{ ids: [{}] }}\n    rollout: {{ steps: [25, 100], bake: 10s, health: {{ max_5xx_ratio: 0.05, min_requests: 50 }} }}\n{}",
            fault(abort),
            others.join(", "),
            fault(0)
        )
    };
    f.write(&config(&gated(0)));
    let traffic: Vec<filterplane_e2e::traffic::Traffic> =
        f.envoys.iter().map(|e| filterplane_e2e::traffic::Traffic::start(e.listener_port, 1, "/", "x-none")).collect();
    std::thread::sleep(Duration::from_secs(3));
    f.write(&config(&gated(100)));
    let views = f.wait_all("the gated rollout rolled back", |v| v["history"][0]["outcome"] == "rolled_back");
    let failure = &views[0]["history"][0]["failures"][0];
    assert_eq!(failure["node_id"], "health gate", "{}", views[0]);
    let served_503: Vec<u64> =
        traffic.into_iter().map(|t| t.stop().by_status.get(&503).copied().unwrap_or(0)).collect();
    println!("leader {leader}; 503s per Envoy {served_503:?}");
    for (i, n) in served_503.iter().enumerate() {
        if format!("r{}", i % 3) == leader {
            assert_eq!(*n, 0, "the leader's proxies never had the gated entry");
        }
    }
    assert!(served_503.iter().any(|n| *n > 0), "the step's proxy (on another replica) served the bad version");
}
