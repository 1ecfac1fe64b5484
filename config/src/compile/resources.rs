//! The sections holding Envoy resources as Envoy writes them: listeners, routes,
//! clusters, endpoints.

use std::sync::Arc;

use filterplane_api::ResourceType;
use serde_json::Value;

use super::{encode, CompiledResource, Compiler, Origin};
use crate::{
    model::{EnvoyResourceSpec, NodeSelector},
    parsed::ParsedFile,
};

impl Compiler<'_> {
    pub(super) fn envoy_resource(
        &mut self,
        file: &ParsedFile,
        section: &str,
        i: usize,
        rt: ResourceType,
        spec: &EnvoyResourceSpec,
    ) {
        let at = format!("{section}[{i}]");
        let origin = Origin { file: file.path.clone(), line: file.lines.line_of(&at), path: at };
        let mut json = spec.0.clone();
        let selector = match json.remove("node_selector").map(serde_json::from_value::<NodeSelector>) {
            None => NodeSelector::default(),
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                self.error_at(&origin, "node_selector", e.to_string());
                return;
            }
        };
        match json.get("@type") {
            Some(Value::String(t)) if t != rt.type_url() => {
                self.error_at(&origin, "@type", format!("must be {} in `{section}` (or left out)", rt.type_url()));
                return;
            }
            _ => {}
        }
        json.remove("@type");
        let name_key = if rt == ResourceType::ClusterLoadAssignment { "cluster_name" } else { "name" };
        let name = [name_key, &camel(name_key)]
            .iter()
            .find_map(|k| json.get(*k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let json = Value::Object(json);
        let (any, version) = match encode(rt, &name, json.clone()) {
            Ok(v) => v,
            Err((path, message)) => {
                self.error_at(&origin, &path, message);
                return;
            }
        };
        if !self.register(rt, section.trim_end_matches('s'), name_key, &name, &selector, &origin) {
            return;
        }
        self.resources.push(CompiledResource {
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
        });
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
