//! The rollout driver: runs the pure engine (`filterplane_rollout`) with this server's
//! parts around it. It gives the engine the time, the fleet (this replica's tracker and
//! the other replicas' reports) and leadership; applies what comes back (metrics, the
//! page's wake-up); and saves the state off the runtime's workers and outside the
//! engine's lock, on a writer thread that tries again every second while saves fail.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use filterplane_api::ResourceType;
use filterplane_config::{CompiledConfig, NodeFacts};
use filterplane_rollout::{
    ActionError, DecodeError, Effects, Engine, Fleet, HistoryEntry, Member, Plan, RolloutView, StoredState,
};
use filterplane_state::{Rows, Store};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    cache::{Planner, SnapshotCache},
    health::HealthStore,
    metrics::Metrics,
    replicas::{FleetProxy, Replicas},
    tracker::{AckTracker, ProxyStatus},
};

/// How often running rollouts are looked at.
const TICK: Duration = Duration::from_millis(250);
/// How long a failed save waits before it is tried again.
const SAVE_RETRY: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Every rollout of the server.
#[derive(Debug)]
pub struct Rollouts {
    engine: Mutex<Engine>,
    store: Arc<dyn Store>,
    writer: Arc<Writer>,
    metrics: Arc<Metrics>,
    changes: watch::Sender<u64>,
    /// Who drives steps (one replica at a time), and whether the shared state is reachable.
    replicas: Arc<Replicas>,
    /// This replica drove at the last tick (a new leader writes what it has once).
    drove: AtomicBool,
    /// What this replica's proxies report of their traffic (health gates).
    health: Arc<HealthStore>,
}

/// Saves, one at a time, the latest state handed over.
#[derive(Debug, Default)]
struct Writer {
    state: Mutex<WriterState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct WriterState {
    /// The latest rows to save, not saved yet.
    next: Option<Rows>,
    /// A save is running.
    busy: bool,
    /// Why the last save failed, while saves fail.
    error: Option<String>,
    stop: bool,
}

impl Writer {
    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves what it is handed until `stop`, then what is left.
    fn run(self: Arc<Self>, store: Arc<dyn Store>, metrics: Arc<Metrics>) {
        loop {
            let rows = {
                let mut s = self.lock();
                while s.next.is_none() && !s.stop {
                    s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                let Some(rows) = s.next.take() else { return };
                s.busy = true;
                rows
            };
            let result = store.save(&rows);
            let mut s = self.lock();
            s.busy = false;
            match result {
                Ok(()) => {
                    if s.error.take().is_some() {
                        tracing::info!("the rollout state is saved again");
                    }
                }
                Err(e) => {
                    metrics.rollout_state_save_failures.inc();
                    if let Some(left_out) = SAVE_FAILURES.admit() {
                        tracing::error!(error = %e, left_out, "cannot save the rollout state (tried again every second; logged once a minute); a restart now would start these rollouts over");
                    }
                    s.error = Some(e.to_string());
                    if s.stop {
                        // Stopping, and the store refuses: nothing more to try.
                        self.wake.notify_all();
                        return;
                    }
                    // Tried again unless newer rows came meanwhile.
                    s.next.get_or_insert(rows);
                    drop(self.wake.wait_timeout(s, SAVE_RETRY));
                }
            }
            self.wake.notify_all();
        }
    }

    fn hand(&self, rows: Rows) {
        self.lock().next = Some(rows);
        self.wake.notify_all();
    }

    /// Waits (at most `timeout`) until what was handed over is saved or failed.
    fn flush(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.lock();
        while (s.next.is_some() && s.error.is_none()) || s.busy {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            s = self.wake.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl Drop for Rollouts {
    fn drop(&mut self) {
        self.writer.lock().stop = true;
        self.writer.wake.notify_all();
    }
}

/// What reading the stored state can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] filterplane_state::StoreError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl Rollouts {
    /// Loads what `store` kept (`where_` names it in errors).
    /// No rollout step picks its proxies within `settle` of now (proxies reconnecting
    /// after a restart are counted first).
    pub fn new(
        store: Box<dyn Store>,
        metrics: Arc<Metrics>,
        where_: &str,
        settle: Duration,
    ) -> Result<Self, LoadError> {
        let store: Arc<dyn Store> = Arc::from(store);
        let mut engine = Engine::from_stored(StoredState::from_rows(&store.load()?, where_)?)?;
        engine.settle_until(now_ms() + settle.as_millis() as u64);
        let writer = Arc::new(Writer::default());
        {
            let (writer, store, metrics) = (writer.clone(), store.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("rollout-state-writer".into())
                .spawn(move || writer.run(store, metrics))
                .map_err(|e| filterplane_state::StoreError::Db(format!("start the state writer: {e}")))?;
        }
        let me = Self {
            engine: Mutex::new(engine),
            store,
            writer,
            metrics,
            changes: watch::Sender::new(0),
            replicas: Replicas::alone(String::new()),
            drove: true.into(),
            health: Arc::default(),
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

    /// Wakes on every change (for the page).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The engine, with what another replica stored taken in first.
    fn synced(&self) -> std::sync::MutexGuard<'_, Engine> {
        let mut engine = self.lock();
        if let Some(rows) = self.store.load_if_changed() {
            match StoredState::from_rows(&rows, "the shared rollout state") {
                Ok(stored) => engine.sync(stored),
                Err(e) => tracing::error!(error = %e, "the shared rollout state does not read; ignored"),
            }
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
            self.update_metrics(&engine);
        }
        engine
    }

    /// Whether this replica may write and drive steps now.
    fn drives(&self) -> bool {
        self.replicas.is_leader() && self.replicas.reachable()
    }

    /// Applies what a call of the engine asks; saves when `write` (the leader, or an
    /// operator's action on any replica) and the state changed.
    fn apply(&self, engine: &Engine, effects: Effects, write: bool) {
        for outcome in effects.ended {
            self.metrics.rollouts.get_or_create(&crate::metrics::OutcomeLabel::new(outcome)).inc();
        }
        for gate in effects.gate_failures {
            self.metrics.rollout_gate_failures.get_or_create(&crate::metrics::GateLabel { gate }).inc();
        }
        for name in effects.forgotten {
            self.metrics.rollout_step.remove(&crate::metrics::NameLabel { name });
        }
        if effects.changed {
            self.persist(engine, write);
        }
    }

    fn persist(&self, engine: &Engine, write: bool) {
        if write {
            match engine.stored().to_rows() {
                Ok(rows) => self.writer.hand(rows),
                Err(e) => tracing::error!(error = %e, "the rollout state does not encode; not saved"),
            }
        }
        // A follower's own view until the leader's state comes (`synced`).
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        self.update_metrics(engine);
    }

    fn update_metrics(&self, engine: &Engine) {
        for (name, percent) in engine.step_percents() {
            self.metrics
                .rollout_step
                .get_or_create(&crate::metrics::NameLabel { name: name.to_owned() })
                .set(i64::from(percent));
        }
    }

    /// A new config: the rollouts it starts, continues or ends, and the plan to serve it
    /// with (see `Engine::on_config`).
    pub fn on_config(&self, config: &CompiledConfig, previous: Option<&CompiledConfig>) -> Plan {
        let mut engine = self.synced();
        let effects = engine.on_config(config, previous, now_ms());
        self.apply(&engine, effects, self.drives());
        engine.plan()
    }

    /// The plan for the current state.
    pub fn plan(&self) -> Plan {
        self.lock().plan()
    }

    /// Moves running rollouts along, from what the fleet says of the proxies.
    pub fn tick(&self, fleet: &dyn Fleet) -> Plan {
        let mut engine = self.synced();
        // Only the leader moves rollouts along, and only while the shared state is
        // reachable (an unreachable etcd pauses them; `view` says so).
        let drives = self.drives();
        if drives && !self.drove.swap(true, Ordering::Relaxed) && !engine.is_empty() {
            // Leading now: what this replica computed while following goes in.
            self.persist(&engine, true);
        }
        if !drives {
            self.drove.store(false, Ordering::Relaxed);
            return engine.plan();
        }
        let effects = engine.tick(fleet, now_ms());
        self.apply(&engine, effects, true);
        engine.plan()
    }

    /// `pause`, `resume`, `promote` or `abort` the rollouts of entries named `name`.
    pub fn act(&self, name: &str, action: &str) -> Result<usize, ActionError> {
        let mut engine = self.synced();
        let (n, effects) = engine.act(name, action, now_ms())?;
        // Any replica may act (the operator talks to whichever); the leader reads it.
        self.apply(&engine, effects, self.replicas.reachable());
        Ok(n)
    }

    /// Where this replica's proxies' stats are kept (the metrics service writes them).
    pub fn health(&self) -> Arc<HealthStore> {
        self.health.clone()
    }

    /// The modules rollouts still serve (last completed versions): kept in the cache.
    pub fn pinned_modules(&self) -> Vec<String> {
        self.lock().pinned_modules()
    }

    /// Whether a rollout is in progress (the replicas then publish their proxies).
    pub fn active(&self) -> bool {
        self.lock().active()
    }

    /// When the steps of running gated rollouts began (see `Engine::gated_step_starts`).
    pub fn gated_step_starts(&self) -> Vec<u64> {
        self.lock().gated_step_starts()
    }

    /// Waits (at most `timeout`) until the state handed to the writer is saved.
    pub fn flush(&self, timeout: Duration) {
        self.writer.flush(timeout);
    }

    /// What `/api/v1/rollouts` shows.
    pub fn view(&self, tracker: &AckTracker) -> RolloutsView {
        let engine = self.synced();
        let fleet = LocalAndReported { tracker, replicas: &self.replicas, health: &self.health };
        let rollouts = engine.views(&fleet);
        let shared = self.replicas.status();
        let paused_because = (self.replicas.is_shared() && !shared.reachable).then(|| {
            format!(
                "etcd is unreachable ({}): rollouts are paused, and every replica serves what it has",
                shared.error.clone().unwrap_or_default()
            )
        });
        let save_error = self.writer.lock().error.clone();
        let store_error = match (self.store.problem_at_start(), save_error) {
            (_, Some(e)) => Some(format!("the rollout state is not being saved: {e}")),
            (at_start, None) => at_start,
        };
        RolloutsView { rollouts, history: engine.history(), shared, paused_because, store_error }
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
                    let plan = self.tick(&LocalAndReported { tracker: &tracker, replicas: &self.replicas, health: &self.health });
                    cache.replan(plan);
                }
            }
        }
    }
}

impl Planner for Rollouts {
    fn plan_for(&self, config: &CompiledConfig, previous: Option<&CompiledConfig>) -> Plan {
        self.on_config(config, previous)
    }

    fn pinned_modules(&self) -> Vec<String> {
        Rollouts::pinned_modules(self)
    }
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
static SAVE_FAILURES: crate::log_limit::LogBudget = crate::log_limit::LogBudget::new(Duration::from_secs(60), 1);

/// One of this replica's proxies, as the tracker has it.
struct Local<'a> {
    proxy: &'a ProxyStatus,
    connected_ms: u64,
    replica: &'a str,
    health: &'a HealthStore,
}

impl Member for Local<'_> {
    fn facts(&self) -> &NodeFacts {
        self.proxy.facts()
    }
    fn connected_ms(&self) -> u64 {
        self.connected_ms
    }
    fn replica(&self) -> &str {
        self.replica
    }
    fn status(&self, name: &str, version: &str) -> Option<(bool, bool)> {
        let r = self.proxy.types.get(&ResourceType::ExtensionConfig)?.resources.get(name)?;
        Some((r.acked_version.is_some_and(|v| v == *version), r.nacked_version.is_some_and(|v| v == *version)))
    }
    fn traffic(&self, since_ms: u64) -> Option<filterplane_rollout::Traffic> {
        self.health.window(&self.proxy.facts().id, since_ms)
    }
    fn nack_message(&self) -> Option<&str> {
        self.proxy
            .types
            .get(&ResourceType::ExtensionConfig)
            .and_then(|t| t.last_nack.as_ref())
            .map(|n| n.message.as_str())
    }
}

impl Member for FleetProxy {
    fn facts(&self) -> &NodeFacts {
        &self.node.facts
    }
    fn connected_ms(&self) -> u64 {
        self.connected_ms
    }
    fn replica(&self) -> &str {
        &self.replica
    }
    fn status(&self, name: &str, version: &str) -> Option<(bool, bool)> {
        let (a, n) = self.ecds.get(name)?;
        Some((a.as_deref() == Some(version), n.as_deref() == Some(version)))
    }
    fn nack_message(&self) -> Option<&str> {
        self.nack_message.as_deref()
    }
    fn traffic(&self, since_ms: u64) -> Option<filterplane_rollout::Traffic> {
        self.traffic.get(&since_ms).copied()
    }
}

/// This replica's proxies, read in place, and the other replicas' last reports.
pub struct LocalAndReported<'a> {
    pub tracker: &'a AckTracker,
    pub replicas: &'a Replicas,
    pub health: &'a HealthStore,
}

impl Fleet for LocalAndReported<'_> {
    fn visit(&self, f: &mut dyn FnMut(&dyn Member)) {
        let me = self.replicas.name.as_str();
        self.tracker.for_each(|p| {
            let connected_ms = p.connected_since.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            f(&Local { proxy: p, connected_ms, replica: me, health: self.health });
        });
        self.replicas.with_others(|others| {
            for p in others.iter().flat_map(|r| &r.proxies) {
                f(p);
            }
        });
    }

    fn reported_since(&self, ms: u64) -> bool {
        self.replicas.reports_since(ms)
    }

    fn shared(&self) -> bool {
        self.replicas.is_shared()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use filterplane_state::{Store, StoreError};

    use super::*;

    /// A store that refuses its first `fail` saves (a full disk), then keeps what it gets.
    #[derive(Debug, Default)]
    struct Flaky {
        fail: AtomicUsize,
        saved: Mutex<Vec<Rows>>,
        thread: Mutex<Option<String>>,
    }

    impl Store for Flaky {
        fn load(&self) -> Result<Rows, StoreError> {
            Ok(Rows::default())
        }
        fn save(&self, rows: &Rows) -> Result<(), StoreError> {
            *self.thread.lock().unwrap() = std::thread::current().name().map(str::to_owned);
            if self.fail.load(Ordering::Relaxed) > 0 {
                self.fail.fetch_sub(1, Ordering::Relaxed);
                return Err(StoreError::Db("no space left on device".into()));
            }
            self.saved.lock().unwrap().push(rows.clone());
            Ok(())
        }
    }

    #[test]
    fn saves_run_on_the_writer_thread_and_are_retried_until_one_works() {
        let store = Arc::new(Flaky { fail: AtomicUsize::new(2), ..Default::default() });
        let metrics = Arc::new(Metrics::default());
        let writer = Arc::new(Writer::default());
        let thread = {
            let (w, s, m) = (writer.clone(), store.clone() as Arc<dyn Store>, metrics.clone());
            std::thread::Builder::new().name("rollout-state-writer".into()).spawn(move || w.run(s, m)).unwrap()
        };
        let rows: Rows = [("rollout-state/history".to_owned(), b"[]".to_vec())].into();
        writer.hand(rows.clone());
        // Two failures, a second apart each, then the save.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.saved.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            writer.flush(Duration::from_millis(100));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(*store.saved.lock().unwrap(), [rows]);
        assert_eq!(metrics.rollout_state_save_failures.get(), 2);
        assert!(writer.lock().error.is_none(), "the error clears once a save works");
        assert_eq!(store.thread.lock().unwrap().as_deref(), Some("rollout-state-writer"));
        // Stopping with a store that refuses ends the thread.
        store.fail.store(usize::MAX, Ordering::Relaxed);
        writer.hand(Rows::default());
        writer.lock().stop = true;
        writer.wake.notify_all();
        thread.join().unwrap();
    }
}
