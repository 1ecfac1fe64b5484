//! The incremental (delta) protocol as a pure state machine, beside `sotw.rs` and
//! sharing its subscription, version, nonce and event bookkeeping (`stream.rs`).
//! Only what changed is sent; what left the snapshot or stopped matching the proxy is
//! named in `removed_resources`.

use std::{collections::VecDeque, sync::Arc};

use filterplane_api::{
    envoy_types::pb::envoy::{
        config::core::v3::ControlPlane,
        service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource},
    },
    ResourceType, ResourceVersion,
};
use prost::Message;

use crate::{
    cache::Snapshot,
    vec_map::VecMap,
    xds::{
        stream::{set_version, Step, StreamCore, StreamEvent, Subscription},
        ProtocolError,
    },
};

/// How many un-ACKed responses per type are remembered; older ones are forgotten (their
/// ACK, if it ever comes, is ignored like any unknown nonce).
const MAX_PENDING: usize = 16;

#[derive(Debug)]
struct Pending {
    nonce: String,
    version: String,
    /// What the response carried: (name, version).
    resources: Vec<(String, ResourceVersion)>,
}

#[derive(Debug, Default)]
struct TypeState {
    subscription: Subscription,
    /// What the client has, as far as the server knows: resource name to version.
    /// Updated when a response is sent, so a NACKed version is not sent again.
    /// `None`: a version Filterplane did not send (it differs from any it would).
    client: VecMap<String, Option<ResourceVersion>>,
    pending: VecDeque<Pending>,
    acked_version: String,
    /// The first request of a client that had nothing gets an answer even when it is
    /// empty: Envoy's initial fetch (and with it listener warming) waits for one.
    must_answer: bool,
}

/// One delta stream (ADS, or a single-type service such as ECDS).
#[derive(Debug)]
pub struct DeltaStream {
    /// What it shares with the other flavour: the node, the snapshot, nonces.
    pub(crate) core: StreamCore,
    types: VecMap<ResourceType, TypeState>,
}

impl DeltaStream {
    pub fn new(only: Option<ResourceType>, control_plane: &'static str) -> Self {
        Self { core: StreamCore::new(only, control_plane), types: VecMap::new() }
    }

    pub fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<Step<DeltaDiscoveryResponse>, ProtocolError> {
        let mut step = Step::default();
        let Some(rt) = self.core.check_request(req.node.as_ref(), &req.type_url, &mut step)? else {
            return Ok(step);
        };

        let first = !self.types.contains_key(&rt);
        let state = self.types.get_or_insert_with(rt, TypeState::default);
        if first {
            // xDS protocol, "Delta xDS": a client resuming a stream names the versions it
            // already has, so they are not sent again.
            state.client =
                req.initial_resource_versions.iter().map(|(n, v)| (n.clone(), ResourceVersion::parse(v))).collect();
            state.must_answer = req.initial_resource_versions.is_empty();
        }

        // ACK or NACK of one of our responses. Delta requests also carry subscription
        // changes, so an unknown or superseded nonce only skips this part.
        if !req.response_nonce.is_empty() {
            if let Some(i) = state.pending.iter().position(|p| p.nonce == req.response_nonce) {
                let answered = state.pending.drain(..=i).next_back().expect("position found an entry");
                if state.pending.is_empty() {
                    // Nothing in flight: give the queue's buffer back (idle streams hold none).
                    state.pending = VecDeque::new();
                }
                match &req.error_detail {
                    Some(err) => step.events.push(StreamEvent::Nacked {
                        rt,
                        version: answered.version,
                        kept_version: state.acked_version.clone(),
                        nonce: answered.nonce,
                        code: err.code,
                        message: err.message.clone(),
                        resources: answered.resources.into_iter().map(|(n, _)| n).collect(),
                    }),
                    None => {
                        state.acked_version = answered.version.clone();
                        step.events.push(StreamEvent::Acked {
                            rt,
                            version: answered.version,
                            nonce: answered.nonce,
                            resources: Some(answered.resources),
                        });
                    }
                }
            } else {
                tracing::debug!(type_url = %rt, nonce = %req.response_nonce, "unknown or superseded nonce");
            }
        }

        let before = state.subscription.clone();
        state.subscription.apply_delta(rt, first, &req.resource_names_subscribe, &req.resource_names_unsubscribe);
        // The client drops what it unsubscribed from by itself.
        let subscription = &state.subscription;
        state.client.retain(|name, _| subscription.wants(name));
        if first || before != state.subscription {
            step.events.push(StreamEvent::Subscribed {
                rt,
                wildcard: state.subscription.wildcard,
                names: state.subscription.names().to_vec(),
            });
        }
        // Names newly asked for explicitly: if they do not exist, say so at once.
        let newly: Vec<String> =
            req.resource_names_subscribe.iter().filter(|n| *n != "*" && !before.names_explicitly(n)).cloned().collect();
        self.respond(rt, &newly, first, &mut step);
        Ok(step)
    }

    pub fn on_snapshot(&mut self, snapshot: Arc<Snapshot>) -> Step<DeltaDiscoveryResponse> {
        self.core.snapshot = Some(snapshot);
        let mut step = Step::default();
        for rt in ResourceType::ALL {
            if self.types.contains_key(&rt) {
                self.respond(rt, &[], false, &mut step);
            }
        }
        step
    }

    fn respond(&mut self, rt: ResourceType, newly: &[String], first: bool, step: &mut Step<DeltaDiscoveryResponse>) {
        let (Some(snapshot), Some(state)) = (self.core.snapshot.as_ref(), self.types.get_mut(&rt)) else {
            return;
        };
        let available = snapshot.resources(rt);
        let selected = state.subscription.select(available);
        let changed: Vec<_> =
            selected.iter().filter(|r| state.client.get(r.name.as_str()) != Some(&Some(r.version))).collect();
        // `selected` is in name order.
        let mut removed: Vec<String> = state
            .client
            .keys()
            .filter(|n| selected.binary_search_by(|r| r.name.as_str().cmp(n.as_str())).is_err())
            .cloned()
            .collect();
        for n in newly {
            let exists = available.is_some_and(|m| m.contains_key(n));
            if !exists && !removed.contains(n) {
                removed.push(n.clone());
            }
        }
        let version = set_version(&selected).to_string();
        if changed.is_empty() && removed.is_empty() && !state.must_answer {
            if first {
                // A resuming client that already has everything: nothing to send.
                step.events.push(StreamEvent::Current {
                    rt,
                    version: version.clone(),
                    resources: selected.iter().map(|r| (r.name.clone(), r.version)).collect(),
                });
                state.acked_version = version;
            }
            return;
        }
        state.must_answer = false;
        let nonce = self.core.nonces.next_nonce();
        let response = DeltaDiscoveryResponse {
            system_version_info: version.clone(),
            resources: changed
                .iter()
                .map(|r| Resource {
                    name: r.name.clone(),
                    version: r.version.to_string(),
                    resource: Some(r.any.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: rt.type_url().to_owned(),
            removed_resources: removed.clone(),
            nonce: nonce.clone(),
            control_plane: Some(ControlPlane { identifier: self.core.control_plane.to_owned() }),
            ..Default::default()
        };
        for r in &changed {
            state.client.insert(r.name.clone(), Some(r.version));
        }
        for n in &removed {
            state.client.remove(n.as_str());
        }
        let carried: Vec<(String, ResourceVersion)> = changed.iter().map(|r| (r.name.clone(), r.version)).collect();
        step.events.push(StreamEvent::Sent {
            rt,
            version: version.clone(),
            nonce: nonce.clone(),
            resources: changed.iter().map(|r| (r.name.clone(), r.version)).collect(),
            removed,
            incremental: true,
            bytes: response.encoded_len(),
        });
        step.responses.push(response);
        if state.pending.len() == MAX_PENDING {
            state.pending.pop_front();
        }
        state.pending.push_back(Pending { nonce, version, resources: carried });
    }
}

#[cfg(test)]
#[path = "delta_tests.rs"]
mod tests;
