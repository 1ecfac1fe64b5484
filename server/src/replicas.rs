//! Several replicas sharing state through etcd (`--state-store etcd://HOST:PORT/PREFIX`).
//!
//! Under `PREFIX`:
//! - `rollouts`: the rollout state (what the embedded store keeps for one replica),
//!   written with compare-and-swap on its revision.
//! - `leader`: the name of the replica that drives rollout steps, under its lease (5 s):
//!   when it dies, the key goes with its lease and another replica takes it over, at the
//!   step the state says.
//! - `replicas/NAME`: each replica's report, under its lease, every second: a summary of
//!   its proxies, and while a rollout runs, what the rollout engine needs of each of them.
//!
//! When etcd cannot be reached, replicas keep serving what they have, no rollout moves,
//! and the page and API say why.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{
    etcd::{Etcd, EtcdUrl},
    fleet::Summary,
    rollout::store::{RolloutStore, StoreError, StoredState},
    tracker::AckTracker,
};

/// The lease that holds a replica's report and leadership.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often a replica renews its lease, publishes its report and reads the others'.
pub const BEAT: Duration = Duration::from_secs(1);

/// What the rollout engine needs of one proxy, wherever it is connected.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetProxy {
    /// Shared with the tracker for this replica's own proxies (no copy per tick).
    pub node: Arc<crate::xds::stream::NodeInfo>,
    pub connected_ms: u64,
    /// Extension configs: name → (version ACKed, version NACKed).
    pub ecds: BTreeMap<String, (Option<String>, Option<String>)>,
    /// Envoy's message with its last NACK of extension configs.
    pub nack_message: Option<String>,
    pub replica: String,
}

/// What one replica publishes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub replica: String,
    pub at_ms: u64,
    pub summary: Summary,
    /// Only while a rollout runs (the engine's input); empty otherwise.
    pub proxies: Vec<FleetProxy>,
}

/// How this replica stands with the shared state.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SharedStatus {
    /// `etcd` (several replicas) or `embedded`.
    pub store: &'static str,
    pub replica: String,
    pub leader: Option<String>,
    pub is_leader: bool,
    /// etcd answered the last call.
    pub reachable: bool,
    /// The last error talking to etcd, while it is unreachable.
    pub error: Option<String>,
}

/// This replica's place among the others.
#[derive(Debug)]
pub struct Replicas {
    pub name: String,
    etcd: Option<(Etcd, EtcdUrl)>,
    leader: AtomicBool,
    reachable: AtomicBool,
    status: Mutex<SharedStatus>,
    /// The other replicas' latest reports (fresh ones only).
    others: Mutex<Vec<Report>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Replicas {
    /// One replica alone: always the leader, nothing shared.
    pub fn alone(name: String) -> Arc<Self> {
        Arc::new(Self {
            status: Mutex::new(SharedStatus {
                store: "embedded",
                replica: name.clone(),
                leader: Some(name.clone()),
                is_leader: true,
                reachable: true,
                error: None,
            }),
            name,
            etcd: None,
            leader: AtomicBool::new(true),
            reachable: AtomicBool::new(true),
            others: Mutex::new(Vec::new()),
        })
    }

    pub fn shared(name: String, url: EtcdUrl) -> Result<Arc<Self>, crate::etcd::EtcdError> {
        let etcd = Etcd::new(&url.endpoint)?;
        Ok(Arc::new(Self {
            status: Mutex::new(SharedStatus { store: "etcd", replica: name.clone(), ..Default::default() }),
            name,
            etcd: Some((etcd, url)),
            leader: AtomicBool::new(false),
            reachable: AtomicBool::new(false),
            others: Mutex::new(Vec::new()),
        }))
    }

    /// Whether this replica drives rollout steps now.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Whether the shared state can be read and written now (always, alone).
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    pub fn is_shared(&self) -> bool {
        self.etcd.is_some()
    }

    pub fn status(&self) -> SharedStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The other replicas' latest reports.
    pub fn others(&self) -> Vec<Report> {
        self.others.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Moves whenever another replica's report came in.
    pub fn others_seq(&self) -> u64 {
        self.others.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|r| r.at_ms).fold(0, |a, b| a ^ b)
    }

    /// Whether every other replica reported since `ms` (a new step's members are picked
    /// from the whole fleet, so not before every replica has said who it has).
    pub fn reports_since(&self, ms: u64) -> bool {
        self.others.lock().unwrap_or_else(|p| p.into_inner()).iter().all(|r| r.at_ms >= ms)
    }

    /// The rollout store: etcd's key when shared.
    pub async fn store(self: &Arc<Self>) -> Result<Option<Box<dyn RolloutStore>>, StoreError> {
        let Some((etcd, url)) = &self.etcd else { return Ok(None) };
        let store = EtcdStore::open(etcd.clone(), format!("{}rollouts", url.prefix), self.clone()).await?;
        Ok(Some(Box::new(store)))
    }

    fn set_reachable(&self, error: Option<String>) {
        let ok = error.is_none();
        if self.reachable.swap(ok, Ordering::Relaxed) != ok {
            match &error {
                Some(e) => tracing::warn!(error = %e, "etcd unreachable: serving what this replica has; rollouts pause"),
                None => tracing::info!("etcd reachable"),
            }
        }
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.reachable = ok;
        s.error = error;
    }

    /// Keeps the lease, the leadership and the reports going until `shutdown`; then
    /// gives the lease back (so another replica leads at once).
    pub async fn run(
        self: Arc<Self>,
        tracker: Arc<AckTracker>,
        rollout_input: impl Fn() -> bool + Send + 'static,
        shutdown: CancellationToken,
    ) {
        let Some((etcd, url)) = self.etcd.clone() else { return };
        let leader_key = format!("{}leader", url.prefix);
        let reports = format!("{}replicas/", url.prefix);
        let mine = format!("{reports}{}", self.name);
        let mut lease: Option<i64> = None;
        let mut lost_since: Option<std::time::Instant> = None;
        let mut beat = tokio::time::interval(BEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = beat.tick() => {}
            }
            let result: Result<(), crate::etcd::EtcdError> = async {
                let id = match lease {
                    Some(id) if etcd.keep_alive(id).await? => id,
                    _ => {
                        let id = etcd.grant(LEASE_TTL).await?;
                        lease = Some(id);
                        id
                    }
                };
                // Leader: whoever holds the key; take it if nobody does.
                etcd.put_if(&leader_key, 0, self.name.as_bytes().to_vec(), id).await?;
                let (holder, _) = etcd.get(&leader_key).await?;
                let holder = holder.map(|h| String::from_utf8_lossy(&h).into_owned());
                let leading = holder.as_deref() == Some(self.name.as_str());
                if self.leader.swap(leading, Ordering::Relaxed) != leading {
                    tracing::info!(replica = %self.name, leading, "rollout leadership");
                }
                let report = Report {
                    replica: self.name.clone(),
                    at_ms: now_ms(),
                    summary: crate::fleet::summary(&tracker),
                    proxies: if rollout_input() { local_fleet(&tracker, &self.name) } else { Vec::new() },
                };
                let body = serde_json::to_vec(&report).map_err(|e| crate::etcd::EtcdError::Call {
                    endpoint: url.endpoint.clone(),
                    message: e.to_string(),
                })?;
                etcd.put(&mine, body, id).await?;
                let mut others = Vec::new();
                for (key, value) in etcd.list(&reports).await? {
                    if key == mine {
                        continue;
                    }
                    match serde_json::from_slice::<Report>(&value) {
                        Ok(r) => others.push(r),
                        Err(e) => tracing::warn!(key = ?key, error = %e, "a replica report does not read; left out"),
                    }
                }
                *self.others.lock().unwrap_or_else(|p| p.into_inner()) = others;
                let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                s.leader = holder;
                s.is_leader = leading;
                Ok(())
            }
            .await;
            match result {
                Ok(()) => {
                    lost_since = None;
                    self.set_reachable(None);
                }
                Err(e) => {
                    self.set_reachable(Some(e.to_string()));
                    // The lease may be gone by now: stop leading before another replica can.
                    let since = *lost_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= LEASE_TTL / 2 && self.leader.swap(false, Ordering::Relaxed) {
                        tracing::warn!(replica = %self.name, "etcd unreachable: no longer leading rollouts");
                    }
                    // Reports of others go stale; drop them rather than count old NACKs.
                    self.others.lock().unwrap_or_else(|p| p.into_inner()).clear();
                    let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                    s.is_leader = self.is_leader();
                }
            }
        }
        self.leader.store(false, Ordering::Relaxed);
        if let Some(id) = lease {
            let _ = etcd.revoke(id).await;
        }
    }
}

/// This replica's proxies as the rollout engine sees them.
pub fn local_fleet(tracker: &AckTracker, replica: &str) -> Vec<FleetProxy> {
    let ecds = filterplane_api::ResourceType::ExtensionConfig.type_url();
    let mut v = Vec::new();
    tracker.for_each(|p| {
        let t = p.types.get(&ecds);
        v.push(FleetProxy {
            node: p.node.clone(),
            connected_ms: p
                .connected_since
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            ecds: t
                .map(|t| {
                    t.resources
                        .iter()
                        .map(|(n, r)| {
                            (n.clone(), (r.acked_version.map(|v| v.to_string()), r.nacked_version.map(|v| v.to_string())))
                        })
                        .collect()
                })
                .unwrap_or_default(),
            nack_message: t.and_then(|t| t.last_nack.as_ref()).map(|n| n.message.clone()),
            replica: replica.to_owned(),
        });
    });
    v
}

/// Rollout state in etcd: a facade over a background task, since the rollout engine is
/// synchronous. `save` hands the state to the task, which writes it with
/// compare-and-swap; `load_if_changed` returns what another replica wrote.
#[derive(Debug)]
pub struct EtcdStore {
    shared: Arc<Mutex<StoreShared>>,
    wake: Arc<tokio::sync::Notify>,
}

#[derive(Debug, Default)]
struct StoreShared {
    initial: StoredState,
    /// Written by another replica, not read by the engine yet.
    unseen: Option<StoredState>,
    /// To write.
    pending: Option<StoredState>,
    /// The revision of the key as last read or written.
    revision: i64,
}

impl EtcdStore {
    async fn open(etcd: Etcd, key: String, replicas: Arc<Replicas>) -> Result<Self, StoreError> {
        let db = |e: crate::etcd::EtcdError| StoreError::Db(e.to_string());
        let (value, revision) = etcd.get(&key).await.map_err(db)?;
        let initial = match value {
            Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError::Decode(e.to_string()))?,
            None => StoredState::default(),
        };
        let shared = Arc::new(Mutex::new(StoreShared { initial, revision, ..Default::default() }));
        let wake = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(sync_loop(etcd, key, shared.clone(), wake.clone(), replicas));
        Ok(Self { shared, wake })
    }
}

async fn sync_loop(
    etcd: Etcd,
    key: String,
    shared: Arc<Mutex<StoreShared>>,
    wake: Arc<tokio::sync::Notify>,
    replicas: Arc<Replicas>,
) {
    let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let (pending, revision) = {
            let s = lock();
            (s.pending.clone(), s.revision)
        };
        let result = async {
            if let Some(state) = pending {
                let body = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
                match etcd.put_if(&key, revision, body, 0).await.map_err(|e| e.to_string())? {
                    Some(rev) => {
                        let mut s = lock();
                        s.revision = rev;
                        // (A newer save may have come meanwhile: it goes next turn.)
                        if s.pending.as_ref() == Some(&state) {
                            s.pending = None;
                        }
                        return Ok(());
                    }
                    None => {
                        // Someone else wrote first: theirs is read below, and the engine
                        // merges it with what it has before it saves again.
                        lock().pending = None;
                        tracing::info!("the rollout state changed in etcd meanwhile; reading it");
                    }
                }
            }
            let (value, rev) = etcd.get(&key).await.map_err(|e| e.to_string())?;
            let mut s = lock();
            if rev != s.revision {
                s.revision = rev;
                if let Some(v) = value {
                    match serde_json::from_slice(&v) {
                        Ok(state) => s.unseen = Some(state),
                        Err(e) => tracing::error!(error = %e, "the rollout state in etcd does not read; ignored"),
                    }
                }
            }
            Ok::<(), String>(())
        }
        .await;
        if let Err(e) = result {
            replicas.set_reachable(Some(e));
        }
    }
}

impl RolloutStore for EtcdStore {
    fn load(&self) -> Result<StoredState, StoreError> {
        Ok(self.shared.lock().unwrap_or_else(|p| p.into_inner()).initial.clone())
    }

    fn save(&self, state: &StoredState) -> Result<(), StoreError> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).pending = Some(state.clone());
        self.wake.notify_one();
        Ok(())
    }

    fn load_if_changed(&self) -> Option<StoredState> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).unseen.take()
    }
}
