//! Placing filters into served listeners: checking each placement, checking all of them
//! against every served listener, and assembling a listener for a group of proxies.

use std::sync::Arc;

use filterplane_api::{any_from_json, Any, ResourceType, ResourceVersion};

use super::{encode, CompiledResource, Compiler, Origin};
use crate::{
    model::{ChainKind, PlacementSpec},
    placement::{chain_of_type, place, Placement},
};

/// A served listener with the given placements' filters inserted, encoded, and its
/// version. `None` when no placement applies to it (serve `listener.resource` as is).
pub fn assemble_listener(
    listener: &CompiledResource,
    placements: &[&Placement],
) -> Option<Result<(Any, ResourceVersion), String>> {
    let json = listener.listener_json.as_ref()?;
    let placed = match place(json, placements) {
        Ok(p) if p.hits.iter().any(|h| *h > 0) => p,
        Ok(_) => return None,
        Err(errors) => {
            return Some(Err(errors.into_iter().map(|(p, m)| format!("{p}: {m}")).collect::<Vec<_>>().join("; ")))
        }
    };
    Some(encode(ResourceType::Listener, &listener.name, placed.listener).map_err(|(p, m)| format!("{p}: {m}")))
}

impl Compiler<'_> {
    pub(super) fn placement(
        &mut self,
        origin: &Origin,
        name: &str,
        type_url: &str,
        spec: &PlacementSpec,
    ) -> Option<Placement> {
        let by_type = chain_of_type(type_url);
        let chain = match (spec.chain, by_type) {
            (Some(c), Some(t)) if c != t => {
                let kind = |k: ChainKind| if k == ChainKind::Http { "an HTTP" } else { "a network" };
                self.error_at(
                    origin,
                    "placement.chain",
                    format!("{type_url} is {} filter; it cannot go in {} filter chain", kind(t), kind(c)),
                );
                return None;
            }
            (Some(c), _) | (None, Some(c)) => c,
            (None, None) => {
                self.error_at(
                    origin,
                    "placement",
                    format!("cannot tell whether {type_url} is an HTTP or a network filter: set placement.chain"),
                );
                return None;
            }
        };
        if chain == ChainKind::Network && !spec.route_configs.is_empty() {
            self.error_at(origin, "placement.route_configs", "only HTTP filters can be placed by route config");
            return None;
        }
        let default_config = match &spec.default_config {
            None => None,
            Some(d) => match any_from_json(d) {
                Err(e) => {
                    let sub = if e.path.is_empty() {
                        "placement.default_config".into()
                    } else {
                        format!("placement.default_config.{}", e.path)
                    };
                    self.error_at(origin, &sub, e.message);
                    return None;
                }
                Ok(t) if t.any.type_url != type_url => {
                    self.error_at(
                        origin,
                        "placement.default_config.@type",
                        format!("must be {type_url}, the type of typed_config"),
                    );
                    return None;
                }
                Ok(_) => Some(d.clone()),
            },
        };
        Some(Placement {
            filter_name: name.to_owned(),
            chain,
            listeners: spec.listeners.clone(),
            ports: spec.ports.clone(),
            route_configs: spec.route_configs.clone(),
            phase: spec.phase,
            priority: spec.priority,
            type_url: type_url.to_owned(),
            default_config,
            apply_default_config_without_warming: spec.apply_default_config_without_warming,
            implied: spec.implied,
        })
    }

    /// Every placement must name listeners that exist and land in at least one chain;
    /// placing all of them at once into every listener must give valid listeners.
    /// `summaries` are the resources' (in their order): only those with a placement or a
    /// listener are read.
    pub(super) fn check_placements(&mut self, summaries: &[crate::compiled::Summary]) {
        let mut placements: Vec<(Arc<Placement>, Origin)> = Vec::new();
        let with = |flag: fn(&crate::compiled::Summary) -> bool| {
            summaries.iter().zip(&self.resources).filter(move |(s, _)| flag(s)).map(|(_, r)| r)
        };
        let placed = with(|s| s.placement).map(|r| (&r.placement, &r.origin));
        for (p, origin) in placed.chain(self.wasm.iter().map(|w| (&w.placement, &w.origin))) {
            if let Some(p) = p {
                if !placements.iter().any(|(q, _)| q.filter_name == p.filter_name) {
                    placements.push((p.clone(), origin.clone()));
                }
            }
        }
        if placements.is_empty() {
            return;
        }
        let listeners: Vec<Arc<CompiledResource>> = with(|s| s.listener).cloned().collect();
        for (p, origin) in &placements {
            for (k, l) in p.listeners.iter().enumerate() {
                if !listeners.iter().any(|r| &r.name == l) {
                    self.error_at(
                        origin,
                        &format!("placement.listeners[{k}]"),
                        format!("no listener named \"{l}\" in the config"),
                    );
                }
            }
        }
        let all: Vec<&Placement> = placements.iter().map(|(p, _)| p.as_ref()).collect();
        let mut hits = vec![0usize; all.len()];
        let errors_before = self.errors.len();
        for l in &listeners {
            let json = l.listener_json.as_ref().expect("filtered on listener_json");
            match place(json, &all) {
                Err(errs) => {
                    for (path, message) in errs {
                        self.error_at(&l.origin, &path, message);
                    }
                }
                Ok(placed) => {
                    for (h, n) in hits.iter_mut().zip(&placed.hits) {
                        *h += n;
                    }
                    if let Err((path, message)) = encode(ResourceType::Listener, &l.name, placed.listener) {
                        self.error_at(&l.origin, &path, format!("after inserting placed filters: {message}"));
                    }
                }
            }
        }
        for ((p, origin), h) in placements.iter().zip(hits) {
            // (Counts are incomplete when a listener failed; its error says enough.)
            if h == 0 && self.errors.len() == errors_before {
                let what = match p.chain {
                    ChainKind::Http => "HTTP connection manager",
                    ChainKind::Network => "network filter chain",
                };
                if p.implied {
                    // Istio's documents go wherever the proxy's listeners take them; a
                    // listener of the proxy's own bootstrap can, through config_discovery.
                    let notice = format!(
                        "placed in no listener: no {what} in the listeners this config serves{}; served over ECDS as \"{}\" for a listener's config_discovery (a bootstrap listener's, say) to take",
                        if p.ports.is_empty() { String::new() } else { format!(" on port {:?}", p.ports) },
                        p.filter_name
                    );
                    let error = self.located(origin, "", notice);
                    self.notices.push(error);
                } else {
                    self.error_at(
                        origin,
                        "placement",
                        format!("matches no {what} in the listeners this config serves"),
                    );
                }
            }
        }
    }
}
