//! The incremental (delta) protocol as a pure state machine, beside `sotw.rs` and
//! sharing its subscription, version, nonce and event bookkeeping (`stream.rs`).
//! Only what changed is sent; what left the snapshot or stopped matching the proxy is
//! named in `removed_resources`, make-before-break (`hold.rs`): what the proxy's
//! listeners and routes may still use (an extension config whose filter left them, a
//! cluster a route left) is removed only once they no longer do.

use std::{collections::VecDeque, sync::Arc, time::Instant};

use filterplane_api::{
    envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse},
    ResourceType, ResourceVersion,
};

use crate::{
    hold::{Hold, Holds},
    snapshot::{ServedResource, Snapshot},
    stream::{Carried, CodeFetchRetry, Nack, Step, StreamCore, StreamEvent, StreamSettings, Subscription},
    vec_map::VecMap,
    wire::{self, Header, Wire, RESPONSE_BYTES},
    ProtocolError,
};

/// What a step of a delta stream sends: encoded responses.
pub type DeltaStep = Step<Wire<DeltaDiscoveryResponse>>;

/// How many un-ACKed responses per type are remembered; older ones are forgotten (their
/// ACK, if it ever comes, is ignored like any unknown nonce).
const MAX_PENDING: usize = 16;

#[derive(Debug)]
struct Pending {
    nonce: String,
    version: String,
    /// What the response carried: (name, version), as its `Sent` event named it.
    resources: Carried,
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

/// One delta stream (ADS, or a single-type service such as ECDS).
#[derive(Debug)]
pub struct DeltaStream {
    /// What it shares with the other flavour: the node, the snapshot, nonces.
    pub(crate) core: StreamCore,
    types: VecMap<ResourceType, TypeState>,
    /// Removals held back (make-before-break); usually none.
    holds: Holds,
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
        Self { core: StreamCore::new(only, control_plane, settings), types: VecMap::new(), holds: Holds::default() }
    }

    /// A request, with the responses decoded (tests and tools; the server sends
    /// `on_request_wire`'s bytes).
    pub fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        now: Instant,
    ) -> Result<Step<DeltaDiscoveryResponse>, ProtocolError> {
        self.on_request_wire(req, now).map(Step::decoded)
    }

    /// A new snapshot, with the responses decoded (see `on_request`).
    pub fn on_snapshot(&mut self, snapshot: Arc<Snapshot>, now: Instant) -> Step<DeltaDiscoveryResponse> {
        self.on_snapshot_wire(snapshot, now).decoded()
    }

    /// Timers, with the responses decoded (see `on_request`).
    pub fn on_timer(&mut self, now: Instant) -> Step<DeltaDiscoveryResponse> {
        self.on_timer_wire(now).decoded()
    }

    pub fn on_request_wire(&mut self, req: DeltaDiscoveryRequest, now: Instant) -> Result<DeltaStep, ProtocolError> {
        let mut step = Step::default();
        let Some(rt) = self.core.check_request(req.node.as_ref(), &req.type_url, &mut step)? else {
            return Ok(step);
        };

        let first = !self.types.contains_key(&rt);
        let name_limit = self.core.name_limit(rt);
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
                        let names: Vec<String> = answered.resources.iter().map(|(n, _)| n.clone()).collect();
                        // The resources of that response that the snapshot still has.
                        let available = self.core.snapshot.as_ref().and_then(|s| s.resources(rt));
                        let current: Vec<_> = names.iter().filter_map(|n| available?.get(n.as_str())).collect();
                        if err.message.len() > self.core.settings.max_nack_message_bytes {
                            step.limits.push("nack_message_bytes");
                        }
                        let nack = Nack {
                            rt,
                            version: answered.version,
                            kept_version: state.acked_version.clone(),
                            nonce: answered.nonce,
                            code: err.code,
                            message: err.message.clone(),
                            names: names.clone(),
                        };
                        step.events.push(self.core.on_nack(nack, current.into_iter(), names, &mut state.retry, now));
                    }
                    None => {
                        state.retry = None;
                        self.holds.acked(rt, &answered.nonce, self.core.settings.drain_grace, now);
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

        // A plain ACK (the hot path: one per proxy per push) changes no subscription and
        // needs no answer: new snapshots are pushed by `on_snapshot` as they come.
        if first || !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty() {
            let before = state.subscription.clone();
            state.subscription.apply_delta(
                rt,
                first,
                &req.resource_names_subscribe,
                &req.resource_names_unsubscribe,
                name_limit,
            )?;
            // The client drops what it unsubscribed from by itself. For a held extension
            // config that is Envoy saying no listener refers to it any more: the hold is over.
            let subscription = &state.subscription;
            state.client.retain(|name, _| subscription.wants(name));
            self.holds.retain(rt, |name| subscription.wants(name));
            if first || before != state.subscription {
                step.events.push(StreamEvent::Subscribed {
                    rt,
                    wildcard: state.subscription.wildcard,
                    names: state.subscription.names().to_vec(),
                });
            }
            // Names newly asked for explicitly: if they do not exist, say so at once.
            let newly: Vec<String> = req
                .resource_names_subscribe
                .iter()
                .filter(|n| *n != "*" && !before.names_explicitly(n))
                .cloned()
                .collect();
            // A resuming client may be draining listeners Filterplane never saw; what it
            // has and no longer gets is held as if it had been placed.
            let resuming = first && !req.initial_resource_versions.is_empty();
            let hold =
                if resuming && self.types.contains_key(&ResourceType::Listener) { Hold::Resuming } else { Hold::None };
            self.respond(rt, &newly, first, hold, false, &mut step);
        }
        self.end_step(&mut step, now);
        Ok(step)
    }

    /// After a step: holds made wait for the listener and route responses it sent, and
    /// what is due at once (or became due by an ACK) goes out.
    fn end_step(&mut self, step: &mut DeltaStep, now: Instant) {
        // Runs after every request (each ACK): nothing to do unless a removal is held.
        if self.holds.is_empty() {
            return;
        }
        self.holds.end_step(&step.sent(), self.core.settings.drain_grace, now);
        for rt in self.holds.release_due(now) {
            self.respond(rt, &[], false, Hold::None, false, step);
        }
    }

    pub fn on_snapshot_wire(&mut self, snapshot: Arc<Snapshot>, now: Instant) -> DeltaStep {
        let before = self.core.snapshot.replace(snapshot);
        let hold = before.as_deref().map_or(Hold::None, Hold::Replacing);
        let mut step = Step::default();
        for rt in ResourceType::ALL {
            if self.types.contains_key(&rt) {
                self.respond(rt, &[], false, hold, false, &mut step);
            }
        }
        self.end_step(&mut step, now);
        step
    }

    /// When `on_timer` has something to do next, if ever.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let retries = self.types.values().filter_map(|t| t.retry.as_ref()?.at);
        retries.chain(self.holds.next_wakeup()).min()
    }

    /// Sends what is due at `now`: held removals whose grace is over, and resources
    /// Envoy NACKed while fetching a Wasm module.
    pub fn on_timer_wire(&mut self, now: Instant) -> DeltaStep {
        let mut step = Step::default();
        for rt in self.holds.release_due(now) {
            self.respond(rt, &[], false, Hold::None, false, &mut step);
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
        step: &mut DeltaStep,
    ) {
        let (Some(snapshot), Some(state)) = (self.core.snapshot.as_ref(), self.types.get_mut(&rt)) else {
            return;
        };
        let available = snapshot.resources(rt);
        let selected = state.subscription.select(available);
        let changed: Vec<&Arc<ServedResource>> =
            selected.iter().copied().filter(|r| state.client.get(r.name.as_str()) != Some(&Some(r.version))).collect();
        // `selected` is in name order.
        let mut removed: Vec<String> = state
            .client
            .keys()
            .filter(|n| selected.binary_search_by(|r| r.name.as_str().cmp(n.as_str())).is_err())
            .cloned()
            .collect();
        // Make-before-break: what the proxy's listeners and routes may still use is not
        // removed yet (`hold.rs`). A held name served again is no longer held.
        let holds = &mut self.holds;
        holds.retain(rt, |name| selected.binary_search_by(|r| r.name.as_str().cmp(name)).is_err());
        removed.retain(|n| !holds.hold(rt, n, hold, None));
        let missing = newly.iter().filter(|n| !available.is_some_and(|m| m.contains_key(n.as_str())));
        let missing: Vec<String> = missing.filter(|n| !self.holds.is_held(rt, n)).cloned().collect();
        if !missing.is_empty() {
            // Sorted and without repeats in one go (a `contains` per name is quadratic).
            removed.extend(missing);
            removed.sort_unstable();
            removed.dedup();
        }
        let version = |subscription| snapshot.selection_version(rt, subscription, &selected).to_string();
        if changed.is_empty() && removed.is_empty() && !state.must_answer {
            if first {
                // A resuming client that already has everything: nothing to send.
                let version = version(&state.subscription);
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
        let version = version(&state.subscription);
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
        let header = Header {
            version: &version,
            type_url: rt.type_url(),
            nonce: &nonce,
            control_plane: self.core.control_plane,
        };
        let Some(response) = wire::delta_response(header, &changed, &removed, attempt) else {
            // Over gRPC's 4 GiB (many large inline Wasm modules for one proxy): the
            // stream ends (`after` in service.rs), as it would for any client.
            tracing::error!(type_url = %rt, "response over gRPC's 4 GiB not sent");
            step.limits.push(RESPONSE_BYTES);
            return;
        };
        for r in &changed {
            state.client.insert(r.name.clone(), Some(r.version));
        }
        for n in &removed {
            state.client.remove(n.as_str());
        }
        let carried: Carried = changed.iter().map(|r| (r.name.clone(), r.version)).collect();
        step.events.push(StreamEvent::Sent {
            rt,
            version: version.as_str().into(),
            nonce: nonce.clone(),
            resources: carried.clone(),
            removed,
            incremental: true,
            bytes: response.message_len(),
        });
        step.responses.push(response);
        if state.pending.len() == MAX_PENDING {
            state.pending.pop_front();
        }
        state.pending.push_back(Pending { nonce: nonce.to_string(), version, resources: carried });
    }
}

#[cfg(test)]
#[path = "delta_tests.rs"]
mod tests;
