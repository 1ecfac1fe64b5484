//! Tests of `engine.rs`.

use std::{collections::HashMap, path::Path};

use filterplane_config::NodeFacts;

use super::*;
use filterplane_xds::plan::Side;

/// Proxies with what each ACKed or NACKed of entry `hdr`, the time passed in: the
/// engine runs on plain values.
#[derive(Default)]
struct TestFleet(Vec<(NodeFacts, HashMap<String, bool>)>, HashMap<String, Traffic>);

struct Proxy<'a>(&'a NodeFacts, &'a HashMap<String, bool>, Option<&'a Traffic>);

impl Member for Proxy<'_> {
    fn facts(&self) -> &NodeFacts {
        self.0
    }
    fn connected_ms(&self) -> u64 {
        0
    }
    fn replica(&self) -> &str {
        "here"
    }
    fn status(&self, _name: &str, version: &str) -> Option<(bool, bool)> {
        self.1.get(version).map(|acked| (*acked, !*acked))
    }
    fn nack_message(&self) -> Option<&str> {
        Some("refused")
    }
    fn traffic(&self, _since_ms: u64) -> Option<Traffic> {
        self.2.copied()
    }
}

impl Fleet for TestFleet {
    fn visit(&self, f: &mut dyn FnMut(&dyn Member)) {
        for (facts, versions) in &self.0 {
            f(&Proxy(facts, versions, self.1.get(&facts.id)));
        }
    }
    fn reported_since(&self, _ms: u64) -> bool {
        true
    }
    fn shared(&self) -> bool {
        false
    }
}

fn config(value: &str) -> CompiledConfig {
    let yaml = format!(
            "version: 1\nextension_configs:\n  - name: hdr\n    rollout: {{ steps: [50, 100], bake: 10s, max_nacks: 0, ack_timeout: 60s }}\n    typed_config: {{ \"@type\": type.googleapis.com/google.protobuf.StringValue, value: {value} }}\n"
        );
    let parsed = filterplane_config::load::parse_file(Path::new("t.yaml"), &yaml).unwrap();
    filterplane_config::compile(&[parsed]).unwrap()
}

/// The engine stored as rows and read back: the same state.
fn round_trip(engine: &Engine) -> Engine {
    let rows = engine.stored().to_rows().unwrap();
    let again = Engine::from_stored(StoredState::from_rows(&rows, "t").unwrap()).unwrap();
    assert_eq!(again.stored(), engine.stored());
    again
}

fn fleet(n: usize) -> TestFleet {
    TestFleet(
        (0..n).map(|i| (NodeFacts { id: format!("n{i}"), ..Default::default() }, HashMap::new())).collect(),
        HashMap::new(),
    )
}

/// Every proxy on the step's side of the threshold answers `acked` for `version`.
fn answer(engine: &Engine, fleet: &mut TestFleet, version: &str, acked: bool) -> usize {
    let plan = engine.plan();
    let entry = &plan.entries[0];
    let mut on_new = 0;
    for (facts, versions) in &mut fleet.0 {
        if entry.gets_new(&facts.id) {
            versions.insert(version.to_owned(), acked);
            on_new += 1;
        }
    }
    on_new
}

#[test]
fn a_rollout_steps_after_its_bake_and_completes_on_acks() {
    let (v1, v2) = (config("one"), config("two"));
    let new = v2.resources[0].version.to_string();
    let mut engine = Engine::default();
    assert!(engine.on_config(&v1, None, 0).changed, "the entry is kept");
    let started = engine.on_config(&v2, Some(&v1), 1_000);
    assert!(started.changed && started.ended.is_empty());
    assert_eq!(engine.plan().entries[0].threshold, None, "nobody has it before the first tick");
    let mut fleet = fleet(20);
    assert!(engine.tick(&fleet, 1_100).changed, "the first step's members are picked");
    assert_eq!(answer(&engine, &mut fleet, &new, true), 10, "50% of 20");
    assert!(!engine.tick(&fleet, 5_000).changed, "still baking");
    assert!(engine.tick(&fleet, 11_200).changed, "baked and ACKed: the next step");
    assert_eq!(answer(&engine, &mut fleet, &new, true), 20);
    let done = engine.tick(&fleet, 21_300);
    assert_eq!(done.ended, ["completed"]);
    assert!(engine.plan().entries.is_empty() && !engine.active());
    assert_eq!(engine.history()[0].to_version, new);
}

#[test]
fn nacks_over_max_roll_back_and_the_state_round_trips() {
    let (v1, v2) = (config("one"), config("two"));
    let new = v2.resources[0].version.to_string();
    let mut engine = Engine::default();
    engine.on_config(&v1, None, 0);
    engine.on_config(&v2, Some(&v1), 0);
    let mut fleet = fleet(4);
    engine.tick(&fleet, 1);
    answer(&engine, &mut fleet, &new, false);
    let failed = engine.tick(&fleet, 2);
    assert_eq!(failed.ended, ["rolled_back"]);
    let plan = engine.plan();
    assert_eq!(plan.entries[0].threshold, None, "everybody on the last completed version");
    assert_eq!(plan.entries[0].old.as_ref().map(|o| o.version), Some(v1.resources[0].version));
    let again = round_trip(&engine);
    assert_eq!(again.plan(), plan);
    assert!(matches!(engine.act("hdr", "resume", 3), Err(ActionError::Failed(_))));
}

fn config_with(value: &str, rollout: &str) -> CompiledConfig {
    let yaml = format!(
        "version: 1\nextension_configs:\n  - name: hdr\n    rollout: {rollout}\n    typed_config: {{ \"@type\": type.googleapis.com/google.protobuf.StringValue, value: {value} }}\n"
    );
    let parsed = filterplane_config::load::parse_file(Path::new("t.yaml"), &yaml).unwrap();
    filterplane_config::compile(&[parsed]).unwrap()
}

/// Issue 22: every proxy was on v2 and baking its last step when v3 came; v3's rollout
/// started from v1, and 9 of 10 went back to v1 at once. An edit never moves a proxy to
/// an older version: the superseding rollout starts from what each proxy runs.
#[test]
fn an_edit_during_a_rollout_starts_from_what_each_proxy_runs() {
    let (v1, v2, v3) = (config("one"), config("two"), config("three"));
    let (new2, new3) = (v2.resources[0].version, v3.resources[0].version);
    let mut engine = Engine::default();
    engine.on_config(&v1, None, 0);
    engine.on_config(&v2, Some(&v1), 1_000);
    let mut fleet = fleet(10);
    engine.tick(&fleet, 1_100);
    assert_eq!(answer(&engine, &mut fleet, &new2.to_string(), true), 5, "v2's first step: 50 %");
    let on_v2: Vec<String> =
        fleet.0.iter().filter(|(f, _)| engine.plan().entries[0].gets_new(&f.id)).map(|(f, _)| f.id.clone()).collect();

    let superseded = engine.on_config(&v3, Some(&v2), 2_000);
    assert_eq!(superseded.ended, ["superseded"]);
    let plan = engine.plan();
    let entry = &plan.entries[0];
    assert_eq!(entry.threshold, None, "v3's step is picked at the next tick");
    for (facts, _) in &fleet.0 {
        let gets = match entry.side(&facts.id) {
            Side::New => new3,
            Side::Carried(i) => entry.carried[i].1.version,
            Side::Old => entry.old.as_ref().unwrap().version,
        };
        let had = if on_v2.contains(&facts.id) { new2 } else { v1.resources[0].version };
        assert_eq!(gets, had, "{} keeps what it runs until v3 reaches it", facts.id);
    }
    // The state, carried version included, survives a restart.
    let rows = engine.stored().to_rows().unwrap();
    let again = Engine::from_stored(StoredState::from_rows(&rows, "t").unwrap()).unwrap();
    assert_eq!(again.plan(), plan);
    // Once v3's threshold covers v2's proxies, nobody is left on v2; at the end, all on v3.
    engine.tick(&fleet, 2_100);
    answer(&engine, &mut fleet, &new3.to_string(), true);
    engine.tick(&fleet, 13_000);
    assert!(engine.plan().entries[0].carried.is_empty(), "v3 at 100 % covers every v2 proxy");
    answer(&engine, &mut fleet, &new3.to_string(), true);
    assert_eq!(engine.tick(&fleet, 24_000).ended, ["completed"]);
}

/// `steps: [100]`: every proxy gets the new version at the first tick, and the rollout
/// still watches it: done once all ACKed and the bake passed.
#[test]
fn steps_of_100_alone_put_everybody_on_the_new_version_at_once_and_watch_it() {
    let spec = "{ steps: [100], bake: 1s }";
    let (v1, v2) = (config_with("one", spec), config_with("two", spec));
    let mut engine = Engine::default();
    engine.on_config(&v1, None, 0);
    engine.on_config(&v2, Some(&v1), 1_000);
    let mut all = fleet(6);
    engine.tick(&all, 1_100);
    assert_eq!(answer(&engine, &mut all, &v2.resources[0].version.to_string(), true), 6, "everybody at once");
    assert_eq!(engine.tick(&all, 2_200).ended, ["completed"]);
}

/// Right after a start, a step does not pick its proxies from the first few back: it
/// waits for the settle time, then holds max(1, ⌈p % × n⌉) of the whole fleet.
#[test]
fn a_step_is_not_picked_before_the_proxies_are_back() {
    let (v1, v2) =
        (config_with("one", "{ steps: [5, 100], bake: 10s }"), config_with("two", "{ steps: [5, 100], bake: 10s }"));
    let mut engine = Engine::default();
    engine.settle_until(5_000);
    engine.on_config(&v1, None, 0);
    engine.on_config(&v2, Some(&v1), 0);
    let mut all = fleet(4);
    let first_back = TestFleet(vec![all.0[3].clone()], HashMap::new());
    assert!(!engine.tick(&first_back, 1_000).changed, "settling: no pick from one proxy of four");
    assert_eq!(engine.plan().entries[0].threshold, None);
    engine.tick(&all, 5_000);
    assert_eq!(answer(&engine, &mut all, &v2.resources[0].version.to_string(), true), 1, "5 % of 4: one");
}

/// Issue 24: a version Envoy accepts but that fails requests fails its step's health gate
/// and rolls back, with the figures; a healthy one completes; without enough requests a
/// step waits.
#[test]
fn a_step_whose_traffic_fails_a_gate_rolls_back_like_a_nack() {
    let gated = "{ steps: [25, 100], bake: 15s, health: { max_5xx_ratio: 0.05, min_requests: 50, max_wait: 30s } }";
    let (v1, v2) = (config_with("one", gated), config_with("two", gated));
    let new = v2.resources[0].version.to_string();
    let mut engine = Engine::default();
    engine.on_config(&v1, None, 0);
    engine.on_config(&v2, Some(&v1), 0);
    let mut fleet = fleet(4);
    engine.tick(&fleet, 1);
    assert_eq!(answer(&engine, &mut fleet, &new, true), 1);
    let plan = engine.plan();
    let member = fleet.0.iter().find(|(f, _)| plan.entries[0].gets_new(&f.id)).map(|(f, _)| f.id.clone()).unwrap();
    // Too few requests yet: no verdict, whatever the ratio.
    fleet.1.insert(member.clone(), Traffic { requests: 10.0, errors_5xx: 10.0, proxies: 1, ..Default::default() });
    assert!(engine.tick(&fleet, 2_000).ended.is_empty());
    let view = &engine.views(&fleet)[0];
    assert_eq!(view.health.as_ref().map(|h| h.requests), Some(10.0), "live health in the view");
    // Enough requests and the gate crossed: fails at once, during the bake.
    fleet.1.insert(member, Traffic { requests: 80.0, errors_5xx: 40.0, proxies: 1, ..Default::default() });
    let failed = engine.tick(&fleet, 3_000);
    assert_eq!(failed.ended, ["rolled_back"]);
    let h = &engine.history()[0];
    assert_eq!(h.failures[0].node_id, "health gate");
    assert!(h.failures[0].message.contains("5xx ratio 0.5000 (40 of 80 requests on 1 proxies)"), "{:?}", h.failures);
    assert_eq!(engine.plan().entries[0].threshold, None, "everybody back on the last completed version");
    // Gates and their absent options are stored and read back (redb and etcd).
    round_trip(&engine);

    // A healthy version passes every gate and completes.
    let v3 = config_with("three", gated);
    let newer = v3.resources[0].version.to_string();
    engine.on_config(&v3, Some(&v2), 10_000);
    let mut fleet = fleet_with_traffic(4, 100.0, 1.0);
    engine.tick(&fleet, 10_001);
    answer(&engine, &mut fleet, &newer, true);
    assert!(engine.tick(&fleet, 20_000).ended.is_empty(), "baking");
    engine.tick(&fleet, 25_002);
    answer(&engine, &mut fleet, &newer, true);
    assert_eq!(engine.tick(&fleet, 40_003).ended, ["completed"]);
}

fn fleet_with_traffic(n: usize, requests: f64, errors_5xx: f64) -> TestFleet {
    let mut f = fleet(n);
    for (facts, _) in &f.0 {
        f.1.insert(facts.id.clone(), Traffic { requests, errors_5xx, proxies: 1, ..Default::default() });
    }
    f
}
