//! ACK/NACK state per connected proxy and type, plus a bounded history of rejects that
//! outlives the proxies' streams. Fed by stream events; read by the admin API.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::SystemTime,
};

use dashmap::DashMap;
use serde::Serialize;

use crate::xds::stream::{NodeInfo, StreamEvent};

pub type StreamId = u64;

/// How many rejects are kept after their proxies are gone.
pub const REJECT_HISTORY: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    Sotw,
    Delta,
}

/// One proxy stream as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyStatus {
    pub stream_id: StreamId,
    pub node_id: String,
    pub cluster: String,
    pub metadata: BTreeMap<String, String>,
    pub locality: Locality,
    pub user_agent: String,
    pub stream_kind: StreamKind,
    pub peer: String,
    pub connected_since: String,
    /// By type URL.
    pub types: BTreeMap<String, TypeStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

/// Per type URL: what was asked, sent, accepted and refused.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    pub wildcard: bool,
    pub subscribed: Vec<String>,
    pub sent_version: Option<String>,
    pub sent_nonce: Option<String>,
    pub sent_at: Option<String>,
    /// Resource name to version, as last sent.
    pub resources: BTreeMap<String, String>,
    pub acked_version: Option<String>,
    pub last_nack: Option<Nack>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Nack {
    pub version: String,
    pub nonce: String,
    pub code: i32,
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
    proxies: DashMap<StreamId, ProxyStatus>,
    rejects: Mutex<VecDeque<Reject>>,
    reject_limit: usize,
}

impl Default for AckTracker {
    fn default() -> Self {
        Self::with_reject_limit(REJECT_HISTORY)
    }
}

impl AckTracker {
    pub fn with_reject_limit(reject_limit: usize) -> Self {
        Self {
            next_id: AtomicU64::new(1),
            proxies: DashMap::new(),
            rejects: Mutex::new(VecDeque::new()),
            reject_limit,
        }
    }

    /// A stream identified its node (first request).
    pub fn connect(&self, node: &NodeInfo, kind: StreamKind, peer: String) -> StreamId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let f = &node.facts;
        self.proxies.insert(
            id,
            ProxyStatus {
                stream_id: id,
                node_id: f.id.clone(),
                cluster: f.cluster.clone(),
                metadata: f.metadata.clone(),
                locality: Locality {
                    region: f.region.clone(),
                    zone: f.zone.clone(),
                    sub_zone: f.sub_zone.clone(),
                },
                user_agent: node.user_agent.clone(),
                stream_kind: kind,
                peer,
                connected_since: now(),
                types: BTreeMap::new(),
            },
        );
        id
    }

    pub fn disconnect(&self, id: StreamId) {
        self.proxies.remove(&id);
    }

    pub fn record(&self, id: StreamId, event: &StreamEvent) {
        let Some(mut proxy) = self.proxies.get_mut(&id) else {
            return;
        };
        match event {
            StreamEvent::Subscribed {
                rt,
                wildcard,
                names,
            } => {
                let t = proxy.types.entry(rt.type_url().to_owned()).or_default();
                t.wildcard = *wildcard;
                t.subscribed = names.clone();
            }
            StreamEvent::Sent {
                rt,
                version,
                nonce,
                resources,
                ..
            } => {
                let t = proxy.types.entry(rt.type_url().to_owned()).or_default();
                t.sent_version = Some(version.clone());
                t.sent_nonce = Some(nonce.clone());
                t.sent_at = Some(now());
                t.resources = resources
                    .iter()
                    .map(|(n, v)| (n.clone(), v.to_string()))
                    .collect();
            }
            StreamEvent::Acked { rt, version, .. } => {
                let t = proxy.types.entry(rt.type_url().to_owned()).or_default();
                t.acked_version = Some(version.clone());
                // Accepting a newer version ends the NACK state.
                t.last_nack = None;
            }
            StreamEvent::Nacked {
                rt,
                version,
                kept_version,
                nonce,
                code,
                message,
                resources,
            } => {
                let at = now();
                let t = proxy.types.entry(rt.type_url().to_owned()).or_default();
                t.acked_version = Some(kept_version.clone())
                    .filter(|v| !v.is_empty())
                    .or(t.acked_version.take());
                t.last_nack = Some(Nack {
                    version: version.clone(),
                    nonce: nonce.clone(),
                    code: *code,
                    message: message.clone(),
                    at: at.clone(),
                });
                let reject = Reject {
                    at,
                    node_id: proxy.node_id.clone(),
                    cluster: proxy.cluster.clone(),
                    type_url: rt.type_url().to_owned(),
                    resources: resources.clone(),
                    version: version.clone(),
                    kept_version: kept_version.clone(),
                    nonce: nonce.clone(),
                    code: *code,
                    message: message.clone(),
                };
                drop(proxy);
                let mut rejects = self.rejects.lock().unwrap_or_else(|p| p.into_inner());
                if rejects.len() == self.reject_limit {
                    rejects.pop_front();
                }
                rejects.push_back(reject);
            }
            StreamEvent::UnsupportedType { .. } => {}
        }
    }

    /// Connected proxies, by node id then stream.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        let mut v: Vec<ProxyStatus> = self.proxies.iter().map(|p| p.value().clone()).collect();
        v.sort_by(|a, b| (&a.node_id, a.stream_id).cmp(&(&b.node_id, b.stream_id)));
        v
    }

    /// Recent rejects, newest first.
    pub fn rejects(&self) -> Vec<Reject> {
        let rejects = self.rejects.lock().unwrap_or_else(|p| p.into_inner());
        rejects.iter().rev().cloned().collect()
    }
}

/// RFC 3339, UTC, millisecond precision.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use filterplane_api::ResourceType;

    const ECDS: ResourceType = ResourceType::ExtensionConfig;

    fn nack(version: &str) -> StreamEvent {
        StreamEvent::Nacked {
            rt: ECDS,
            version: version.into(),
            kept_version: "v1".into(),
            nonce: "2".into(),
            code: 13,
            message: "bad".into(),
            resources: vec!["a".into()],
        }
    }

    #[test]
    fn nack_keeps_last_acked_version_and_ack_of_a_fix_clears_it() {
        let t = AckTracker::default();
        let id = t.connect(&NodeInfo::default(), StreamKind::Sotw, "127.0.0.1:1".into());
        t.record(
            id,
            &StreamEvent::Acked {
                rt: ECDS,
                version: "v1".into(),
                nonce: "1".into(),
            },
        );
        t.record(id, &nack("v2"));
        let p = &t.proxies()[0];
        let ty = &p.types[ECDS.type_url()];
        assert_eq!(ty.acked_version.as_deref(), Some("v1"));
        assert_eq!(
            ty.last_nack.as_ref().map(|n| n.version.as_str()),
            Some("v2")
        );
        t.record(
            id,
            &StreamEvent::Acked {
                rt: ECDS,
                version: "v3".into(),
                nonce: "3".into(),
            },
        );
        assert!(t.proxies()[0].types[ECDS.type_url()].last_nack.is_none());
        assert_eq!(
            t.rejects().len(),
            1,
            "history keeps the reject after the fix"
        );
    }

    #[test]
    fn rejects_outlive_the_stream_and_history_is_bounded() {
        let t = AckTracker::with_reject_limit(3);
        let id = t.connect(&NodeInfo::default(), StreamKind::Sotw, String::new());
        for i in 0..5 {
            t.record(id, &nack(&format!("v{i}")));
        }
        t.disconnect(id);
        assert!(t.proxies().is_empty());
        let versions: Vec<String> = t.rejects().into_iter().map(|r| r.version).collect();
        assert_eq!(versions, ["v4", "v3", "v2"]);
    }
}
