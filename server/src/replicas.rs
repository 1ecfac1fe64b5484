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
//! and the page and API say why. The lease and the leader key are kept by
//! `filterplane_state::lease`; the report's format by `filterplane_state::reports`.

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

use filterplane_state::{
    etcd::{Etcd, EtcdUrl},
    lease::{Beat, Leadership},
    shared::EtcdStore,
    Store, StoreError,
};

use crate::{
    fleet::{ReplicaShare, Summary},
    tracker::AckTracker,
};

/// The summary of the whole fleet: this replica's proxies, and with several replicas,
/// every other replica's last report.
pub fn fleet_summary(tracker: &AckTracker, replicas: &Replicas) -> Summary {
    let mut s = crate::fleet::summary(tracker);
    if !replicas.is_shared() {
        return s;
    }
    let status = replicas.status();
    let share = |name: &str, s: &Summary, this: bool, age_ms: u64| ReplicaShare {
        replica: name.to_owned(),
        proxies: s.proxies,
        states: s.states.clone(),
        leader: status.leader.as_deref() == Some(name),
        this,
        age_ms,
    };
    let mut shares = vec![share(&replicas.name, &s, true, 0)];
    for n in &mut s.nacking {
        n.replica = Some(replicas.name.clone());
    }
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    // (Read in place: the reports hold every proxy of the other replicas during a rollout.)
    replicas.with_others(|others| {
        for r in others {
            shares.push(share(&r.replica, &r.summary, false, now.saturating_sub(r.at_ms)));
            s.merge(&r.summary, &r.replica);
        }
    });
    shares.sort_by(|a, b| a.replica.cmp(&b.replica));
    s.replicas = shares;
    s
}

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
    /// Its traffic since each running gated rollout's step began (by that time), from its
    /// stats: the leader's health gates count every replica's proxies.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub traffic: BTreeMap<u64, filterplane_rollout::Traffic>,
}

/// What one replica publishes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub replica: String,
    pub at_ms: u64,
    pub summary: Summary,
    /// Only while a rollout runs (the engine's input); empty otherwise. Published in
    /// `parts` separate keys (`NAME/p0`, `NAME/p1`, …) and put together when read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxies: Vec<FleetProxy>,
    #[serde(default)]
    pub parts: usize,
}

/// A NACK message as a report carries it (the page shows the whole one, from the
/// replica that has the proxy).
pub const REPORT_NACK_BYTES: usize = 1024;

pub use filterplane_state::reports::PART_BYTES;

impl filterplane_state::reports::Report for Report {
    type Item = FleetProxy;
    fn replica(&self) -> &str {
        &self.replica
    }
    fn at_ms(&self) -> u64 {
        self.at_ms
    }
    fn parts(&self) -> usize {
        self.parts
    }
    fn set_items(&mut self, items: Vec<FleetProxy>) {
        self.proxies = items;
    }
    fn items(&self) -> &[FleetProxy] {
        &self.proxies
    }
}

fn pack_parts(proxies: &[FleetProxy], at_ms: u64) -> (Vec<Vec<u8>>, usize) {
    filterplane_state::reports::pack_parts(proxies, at_ms)
}

fn read_reports(listing: Vec<(String, Vec<u8>)>, prefix: &str, me: &str, previous: &[Report]) -> Vec<Report> {
    filterplane_state::reports::read_reports(listing, prefix, me, previous)
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
    /// Why this replica's last report was not written whole (it keeps leading, and the
    /// others keep its previous proxies meanwhile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_error: Option<String>,
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
    /// When `others` was last read from etcd (ms since the epoch; `u64::MAX` alone).
    read_at_ms: std::sync::atomic::AtomicU64,
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
                report_error: None,
            }),
            name,
            etcd: None,
            leader: AtomicBool::new(true),
            reachable: AtomicBool::new(true),
            others: Mutex::new(Vec::new()),
            read_at_ms: u64::MAX.into(),
        })
    }

    pub fn shared(
        name: String,
        url: EtcdUrl,
        access: &filterplane_state::etcd::EtcdAccess,
    ) -> Result<Arc<Self>, filterplane_state::etcd::EtcdError> {
        if name.is_empty() || name.len() > 128 || name.chars().any(|c| c == '/' || c.is_control()) {
            return Err(filterplane_state::etcd::EtcdError::ReplicaName(name));
        }
        let etcd = Etcd::new(&url, access)?;
        Ok(Arc::new(Self {
            status: Mutex::new(SharedStatus { store: "etcd", replica: name.clone(), ..Default::default() }),
            name,
            etcd: Some((etcd, url)),
            leader: AtomicBool::new(false),
            reachable: AtomicBool::new(false),
            others: Mutex::new(Vec::new()),
            read_at_ms: 0.into(),
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

    /// Calls `f` with the other replicas' latest reports, without copying them.
    pub fn with_others<T>(&self, f: impl FnOnce(&[Report]) -> T) -> T {
        f(&self.others.lock().unwrap_or_else(|p| p.into_inner()))
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
        self.read_at_ms.load(Ordering::Relaxed) >= ms
            && self.others.lock().unwrap_or_else(|p| p.into_inner()).iter().all(|r| r.at_ms >= ms)
    }

    /// The rollout store: etcd's key when shared.
    /// The rollout store: etcd's key when shared, kept in step until `shutdown`.
    pub async fn store(self: &Arc<Self>, shutdown: CancellationToken) -> Result<Option<Box<dyn Store>>, StoreError> {
        let Some((etcd, url)) = &self.etcd else { return Ok(None) };
        let me = self.clone();
        let reachability = Arc::new(move |error: Option<String>| me.set_reachable(error));
        let store = EtcdStore::open(etcd.clone(), format!("{}rollouts", url.prefix), reachability, shutdown).await?;
        Ok(Some(Box::new(store)))
    }

    fn set_reachable(&self, error: Option<String>) {
        let ok = error.is_none();
        if self.reachable.swap(ok, Ordering::Relaxed) != ok {
            match &error {
                Some(e) => {
                    tracing::warn!(error = %e, "etcd unreachable: serving what this replica has; rollouts pause")
                }
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
        rollout_input: impl Fn() -> Option<Vec<u64>> + Send + 'static,
        health: Arc<crate::health::HealthStore>,
        shutdown: CancellationToken,
    ) {
        let Some((etcd, url)) = self.etcd.clone() else { return };
        let mut leadership = Leadership::new(format!("{}leader", url.prefix), self.name.clone(), LEASE_TTL);
        let reports = format!("{}replicas/", url.prefix);
        let mine = format!("{reports}{}", self.name);
        let mut beat = tokio::time::interval(BEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = beat.tick() => {}
            }
            let result: Result<(), filterplane_state::etcd::EtcdError> = async {
                let Beat { lease, holder, leading } = leadership.beat(&etcd).await?;
                if self.leader.swap(leading, Ordering::Relaxed) != leading {
                    tracing::info!(replica = %self.name, leading, "rollout leadership");
                }
                self.publish(&etcd, &mine, lease, &tracker, rollout_input(), &health).await;
                let previous = self.others();
                let read_at = now_ms();
                let others = read_reports(etcd.list(&reports).await?, &reports, &self.name, &previous);
                *self.others.lock().unwrap_or_else(|p| p.into_inner()) = others;
                self.read_at_ms.store(read_at, Ordering::Relaxed);
                let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                s.leader = holder;
                s.is_leader = leading;
                Ok(())
            }
            .await;
            match result {
                Ok(()) => self.set_reachable(None),
                Err(e) => {
                    self.set_reachable(Some(e.to_string()));
                    if leadership.on_error(&etcd, std::time::Instant::now(), self.is_leader()).await {
                        self.leader.store(false, Ordering::Relaxed);
                        tracing::warn!(replica = %self.name, "etcd unreachable: no longer leading rollouts; giving the leader key up");
                    }
                    // Reports of others go stale; drop them rather than count old NACKs.
                    self.others.lock().unwrap_or_else(|p| p.into_inner()).clear();
                    self.read_at_ms.store(0, Ordering::Relaxed);
                    let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                    s.is_leader = self.is_leader();
                }
            }
        }
        self.leader.store(false, Ordering::Relaxed);
        leadership.release(&etcd).await;
    }
}

impl Replicas {
    /// Writes this replica's report: its proxies (during a rollout) in parts, then the
    /// summary that counts them. A write that fails (a part etcd refuses) is logged and
    /// shown, and does not end the beat: the lease and leadership were kept before it,
    /// and the others' reports are read after it.
    async fn publish(
        &self,
        etcd: &Etcd,
        mine: &str,
        lease: i64,
        tracker: &AckTracker,
        rollout: Option<Vec<u64>>,
        health: &crate::health::HealthStore,
    ) {
        let at_ms = now_ms();
        let proxies = match rollout {
            Some(step_starts) => local_fleet(tracker, &self.name, health, &step_starts),
            None => Vec::new(),
        };
        let (parts, left_out) = pack_parts(&proxies, at_ms);
        let mut errors: Vec<String> = Vec::new();
        if left_out > 0 {
            tracker.metrics().limit_hit("report_proxy_bytes");
            errors.push(format!("{left_out} proxies over {PART_BYTES} bytes each left out"));
        }
        for (i, body) in parts.iter().enumerate() {
            if let Err(e) = etcd.put(&format!("{mine}/p{i}"), body.clone(), lease).await {
                errors.push(format!("part {i} ({} bytes): {e}", body.len()));
            }
        }
        let report = Report {
            replica: self.name.clone(),
            at_ms,
            summary: crate::fleet::summary(tracker),
            proxies: Vec::new(),
            parts: parts.len(),
        };
        let written = match serde_json::to_vec(&report) {
            Ok(body) => etcd.put(mine, body, lease).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = written {
            errors.push(format!("the report: {e}"));
        }
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        if let Some(e) = &error {
            if let Some(left_out) = crate::log_limit::REPORT_FAILURES.admit() {
                tracing::warn!(replica = %self.name, error = %e, left_out, "this replica's report was not written whole; it keeps leading and reading the others'");
            }
        }
        self.status.lock().unwrap_or_else(|p| p.into_inner()).report_error = error;
    }
}

/// This replica's proxies as the rollout engine sees them, with their traffic since each
/// of `step_starts` (running gated rollouts' steps).
pub fn local_fleet(
    tracker: &AckTracker,
    replica: &str,
    health: &crate::health::HealthStore,
    step_starts: &[u64],
) -> Vec<FleetProxy> {
    let ecds = filterplane_api::ResourceType::ExtensionConfig;
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
                            (
                                n.to_string(),
                                (r.acked_version.map(|v| v.to_string()), r.nacked_version.map(|v| v.to_string())),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            nack_message: t
                .and_then(|t| t.last_nack.as_ref())
                .map(|n| crate::xds::stream::truncated(&n.message, REPORT_NACK_BYTES)),
            replica: replica.to_owned(),
            traffic: step_starts
                .iter()
                .filter_map(|since| Some((*since, health.window(&p.facts().id, *since)?)))
                .collect(),
        });
    });
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(id: &str, replica: &str) -> FleetProxy {
        let mut node = crate::xds::stream::NodeInfo::default();
        node.facts.id = id.into();
        FleetProxy {
            node: Arc::new(node),
            connected_ms: 1,
            ecds: BTreeMap::new(),
            nack_message: None,
            replica: replica.into(),
            traffic: BTreeMap::new(),
        }
    }

    fn report(name: &str, at_ms: u64, parts: usize) -> Vec<u8> {
        let summary = crate::fleet::summary(&AckTracker::new(Arc::new(crate::metrics::Metrics::default())));
        serde_json::to_vec(&Report { replica: name.into(), at_ms, summary, proxies: Vec::new(), parts }).unwrap()
    }

    fn part(at_ms: u64, ids: &[&str], replica: &str) -> Vec<u8> {
        serde_json::to_vec(&filterplane_state::reports::Part {
            at_ms,
            proxies: ids.iter().map(|i| proxy(i, replica)).collect::<Vec<_>>(),
        })
        .unwrap()
    }

    #[test]
    fn parts_are_filled_by_size_and_read_back_whole() {
        // Issue 20: 2,000 proxies a part, 300 of them with 5 KB NACK messages, made a part
        // over etcd's limit. Messages are cut in reports, and parts sized by bytes.
        let proxies: Vec<FleetProxy> = (0..3000)
            .map(|i| {
                let mut p = proxy(&format!("node-{i}"), "r1");
                p.nack_message = Some(crate::xds::stream::truncated(&"x".repeat(5000), REPORT_NACK_BYTES));
                p
            })
            .collect();
        let mut huge = proxy("huge", "r1");
        Arc::make_mut(&mut huge.node).facts.id = "h".repeat(PART_BYTES);
        let with_huge: Vec<FleetProxy> = proxies.iter().cloned().chain([huge]).collect();
        let (parts, left_out) = pack_parts(&with_huge, 7);
        assert_eq!(left_out, 1, "a proxy larger than a part is left out, counted");
        assert!(
            parts.len() > 1 && parts.iter().all(|p| p.len() <= PART_BYTES),
            "{:?}",
            parts.iter().map(Vec::len).collect::<Vec<_>>()
        );
        let mut listing = vec![("x/replicas/r1".to_owned(), report("r1", 7, parts.len()))];
        listing.extend(parts.into_iter().enumerate().map(|(i, p)| (format!("x/replicas/r1/p{i}"), p)));
        let reports = read_reports(listing, "x/replicas/", "r0", &[]);
        let ids: Vec<&str> = reports[0].proxies.iter().map(|p| p.node.facts.id.as_str()).collect();
        assert_eq!(ids.len(), 3000);
        assert_eq!(ids[2999], "node-2999");
    }

    #[test]
    fn reports_are_put_back_together_from_their_parts() {
        let listing = vec![
            ("fp/replicas/a".to_owned(), report("a", 7, 2)),
            ("fp/replicas/a/p0".to_owned(), part(7, &["n1", "n2"], "a")),
            ("fp/replicas/a/p1".to_owned(), part(7, &["n3"], "a")),
            // Left from a larger report before: not counted.
            ("fp/replicas/a/p2".to_owned(), part(5, &["old"], "a")),
            ("fp/replicas/me".to_owned(), report("me", 7, 0)),
            ("fp/replicas/b".to_owned(), report("b", 9, 1)),
            // Written meanwhile: b's part is of another moment; b keeps what it had.
            ("fp/replicas/b/p0".to_owned(), part(8, &["x"], "b")),
            ("fp/replicas/c".to_owned(), b"not json".to_vec()),
        ];
        let previous = vec![Report {
            replica: "b".into(),
            at_ms: 8,
            summary: crate::fleet::summary(&AckTracker::new(Arc::new(crate::metrics::Metrics::default()))),
            proxies: vec![proxy("kept", "b")],
            parts: 1,
        }];
        let got = read_reports(listing, "fp/replicas/", "me", &previous);
        let ids = |r: &Report| r.proxies.iter().map(|p| p.node.facts.id.clone()).collect::<Vec<_>>();
        assert_eq!(got.len(), 2, "me and the unreadable one are left out");
        assert_eq!(ids(&got[0]), ["n1", "n2", "n3"]);
        assert_eq!(ids(&got[1]), ["kept"]);
    }

    #[test]
    fn replica_names_cannot_break_the_key_layout() {
        let url: EtcdUrl = "etcd://127.0.0.1:1/x".parse().unwrap();
        for bad in ["", "a/p1", "tab\there"] {
            assert!(Replicas::shared(bad.into(), url.clone(), &Default::default()).is_err(), "{bad:?}");
        }
    }
}
