//! Make-before-break: a resource that leaves a proxy's config is removed only once the
//! proxy runs listeners and routes that no longer use it. Pure bookkeeping, shared by
//! both protocols: which removals are held, what each waits for, when it is due.
//!
//! Why: an ADS server pushes in dependency order (clusters before the routes that use
//! them), which is right for additions and wrong for removals. Removed together with the
//! route update that stops using it, a cluster is gone from Envoy before the route is
//! (measured: a few 503s per change under load); an extension config is gone while a
//! draining listener still runs its filter (thousands of 500s).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use filterplane_api::ResourceType;

use crate::{snapshot::ServedResource, snapshot::Snapshot, stream::NonceSource};

/// Types a listener or route refers to, whose removal waits for them.
pub fn held_on_removal(rt: ResourceType) -> bool {
    matches!(
        rt,
        ResourceType::Cluster
            | ResourceType::ClusterLoadAssignment
            | ResourceType::Secret
            | ResourceType::ExtensionConfig
    )
}

/// Types whose updates stop a proxy from using what is removed.
fn refers(rt: ResourceType) -> bool {
    matches!(rt, ResourceType::Listener | ResourceType::RouteConfiguration)
}

/// Which removals to hold in one step of a stream.
#[derive(Debug, Clone, Copy)]
pub enum Hold<'a> {
    /// None: nothing a listener of the proxy may use is leaving.
    None,
    /// A new snapshot replaced `before`. Extension configs are held when their filters
    /// were placed into its listeners (one referred to only by a bootstrap listener is
    /// removed at once: Envoy then uses the filter's `default_config`).
    Replacing(&'a Snapshot),
    /// A resuming delta client, whose listeners Filterplane never saw: every extension
    /// config it has and no longer gets.
    Resuming,
}

#[derive(Debug)]
struct Held {
    rt: ResourceType,
    name: String,
    /// The resource as last served: state of the world keeps sending it while held.
    resource: Option<Arc<ServedResource>>,
    /// Listener and route responses (type, nonce) sent with the change and not ACKed
    /// yet; `None` until the step that made the hold ends.
    waiting: Option<Vec<(ResourceType, u64)>>,
    /// A listener response is among those: old listeners drain, and use the resource
    /// for as long as their drain lasts.
    listeners_changed: bool,
    /// When the removal goes out, once known.
    release_at: Option<Instant>,
}

/// The removals one stream holds back; usually none.
#[derive(Debug, Default)]
pub struct Holds(Vec<Held>);

impl Holds {
    /// Nothing held: the usual case, and then no step has hold work to do.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether anything of type `rt` is held.
    pub fn holds_any(&self, rt: ResourceType) -> bool {
        self.0.iter().any(|h| h.rt == rt)
    }

    pub fn is_held(&self, rt: ResourceType, name: &str) -> bool {
        self.0.iter().any(|h| h.rt == rt && h.name == name)
    }

    /// Whether the removal of `name` is to be held in this step (it is then recorded).
    pub fn hold(
        &mut self,
        rt: ResourceType,
        name: &str,
        hold: Hold<'_>,
        resource: Option<Arc<ServedResource>>,
    ) -> bool {
        if self.is_held(rt, name) {
            return true;
        }
        let hold_it = held_on_removal(rt)
            && match hold {
                Hold::None => false,
                Hold::Replacing(before) => rt != ResourceType::ExtensionConfig || before.places(name),
                Hold::Resuming => rt == ResourceType::ExtensionConfig,
            };
        if hold_it {
            tracing::debug!(type_url = %rt, name, "removal held until no listener or route uses it");
            self.0.push(Held {
                rt,
                name: name.to_owned(),
                resource,
                waiting: None,
                listeners_changed: false,
                release_at: None,
            });
        }
        hold_it
    }

    /// Keeps only the holds of `rt` for which `keep` says yes: a name served again (the
    /// client has it), or unsubscribed (Envoy dropped it itself: nothing uses it).
    pub fn retain(&mut self, rt: ResourceType, mut keep: impl FnMut(&str) -> bool) {
        self.0.retain(|h| h.rt != rt || keep(&h.name));
    }

    /// The resources of `rt` held, as last served (state of the world sends them on).
    pub fn held(&self, rt: ResourceType) -> impl Iterator<Item = &Arc<ServedResource>> {
        self.0.iter().filter(move |h| h.rt == rt).filter_map(|h| h.resource.as_ref())
    }

    /// Ends a step: holds it made wait for the listener and route responses it sent
    /// (`sent`: type and nonce of every response of the step). Without any, an extension
    /// config's grace starts now (a listener it may drain is none of this stream's), and
    /// anything else is due at once.
    pub fn end_step(&mut self, sent: &[(ResourceType, String)], grace: Duration, now: Instant) {
        let referrers: Vec<(ResourceType, u64)> = sent
            .iter()
            .filter(|(rt, _)| refers(*rt))
            .filter_map(|(rt, nonce)| Some((*rt, NonceSource::number(nonce)?)))
            .collect();
        for h in &mut self.0 {
            let ecds = h.rt == ResourceType::ExtensionConfig;
            // Extension configs are placed into listeners only.
            let awaited: Vec<_> =
                referrers.iter().copied().filter(|(rt, _)| !ecds || *rt == ResourceType::Listener).collect();
            match &h.waiting {
                // Made in this step.
                None if awaited.is_empty() => {
                    h.waiting = Some(Vec::new());
                    h.release_at = Some(if ecds { now + grace } else { now });
                }
                None => {
                    h.listeners_changed = awaited.iter().any(|(rt, _)| *rt == ResourceType::Listener);
                    h.waiting = Some(awaited);
                }
                // Still waiting for an older change (its response may have been refused):
                // this newer one is what the proxy will run.
                Some(w) if !w.is_empty() && !awaited.is_empty() => {
                    h.listeners_changed |= awaited.iter().any(|(rt, _)| *rt == ResourceType::Listener);
                    h.waiting = Some(awaited);
                }
                Some(_) => {}
            }
        }
    }

    /// The proxy ACKed response `nonce` of `rt`. A hold whose awaited responses are all
    /// ACKed is due: after the drain grace if listeners changed, else at once.
    pub fn acked(&mut self, rt: ResourceType, nonce: &str, grace: Duration, now: Instant) {
        let Some(nonce) = NonceSource::number(nonce) else { return };
        for h in &mut self.0 {
            let Some(waiting) = h.waiting.as_mut().filter(|w| !w.is_empty()) else { continue };
            waiting.retain(|w| *w != (rt, nonce));
            if waiting.is_empty() {
                let drains = h.listeners_changed || h.rt == ResourceType::ExtensionConfig;
                h.release_at = Some(if drains { now + grace } else { now });
            }
        }
    }

    /// When the next hold is due, if any.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.0.iter().filter_map(|h| h.release_at).min()
    }

    /// Ends the holds due at `now`; returns their types, in push order, once each.
    pub fn release_due(&mut self, now: Instant) -> Vec<ResourceType> {
        let mut released: Vec<ResourceType> = Vec::new();
        self.0.retain(|h| {
            let due = h.release_at.is_some_and(|at| at <= now);
            if due && !released.contains(&h.rt) {
                released.push(h.rt);
            }
            !due
        });
        released.sort_by_key(|rt| rt.index());
        released
    }
}
