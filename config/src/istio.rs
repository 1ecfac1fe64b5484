//! Istio's documents as input, beside Filterplane's own: `extensions.istio.io/v1alpha1`
//! `WasmPlugin` and `networking.istio.io/v1alpha3` `EnvoyFilter` (its `EXTENSION_CONFIG`
//! patches, and `HTTP_FILTER` insertions as placements). Each document becomes the
//! Filterplane entries it means; errors name the document's own paths and lines. A field
//! Filterplane does not implement is an error that names it, never ignored.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{
    error::{ConfigError, ConfigErrors},
    lines::LineIndex,
    model::{
        Document, ExtensionConfigSpec, FailStrategy, Phase, PlacementSpec, PluginType, PullPolicy, PullSecret,
        WasmPluginSpec, WasmVmConfig,
    },
    parsed::{nesting_bound, ParsedFile},
};

const WASM_PLUGIN_API: &str = "extensions.istio.io/v1alpha1";
const ENVOY_FILTER_API: &str = "networking.istio.io/v1alpha3";

/// Whether a YAML document is a Kubernetes-style one (`apiVersion:` at the top level).
pub fn is_istio(doc: &str) -> bool {
    doc.lines().any(|l| l.starts_with("apiVersion:") || l.starts_with("\"apiVersion\":"))
}

/// Collects errors with the document's own paths.
struct Reader<'a> {
    file: &'a Path,
    lines: &'a LineIndex,
    errors: Vec<ConfigError>,
}

impl Reader<'_> {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: self.lines.line_of(path),
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// The mapping at `path`; every key not in `known` is an error naming it.
    fn object<'v>(&mut self, v: &'v Value, path: &str, known: &[&str]) -> Option<&'v Map<String, Value>> {
        let Some(obj) = v.as_object() else {
            self.error(path, "expected a mapping");
            return None;
        };
        for k in obj.keys().filter(|k| !known.contains(&k.as_str())) {
            self.error(
                &join(path, k),
                format!("Filterplane does not implement this field (it reads: {})", known.join(", ")),
            );
        }
        Some(obj)
    }

    fn string(&mut self, obj: &Map<String, Value>, path: &str, key: &str) -> Option<String> {
        match obj.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.error(&join(path, key), "expected a string");
                None
            }
        }
    }

    fn string_map(&mut self, v: Option<&Value>, path: &str) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        let Some(v) = v else { return out };
        let Some(obj) = v.as_object() else {
            self.error(path, "expected a mapping of strings");
            return out;
        };
        for (k, v) in obj {
            match v {
                Value::String(s) => {
                    out.insert(k.clone(), s.clone());
                }
                _ => self.error(&join(path, k), "expected a string"),
            }
        }
        out
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Reads one Istio document of `file` as the Filterplane entries it means.
pub fn parse(file: &Path, text: &str) -> Result<ParsedFile, ConfigErrors> {
    let err = |line: Option<usize>, path: &str, message: String| {
        ConfigErrors(vec![ConfigError { file: file.to_path_buf(), line, path: path.to_owned(), message }])
    };
    if let Err(line) = nesting_bound(text) {
        return Err(err(Some(line), "", "nested too deep; refused unparsed".into()));
    }
    let mut lines = LineIndex::build(text);
    if let Some((path, line)) = &lines.duplicate {
        return Err(err(Some(*line), path, "duplicate key (the later one would silently replace the earlier)".into()));
    }
    let doc: Value = serde_yaml::from_str(text).map_err(|e| {
        let mut message = e.to_string();
        if let Some(i) = message.find(" at line ") {
            message.truncate(i);
        }
        err(e.location().map(|l| l.line()), "", message)
    })?;
    let mut r = Reader { file, lines: &lines, errors: Vec::new() };
    let Some(top) = r.object(&doc, "", &["apiVersion", "kind", "metadata", "spec"]) else {
        return Err(ConfigErrors(r.errors));
    };
    let api = top.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_owned();
    let kind = top.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
    let (name, namespace) = match top
        .get("metadata")
        .and_then(|m| r.object(m, "metadata", &["name", "namespace", "labels", "annotations"]))
    {
        Some(m) => {
            let name = r.string(m, "metadata", "name");
            let namespace = r.string(m, "metadata", "namespace").unwrap_or_else(|| "default".into());
            (name, namespace)
        }
        None => (None, "default".into()),
    };
    let Some(name) = name else {
        r.error("metadata", "needs metadata.name");
        return Err(ConfigErrors(r.errors));
    };
    let spec = top.get("spec").cloned().unwrap_or(Value::Object(Map::new()));
    let mut out = Document { version: crate::SCHEMA_VERSION, ..Default::default() };
    let mut aliases = Vec::new();
    match (api.as_str(), kind.as_str()) {
        (WASM_PLUGIN_API, "WasmPlugin") => {
            if let Some(p) = wasm_plugin(&mut r, &spec, &format!("{namespace}.{name}"), file) {
                out.wasm_plugins.push(p);
                aliases.push(("wasm_plugins[0]".to_owned(), "spec".to_owned()));
            }
        }
        (ENVOY_FILTER_API, "EnvoyFilter") => {
            for (i, (entry, at)) in envoy_filter(&mut r, &spec).into_iter().enumerate() {
                out.extension_configs.push(entry);
                aliases.push((format!("extension_configs[{i}]"), at));
            }
        }
        _ => r.error(
            "kind",
            format!("{api} {kind}: Filterplane reads {WASM_PLUGIN_API} WasmPlugin and {ENVOY_FILTER_API} EnvoyFilter documents (and its own, with `version:`)"),
        ),
    }
    if !r.errors.is_empty() {
        return Err(ConfigErrors(r.errors));
    }
    for (from, to) in aliases {
        lines.alias(from, to);
    }
    Ok(ParsedFile { path: file.to_path_buf(), doc: out, lines, span: 1..text.lines().count() + 2 })
}

fn wasm_plugin(r: &mut Reader<'_>, spec: &Value, name: &str, file: &Path) -> Option<WasmPluginSpec> {
    let known = [
        "selector",
        "url",
        "sha256",
        "imagePullPolicy",
        "imagePullSecret",
        "pluginConfig",
        "pluginName",
        "phase",
        "priority",
        "match",
        "vmConfig",
        "type",
        "failStrategy",
    ];
    let s = r.object(spec, "spec", &known)?;
    let mut node_selector = crate::model::NodeSelector::default();
    if let Some(sel) = s.get("selector").and_then(|v| r.object(v, "spec.selector", &["matchLabels"])) {
        node_selector.labels = r.string_map(sel.get("matchLabels"), "spec.selector.matchLabels");
    }
    let Some(url) = r.string(s, "spec", "url") else {
        r.error("spec", "needs spec.url");
        return None;
    };
    let image_pull_policy = match r.string(s, "spec", "imagePullPolicy").as_deref() {
        None | Some("UNSPECIFIED_POLICY") => None,
        Some("IfNotPresent") => Some(PullPolicy::IfNotPresent),
        Some("Always") => Some(PullPolicy::Always),
        Some(other) => {
            r.error("spec.imagePullPolicy", format!("{other:?}: IfNotPresent or Always"));
            None
        }
    };
    // Istio names a Kubernetes Secret; here it is a file holding one (or a Docker
    // config.json), relative to the document's directory.
    let image_pull_secret = r.string(s, "spec", "imagePullSecret").map(|p| {
        let path = std::path::PathBuf::from(&p);
        let base = file.parent().unwrap_or(Path::new("."));
        PullSecret::File(if path.is_absolute() { path } else { base.join(path) })
    });
    let phase = match r.string(s, "spec", "phase").as_deref() {
        None | Some("UNSPECIFIED_PHASE") => Phase::Unspecified,
        Some("AUTHN") => Phase::Authn,
        Some("AUTHZ") => Phase::Authz,
        Some("STATS") => Phase::Stats,
        Some(other) => {
            r.error("spec.phase", format!("{other:?}: AUTHN, AUTHZ, STATS or UNSPECIFIED_PHASE"));
            Phase::Unspecified
        }
    };
    let priority = match s.get("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_i64().and_then(|p| i32::try_from(p).ok()) {
            Some(p) => p,
            None => {
                r.error("spec.priority", "expected a 32-bit integer");
                0
            }
        },
    };
    let mut ports = Vec::new();
    if let Some(m) = s.get("match") {
        match m.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    let at = format!("spec.match[{i}]");
                    let Some(sel) = r.object(item, &at, &["mode", "ports"]) else { continue };
                    match r.string(sel, &at, "mode").as_deref() {
                        None | Some("UNDEFINED") | Some("CLIENT_AND_SERVER") => {}
                        Some(other) => r.error(
                            &format!("{at}.mode"),
                            format!("{other:?}: Filterplane's listeners have no client or server side; leave mode out"),
                        ),
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
    let mut vm_config = WasmVmConfig::default();
    if let Some(vm) = s.get("vmConfig").and_then(|v| r.object(v, "spec.vmConfig", &["env"])) {
        for (i, e) in vm.get("env").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let at = format!("spec.vmConfig.env[{i}]");
            let Some(e) = r.object(e, &at, &["name", "value", "valueFrom"]) else { continue };
            let Some(key) = r.string(e, &at, "name") else {
                r.error(&at, "needs name");
                continue;
            };
            match r.string(e, &at, "valueFrom").as_deref() {
                None | Some("INLINE") => {
                    let value = r.string(e, &at, "value").unwrap_or_default();
                    vm_config.env.insert(key, value);
                }
                Some("HOST") => vm_config.host_env.push(key),
                Some(other) => r.error(&format!("{at}.valueFrom"), format!("{other:?}: INLINE or HOST")),
            }
        }
    }
    let plugin_type = match r.string(s, "spec", "type").as_deref() {
        None | Some("UNSPECIFIED_PLUGIN_TYPE") | Some("HTTP") => PluginType::Http,
        Some("NETWORK") => PluginType::Network,
        Some(other) => {
            r.error("spec.type", format!("{other:?}: HTTP or NETWORK"));
            PluginType::Http
        }
    };
    let fail_strategy = match r.string(s, "spec", "failStrategy").as_deref() {
        None | Some("FAIL_CLOSE") => FailStrategy::FailClose,
        Some("FAIL_OPEN") => FailStrategy::FailOpen,
        Some("FAIL_RELOAD") => FailStrategy::FailReload,
        Some(other) => {
            r.error("spec.failStrategy", format!("{other:?}: FAIL_CLOSE, FAIL_OPEN or FAIL_RELOAD"));
            FailStrategy::FailClose
        }
    };
    Some(WasmPluginSpec {
        name: name.to_owned(),
        node_selector,
        url,
        sha256: r.string(s, "spec", "sha256"),
        image_pull_policy,
        image_pull_secret,
        plugin_config: s.get("pluginConfig").cloned(),
        root_id: r.string(s, "spec", "pluginName").unwrap_or_default(),
        vm_config,
        fail_strategy,
        plugin_type,
        delivery: None,
        rollout: None,
        // As Istio does, every WasmPlugin goes into the listeners (those Filterplane
        // serves), by phase and priority.
        placement: Some(PlacementSpec {
            chain: None,
            listeners: Vec::new(),
            ports,
            route_configs: Vec::new(),
            phase,
            priority,
            default_config: None,
            apply_default_config_without_warming: false,
        }),
    })
}

/// The extension configs of an EnvoyFilter, each with the path it came from.
fn envoy_filter(r: &mut Reader<'_>, spec: &Value) -> Vec<(ExtensionConfigSpec, String)> {
    let Some(s) = r.object(spec, "spec", &["workloadSelector", "configPatches"]) else { return Vec::new() };
    let mut node_selector = crate::model::NodeSelector::default();
    if let Some(sel) = s.get("workloadSelector").and_then(|v| r.object(v, "spec.workloadSelector", &["labels"])) {
        node_selector.labels = r.string_map(sel.get("labels"), "spec.workloadSelector.labels");
    }
    let patches = s.get("configPatches").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut configs: Vec<(ExtensionConfigSpec, String)> = Vec::new();
    // HTTP filter insertions: (filter name, placement, path).
    let mut inserts: Vec<(String, PlacementSpec, String)> = Vec::new();
    for (i, patch) in patches.iter().enumerate() {
        let at = format!("spec.configPatches[{i}]");
        let Some(p) = r.object(patch, &at, &["applyTo", "match", "patch"]) else { continue };
        let apply_to = r.string(p, &at, "applyTo").unwrap_or_default();
        let Some(body) = p.get("patch").and_then(|b| r.object(b, &format!("{at}.patch"), &["operation", "value"]))
        else {
            r.error(&at, "needs patch");
            continue;
        };
        let operation = r.string(body, &format!("{at}.patch"), "operation").unwrap_or_default();
        let value_at = format!("{at}.patch.value");
        let Some(value) = body.get("value") else {
            r.error(&format!("{at}.patch"), "needs value");
            continue;
        };
        match apply_to.as_str() {
            "EXTENSION_CONFIG" => {
                if p.contains_key("match") {
                    r.error(&format!("{at}.match"), "EXTENSION_CONFIG patches match nothing; leave match out");
                }
                if operation != "ADD" {
                    r.error(&format!("{at}.patch.operation"), "EXTENSION_CONFIG patches are ADD");
                }
                let Some(v) = r.object(value, &value_at, &["name", "typed_config"]) else { continue };
                let (Some(name), Some(typed_config)) = (r.string(v, &value_at, "name"), v.get("typed_config")) else {
                    r.error(&value_at, "needs name and typed_config");
                    continue;
                };
                configs.push((
                    ExtensionConfigSpec {
                        name,
                        node_selector: node_selector.clone(),
                        typed_config: typed_config.clone(),
                        placement: None,
                        wasm_fetch: None,
                        rollout: None,
                    },
                    value_at,
                ));
            }
            "HTTP_FILTER" => {
                let placement = http_filter_placement(r, p, &at, &operation);
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
                            node_selector: node_selector.clone(),
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
                        inserts.push((name, placement, value_at));
                    }
                    _ => r.error(&value_at, "needs typed_config or config_discovery (one of them)"),
                }
            }
            other => r.error(
                &format!("{at}.applyTo"),
                format!("{other:?}: Filterplane implements EXTENSION_CONFIG and HTTP_FILTER (insertions)"),
            ),
        }
    }
    for (name, placement, at) in inserts {
        match configs.iter_mut().find(|(c, _)| c.name == name) {
            Some((c, _)) => c.placement = Some(placement),
            None => r.error(
                &format!("{at}.name"),
                format!("no EXTENSION_CONFIG patch named {name:?} in this EnvoyFilter to discover"),
            ),
        }
    }
    configs
}

/// Where an `HTTP_FILTER` insertion goes, as a placement: `INSERT_FIRST` is the front of
/// the chain (phase AUTHN), `INSERT_BEFORE` the router is its end (just before the
/// router); ports from `match.listener.portNumber`.
fn http_filter_placement(
    r: &mut Reader<'_>,
    p: &Map<String, Value>,
    at: &str,
    operation: &str,
) -> Option<PlacementSpec> {
    let mut ports = Vec::new();
    let mut before_router = false;
    if let Some(m) = p.get("match").and_then(|m| r.object(m, &format!("{at}.match"), &["context", "listener"])) {
        match r.string(m, &format!("{at}.match"), "context").as_deref() {
            None | Some("ANY") | Some("GATEWAY") => {}
            Some(other) => r.error(
                &format!("{at}.match.context"),
                format!("{other:?}: Filterplane serves gateways' listeners; use ANY or GATEWAY"),
            ),
        }
        let lat = format!("{at}.match.listener");
        if let Some(l) = m.get("listener").and_then(|l| r.object(l, &lat, &["portNumber", "filterChain"])) {
            if let Some(n) = l.get("portNumber") {
                match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
                    Some(n) => ports.push(n),
                    None => r.error(&format!("{lat}.portNumber"), "expected a port number"),
                }
            }
            let fat = format!("{lat}.filterChain");
            if let Some(fc) = l.get("filterChain").and_then(|f| r.object(f, &fat, &["filter"])) {
                if let Some(f) =
                    fc.get("filter").and_then(|f| r.object(f, &format!("{fat}.filter"), &["name", "subFilter"]))
                {
                    let hcm = r.string(f, &format!("{fat}.filter"), "name");
                    if hcm.as_deref().is_some_and(|n| n != "envoy.filters.network.http_connection_manager") {
                        r.error(
                            &format!("{fat}.filter.name"),
                            "HTTP filters go in envoy.filters.network.http_connection_manager",
                        );
                    }
                    if let Some(sf) =
                        f.get("subFilter").and_then(|s| r.object(s, &format!("{fat}.filter.subFilter"), &["name"]))
                    {
                        before_router = r.string(sf, &format!("{fat}.filter.subFilter"), "name").as_deref()
                            == Some("envoy.filters.http.router");
                    }
                }
            }
        }
    }
    let phase = match operation {
        "INSERT_FIRST" => Phase::Authn,
        "INSERT_BEFORE" if before_router => Phase::Unspecified,
        _ => {
            r.error(
                &format!("{at}.patch.operation"),
                format!("{operation:?}: Filterplane places filters by phase: INSERT_FIRST (the front of the chain) or INSERT_BEFORE the subFilter envoy.filters.http.router (just before it)"),
            );
            return None;
        }
    };
    Some(PlacementSpec {
        chain: Some(crate::model::ChainKind::Http),
        listeners: Vec::new(),
        ports,
        route_configs: Vec::new(),
        phase,
        priority: 0,
        default_config: None,
        apply_default_config_without_warming: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<ParsedFile, ConfigErrors> {
        parse(Path::new("/cfg/istio.yaml"), text)
    }

    #[test]
    fn a_wasm_plugin_becomes_a_placed_plugin_named_namespace_dot_name() {
        let p = read(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: auth\n  namespace: edge\nspec:\n  selector:\n    matchLabels: { app: gw }\n  url: oci://r/p:v1\n  imagePullSecret: pull.yaml\n  phase: AUTHN\n  priority: 10\n  match:\n    - ports: [ { number: 8080 } ]\n  pluginName: root\n  pluginConfig: { a: 1 }\n  vmConfig:\n    env:\n      - { name: A, value: b }\n      - { name: HOME, valueFrom: HOST }\n  failStrategy: FAIL_RELOAD\n",
        )
        .unwrap();
        let w = &p.doc.wasm_plugins[0];
        assert_eq!(w.name, "edge.auth");
        assert_eq!(w.node_selector.labels["app"], "gw");
        assert_eq!(w.root_id, "root");
        assert_eq!(w.fail_strategy, FailStrategy::FailReload);
        assert_eq!(w.vm_config.env["A"], "b");
        assert_eq!(w.vm_config.host_env, ["HOME"]);
        assert_eq!(w.image_pull_secret, Some(PullSecret::File("/cfg/pull.yaml".into())));
        let placement = w.placement.as_ref().unwrap();
        assert_eq!((placement.phase, placement.priority, placement.ports.clone()), (Phase::Authn, 10, vec![8080]));
        assert_eq!(p.lines.original_path("wasm_plugins[0].url"), "spec.url");
        assert_eq!(p.lines.line_of("wasm_plugins[0].url"), Some(9));
    }

    #[test]
    fn fields_not_implemented_are_named() {
        let e = read("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: { name: x }\nspec:\n  url: oci://r/p\n  targetRefs: []\n  match: [ { mode: CLIENT } ]\n")
            .unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["spec.targetRefs", "spec.match[0].mode"], "{e}");
        assert_eq!(e.0[0].line, Some(6));
        let e = read("apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: { name: x }\nspec:\n  configPatches:\n    - applyTo: CLUSTER\n      patch: { operation: ADD, value: {} }\n").unwrap_err();
        assert_eq!(e.0[0].path, "spec.configPatches[0].applyTo");
        let e = read("apiVersion: v1\nkind: Secret\nmetadata: { name: x }\n").unwrap_err();
        assert!(e.0[0].message.contains("WasmPlugin"), "{e}");
    }

    #[test]
    fn an_envoy_filter_serves_its_extension_configs_placed_by_its_insertions() {
        let p = read(
            r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: { name: hm, namespace: istio-system }
spec:
  workloadSelector: { labels: { istio: ingressgateway } }
  configPatches:
    - applyTo: EXTENSION_CONFIG
      patch:
        operation: ADD
        value:
          name: stamp
          typed_config: { "@type": type.googleapis.com/google.protobuf.Struct, value: {} }
    - applyTo: HTTP_FILTER
      match:
        context: GATEWAY
        listener:
          portNumber: 8080
          filterChain: { filter: { name: envoy.filters.network.http_connection_manager, subFilter: { name: envoy.filters.http.router } } }
      patch:
        operation: INSERT_BEFORE
        value: { name: stamp, config_discovery: { config_source: { ads: {} }, type_urls: [ x ] } }
"#,
        )
        .unwrap();
        let c = &p.doc.extension_configs[0];
        assert_eq!(c.name, "stamp");
        assert_eq!(c.node_selector.labels["istio"], "ingressgateway");
        let placement = c.placement.as_ref().unwrap();
        assert_eq!((placement.phase, placement.ports.clone()), (Phase::Unspecified, vec![8080]));
        assert_eq!(
            p.lines.original_path("extension_configs[0].typed_config"),
            "spec.configPatches[0].patch.value.typed_config"
        );
    }
}
