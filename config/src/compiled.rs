//! What compiling produces: resources ready to serve, Wasm plugins waiting for their
//! modules, and the config they make up. A leaf: the compiler writes these, the Wasm
//! builder adds to them, the server serves them.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use filterplane_api::{content_version, Any, ResourceType, ResourceVersion};
use serde_json::Value;

pub use crate::line_table::Line;
use crate::{
    model::{Delivery, FailStrategy, NodeSelector, PluginType, PullPolicy, PullSecret},
    placement::Placement,
    sources::ModuleSource,
};

/// Where a resource was written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    pub file: PathBuf,
    /// Its first line (`Line::get`), which moves with the file's lines.
    pub line: Line,
    /// Path of the entry inside the document, e.g. `extension_configs[2]`.
    pub path: String,
}

/// A resource ready to serve to the proxies its selector matches.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledResource {
    pub resource_type: ResourceType,
    pub name: String,
    pub selector: NodeSelector,
    /// The resource itself (a `TypedExtensionConfig`, a `Listener`, ...), encoded once.
    pub resource: Any,
    /// For extension configs, the `@type` of the config inside; else the resource's.
    pub inner_type_url: String,
    pub version: ResourceVersion,
    pub origin: Origin,
    /// Extension configs: where their filter goes in the served listeners.
    pub placement: Option<Arc<Placement>>,
    /// Listeners: the listener as written, to place filters into per group of proxies.
    pub listener_json: Option<Arc<Value>>,
    /// Wasm plugins: the SHA-256 of the module this version serves.
    pub wasm_sha256: Option<String>,
    /// Envoy downloads this resource's Wasm code itself (remote delivery). Such a config
    /// asks Envoy to NACK while the code is not in its cache yet and to fetch it in the
    /// background (`nack_on_code_cache_miss`), so the server sends it again after a NACK.
    pub envoy_fetches_code: bool,
    /// Extension configs with Envoy-native Wasm code Filterplane fetches (see
    /// `central`): the server fetches the modules and rewrites the code before serving.
    pub central_wasm: Option<Arc<crate::central::CentralWasm>>,
    /// Once the server fetched them: the SHA-256 of each module `central_wasm` named
    /// (kept in the module cache while served).
    pub central_shas: Vec<String>,
    /// Extension configs and Wasm plugins: how a new version rolls out (`None`: at once).
    pub rollout: Option<crate::model::RolloutSpec>,
}

/// Everything one reload produced.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledConfig {
    /// Hash of every resource version, selector and placement: equal YAML gives equal
    /// versions.
    pub version: ResourceVersion,
    /// Shared with the incremental loader's cache and the generations that serve them:
    /// a reload that changes one entry allocates one.
    pub resources: Vec<Arc<CompiledResource>>,
    /// Wasm plugins, whose ECDS resources the server adds (`with_resources`) once their
    /// modules are fetched and checked.
    pub wasm_plugins: Vec<Arc<WasmPlugin>>,
    pub files: Vec<PathBuf>,
    /// The config's default verification for modules Filterplane fetches
    /// (`wasm_verification`), for Envoy-native Wasm configs' code.
    pub wasm_verification: Option<Arc<Verification>>,
    /// What `validate`, the API and the page say about a valid config: each names the
    /// entry's file, line and path (an Istio document placed in no served listener).
    pub notices: Vec<crate::ConfigError>,
}

impl CompiledConfig {
    /// Whether serving it needs Wasm modules fetched: plugins, or extension configs whose
    /// code Filterplane fetches.
    pub fn fetches_wasm(&self) -> bool {
        !self.wasm_plugins.is_empty() || self.resources.iter().any(|r| r.central_wasm.is_some())
    }

    /// This config with `extra` resources (built Wasm plugins) added in their places,
    /// version recomputed. `resources` are in serving order (by type and name, each
    /// name's entries in file order), as the compiler leaves them; `extra` come after
    /// them in file order.
    pub fn with_resources(mut self, extra: Vec<Arc<CompiledResource>>) -> Self {
        if !extra.is_empty() {
            let mut all = self.resources.clone();
            all.extend(extra);
            self.resources = crate::order::serving_order(all, &self.resources, None).resources;
        }
        let summaries: Vec<Summary> = self.resources.iter().map(|r| Summary::of(r)).collect();
        self.version = self.version_of(&summaries);
        self
    }

    /// The config's version, from its resources' `summaries` (in the same order): each
    /// resource's version (which hashes its type and name with its content); its
    /// selector, placement and rollout only where it has one (most have none: neither
    /// text is made for them nor are they read).
    pub(crate) fn version_of(&self, summaries: &[Summary]) -> ResourceVersion {
        let described = |d: &dyn std::fmt::Debug| format!("{d:?}");
        let extras: Vec<[String; 4]> =
            summaries
                .iter()
                .zip(&self.resources)
                .filter(|(s, _)| s.extras)
                .map(|(_, r)| {
                    let at = format!("{}\0{}", r.resource_type.type_url(), r.name);
                    [at, described(&r.selector), described(&r.placement), described(&r.rollout)]
                })
                .chain(self.wasm_plugins.iter().map(|w| {
                    [format!("wasm\0{}", w.name), described(&w.selector), described(&w.rollout), String::new()]
                }))
                .collect();
        // The versions as one part (each 16 bytes: no ambiguity), hashed in one go.
        let mut versions = Vec::with_capacity(summaries.len() * 16);
        for s in summaries {
            versions.extend_from_slice(s.version.as_str().as_bytes());
        }
        let parts =
            std::iter::once(versions.as_slice()).chain(extras.iter().flat_map(|e| e.iter().map(|s| s.as_bytes())));
        content_version(parts)
    }
}

/// What the checks across a config and its version read of each resource, kept beside
/// the resources in their order by the incremental loader: a reload that changed a few
/// of 100,000 reads those few, not every resource's memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub version: ResourceVersion,
    /// It has a selector, a placement or a rollout (they go into the config's version).
    pub extras: bool,
    pub placement: bool,
    /// A listener as written (`listener_json`), which placements go into.
    pub listener: bool,
}

impl Summary {
    pub fn of(r: &CompiledResource) -> Self {
        Self {
            version: r.version,
            extras: !r.selector.is_empty() || r.placement.is_some() || r.rollout.is_some(),
            placement: r.placement.is_some(),
            listener: r.listener_json.is_some(),
        }
    }
}

/// A checked Wasm plugin, waiting for its module.
#[derive(Debug, Clone, PartialEq)]
pub struct WasmPlugin {
    pub name: String,
    pub selector: NodeSelector,
    pub url: String,
    pub source: ModuleSource,
    pub sha256: Option<String>,
    pub pull_policy: PullPolicy,
    pub pull_secret: Option<PullSecret>,
    /// The plugin configuration as canonical JSON text.
    pub plugin_config: Option<String>,
    pub root_id: String,
    pub env: BTreeMap<String, String>,
    pub host_env: Vec<String>,
    pub fail_strategy: FailStrategy,
    pub plugin_type: PluginType,
    pub delivery: Option<Delivery>,
    pub placement: Option<Arc<Placement>>,
    pub origin: Origin,
    /// How a new version rolls out (`None`: at once).
    pub rollout: Option<crate::model::RolloutSpec>,
    /// Who may have signed the module (`None`: nobody is asked).
    pub verification: Option<Arc<Verification>>,
}

/// Trusted keys for a module's signature, read from the config.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Verification {
    /// (name as the config gives it: a path, or `inline`; the PEM text).
    pub keys: Vec<(String, String)>,
    /// A module without a valid signature by one of the keys is refused.
    pub require: bool,
    /// Where the detached signature of an http(s) or file module is (default: `URL.sig`).
    pub signature_url: Option<String>,
}
