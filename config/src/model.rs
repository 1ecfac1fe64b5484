//! The YAML schema, one serde type per YAML mapping. Checked domain types come from
//! `compile`; nothing here is trusted yet.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The schema version this build reads. A file must say `version: 1`.
pub const SCHEMA_VERSION: u32 = 1;

/// One config file. A directory holds several, merged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Schema version, so a future Filterplane can tell old files from new ones.
    pub version: u32,
    #[serde(default)]
    pub extension_configs: Vec<ExtensionConfigSpec>,
}

/// A `TypedExtensionConfig` served over ECDS under `name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionConfigSpec {
    /// The ECDS resource name, as the filter's `config_discovery` asks for it.
    pub name: String,
    /// Which proxies get this entry; absent means all.
    #[serde(default)]
    pub node_selector: NodeSelector,
    /// Any Envoy message, written as Envoy's own YAML/JSON writes it, with `"@type"`.
    /// Kept as JSON until the descriptors check it, so errors can point inside it.
    pub typed_config: serde_json::Value,
}

/// Matches Envoy nodes. Every criterion given must hold; a list matches if any item does.
/// Strings may use `*` as a wildcard (`edge-*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSelector {
    /// `node.id` values.
    #[serde(default)]
    pub ids: Vec<String>,
    /// `node.cluster` values.
    #[serde(default)]
    pub clusters: Vec<String>,
    /// Top-level keys of `node.metadata` and the value each must have (strings, numbers
    /// and booleans are compared by their text).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub locality: LocalitySelector,
}

/// `node.locality` fields; each one given must be equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalitySelector {
    pub region: Option<String>,
    pub zone: Option<String>,
    pub sub_zone: Option<String>,
}
