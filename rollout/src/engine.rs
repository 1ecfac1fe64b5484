//! The rollout engine, pure: each call takes what happened (a new config, a tick with the
//! fleet as it is, an operator's action, state another replica stored) and the time, and
//! moves the state; what the caller must then do (save, count, forget) comes back as
//! `Effects`, and the plan to serve is one call away. No I/O, no clock, no lock.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use filterplane_api::ResourceType;
use filterplane_config::{model::OnFailure, CompiledConfig, CompiledResource, NodeSelector};
use filterplane_xds::plan::{Plan, PlanEntry};

use crate::{
    fleet::{each_matching, threshold_for, Fleet, Member, Traffic},
    gates::{judge, Verdict},
    state::{
        ActionError, Active, Baseline, Carried, DecodeError, EntryState, Failures, HistoryEntry, RolloutView, Status,
        StepHealth, StoredResource, StoredState,
    },
};

/// How many past rollouts are kept.
pub const HISTORY: usize = 100;

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn key(name: &str, selector: &NodeSelector) -> String {
    format!("{name}\0{selector:?}")
}

fn e_name(k: &str) -> &str {
    k.split('\0').next().unwrap_or(k)
}

/// What the step's proxies that run `new` (rank within `threshold`) and the others did
/// since `since_ms`, from their stats.
fn step_traffic(fleet: &dyn Fleet, e: &EntryState, new: &str, threshold: u64, since_ms: u64) -> (Traffic, Traffic) {
    let (mut step, mut baseline) = (Traffic::default(), Traffic::default());
    each_matching(fleet, e, &mut |m: &dyn Member, r: u64| {
        let Some(t) = m.traffic(since_ms) else { return };
        if r > threshold {
            baseline.add(&t);
        } else if m.status(&e.name, new).is_some_and(|(acked, _)| acked) {
            step.add(&t);
        }
    });
    (step, baseline)
}

/// What the caller applies after a call.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// The state changed: save it (where this replica writes) and tell whoever watches.
    pub changed: bool,
    /// Rollouts that ended, by outcome (`completed`, `promoted`, `rolled_back`, `halted`,
    /// `aborted`, `reverted`, `superseded`): each is counted.
    pub ended: Vec<&'static str>,
    /// Entries no longer under rollout: their step gauge goes.
    pub forgotten: Vec<String>,
    /// Health gates that failed a rollout, by name (`max_5xx_ratio`, ...): each counted.
    pub gate_failures: Vec<&'static str>,
}

/// Every rollout: each entry's state, the last completed versions (decoded once), the
/// history, and the versions the config this replica serves has.
#[derive(Debug, Default)]
pub struct Engine {
    entries: BTreeMap<String, EntryState>,
    old: BTreeMap<String, Arc<CompiledResource>>,
    /// Each active rollout's carried versions, decoded once (as `Active::carried`).
    carried: BTreeMap<String, Vec<(u64, Arc<CompiledResource>)>>,
    /// No step picks its proxies before this (ms since the epoch): see `settle_until`.
    settle_until_ms: u64,
    history: VecDeque<HistoryEntry>,
    config_versions: BTreeMap<String, String>,
}

impl Engine {
    /// The engine as `stored` left it.
    pub fn from_stored(stored: StoredState) -> Result<Self, DecodeError> {
        let mut engine = Engine::default();
        for e in stored.entries {
            if let Some(old) = &e.last_completed {
                engine.old.insert(key(&e.name, &e.selector), Arc::new(old.to_compiled()?));
            }
            let k = key(&e.name, &e.selector);
            engine.entries.insert(k.clone(), e);
            engine.decode_carried(&k);
        }
        engine.history = stored.history.into_iter().collect();
        Ok(engine)
    }

    /// No step picks its proxies before `ms`: the server sets it to its start plus the
    /// time proxies take to reconnect, so a step is picked from the whole fleet.
    pub fn settle_until(&mut self, ms: u64) {
        self.settle_until_ms = ms;
    }

    /// Decodes entry `k`'s carried versions (a version that does not decode is left out:
    /// its proxies get the last completed one).
    fn decode_carried(&mut self, k: &str) {
        let layers: Vec<(u64, Arc<CompiledResource>)> = self
            .entries
            .get(k)
            .and_then(|e| e.active.as_ref())
            .map(|a| {
                a.carried
                    .iter()
                    .filter_map(|c| c.version.to_compiled().ok().map(|r| (c.threshold, Arc::new(r))))
                    .collect()
            })
            .unwrap_or_default();
        if layers.is_empty() {
            self.carried.remove(k);
        } else {
            self.carried.insert(k.to_owned(), layers);
        }
    }

    /// What a store keeps.
    pub fn stored(&self) -> StoredState {
        StoredState {
            entries: self.entries.values().cloned().collect(),
            history: self.history.iter().cloned().collect(),
        }
    }

    /// Takes in what another replica stored. An entry whose stored state does not know
    /// the version this replica's config has (the leader has not read the edit yet) keeps
    /// this replica's own, so nobody gets a new version before its rollout exists.
    pub fn sync(&mut self, stored: StoredState) {
        let knows = |e: &EntryState, v: &str| {
            e.active.as_ref().is_some_and(|a| a.new.version == v)
                || e.last_completed.as_ref().is_some_and(|l| l.version == v)
        };
        let mut entries = BTreeMap::new();
        for e in stored.entries {
            let k = key(&e.name, &e.selector);
            let take = match self.config_versions.get(&k) {
                Some(v) => knows(&e, v),
                // Not in this replica's config (yet): keep it for when it is.
                None => self.config_versions.is_empty(),
            };
            if take {
                entries.insert(k, e);
            }
        }
        for (k, e) in &self.entries {
            entries.entry(k.clone()).or_insert_with(|| e.clone());
        }
        if entries != self.entries {
            for (k, e) in &entries {
                let same_old = self.entries.get(k).map(|o| &o.last_completed) == Some(&e.last_completed);
                if same_old {
                    continue;
                }
                match e.last_completed.as_ref().map(StoredResource::to_compiled) {
                    Some(Ok(r)) => {
                        self.old.insert(k.clone(), Arc::new(r));
                    }
                    _ => {
                        self.old.remove(k);
                    }
                }
            }
            self.old.retain(|k, _| entries.contains_key(k));
            self.entries = entries;
            let keys: Vec<String> = self.entries.keys().cloned().collect();
            self.carried.clear();
            for k in keys {
                self.decode_carried(&k);
            }
        }
        self.history = stored.history.into_iter().collect();
    }

    fn finish(&mut self, k: &str, outcome: &'static str, now_ms: u64, effects: &mut Effects) {
        let Some(e) = self.entries.get_mut(k) else { return };
        let Some(a) = e.active.take() else { return };
        self.carried.remove(k);
        effects.ended.push(outcome);
        tracing::info!(entry = %e.name, outcome, version = %a.new.version, "rollout ended");
        let from_version = e.last_completed.as_ref().map(|l| l.version.clone());
        let done = matches!(outcome, "completed" | "promoted");
        if done {
            e.last_completed = Some(a.new.clone());
        }
        let entry = HistoryEntry {
            name: e.name.clone(),
            from_version,
            to_version: a.new.version.clone(),
            outcome: outcome.to_owned(),
            started_at: rfc3339(a.started_ms),
            ended_at: rfc3339(now_ms),
            failures: a.failures,
            failure_count: a.failure_count,
        };
        if done {
            if let Ok(r) = a.new.to_compiled() {
                self.old.insert(k.to_owned(), Arc::new(r));
            }
        }
        self.history.push_front(entry);
        self.history.truncate(HISTORY);
    }

    /// A new config: starts, continues or ends the rollouts its entries call for.
    /// `previous` is the config served until now (`None` for the first of this
    /// process): what proxies run of an entry that gets a rollout. Only entries with a
    /// rollout are kept; `changed` only when something did.
    pub fn on_config(&mut self, config: &CompiledConfig, previous: Option<&CompiledConfig>, now_ms: u64) -> Effects {
        let mut effects = Effects::default();
        self.config_versions = config
            .resources
            .iter()
            .filter(|r| r.resource_type == ResourceType::ExtensionConfig && r.rollout.is_some())
            .map(|r| (key(&r.name, &r.selector), r.version.to_string()))
            .collect();
        let mut changed = false;
        let mut seen = HashSet::new();
        for r in config.resources.iter().filter(|r| r.resource_type == ResourceType::ExtensionConfig) {
            let k = key(&r.name, &r.selector);
            let Some(spec) = &r.rollout else {
                // No rollout: at once, and nothing to keep.
                if self.entries.contains_key(&k) {
                    self.finish(&k, "superseded", now_ms, &mut effects);
                    effects.forgotten.push(r.name.clone());
                    self.entries.remove(&k);
                    self.old.remove(&k);
                    changed = true;
                }
                continue;
            };
            seen.insert(k.clone());
            if !self.entries.contains_key(&k) {
                // What the proxies run now: the entry as served until now; at the start of
                // a process without state, this config (nothing to protect); none for a
                // new entry (it rolls out from nothing).
                let running = match previous {
                    None => Some(r),
                    Some(p) => p.resources.iter().find(|o| {
                        o.resource_type == ResourceType::ExtensionConfig && o.name == r.name && o.selector == r.selector
                    }),
                };
                if let Some(run) = running {
                    self.old.insert(k.clone(), run.clone());
                }
                self.entries.insert(
                    k.clone(),
                    EntryState {
                        name: r.name.clone(),
                        selector: r.selector.clone(),
                        last_completed: running.map(|r| StoredResource::from(r.as_ref())),
                        active: None,
                    },
                );
                changed = true;
            }
            let version = r.version.to_string();
            let Some(state) = self.entries.get(&k) else { continue };
            let completed = state.last_completed.as_ref().map(|l| l.version.clone());
            let new_of_active = state.active.as_ref().map(|a| a.new.version.clone());
            if completed.as_deref() == Some(version.as_str()) {
                // Edited back to the last completed version: over at once.
                if new_of_active.is_some() {
                    self.finish(&k, "reverted", now_ms, &mut effects);
                    changed = true;
                }
            } else if new_of_active.as_deref() == Some(version.as_str()) {
                if let Some(a) = self.entries.get_mut(&k).and_then(|e| e.active.as_mut()) {
                    if a.spec != *spec {
                        // Same version, new settings: stay at the step, within the new steps.
                        a.spec = spec.clone();
                        a.step = a.step.min(a.spec.steps.len().saturating_sub(1));
                        changed = true;
                    }
                }
            } else {
                // What the superseded rollout's proxies run stays theirs: its version as far
                // as its threshold reached, and what it carried itself.
                let carried = self.entries.get(&k).and_then(|e| e.active.as_ref()).map(carry).unwrap_or_default();
                if new_of_active.is_some() {
                    self.finish(&k, "superseded", now_ms, &mut effects);
                }
                if let Some(e) = self.entries.get_mut(&k) {
                    tracing::info!(entry = %r.name, version = %version, steps = ?spec.steps, "rollout started");
                    e.active = Some(Active {
                        spec: spec.clone(),
                        new: StoredResource::from(r.as_ref()),
                        step: 0,
                        threshold: None,
                        started_ms: now_ms,
                        step_started_ms: now_ms,
                        status: Status::Running,
                        failures: Vec::new(),
                        failure_count: 0,
                        reason: None,
                        carried,
                        baseline: None,
                    });
                }
                self.decode_carried(&k);
                changed = true;
                // The first step's members are picked at the next tick (it sees the
                // proxies); until then nobody has the new version.
            }
        }
        let before = self.entries.len();
        effects.forgotten.extend(self.entries.iter().filter(|(k, _)| !seen.contains(*k)).map(|(_, e)| e.name.clone()));
        self.entries.retain(|k, _| seen.contains(k));
        self.old.retain(|k, _| seen.contains(k));
        self.carried.retain(|k, _| seen.contains(k));
        effects.changed = changed || self.entries.len() != before;
        effects
    }

    /// The plan for the current state.
    pub fn plan(&self) -> Plan {
        let entries = self
            .entries
            .iter()
            .filter_map(|(k, e)| {
                let a = e.active.as_ref()?;
                // A layer the new version's threshold covers has no proxy left on it.
                let covered = a.threshold.unwrap_or(0);
                let carried = self
                    .carried
                    .get(k)
                    .map(|layers| {
                        layers.iter().filter(|(t, _)| a.threshold.is_none() || *t > covered).cloned().collect()
                    })
                    .unwrap_or_default();
                Some(PlanEntry {
                    name: e.name.clone(),
                    selector: e.selector.clone(),
                    threshold: a.threshold,
                    carried,
                    old: self.old.get(k).cloned(),
                })
            })
            .collect();
        Plan { entries }
    }

    /// Moves running rollouts along, from what `fleet` says of the proxies at `now_ms`.
    /// Only the replica that drives rollouts calls it.
    pub fn tick(&mut self, fleet: &dyn Fleet, now_ms: u64) -> Effects {
        let mut effects = Effects::default();
        if !self.running() {
            return effects;
        }
        let now = now_ms;
        let shared = fleet.shared();
        let keys: Vec<String> = self.entries.keys().cloned().collect();
        for k in keys {
            let Some(e) = self.entries.get(&k) else { continue };
            let Some(a) = e.active.clone() else { continue };
            if a.status != Status::Running {
                continue;
            }
            // Every replica must have reported since the step began: a proxy of a report
            // made before it would be missing or stale, so the step's members could not be
            // picked from the whole fleet, and the step could complete without one.
            if !fleet.reported_since(a.step_started_ms) {
                continue;
            }
            // Proxies this entry is for (one per node: by rank, a hash of the node id),
            // read where they are (no copy per proxy per tick); the step's members are
            // judged in the same pass once the step has its threshold.
            let threshold = a.threshold;
            let new_version = a.new.version.as_str();
            let ack_timeout = a.spec.ack_timeout.as_millis() as u64;
            let mut ranks: Vec<u64> = Vec::new();
            let mut failures = Failures::default();
            let mut waiting = 0usize;
            each_matching(fleet, e, &mut |m: &dyn Member, r: u64| {
                ranks.push(r);
                if threshold.is_none_or(|t| r > t) {
                    return;
                }
                let Some((acked, nacked)) = m.status(&e.name, new_version) else { return };
                if acked {
                    return;
                }
                if nacked {
                    failures.push(
                        || if shared { format!("{} (on {})", m.facts().id, m.replica()) } else { m.facts().id.clone() },
                        || m.nack_message().unwrap_or_default().to_owned(),
                    );
                    return;
                }
                let since = a.step_started_ms.max(m.connected_ms());
                if now.saturating_sub(since) > ack_timeout {
                    failures.push(
                        || m.facts().id.clone(),
                        || format!("no ACK within {} (ack_timeout)", humantime::format_duration(a.spec.ack_timeout)),
                    );
                } else {
                    waiting += 1;
                }
            });
            let percent = a.percent();
            let mut measured_baseline = None;
            let health = match (&a.spec.health, a.threshold) {
                (Some(spec), Some(t)) => {
                    let (step, mut baseline) = step_traffic(fleet, e, new_version, t, a.step_started_ms);
                    if baseline.requests > 0.0 {
                        measured_baseline = Some(Baseline {
                            requests: baseline.requests,
                            errors_5xx: baseline.errors_5xx,
                            proxies: baseline.proxies,
                        });
                    } else if let Some(b) = a.baseline {
                        // The last step has no proxy left on the old version: the figures
                        // of the step before stand in.
                        baseline = Traffic {
                            requests: b.requests,
                            errors_5xx: b.errors_5xx,
                            proxies: b.proxies,
                            ..Traffic::default()
                        };
                    }
                    let elapsed = Duration::from_millis(now.saturating_sub(a.step_started_ms));
                    judge(spec, &step, &baseline, elapsed, a.spec.bake)
                }
                _ => Verdict::Pass,
            };
            let threshold = match a.threshold {
                Some(t) => t,
                // Right after this process started, proxies are still coming back: a step
                // picked from the first few would hold more than its share once the rest
                // are back (the first to reconnect, and the ones the hash picks).
                None if now < self.settle_until_ms => continue,
                None => {
                    let t = threshold_for(percent, ranks);
                    if let Some(active) = self.entries.get_mut(&k).and_then(|e| e.active.as_mut()) {
                        active.threshold = Some(t);
                        active.step_started_ms = now;
                    }
                    effects.changed = true;
                    continue;
                }
            };
            if failures.count > a.spec.max_nacks as usize {
                self.fail(&k, failures, None, now, &mut effects);
                effects.changed = true;
                continue;
            }
            if let Verdict::Fail(gate, why) = &health {
                effects.gate_failures.push(gate);
                // A gate that fails is a failure of the rollout, exactly like a NACK.
                let mut failures = failures;
                failures.push(|| "health gate".to_owned(), || why.clone());
                let outcome = if a.spec.on_failure == OnFailure::Rollback { "rolled back" } else { "halted" };
                let reason = format!("health gate failed at step {}: {why}: {outcome}", a.step + 1);
                self.fail_with(&k, failures, reason, a.spec.on_failure == OnFailure::Rollback, now, &mut effects);
                effects.changed = true;
                continue;
            }
            let baked = now.saturating_sub(a.step_started_ms) >= a.spec.bake.as_millis() as u64;
            if waiting == 0 && baked && health == Verdict::Pass {
                if a.last_step() {
                    self.finish(&k, "completed", now, &mut effects);
                } else if let Some(active) = self.entries.get_mut(&k).and_then(|e| e.active.as_mut()) {
                    active.step += 1;
                    if measured_baseline.is_some() {
                        active.baseline = measured_baseline;
                    }
                    // Never below the last step's: a proxy on the new version stays on it.
                    let next = threshold_for(active.percent(), ranks);
                    active.threshold = Some(next.max(threshold));
                    active.step_started_ms = now;
                    (active.failures, active.failure_count) = (failures.examples, failures.count);
                    tracing::info!(entry = %e_name(&k), percent = active.percent(), "rollout step");
                }
                effects.changed = true;
            } else if let Some(active) = self.entries.get_mut(&k).and_then(|e| e.active.as_mut()) {
                if (active.failure_count, &active.failures) != (failures.count, &failures.examples) {
                    (active.failures, active.failure_count) = (failures.examples, failures.count);
                    effects.changed = true;
                }
            }
        }
        effects
    }

    /// Fails the rollout of `k`: on NACKs over `max_nacks` (`reason` `None`; it rolls back
    /// or halts as `on_failure` says), or for `reason` (an operator's abort: rolled back).
    fn fail(&mut self, k: &str, failures: Failures, reason: Option<String>, now_ms: u64, effects: &mut Effects) {
        let Some(a) = self.entries.get(k).and_then(|e| e.active.as_ref()) else { return };
        let rollback = reason.is_some() || a.spec.on_failure == OnFailure::Rollback;
        let reason = reason.unwrap_or_else(|| {
            format!(
                "{} NACK(s) or ACK timeout(s), over max_nacks {}: {}",
                failures.count,
                a.spec.max_nacks,
                if rollback { "rolled back" } else { "halted" }
            )
        });
        self.fail_with(k, failures, reason, rollback, now_ms, effects);
    }

    fn fail_with(
        &mut self,
        k: &str,
        failures: Failures,
        reason: String,
        rollback: bool,
        now_ms: u64,
        effects: &mut Effects,
    ) {
        let from_version = self.entries.get(k).and_then(|e| e.last_completed.as_ref()).map(|l| l.version.clone());
        let Some(a) = self.entries.get_mut(k).and_then(|e| e.active.as_mut()) else { return };
        a.status = Status::Failed;
        (a.failures, a.failure_count) = (failures.examples, failures.count);
        a.reason = Some(reason);
        if rollback {
            a.threshold = None;
        }
        let outcome = if a.reason.as_deref().is_some_and(|r| r.starts_with("aborted")) {
            "aborted"
        } else if rollback {
            "rolled_back"
        } else {
            "halted"
        };
        let examples: Vec<String> =
            a.failures.iter().map(|f| format!("{}: {}", f.node_id.escape_debug(), f.message.escape_debug())).collect();
        tracing::warn!(entry = %e_name(k), outcome, failures = a.failure_count, examples = %examples.join("; "), "rollout failed");
        effects.ended.push(outcome);
        let entry = HistoryEntry {
            name: e_name(k).to_owned(),
            from_version,
            to_version: a.new.version.clone(),
            outcome: outcome.to_owned(),
            started_at: rfc3339(a.started_ms),
            ended_at: rfc3339(now_ms),
            failures: a.failures.clone(),
            failure_count: a.failure_count,
        };
        self.history.push_front(entry);
        self.history.truncate(HISTORY);
    }

    /// `pause`, `resume`, `promote` or `abort` the rollouts of entries named `name`;
    /// how many there were.
    pub fn act(&mut self, name: &str, action: &str, now_ms: u64) -> Result<(usize, Effects), ActionError> {
        let mut effects = Effects { changed: true, ..Effects::default() };
        let keys: Vec<String> =
            self.entries.iter().filter(|(_, e)| e.name == name && e.active.is_some()).map(|(k, _)| k.clone()).collect();
        if keys.is_empty() {
            return Err(ActionError::NoRollout(name.to_owned()));
        }
        for k in &keys {
            let status = self.entries.get(k).and_then(|e| e.active.as_ref()).map(|a| a.status);
            if status == Some(Status::Failed) && action != "abort" {
                return Err(ActionError::Failed(name.to_owned()));
            }
            match action {
                "pause" | "resume" => {
                    if let Some(a) = self.entries.get_mut(k).and_then(|e| e.active.as_mut()) {
                        a.status = if action == "pause" { Status::Paused } else { Status::Running };
                        if action == "resume" {
                            a.step_started_ms = now_ms;
                        }
                    }
                }
                "promote" => self.finish(k, "promoted", now_ms, &mut effects),
                _ => {
                    if status != Some(Status::Failed) {
                        self.fail(
                            k,
                            Failures::default(),
                            Some("aborted by an operator: rolled back".into()),
                            now_ms,
                            &mut effects,
                        );
                    }
                }
            }
            tracing::info!(entry = %name, action, "rollout action");
        }
        Ok((keys.len(), effects))
    }

    /// The modules rollouts still serve (last completed versions): kept in the cache.
    pub fn pinned_modules(&self) -> Vec<String> {
        self.old.values().flat_map(|r| r.wasm_sha256.iter().chain(r.central_shas.iter()).cloned()).collect()
    }

    /// Each entry's step, as the step gauge shows it (0: rolled back; 100: none running).
    pub fn step_percents(&self) -> impl Iterator<Item = (&str, u8)> {
        self.entries.values().map(|e| {
            let percent = e.active.as_ref().map_or(100, |a| if a.threshold.is_none() { 0 } else { a.percent() });
            (e.name.as_str(), percent)
        })
    }

    /// Every rollout in progress (or failed), with how the fleet stands on it.
    pub fn views(&self, fleet: &dyn Fleet) -> Vec<RolloutView> {
        self.entries
            .values()
            .filter_map(|e| {
                let a = e.active.as_ref()?;
                let (mut members, mut acked, mut nacked, mut matching) = (0, 0, 0, 0);
                let new = a.new.version.as_str();
                // Every proxy of the fleet, read where it is (no copy per look).
                each_matching(fleet, e, &mut |m: &dyn Member, r: u64| {
                    matching += 1;
                    if a.threshold.is_none_or(|t| r > t) {
                        return;
                    }
                    members += 1;
                    match m.status(&e.name, new) {
                        Some((true, _)) => acked += 1,
                        Some((_, true)) => nacked += 1,
                        _ => {}
                    }
                });
                let health = match (&a.spec.health, a.threshold, a.status) {
                    (Some(_), Some(t), Status::Running | Status::Paused) => {
                        let (step, baseline) = step_traffic(fleet, e, new, t, a.step_started_ms);
                        Some(StepHealth::of(&step, &baseline))
                    }
                    _ => None,
                };
                Some(RolloutView {
                    health,
                    name: e.name.clone(),
                    selector: e.selector.clone(),
                    status: a.status,
                    steps: a.spec.steps.clone(),
                    step: a.step,
                    percent: if a.threshold.is_none() { 0 } else { a.percent() },
                    new_version: a.new.version.clone(),
                    last_completed_version: e.last_completed.as_ref().map(|l| l.version.clone()),
                    started_at: rfc3339(a.started_ms),
                    step_started_at: rfc3339(a.step_started_ms),
                    bake: humantime::format_duration(a.spec.bake).to_string(),
                    on_failure: a.spec.on_failure,
                    matching_proxies: matching,
                    on_new: members,
                    acked,
                    nacked,
                    waiting: members - acked - nacked,
                    failures: a.failures.clone(),
                    failure_count: a.failure_count,
                    reason: a.reason.clone(),
                })
            })
            .collect()
    }

    /// Past rollouts, newest first.
    pub fn history(&self) -> Vec<HistoryEntry> {
        self.history.iter().cloned().collect()
    }

    /// Whether a rollout is running (not paused, not failed).
    pub fn running(&self) -> bool {
        self.entries.values().any(|e| e.active.as_ref().is_some_and(|a| a.status == Status::Running))
    }

    /// Whether a rollout is in progress or failed (the replicas then publish their
    /// proxies).
    pub fn active(&self) -> bool {
        self.entries.values().any(|e| e.active.is_some())
    }

    /// When the steps of running rollouts with health gates began: every replica reports
    /// its proxies' traffic since each (the gates count the whole fleet's).
    pub fn gated_step_starts(&self) -> Vec<u64> {
        let mut starts: Vec<u64> = self
            .entries
            .values()
            .filter_map(|e| e.active.as_ref())
            .filter(|a| a.spec.health.is_some() && a.status == Status::Running)
            .map(|a| a.step_started_ms)
            .collect();
        starts.sort_unstable();
        starts.dedup();
        starts
    }

    /// Whether any entry is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;

/// The layers a rollout superseding `a` carries: `a`'s version up to the threshold it
/// reached (if it put anybody on it), then what `a` carried; a layer a newer one covers
/// entirely goes, and at most `MAX_CARRIED` are kept.
fn carry(a: &Active) -> Vec<Carried> {
    let mut layers: Vec<Carried> = Vec::new();
    // (A rollout rolled back has no threshold: its proxies went back already.)
    if let Some(t) = a.threshold {
        layers.push(Carried { threshold: t, version: a.new.clone() });
    }
    for c in &a.carried {
        if layers.iter().all(|l| l.threshold < c.threshold) {
            layers.push(c.clone());
        }
    }
    layers.truncate(filterplane_xds::plan::MAX_CARRIED);
    layers
}
