//! The sections holding Envoy resources as they are: listeners, routes, clusters,
//! endpoints, secrets. Each entry compiles on its own (`envoy_entry`, which incremental
//! loading caches by the entry's text); the compiler then admits it against the rest.

use std::sync::Arc;

use filterplane_api::ResourceType;
use serde_json::Value;

use super::{encode, CompiledResource, Compiler, Origin, SECTIONS};
use crate::{
    error::ConfigError,
    model::{EnvoyResourceSpec, NodeSelector},
    parsed::ParsedFile,
};

/// Entry `i` of `section` (of type `rt`) of `file`, compiled on its own: everything but
/// the checks against other entries (`Compiler::admit`).
pub fn envoy_entry(
    file: &ParsedFile,
    section: &str,
    i: usize,
    rt: ResourceType,
    spec: &EnvoyResourceSpec,
) -> Result<CompiledResource, ConfigError> {
    let at = format!("{section}[{i}]");
    let origin = Origin { file: file.path.clone(), line: file.lines.line_of(&at).into(), path: at };
    let error = |sub: &str, message: String| file.error(format!("{}.{sub}", origin.path), message);
    let mut json = spec.0.clone();
    let selector = match json.remove("node_selector").map(serde_json::from_value::<NodeSelector>) {
        None => NodeSelector::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => return Err(error("node_selector", e.to_string())),
    };
    match json.get("@type") {
        Some(Value::String(t)) if t != rt.type_url() => {
            return Err(error("@type", format!("must be {} in `{section}` (or left out)", rt.type_url())));
        }
        _ => {}
    }
    json.remove("@type");
    let name = [name_key(rt), &camel(name_key(rt))]
        .iter()
        .find_map(|k| json.get(*k))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if name.trim().is_empty() {
        return Err(file.error(format!("{}.{}", origin.path, name_key(rt)), "must not be empty"));
    }
    let json = Value::Object(json);
    let (any, version) = encode(rt, &name, json.clone()).map_err(|(path, message)| {
        if path.is_empty() {
            file.error(origin.path.clone(), message)
        } else {
            error(&path, message)
        }
    })?;
    Ok(CompiledResource {
        resource_type: rt,
        name,
        selector,
        resource: any,
        inner_type_url: rt.type_url().to_owned(),
        version,
        origin,
        placement: None,
        listener_json: (rt == ResourceType::Listener).then(|| Arc::new(json)),
        wasm_sha256: None,
        envoy_fetches_code: false,
        central_wasm: None,
        central_shas: Vec::new(),
        rollout: None,
    })
}

/// The field holding an entry's name.
fn name_key(rt: ResourceType) -> &'static str {
    if rt == ResourceType::ClusterLoadAssignment {
        "cluster_name"
    } else {
        "name"
    }
}

impl Compiler<'_> {
    pub(super) fn envoy_resource(
        &mut self,
        file: &ParsedFile,
        section: &str,
        i: usize,
        rt: ResourceType,
        spec: &EnvoyResourceSpec,
    ) {
        match envoy_entry(file, section, i, rt, spec) {
            Ok(r) => self.admit(Arc::new(r)),
            Err(e) => self.errors.push(e),
        }
    }

    /// Takes an entry compiled on its own (`envoy_entry`, which refuses an empty name)
    /// into the config; whether an earlier entry already serves every proxy it selects is
    /// checked once all are in (`check_duplicates`).
    pub(super) fn admit(&mut self, r: Arc<CompiledResource>) {
        self.resources.push(r);
    }

    /// Entries of the Envoy sections that share a name: the first entry a node matches
    /// wins, so an earlier entry (in file order) with the same selector, or with none,
    /// leaves a later one unreachable. Walks the resources sorted by type and name (each
    /// name's entries in file order): one comparison per entry, no map of every name.
    pub(super) fn check_duplicates(&mut self) {
        let mut errors = Vec::new();
        let mut start = 0;
        while start < self.resources.len() {
            let end = self.run_end(start);
            self.run_errors(start..end, &mut errors);
            start = end;
        }
        self.errors.extend(errors);
    }

    /// `check_duplicates` where only the resources at `placed` are new to a config whose
    /// last version passed it: only the names they share with others can be duplicates
    /// now. Where one is, the whole check runs, so that errors come as a full load gives
    /// them.
    pub(super) fn check_duplicates_near(&mut self, placed: &[usize]) {
        let mut errors = Vec::new();
        let mut checked = 0;
        for &p in placed {
            if p < checked || p >= self.resources.len() {
                continue;
            }
            let at = &self.resources[p];
            let start = self.resources[..p]
                .iter()
                .rposition(|r| r.resource_type != at.resource_type || r.name != at.name)
                .map_or(0, |i| i + 1);
            checked = self.run_end(start);
            self.run_errors(start..checked, &mut errors);
        }
        if !errors.is_empty() {
            self.check_duplicates();
        }
    }

    /// Where the run of resources named as the one at `start` ends.
    fn run_end(&self, start: usize) -> usize {
        let rs = &self.resources;
        let first = &rs[start];
        start
            + rs[start..].iter().take_while(|r| r.resource_type == first.resource_type && r.name == first.name).count()
    }

    /// The duplicates among `run`, resources of one type and name, to `errors`.
    fn run_errors(&self, run: std::ops::Range<usize>, errors: &mut Vec<ConfigError>) {
        let run = &self.resources[run];
        let Some(first) = run.first().filter(|_| run.len() > 1) else { return };
        if first.resource_type == ResourceType::ExtensionConfig {
            return;
        }
        let kind = SECTIONS
            .iter()
            .find(|(_, rt)| *rt == first.resource_type)
            .map_or("resource", |(s, _)| s.trim_end_matches('s'));
        let mut kept: Vec<&CompiledResource> = Vec::new();
        for r in run {
            match kept.iter().find(|k| k.selector.is_empty() || k.selector == r.selector) {
                Some(k) => {
                    let message = format!(
                        "duplicate {kind} name \"{}\": the entry at {}{}: {} already matches every proxy this one selects",
                        r.name,
                        k.origin.file.display(),
                        k.origin.line.get().map(|l| format!(":{l}")).unwrap_or_default(),
                        k.origin.path
                    );
                    errors.push(self.located(&r.origin, name_key(r.resource_type), message));
                }
                None => kept.push(r),
            }
        }
    }
}

fn camel(snake: &str) -> String {
    let mut out = String::new();
    let mut up = false;
    for c in snake.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}
