//! What every xDS stream shares, whatever its flavour: who the node is, what it
//! subscribed to, nonces, and the events the tracker records.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::{Arc, LazyLock, Mutex, Weak},
    time::{Duration, Instant},
};

use filterplane_api::{
    envoy_types::pb::envoy::config::core::v3::{node::UserAgentVersionType, Node},
    envoy_types::pb::google::protobuf::value::Kind,
    ResourceType, ResourceVersion,
};
use filterplane_config::NodeFacts;

use crate::snapshot::{ResourceMap, ServedResource, Snapshot};
use crate::text::Text;

/// What a stream learns from the `node` of its first request.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub facts: NodeFacts,
    /// e.g. "envoy 1.40.0".
    pub user_agent: String,
}

/// The scalar fields of a `Struct`, as text (strings, numbers, booleans).
fn scalars<'a>(
    fields: impl Iterator<Item = (&'a String, &'a filterplane_api::envoy_types::pb::google::protobuf::Value)>,
) -> std::collections::BTreeMap<String, String> {
    fields
        .filter_map(|(k, v)| {
            let text = match v.kind.as_ref()? {
                Kind::StringValue(s) => s.clone(),
                Kind::NumberValue(n) => n.to_string(),
                Kind::BoolValue(b) => b.to_string(),
                _ => return None,
            };
            Some((k.clone(), text))
        })
        .collect()
}

impl From<&Node> for NodeInfo {
    fn from(node: &Node) -> Self {
        let metadata = scalars(node.metadata.iter().flat_map(|s| s.fields.iter()));
        // Istio proxies carry their workload labels in metadata.LABELS.
        let labels = node.metadata.as_ref().and_then(|s| s.fields.get("LABELS")).and_then(|v| match v.kind.as_ref() {
            Some(Kind::StructValue(l)) => Some(scalars(l.fields.iter())),
            _ => None,
        });
        let locality = node.locality.clone().unwrap_or_default();
        let version = match &node.user_agent_version_type {
            Some(UserAgentVersionType::UserAgentVersion(v)) => v.clone(),
            Some(UserAgentVersionType::UserAgentBuildVersion(b)) => b
                .version
                .as_ref()
                .map(|v| format!("{}.{}.{}", v.major_number, v.minor_number, v.patch))
                .unwrap_or_default(),
            None => String::new(),
        };
        NodeInfo {
            facts: NodeFacts {
                id: node.id.clone(),
                cluster: node.cluster.clone(),
                metadata,
                region: locality.region,
                zone: locality.zone,
                sub_zone: locality.sub_zone,
                labels,
                version: version.clone(),
            },
            user_agent: format!("{} {}", node.user_agent_name, version).trim().to_owned(),
        }
    }
}

/// What one step of a protocol state machine asks its caller to do: send these
/// responses, record these events.
#[derive(Debug)]
pub struct Step<R> {
    pub responses: Vec<R>,
    pub events: Vec<StreamEvent>,
    /// Limits the step hit (`filterplane_limit_hits_total{limit}`).
    pub limits: Vec<&'static str>,
}

impl<R> Step<R> {
    /// The type and nonce of every response of this step.
    pub fn sent(&self) -> Vec<(ResourceType, String)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Sent { rt, nonce, .. } => Some((*rt, nonce.to_string())),
                _ => None,
            })
            .collect()
    }
}

impl<M: prost::Message + Default> Step<crate::wire::Wire<M>> {
    /// The same step with its responses decoded (tests and tools).
    pub fn decoded(self) -> Step<M> {
        Step {
            responses: self.responses.iter().map(|w| w.decode()).collect(),
            events: self.events,
            limits: self.limits,
        }
    }
}

impl<R> Default for Step<R> {
    fn default() -> Self {
        Self { responses: Vec::new(), events: Vec::new(), limits: Vec::new() }
    }
}

/// How streams behave around changes; the same for every stream of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    /// Make-before-break (`hold.rs`): what a changed listener may have used (an extension
    /// config whose filter left it, over delta; a cluster, endpoints, a secret) stays
    /// served until Envoy unsubscribes it (it does once nothing, draining listeners
    /// included, refers to it), or until this long after the proxy ACKed the listener
    /// update. Set it to at least Envoy's `--drain-time-s` (600 s unless set).
    pub drain_grace: Duration,
    /// How many times a response that Envoy NACKed while it fetches a remote Wasm module
    /// is sent again, with backoff (`code_fetch_backoff`), before the NACK counts.
    pub code_fetch_retries: u32,
    /// Names one stream may subscribe to, per type; more ends the stream
    /// (RESOURCE_EXHAUSTED). A proxy names a few per filter or cluster.
    pub max_subscribed_names: usize,
    /// How much of a NACK's message is kept (recorded, logged, shown); Envoy's own are a
    /// few hundred bytes, and a client may send megabytes.
    pub max_nack_message_bytes: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            drain_grace: Duration::from_secs(600),
            code_fetch_retries: 10,
            max_subscribed_names: 10_000,
            max_nack_message_bytes: 4096,
        }
    }
}

/// How much of a type URL Filterplane does not serve is logged.
pub const MAX_LOGGED_TYPE_URL_BYTES: usize = 256;

/// `text` cut to at most `max` bytes (at a character boundary), marked when cut.
pub fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

/// How long to wait before resend `attempt` (1 for the first) of a response that Envoy
/// NACKed while fetching a remote Wasm module: 100 ms, doubling, at most 5 s (ten resends
/// span about 26 s, within which a module fetch has long timed out or succeeded).
pub fn code_fetch_backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.saturating_sub(1).min(6)).min(Duration::from_secs(5))
}

/// A response Envoy NACKed while it fetches a remote Wasm module: sent again at `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeFetchRetry {
    /// Resends so far, this one included.
    pub attempt: u32,
    /// When to resend; `None` once sent, until Envoy answers.
    pub at: Option<Instant>,
    /// What the NACKed response carried (delta sends exactly these again).
    pub names: Vec<String>,
}

/// A NACK, as both protocols read it from a request.
#[derive(Debug)]
pub struct Nack {
    pub rt: ResourceType,
    /// The rejected version, and the one Envoy keeps.
    pub version: String,
    pub kept_version: String,
    pub nonce: String,
    pub code: i32,
    pub message: String,
    /// What the rejected response carried.
    pub names: Vec<String>,
}

impl StreamCore {
    /// What a NACK of a response carrying `resources` (as the snapshot has them now)
    /// comes to: when one of them has Wasm code Envoy fetches itself and resends remain,
    /// a resend (stored in `retry`, of `retry_names`, or the whole response when empty)
    /// and a `CodeFetchPending`; else a `Nacked` that counts. Envoy says the same "Unable
    /// to create Wasm plugin" for a cache miss as for a module it refuses, but Filterplane
    /// checked the module before serving it, so a miss is the likely reason; the resends
    /// are bounded either way.
    pub fn on_nack<'a>(
        &self,
        nack: Nack,
        mut resources: impl Iterator<Item = &'a Arc<ServedResource>>,
        retry_names: Vec<String>,
        retry: &mut Option<Box<CodeFetchRetry>>,
        now: Instant,
    ) -> StreamEvent {
        let nack = Nack { message: truncated(&nack.message, self.settings.max_nack_message_bytes), ..nack };
        let attempt = retry.as_ref().map_or(0, |r| r.attempt) + 1;
        let retries = self.settings.code_fetch_retries;
        if attempt > retries || !resources.any(|r| r.envoy_fetches_code) {
            *retry = None;
            let Nack { rt, version, kept_version, nonce, code, message, names } = nack;
            return StreamEvent::Nacked { rt, version, kept_version, nonce, code, message, resources: names };
        }
        let at = Some(now + code_fetch_backoff(attempt));
        *retry = Some(Box::new(CodeFetchRetry { attempt, at, names: retry_names }));
        let Nack { rt, version, nonce, message, names, .. } = nack;
        StreamEvent::CodeFetchPending { rt, version, nonce, message, resources: names, attempt, retries }
    }
}

/// What both protocol state machines keep besides their per-type state.
#[derive(Debug)]
pub struct StreamCore {
    /// Set on single-type services: any other type URL is a protocol error.
    pub only: Option<ResourceType>,
    /// Shared with the tracker.
    pub node: Option<Arc<NodeInfo>>,
    pub snapshot: Option<Arc<Snapshot>>,
    pub nonces: NonceSource,
    pub control_plane: &'static str,
    pub settings: Arc<StreamSettings>,
}

impl StreamCore {
    pub fn new(only: Option<ResourceType>, control_plane: &'static str, settings: Arc<StreamSettings>) -> Self {
        Self { only, node: None, snapshot: None, nonces: NonceSource::default(), control_plane, settings }
    }

    /// How many names a subscription of `rt` may hold: what this proxy is served of that
    /// type, plus `--max-subscribed-names` more (names that do not exist cost little but
    /// are bounded). An Envoy with 50,000 EDS clusters subscribes to 50,000 names; a
    /// fixed count would end its stream.
    pub fn name_limit(&self, rt: ResourceType) -> usize {
        let served = self.snapshot.as_ref().and_then(|s| s.resources(rt)).map_or(0, |m| m.len());
        self.settings.max_subscribed_names.saturating_add(served)
    }

    /// The node, once the first request has named it.
    pub fn node(&self) -> Option<&Arc<NodeInfo>> {
        self.node.as_ref()
    }

    /// Adopts a node learnt elsewhere (the stream loop's, which the tracker shares).
    pub fn set_node(&mut self, node: Arc<NodeInfo>) {
        self.node.get_or_insert(node);
    }

    /// What both protocols check first in every request: the node (learnt from the
    /// first request; Envoy may omit it later) and the type URL. `Ok(None)` for a type
    /// Filterplane does not serve, with the event recorded in `step`: xDS protocol, such
    /// a request gets no response and Envoy times the subscription out on its own
    /// (initial_fetch_timeout).
    pub fn check_request<R>(
        &mut self,
        req_node: Option<&Node>,
        type_url: &str,
        step: &mut Step<R>,
    ) -> Result<Option<ResourceType>, crate::ProtocolError> {
        use crate::ProtocolError;
        if self.node.is_none() {
            self.node = Some(Arc::new(NodeInfo::from(req_node.ok_or(ProtocolError::MissingNode)?)));
        }
        let wrong = || ProtocolError::WrongType { got: type_url.to_owned() };
        match ResourceType::from_type_url(type_url) {
            None if self.only.is_some() => Err(wrong()),
            None => {
                step.events
                    .push(StreamEvent::UnsupportedType { type_url: truncated(type_url, MAX_LOGGED_TYPE_URL_BYTES) });
                Ok(None)
            }
            Some(rt) if self.only.is_some_and(|o| o != rt) => Err(wrong()),
            Some(rt) => Ok(Some(rt)),
        }
    }
}

/// The resources of one type a stream asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Subscription {
    /// All resources of the type (explicit `*`, or LDS/CDS legacy wildcard).
    pub wildcard: bool,
    /// Names asked for explicitly (besides `*`), sorted, without repeats. (A sorted
    /// `Vec`: a stream usually names a few, and a set allocates a tree node per set.)
    names: Vec<String>,
}

impl Subscription {
    /// The subscription a state-of-the-world request states. SotW requests carry the
    /// full list every time. xDS protocol, "How the client specifies what resources to
    /// return": an empty list on the first LDS/CDS request is the legacy wildcard, and
    /// stays wildcard while later requests keep the list empty; `*` is the explicit
    /// wildcard; any other list replaces what was subscribed before.
    pub fn from_sotw(
        rt: ResourceType,
        names: &[String],
        previous: Option<&Subscription>,
        limit: usize,
    ) -> Result<Self, crate::ProtocolError> {
        if names.is_empty() {
            let legacy = rt.legacy_wildcard() && previous.is_none_or(|p| p.wildcard);
            return Ok(Subscription { wildcard: legacy, names: Vec::new() });
        }
        if names.len() > limit {
            return Err(crate::ProtocolError::TooManyNames { names: names.len(), limit });
        }
        let wildcard = names.iter().any(|n| n == "*");
        let mut names: Vec<String> = names.iter().filter(|n| *n != "*").cloned().collect();
        names.sort_unstable();
        names.dedup();
        // Kept for the stream's life: no empty slots (a filter's collect starts at four).
        names.shrink_to_fit();
        Ok(Subscription { wildcard, names })
    }

    /// Whether a state-of-the-world request naming `names` states exactly this
    /// subscription again, known without building one: the names in order, without
    /// repeats (as Envoy sends them). `false` may still mean the same.
    pub fn states_same(&self, rt: ResourceType, names: &[String]) -> bool {
        if names.is_empty() {
            return self.names.is_empty() && (!self.wildcard || rt.legacy_wildcard());
        }
        match names {
            [star] if star == "*" => self.wildcard && self.names.is_empty(),
            _ => !self.wildcard && self.names.as_slice() == names,
        }
    }

    /// Applies a delta request's changes. xDS protocol, "Delta xDS": the first request of
    /// a type with nothing to subscribe is the legacy wildcard for LDS/CDS; `*` subscribes
    /// to the wildcard explicitly and unsubscribing `*` ends it; names accumulate until
    /// unsubscribed.
    pub fn apply_delta(
        &mut self,
        rt: ResourceType,
        first: bool,
        subscribe: &[String],
        unsubscribe: &[String],
        limit: usize,
    ) -> Result<(), crate::ProtocolError> {
        if first && subscribe.is_empty() && rt.legacy_wildcard() {
            self.wildcard = true;
        }
        let before = self.names.len();
        for n in subscribe {
            if n == "*" {
                self.wildcard = true;
            } else {
                self.names.push(n.clone());
            }
        }
        if self.names.len() != before {
            self.names.sort_unstable();
            self.names.dedup();
        }
        // One pass, whatever the number of names: removing them one by one is quadratic.
        if !unsubscribe.is_empty() {
            let mut gone: Vec<&str> = unsubscribe.iter().map(String::as_str).collect();
            gone.sort_unstable();
            if gone.binary_search(&"*").is_ok() {
                self.wildcard = false;
            }
            self.names.retain(|n| gone.binary_search(&n.as_str()).is_err());
        }
        if self.names.len() > limit {
            return Err(crate::ProtocolError::TooManyNames { names: self.names.len(), limit });
        }
        Ok(())
    }

    /// This subscription as every stream that subscribes alike holds it (`Interned`).
    pub fn interned(self) -> Arc<Subscription> {
        INTERNED.intern(self)
    }

    /// Names asked for explicitly, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether `name` was asked for by name.
    pub fn names_explicitly(&self, name: &str) -> bool {
        self.names.binary_search_by(|n| n.as_str().cmp(name)).is_ok()
    }

    /// Whether this subscription asks for anything `before` did not.
    pub fn gained_since(&self, before: &Subscription) -> bool {
        (self.wildcard && !before.wildcard) || self.names.iter().any(|n| !before.names_explicitly(n))
    }

    /// Whether `name` is part of this subscription.
    pub fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names_explicitly(name)
    }

    /// The snapshot's resources this subscription selects, in name order.
    pub fn select<'a>(&self, available: Option<&'a ResourceMap>) -> Vec<&'a Arc<ServedResource>> {
        let Some(map) = available else {
            return Vec::new();
        };
        if self.wildcard {
            return map.values().collect();
        }
        map.select(&self.names)
    }
}

/// Equal subscriptions, shared. A fleet's proxies mostly subscribe alike; every push
/// reads each stream's subscription (which of what changed it wants, the version of its
/// selection), and a copy per stream is three allocations apart in memory (the
/// subscription, its list, each name) that a push to 1,000,000 streams reads from memory
/// 1,000,000 times over. Shared, they stay in cache, and a stream holds a pointer.
/// Held weakly: a subscription goes when its last stream lets go of it, and the entries
/// left are swept once they are as many again as the live ones were at the last sweep.
struct Interned {
    /// Buckets by hash (keyed per process: no client can make names collide on purpose),
    /// and when to sweep next.
    table: Mutex<(Buckets, usize)>,
    hasher: std::collections::hash_map::RandomState,
}

type Buckets = HashMap<u64, Vec<Weak<Subscription>>>;

/// Entries at which the first sweep comes.
const FIRST_SWEEP: usize = 1024;

static INTERNED: LazyLock<Interned> = LazyLock::new(Interned::new);

impl Interned {
    fn new() -> Self {
        Interned { table: Mutex::new((HashMap::new(), FIRST_SWEEP)), hasher: Default::default() }
    }

    fn intern(&self, subscription: Subscription) -> Arc<Subscription> {
        let hash = self.hasher.hash_one(&subscription);
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let (buckets, sweep_at) = &mut *table;
        let bucket = buckets.entry(hash).or_default();
        if let Some(same) = bucket.iter().filter_map(Weak::upgrade).find(|s| **s == subscription) {
            return same;
        }
        bucket.retain(|w| w.strong_count() > 0);
        let shared = Arc::new(subscription);
        bucket.push(Arc::downgrade(&shared));
        if buckets.len() >= *sweep_at {
            buckets.retain(|_, bucket| {
                bucket.retain(|w| w.strong_count() > 0);
                !bucket.is_empty()
            });
            *sweep_at = (2 * buckets.len()).max(FIRST_SWEEP);
        }
        shared
    }
}

/// What goes on the wire for `r`: as encoded once, except on resend `attempt` (> 0) of
/// Wasm code Envoy fetches itself, which must differ from the NACKed bytes for Envoy to
/// build it at all (`remote_code_resend` says why).
pub fn wire_resource(r: &ServedResource, attempt: u32) -> filterplane_api::Any {
    if attempt > 0 && r.envoy_fetches_code {
        if let Some(any) = filterplane_config::wasm::remote_code_resend(&r.any, attempt) {
            return any;
        }
    }
    r.any.clone()
}

/// The version of a set of resources: a hash of their names and versions, so it changes
/// exactly when what the proxy subscribed to changes.
pub fn set_version(resources: &[&Arc<ServedResource>]) -> ResourceVersion {
    crate::resource_map::SetHash::of(resources.iter().copied()).version()
}

/// Nonces unique within a stream; that is all the protocol asks of them.
#[derive(Debug, Default)]
pub struct NonceSource(u64);

impl NonceSource {
    pub fn next_nonce(&mut self) -> Text {
        self.0 += 1;
        // At most 20 digits: kept in place.
        Text::from(itoa::Buffer::new().format(self.0))
    }

    /// The number in the last nonce handed out (0 before the first); later nonces are
    /// greater.
    pub fn last(&self) -> u64 {
        self.0
    }

    /// The number in a nonce this source handed out; `None` for anything it would not
    /// have written ("05", "+5" and "0" included).
    pub fn number(nonce: &str) -> Option<u64> {
        let digits = nonce.as_bytes();
        let canonical = !digits.is_empty() && digits[0] != b'0' && digits.iter().all(u8::is_ascii_digit);
        canonical.then(|| nonce.parse().ok()).flatten()
    }
}

/// The resources a response carried, by name and version.
pub type Carried = Arc<[(String, ResourceVersion)]>;

/// Something a stream did or saw that the tracker records.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Subscribed {
        rt: ResourceType,
        wildcard: bool,
        names: Vec<String>,
    },
    /// `resources` is the whole set (state of the world) or what changed (delta, which
    /// also lists what the client must drop in `removed`). Shared: a push that carries
    /// what changed names the same list to every stream it reaches (`TypeChanges`).
    Sent {
        rt: ResourceType,
        version: Text,
        nonce: Text,
        resources: Carried,
        removed: Vec<String>,
        incremental: bool,
        bytes: usize,
    },
    /// `resources`: what the ACKed response carried, for delta (`None`: the whole state
    /// of the world, which a SotW response is).
    Acked {
        rt: ResourceType,
        version: String,
        nonce: String,
        resources: Option<Carried>,
    },
    /// `version` is the rejected version (the one sent with `nonce`); Envoy keeps
    /// `kept_version`, its last accepted one.
    Nacked {
        rt: ResourceType,
        version: String,
        kept_version: String,
        nonce: String,
        code: i32,
        message: String,
        resources: Vec<String>,
    },
    /// Envoy NACKed a response while it fetches a remote Wasm module (or for another
    /// reason it words the same way); it is sent again after a backoff, and the NACK
    /// counts only once `retries` resends have failed too.
    CodeFetchPending {
        rt: ResourceType,
        version: String,
        nonce: String,
        message: String,
        resources: Vec<String>,
        attempt: u32,
        retries: u32,
    },
    UnsupportedType {
        type_url: String,
    },
    /// Nothing sent: the client said it already has `version` (a reconnect).
    Current {
        rt: ResourceType,
        version: String,
        resources: Vec<(String, ResourceVersion)>,
    },
}

/// Which protocol a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    Sotw,
    Delta,
}

impl StreamKind {
    pub fn label(self) -> &'static str {
        match self {
            StreamKind::Sotw => "sotw",
            StreamKind::Delta => "delta",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(names: &[&str]) -> Subscription {
        Subscription { wildcard: false, names: names.iter().map(|n| n.to_string()).collect() }
    }

    /// Nonces are the decimal numbers in sequence, kept in place, and read back by
    /// `number` (how a request's nonce is matched to a response).
    #[test]
    fn nonces_are_numbers_in_sequence_kept_in_place() {
        let mut nonces = NonceSource::default();
        let first: Vec<Text> = (0..12).map(|_| nonces.next_nonce()).collect();
        assert_eq!(
            first.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
            ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12"]
        );
        assert!(first.iter().all(|n| matches!(n, Text::Short { .. })));
        let mut nonces = NonceSource(u64::MAX - 1);
        let last = nonces.next_nonce();
        assert_eq!(last.as_str(), u64::MAX.to_string());
        assert_eq!(NonceSource::number(&last), Some(u64::MAX));
    }

    /// Streams that subscribe alike hold one subscription; one that differs (by a name,
    /// or by the wildcard) its own; and what no stream holds any more is swept, so the
    /// table stays within twice what is live (a churning fleet does not grow it).
    #[test]
    fn alike_subscriptions_are_one_and_dropped_ones_are_swept() {
        let interned = Interned::new();
        let a = interned.intern(named(&["a", "b"]));
        assert!(Arc::ptr_eq(&a, &interned.intern(named(&["a", "b"]))));
        assert!(!Arc::ptr_eq(&a, &interned.intern(named(&["a"]))));
        let wildcard = interned.intern(Subscription { wildcard: true, ..named(&["a", "b"]) });
        assert!(!Arc::ptr_eq(&a, &wildcard));
        for i in 0..20 * FIRST_SWEEP {
            let gone = interned.intern(named(&[&i.to_string()]));
            assert_eq!(gone.names(), [i.to_string()]);
        }
        let entries = |t: &Interned| t.table.lock().map(|t| t.0.values().map(Vec::len).sum::<usize>()).unwrap_or(0);
        assert!(entries(&interned) <= 2 * FIRST_SWEEP, "{} entries", entries(&interned));
        // The live ones are still found.
        assert!(Arc::ptr_eq(&a, &interned.intern(named(&["a", "b"]))));
        assert!(Arc::ptr_eq(&wildcard, &interned.intern(Subscription { wildcard: true, ..named(&["a", "b"]) })));
    }
}
