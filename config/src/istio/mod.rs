//! Istio's documents as input, beside Filterplane's own: `extensions.istio.io/v1alpha1`
//! `WasmPlugin` and `TrafficExtension` (Wasm or Lua), and `networking.istio.io/v1alpha3`
//! `EnvoyFilter` (its `EXTENSION_CONFIG` patches, and `HTTP_FILTER` insertions as
//! placements). Each document becomes the Filterplane entries it means; errors name the
//! document's own paths and lines. A field Filterplane does not implement is an error that
//! names it and says why, never ignored. What Istio does with each field, and what
//! Filterplane does, is the table in docs/istio.md.

mod envoy_filter;
mod plugin;

pub use plugin::MAX_LUA_BYTES;

use std::path::Path;

use serde_json::{Map, Value};

use crate::{
    error::{ConfigError, ConfigErrors},
    lines::LineIndex,
    model::{Document, NodeSelector},
    parsed::{nesting_bound, ParsedFile},
    selector::VersionPattern,
};

const EXTENSIONS_API: &str = "extensions.istio.io/v1alpha1";
const NETWORKING_API: &str = "networking.istio.io/v1alpha3";

/// Why `targetRef(s)` is refused, wherever it appears.
const TARGET_REFS: &str = "targetRef(s) name Kubernetes Gateway, Service or GatewayClass objects, which Filterplane \
     does not have: select proxies by their labels (`selector.matchLabels`, read from node.metadata.LABELS)";

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

    /// The mapping at `path`. A key in `refused` is an error with its reason; any other key
    /// not in `known` is an error naming it.
    fn object_refusing<'v>(
        &mut self,
        v: &'v Value,
        path: &str,
        known: &[&str],
        refused: &[(&str, &str)],
    ) -> Option<&'v Map<String, Value>> {
        let Some(obj) = v.as_object() else {
            self.error(path, "expected a mapping");
            return None;
        };
        for k in obj.keys().filter(|k| !known.contains(&k.as_str())) {
            match refused.iter().find(|(r, _)| r == k) {
                Some((_, why)) => self.error(&join(path, k), *why),
                None => self.error(
                    &join(path, k),
                    format!("Filterplane does not implement this field (it reads: {})", known.join(", ")),
                ),
            }
        }
        Some(obj)
    }

    /// The mapping at `path`; every key not in `known` is an error naming it.
    fn object<'v>(&mut self, v: &'v Value, path: &str, known: &[&str]) -> Option<&'v Map<String, Value>> {
        self.object_refusing(v, path, known, &[])
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

    /// `priority` (a 32-bit integer, absent 0).
    fn priority(&mut self, obj: &Map<String, Value>, path: &str) -> i32 {
        match obj.get("priority") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_i64().and_then(|p| i32::try_from(p).ok()).unwrap_or_else(|| {
                self.error(&join(path, "priority"), "expected a 32-bit integer");
                0
            }),
        }
    }

    /// A version pattern (`match.proxy.proxyVersion`).
    fn version_pattern(&mut self, text: &str, path: &str) -> Option<VersionPattern> {
        VersionPattern::new(text).map_err(|m| self.error(path, m)).ok()
    }

    /// `selector: { matchLabels: {...} }` (WasmPlugin, TrafficExtension), as proxies' labels.
    fn workload_selector(&mut self, spec: &Map<String, Value>, key: &str, labels_key: &str) -> NodeSelector {
        let mut s = NodeSelector::default();
        let at = format!("spec.{key}");
        if let Some(sel) = spec.get(key).and_then(|v| self.object(v, &at, &[labels_key])) {
            s.labels = self.string_map(sel.get(labels_key), &format!("{at}.{labels_key}"));
        }
        s
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
    let full_name = format!("{namespace}.{name}");
    let mut out = Document { version: crate::SCHEMA_VERSION, ..Default::default() };
    let mut aliases = Vec::new();
    match (api.as_str(), kind.as_str()) {
        (EXTENSIONS_API, "WasmPlugin") => {
            if let Some(p) = plugin::wasm_plugin(&mut r, &spec, &full_name, file) {
                out.wasm_plugins.push(p);
                aliases.push(("wasm_plugins[0]".to_owned(), "spec".to_owned()));
            }
        }
        (EXTENSIONS_API, "TrafficExtension") => match plugin::traffic_extension(&mut r, &spec, &full_name, file) {
            Some(plugin::Extension::Wasm(p)) => {
                out.wasm_plugins.push(*p);
                aliases.push(("wasm_plugins[0]".to_owned(), "spec.wasm".to_owned()));
                aliases.push(("wasm_plugins[0].node_selector".to_owned(), "spec.selector".to_owned()));
                aliases.push(("wasm_plugins[0].placement".to_owned(), "spec".to_owned()));
            }
            Some(plugin::Extension::Lua(c)) => {
                out.extension_configs.push(*c);
                aliases.push(("extension_configs[0].typed_config".to_owned(), "spec.lua".to_owned()));
                aliases.push((
                    "extension_configs[0].typed_config.default_source_code".to_owned(),
                    "spec.lua.inlineCode".to_owned(),
                ));
                aliases.push(("extension_configs[0]".to_owned(), "spec".to_owned()));
            }
            None => {}
        },
        (NETWORKING_API, "EnvoyFilter") => {
            for (i, (entry, at)) in envoy_filter::envoy_filter(&mut r, &spec).into_iter().enumerate() {
                out.extension_configs.push(entry);
                aliases.push((format!("extension_configs[{i}]"), at));
            }
        }
        _ => r.error(
            "kind",
            format!("{api} {kind}: Filterplane reads {EXTENSIONS_API} WasmPlugin and TrafficExtension, and {NETWORKING_API} EnvoyFilter documents (and its own, with `version:`)"),
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

#[cfg(test)]
mod tests;
