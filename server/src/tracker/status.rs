//! What the tracker keeps of each proxy (its status per type and resource, NACKs, code
//! fetch retries), of rejects and refusals, and how the API serializes it.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Instant, SystemTime},
};

use filterplane_api::{ResourceType, ResourceVersion};
use filterplane_config::NodeFacts;
pub use filterplane_xds::text::Text;
use filterplane_xds::vec_map::VecMap;
use serde::Serialize;

use super::{StreamId, StreamKind};
use filterplane_xds::stream::NodeInfo;

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
pub(super) const REFUSAL_FIELD_CHARS: usize = 256;

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
    pub sent_version: Option<Text>,
    pub sent_nonce: Option<Text>,
    #[serde(serialize_with = "rfc3339")]
    pub sent_at: Option<Stamp>,
    pub acked_version: Option<Text>,
    #[serde(serialize_with = "rfc3339")]
    pub acked_at: Option<Stamp>,
    pub last_nack: Option<Box<Nack>>,
    /// Set while Envoy fetches a Wasm module the last response needs: it NACKed it for
    /// now, and it is sent again.
    pub code_fetch: Option<Box<CodeFetch>>,
    /// By resource name: kept in place when short (most names are), so recording a push
    /// compares names without reading another allocation per resource and stream.
    pub resources: VecMap<Text, ResourceStatus>,
    #[serde(skip)]
    pub(super) sent_instant: Option<Instant>,
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
    /// The version of each resource it refused (the one the page and API name
    /// everywhere; `version` is the response's, as Envoy's config dump shows it).
    pub resource_versions: std::collections::BTreeMap<String, String>,
    pub version: String,
    pub kept_version: String,
    pub nonce: String,
    pub code: i32,
    pub message: String,
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

impl Timestamp for Option<Stamp> {
    fn time(&self) -> Option<SystemTime> {
        self.map(Stamp::wall)
    }
}

impl Timestamp for SystemTime {
    fn time(&self) -> Option<SystemTime> {
        Some(*self)
    }
}

/// When a push or an answer happened, on the monotonic clock the stream's step read
/// already (the per-push path reads no wall clock); turned into wall time when shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(pub Instant);

impl Stamp {
    /// As wall time: now, less how long ago it was (the clocks as they relate now).
    pub fn wall(self) -> SystemTime {
        let ago = Instant::now().saturating_duration_since(self.0);
        let now = SystemTime::now();
        now.checked_sub(ago).unwrap_or(now)
    }
}

/// RFC 3339, UTC, millisecond precision.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
