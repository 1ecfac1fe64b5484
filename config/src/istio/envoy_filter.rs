//! `EnvoyFilter`: its `EXTENSION_CONFIG` patches become extension configs served over
//! ECDS, and its `HTTP_FILTER` insertions become placements in the served listeners, where
//! Istio would put them. Patches of resources Istio generates (routes, clusters,
//! listeners) are refused with why: with Filterplane those resources are written directly.

use serde_json::{Map, Value};

use super::{Reader, TARGET_REFS};
use crate::model::{ChainKind, ExtensionConfigSpec, NodeSelector, Phase, PlacementSpec};

const SIDECAR: &str = "selects a sidecar's inbound or outbound listeners, which Istio generates from Kubernetes \
     Services; Filterplane serves gateway listeners: write GATEWAY or ANY";
const ROUTER: &str = "envoy.filters.http.router";

/// Why an `applyTo` other than EXTENSION_CONFIG and HTTP_FILTER is refused.
fn apply_to_refusal(apply_to: &str) -> String {
    let why = match apply_to {
        "ROUTE_CONFIGURATION" | "VIRTUAL_HOST" | "HTTP_ROUTE" => {
            "patches a route configuration Istio generates; with Filterplane you write the RouteConfiguration \
             itself (`routes:` in Filterplane's YAML), as Envoy's docs write it"
        }
        "CLUSTER" => {
            "patches a cluster Istio generates; with Filterplane you write the Cluster itself (`clusters:`), as \
             Envoy's docs write it"
        }
        "LISTENER" | "FILTER_CHAIN" | "NETWORK_FILTER" | "LISTENER_FILTER" => {
            "patches a listener Istio generates; with Filterplane you write the Listener itself (`listeners:`), \
             or place a network filter with Filterplane's `placement: { chain: network }`"
        }
        "BOOTSTRAP" => {
            "patches Envoy's bootstrap, which is yours to write: Filterplane serves only what comes over xDS"
        }
        _ => "is not one of Istio's applyTo values",
    };
    format!("{apply_to:?} {why}; Filterplane reads EXTENSION_CONFIG and HTTP_FILTER patches")
}

/// A patch's `match`: the context (gateways only) and `proxy` (version and metadata) as
/// a node selector; `listener` for HTTP_FILTER insertions only.
struct PatchMatch {
    proxy: NodeSelector,
    ports: Vec<u32>,
    /// `subFilter.name`, when written.
    sub_filter: Option<String>,
}

fn patch_match(r: &mut Reader<'_>, p: &Map<String, Value>, at: &str, listener_allowed: bool) -> PatchMatch {
    let mut out = PatchMatch { proxy: NodeSelector::default(), ports: Vec::new(), sub_filter: None };
    let mat = format!("{at}.match");
    let mut known = vec!["context", "proxy"];
    if listener_allowed {
        known.push("listener");
    }
    let refused: &[(&str, &str)] = &[
        ("routeConfiguration", "matches a route configuration; Filterplane places HTTP filters in listeners"),
        ("cluster", "matches a cluster; Filterplane places HTTP filters in listeners"),
        ("listener", "an EXTENSION_CONFIG is not inside a listener: match it by context and proxy only"),
    ];
    let Some(m) = p.get("match").and_then(|m| r.object_refusing(m, &mat, &known, refused)) else {
        return out;
    };
    match r.string(m, &mat, "context").as_deref() {
        None | Some("ANY") | Some("GATEWAY") => {}
        Some(c @ ("SIDECAR_INBOUND" | "SIDECAR_OUTBOUND")) => {
            r.error(&format!("{mat}.context"), format!("{c} {SIDECAR}"))
        }
        Some(other) => {
            r.error(&format!("{mat}.context"), format!("{other:?}: ANY, GATEWAY, SIDECAR_INBOUND or SIDECAR_OUTBOUND"))
        }
    }
    let pat = format!("{mat}.proxy");
    if let Some(proxy) = m.get("proxy").and_then(|v| r.object(v, &pat, &["proxyVersion", "metadata"])) {
        if let Some(v) = r.string(proxy, &pat, "proxyVersion") {
            // Istio matches its own proxy version; Filterplane's proxies are Envoys, so the
            // pattern is matched against the Envoy version the proxy reports.
            out.proxy.envoy_version = r.version_pattern(&v, &format!("{pat}.proxyVersion"));
        }
        out.proxy.metadata = r.string_map(proxy.get("metadata"), &format!("{pat}.metadata"));
    }
    let lat = format!("{mat}.listener");
    if let Some(l) =
        m.get("listener").filter(|_| listener_allowed).and_then(|l| r.object(l, &lat, &["portNumber", "filterChain"]))
    {
        if let Some(n) = l.get("portNumber") {
            match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) => out.ports.push(n),
                None => r.error(&format!("{lat}.portNumber"), "expected a port number"),
            }
        }
        let fat = format!("{lat}.filterChain");
        if let Some(fc) = l.get("filterChain").and_then(|f| r.object(f, &fat, &["filter"])) {
            let ffat = format!("{fat}.filter");
            if let Some(f) = fc.get("filter").and_then(|f| r.object(f, &ffat, &["name", "subFilter"])) {
                let hcm = r.string(f, &ffat, "name");
                if hcm.as_deref().is_some_and(|n| n != "envoy.filters.network.http_connection_manager") {
                    r.error(
                        &format!("{ffat}.name"),
                        "HTTP filters go in envoy.filters.network.http_connection_manager",
                    );
                }
                let sat = format!("{ffat}.subFilter");
                if let Some(sf) = f.get("subFilter").and_then(|s| r.object(s, &sat, &["name"])) {
                    out.sub_filter = r.string(sf, &sat, "name");
                }
            }
        }
    }
    out
}

/// The extension configs of an EnvoyFilter, each with the path it came from.
pub(super) fn envoy_filter(r: &mut Reader<'_>, spec: &Value) -> Vec<(ExtensionConfigSpec, String)> {
    let refused = [
        ("targetRefs", TARGET_REFS),
        (
            "priority",
            "orders EnvoyFilters that patch the same generated config; Filterplane places filters by phase \
             (filterClass) instead: leave priority out",
        ),
    ];
    let Some(s) = r.object_refusing(spec, "spec", &["workloadSelector", "configPatches"], &refused) else {
        return Vec::new();
    };
    let mut selector = NodeSelector::default();
    if let Some(sel) = s.get("workloadSelector").and_then(|v| r.object(v, "spec.workloadSelector", &["labels"])) {
        selector.labels = r.string_map(sel.get("labels"), "spec.workloadSelector.labels");
    }
    let patches = s.get("configPatches").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut configs: Vec<(ExtensionConfigSpec, String)> = Vec::new();
    // HTTP filter insertions that discover an EXTENSION_CONFIG: (name, proxy, placement, path).
    let mut inserts: Vec<(String, NodeSelector, PlacementSpec, String)> = Vec::new();
    for (i, patch) in patches.iter().enumerate() {
        let at = format!("spec.configPatches[{i}]");
        let Some(p) = r.object(patch, &at, &["applyTo", "match", "patch"]) else { continue };
        let apply_to = r.string(p, &at, "applyTo").unwrap_or_default();
        let pat = format!("{at}.patch");
        let Some(body) = p.get("patch").and_then(|b| r.object(b, &pat, &["operation", "value", "filterClass"])) else {
            r.error(&at, "needs patch");
            continue;
        };
        let operation = r.string(body, &pat, "operation").unwrap_or_default();
        let filter_class = r.string(body, &pat, "filterClass");
        let value_at = format!("{pat}.value");
        let Some(value) = body.get("value") else {
            r.error(&pat, "needs value");
            continue;
        };
        match apply_to.as_str() {
            "EXTENSION_CONFIG" => {
                let m = patch_match(r, p, &at, false);
                if operation != "ADD" {
                    r.error(&format!("{pat}.operation"), "EXTENSION_CONFIG patches are ADD");
                }
                let Some(v) = r.object(value, &value_at, &["name", "typed_config"]) else { continue };
                let (Some(name), Some(typed_config)) = (r.string(v, &value_at, "name"), v.get("typed_config")) else {
                    r.error(&value_at, "needs name and typed_config");
                    continue;
                };
                configs.push((
                    ExtensionConfigSpec {
                        name,
                        node_selector: with_proxy(&selector, m.proxy),
                        typed_config: typed_config.clone(),
                        placement: None,
                        wasm_fetch: None,
                        rollout: None,
                    },
                    value_at,
                ));
            }
            "HTTP_FILTER" => {
                let m = patch_match(r, p, &at, true);
                let placement = http_filter_placement(r, &pat, &operation, filter_class.as_deref(), &m);
                let Some(v) = r.object(value, &value_at, &["name", "typed_config", "config_discovery"]) else {
                    continue;
                };
                let Some(name) = r.string(v, &value_at, "name") else {
                    r.error(&value_at, "needs name");
                    continue;
                };
                let Some(mut placement) = placement else { continue };
                match (v.get("typed_config"), v.get("config_discovery")) {
                    // The filter's own config: served over ECDS under its name, placed.
                    (Some(tc), None) => configs.push((
                        ExtensionConfigSpec {
                            name: name.clone(),
                            node_selector: with_proxy(&selector, m.proxy),
                            typed_config: tc.clone(),
                            placement: Some(placement),
                            wasm_fetch: None,
                            rollout: None,
                        },
                        value_at,
                    )),
                    // A filter that discovers an EXTENSION_CONFIG of this document.
                    (None, Some(cd)) => {
                        let cd_at = format!("{value_at}.config_discovery");
                        if let Some(cd) = r.object(
                            cd,
                            &cd_at,
                            &["config_source", "type_urls", "default_config", "apply_default_config_without_warming"],
                        ) {
                            placement.default_config = cd.get("default_config").cloned();
                            placement.apply_default_config_without_warming = cd
                                .get("apply_default_config_without_warming")
                                .and_then(Value::as_bool)
                                .unwrap_or(false);
                        }
                        inserts.push((name, m.proxy, placement, value_at));
                    }
                    _ => r.error(&value_at, "needs typed_config or config_discovery (one of them)"),
                }
            }
            other => r.error(&format!("{at}.applyTo"), apply_to_refusal(other)),
        }
    }
    for (name, proxy, placement, at) in inserts {
        match configs.iter_mut().find(|(c, _)| c.name == name) {
            Some((c, _)) => {
                // One entry, one selector: the insertion's proxy match, when it has one,
                // must agree with its config's (or the config has none, and takes it).
                if proxy != NodeSelector::default() {
                    let wanted = with_proxy(&selector, proxy);
                    if c.node_selector == selector {
                        c.node_selector = wanted;
                    } else if c.node_selector != wanted {
                        r.error(
                            &format!("{at}.name"),
                            format!("the insertion of {name:?} matches other proxies (match.proxy) than its EXTENSION_CONFIG patch: give both the same match.proxy"),
                        );
                    }
                }
                c.placement = Some(placement);
            }
            None => r.error(
                &format!("{at}.name"),
                format!("no EXTENSION_CONFIG patch named {name:?} in this EnvoyFilter to discover"),
            ),
        }
    }
    configs
}

/// The document's workload selector narrowed by a patch's `match.proxy`.
fn with_proxy(selector: &NodeSelector, proxy: NodeSelector) -> NodeSelector {
    let mut s = selector.clone();
    s.envoy_version = proxy.envoy_version;
    s.metadata.extend(proxy.metadata);
    s
}

/// Where an `HTTP_FILTER` insertion goes, as a placement, where Istio puts it:
/// - `INSERT_FIRST`, and `INSERT_BEFORE` without a `subFilter` (Istio inserts at index 0):
///   the front of the chain (phase AUTHN);
/// - `INSERT_BEFORE` the router: its end, just before the router;
/// - `ADD` with a `filterClass` (AUTHN, AUTHZ, STATS; UNSPECIFIED or none: the control
///   plane decides, here just before the router): by phase, as a WasmPlugin's.
///
/// Ports come from `match.listener.portNumber`.
fn http_filter_placement(
    r: &mut Reader<'_>,
    pat: &str,
    operation: &str,
    filter_class: Option<&str>,
    m: &PatchMatch,
) -> Option<PlacementSpec> {
    let class = match filter_class {
        None | Some("UNSPECIFIED") => Phase::Unspecified,
        Some("AUTHN") => Phase::Authn,
        Some("AUTHZ") => Phase::Authz,
        Some("STATS") => Phase::Stats,
        Some(other) => {
            r.error(&format!("{pat}.filterClass"), format!("{other:?}: AUTHN, AUTHZ, STATS or UNSPECIFIED"));
            return None;
        }
    };
    if filter_class.is_some() && operation != "ADD" {
        r.error(
            &format!("{pat}.filterClass"),
            "filterClass places filters added with operation ADD (as Istio reads it)",
        );
        return None;
    }
    let phase = match (operation, m.sub_filter.as_deref()) {
        ("ADD", _) => class,
        ("INSERT_FIRST", _) | ("INSERT_BEFORE", None) => Phase::Authn,
        ("INSERT_BEFORE", Some(ROUTER)) => Phase::Unspecified,
        ("INSERT_BEFORE", Some(other)) => {
            r.error(
                &format!("{pat}.operation"),
                format!("INSERT_BEFORE {other:?}: Filterplane places HTTP filters by phase, not next to named filters: INSERT_BEFORE {ROUTER}, INSERT_FIRST, or ADD with a filterClass"),
            );
            return None;
        }
        _ => {
            r.error(
                &format!("{pat}.operation"),
                format!("{operation:?}: Filterplane places HTTP filters by phase: INSERT_FIRST, INSERT_BEFORE (the router, or no subFilter: the front), or ADD with a filterClass"),
            );
            return None;
        }
    };
    Some(PlacementSpec {
        chain: Some(ChainKind::Http),
        listeners: Vec::new(),
        ports: m.ports.clone(),
        route_configs: Vec::new(),
        phase,
        priority: 0,
        default_config: None,
        apply_default_config_without_warming: false,
        implied: true,
    })
}
