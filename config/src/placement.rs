//! Placing discovered filters into served listeners: which filter chains a placement
//! matches, and where in the chain the filter goes. Works on the listener's Envoy-native
//! JSON, before it is encoded, so the result is checked by the descriptors like anything
//! written by hand.

use serde_json::{json, Map, Value};

use crate::model::{ChainKind, Phase};

pub const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// A checked placement of one extension config.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    /// The filter's name in the chain, which is the ECDS resource name.
    pub filter_name: String,
    pub chain: ChainKind,
    pub listeners: Vec<String>,
    pub ports: Vec<u32>,
    pub route_configs: Vec<String>,
    pub phase: Phase,
    pub priority: i32,
    /// The `@type` the discovered config has; the only one `type_urls` allows.
    pub type_url: String,
    pub default_config: Option<Value>,
    pub apply_default_config_without_warming: bool,
    /// From an Istio document (see `PlacementSpec::implied`).
    #[serde(default)]
    pub implied: bool,
}

impl Placement {
    fn matches_listener(&self, name: &str, port: Option<u64>) -> bool {
        (self.listeners.is_empty() || self.listeners.iter().any(|l| l == name))
            && (self.ports.is_empty() || port.is_some_and(|p| self.ports.iter().any(|q| u64::from(*q) == p)))
    }

    /// The filter entry Envoy reads: a name and where to discover its config.
    fn filter(&self) -> Value {
        let mut discovery = json!({
            "config_source": { "ads": {}, "resource_api_version": "V3" },
            "type_urls": [self.type_url],
        });
        if let Some(d) = &self.default_config {
            discovery["default_config"] = d.clone();
        }
        if self.apply_default_config_without_warming {
            discovery["apply_default_config_without_warming"] = Value::Bool(true);
        }
        json!({ "name": self.filter_name, "config_discovery": discovery })
    }
}

/// The chain kind a config type belongs in, if its type says so.
pub fn chain_of_type(type_url: &str) -> Option<ChainKind> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    if name.starts_with("envoy.extensions.filters.http.") {
        Some(ChainKind::Http)
    } else if name.starts_with("envoy.extensions.filters.network.") {
        Some(ChainKind::Network)
    } else {
        None
    }
}

/// What placing filters into one listener did.
#[derive(Debug, Default)]
pub struct Placed {
    /// The listener with the filters inserted.
    pub listener: Value,
    /// For each placement (by index into the slice given), how many chains got it.
    pub hits: Vec<usize>,
}

/// Inserts every matching placement into `listener` (Envoy-native JSON). Errors are
/// messages with the JSON path inside the listener where they apply.
pub fn place(listener: &Value, placements: &[&Placement]) -> Result<Placed, Vec<(String, String)>> {
    let mut out = listener.clone();
    let mut hits = vec![0; placements.len()];
    let mut errors = Vec::new();
    let name = listener.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
    let port = ["address", "socket_address", "port_value"]
        .iter()
        .try_fold(listener, |v, k| v.get(*k))
        .or_else(|| ["address", "socketAddress", "portValue"].iter().try_fold(listener, |v, k| v.get(*k)))
        .and_then(Value::as_u64);
    let here: Vec<(usize, &Placement)> =
        placements.iter().enumerate().filter(|(_, p)| p.matches_listener(&name, port)).map(|(i, p)| (i, *p)).collect();
    if here.is_empty() {
        return Ok(Placed { listener: out, hits });
    }

    let mut chains: Vec<(String, &mut Value)> = Vec::new();
    for (key, value) in out.as_object_mut().into_iter().flatten() {
        match (key.as_str(), value) {
            ("filter_chains" | "filterChains", Value::Array(fcs)) => {
                for (i, fc) in fcs.iter_mut().enumerate() {
                    chains.push((format!("{key}[{i}]"), fc));
                }
            }
            ("default_filter_chain" | "defaultFilterChain", fc) => chains.push((key.clone(), fc)),
            _ => {}
        }
    }
    for (chain_path, chain) in chains {
        let Some(Value::Array(filters)) = chain.get_mut("filters") else { continue };
        // Network filters of this chain.
        let net: Vec<(usize, &Placement)> =
            here.iter().filter(|(_, p)| p.chain == ChainKind::Network).copied().collect();
        if !net.is_empty() {
            if let Err(e) = insert(filters, &net, &mut hits) {
                errors.push((format!("{chain_path}.filters"), e));
            }
        }
        // HTTP filters of each HTTP connection manager in it.
        for (fi, filter) in filters.iter_mut().enumerate() {
            let Some(tc) = filter.get_mut("typed_config").and_then(Value::as_object_mut) else { continue };
            if tc.get("@type").and_then(Value::as_str) != Some(HCM_TYPE) {
                continue;
            }
            let route_config = route_config_name(tc);
            let http: Vec<(usize, &Placement)> = here
                .iter()
                .filter(|(_, p)| p.chain == ChainKind::Http)
                .filter(|(_, p)| {
                    p.route_configs.is_empty()
                        || route_config.as_deref().is_some_and(|rc| p.route_configs.iter().any(|r| r == rc))
                })
                .copied()
                .collect();
            if http.is_empty() {
                continue;
            }
            let key = if tc.contains_key("httpFilters") { "httpFilters" } else { "http_filters" };
            let list = tc.entry(key).or_insert_with(|| Value::Array(Vec::new()));
            let Value::Array(http_filters) = list else {
                errors.push((format!("{chain_path}.filters[{fi}].typed_config.{key}"), "must be a list".into()));
                continue;
            };
            if let Err(e) = insert(http_filters, &http, &mut hits) {
                errors.push((format!("{chain_path}.filters[{fi}].typed_config.{key}"), e));
            }
        }
    }
    if errors.is_empty() {
        Ok(Placed { listener: out, hits })
    } else {
        Err(errors)
    }
}

fn route_config_name(hcm: &Map<String, Value>) -> Option<String> {
    let get = |obj: &str, key: &[&str]| {
        hcm.get(obj).and_then(|o| key.iter().find_map(|k| o.get(*k))).and_then(Value::as_str).map(str::to_owned)
    };
    get("rds", &["route_config_name", "routeConfigName"])
        .or_else(|| get("route_config", &["name"]))
        .or_else(|| get("routeConfig", &["name"]))
}

/// Inserts the placed filters into one chain: `AUTHN`, `AUTHZ`, `STATS` in front of the
/// chain's own filters, `UNSPECIFIED` just before its last (terminal) filter. Inside a
/// phase, higher priority first, then by name: the order never depends on file order.
fn insert(filters: &mut Vec<Value>, placed: &[(usize, &Placement)], hits: &mut [usize]) -> Result<(), String> {
    let mut placed = placed.to_vec();
    placed
        .sort_by(|(_, a), (_, b)| (a.phase, -a.priority, &a.filter_name).cmp(&(b.phase, -b.priority, &b.filter_name)));
    for (_, p) in &placed {
        if filters.iter().any(|f| f.get("name").and_then(Value::as_str) == Some(p.filter_name.as_str())) {
            return Err(format!(
                "the chain already has a filter named \"{}\"; two filters in one chain cannot share a name",
                p.filter_name
            ));
        }
    }
    let (front, back): (Vec<_>, Vec<_>) = placed.iter().partition(|(_, p)| p.phase != Phase::Unspecified);
    let terminal = filters.pop();
    let own = std::mem::take(filters);
    filters.extend(front.iter().map(|(_, p)| p.filter()));
    filters.extend(own);
    filters.extend(back.iter().map(|(_, p)| p.filter()));
    filters.extend(terminal);
    for (i, _) in &placed {
        hits[*i] += 1;
    }
    Ok(())
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
