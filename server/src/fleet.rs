//! The connected fleet at a glance, computed on the server so that the page and the API
//! stay usable at 10,000 proxies and more: a summary (proxies per state and per version,
//! NACKing proxies first), and pages of proxies found by state and text, in a stable order
//! with a cursor. Neither copies a proxy that is not returned.

use std::collections::{BTreeMap, BinaryHeap, HashMap};

use filterplane_api::ResourceVersion;

use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::{
    tracker::{AckTracker, ProxyStatus, SyncState},
    xds::stream::NodeInfo,
};

/// The most proxies one page holds.
pub const MAX_PAGE: usize = 1000;
/// NACKing proxies a summary names.
pub const SUMMARY_NACKING: usize = 20;

/// A proxy's state: the worst of its types (NACKed, then waiting, then nothing sent).
pub fn proxy_state(p: &ProxyStatus) -> SyncState {
    let states = p.types.values().map(|t| t.state);
    let mut worst = SyncState::Synced;
    for s in states {
        if rank(s) < rank(worst) {
            worst = s;
        }
    }
    worst
}

/// Sort rank of a state: what needs attention first.
fn rank(s: SyncState) -> u8 {
    match s {
        SyncState::Nacked => 0,
        SyncState::Pending => 1,
        SyncState::NotSent => 2,
        SyncState::Synced => 3,
    }
}

fn parse_state(s: &str) -> Option<SyncState> {
    Some(match s {
        "nacked" => SyncState::Nacked,
        "pending" => SyncState::Pending,
        "not_sent" => SyncState::NotSent,
        "synced" => SyncState::Synced,
        _ => return None,
    })
}

/// A bad query, said back to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("state must be one of nacked, pending, not_sent, synced (got {0:?})")]
    State(String),
    #[error("cursor {0:?} is not one this server handed out")]
    Cursor(String),
    #[error("limit must be 1 to {MAX_PAGE} (got {0})")]
    Limit(usize),
}

/// `/api/v1/proxies?state=&q=&limit=&cursor=`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct ProxyQuery {
    pub state: Option<String>,
    /// Text the node id, cluster or peer address contains (any case).
    pub q: Option<String>,
    pub limit: Option<usize>,
    /// `next_cursor` of the page before.
    pub cursor: Option<String>,
}

impl ProxyQuery {
    /// Whether this asks for a page (any parameter given) rather than every proxy.
    pub fn is_paged(&self) -> bool {
        self.state.is_some() || self.q.is_some() || self.limit.is_some() || self.cursor.is_some()
    }
}

/// The order of the table, and what a cursor holds: state rank, node id, stream id. (The
/// node id by its shared `NodeInfo`: no copy per proxy looked at.)
#[derive(Debug, Clone)]
struct Key(u8, Arc<NodeInfo>, u64);

impl Key {
    fn tuple(&self) -> (u8, &str, u64) {
        (self.0, self.1.facts.id.as_str(), self.2)
    }

    fn cursor(&self) -> String {
        format!("{}.{}.{}", self.0, self.2, hex::encode(self.1.facts.id.as_bytes()))
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.tuple() == other.tuple()
    }
}
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.tuple().cmp(&other.tuple())
    }
}

/// A cursor: rank, stream id, node id (hex).
fn parse_cursor(text: &str) -> Option<(u8, String, u64)> {
    let mut parts = text.splitn(3, '.');
    let rank = parts.next()?.parse().ok()?;
    let stream = parts.next()?.parse().ok()?;
    let node = String::from_utf8(hex::decode(parts.next()?).ok()?).ok()?;
    Some((rank, node, stream))
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyPage {
    pub proxies: Vec<ProxyStatus>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Proxies the state and text match, on all pages.
    pub matched: usize,
    /// Proxies connected.
    pub total: usize,
}

/// One page: NACKing proxies first, then waiting ones, then the rest, each by node id.
pub fn page(tracker: &AckTracker, query: &ProxyQuery) -> Result<ProxyPage, QueryError> {
    let state = match query.state.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(parse_state(s).ok_or_else(|| QueryError::State(s.to_owned()))?),
        None => None,
    };
    let after = match query.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => Some(parse_cursor(c).ok_or_else(|| QueryError::Cursor(c.to_owned()))?),
        None => None,
    };
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(QueryError::Limit(limit));
    }
    let needle = query.q.as_deref().unwrap_or("").to_lowercase();
    let (mut matched, mut total) = (0, 0);
    // The `limit + 1` smallest keys after the cursor (one more tells whether a next page
    // exists), kept in a heap: no proxy is copied or sorted beyond those.
    let mut best: BinaryHeap<Key> = BinaryHeap::new();
    tracker.for_each(|p| {
        total += 1;
        let s = proxy_state(p);
        if state.is_some_and(|want| want != s) || !contains(p, &needle) {
            return;
        }
        matched += 1;
        let key = (rank(s), p.node_id(), p.stream_id);
        if after.as_ref().is_some_and(|(r, n, id)| key <= (*r, n.as_str(), *id)) {
            return;
        }
        if best.len() <= limit {
            best.push(Key(key.0, p.node.clone(), key.2));
        } else if best.peek().is_some_and(|top| key < top.tuple()) {
            best.pop();
            best.push(Key(key.0, p.node.clone(), key.2));
        }
    });
    let mut keys = best.into_sorted_vec();
    let next_cursor = (keys.len() > limit).then(|| {
        keys.truncate(limit);
        keys.last().map(Key::cursor).unwrap_or_default()
    });
    let wanted: std::collections::HashMap<u64, usize> = keys.iter().enumerate().map(|(i, k)| (k.2, i)).collect();
    let mut found: Vec<Option<ProxyStatus>> = vec![None; keys.len()];
    tracker.for_each(|p| {
        if let Some(&i) = wanted.get(&p.stream_id) {
            found[i] = Some(p.clone());
        }
    });
    // (A proxy that left between the two passes is left out.)
    let proxies = found.into_iter().flatten().collect();
    Ok(ProxyPage { proxies, next_cursor, matched, total })
}

fn contains(p: &ProxyStatus, needle: &str) -> bool {
    if needle.is_empty() {
        return true;
    }
    let has = |s: &str| s.to_lowercase().contains(needle);
    has(p.node_id()) || has(&p.facts().cluster) || has(&p.peer)
}

/// How many proxies are in each state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateCounts {
    pub synced: usize,
    pub pending: usize,
    pub nacked: usize,
    pub not_sent: usize,
}

impl StateCounts {
    fn add(&mut self, s: SyncState) {
        match s {
            SyncState::Synced => self.synced += 1,
            SyncState::Pending => self.pending += 1,
            SyncState::Nacked => self.nacked += 1,
            SyncState::NotSent => self.not_sent += 1,
        }
    }
}

/// Proxies by the version they run of one type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionCount {
    pub type_url: String,
    /// The version the proxies ACKed last (`null`: none yet).
    pub version: Option<String>,
    pub proxies: usize,
    pub states: StateCounts,
}

/// One resource across the fleet: how many proxies run which version of it, and whether
/// that is what each is sent (a proxy a rollout holds on the old version runs what it
/// should: it is `synced`, not behind).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceCount {
    pub type_url: String,
    pub name: String,
    /// By version: proxies that run it (their last ACK), whatever they are sent now.
    pub acked: BTreeMap<String, usize>,
    /// By version: proxies that run it and are sent it: as planned.
    #[serde(default)]
    pub synced: BTreeMap<String, usize>,
    /// By version: proxies sent it that did not answer yet.
    #[serde(default)]
    pub applying: BTreeMap<String, usize>,
    /// By version: proxies that NACKed it (they run what `acked` counts them under).
    pub nacked: BTreeMap<String, usize>,
    /// Proxies it was sent to that did not answer yet (all of `applying`).
    pub waiting: usize,
    /// A few of the proxies that NACKed it.
    pub nacking: Vec<String>,
}

/// A proxy that refused its last response, with Envoy's words.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NackingProxy {
    /// The replica it is connected to (several replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    pub node_id: String,
    pub cluster: String,
    pub stream_id: u64,
    pub type_url: String,
    pub version: String,
    pub message: String,
    pub at: String,
}

/// What `/api/v1/summary` answers and the page shows first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub proxies: usize,
    pub states: StateCounts,
    /// Largest groups first.
    pub versions: Vec<VersionCount>,
    pub resources: Vec<ResourceCount>,
    /// At most `SUMMARY_NACKING`, by node id.
    pub nacking: Vec<NackingProxy>,
    /// Moves whenever anything here may have changed.
    pub seq: u64,
    /// With several replicas: each one's share (this one's included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaShare>,
}

/// One replica's proxies, in a fleet-wide summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaShare {
    pub replica: String,
    pub proxies: usize,
    pub states: StateCounts,
    /// It drives rollout steps.
    pub leader: bool,
    /// The replica answering.
    pub this: bool,
    /// How old its report is (0 for this one).
    pub age_ms: u64,
}

impl Summary {
    /// Adds another replica's summary: the fleet-wide view.
    pub fn merge(&mut self, other: &Summary, replica: &str) {
        self.proxies += other.proxies;
        let s = &other.states;
        self.states.synced += s.synced;
        self.states.pending += s.pending;
        self.states.nacked += s.nacked;
        self.states.not_sent += s.not_sent;
        for v in &other.versions {
            match self.versions.iter_mut().find(|m| m.type_url == v.type_url && m.version == v.version) {
                Some(m) => {
                    m.proxies += v.proxies;
                    m.states.synced += v.states.synced;
                    m.states.pending += v.states.pending;
                    m.states.nacked += v.states.nacked;
                    m.states.not_sent += v.states.not_sent;
                }
                None => self.versions.push(v.clone()),
            }
        }
        self.versions.sort_by(|a, b| b.proxies.cmp(&a.proxies).then_with(|| a.type_url.cmp(&b.type_url)));
        for r in &other.resources {
            match self.resources.iter_mut().find(|m| m.type_url == r.type_url && m.name == r.name) {
                Some(m) => {
                    for (v, n) in &r.acked {
                        *m.acked.entry(v.clone()).or_default() += n;
                    }
                    for (v, n) in &r.nacked {
                        *m.nacked.entry(v.clone()).or_default() += n;
                    }
                    for (v, n) in &r.synced {
                        *m.synced.entry(v.clone()).or_default() += n;
                    }
                    for (v, n) in &r.applying {
                        *m.applying.entry(v.clone()).or_default() += n;
                    }
                    m.waiting += r.waiting;
                    for n in &r.nacking {
                        if m.nacking.len() < 5 {
                            m.nacking.push(format!("{n} (on {replica})"));
                        }
                    }
                }
                None => {
                    let mut r = r.clone();
                    r.nacking = r.nacking.iter().map(|n| format!("{n} (on {replica})")).collect();
                    self.resources.push(r);
                }
            }
        }
        self.nacking.extend(other.nacking.iter().cloned().map(|mut n| {
            n.replica = Some(replica.to_owned());
            n
        }));
        self.nacking.sort_by(|a, b| (&a.node_id, a.stream_id).cmp(&(&b.node_id, b.stream_id)));
        self.nacking.truncate(SUMMARY_NACKING);
    }
}

type PerVersion = HashMap<ResourceVersion, usize>;

/// One resource's proxies while the summary counts them (`ResourceCount` once done).
#[derive(Default)]
struct Tally {
    acked: PerVersion,
    synced: PerVersion,
    applying: PerVersion,
    nacked: PerVersion,
    waiting: usize,
    /// The first few NACKing it.
    nacking: Vec<String>,
}

/// The summary, in one pass over the proxies.
pub fn summary(tracker: &AckTracker) -> Summary {
    let seq = tracker.seq();
    let mut states = StateCounts::default();
    // Looked up by reference and filled in place: nothing is copied per proxy but what
    // is new (a version or resource not seen yet).
    let mut versions: BTreeMap<&'static str, HashMap<Option<crate::tracker::Text>, StateCounts>> = BTreeMap::new();
    let mut resources: BTreeMap<&'static str, HashMap<String, Tally>> = BTreeMap::new();
    let mut nacking: Vec<NackingProxy> = Vec::new();
    let mut proxies = 0;
    tracker.for_each(|p| {
        proxies += 1;
        states.add(proxy_state(p));
        for (rt, t) in p.types.iter() {
            let type_url = rt.type_url();
            let by_version = versions.entry(type_url).or_default();
            match by_version.get_mut(&t.acked_version) {
                Some(c) => c.add(t.state),
                None => by_version.entry(t.acked_version.clone()).or_default().add(t.state),
            }
            let of_type = resources.entry(type_url).or_default();
            for (name, r) in t.resources.iter() {
                let c = match of_type.get_mut(name.as_str()) {
                    Some(c) => c,
                    None => of_type.entry(name.to_string()).or_default(),
                };
                if let Some(v) = r.acked_version {
                    *c.acked.entry(v).or_default() += 1;
                }
                if let Some(v) = r.nacked_version {
                    *c.nacked.entry(v).or_default() += 1;
                    if c.nacking.len() < 5 {
                        c.nacking.push(p.node_id().to_owned());
                    }
                } else if r.acked_version == Some(r.sent_version) {
                    *c.synced.entry(r.sent_version).or_default() += 1;
                } else {
                    c.waiting += 1;
                    *c.applying.entry(r.sent_version).or_default() += 1;
                }
            }
            if let Some(n) = t.last_nack.as_ref().filter(|_| t.state == SyncState::Nacked) {
                nacking.push(NackingProxy {
                    replica: None,
                    node_id: p.node_id().to_owned(),
                    cluster: p.facts().cluster.clone(),
                    stream_id: p.stream_id,
                    type_url: type_url.to_owned(),
                    version: n.version.clone(),
                    message: n.message.clone(),
                    at: n.at.clone(),
                });
                if nacking.len() > 4 * SUMMARY_NACKING {
                    nacking.sort_by(|a, b| (&a.node_id, a.stream_id).cmp(&(&b.node_id, b.stream_id)));
                    nacking.truncate(SUMMARY_NACKING);
                }
            }
        }
    });
    let versions: BTreeMap<(&'static str, Option<crate::tracker::Text>), StateCounts> =
        versions.into_iter().flat_map(|(t, by)| by.into_iter().map(move |(v, c)| ((t, v), c))).collect();
    let named = |m: PerVersion| m.into_iter().map(|(v, n)| (v.to_string(), n)).collect::<BTreeMap<_, _>>();
    let mut resources: Vec<ResourceCount> = resources
        .into_iter()
        .flat_map(|(t, by)| {
            by.into_iter().map(move |(name, c)| ResourceCount {
                type_url: t.to_owned(),
                name,
                acked: named(c.acked),
                synced: named(c.synced),
                applying: named(c.applying),
                nacked: named(c.nacked),
                waiting: c.waiting,
                nacking: c.nacking,
            })
        })
        .collect();
    resources.sort_by(|a, b| (&a.type_url, &a.name).cmp(&(&b.type_url, &b.name)));
    nacking.sort_by(|a, b| (&a.node_id, a.stream_id).cmp(&(&b.node_id, b.stream_id)));
    nacking.truncate(SUMMARY_NACKING);
    let mut versions: Vec<VersionCount> = versions
        .into_iter()
        .map(|((type_url, version), states)| VersionCount {
            type_url: type_url.to_owned(),
            version: version.map(|v| v.as_str().to_owned()),
            proxies: states.synced + states.pending + states.nacked + states.not_sent,
            states,
        })
        .collect();
    versions.sort_by(|a, b| b.proxies.cmp(&a.proxies).then_with(|| a.type_url.cmp(&b.type_url)));
    Summary { proxies, states, versions, resources, nacking, seq, replicas: Vec::new() }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use filterplane_api::ResourceType;

    use super::*;
    use crate::{
        metrics::Metrics,
        tracker::StreamKind,
        xds::stream::{NodeInfo, StreamEvent},
    };

    fn node(id: &str) -> Arc<NodeInfo> {
        let mut n = NodeInfo::default();
        n.facts.id = id.into();
        n.facts.cluster = if id.starts_with("edge") { "edge".into() } else { "core".into() };
        Arc::new(n)
    }

    fn sent(nonce: &str) -> StreamEvent {
        StreamEvent::Sent {
            rt: ResourceType::ExtensionConfig,
            version: format!("v{nonce}").into(),
            nonce: nonce.into(),
            resources: vec![("f".into(), filterplane_api::content_version([nonce.as_bytes()]))].into(),
            removed: vec![],
            incremental: false,
            bytes: 10,
        }
    }

    /// 250 proxies: every tenth NACKs, the rest ACK.
    fn fleet() -> AckTracker {
        let t = AckTracker::new(Arc::new(Metrics::default()));
        for i in 0..250 {
            let name = if i % 2 == 0 { format!("edge-{i:03}") } else { format!("core-{i:03}") };
            let id = t.connect(node(&name), StreamKind::Sotw, format!("127.0.0.1:{}", 1000 + i));
            t.record(id, &sent("1"));
            let answer = if i % 10 == 0 {
                StreamEvent::Nacked {
                    rt: ResourceType::ExtensionConfig,
                    version: "v1".into(),
                    kept_version: String::new(),
                    nonce: "1".into(),
                    code: 13,
                    message: format!("no good on {name}"),
                    resources: vec!["f".into()],
                }
            } else {
                StreamEvent::Acked {
                    rt: ResourceType::ExtensionConfig,
                    version: "v1".into(),
                    nonce: "1".into(),
                    resources: None,
                }
            };
            t.record(id, &answer);
        }
        t
    }

    #[test]
    fn pages_walk_every_proxy_once_nacking_first() {
        let t = fleet();
        let mut seen = Vec::new();
        let mut query = ProxyQuery { limit: Some(40), ..Default::default() };
        loop {
            let page = page(&t, &query).unwrap();
            assert_eq!((page.total, page.matched), (250, 250));
            seen.extend(page.proxies.iter().map(|p| (proxy_state(p), p.node_id().to_owned())));
            match page.next_cursor {
                Some(c) => query.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen.len(), 250);
        assert!(seen[..25].iter().all(|(s, _)| *s == SyncState::Nacked), "NACKing proxies first");
        assert!(seen[25..].iter().all(|(s, _)| *s == SyncState::Synced));
        let mut sorted = seen.clone();
        sorted.sort_by_key(|(s, n)| (rank(*s), n.clone()));
        assert_eq!(seen, sorted);
    }

    #[test]
    fn state_and_text_narrow_the_page() {
        let t = fleet();
        let q = ProxyQuery { state: Some("nacked".into()), q: Some("EDGE-".into()), ..Default::default() };
        let p = page(&t, &q).unwrap();
        assert_eq!(p.matched, 25, "edge-000, edge-010, … edge-240");
        assert!(p.proxies.iter().all(|p| p.node_id().starts_with("edge-")));
        let by_peer = page(&t, &ProxyQuery { q: Some("127.0.0.1:1007".into()), ..Default::default() }).unwrap();
        assert_eq!(by_peer.matched, 1, "by peer address");
        assert_eq!(
            page(&t, &ProxyQuery { state: Some("lost".into()), ..Default::default() }).unwrap_err(),
            QueryError::State("lost".into())
        );
        assert!(matches!(
            page(&t, &ProxyQuery { cursor: Some("zz".into()), ..Default::default() }),
            Err(QueryError::Cursor(_))
        ));
        assert_eq!(page(&t, &ProxyQuery { limit: Some(0), ..Default::default() }).unwrap_err(), QueryError::Limit(0));
    }

    #[test]
    fn the_summary_counts_states_versions_and_names_nacking_proxies() {
        let t = fleet();
        let s = summary(&t);
        assert_eq!(s.proxies, 250);
        assert_eq!(s.states, StateCounts { synced: 225, pending: 0, nacked: 25, not_sent: 0 });
        assert_eq!(s.nacking.len(), SUMMARY_NACKING);
        assert!(s.nacking[0].message.starts_with("no good on"), "{:?}", s.nacking[0]);
        let f = &s.resources[0];
        assert_eq!(f.nacked.values().sum::<usize>(), 25);
        assert_eq!(f.acked.values().sum::<usize>(), 225);
        assert_eq!(f.nacking.len(), 5);
        assert_eq!(f.synced.values().sum::<usize>(), 225, "ACKed what they were sent");
        assert!(f.applying.is_empty());
        let total: usize = s.versions.iter().map(|v| v.proxies).sum();
        assert_eq!(total, 250);
    }

    /// A proxy a rollout keeps on the old version runs what it is sent: synced, not
    /// behind; only a proxy sent a version it did not ACK yet is applying it.
    #[test]
    fn a_proxy_held_on_the_old_version_is_synced_and_one_sent_the_new_is_applying() {
        let t = AckTracker::new(Arc::new(Metrics::default()));
        let ack = |nonce: &str| StreamEvent::Acked {
            rt: ResourceType::ExtensionConfig,
            version: format!("v{nonce}"),
            nonce: nonce.into(),
            resources: None,
        };
        let held = t.connect(node("held"), StreamKind::Sotw, "127.0.0.1:1".into());
        t.record(held, &sent("1"));
        t.record(held, &ack("1"));
        let moving = t.connect(node("moving"), StreamKind::Sotw, "127.0.0.1:2".into());
        t.record(moving, &sent("1"));
        t.record(moving, &ack("1"));
        t.record(moving, &sent("2"));
        let s = summary(&t);
        let f = &s.resources[0];
        let v = |n: &str| filterplane_api::content_version([n.as_bytes()]).to_string();
        assert_eq!(f.acked, BTreeMap::from([(v("1"), 2)]), "both run v1");
        assert_eq!(f.synced, BTreeMap::from([(v("1"), 1)]), "the held one as planned");
        assert_eq!(f.applying, BTreeMap::from([(v("2"), 1)]), "the other is applying v2");
        assert_eq!(f.waiting, 1);
    }
}
