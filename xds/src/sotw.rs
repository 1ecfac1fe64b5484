//! The state-of-the-world protocol as a pure state machine: requests and new snapshots
//! in, responses and tracker events out, no I/O. The tonic service is a loop around it.

use std::{sync::Arc, time::Instant};

use filterplane_api::{
    envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse},
    ResourceType, ResourceVersion,
};

use crate::ProtocolError;
use crate::{
    hold::{Hold, Holds},
    stream::{
        set_version, CodeFetchRetry, Nack, NonceSource, Step, StreamCore, StreamEvent, StreamSettings, Subscription,
    },
    wire::{self, Header, Wire, RESPONSE_BYTES},
};
use crate::{
    snapshot::{ServedResource, Snapshot},
    stated_names::StatedNames,
    vec_map::VecMap,
};

/// What a step of a state-of-the-world stream sends: encoded responses.
pub type SotwStep = Step<Wire<DiscoveryResponse>>;

#[derive(Debug, Clone)]
struct Sent {
    version: ResourceVersion,
    /// As a number (`NonceSource`), compared with each request's without reading a
    /// string elsewhere in memory; 0 when nothing was sent because the client said it
    /// already had `version`.
    nonce: u64,
    subscription: Arc<Subscription>,
    /// Envoy ACKed or NACKed it. A later request may carry the same nonce again (Envoy
    /// does, with a subscription change); it is no second answer, and a client that
    /// repeats a NACK does not get it recorded again.
    answered: bool,
    /// The snapshot it was cut from: once ACKed, what the client holds (`Baseline`).
    snapshot: Arc<Snapshot>,
    /// What it carried when it carried only what changed (`None`: the whole selection);
    /// shared with the push's other streams when it is all that changed.
    carried: Option<Arc<[Arc<ServedResource>]>>,
}

/// What the client holds of a type whose responses may carry only what changed
/// (`ResourceType::sotw_requires_full_state`): the selection of the last response it
/// ACKed. Each response carries what differs from it, so a newer response holds all an
/// older unsent one did and may replace it in the output queue (`service.rs`). Kept as
/// the snapshot it was cut from (shared by every stream of the group), not a list per
/// stream; moved to the current snapshot whenever the selection is the same.
#[derive(Debug)]
struct Baseline {
    snapshot: Arc<Snapshot>,
    subscription: Arc<Subscription>,
    version: ResourceVersion,
}

#[derive(Debug)]
struct TypeState {
    /// Shared with what was last sent under it (most pushes change no subscription).
    subscription: Arc<Subscription>,
    /// Version the client says it has (its last request before anything was sent).
    client_version: String,
    /// The hash (`SotwStream::stated`) of the list of names the last request stated, in
    /// its order (`subscription` is what it comes to).
    stated: u64,
    last_sent: Option<Sent>,
    baseline: Option<Baseline>,
    /// The last response was NACKed while Envoy fetches a Wasm module: send it again.
    retry: Option<Box<CodeFetchRetry>>,
}

/// A state-of-the-world request as the machine reads it: the request, and the names it
/// states taken out of it (read off the wire by the server, `StatedNames::read`).
#[derive(Debug, Default)]
pub struct SotwRequest {
    pub req: DiscoveryRequest,
    pub names: StatedNames,
}

impl From<DiscoveryRequest> for SotwRequest {
    fn from(mut req: DiscoveryRequest) -> Self {
        let names = StatedNames::Decoded(std::mem::take(&mut req.resource_names));
        Self { req, names }
    }
}

/// One SotW stream (ADS, or a single-type service such as ECDS).
#[derive(Debug)]
pub struct SotwStream {
    /// What it shares with the other flavour: the node, the snapshot, nonces.
    pub(crate) core: StreamCore,
    types: VecMap<ResourceType, TypeState>,
    /// Removals held back (make-before-break): their resources are still sent.
    holds: Holds,
    /// Hashes the names a request states (keyed per stream: no client can make two
    /// lists collide on purpose).
    stated: std::collections::hash_map::RandomState,
}

impl SotwStream {
    pub fn new(only: Option<ResourceType>, control_plane: &'static str) -> Self {
        Self::with_settings(only, control_plane, Arc::default())
    }

    pub fn with_settings(
        only: Option<ResourceType>,
        control_plane: &'static str,
        settings: Arc<StreamSettings>,
    ) -> Self {
        Self {
            core: StreamCore::new(only, control_plane, settings),
            types: VecMap::new(),
            holds: Holds::default(),
            stated: Default::default(),
        }
    }

    /// A request, with the responses decoded (tests and tools; the server sends
    /// `on_request_wire`'s bytes).
    pub fn on_request(
        &mut self,
        req: DiscoveryRequest,
        now: Instant,
    ) -> Result<Step<DiscoveryResponse>, ProtocolError> {
        self.on_request_wire(req, now).map(Step::decoded)
    }

    /// A new snapshot, with the responses decoded (see `on_request`).
    pub fn on_snapshot(&mut self, snapshot: Arc<Snapshot>, now: Instant) -> Step<DiscoveryResponse> {
        self.on_snapshot_wire(snapshot, now).decoded()
    }

    /// Timers, with the responses decoded (see `on_request`).
    pub fn on_timer(&mut self, now: Instant) -> Step<DiscoveryResponse> {
        self.on_timer_wire(now).decoded()
    }

    pub fn on_request_wire(&mut self, req: impl Into<SotwRequest>, now: Instant) -> Result<SotwStep, ProtocolError> {
        let SotwRequest { mut req, names } = req.into();
        let mut step = Step::default();
        let answers_us = !req.response_nonce.is_empty();
        let Some(rt) = self.core.check_request(req.node.as_ref(), &req.type_url, &mut step)? else {
            return Ok(step);
        };

        let state = self.types.get(&rt);
        let sent_nonce = state.and_then(|s| s.last_sent.as_ref()).map(|s| s.nonce).filter(|n| *n > 0);
        if answers_us && (sent_nonce.is_none() || sent_nonce != NonceSource::number(&req.response_nonce)) {
            // xDS protocol, "Resource updates": a request whose nonce is not the latest
            // response's is stale and is ignored (its ACK/NACK is for superseded data).
            tracing::debug!(type_url = %rt, nonce = %req.response_nonce, "stale nonce ignored");
            return Ok(step);
        }

        let previous = state.map(|s| &s.subscription);
        // An ACK states the same names again (the hot path: one per proxy per push). The
        // list is hashed (keyed per stream: no client can make two lists collide on
        // purpose) and compared with the hash of the last list stated, which is kept in
        // the type's state: the subscription itself, its names and their strings stay
        // where they are in memory. A mesh-sized Envoy names 50,000 assignments in every
        // ACK, in no particular order (a hash set's); they are not parsed into a
        // subscription again unless they changed.
        // (Read off the wire without a string per name: `StatedNames`.)
        let stated = names.hash(&self.stated);
        // The subscription the list comes to; `None`: the list is the one last stated.
        let worked_out = match state.filter(|s| s.stated == stated) {
            Some(_) => None,
            None => {
                let names = names.into_vec();
                match previous.filter(|p| p.states_same(rt, &names)) {
                    Some(same) => Some(same.clone()),
                    None => {
                        let new =
                            Subscription::from_sotw(rt, &names, previous.map(|p| &**p), self.core.name_limit(rt))?;
                        // The same set named anew keeps the one shared with what was sent.
                        Some(match previous.filter(|p| ***p == new) {
                            Some(same) => same.clone(),
                            None => new.interned(),
                        })
                    }
                }
            }
        };
        let resubscribed = worked_out.as_ref().is_some_and(|c| previous != Some(c));
        if let Some(subscription) = worked_out.as_ref().filter(|_| resubscribed) {
            step.events.push(StreamEvent::Subscribed {
                rt,
                wildcard: subscription.wildcard,
                names: subscription.names().to_vec(),
            });
        }

        // A new type always has one worked out (no state, no hash to match).
        let state = self.types.get_or_insert_with(rt, || TypeState {
            subscription: worked_out.clone().unwrap_or_default(),
            client_version: String::new(),
            stated,
            last_sent: None,
            baseline: None,
            retry: None,
        });
        if let Some(sent) = state.last_sent.as_mut().filter(|s| !req.response_nonce.is_empty() && !s.answered) {
            sent.answered = true;
            let sent = &*sent;
            if let Some(err) = &req.error_detail {
                // NACK: record it and do not resend the same version; a new snapshot or
                // a subscription change is what produces the next response. Unless the
                // response holds Wasm code Envoy is fetching: then it is sent again.
                // What the response carried: only what changed, or the whole selection.
                let selected = match &sent.carried {
                    Some(carried) => carried.iter().collect(),
                    None => {
                        let selected = self.core.snapshot.as_ref().map(|s| sent.subscription.select(s.resources(rt)));
                        selected.unwrap_or_default()
                    }
                };
                let nack = Nack {
                    rt,
                    version: sent.version.to_string(),
                    kept_version: req.version_info.clone(),
                    nonce: req.response_nonce.clone(),
                    code: err.code,
                    message: err.message.clone(),
                    names: selected.iter().map(|r| r.name.clone()).collect(),
                };
                if err.message.len() > self.core.settings.max_nack_message_bytes {
                    step.limits.push("nack_message_bytes");
                }
                // SotW resends the whole response: no names to keep.
                step.events.push(self.core.on_nack(nack, selected.into_iter(), Vec::new(), &mut state.retry, now));
            } else {
                if !rt.sotw_requires_full_state() {
                    state.baseline = Some(Baseline {
                        snapshot: sent.snapshot.clone(),
                        subscription: sent.subscription.clone(),
                        version: sent.version,
                    });
                }
                state.retry = None;
                self.holds.acked(rt, &req.response_nonce, self.core.settings.drain_grace, now);
                // Moved, not copied (one per proxy per push): what the client has
                // matters only before anything was sent.
                step.events.push(StreamEvent::Acked {
                    rt,
                    version: std::mem::take(&mut req.version_info),
                    nonce: std::mem::take(&mut req.response_nonce),
                    resources: None,
                });
            }
        }
        if state.last_sent.is_none() {
            state.client_version = req.version_info;
        }
        if let Some(subscription) = worked_out {
            state.subscription = subscription;
        }
        state.stated = stated;
        // An ACK or NACK that keeps the subscription needs no answer: new snapshots are
        // pushed by `on_snapshot` as they come. (The hot path: one per proxy per push.)
        if resubscribed || !answers_us {
            self.respond(rt, false, Hold::None, &mut step);
        }
        self.end_step(&mut step, now);
        Ok(step)
    }

    /// After a step: holds made wait for the listener and route responses it sent, and
    /// what is due at once (or became due by an ACK) goes out.
    fn end_step(&mut self, step: &mut SotwStep, now: Instant) {
        // Runs after every request (each ACK): nothing to do unless a removal is held.
        if self.holds.is_empty() {
            return;
        }
        self.holds.end_step(&step.sent(), self.core.settings.drain_grace, now);
        for rt in self.holds.release_due(now) {
            self.respond(rt, false, Hold::None, step);
        }
    }

    /// When `on_timer` has something to do next, if ever.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.types.values().filter_map(|t| t.retry.as_ref()?.at).chain(self.holds.next_wakeup()).min()
    }

    /// Sends again what Envoy NACKed while fetching a Wasm module, once its time came.
    pub fn on_timer_wire(&mut self, now: Instant) -> SotwStep {
        let mut step = Step::default();
        for rt in self.holds.release_due(now) {
            self.respond(rt, false, Hold::None, &mut step);
        }
        for rt in ResourceType::ALL {
            let Some(retry) = self.types.get_mut(&rt).and_then(|t| t.retry.as_mut()) else { continue };
            if retry.at.is_some_and(|at| at <= now) {
                retry.at = None;
                self.respond(rt, true, Hold::None, &mut step);
            }
        }
        step
    }

    /// A new snapshot for this stream's node: push every subscribed type whose
    /// selected resources changed, in dependency order.
    pub fn on_snapshot_wire(&mut self, snapshot: Arc<Snapshot>, now: Instant) -> SotwStep {
        let before = self.core.snapshot.replace(snapshot);
        let hold = before.as_deref().map_or(Hold::None, Hold::Replacing);
        let mut step = Step::default();
        for rt in ResourceType::ALL {
            if self.types.contains_key(&rt) && !before.as_ref().is_some_and(|b| self.push_changes(rt, b, &mut step)) {
                self.respond(rt, false, hold, &mut step);
            }
        }
        self.end_step(&mut step, now);
        step
    }

    /// The common push of a type whose responses carry only what changed, to a client that
    /// ACKed what it was sent from `before` and asks for the same names: what changed of
    /// the type between the snapshots (worked out once for the group, `changes_from`) that
    /// this client subscribes to. Its cost is what changed, not what the client
    /// subscribes to (a mesh-sized Envoy subscribes to every endpoint assignment).
    /// `false` when it does not apply; `respond` then works it out from the selections.
    fn push_changes(&mut self, rt: ResourceType, before: &Arc<Snapshot>, step: &mut SotwStep) -> bool {
        let (Some(snapshot), Some(state)) = (self.core.snapshot.as_ref(), self.types.get_mut(&rt)) else {
            return false;
        };
        let (Some(sent), Some(baseline)) = (&state.last_sent, &mut state.baseline) else { return false };
        let applies = !rt.sotw_requires_full_state()
            && sent.answered
            && state.retry.is_none()
            && Arc::ptr_eq(&baseline.snapshot, before)
            && Arc::ptr_eq(&baseline.subscription, &state.subscription)
            && !self.holds.holds_any(rt);
        if !applies {
            return false;
        }
        let changes = snapshot.changes_from(before, rt);
        let subscription = &state.subscription;
        let wanted = changes.changed.iter().filter(|r| subscription.wants(&r.name)).count();
        let removed: Vec<String> = changes.removed.iter().filter(|n| subscription.wants(n)).cloned().collect();
        if wanted == 0 && removed.is_empty() {
            // Nothing it holds changed: the same selection, from the newer snapshot.
            baseline.snapshot = snapshot.clone();
            return true;
        }
        // All that changed (the usual push): the lists every such stream shares.
        let (carried, named): (Arc<[Arc<ServedResource>]>, _) = if wanted == changes.changed.len() {
            (changes.changed.clone(), changes.named.clone())
        } else {
            let carried: Arc<[_]> = changes.changed.iter().filter(|r| subscription.wants(&r.name)).cloned().collect();
            let named = carried.iter().map(|r| (r.name.clone(), r.version)).collect();
            (carried, named)
        };
        let version = snapshot.selection_version_of(rt, subscription);
        let nonce = self.core.nonces.next_nonce();
        let header = Header {
            version: version.as_str(),
            type_url: rt.type_url(),
            nonce: &nonce,
            control_plane: self.core.control_plane,
        };
        let Some(response) = wire::sotw_response(header, &carried, 0) else {
            tracing::error!(type_url = %rt, "response over gRPC's 4 GiB not sent");
            step.limits.push(RESPONSE_BYTES);
            return true;
        };
        // What changed in what the client holds once it ACKs (`incremental`): what this
        // carries, and what left (a SotW client keeps it; the tracker lists it no more).
        // Nothing of the type waits unsent (the client answered the last response), so
        // there is nothing for it to replace in the output queue.
        step.events.push(StreamEvent::Sent {
            rt,
            version: version.as_str().into(),
            nonce,
            resources: named,
            removed,
            incremental: true,
            bytes: response.message_len(),
        });
        step.responses.push(response);
        state.last_sent = Some(Sent {
            version,
            nonce: self.core.nonces.last(),
            subscription: state.subscription.clone(),
            answered: false,
            snapshot: snapshot.clone(),
            carried: Some(carried),
        });
        true
    }

    /// Sends the type's selected resources if they changed since last sent (or the client
    /// asks for a name anew), or in any case when `resend`. Resources held back from
    /// removal (make-before-break, `hold.rs`) are sent on with them.
    fn respond(&mut self, rt: ResourceType, resend: bool, hold: Hold<'_>, step: &mut SotwStep) {
        let (Some(snapshot), Some(state)) = (self.core.snapshot.as_ref(), self.types.get_mut(&rt)) else {
            return;
        };
        let mut selected = state.subscription.select(snapshot.resources(rt));
        let mut version = snapshot.selection_version(rt, &state.subscription, &selected);
        // Removals to hold, and held ones to send on: only when something of this type
        // changed or is held (this runs per stream per push). State of the world cannot
        // remove an extension config at all: nothing to hold there.
        let changed = state.last_sent.as_ref().is_some_and(|s| s.version != version);
        // Nor, for the types a client keeps when a response leaves them out, is there
        // anything a hold would keep (only listeners and clusters go by absence).
        if rt.sotw_requires_full_state() && (changed || self.holds.holds_any(rt)) {
            let by_name = |list: &[&Arc<crate::snapshot::ServedResource>], name: &str| {
                list.binary_search_by(|r| r.name.as_str().cmp(name)).is_ok()
            };
            if let (Hold::Replacing(before), Some(sent)) = (hold, &state.last_sent) {
                for r in sent.subscription.select(before.resources(rt)) {
                    if !by_name(&selected, &r.name) {
                        self.holds.hold(rt, &r.name, hold, Some(r.clone()));
                    }
                }
            }
            let subscription = &state.subscription;
            self.holds.retain(rt, |name| !by_name(&selected, name) && subscription.wants(name));
            let before = selected.len();
            selected.extend(self.holds.held(rt));
            if selected.len() != before {
                selected.sort_by(|a, b| a.name.cmp(&b.name));
                version = set_version(&selected);
            }
        }
        match &state.last_sent {
            None if state.client_version == version.as_str() => {
                // A reconnecting client that already has exactly this: nothing to send.
                step.events.push(StreamEvent::Current {
                    rt,
                    version: version.to_string(),
                    resources: selected.iter().map(|r| (r.name.clone(), r.version)).collect(),
                });
                state.last_sent = Some(Sent {
                    version,
                    nonce: 0,
                    subscription: state.subscription.clone(),
                    answered: true,
                    snapshot: snapshot.clone(),
                    carried: None,
                });
                state.baseline =
                    Some(Baseline { snapshot: snapshot.clone(), subscription: state.subscription.clone(), version });
                return;
            }
            // Unchanged, unless the client asks for a name it did not ask for before: that
            // gets an answer even so (the resource may not exist; SotW says so by its absence).
            Some(sent)
                if !resend
                    && sent.version == version
                    && (Arc::ptr_eq(&state.subscription, &sent.subscription)
                        || !state.subscription.gained_since(&sent.subscription)) =>
            {
                // The same selection: let go of the older snapshot the baseline was cut from.
                if let Some(b) = state.baseline.as_mut().filter(|b| b.version == version) {
                    if !Arc::ptr_eq(&b.snapshot, snapshot) {
                        b.snapshot = snapshot.clone();
                        b.subscription = state.subscription.clone();
                    }
                }
                return;
            }
            _ => {}
        }
        // Only what changed since the client's last ACK, for types where it keeps the rest;
        // a resend (Wasm code Envoy fetches) and the first response carry everything.
        let carried = match &state.baseline {
            Some(b) if !resend && !rt.sotw_requires_full_state() => {
                Some(changed_since(&selected, &b.subscription.select(b.snapshot.resources(rt))))
            }
            _ => None,
        };
        let carries = carried.as_deref().unwrap_or(&selected);
        if !resend {
            // Something new goes out: whatever Envoy was fetching for the old one, the
            // new response starts afresh.
            state.retry = None;
        }
        let nonce = self.core.nonces.next_nonce();
        let attempt = if resend { state.retry.as_ref().map_or(0, |r| r.attempt) } else { 0 };
        let header = Header {
            version: version.as_str(),
            type_url: rt.type_url(),
            nonce: &nonce,
            control_plane: self.core.control_plane,
        };
        let Some(response) = wire::sotw_response(header, carries, attempt) else {
            // Over gRPC's 4 GiB (many large inline Wasm modules for one proxy): the
            // stream ends (`after` in service.rs), as it would for any client.
            tracing::error!(type_url = %rt, "response over gRPC's 4 GiB not sent");
            step.limits.push(RESPONSE_BYTES);
            return;
        };
        // `resources` is what the client holds once it ACKs: the whole selection.
        step.events.push(StreamEvent::Sent {
            rt,
            version: version.as_str().into(),
            nonce,
            resources: selected.iter().map(|r| (r.name.clone(), r.version)).collect(),
            removed: Vec::new(),
            incremental: false,
            bytes: response.message_len(),
        });
        step.responses.push(response);
        let nonce = self.core.nonces.last();
        let carried = carried.map(|c| c.into_iter().cloned().collect());
        state.last_sent = Some(Sent {
            version,
            nonce,
            subscription: state.subscription.clone(),
            answered: false,
            snapshot: snapshot.clone(),
            carried,
        });
    }
}

/// What of `selected` differs from `before` (both in name order): new names and new
/// versions.
fn changed_since<'a>(
    selected: &[&'a Arc<ServedResource>],
    before: &[&Arc<ServedResource>],
) -> Vec<&'a Arc<ServedResource>> {
    let mut before = before.iter().peekable();
    let mut changed = Vec::new();
    for r in selected {
        while before.next_if(|b| b.name < r.name).is_some() {}
        match before.peek() {
            Some(b) if b.name == r.name && b.version == r.version => {}
            _ => changed.push(*r),
        }
    }
    changed
}

#[cfg(test)]
#[path = "sotw_tests.rs"]
mod tests;
