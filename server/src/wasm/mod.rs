//! Wasm plugins: fetching their modules (file, HTTP, OCI) into a checked, content-addressed
//! cache, and turning a compiled config's plugins into ECDS resources. A plugin whose
//! module cannot be had keeps its previous good version; nothing else is held back.

pub mod cache;
pub mod check;
pub mod fetch;
pub mod oci;
pub mod serve;

use std::collections::HashSet;

use filterplane_config::{
    model::Delivery,
    wasm::{build_wasm_resource, WasmCode, WasmPlugin},
    CompiledConfig, CompiledResource,
};
use serde::Serialize;

use crate::{cache::Generation, wasm::fetch::WasmFetcher};

/// How Envoy gets modules by default, and where it downloads them from (remote).
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub default: Delivery,
    /// Base URL of Filterplane's admin server as Envoy reaches it, e.g. `http://127.0.0.1:18001`.
    pub module_base_url: String,
    /// The Envoy cluster that reaches `module_base_url`.
    pub module_cluster: String,
    /// The key of module paths (`serve::module_path`).
    pub module_secret: std::sync::Arc<Vec<u8>>,
}

/// What serving Wasm plugins needs: the fetcher (and its cache) and delivery settings.
#[derive(Debug, Clone)]
pub struct WasmSupport {
    pub fetcher: std::sync::Arc<WasmFetcher>,
    pub delivery: DeliverySettings,
}

/// A plugin whose new version could not be served, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginError {
    pub plugin: String,
    pub url: String,
    /// `download_failure`, `checksum_mismatch` or `invalid_module`.
    pub kind: String,
    pub message: String,
    pub file: String,
    pub line: Option<usize>,
    pub path: String,
    /// The version still served to proxies, if there was one.
    pub serving_version: Option<String>,
}

/// Fetches every plugin's module (concurrently) and adds the plugins' ECDS resources to
/// `config`. A plugin that fails keeps the resource `previous` served under its name
/// (or is left out if there was none), and is reported.
pub async fn resolve(
    config: CompiledConfig,
    fetcher: &WasmFetcher,
    delivery: &DeliverySettings,
    previous: Option<&Generation>,
) -> (CompiledConfig, Vec<PluginError>) {
    let plugins = config.wasm_plugins.clone();
    let fetched = futures_util::future::join_all(plugins.iter().map(|p| fetcher.module_in_time(p))).await;
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    let mut pinned = HashSet::new();
    for (plugin, result) in plugins.iter().zip(fetched) {
        match result {
            Ok(module) => {
                resources.push(build(plugin, &module.bytes, &module.sha256, delivery));
                pinned.insert(module.sha256);
            }
            Err(e) => {
                let kept = previous.and_then(|g| {
                    g.config.resources.iter().find(|r| r.name == plugin.name && r.selector == plugin.selector).cloned()
                });
                tracing::error!(plugin = %plugin.name, url = %plugin.url, kind = e.kind(), error = %e, kept = kept.is_some(), "Wasm module refused; the previous version keeps serving");
                errors.push(PluginError {
                    plugin: plugin.name.clone(),
                    url: plugin.url.clone(),
                    kind: e.kind().into(),
                    message: e.to_string(),
                    file: plugin.origin.file.display().to_string(),
                    line: plugin.origin.line,
                    path: format!("{}.url", plugin.origin.path),
                    serving_version: kept.as_ref().map(|r| r.version.to_string()),
                });
                if let Some(r) = kept {
                    // The module the kept version names must stay in the cache.
                    if let Some(sha) = &r.wasm_sha256 {
                        pinned.insert(sha.clone());
                    }
                    resources.push(r);
                }
            }
        }
    }
    let evicted = fetcher.cache.evict(&pinned);
    if !evicted.is_empty() {
        tracing::info!(count = evicted.len(), "evicted least recently used Wasm modules from the cache");
    }
    (config.with_resources(resources), errors)
}

fn build(plugin: &WasmPlugin, bytes: &[u8], sha256: &str, delivery: &DeliverySettings) -> CompiledResource {
    match plugin.delivery.unwrap_or(delivery.default) {
        Delivery::Inline => build_wasm_resource(plugin, WasmCode::Inline(bytes), sha256),
        Delivery::Remote => {
            let uri = format!(
                "{}{}",
                delivery.module_base_url.trim_end_matches('/'),
                serve::module_path(&delivery.module_secret, sha256)
            );
            build_wasm_resource(plugin, WasmCode::Remote { uri: &uri, cluster: &delivery.module_cluster }, sha256)
        }
    }
}
