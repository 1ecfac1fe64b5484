//! Wasm plugins as the config describes them, checked, and the Envoy Wasm filter config
//! built once the module's bytes (or where Envoy can download them) are known. Fetching
//! is the server's business; this module opens nothing.

use std::collections::BTreeMap;

use filterplane_api::{
    content_version,
    envoy_types::pb::{
        envoy::{
            config::core::v3::{
                async_data_source, data_source, http_uri, AsyncDataSource, DataSource, HttpUri, RemoteDataSource,
                TypedExtensionConfig,
            },
            extensions::{
                filters::{http::wasm::v3::Wasm as HttpWasm, network::wasm::v3::Wasm as NetworkWasm},
                wasm::v3::{plugin_config, EnvironmentVariables, FailurePolicy, PluginConfig, VmConfig},
            },
        },
        google::protobuf::{Duration, StringValue},
    },
    Any, ResourceType,
};
use prost::{Message, Name};

pub use crate::compiled::WasmPlugin;
use crate::{
    compiled::{CompiledResource, Origin},
    model::{FailStrategy, NodeSelector, PluginType, PullPolicy, WasmPluginSpec},
};

pub const HTTP_WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
pub const NETWORK_WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";

pub use crate::sources::{check_sha256, ModuleSource};

impl WasmPlugin {
    /// Checks what can be checked without fetching.
    pub fn from_spec(spec: &WasmPluginSpec, base: &std::path::Path, origin: Origin) -> Result<Self, (String, String)> {
        let source = ModuleSource::parse(&spec.url, base).map_err(|m| ("url".to_owned(), m))?;
        if let Some(h) = &spec.sha256 {
            check_sha256(h).map_err(|m| ("sha256".to_owned(), m))?;
        }
        // An http(s) module without a pin is fetched by Filterplane, once (IfNotPresent)
        // or at every reload (Always), and served pinned to the digest of what it fetched;
        // the API and the page say the author pinned none.
        let pull_policy = spec.image_pull_policy.unwrap_or(match &source {
            // As Kubernetes: a floating tag is checked every time.
            ModuleSource::Oci { tag, digest: None, .. } if tag.as_deref().is_none_or(|t| t == "latest") => {
                PullPolicy::Always
            }
            _ => PullPolicy::IfNotPresent,
        });
        Ok(WasmPlugin {
            name: spec.name.clone(),
            selector: spec.node_selector.clone(),
            url: spec.url.clone(),
            source,
            sha256: spec.sha256.clone(),
            pull_policy,
            pull_secret: spec.image_pull_secret.clone(),
            plugin_config: spec.plugin_config.as_ref().map(filterplane_api::json::canonical_string),
            root_id: spec.root_id.clone(),
            env: spec.vm_config.env.clone(),
            host_env: spec.vm_config.host_env.clone(),
            fail_strategy: spec.fail_strategy,
            plugin_type: spec.plugin_type,
            delivery: spec.delivery,
            placement: None,
            origin,
            rollout: spec.rollout.clone(),
            verification: None,
        })
    }

    /// A module an extension config's code names (`central`), as the fetcher takes it.
    pub fn for_code(name: &str, selector: &NodeSelector, code: &crate::central::CodeRef, origin: Origin) -> Self {
        let pull_policy = match &code.source {
            ModuleSource::Oci { tag, digest: None, .. } if tag.as_deref().is_none_or(|t| t == "latest") => {
                PullPolicy::Always
            }
            _ => PullPolicy::IfNotPresent,
        };
        WasmPlugin {
            name: name.to_owned(),
            selector: selector.clone(),
            url: code.url.clone(),
            source: code.source.clone(),
            sha256: code.sha256.clone(),
            pull_policy,
            pull_secret: None,
            plugin_config: None,
            root_id: String::new(),
            env: BTreeMap::new(),
            host_env: Vec::new(),
            fail_strategy: FailStrategy::default(),
            plugin_type: PluginType::default(),
            delivery: None,
            placement: None,
            origin,
            rollout: None,
            verification: None,
        }
    }

    pub fn type_url(&self) -> &'static str {
        match self.plugin_type {
            PluginType::Http => HTTP_WASM_TYPE,
            PluginType::Network => NETWORK_WASM_TYPE,
        }
    }
}

/// How Envoy gets the module's code.
#[derive(Debug, Clone, Copy)]
pub enum WasmCode<'a> {
    /// The bytes, inside the ECDS resource.
    Inline(&'a [u8]),
    /// A URL Envoy downloads from through `cluster`, checked against the SHA-256.
    Remote { uri: &'a str, cluster: &'a str },
}

/// The ECDS resource for a plugin whose module (with SHA-256 `sha256`) is ready.
pub fn build_wasm_resource(p: &WasmPlugin, code: WasmCode<'_>, sha256: &str) -> CompiledResource {
    let code_source = match code {
        WasmCode::Inline(bytes) => async_data_source::Specifier::Local(DataSource {
            specifier: Some(data_source::Specifier::InlineBytes(bytes.to_vec())),
            ..Default::default()
        }),
        WasmCode::Remote { uri, cluster } => async_data_source::Specifier::Remote(RemoteDataSource {
            http_uri: Some(HttpUri {
                uri: uri.to_owned(),
                timeout: Some(Duration { seconds: 30, nanos: 0 }),
                http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(cluster.to_owned())),
            }),
            sha256: sha256.to_owned(),
            ..Default::default()
        }),
    };
    let configuration = p.plugin_config.as_ref().map(|json| Any {
        type_url: StringValue::type_url(),
        value: StringValue { value: json.clone() }.encode_to_vec(),
    });
    let plugin = PluginConfig {
        name: p.name.clone(),
        root_id: p.root_id.clone(),
        configuration,
        failure_policy: match p.fail_strategy {
            FailStrategy::FailClose => FailurePolicy::FailClosed as i32,
            FailStrategy::FailOpen => FailurePolicy::FailOpen as i32,
            FailStrategy::FailReload => FailurePolicy::FailReload as i32,
        },
        vm: Some(plugin_config::Vm::VmConfig(VmConfig {
            // One VM per module: plugins sharing a module share it.
            vm_id: format!("sha256:{sha256}"),
            runtime: "envoy.wasm.runtime.v8".into(),
            code: Some(AsyncDataSource { specifier: Some(code_source) }),
            // Remote code: Envoy fetches it only through an init manager, and once Envoy
            // has started its init managers are done, so a config that comes later is
            // ACKed and never fetched: the filter then lets everything through, even
            // FAIL_CLOSED. With this flag a cache miss is a NACK and a background fetch
            // into Envoy's code cache instead; the server sends the config again until it
            // is ACKed, which means the module runs.
            nack_on_code_cache_miss: matches!(code, WasmCode::Remote { .. }),
            environment_variables: (!p.env.is_empty() || !p.host_env.is_empty()).then(|| EnvironmentVariables {
                host_env_keys: p.host_env.clone(),
                key_values: p.env.clone().into_iter().collect(),
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let filter = match p.plugin_type {
        PluginType::Http => {
            Any { type_url: HTTP_WASM_TYPE.into(), value: HttpWasm { config: Some(plugin) }.encode_to_vec() }
        }
        PluginType::Network => {
            Any { type_url: NETWORK_WASM_TYPE.into(), value: NetworkWasm { config: Some(plugin) }.encode_to_vec() }
        }
    };
    let rt = ResourceType::ExtensionConfig;
    let delivery = match code {
        WasmCode::Inline(_) => "inline".to_owned(),
        // Not the URI: its address and key are the replica's own (--wasm-module-url,
        // the module path secret), and the module is the SHA-256 below. Versions are the
        // same on every replica, so a proxy moving between them reloads nothing.
        WasmCode::Remote { cluster, .. } => format!("remote {cluster}"),
    };
    let described = format!(
        "{:?}",
        (&p.url, &p.root_id, &p.plugin_config, &p.env, &p.host_env, p.fail_strategy, p.plugin_type, delivery)
    );
    let version = content_version([
        rt.type_url().as_bytes(),
        p.name.as_bytes(),
        b"wasm",
        described.as_bytes(),
        sha256.as_bytes(),
    ]);
    let tec = TypedExtensionConfig { name: p.name.clone(), typed_config: Some(filter) };
    CompiledResource {
        resource_type: rt,
        name: p.name.clone(),
        selector: p.selector.clone(),
        resource: Any { type_url: rt.type_url().to_owned(), value: tec.encode_to_vec() },
        inner_type_url: p.type_url().to_owned(),
        version,
        origin: p.origin.clone(),
        placement: p.placement.clone(),
        listener_json: None,
        wasm_sha256: Some(sha256.to_owned()),
        envoy_fetches_code: matches!(code, WasmCode::Remote { .. }),
        central_wasm: None,
        central_shas: Vec::new(),
        rollout: p.rollout.clone(),
    }
}

/// The Wasm filter config `resource` (a `TypedExtensionConfig` built by
/// `build_wasm_resource` with remote code) as it is sent again for resend `attempt`: the
/// same but for the module download's timeout, `attempt` milliseconds longer.
///
/// Why not the same bytes: Envoy records an ECDS config's hash as applied before it builds
/// the filter, so a config NACKed while the Wasm code was not in its cache yet counts as
/// applied, and the very same config sent again is skipped (and ACKed) without running.
/// A config that differs in a field with no effect is built, and finds the code.
/// `None` if `resource` is not such a config.
pub fn remote_code_resend(resource: &Any, attempt: u32) -> Option<Any> {
    let mut tec = TypedExtensionConfig::decode(resource.value.as_slice()).ok()?;
    let filter = tec.typed_config.as_mut()?;
    let bump = |plugin: &mut PluginConfig| -> Option<()> {
        let Some(plugin_config::Vm::VmConfig(vm)) = plugin.vm.as_mut() else { return None };
        let Some(async_data_source::Specifier::Remote(remote)) = vm.code.as_mut()?.specifier.as_mut() else {
            return None;
        };
        let timeout = remote.http_uri.as_mut()?.timeout.get_or_insert_with(Duration::default);
        timeout.nanos = (attempt % 1000) as i32 * 1_000_000;
        Some(())
    };
    filter.value = match filter.type_url.as_str() {
        HTTP_WASM_TYPE => {
            let mut w = HttpWasm::decode(filter.value.as_slice()).ok()?;
            bump(w.config.as_mut()?)?;
            w.encode_to_vec()
        }
        NETWORK_WASM_TYPE => {
            let mut w = NetworkWasm::decode(filter.value.as_slice()).ok()?;
            bump(w.config.as_mut()?)?;
            w.encode_to_vec()
        }
        _ => return None,
    };
    Some(Any { type_url: resource.type_url.clone(), value: tec.encode_to_vec() })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn parses_module_urls() {
        let base = Path::new("/etc/fp");
        assert_eq!(ModuleSource::parse("file://m.wasm", base).unwrap(), ModuleSource::File("/etc/fp/m.wasm".into()));
        assert_eq!(ModuleSource::parse("file:///abs/m.wasm", base).unwrap(), ModuleSource::File("/abs/m.wasm".into()));
        assert_eq!(
            ModuleSource::parse("oci://127.0.0.1:5000/plugins/hdr:v1", base).unwrap(),
            ModuleSource::Oci {
                registry: "127.0.0.1:5000".into(),
                repository: "plugins/hdr".into(),
                tag: Some("v1".into()),
                digest: None
            }
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            ModuleSource::parse(&format!("oci://r.io/x@{d}"), base).unwrap(),
            ModuleSource::Oci { registry: "r.io".into(), repository: "x".into(), tag: None, digest: Some(d) }
        );
        assert!(ModuleSource::parse("oci://r.io/x@sha256:zz", base).is_err());
        assert!(ModuleSource::parse("ftp://x", base).unwrap_err().contains("must start with"));
        assert!(ModuleSource::parse("oci://justregistry", base).is_err());
    }

    fn remote_timeout(any: &Any) -> Duration {
        let tec = TypedExtensionConfig::decode(any.value.as_slice()).unwrap();
        let w = HttpWasm::decode(tec.typed_config.unwrap().value.as_slice()).unwrap();
        let Some(plugin_config::Vm::VmConfig(vm)) = w.config.unwrap().vm else { panic!("no vm_config") };
        assert!(vm.nack_on_code_cache_miss, "remote code asks Envoy to NACK a cache miss");
        let Some(async_data_source::Specifier::Remote(r)) = vm.code.unwrap().specifier else { panic!("not remote") };
        r.http_uri.unwrap().timeout.unwrap()
    }

    #[test]
    fn a_remote_code_resend_differs_only_in_the_download_timeout() {
        let spec: crate::model::WasmPluginSpec = serde_yaml::from_str(&format!(
            "{{name: w, url: 'http://127.0.0.1:1/m.wasm', sha256: '{}'}}",
            "0".repeat(64)
        ))
        .unwrap();
        let origin = Origin { file: "c.yaml".into(), line: None.into(), path: "wasm_plugins[0]".into() };
        let plugin = WasmPlugin::from_spec(&spec, Path::new("."), origin).unwrap();
        let built = build_wasm_resource(&plugin, WasmCode::Remote { uri: "http://x/m", cluster: "c" }, "ab");
        assert!(built.envoy_fetches_code);
        let again = remote_code_resend(&built.resource, 3).unwrap();
        assert_ne!(again, built.resource);
        assert_eq!(remote_timeout(&built.resource), Duration { seconds: 30, nanos: 0 });
        assert_eq!(remote_timeout(&again), Duration { seconds: 30, nanos: 3_000_000 });
        let inline = build_wasm_resource(&plugin, WasmCode::Inline(b"\0asm"), "ab");
        assert!(!inline.envoy_fetches_code);
        assert_eq!(remote_code_resend(&inline.resource, 1), None, "inline code is never resent");
        // Another replica's address and path key: other bytes, the same version.
        let elsewhere =
            build_wasm_resource(&plugin, WasmCode::Remote { uri: "http://y:2/modules/k", cluster: "c" }, "ab");
        assert_ne!(elsewhere.resource, built.resource);
        assert_eq!(elsewhere.version, built.version, "versions never depend on a replica's own address");
        assert_ne!(inline.version, built.version);
    }
}
