//! ACK/NACK state per connected proxy, type and resource, plus a bounded history of
//! rejects that outlives the proxies' streams. Fed by stream events; read by the admin
//! API, the admin page and `filterplane status`; counts into the metrics.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Instant, SystemTime},
};

use dashmap::DashMap;
use filterplane_api::{ResourceType, ResourceVersion};
use filterplane_config::NodeFacts;
use serde::Serialize;

use crate::{
    metrics::{KindLabel, Metrics},
    xds::stream::{NodeInfo, StreamEvent},
};
pub use filterplane_xds::stream::StreamKind;
use filterplane_xds::vec_map::VecMap;

pub type StreamId = u64;

/// Hashes stream ids (handed out in sequence) by one multiplication: SipHash, the
/// default, protects against keys a client chooses, and a client chooses none of these.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdHash;

impl std::hash::BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[derive(Debug, Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // Fibonacci hashing: the high bits (which pick the shard) and the low bits (which
        // pick the bucket) both vary with every id.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(26)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// How many rejects are kept after their proxies are gone.
pub const REJECT_HISTORY: usize = 1000;
/// How many distinct refused identities (node, cluster, certificate) are kept.
pub const REFUSAL_HISTORY: usize = 100;
/// Characters of a refused stream's node id and cluster kept (they are the client's).
const REFUSAL_FIELD_CHARS: usize = 256;

/// How a stream's client authenticated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerAuth {
    /// The connection is TLS.
    pub tls: bool,
    /// The SANs of the client certificate (`uri:...`, `dns:...`); empty without one.
    pub certificate: Vec<String>,
    /// Sensitive resources are not served to it (--sensitive-to-authenticated-only).
    pub sensitive_withheld: bool,
}

/// A stream ended because its node did not match its certificate (`--node-identity`),
/// counted per node, cluster and certificate.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    pub first_at: String,
    pub last_at: String,
    pub count: u64,
    pub node_id: String,
    pub cluster: String,
    pub peer: String,
    pub certificate: Vec<String>,
    pub message: String,
}

/// One proxy stream as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyStatus {
    pub stream_id: StreamId,
    /// Shown as `node_id`, `cluster`, `metadata`, `locality` and `user_agent`.
    #[serde(flatten, serialize_with = "node_fields")]
    pub node: Arc<NodeInfo>,
    pub stream_kind: StreamKind,
    pub peer: String,
    pub auth: PeerAuth,
    #[serde(serialize_with = "rfc3339")]
    pub connected_since: SystemTime,
    /// By type (shown by type URL). Keyed by the enum: a type URL key cost a 60-byte
    /// compare per lookup, two lookups per proxy per push.
    #[serde(serialize_with = "by_type_url")]
    pub types: VecMap<ResourceType, TypeStatus>,
}

impl ProxyStatus {
    pub fn node_id(&self) -> &str {
        &self.node.facts.id
    }

    /// What selectors match against, as the proxy said it.
    pub fn facts(&self) -> &NodeFacts {
        &self.node.facts
    }
}

/// The node as the admin API shows it (flattened into the proxy's object).
fn node_fields<S: serde::Serializer>(node: &Arc<NodeInfo>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Locality<'a> {
        region: &'a str,
        zone: &'a str,
        sub_zone: &'a str,
    }
    #[derive(Serialize)]
    struct Fields<'a> {
        node_id: &'a str,
        cluster: &'a str,
        metadata: &'a BTreeMap<String, String>,
        locality: Locality<'a>,
        user_agent: &'a str,
    }
    let f = &node.facts;
    Fields {
        node_id: &f.id,
        cluster: &f.cluster,
        metadata: &f.metadata,
        locality: Locality { region: &f.region, zone: &f.zone, sub_zone: &f.sub_zone },
        user_agent: &node.user_agent,
    }
    .serialize(s)
}

/// Where a type stands for one proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// Subscribed, nothing sent yet (no config, or nothing to say).
    NotSent,
    /// Sent, waiting for the ACK or NACK.
    Pending,
    /// The proxy runs what was last sent.
    Synced,
    /// The proxy refused what was last sent and runs an older version.
    Nacked,
}

/// Per type URL: what was asked, sent, accepted and refused.
#[derive(Debug, Clone, Serialize)]
pub struct TypeStatus {
    pub state: SyncState,
    pub wildcard: bool,
    pub subscribed: Vec<String>,
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub sent_at: Option<SystemTime>,
    pub acked_version: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub acked_at: Option<SystemTime>,
    pub last_nack: Option<Box<Nack>>,
    /// Set while Envoy fetches a Wasm module the last response needs: it NACKed it for
    /// now, and it is sent again.
    pub code_fetch: Option<Box<CodeFetch>>,
    /// By resource name.
    pub resources: VecMap<String, ResourceStatus>,
    #[serde(skip)]
    sent_instant: Option<Instant>,
}

impl Default for TypeStatus {
    fn default() -> Self {
        Self {
            state: SyncState::NotSent,
            wildcard: false,
            subscribed: Vec::new(),
            sent_version: None,
            sent_nonce: None,
            sent_at: None,
            acked_version: None,
            acked_at: None,
            last_nack: None,
            code_fetch: None,
            resources: VecMap::new(),
            sent_instant: None,
        }
    }
}

/// One resource of one proxy: the version last sent, and the version it runs.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ResourceStatus {
    pub sent_version: ResourceVersion,
    /// `None` until a response holding it is ACKed.
    pub acked_version: Option<ResourceVersion>,
    /// Set while the last response holding it was NACKed.
    pub nacked_version: Option<ResourceVersion>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Nack {
    pub version: String,
    pub nonce: String,
    pub code: i32,
    pub message: String,
    pub at: String,
}

/// A response Envoy NACKed while it fetches a Wasm module, waiting to be sent again.
#[derive(Debug, Clone, Serialize)]
pub struct CodeFetch {
    /// Resends so far, of at most `retries`.
    pub attempt: u32,
    pub retries: u32,
    /// Envoy's message with the NACK.
    pub message: String,
    pub at: String,
}

/// One reject, kept in the history.
#[derive(Debug, Clone, Serialize)]
pub struct Reject {
    pub at: String,
    pub node_id: String,
    pub cluster: String,
    pub type_url: String,
    pub resources: Vec<String>,
    pub version: String,
    pub kept_version: String,
    pub nonce: String,
    pub code: i32,
    pub message: String,
}

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
        self.record_on(&Tracked { id, status }, event);
    }

    /// Records what a connected stream did.
    pub fn record_on(&self, tracked: &Tracked, event: &StreamEvent) {
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
                set_text(&mut t.sent_version, version);
                set_text(&mut t.sent_nonce, nonce);
                t.sent_at = Some(SystemTime::now());
                t.sent_instant = Some(Instant::now());
                if !incremental {
                    // State of the world: what is not in the response (in name order) is gone.
                    t.resources.retain(|name, _| resources.binary_search_by(|(n, _)| n.cmp(name)).is_ok());
                }
                for name in removed {
                    t.resources.remove(name);
                }
                for (name, v) in resources {
                    match t.resources.get_mut(name.as_str()) {
                        Some(r) => r.sent_version = *v,
                        None => {
                            t.resources.insert(name.clone(), ResourceStatus { sent_version: *v, ..Default::default() });
                        }
                    }
                }
            }
            StreamEvent::Current { rt, version, resources } => {
                let t = type_status(&mut proxy, *rt);
                t.state = SyncState::Synced;
                t.acked_version = Some(version.clone());
                t.acked_at = Some(SystemTime::now());
                t.resources = resources
                    .iter()
                    .map(|(n, v)| {
                        (n.clone(), ResourceStatus { sent_version: *v, acked_version: Some(*v), nacked_version: None })
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
                        m.push_ack_latency.observe(sent.elapsed().as_secs_f64());
                    }
                    t.state = SyncState::Synced;
                }
                set_text(&mut t.acked_version, version);
                t.acked_at = Some(SystemTime::now());
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
                        for (name, v) in carried {
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
                    m.push_ack_latency.observe(sent.elapsed().as_secs_f64());
                }
                t.state = SyncState::Nacked;
                t.code_fetch = None;
                if !kept_version.is_empty() {
                    t.acked_version = Some(kept_version.clone());
                }
                t.last_nack = Some(Box::new(Nack {
                    version: version.clone(),
                    nonce: nonce.clone(),
                    code: *code,
                    message: message.clone(),
                    at: at.clone(),
                }));
                for name in resources {
                    if let Some(r) = t.resources.get_mut(name.as_str()) {
                        r.nacked_version = Some(r.sent_version);
                    }
                }
                reject = Some(Reject {
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

/// Sets `slot` to `text` in the buffer it has (the per-push path: a proxy's versions and
/// nonces keep their size, so no allocation after the first).
fn set_text(slot: &mut Option<String>, text: &str) {
    match slot {
        Some(s) => {
            s.clear();
            s.push_str(text);
        }
        None => *slot = Some(text.to_owned()),
    }
}

/// The types of a proxy as a map by type URL.
fn by_type_url<S: serde::Serializer>(types: &VecMap<ResourceType, TypeStatus>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(types.iter().map(|(rt, t)| (rt.type_url(), t)))
}

/// Timestamps are kept as `SystemTime` on the per-push path and formatted when read.
fn rfc3339<S: serde::Serializer, T: Timestamp>(t: &T, s: S) -> Result<S::Ok, S::Error> {
    match t.time() {
        Some(t) => s.serialize_str(&humantime::format_rfc3339_millis(t).to_string()),
        None => s.serialize_none(),
    }
}

trait Timestamp {
    fn time(&self) -> Option<SystemTime>;
}

impl Timestamp for SystemTime {
    fn time(&self) -> Option<SystemTime> {
        Some(*self)
    }
}

impl Timestamp for Option<SystemTime> {
    fn time(&self) -> Option<SystemTime> {
        *self
    }
}

/// RFC 3339, UTC, millisecond precision.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
#[path = "tracker_tests.rs"]
mod tests;
