//! Wasm plugins: fetching their modules (file, HTTP, OCI) into a checked, content-addressed
//! cache, and turning a compiled config's plugins into ECDS resources. A plugin whose
//! module cannot be had keeps its previous good version; nothing else is held back.

#![deny(clippy::unwrap_used)]

pub mod cache;
pub mod check;
pub mod creds;
pub mod download;
pub mod fetch;
pub mod guard;
pub mod metrics;
pub mod oci;
pub mod sign;

use std::collections::HashSet;

use filterplane_api::ResourceType;
use filterplane_config::NodeSelector;
use filterplane_config::{
    model::Delivery,
    wasm::{build_wasm_resource, WasmCode, WasmPlugin},
    CompiledConfig, CompiledResource,
};
use serde::Serialize;

use crate::fetch::WasmFetcher;

/// The key in the path Envoy fetches the module with this SHA-256 from (remote
/// delivery): an HMAC-SHA256 of it under the server's secret, so nobody can fetch a
/// module by guessing.
pub fn module_key(secret: &[u8], sha256: &str) -> String {
    filterplane_api::hmac_sha256_hex(secret, sha256.as_bytes())
}

/// The path Envoy fetches the module with this SHA-256 from.
pub fn module_path(secret: &[u8], sha256: &str) -> String {
    format!("/modules/{}", module_key(secret, sha256))
}

/// How Envoy gets modules by default, and where it downloads them from (remote).
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub default: Delivery,
    /// Base URL of Filterplane's admin server as Envoy reaches it, e.g. `http://127.0.0.1:18001`.
    pub module_base_url: String,
    /// The Envoy cluster that reaches `module_base_url`.
    pub module_cluster: String,
    /// The key of module paths (`module_path`).
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
    /// `download_failure`, `checksum_mismatch`, `invalid_module`, `signature_missing`,
    /// `signature_invalid` or `signature_untrusted_key`.
    pub kind: String,
    pub message: String,
    pub file: String,
    pub line: Option<usize>,
    pub path: String,
    /// The version still served to proxies, if there was one.
    pub serving_version: Option<String>,
}

impl PluginError {
    fn new(
        name: &str,
        url: &str,
        e: &fetch::FetchError,
        origin: &filterplane_config::compile::Origin,
        path: String,
        kept: Option<&CompiledResource>,
    ) -> Self {
        PluginError {
            plugin: name.to_owned(),
            url: url.to_owned(),
            kind: e.kind().into(),
            message: e.to_string(),
            file: origin.file.display().to_string(),
            line: origin.line.get(),
            path,
            serving_version: kept.map(|r| r.version.to_string()),
        }
    }
}

/// The ECDS resource served before under this name and selector, kept when its new
/// version cannot be had.
fn kept_version(
    previous: Option<&CompiledConfig>,
    name: &str,
    selector: &NodeSelector,
) -> Option<std::sync::Arc<CompiledResource>> {
    previous?
        .resources
        .iter()
        .find(|r| r.resource_type == ResourceType::ExtensionConfig && r.name == name && &r.selector == selector)
        .cloned()
}

/// Fetches every plugin's module (concurrently) and adds the plugins' ECDS resources to
/// `config`. A plugin that fails keeps the resource `previous` served under its name
/// (or is left out if there was none), and is reported.
pub async fn resolve(
    config: CompiledConfig,
    fetcher: &WasmFetcher,
    delivery: &DeliverySettings,
    previous: Option<&CompiledConfig>,
    also_pinned: Vec<String>,
) -> (CompiledConfig, Vec<PluginError>) {
    let (config, mut errors, mut pinned) = resolve_central(config, fetcher, delivery, previous).await;
    pinned.extend(also_pinned);
    let (config, plugin_errors) = resolve_plugins(config, fetcher, delivery, previous, &mut pinned).await;
    errors.extend(plugin_errors);
    let evicted = fetcher.cache.evict(&pinned);
    if !evicted.is_empty() {
        tracing::info!(count = evicted.len(), "evicted least recently used Wasm modules from the cache");
    }
    (config, errors)
}

/// The `wasm_plugins` part of `resolve`; `pinned` gets the modules served.
async fn resolve_plugins(
    config: CompiledConfig,
    fetcher: &WasmFetcher,
    delivery: &DeliverySettings,
    previous: Option<&CompiledConfig>,
    pinned: &mut HashSet<String>,
) -> (CompiledConfig, Vec<PluginError>) {
    if config.wasm_plugins.is_empty() {
        return (config, Vec::new());
    }
    let plugins = config.wasm_plugins.clone();
    let fetched = futures_util::future::join_all(plugins.iter().map(|p| fetcher.module_in_time(p))).await;
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    for (plugin, result) in plugins.iter().zip(fetched) {
        match result {
            Ok(module) => {
                resources.push(std::sync::Arc::new(build(plugin, &module.bytes, &module.sha256, delivery)));
                pinned.insert(module.sha256);
            }
            Err(e) => {
                let kept = kept_version(previous, &plugin.name, &plugin.selector);
                tracing::error!(plugin = %plugin.name, url = %plugin.url, kind = e.kind(), error = %e, kept = kept.is_some(), "Wasm module refused; the previous version keeps serving");
                let path = format!("{}.url", plugin.origin.path);
                errors.push(PluginError::new(&plugin.name, &plugin.url, &e, &plugin.origin, path, kept.as_deref()));
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
    (config.with_resources(resources), errors)
}

/// Extension configs with Envoy-native Wasm code (`central_wasm`): each module fetched
/// and checked like a plugin's, the code rewritten to Filterplane's delivery (the original
/// URL never reaches Envoy). A config whose module cannot be had keeps the resource
/// `previous` served under its name (or is left out), and is reported.
async fn resolve_central(
    config: CompiledConfig,
    fetcher: &WasmFetcher,
    delivery: &DeliverySettings,
    previous: Option<&CompiledConfig>,
) -> (CompiledConfig, Vec<PluginError>, HashSet<String>) {
    let mut pinned = HashSet::new();
    if config.resources.iter().all(|r| r.central_wasm.is_none()) {
        return (config, Vec::new(), pinned);
    }
    let mut config = config;
    let resources = std::mem::take(&mut config.resources);
    let verification = &config.wasm_verification;
    let converted = futures_util::future::join_all(resources.into_iter().map(|r| async move {
        match r.central_wasm.clone() {
            None => Ok((r, Vec::new())),
            Some(central) => {
                let started = std::time::Instant::now();
                let result = convert(&r, &central, fetcher, delivery, verification)
                    .await
                    .map(|(c, s)| (std::sync::Arc::new(c), s));
                let metrics = &fetcher.metrics;
                metrics.conversion_duration.observe(started.elapsed().as_secs_f64());
                let label = match &result {
                    Ok(_) => "success",
                    Err((_, e)) => e.kind(),
                };
                metrics.conversions.get_or_create(&crate::metrics::ResultLabel::new(label)).inc();
                result.map_err(|(code, e)| (r, code, e))
            }
        }
    }))
    .await;
    let mut errors = Vec::new();
    let mut kept_out = Vec::new();
    for result in converted {
        match result {
            Ok((r, shas)) => {
                pinned.extend(shas);
                config.resources.push(r);
            }
            Err((r, code, e)) => {
                let kept = kept_version(previous, &r.name, &r.selector);
                tracing::error!(config = %r.name, url = %code.url, kind = e.kind(), error = %e, kept = kept.is_some(), "Wasm module of an extension config refused; its previous version keeps serving");
                let path = format!("{}.typed_config.{}", r.origin.path, code.path);
                errors.push(PluginError::new(&r.name, &code.url, &e, &r.origin, path, kept.as_deref()));
                match kept {
                    Some(k) => {
                        // The modules the kept version names stay in the cache.
                        if let Some(sha) = &k.wasm_sha256 {
                            pinned.insert(sha.clone());
                        }
                        pinned.extend(k.central_shas.iter().cloned());
                        config.resources.push(k)
                    }
                    None => kept_out.push(r.name.clone()),
                }
            }
        }
    }
    if !kept_out.is_empty() {
        tracing::warn!(configs = ?kept_out, "extension configs left out: their Wasm modules were never fetched");
    }
    (config.with_resources(Vec::new()), errors, pinned)
}

/// One extension config's modules fetched and its code rewritten.
async fn convert(
    r: &CompiledResource,
    central: &filterplane_config::central::CentralWasm,
    fetcher: &WasmFetcher,
    delivery: &DeliverySettings,
    verification: &Option<std::sync::Arc<filterplane_config::compiled::Verification>>,
) -> Result<(CompiledResource, Vec<String>), (filterplane_config::central::CodeRef, fetch::FetchError)> {
    use base64::Engine;
    use filterplane_api::envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig;
    use prost::Message;
    let mut json = central.typed_config.clone();
    let mut shas = Vec::new();
    // One module served remotely per config (the module server looks up one SHA-256
    // per resource); a config naming several gets them inline.
    let remote = delivery.default == Delivery::Remote && central.modules.len() == 1;
    for code in &central.modules {
        let origin = r.origin.clone();
        let mut plugin = WasmPlugin::for_code(&r.name, &r.selector, code, origin);
        plugin.verification = verification.clone();
        let module = fetcher.module_in_time(&plugin).await.map_err(|e| (code.clone(), e))?;
        let new_code = if remote {
            let uri = format!(
                "{}{}",
                delivery.module_base_url.trim_end_matches('/'),
                module_path(&delivery.module_secret, &module.sha256)
            );
            serde_json::json!({ "remote": { "http_uri": { "uri": uri, "cluster": delivery.module_cluster, "timeout": "30s" }, "sha256": module.sha256 } })
        } else {
            serde_json::json!({ "local": { "inline_bytes": base64::engine::general_purpose::STANDARD.encode(&module.bytes) } })
        };
        if let Some(slot) = filterplane_config::central::at_mut(&mut json, &code.at) {
            *slot = new_code;
        }
        if remote {
            // As for remote plugins: a cache miss is a NACK and a background fetch.
            let vm_config = &code.at[..code.at.len().saturating_sub(1)];
            if let Some(serde_json::Value::Object(vm)) = filterplane_config::central::at_mut(&mut json, vm_config) {
                vm.insert("nack_on_code_cache_miss".into(), serde_json::Value::Bool(true));
            }
        }
        shas.push(module.sha256);
    }
    let typed = filterplane_api::any_from_json(&json).map_err(|e| {
        let code = central.modules[0].clone();
        (code, fetch::FetchError::Invalid(format!("the rewritten config does not encode: {}: {}", e.path, e.message)))
    })?;
    let tec = TypedExtensionConfig { name: r.name.clone(), typed_config: Some(typed.any) };
    let described = format!("{}\0{}\0{}", r.version, shas.join(","), if remote { "remote" } else { "inline" });
    let resource = CompiledResource {
        resource: filterplane_api::Any { type_url: r.resource.type_url.clone(), value: tec.encode_to_vec() },
        version: filterplane_api::content_version([described.as_bytes()]),
        wasm_sha256: if remote { shas.first().cloned() } else { None },
        envoy_fetches_code: remote,
        central_wasm: None,
        central_shas: shas.clone(),
        ..r.clone()
    };
    Ok((resource, shas))
}

fn build(plugin: &WasmPlugin, bytes: &[u8], sha256: &str, delivery: &DeliverySettings) -> CompiledResource {
    match plugin.delivery.unwrap_or(delivery.default) {
        Delivery::Inline => build_wasm_resource(plugin, WasmCode::Inline(bytes), sha256),
        Delivery::Remote => {
            let uri = format!(
                "{}{}",
                delivery.module_base_url.trim_end_matches('/'),
                module_path(&delivery.module_secret, sha256)
            );
            build_wasm_resource(plugin, WasmCode::Remote { uri: &uri, cluster: &delivery.module_cluster }, sha256)
        }
    }
}
