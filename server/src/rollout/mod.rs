//! Progressive rollouts. When an extension config or Wasm plugin with a `rollout` gets a
//! new version, the proxies of the first step get it and every other matching proxy keeps
//! the last completed version; each step completes when its bake time has passed, every
//! proxy of the step ACKed and NACKs stayed within `max_nacks`; a failure halts or rolls
//! back. Step membership is a hash of node id and entry name against a threshold fixed at
//! the step's start (the hash of the k-th proxy, k = ceil(p% of the matching proxies)), so
//! it is stable as proxies come and go and never empty while p > 0.
//!
//! State survives restarts through a `RolloutStore`.

pub mod store;

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use filterplane_api::ResourceType;
use filterplane_config::{
    model::{OnFailure, RolloutSpec},
    CompiledConfig, CompiledResource, NodeSelector,
};
pub use filterplane_xds::plan::{rank, Plan, PlanEntry};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    cache::SnapshotCache,
    metrics::Metrics,
    replicas::{FleetProxy, Replicas},
    tracker::AckTracker,
};
use store::{RolloutStore, StoredResource, StoredState};

/// How many past rollouts are kept.
pub const HISTORY: usize = 100;
/// How often running rollouts are looked at.
const TICK: Duration = Duration::from_millis(250);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Paused,
    /// Failed: NACKs over `max_nacks`, ACK timeouts, or aborted by an operator. Stays so
    /// until the entry is edited.
    Failed,
}

/// A proxy that failed the new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub node_id: String,
    /// Envoy's message, or why it counts as failed.
    pub message: String,
}

/// Failing proxies a rollout keeps as examples (it counts them all): 400 NACKing proxies
/// with 4 KiB messages kept whole made a 67 MB rollouts view and a 540 MB state file.
pub const FAILURE_EXAMPLES: usize = 10;
/// An example's message, cut to this.
pub const FAILURE_MESSAGE_BYTES: usize = 1024;

/// The proxies that failed a step: how many, and the first few.
#[derive(Debug, Default, PartialEq)]
struct Failures {
    count: usize,
    examples: Vec<Failure>,
}

impl Failures {
    fn push(&mut self, node_id: impl FnOnce() -> String, message: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < FAILURE_EXAMPLES {
            let message = crate::xds::stream::truncated(&message(), FAILURE_MESSAGE_BYTES);
            self.examples.push(Failure { node_id: node_id(), message });
        }
    }
}

/// A rollout in progress (or failed and waiting for an edit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Active {
    pub spec: RolloutSpec,
    pub new: StoredResource,
    /// Index into `spec.steps`.
    pub step: usize,
    pub threshold: Option<u64>,
    pub started_ms: u64,
    pub step_started_ms: u64,
    pub status: Status,
    /// The first `FAILURE_EXAMPLES` failing proxies.
    pub failures: Vec<Failure>,
    /// Failing proxies in all.
    #[serde(default)]
    pub failure_count: usize,
    /// Why it failed (`on_failure` taken, or aborted).
    pub reason: Option<String>,
}

impl Active {
    /// The current step's percent (a spec edited to fewer steps ends at 100).
    fn percent(&self) -> u8 {
        self.spec.steps.get(self.step).copied().unwrap_or(100)
    }

    fn last_step(&self) -> bool {
        self.step + 1 >= self.spec.steps.len()
    }
}

/// One entry's rollout state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryState {
    pub name: String,
    pub selector: NodeSelector,
    pub last_completed: Option<StoredResource>,
    pub active: Option<Active>,
}

/// A past rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub name: String,
    pub from_version: Option<String>,
    pub to_version: String,
    /// `completed`, `promoted`, `rolled_back`, `halted`, `aborted`, `superseded`, `reverted`.
    pub outcome: String,
    pub started_at: String,
    pub ended_at: String,
    /// The first `FAILURE_EXAMPLES` failing proxies, and how many in all.
    pub failures: Vec<Failure>,
    #[serde(default)]
    pub failure_count: usize,
}

fn key(name: &str, selector: &NodeSelector) -> String {
    format!("{name}\0{selector:?}")
}

#[derive(Debug, Default)]
struct Inner {
    entries: BTreeMap<String, EntryState>,
    /// The last completed versions, decoded once.
    old: BTreeMap<String, Arc<CompiledResource>>,
    history: VecDeque<HistoryEntry>,
    /// The version each entry has in the config this replica serves.
    config_versions: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActionError {
    #[error("no rollout of {0:?} is in progress")]
    NoRollout(String),
    #[error("the rollout of {0:?} failed; edit the entry to start a new one")]
    Failed(String),
}

/// Every rollout of the server.
#[derive(Debug)]
pub struct Rollouts {
    inner: Mutex<Inner>,
    store: Box<dyn RolloutStore>,
    metrics: Arc<Metrics>,
    changes: watch::Sender<u64>,
    /// Who drives steps (one replica at a time), and whether the shared state is reachable.
    replicas: Arc<Replicas>,
    /// This replica drove at the last tick (a new leader writes what it has once).
    drove: std::sync::atomic::AtomicBool,
    /// Why the last save failed, while saves fail: each tick tries again.
    save_error: Mutex<Option<String>>,
}

impl Rollouts {
    /// Loads what `store` kept.
    pub fn new(store: Box<dyn RolloutStore>, metrics: Arc<Metrics>) -> Result<Self, store::StoreError> {
        let stored = store.load()?;
        let mut inner = Inner::default();
        for e in stored.entries {
            if let Some(old) = &e.last_completed {
                inner.old.insert(key(&e.name, &e.selector), Arc::new(old.to_compiled()?));
            }
            inner.entries.insert(key(&e.name, &e.selector), e);
        }
        inner.history = stored.history.into_iter().collect();
        let replicas = Replicas::alone(String::new());
        let me = Self {
            inner: Mutex::new(inner),
            store,
            metrics,
            changes: watch::Sender::new(0),
            replicas,
            drove: true.into(),
            save_error: Mutex::new(None),
        };
        // A restart mid-rollout shows its step at once.
        me.update_metrics(&me.lock());
        Ok(me)
    }

    /// Shares the state with other replicas: only the leader moves rollouts along.
    pub fn with_replicas(mut self, replicas: Arc<Replicas>) -> Self {
        self.replicas = replicas;
        self
    }

    pub fn replicas(&self) -> &Arc<Replicas> {
        &self.replicas
    }

    /// Takes in what another replica stored. An entry whose stored state does not know
    /// the version this replica's config has (the leader has not read the edit yet) keeps
    /// this replica's own, so nobody gets a new version before its rollout exists.
    fn sync(&self, inner: &mut Inner) {
        let Some(stored) = self.store.load_if_changed() else { return };
        let knows = |e: &EntryState, v: &str| {
            e.active.as_ref().is_some_and(|a| a.new.version == v)
                || e.last_completed.as_ref().is_some_and(|l| l.version == v)
        };
        let mut entries = BTreeMap::new();
        for e in stored.entries {
            let k = key(&e.name, &e.selector);
            let take = match inner.config_versions.get(&k) {
                Some(v) => knows(&e, v),
                // Not in this replica's config (yet): keep it for when it is.
                None => inner.config_versions.is_empty(),
            };
            if take {
                entries.insert(k, e);
            }
        }
        for (k, e) in &inner.entries {
            entries.entry(k.clone()).or_insert_with(|| e.clone());
        }
        let changed = entries != inner.entries;
        if changed {
            for (k, e) in &entries {
                let same_old = inner.entries.get(k).map(|o| &o.last_completed) == Some(&e.last_completed);
                if same_old {
                    continue;
                }
                match e.last_completed.as_ref().map(StoredResource::to_compiled) {
                    Some(Ok(r)) => {
                        inner.old.insert(k.clone(), Arc::new(r));
                    }
                    _ => {
                        inner.old.remove(k);
                    }
                }
            }
            inner.old.retain(|k, _| entries.contains_key(k));
            inner.entries = entries;
        }
        inner.history = stored.history.into_iter().collect();
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        self.update_metrics(inner);
    }

    /// Whether this replica may write and drive steps now.
    fn drives(&self) -> bool {
        self.replicas.is_leader() && self.replicas.reachable()
    }

    /// Wakes on every change (for the page).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, inner: &Inner) {
        self.persist_as(inner, self.drives())
    }

    /// Writes the state when `write` (the leader, or an operator's action on any replica).
    fn persist_as(&self, inner: &Inner, write: bool) {
        if !write {
            // A follower's own view until the leader's state comes (`sync`).
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
            self.update_metrics(inner);
            return;
        }
        let state = StoredState {
            entries: inner.entries.values().cloned().collect(),
            history: inner.history.iter().cloned().collect(),
        };
        let result = self.store.save(&state);
        let mut failing = self.save_error.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Err(e) => {
                self.metrics.rollout_state_save_failures.inc();
                if let Some(left_out) = SAVE_FAILURES.admit() {
                    tracing::error!(error = %e, left_out, "cannot save the rollout state (tried again every second; logged once a minute); a restart now would start these rollouts over");
                }
                *failing = Some(e.to_string());
            }
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!("the rollout state is saved again");
                }
            }
        }
        drop(failing);
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        self.update_metrics(inner);
    }

    fn update_metrics(&self, inner: &Inner) {
        for e in inner.entries.values() {
            let percent = e.active.as_ref().map_or(100, |a| if a.threshold.is_none() { 0 } else { a.percent() });
            self.metrics
                .rollout_step
                .get_or_create(&crate::metrics::NameLabel { name: e.name.clone() })
                .set(i64::from(percent));
        }
    }

    fn forget_metric(&self, name: &str) {
        self.metrics.rollout_step.remove(&crate::metrics::NameLabel { name: name.to_owned() });
    }

    fn finish(&self, inner: &mut Inner, k: &str, outcome: &str) {
        let Some(e) = inner.entries.get_mut(k) else { return };
        let Some(a) = e.active.take() else { return };
        self.metrics.rollouts.get_or_create(&crate::metrics::OutcomeLabel::new(outcome)).inc();
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
            ended_at: rfc3339(now_ms()),
            failures: a.failures,
            failure_count: a.failure_count,
        };
        if done {
            if let Ok(r) = a.new.to_compiled() {
                inner.old.insert(k.to_owned(), Arc::new(r));
            }
        }
        inner.history.push_front(entry);
        inner.history.truncate(HISTORY);
    }

    /// A new config: starts, continues or ends the rollouts its entries call for, and
    /// returns the plan to serve it with. `previous` is the config served until now
    /// (`None` for the first of this process): what proxies run of an entry that gets a
    /// rollout. Only entries with a rollout are kept, and stored only when something
    /// changed.
    pub fn on_config(&self, config: &CompiledConfig, previous: Option<&CompiledConfig>) -> Plan {
        let mut inner = self.lock();
        self.sync(&mut inner);
        inner.config_versions = config
            .resources
            .iter()
            .filter(|r| r.resource_type == ResourceType::ExtensionConfig && r.rollout.is_some())
            .map(|r| (key(&r.name, &r.selector), r.version.to_string()))
            .collect();
        let mut changed = false;
        let mut seen = std::collections::HashSet::new();
        for r in config.resources.iter().filter(|r| r.resource_type == ResourceType::ExtensionConfig) {
            let k = key(&r.name, &r.selector);
            let Some(spec) = &r.rollout else {
                // No rollout: at once, and nothing to keep.
                if inner.entries.contains_key(&k) {
                    self.finish(&mut inner, &k, "superseded");
                    self.forget_metric(&r.name);
                    inner.entries.remove(&k);
                    inner.old.remove(&k);
                    changed = true;
                }
                continue;
            };
            seen.insert(k.clone());
            if !inner.entries.contains_key(&k) {
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
                    inner.old.insert(k.clone(), Arc::new(run.clone()));
                }
                inner.entries.insert(
                    k.clone(),
                    EntryState {
                        name: r.name.clone(),
                        selector: r.selector.clone(),
                        last_completed: running.map(StoredResource::from),
                        active: None,
                    },
                );
                changed = true;
            }
            let version = r.version.to_string();
            let Some(state) = inner.entries.get(&k) else { continue };
            let completed = state.last_completed.as_ref().map(|l| l.version.clone());
            let new_of_active = state.active.as_ref().map(|a| a.new.version.clone());
            if completed.as_deref() == Some(version.as_str()) {
                // Edited back to the last completed version: over at once.
                if new_of_active.is_some() {
                    self.finish(&mut inner, &k, "reverted");
                    changed = true;
                }
            } else if new_of_active.as_deref() == Some(version.as_str()) {
                if let Some(a) = inner.entries.get_mut(&k).and_then(|e| e.active.as_mut()) {
                    if a.spec != *spec {
                        // Same version, new settings: stay at the step, within the new steps.
                        a.spec = spec.clone();
                        a.step = a.step.min(a.spec.steps.len().saturating_sub(1));
                        changed = true;
                    }
                }
            } else {
                if new_of_active.is_some() {
                    self.finish(&mut inner, &k, "superseded");
                }
                let now = now_ms();
                if let Some(e) = inner.entries.get_mut(&k) {
                    tracing::info!(entry = %r.name, version = %version, steps = ?spec.steps, "rollout started");
                    e.active = Some(Active {
                        spec: spec.clone(),
                        new: StoredResource::from(r),
                        step: 0,
                        threshold: None,
                        started_ms: now,
                        step_started_ms: now,
                        status: Status::Running,
                        failures: Vec::new(),
                        failure_count: 0,
                        reason: None,
                    });
                }
                changed = true;
                // The first step's members are picked at the next tick (it sees the
                // proxies); until then nobody has the new version.
            }
        }
        let before = inner.entries.len();
        let gone: Vec<String> =
            inner.entries.iter().filter(|(k, _)| !seen.contains(*k)).map(|(_, e)| e.name.clone()).collect();
        for name in &gone {
            self.forget_metric(name);
        }
        inner.entries.retain(|k, _| seen.contains(k));
        inner.old.retain(|k, _| seen.contains(k));
        if changed || inner.entries.len() != before {
            self.persist(&inner);
        }
        plan_of(&inner)
    }

    /// The plan for the current state.
    pub fn plan(&self) -> Plan {
        plan_of(&self.lock())
    }

    /// Moves running rollouts along, from what the tracker knows of the proxies.
    pub fn tick(&self, fleet: &dyn Fleet) -> Plan {
        let mut inner = self.lock();
        self.sync(&mut inner);
        // Only the leader moves rollouts along, and only while the shared state is
        // reachable (an unreachable etcd pauses them; `view` says so).
        let drives = self.drives();
        if drives && !self.drove.swap(true, std::sync::atomic::Ordering::Relaxed) && !inner.entries.is_empty() {
            // Leading now: what this replica computed while following goes in.
            self.persist(&inner);
        }
        if drives && self.save_error.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            // The last save failed (a full disk): try again until one works.
            self.persist(&inner);
        }
        if !drives {
            self.drove.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        if !drives || !self.running(&inner) {
            return plan_of(&inner);
        }
        let now = now_ms();
        let mut changed = false;
        let keys: Vec<String> = inner.entries.keys().cloned().collect();
        for k in keys {
            let Some(e) = inner.entries.get(&k) else { continue };
            let Some(a) = e.active.clone() else { continue };
            if a.status != Status::Running {
                continue;
            }
            // Proxies this entry is for (one per node: by rank, a hash of the node id),
            // read where they are (no copy per proxy per tick); the step's members are
            // judged in the same pass once the step has its threshold.
            // Every replica must have reported since the step began: a proxy of a report
            // made before it would be missing or stale, so the step's members could not be
            // picked from the whole fleet, and the step could complete without one.
            if !self.replicas.reports_since(a.step_started_ms) {
                continue;
            }
            let threshold = a.threshold;
            let new_version = a.new.version.as_str();
            let ack_timeout = a.spec.ack_timeout.as_millis() as u64;
            let shared = self.replicas.is_shared();
            let mut ranks: Vec<u64> = Vec::new();
            let mut failures = Failures::default();
            let mut waiting = 0usize;
            each_matching(fleet, e, &mut |m: Member<'_>, r: u64| {
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
                        || if shared { format!("{} (on {})", m.facts.id, m.replica) } else { m.facts.id.clone() },
                        || m.nack_message().unwrap_or_default().to_owned(),
                    );
                    return;
                }
                let since = a.step_started_ms.max(m.connected_ms);
                if now.saturating_sub(since) > ack_timeout {
                    failures.push(
                        || m.facts.id.clone(),
                        || format!("no ACK within {} (ack_timeout)", humantime::format_duration(a.spec.ack_timeout)),
                    );
                } else {
                    waiting += 1;
                }
            });
            let percent = a.percent();
            let threshold = match a.threshold {
                Some(t) => t,
                None => {
                    let t = threshold_for(percent, ranks);
                    if let Some(active) = inner.entries.get_mut(&k).and_then(|e| e.active.as_mut()) {
                        active.threshold = Some(t);
                        active.step_started_ms = now;
                    }
                    changed = true;
                    continue;
                }
            };
            if failures.count > a.spec.max_nacks as usize {
                self.fail(&mut inner, &k, failures, None);
                changed = true;
                continue;
            }
            let baked = now.saturating_sub(a.step_started_ms) >= a.spec.bake.as_millis() as u64;
            if waiting == 0 && baked {
                if a.last_step() {
                    self.finish(&mut inner, &k, "completed");
                } else if let Some(active) = inner.entries.get_mut(&k).and_then(|e| e.active.as_mut()) {
                    active.step += 1;
                    // Never below the last step's: a proxy on the new version stays on it.
                    let next = threshold_for(active.percent(), ranks);
                    active.threshold = Some(next.max(threshold));
                    active.step_started_ms = now;
                    (active.failures, active.failure_count) = (failures.examples, failures.count);
                    tracing::info!(entry = %e_name(&k), percent = active.percent(), "rollout step");
                }
                changed = true;
            } else if let Some(active) = inner.entries.get_mut(&k).and_then(|e| e.active.as_mut()) {
                if (active.failure_count, &active.failures) != (failures.count, &failures.examples) {
                    (active.failures, active.failure_count) = (failures.examples, failures.count);
                    changed = true;
                }
            }
        }
        if changed {
            self.persist(&inner);
        }
        plan_of(&inner)
    }

    fn fail(&self, inner: &mut Inner, k: &str, failures: Failures, reason: Option<String>) {
        let from_version = inner.entries.get(k).and_then(|e| e.last_completed.as_ref()).map(|l| l.version.clone());
        let Some(a) = inner.entries.get_mut(k).and_then(|e| e.active.as_mut()) else { return };
        let rollback = reason.is_some() || a.spec.on_failure == OnFailure::Rollback;
        a.status = Status::Failed;
        (a.failures, a.failure_count) = (failures.examples, failures.count);
        a.reason = Some(reason.unwrap_or_else(|| {
            format!(
                "{} NACK(s) or ACK timeout(s), over max_nacks {}: {}",
                a.failure_count,
                a.spec.max_nacks,
                if rollback { "rolled back" } else { "halted" }
            )
        }));
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
        tracing::warn!(entry = %e_name(k), outcome, failures = a.failure_count, examples = ?a.failures, "rollout failed");
        self.metrics.rollouts.get_or_create(&crate::metrics::OutcomeLabel::new(outcome)).inc();
        let entry = HistoryEntry {
            name: e_name(k).to_owned(),
            from_version,
            to_version: a.new.version.clone(),
            outcome: outcome.to_owned(),
            started_at: rfc3339(a.started_ms),
            ended_at: rfc3339(now_ms()),
            failures: a.failures.clone(),
            failure_count: a.failure_count,
        };
        inner.history.push_front(entry);
        inner.history.truncate(HISTORY);
    }

    /// `pause`, `resume`, `promote` or `abort` the rollouts of entries named `name`.
    pub fn act(&self, name: &str, action: &str) -> Result<usize, ActionError> {
        let mut inner = self.lock();
        self.sync(&mut inner);
        let keys: Vec<String> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.name == name && e.active.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return Err(ActionError::NoRollout(name.to_owned()));
        }
        for k in &keys {
            let status = inner.entries.get(k).and_then(|e| e.active.as_ref()).map(|a| a.status);
            if status == Some(Status::Failed) && action != "abort" {
                return Err(ActionError::Failed(name.to_owned()));
            }
            match action {
                "pause" | "resume" => {
                    if let Some(a) = inner.entries.get_mut(k).and_then(|e| e.active.as_mut()) {
                        a.status = if action == "pause" { Status::Paused } else { Status::Running };
                        if action == "resume" {
                            a.step_started_ms = now_ms();
                        }
                    }
                }
                "promote" => self.finish(&mut inner, k, "promoted"),
                _ => {
                    if status != Some(Status::Failed) {
                        self.fail(
                            &mut inner,
                            k,
                            Failures::default(),
                            Some("aborted by an operator: rolled back".into()),
                        );
                    }
                }
            }
            tracing::info!(entry = ?name, action, "rollout action");
        }
        // Any replica may act (the operator talks to whichever); the leader reads it.
        self.persist_as(&inner, self.replicas.reachable());
        Ok(keys.len())
    }

    /// The modules rollouts still serve (last completed versions): kept in the cache.
    pub fn pinned_modules(&self) -> Vec<String> {
        let inner = self.lock();
        inner.old.values().flat_map(|r| r.wasm_sha256.iter().chain(r.central_shas.iter()).cloned()).collect()
    }

    /// What `/api/v1/rollouts` shows.
    pub fn view(&self, tracker: &AckTracker) -> RolloutsView {
        let mut inner = self.lock();
        self.sync(&mut inner);
        let fleet = LocalAndReported { tracker, replicas: &self.replicas };
        let rollouts = inner
            .entries
            .values()
            .filter_map(|e| {
                let a = e.active.as_ref()?;
                let (mut members, mut acked, mut nacked, mut matching) = (0, 0, 0, 0);
                let new = a.new.version.as_str();
                // Every proxy of the fleet, read where it is (no copy per look).
                each_matching(&fleet, e, &mut |m: Member<'_>, r: u64| {
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
                Some(RolloutView {
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
            .collect();
        let shared = self.replicas.status();
        let paused_because = (self.replicas.is_shared() && !shared.reachable).then(|| {
            format!(
                "etcd is unreachable ({}): rollouts are paused, and every replica serves what it has",
                shared.error.clone().unwrap_or_default()
            )
        });
        let save_error = self.save_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let store_error = match (self.store.problem_at_start(), save_error) {
            (_, Some(e)) => Some(format!("the rollout state is not being saved: {e}")),
            (at_start, None) => at_start,
        };
        RolloutsView { rollouts, history: inner.history.iter().cloned().collect(), shared, paused_because, store_error }
    }

    /// Moves rollouts along until `shutdown`, serving each new plan.
    pub async fn run(
        self: Arc<Self>,
        cache: Arc<SnapshotCache>,
        tracker: Arc<AckTracker>,
        shutdown: CancellationToken,
    ) {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = interval.tick() => {
                    let plan = self.tick(&LocalAndReported { tracker: &tracker, replicas: &self.replicas });
                    cache.replan(plan);
                }
            }
        }
    }
}

impl Rollouts {
    fn running(&self, inner: &Inner) -> bool {
        inner.entries.values().any(|e| e.active.as_ref().is_some_and(|a| a.status == Status::Running))
    }

    fn running_or_failed(&self, inner: &Inner) -> bool {
        inner.entries.values().any(|e| e.active.is_some())
    }

    /// Whether a rollout is in progress (the replicas then publish their proxies).
    pub fn active(&self) -> bool {
        self.running_or_failed(&self.lock())
    }
}

/// One proxy of the fleet, wherever it is connected, as the rollout engine reads it.
pub struct Member<'a> {
    pub facts: &'a filterplane_config::NodeFacts,
    pub connected_ms: u64,
    pub replica: &'a str,
    source: Source<'a>,
}

enum Source<'a> {
    Local(&'a crate::tracker::ProxyStatus),
    Reported(&'a FleetProxy),
}

impl Member<'_> {
    /// Whether it ACKed, and whether it NACKed, `version` of extension config `name`;
    /// `None` when it has not been sent that config.
    pub fn status(&self, name: &str, version: &str) -> Option<(bool, bool)> {
        match &self.source {
            Source::Local(p) => {
                let r = p.types.get(&ResourceType::ExtensionConfig)?.resources.get(name)?;
                Some((r.acked_version.is_some_and(|v| v == *version), r.nacked_version.is_some_and(|v| v == *version)))
            }
            Source::Reported(p) => {
                let (a, n) = p.ecds.get(name)?;
                Some((a.as_deref() == Some(version), n.as_deref() == Some(version)))
            }
        }
    }

    /// Envoy's message with its last NACK of extension configs.
    pub fn nack_message(&self) -> Option<&str> {
        match &self.source {
            Source::Local(p) => p
                .types
                .get(&ResourceType::ExtensionConfig)
                .and_then(|t| t.last_nack.as_ref())
                .map(|n| n.message.as_str()),
            Source::Reported(p) => p.nack_message.as_deref(),
        }
    }
}

/// Where the rollout engine finds the fleet's proxies.
pub trait Fleet {
    fn visit(&self, f: &mut dyn FnMut(Member<'_>));
}

/// The proxies entry `e` is for, each once (by rank, a hash of node id and entry name),
/// with their rank.
fn each_matching(fleet: &dyn Fleet, e: &EntryState, f: &mut dyn FnMut(Member<'_>, u64)) {
    let mut seen = std::collections::HashSet::new();
    fleet.visit(&mut |m: Member<'_>| {
        if !e.selector.matches(m.facts) {
            return;
        }
        let r = rank(&m.facts.id, &e.name);
        if seen.insert(r) {
            f(m, r);
        }
    });
}

/// This replica's proxies, read in place, and the other replicas' last reports.
pub struct LocalAndReported<'a> {
    pub tracker: &'a AckTracker,
    pub replicas: &'a Replicas,
}

impl Fleet for LocalAndReported<'_> {
    fn visit(&self, f: &mut dyn FnMut(Member<'_>)) {
        let me = self.replicas.name.as_str();
        self.tracker.for_each(|p| {
            let connected_ms = p.connected_since.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            f(Member { facts: p.facts(), connected_ms, replica: me, source: Source::Local(p) });
        });
        self.replicas.with_others(|others| {
            for p in others.iter().flat_map(|r| &r.proxies) {
                f(Member {
                    facts: &p.node.facts,
                    connected_ms: p.connected_ms,
                    replica: &p.replica,
                    source: Source::Reported(p),
                });
            }
        });
    }
}

fn e_name(k: &str) -> &str {
    k.split('\0').next().unwrap_or(k)
}

/// The rank of the k-th proxy (k = ceil(percent of them), at least one), or, without
/// proxies, that share of the rank space.
fn threshold_for(percent: u8, mut ranks: Vec<u64>) -> u64 {
    if percent >= 100 {
        return u64::MAX;
    }
    if ranks.is_empty() {
        return (u64::MAX / 100) * u64::from(percent);
    }
    ranks.sort_unstable();
    let k = (ranks.len() * usize::from(percent)).div_ceil(100).max(1);
    ranks[k - 1]
}

fn plan_of(inner: &Inner) -> Plan {
    let entries = inner
        .entries
        .iter()
        .filter_map(|(k, e)| {
            let a = e.active.as_ref()?;
            Some(PlanEntry {
                name: e.name.clone(),
                selector: e.selector.clone(),
                threshold: a.threshold,
                old: inner.old.get(k).cloned(),
            })
        })
        .collect();
    Plan { entries }
}

/// `/api/v1/rollouts`.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutsView {
    pub rollouts: Vec<RolloutView>,
    pub history: Vec<HistoryEntry>,
    /// The shared state: store, this replica, the leader.
    pub shared: crate::replicas::SharedStatus,
    /// Why no rollout moves now, when that is not their own state.
    pub paused_because: Option<String>,
    /// What is wrong with where rollout state is kept: saves failing now, or a problem
    /// found at start (an unreadable file moved aside; the directory another process's).
    pub store_error: Option<String>,
}

/// Failed saves: one line a minute.
static SAVE_FAILURES: crate::log_limit::LogBudget =
    crate::log_limit::LogBudget::new(std::time::Duration::from_secs(60), 1);

#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    pub name: String,
    pub selector: NodeSelector,
    pub status: Status,
    pub steps: Vec<u8>,
    pub step: usize,
    /// Percent of the matching proxies meant to be on the new version now.
    pub percent: u8,
    pub new_version: String,
    pub last_completed_version: Option<String>,
    pub started_at: String,
    pub step_started_at: String,
    pub bake: String,
    pub on_failure: OnFailure,
    pub matching_proxies: usize,
    /// Proxies of the step (on the new version), and how they stand.
    pub on_new: usize,
    pub acked: usize,
    pub nacked: usize,
    pub waiting: usize,
    /// The first `FAILURE_EXAMPLES` failing proxies, and how many in all.
    pub failures: Vec<Failure>,
    pub failure_count: usize,
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_pick_about_p_percent_and_never_none() {
        let ranks: Vec<u64> = (0..1000).map(|i| rank(&format!("node-{i}"), "p")).collect();
        for p in [1u8, 5, 10, 25, 50] {
            let t = threshold_for(p, ranks.clone());
            let n = ranks.iter().filter(|r| **r <= t).count();
            assert_eq!(n, usize::from(p) * 10, "{p}%");
        }
        let few = vec![rank("a", "p"), rank("b", "p"), rank("c", "p")];
        let t = threshold_for(5, few.clone());
        assert_eq!(few.iter().filter(|r| **r <= t).count(), 1, "never none while p > 0");
        assert_eq!(threshold_for(100, few), u64::MAX);
        assert_eq!(rank("a", "p"), rank("a", "p"), "stable");
    }
}
