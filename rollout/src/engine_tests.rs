//! Tests of `engine.rs`.

use std::{collections::HashMap, path::Path};

use filterplane_config::NodeFacts;

use super::*;

/// Proxies with what each ACKed or NACKed of entry `hdr`, the time passed in: the
/// engine runs on plain values.
#[derive(Default)]
struct TestFleet(Vec<(NodeFacts, HashMap<String, bool>)>);

struct Proxy<'a>(&'a NodeFacts, &'a HashMap<String, bool>);

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
}

impl Fleet for TestFleet {
    fn visit(&self, f: &mut dyn FnMut(&dyn Member)) {
        for (facts, versions) in &self.0 {
            f(&Proxy(facts, versions));
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

fn fleet(n: usize) -> TestFleet {
    TestFleet((0..n).map(|i| (NodeFacts { id: format!("n{i}"), ..Default::default() }, HashMap::new())).collect())
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
    let rows = engine.stored().to_rows().unwrap();
    let again = Engine::from_stored(StoredState::from_rows(&rows, "t").unwrap()).unwrap();
    assert_eq!(again.stored(), engine.stored());
    assert_eq!(again.plan(), plan);
    assert!(matches!(engine.act("hdr", "resume", 3), Err(ActionError::Failed(_))));
}
