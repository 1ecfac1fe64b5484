//! The incremental (delta) protocol as a pure state machine, beside `sotw.rs` and
//! sharing its subscription, version, nonce and event bookkeeping (`stream.rs`).
//! Only what changed is sent; what left the snapshot or stopped matching the proxy is
//! named in `removed_resources`, make-before-break: an extension config whose filter
//! left the proxy's listeners is removed only once no listener the proxy may still be
//! draining refers to it.

use std::{collections::VecDeque, sync::Arc, time::Instant};

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
        stream::{
            set_version, wire_resource, CodeFetchRetry, Nack, NonceSource, Step, StreamCore, StreamEvent,
            StreamSettings, Subscription,
        },
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
    /// A response NACKed while Envoy fetches a Wasm module: its resources go again.
    retry: Option<Box<CodeFetchRetry>>,
}

/// An extension config the proxy is to drop, held back because a listener the proxy may
/// still be draining refers to it. Envoy's draining listener keeps using the filter's
/// config; removing it (a delta `removed_resources`) at the same time as the listener
/// update makes those connections answer 500 until they close.
#[derive(Debug)]
struct HeldRemoval {
    name: String,
    /// The last nonce sent when the removal was held: an ACKed listener response with a
    /// later nonce means the proxy runs listeners without the filter.
    after_nonce: u64,
    /// When the removal goes out: the drain grace after that ACK (or after the hold, on a
    /// stream that sends no listener update). Before then only Envoy's own unsubscribe
    /// (once no listener refers to the name) ends the hold.
    release_at: Option<Instant>,
}

/// Which removals of extension configs to hold back.
#[derive(Debug, Clone, Copy)]
enum Hold<'a> {
    /// None: the name was not in a listener the proxy may drain.
    None,
    /// Those placed into the listeners of the snapshot the proxy had before.
    PlacedIn(&'a Snapshot),
    /// Every one: a resuming client, whose listeners Filterplane cannot know.
    All,
}

/// One delta stream (ADS, or a single-type service such as ECDS).
#[derive(Debug)]
pub struct DeltaStream {
    /// What it shares with the other flavour: the node, the snapshot, nonces.
    pub(crate) core: StreamCore,
    types: VecMap<ResourceType, TypeState>,
    /// Extension config removals held back (make-before-break); usually empty.
    held: Vec<HeldRemoval>,
}

impl DeltaStream {
    pub fn new(only: Option<ResourceType>, control_plane: &'static str) -> Self {
        Self::with_settings(only, control_plane, Arc::default())
    }

    pub fn with_settings(
        only: Option<ResourceType>,
        control_plane: &'static str,
        settings: Arc<StreamSettings>,
    ) -> Self {
        Self { core: StreamCore::new(only, control_plane, settings), types: VecMap::new(), held: Vec::new() }
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
                    Some(err) => {
                        let names: Vec<String> = answered.resources.into_iter().map(|(n, _)| n).collect();
                        // The resources of that response that the snapshot still has.
                        let available = self.core.snapshot.as_ref().and_then(|s| s.resources(rt));
                        let current: Vec<_> = names.iter().filter_map(|n| available?.get(n.as_str())).collect();
                        let nack = Nack {
                            rt,
                            version: answered.version,
                            kept_version: state.acked_version.clone(),
                            nonce: answered.nonce,
                            code: err.code,
                            message: err.message.clone(),
                            names: names.clone(),
                        };
                        step.events.push(self.core.on_nack(nack, current.into_iter(), names, &mut state.retry));
                    }
                    None => {
                        state.retry = None;
                        if rt == ResourceType::Listener {
                            // Listeners without the held filters are in place: their drain
                            // has begun, and the grace runs from now.
                            let acked = NonceSource::number(&answered.nonce).unwrap_or(0);
                            let release = Instant::now() + self.core.settings.drain_grace;
                            for h in self.held.iter_mut().filter(|h| h.release_at.is_none() && acked > h.after_nonce) {
                                h.release_at = Some(release);
                            }
                        }
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
        // The client drops what it unsubscribed from by itself. For a held extension
        // config that is Envoy saying no listener refers to it any more: the hold is over.
        let subscription = &state.subscription;
        state.client.retain(|name, _| subscription.wants(name));
        if rt == ResourceType::ExtensionConfig {
            self.held.retain(|h| subscription.wants(&h.name));
        }
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
        // A resuming client may be draining listeners Filterplane never saw; what it has
        // and no longer gets is held as if it had been placed.
        let resuming = first && !req.initial_resource_versions.is_empty();
        let hold = if resuming && self.types.contains_key(&ResourceType::Listener) { Hold::All } else { Hold::None };
        self.respond(rt, &newly, first, hold, false, &mut step);
        Ok(step)
    }

    pub fn on_snapshot(&mut self, snapshot: Arc<Snapshot>) -> Step<DeltaDiscoveryResponse> {
        let before = self.core.snapshot.replace(snapshot);
        let hold = before.as_deref().map_or(Hold::None, Hold::PlacedIn);
        let last_nonce = self.core.nonces.last();
        let mut step = Step::default();
        for rt in ResourceType::ALL {
            if self.types.contains_key(&rt) {
                self.respond(rt, &[], false, hold, false, &mut step);
            }
        }
        // Holds begun now on a stream that sent no listener update after them (it serves
        // no listeners, or they did not change): no ACK will start their grace, so it
        // starts now.
        let last_lds = self
            .types
            .get(&ResourceType::Listener)
            .and_then(|t| t.pending.back())
            .and_then(|p| NonceSource::number(&p.nonce));
        let grace = self.core.settings.drain_grace;
        for h in self.held.iter_mut().filter(|h| h.release_at.is_none() && h.after_nonce >= last_nonce) {
            if last_lds.is_none_or(|n| n <= h.after_nonce) {
                h.release_at = Some(Instant::now() + grace);
            }
        }
        step
    }

    /// When `on_timer` has something to do next, if ever.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let retries = self.types.values().filter_map(|t| t.retry.as_ref()?.at);
        retries.chain(self.held.iter().filter_map(|h| h.release_at)).min()
    }

    /// Sends what is due at `now`: held removals whose grace is over, and resources
    /// Envoy NACKed while fetching a Wasm module.
    pub fn on_timer(&mut self, now: Instant) -> Step<DeltaDiscoveryResponse> {
        let mut step = Step::default();
        let held = self.held.len();
        self.held.retain(|h| h.release_at.is_none_or(|at| at > now));
        if self.held.len() != held {
            self.respond(ResourceType::ExtensionConfig, &[], false, Hold::None, false, &mut step);
        }
        for rt in ResourceType::ALL {
            let (Some(snapshot), Some(state)) = (self.core.snapshot.as_ref(), self.types.get_mut(&rt)) else {
                continue;
            };
            let Some(retry) = state.retry.as_mut().filter(|r| r.at.is_some_and(|at| at <= now)) else { continue };
            retry.at = None;
            // Forget that the client has them, so they are sent again as they are now.
            let available = snapshot.resources(rt);
            for name in &retry.names {
                if available.is_some_and(|m| m.contains_key(name.as_str())) {
                    if let Some(v) = state.client.get_mut(name.as_str()) {
                        *v = None;
                    }
                }
            }
            self.respond(rt, &[], false, Hold::None, true, &mut step);
        }
        step
    }

    fn respond(
        &mut self,
        rt: ResourceType,
        newly: &[String],
        first: bool,
        hold: Hold<'_>,
        resend: bool,
        step: &mut Step<DeltaDiscoveryResponse>,
    ) {
        let serves_listeners = self.types.contains_key(&ResourceType::Listener);
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
        if rt == ResourceType::ExtensionConfig {
            // Make-before-break: keep serving (by not removing) what a listener the proxy
            // may still drain refers to. Re-added names are no longer held.
            self.held.retain(|h| selected.binary_search_by(|r| r.name.as_str().cmp(&h.name)).is_err());
            let after_nonce = self.core.nonces.last();
            // The grace starts at the ACK of the listener update that follows, if this
            // stream sends one; a resuming client's listener answer may be out already.
            let grace_now = !serves_listeners || matches!(hold, Hold::All);
            let release_at = grace_now.then(|| Instant::now() + self.core.settings.drain_grace);
            let held = &mut self.held;
            removed.retain(|n| {
                if held.iter().any(|h| h.name == *n) {
                    return false;
                }
                let hold_it = match hold {
                    Hold::None => false,
                    Hold::PlacedIn(before) => before.places(n),
                    Hold::All => true,
                };
                if hold_it {
                    tracing::debug!(name = %n, "extension config removal held until no listener refers to it");
                    held.push(HeldRemoval { name: n.clone(), after_nonce, release_at });
                }
                !hold_it
            });
        }
        for n in newly {
            let exists = available.is_some_and(|m| m.contains_key(n));
            let held = self.held.iter().any(|h| h.name == *n);
            if !exists && !held && !removed.contains(n) {
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
        // A resend after a code-fetch NACK carries what Envoy will build; anything else
        // that goes out for those names is newer and replaces the resend.
        let attempt = match &state.retry {
            Some(r) if resend => r.attempt,
            Some(r) if changed.iter().any(|c| r.names.contains(&c.name)) => {
                state.retry = None;
                0
            }
            _ => 0,
        };
        let nonce = self.core.nonces.next_nonce();
        let response = DeltaDiscoveryResponse {
            system_version_info: version.clone(),
            resources: changed
                .iter()
                .map(|r| Resource {
                    name: r.name.clone(),
                    version: r.version.to_string(),
                    resource: Some(wire_resource(r, attempt)),
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
