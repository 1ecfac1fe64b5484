//! Validation and compilation: parsed documents to xDS resources, each encoded once and
//! versioned by its content.

use std::{collections::HashMap, path::PathBuf};

use filterplane_api::{
    any_from_json, content_version, envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig, Any, ResourceType,
    ResourceVersion,
};
use prost::Message;

use crate::{error::ConfigErrors, load::ParsedFile, model::NodeSelector};

/// Where a resource was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// Path of the entry inside the document, e.g. `extension_configs[2]`.
    pub path: String,
}

/// A resource ready to serve to the proxies its selector matches.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledResource {
    pub resource_type: ResourceType,
    pub name: String,
    pub selector: NodeSelector,
    /// The resource itself (e.g. a `TypedExtensionConfig`), encoded once.
    pub resource: Any,
    /// The `@type` of the config inside, for display.
    pub inner_type_url: String,
    pub version: ResourceVersion,
    pub origin: Origin,
}

/// Everything one reload produced.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledConfig {
    /// Hash of every resource version and selector: equal YAML gives equal versions.
    pub version: ResourceVersion,
    pub resources: Vec<CompiledResource>,
    pub files: Vec<PathBuf>,
}

/// Validates and compiles the documents as one config, collecting every error.
pub fn compile(files: &[ParsedFile]) -> Result<CompiledConfig, ConfigErrors> {
    let mut errors = Vec::new();
    let mut resources: Vec<CompiledResource> = Vec::new();
    let mut seen: HashMap<(ResourceType, String), Vec<(NodeSelector, Origin)>> = HashMap::new();

    for file in files {
        for (i, spec) in file.doc.extension_configs.iter().enumerate() {
            let at = format!("extension_configs[{i}]");
            let origin = Origin { file: file.path.clone(), line: file.lines.line_of(&at), path: at.clone() };
            let mut ok = true;
            if spec.name.trim().is_empty() {
                errors.push(file.error(format!("{at}.name"), "must not be empty"));
                ok = false;
            }
            let key = (ResourceType::ExtensionConfig, spec.name.clone());
            let earlier = seen.entry(key).or_default();
            // One name may have several entries for different proxies (e.g. a canary);
            // the first entry a node matches wins. An earlier entry with the same
            // selector, or with none, would make this one unreachable: say so.
            if let Some((_, first)) = earlier.iter().find(|(sel, _)| sel.is_empty() || *sel == spec.node_selector) {
                errors.push(file.error(
                    format!("{at}.name"),
                    format!(
                        "duplicate extension config name \"{}\": the entry at {}{}: {} already matches every proxy this one selects",
                        spec.name,
                        first.file.display(),
                        first.line.map(|l| format!(":{l}")).unwrap_or_default(),
                        first.path
                    ),
                ));
                ok = false;
            } else {
                earlier.push((spec.node_selector.clone(), origin.clone()));
            }
            let typed = match any_from_json(&spec.typed_config) {
                Ok(t) => t,
                Err(e) => {
                    let path = if e.path.is_empty() {
                        format!("{at}.typed_config")
                    } else {
                        format!("{at}.typed_config.{}", e.path)
                    };
                    errors.push(file.error(path, e.message));
                    continue;
                }
            };
            if !ok {
                continue;
            }
            let rt = ResourceType::ExtensionConfig;
            let version = content_version([
                rt.type_url().as_bytes(),
                spec.name.as_bytes(),
                typed.any.type_url.as_bytes(),
                typed.canonical_json.as_bytes(),
            ]);
            let inner_type_url = typed.any.type_url.clone();
            let tec = TypedExtensionConfig { name: spec.name.clone(), typed_config: Some(typed.any) };
            resources.push(CompiledResource {
                resource_type: rt,
                name: spec.name.clone(),
                selector: spec.node_selector.clone(),
                resource: Any { type_url: rt.type_url().to_owned(), value: tec.encode_to_vec() },
                inner_type_url,
                version,
                origin,
            });
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    // Stable: entries of the same name keep their file order, which decides which one
    // a node that matches several gets.
    resources.sort_by(|a, b| (a.resource_type, &a.name).cmp(&(b.resource_type, &b.name)));
    let described: Vec<String> = resources
        .iter()
        .map(|r| format!("{}\0{}\0{}\0{:?}", r.resource_type.type_url(), r.name, r.version, r.selector))
        .collect();
    Ok(CompiledConfig {
        version: content_version(described.iter().map(|s| s.as_bytes())),
        resources,
        files: files.iter().map(|f| f.path.clone()).collect(),
    })
}
