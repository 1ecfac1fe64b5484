//! Pre-flight validation with a real Envoy (`--preflight-envoy PATH`): before any proxy
//! gets a new or changed resource, that Envoy checks it in `--mode validate` (its own
//! validation rules, semantic checks, filter factories): extension configs placed into a
//! minimal listener's filter chain, listeners, clusters and secrets as static resources,
//! routes inside a listener, endpoints inside a cluster. All of a config's resources go
//! into one bootstrap; only when Envoy refuses it is each changed resource checked on its
//! own, in parallel, to name the one at fault. Results are cached by content hash.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use filterplane_api::{json::any_to_json, ResourceType};
use filterplane_config::{
    error::{ConfigError, ConfigErrors},
    CompiledConfig, CompiledResource,
};
use serde_json::{json, Value};

/// Content hashes validated, at most this many (then forgotten and learnt again).
const CACHE_ENTRIES: usize = 100_000;
/// Envoys at once when checking resources one by one.
const PARALLEL: usize = 4;
/// Characters of Envoy's message kept.
const MESSAGE_CHARS: usize = 2000;

#[derive(Debug)]
pub struct Preflight {
    envoy: PathBuf,
    timeout: Duration,
    /// `(type, name, version)` of resources Envoy accepted.
    passed: Mutex<HashSet<String>>,
    /// The cluster remote Wasm code names (a static cluster in the bootstrap).
    module_cluster: String,
}

fn key(r: &CompiledResource) -> String {
    format!("{}\0{}\0{}", r.resource_type.type_url(), r.name, r.version)
}

impl Preflight {
    pub fn new(envoy: PathBuf, timeout: Duration, module_cluster: String) -> Self {
        Self { envoy, timeout, passed: Mutex::default(), module_cluster }
    }

    /// Checks every resource of `config` that Envoy has not accepted before.
    pub async fn check(self: &Arc<Self>, config: &CompiledConfig) -> Result<(), ConfigErrors> {
        let changed: Vec<&CompiledResource> = {
            let passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
            config.resources.iter().map(Arc::as_ref).filter(|r| checkable(r) && !passed.contains(&key(r))).collect()
        };
        if changed.is_empty() {
            return Ok(());
        }
        let context: Vec<&CompiledResource> = config
            .resources
            .iter()
            .map(Arc::as_ref)
            .filter(|r| matches!(r.resource_type, ResourceType::Cluster | ResourceType::Secret))
            .collect();
        let all: Vec<&CompiledResource> = config.resources.iter().map(Arc::as_ref).filter(|r| checkable(r)).collect();
        let batch = match self.run(&bootstrap(&all, &self.module_cluster)).await {
            Ok(()) => {
                self.remember(&changed);
                return Ok(());
            }
            Err(message) => message,
        };
        // One by one, with the clusters and secrets they may refer to.
        let semaphore = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
        let checks = changed.iter().map(|r| {
            let mut set: Vec<&CompiledResource> = context.iter().copied().filter(|c| !std::ptr::eq(*c, *r)).collect();
            set.push(r);
            let doc = bootstrap(&set, &self.module_cluster);
            let (me, semaphore) = (self.clone(), semaphore.clone());
            async move {
                let _permit = semaphore.acquire().await;
                me.run(&doc).await
            }
        });
        let results = futures_util::future::join_all(checks).await;
        let mut errors = Vec::new();
        let mut ok = Vec::new();
        for (r, result) in changed.iter().zip(results) {
            match result {
                Ok(()) => ok.push(*r),
                Err(message) => errors.push(error_at(r, &message)),
            }
        }
        self.remember(&ok);
        if errors.is_empty() {
            // Each passes alone: they conflict with each other.
            let file = config.files.first().cloned().unwrap_or_default();
            errors.push(ConfigError {
                file,
                line: None,
                path: String::new(),
                message: format!("Envoy refuses the config as a whole (--preflight-envoy): {batch}"),
            });
        }
        Err(ConfigErrors(errors))
    }

    fn remember(&self, ok: &[&CompiledResource]) {
        let mut passed = self.passed.lock().unwrap_or_else(|p| p.into_inner());
        if passed.len() + ok.len() > CACHE_ENTRIES {
            passed.clear();
        }
        passed.extend(ok.iter().map(|r| key(r)));
    }

    /// Runs Envoy on `bootstrap`; `Err` is Envoy's reason.
    async fn run(&self, bootstrap: &Value) -> Result<(), String> {
        let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temp dir: {e}"))?;
        let file = dir.path().join("preflight.json");
        std::fs::write(&file, bootstrap.to_string()).map_err(|e| format!("cannot write the bootstrap: {e}"))?;
        let mut cmd = tokio::process::Command::new(&self.envoy);
        cmd.arg("--mode")
            .arg("validate")
            .arg("-c")
            .arg(&file)
            .args(["-l", "error", "--disable-hot-restart"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", self.envoy.display()))?;
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(format!("{}: {e}", self.envoy.display())),
            Err(_) => return Err(format!("Envoy did not finish validating within {} s", self.timeout.as_secs())),
        };
        if out.status.success() {
            return Ok(());
        }
        let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
        Err(reason(&text, &file))
    }
}

/// What Envoy said, without the proto it prints before it (which may hold secrets).
fn reason(text: &str, file: &Path) -> String {
    let marker = format!("error initializing configuration '{}': ", file.display());
    let after = text.split_once(&marker).map_or(text, |(_, r)| r);
    let after = after.rsplit_once("\n: ").map_or(after, |(_, r)| r);
    let line: String = after.trim().chars().take(MESSAGE_CHARS).collect();
    if line.is_empty() {
        "Envoy refused it without a message".into()
    } else {
        line
    }
}

fn error_at(r: &CompiledResource, message: &str) -> ConfigError {
    ConfigError {
        file: r.origin.file.clone(),
        line: r.origin.line.get(),
        path: r.origin.path.clone(),
        message: format!("Envoy refuses it (--preflight-envoy): {message}"),
    }
}

/// Resources pre-flight can put in a bootstrap. Remote Wasm code is left out: Envoy would
/// fetch it.
fn checkable(r: &CompiledResource) -> bool {
    if r.envoy_fetches_code {
        return false;
    }
    match r.resource_type {
        ResourceType::ExtensionConfig => chain_of(&r.inner_type_url).is_some(),
        _ => true,
    }
}

fn chain_of(type_url: &str) -> Option<&'static str> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    if name.starts_with("envoy.extensions.filters.http.") {
        Some("http")
    } else if name.starts_with("envoy.extensions.filters.network.") {
        Some("network")
    } else {
        None
    }
}

/// The message of `any` as bootstrap JSON (no `@type` at its top).
fn plain(any: &filterplane_api::Any) -> Option<Value> {
    let mut v = any_to_json(any).ok()?;
    v.as_object_mut()?.remove("@type");
    Some(v)
}

const XDS_CLUSTER: &str = "filterplane_preflight_xds";

fn hcm(prefix: &str, route_config: Value, filters: Vec<Value>) -> Value {
    let mut http_filters = filters;
    http_filters.push(json!({ "name": "envoy.filters.http.router", "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } }));
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": prefix,
            "route_config": route_config,
            "http_filters": http_filters,
        }
    })
}

fn listener(name: &str, port: usize, filters: Vec<Value>) -> Value {
    json!({
        "name": name,
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": port } },
        "filter_chains": [ { "filters": filters } ],
    })
}

fn direct_routes() -> Value {
    json!({ "virtual_hosts": [ { "name": "preflight", "domains": ["*"], "routes": [ { "match": { "prefix": "/" }, "direct_response": { "status": 200 } } ] } ] })
}

/// A bootstrap holding `resources` the way Envoy can validate them.
fn bootstrap(resources: &[&CompiledResource], module_cluster: &str) -> Value {
    let (mut listeners, mut clusters, mut secrets) = (Vec::new(), Vec::new(), Vec::new());
    // Ports for the listeners made here, clear of the usual ones.
    let mut port = 40_000;
    for r in resources {
        match r.resource_type {
            ResourceType::Listener | ResourceType::Cluster | ResourceType::Secret => {
                if let Some(v) = plain(&r.resource) {
                    match r.resource_type {
                        ResourceType::Listener => listeners.push(v),
                        ResourceType::Cluster => clusters.push(v),
                        _ => secrets.push(v),
                    }
                }
            }
            ResourceType::RouteConfiguration => {
                if let Some(mut v) = plain(&r.resource) {
                    // Clusters may come from the proxies' own bootstraps.
                    v["validate_clusters"] = json!(false);
                    port += 1;
                    listeners.push(listener(&format!("preflight-route-{}", r.name), port, vec![hcm("r", v, vec![])]));
                }
            }
            ResourceType::ClusterLoadAssignment => {
                if let Some(v) = plain(&r.resource) {
                    clusters.push(
                        json!({ "name": format!("preflight-eds-{}", r.name), "type": "STATIC", "load_assignment": v }),
                    );
                }
            }
            ResourceType::ExtensionConfig => {
                let Some(tec) = any_to_json(&r.resource).ok() else { continue };
                let filter = json!({ "name": r.name, "typed_config": tec["typed_config"] });
                port += 1;
                let name = format!("preflight-ecds-{port}");
                let chain = match chain_of(&r.inner_type_url) {
                    Some("http") => vec![hcm("e", direct_routes(), vec![filter])],
                    _ => vec![
                        filter,
                        json!({ "name": "envoy.filters.network.tcp_proxy", "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "e", "cluster": XDS_CLUSTER } }),
                    ],
                };
                listeners.push(listener(&name, port, chain));
            }
        }
    }
    let http2 = json!({ "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": { "http2_protocol_options": {} } } });
    let endpoint = |name: &str| json!({ "cluster_name": name, "endpoints": [ { "lb_endpoints": [ { "endpoint": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 1 } } } } ] } ] });
    let own = [XDS_CLUSTER, module_cluster];
    clusters.retain(|c| !own.contains(&c["name"].as_str().unwrap_or_default()));
    clusters.push(json!({ "name": XDS_CLUSTER, "type": "STATIC", "typed_extension_protocol_options": http2, "load_assignment": endpoint(XDS_CLUSTER) }));
    clusters.push(json!({ "name": module_cluster, "type": "STATIC", "load_assignment": endpoint(module_cluster) }));
    json!({
        "node": { "id": "filterplane-preflight", "cluster": "filterplane-preflight" },
        "static_resources": { "listeners": listeners, "clusters": clusters, "secrets": secrets },
        "dynamic_resources": { "ads_config": { "api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [ { "envoy_grpc": { "cluster_name": XDS_CLUSTER } } ] } },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_s_reason_without_the_proto_it_prints() {
        let file = Path::new("/tmp/x/preflight.json");
        let text = "[critical][main] error initializing configuration '/tmp/x/preflight.json': goo.gle/debugproto    \nprivate_key { inline_string: \"SECRET\" }\n: Proto constraint validation failed (Key: value length must be at least 1 characters)\n";
        let r = reason(text, file);
        assert_eq!(r, "Proto constraint validation failed (Key: value length must be at least 1 characters)");
        assert!(!r.contains("SECRET"));
    }
}
