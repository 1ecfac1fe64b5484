//! `WasmPlugin` and `TrafficExtension` (Wasm or inline Lua): one selector, phase, priority
//! and match model, placed as Istio places them into every listener the proxy is served,
//! and served over ECDS as `NAMESPACE.NAME` whether or not a served listener takes them
//! (a bootstrap listener's `config_discovery` can).

use std::path::Path;

use serde_json::{json, Map, Value};

use super::{Reader, TARGET_REFS};
use crate::model::{
    ChainKind, ExtensionConfigSpec, FailStrategy, NodeSelector, Phase, PlacementSpec, PluginType, PullPolicy,
    PullSecret, WasmPluginSpec, WasmVmConfig,
};

/// Envoy's Lua filter, which `lua.inlineCode` becomes.
pub const LUA_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua";
/// Istio's bound on `lua.inlineCode` (its CRD's MaxLength), kept here.
pub const MAX_LUA_BYTES: usize = 65_536;

/// What a TrafficExtension becomes.
pub enum Extension {
    Wasm(Box<WasmPluginSpec>),
    Lua(Box<ExtensionConfigSpec>),
}

/// Where and for which proxies: the fields WasmPlugin and TrafficExtension share.
struct Targeting {
    node_selector: NodeSelector,
    placement: PlacementSpec,
}

fn targeting(r: &mut Reader<'_>, s: &Map<String, Value>) -> Targeting {
    let node_selector = r.workload_selector(s, "selector", "matchLabels");
    let phase = match r.string(s, "spec", "phase").as_deref() {
        None | Some("UNSPECIFIED_PHASE") | Some("EXECUTION_PHASE_UNSPECIFIED") => Phase::Unspecified,
        Some("AUTHN") | Some("EXECUTION_PHASE_AUTHN") => Phase::Authn,
        Some("AUTHZ") | Some("EXECUTION_PHASE_AUTHZ") => Phase::Authz,
        Some("STATS") | Some("EXECUTION_PHASE_STATS") => Phase::Stats,
        Some(other) => {
            r.error("spec.phase", format!("{other:?}: AUTHN, AUTHZ, STATS or UNSPECIFIED_PHASE"));
            Phase::Unspecified
        }
    };
    let priority = r.priority(s, "spec");
    let mut ports = Vec::new();
    if let Some(m) = s.get("match") {
        match m.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    let at = format!("spec.match[{i}]");
                    let Some(sel) = r.object(item, &at, &["mode", "ports"]) else { continue };
                    match r.string(sel, &at, "mode").as_deref() {
                        // A gateway's traffic is Istio's CLIENT side (its docs: "for the
                        // gateway, the field should be CLIENT or CLIENT_AND_SERVER").
                        None | Some("UNDEFINED") | Some("CLIENT") | Some("CLIENT_AND_SERVER") => {}
                        Some("SERVER") => r.error(
                            &format!("{at}.mode"),
                            "SERVER selects a sidecar's inbound traffic; Filterplane serves gateway listeners, \
                             Istio's CLIENT side: leave mode out or write CLIENT",
                        ),
                        Some(other) => {
                            r.error(&format!("{at}.mode"), format!("{other:?}: CLIENT, SERVER or CLIENT_AND_SERVER"))
                        }
                    }
                    for (j, port) in sel.get("ports").and_then(Value::as_array).into_iter().flatten().enumerate() {
                        let pat = format!("{at}.ports[{j}]");
                        match port.get("number").and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok()) {
                            Some(n) if r.object(port, &pat, &["number"]).is_some() => ports.push(n),
                            _ => r.error(&pat, "expected { number: PORT }"),
                        }
                    }
                }
            }
            None => r.error("spec.match", "expected a list"),
        }
    }
    Targeting {
        node_selector,
        // As Istio does: into every listener the proxy is served (those of its ports),
        // by phase and priority; served over ECDS even where no served listener takes it.
        placement: PlacementSpec {
            chain: None,
            listeners: Vec::new(),
            ports,
            route_configs: Vec::new(),
            phase,
            priority,
            default_config: None,
            apply_default_config_without_warming: false,
            implied: true,
        },
    }
}

/// The Wasm fields (WasmPlugin's `spec`, TrafficExtension's `spec.wasm`), at `at`.
fn wasm_module(
    r: &mut Reader<'_>,
    w: &Map<String, Value>,
    at: &str,
    name: &str,
    file: &Path,
    targeting: Targeting,
) -> Option<WasmPluginSpec> {
    let Some(mut url) = r.string(w, at, "url") else {
        r.error(at, format!("needs {at}.url"));
        return None;
    };
    // Istio: "If no scheme is present, defaults to oci://".
    if !url.contains("://") {
        url = format!("oci://{url}");
    }
    let sha256 = r.string(w, at, "sha256").filter(|s| !s.is_empty());
    let image_pull_policy = match r.string(w, at, "imagePullPolicy").as_deref() {
        None | Some("UNSPECIFIED_POLICY") => None,
        Some("IfNotPresent") => Some(PullPolicy::IfNotPresent),
        Some("Always") => Some(PullPolicy::Always),
        Some(other) => {
            r.error(&format!("{at}.imagePullPolicy"), format!("{other:?}: IfNotPresent or Always"));
            None
        }
    };
    // Istio names a Kubernetes Secret; here it is a file holding one (or a Docker
    // config.json, or USER:PASSWORD), relative to the document's directory.
    let image_pull_secret = r.string(w, at, "imagePullSecret").map(|p| {
        let path = std::path::PathBuf::from(&p);
        let base = file.parent().unwrap_or(Path::new("."));
        PullSecret::File(if path.is_absolute() { path } else { base.join(path) })
    });
    let mut vm_config = WasmVmConfig::default();
    if let Some(vm) = w.get("vmConfig").and_then(|v| r.object(v, &format!("{at}.vmConfig"), &["env"])) {
        for (i, e) in vm.get("env").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let eat = format!("{at}.vmConfig.env[{i}]");
            let Some(e) = r.object(e, &eat, &["name", "value", "valueFrom"]) else { continue };
            let Some(key) = r.string(e, &eat, "name") else {
                r.error(&eat, "needs name");
                continue;
            };
            match r.string(e, &eat, "valueFrom").as_deref() {
                None | Some("INLINE") => {
                    let value = r.string(e, &eat, "value").unwrap_or_default();
                    vm_config.env.insert(key, value);
                }
                Some("HOST") => vm_config.host_env.push(key),
                Some(other) => r.error(&format!("{eat}.valueFrom"), format!("{other:?}: INLINE or HOST")),
            }
        }
    }
    let plugin_type = match r.string(w, at, "type").as_deref() {
        None | Some("UNSPECIFIED_PLUGIN_TYPE") | Some("HTTP") => PluginType::Http,
        Some("NETWORK") => PluginType::Network,
        Some(other) => {
            r.error(&format!("{at}.type"), format!("{other:?}: HTTP or NETWORK"));
            PluginType::Http
        }
    };
    let fail_strategy = match r.string(w, at, "failStrategy").as_deref() {
        None | Some("FAIL_CLOSE") => FailStrategy::FailClose,
        Some("FAIL_OPEN") => FailStrategy::FailOpen,
        Some("FAIL_RELOAD") => FailStrategy::FailReload,
        Some(other) => {
            r.error(&format!("{at}.failStrategy"), format!("{other:?}: FAIL_CLOSE, FAIL_OPEN or FAIL_RELOAD"));
            FailStrategy::FailClose
        }
    };
    Some(WasmPluginSpec {
        name: name.to_owned(),
        node_selector: targeting.node_selector,
        url,
        sha256,
        image_pull_policy,
        image_pull_secret,
        plugin_config: w.get("pluginConfig").cloned(),
        root_id: r.string(w, at, "pluginName").unwrap_or_default(),
        vm_config,
        fail_strategy,
        plugin_type,
        delivery: None,
        rollout: None,
        placement: Some(targeting.placement),
        // Istio's `verificationKey` (a PEM public key), which Istio itself does not
        // implement: the module must be signed by it.
        verification: r.string(w, at, "verificationKey").map(|pem| crate::model::PluginVerificationSpec {
            inline_keys: vec![pem],
            require: Some(true),
            ..Default::default()
        }),
    })
}

const TARGETING_FIELDS: [&str; 4] = ["selector", "phase", "priority", "match"];
const WASM_FIELDS: [&str; 10] = [
    "verificationKey",
    "url",
    "sha256",
    "imagePullPolicy",
    "imagePullSecret",
    "pluginConfig",
    "pluginName",
    "vmConfig",
    "type",
    "failStrategy",
];
const REFUSED: [(&str, &str); 2] = [("targetRef", TARGET_REFS), ("targetRefs", TARGET_REFS)];

/// A `WasmPlugin`: its module, fetched and checked by Filterplane, placed and served.
pub(super) fn wasm_plugin(r: &mut Reader<'_>, spec: &Value, name: &str, file: &Path) -> Option<WasmPluginSpec> {
    let known: Vec<&str> = TARGETING_FIELDS.iter().chain(&WASM_FIELDS).copied().collect();
    let s = r.object_refusing(spec, "spec", &known, &REFUSED)?;
    let targeting = targeting(r, s);
    wasm_module(r, s, "spec", name, file, targeting)
}

/// A `TrafficExtension`: exactly one of `wasm` (as a WasmPlugin) or `lua` (inline code,
/// Envoy's Lua filter, at most 64 KiB as Istio's API bounds it).
pub(super) fn traffic_extension(r: &mut Reader<'_>, spec: &Value, name: &str, file: &Path) -> Option<Extension> {
    let known: Vec<&str> = TARGETING_FIELDS.iter().chain(&["wasm", "lua"]).copied().collect();
    let s = r.object_refusing(spec, "spec", &known, &REFUSED)?;
    let targeting = targeting(r, s);
    match (s.get("wasm"), s.get("lua")) {
        (Some(w), None) => {
            let w = r.object(w, "spec.wasm", &WASM_FIELDS)?;
            wasm_module(r, w, "spec.wasm", name, file, targeting).map(|w| Extension::Wasm(Box::new(w)))
        }
        (None, Some(l)) => {
            let l = r.object(l, "spec.lua", &["inlineCode"])?;
            let code = r.string(l, "spec.lua", "inlineCode").unwrap_or_default();
            if code.trim().is_empty() {
                r.error("spec.lua.inlineCode", "needs the Lua code (envoy_on_request and/or envoy_on_response)");
                return None;
            }
            if code.len() > MAX_LUA_BYTES {
                r.error(
                    "spec.lua.inlineCode",
                    format!(
                        "{} bytes, over Istio's limit of {MAX_LUA_BYTES}: use a Wasm module for larger filters",
                        code.len()
                    ),
                );
                return None;
            }
            let mut placement = targeting.placement;
            placement.chain = Some(ChainKind::Http);
            Some(Extension::Lua(Box::new(ExtensionConfigSpec {
                name: name.to_owned(),
                node_selector: targeting.node_selector,
                typed_config: json!({ "@type": LUA_TYPE, "default_source_code": { "inline_string": code } }),
                placement: Some(placement),
                wasm_fetch: None,
                rollout: None,
            })))
        }
        _ => {
            r.error("spec", "needs exactly one of wasm or lua");
            None
        }
    }
}
