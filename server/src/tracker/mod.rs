//! ACK/NACK state per connected proxy, type and resource, plus a bounded history of
//! rejects that outlives the proxies' streams. Fed by stream events; read by the admin
//! API, the admin page and `filterplane status`; counts into the metrics.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Instant, SystemTime},
};

use dashmap::DashMap;
use filterplane_api::ResourceType;

use crate::metrics::{KindLabel, Metrics};
pub use filterplane_xds::stream::StreamKind;
use filterplane_xds::stream::{NodeInfo, StreamEvent};
use filterplane_xds::vec_map::VecMap;

pub type StreamId = u64;

mod status;
pub use status::*;

#[derive(Debug)]
pub struct AckTracker {
    next_id: AtomicU64,
    /// Each proxy behind its own lock, which its stream holds too (`Tracked`): what a
    /// stream records takes no map lookup and no shard lock shared with other streams.
    proxies: DashMap<StreamId, Arc<Mutex<ProxyStatus>>, IdHash>,
    rejects: Mutex<VecDeque<Reject>>,
    reject_limit: usize,
    /// Most recently refused last.
    refusals: Mutex<VecDeque<Refusal>>,
    metrics: Arc<Metrics>,
    /// Moves on when a reader finds `dirty` set; watchers poll it (the admin's event
    /// stream), so a push to 10,000 proxies wakes nobody 20,000 times.
    seq: AtomicU64,
    /// Set on every change. Only read first, and written when not set yet: the hot path
    /// (two events per proxy per push, on every core) shares the line instead of taking
    /// it from the other core each time, as an add would.
    dirty: AtomicBool,
}

impl AckTracker {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_reject_limit(metrics, REJECT_HISTORY)
    }

    pub fn with_reject_limit(metrics: Arc<Metrics>, reject_limit: usize) -> Self {
        Self {
            next_id: AtomicU64::new(1),
            proxies: DashMap::default(),
            rejects: Mutex::new(VecDeque::new()),
            reject_limit,
            refusals: Mutex::new(VecDeque::new()),
            metrics,
            seq: AtomicU64::new(1),
            dirty: AtomicBool::new(false),
        }
    }

    /// The metrics it counts into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Moves on whenever proxies or rejects change: compare two readings.
    pub fn seq(&self) -> u64 {
        if self.dirty.swap(false, Ordering::AcqRel) {
            return self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        }
        self.seq.load(Ordering::Acquire)
    }

    fn changed(&self) {
        if !self.dirty.load(Ordering::Relaxed) {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// A stream identified its node (first request).
    #[cfg(test)]
    pub fn connect(&self, node: Arc<NodeInfo>, kind: StreamKind, peer: String) -> StreamId {
        self.connect_as(node, kind, peer, PeerAuth::default())
    }

    /// `connect`, with how the client authenticated.
    #[cfg(test)]
    pub fn connect_as(&self, node: Arc<NodeInfo>, kind: StreamKind, peer: String, auth: PeerAuth) -> StreamId {
        self.connect_tracked(node, kind, peer, auth).id
    }

    /// `connect_as`, handing back what the stream records into.
    pub fn connect_tracked(&self, node: Arc<NodeInfo>, kind: StreamKind, peer: String, auth: PeerAuth) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let status = Arc::new(Mutex::new(ProxyStatus {
            stream_id: id,
            node,
            stream_kind: kind,
            peer,
            auth,
            connected_since: SystemTime::now(),
            types: VecMap::new(),
        }));
        self.proxies.insert(id, status.clone());
        self.metrics.connected_proxies.get_or_create(&KindLabel { stream_kind: kind.label() }).inc();
        self.changed();
        Tracked { id, status }
    }

    /// Streams whose proxy does not run what it was last sent, per type of every type
    /// (zero included).
    pub fn not_synced_by_type(&self) -> Vec<(ResourceType, usize)> {
        let mut counts: Vec<(ResourceType, usize)> = ResourceType::ALL.iter().map(|rt| (*rt, 0)).collect();
        for p in self.proxies.iter() {
            let p = lock(p.value());
            for (rt, t) in p.types.iter() {
                if t.state != SyncState::Synced {
                    if let Some(c) = counts.iter_mut().find(|(r, _)| r == rt) {
                        c.1 += 1;
                    }
                }
            }
        }
        counts
    }

    pub fn disconnect(&self, id: StreamId) {
        if let Some((_, p)) = self.proxies.remove(&id) {
            let kind = lock(&p).stream_kind;
            self.metrics.connected_proxies.get_or_create(&KindLabel { stream_kind: kind.label() }).dec();
            self.changed();
        }
    }

    /// Records what stream `id` did (tests; streams use `record_on`).
    #[cfg(test)]
    pub fn record(&self, id: StreamId, event: &StreamEvent) {
        let Some(status) = self.proxies.get(&id).map(|p| p.value().clone()) else { return };
        self.record_on(&Tracked { id, status }, event, Instant::now());
    }

    /// Records what a connected stream did at `when` (as its step read the clock: the
    /// per-push path reads none of its own).
    pub fn record_on(&self, tracked: &Tracked, event: &StreamEvent, when: Instant) {
        let mut proxy = lock(&tracked.status);
        let mut reject = None;
        match event {
            StreamEvent::Subscribed { rt, wildcard, names } => {
                let t = type_status(&mut proxy, *rt);
                t.wildcard = *wildcard;
                t.subscribed = names.clone();
            }
            StreamEvent::Sent { rt, version, nonce, resources, removed, incremental, bytes } => {
                let m = self.metrics.of_type(*rt);
                m.pushes.inc();
                m.pushed_bytes.inc_by(*bytes as u64);
                let t = type_status(&mut proxy, *rt);
                t.state = SyncState::Pending;
                t.sent_version = Some(version.clone());
                t.sent_nonce = Some(nonce.clone());
                t.sent_at = Some(Stamp(when));
                t.sent_instant = Some(when);
                if !incremental {
                    // State of the world: what is not in the response (in name order) is gone.
                    t.resources.retain(|name, _| resources.binary_search_by(|(n, _)| n.as_str().cmp(name)).is_ok());
                }
                for name in removed {
                    t.resources.remove(name.as_str());
                }
                for (name, v) in resources.iter() {
                    match t.resources.get_mut(name.as_str()) {
                        Some(r) => r.sent_version = *v,
                        None => {
                            t.resources.insert(
                                name.as_str().into(),
                                ResourceStatus { sent_version: *v, ..Default::default() },
                            );
                        }
                    }
                }
            }
            StreamEvent::Current { rt, version, resources } => {
                let t = type_status(&mut proxy, *rt);
                t.state = SyncState::Synced;
                t.acked_version = Some(version.as_str().into());
                t.acked_at = Some(Stamp(when));
                t.resources = resources
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.as_str().into(),
                            ResourceStatus { sent_version: *v, acked_version: Some(*v), nacked_version: None },
                        )
                    })
                    .collect();
            }
            StreamEvent::Acked { rt, version, nonce, resources } => {
                let m = self.metrics.of_type(*rt);
                m.acks.inc();
                let t = type_status(&mut proxy, *rt);
                // Synced only once the latest response is ACKed (delta may have several
                // in flight; an ACK of an older one leaves the type pending).
                let latest = t.sent_nonce.as_deref().is_none_or(|n| n == nonce);
                if latest {
                    if let Some(sent) = t.sent_instant.take() {
                        m.push_ack_latency.observe(when.saturating_duration_since(sent).as_secs_f64());
                    }
                    t.state = SyncState::Synced;
                }
                t.acked_version = Some(version.as_str().into());
                t.acked_at = Some(Stamp(when));
                // Accepting a newer version ends the NACK state.
                t.last_nack = None;
                t.code_fetch = None;
                match resources {
                    // SotW: the response was the whole set, as last sent.
                    None => {
                        for r in t.resources.values_mut() {
                            r.acked_version = Some(r.sent_version);
                            r.nacked_version = None;
                        }
                    }
                    // Delta: exactly what that response carried (others may be in flight).
                    Some(carried) => {
                        for (name, v) in carried.iter() {
                            if let Some(r) = t.resources.get_mut(name.as_str()) {
                                r.acked_version = Some(*v);
                                r.nacked_version = None;
                            }
                        }
                    }
                }
            }
            StreamEvent::Nacked { rt, version, kept_version, nonce, code, message, resources } => {
                let m = self.metrics.of_type(*rt);
                m.rejects.inc();
                let at = now();
                let t = type_status(&mut proxy, *rt);
                if let Some(sent) = t.sent_instant.take() {
                    m.push_ack_latency.observe(when.saturating_duration_since(sent).as_secs_f64());
                }
                t.state = SyncState::Nacked;
                t.code_fetch = None;
                if !kept_version.is_empty() {
                    t.acked_version = Some(kept_version.as_str().into());
                }
                t.last_nack = Some(Box::new(Nack {
                    version: version.clone(),
                    nonce: nonce.clone(),
                    code: *code,
                    message: message.clone(),
                    at: at.clone(),
                }));
                let mut resource_versions = std::collections::BTreeMap::new();
                for name in resources {
                    if let Some(r) = t.resources.get_mut(name.as_str()) {
                        r.nacked_version = Some(r.sent_version);
                        resource_versions.insert(name.clone(), r.sent_version.to_string());
                    }
                }
                reject = Some(Reject {
                    resource_versions,
                    at,
                    node_id: proxy.node.facts.id.clone(),
                    cluster: proxy.node.facts.cluster.clone(),
                    type_url: rt.type_url().to_owned(),
                    resources: resources.clone(),
                    version: version.clone(),
                    kept_version: kept_version.clone(),
                    nonce: nonce.clone(),
                    code: *code,
                    message: message.clone(),
                });
            }
            StreamEvent::CodeFetchPending { rt, message, attempt, retries, .. } => {
                // Not a reject (yet): the proxy is fetching, and the response goes again.
                self.metrics.wasm_code_fetch_resends.inc();
                let t = type_status(&mut proxy, *rt);
                t.state = SyncState::Pending;
                t.code_fetch = Some(Box::new(CodeFetch {
                    attempt: *attempt,
                    retries: *retries,
                    message: message.clone(),
                    at: now(),
                }));
            }
            StreamEvent::UnsupportedType { .. } => return,
        }
        drop(proxy);
        if let Some(reject) = reject {
            let mut rejects = self.rejects.lock().unwrap_or_else(|p| p.into_inner());
            if rejects.len() >= self.reject_limit {
                rejects.pop_front();
            }
            rejects.push_back(reject);
        }
        self.changed();
    }

    /// How many rejects are kept.
    pub fn rejects_len(&self) -> usize {
        self.rejects.lock().map(|r| r.len()).unwrap_or_default()
    }

    /// Calls `f` with every connected proxy, in no order, without copying any.
    pub fn for_each(&self, mut f: impl FnMut(&ProxyStatus)) {
        for p in self.proxies.iter() {
            f(&lock(p.value()));
        }
    }

    /// The streams of one node.
    pub fn proxy(&self, node_id: &str) -> Vec<ProxyStatus> {
        let mut v = Vec::new();
        self.for_each(|p| {
            if p.node_id() == node_id {
                v.push(p.clone());
            }
        });
        v.sort_by_key(|p| p.stream_id);
        v
    }

    /// Connected proxies, by node id then stream.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        let mut v: Vec<ProxyStatus> = self.proxies.iter().map(|p| lock(p.value()).clone()).collect();
        v.sort_by(|a, b| (a.node_id(), a.stream_id).cmp(&(b.node_id(), b.stream_id)));
        v
    }

    /// A stream refused for its identity. Returns true the first time this node,
    /// cluster and certificate are refused (while remembered), so it is logged once.
    pub fn refuse(&self, node_id: &str, cluster: &str, peer: &str, certificate: Vec<String>, message: &str) -> bool {
        self.metrics.xds_identity_refusals.inc();
        let cut = |s: &str| s.chars().take(REFUSAL_FIELD_CHARS).collect::<String>();
        let (node_id, cluster) = (cut(node_id), cut(cluster));
        let at = now();
        let mut refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let known =
            refusals.iter().position(|r| r.node_id == node_id && r.cluster == cluster && r.certificate == certificate);
        let first = known.is_none();
        let mut entry = match known.and_then(|i| refusals.remove(i)) {
            Some(r) => r,
            None => Refusal {
                first_at: at.clone(),
                last_at: String::new(),
                count: 0,
                node_id,
                cluster,
                peer: String::new(),
                certificate,
                message: String::new(),
            },
        };
        entry.count += 1;
        entry.last_at = at;
        entry.peer = peer.to_owned();
        entry.message = cut(message);
        if refusals.len() >= REFUSAL_HISTORY {
            refusals.pop_front();
            self.metrics.limit_hit("refusals_kept");
        }
        refusals.push_back(entry);
        drop(refusals);
        self.changed();
        first
    }

    /// Streams refused for their identity, most recent first.
    pub fn refusals(&self) -> Vec<Refusal> {
        let refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        refusals.iter().rev().cloned().collect()
    }

    /// Recent rejects, newest first.
    pub fn rejects(&self) -> Vec<Reject> {
        let rejects = self.rejects.lock().unwrap_or_else(|p| p.into_inner());
        rejects.iter().rev().cloned().collect()
    }
}

/// A connected stream's place in the tracker.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub id: StreamId,
    status: Arc<Mutex<ProxyStatus>>,
}

/// A proxy's status, locked (a panic elsewhere while it was held leaves it as it was).
fn lock(status: &Mutex<ProxyStatus>) -> std::sync::MutexGuard<'_, ProxyStatus> {
    status.lock().unwrap_or_else(|p| p.into_inner())
}

/// The status of one type.
fn type_status(proxy: &mut ProxyStatus, rt: ResourceType) -> &mut TypeStatus {
    proxy.types.get_or_insert_with(rt, TypeStatus::default)
}

#[cfg(test)]
mod tests;
