//! The quickstart setup shared by several tests: Filterplane on a copy of
//! `examples/quickstart/filterplane.yaml`, and an Envoy on `examples/quickstart/envoy.yaml`.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use crate::{example_bootstrap, wait_until, Envoy, EnvoyPorts, Filterplane};

pub const ECDS: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
/// Envoy's stats prefix for the quickstart's discovered filter.
pub const STAT: &str = "extension_config_discovery.http_filter.add-header";
pub const WAIT: Duration = Duration::from_secs(15);

/// The xDS flavour Envoy is configured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `api_type: GRPC`, state of the world.
    Sotw,
    /// `api_type: DELTA_GRPC`, incremental.
    Delta,
}

impl Mode {
    pub fn bootstrap(self) -> &'static str {
        match self {
            Mode::Sotw => "quickstart/envoy.yaml",
            Mode::Delta => "quickstart/envoy-delta.yaml",
        }
    }

    /// As `/api/v1/proxies` names it.
    pub fn stream_kind(self) -> &'static str {
        match self {
            Mode::Sotw => "sotw",
            Mode::Delta => "delta",
        }
    }
}

pub struct Quickstart {
    /// Declared (so dropped, and its log printed on failure) before Filterplane: the end
    /// of a failing test's output is then Filterplane's log.
    pub envoy: Envoy,
    pub fp: Filterplane,
    /// The YAML file Filterplane serves.
    pub yaml: PathBuf,
    pub node_id: String,
    pub dir: tempfile::TempDir,
}

/// The quickstart config, as shipped.
pub fn example_yaml() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart/filterplane.yaml");
    fs::read_to_string(p).expect("read the quickstart config")
}

/// The quickstart config with the header value `value`.
pub fn yaml_with(value: &str) -> String {
    let text = example_yaml();
    assert!(text.contains("value: v1"));
    text.replace("value: v1", &format!("value: {value}"))
}

/// A config Filterplane accepts but the quickstart's Envoy refuses: a Buffer filter where
/// the listener's `config_discovery.type_urls` only allows HeaderMutation.
pub fn yaml_envoy_refuses(max_request_bytes: u32) -> String {
    let from = "      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations:\n        response_mutations:\n          - append: { header: { key: x-plugin, value: v1 } }\n";
    let text = example_yaml();
    assert!(text.contains(from), "the quickstart config changed shape");
    text.replace(
        from,
        &format!("      \"@type\": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer\n      max_request_bytes: {max_request_bytes}\n"),
    )
}

impl Quickstart {
    /// Starts both (`serve_dir`: point Filterplane at the directory rather than the
    /// file) and waits until Envoy applies the extension.
    pub fn start(node_id: &str, serve_dir: bool) -> Quickstart {
        Self::start_with(node_id, serve_dir, Mode::Sotw, |b| b)
    }

    /// Like `start`, with the given xDS mode and a change to the bootstrap text.
    pub fn start_with(node_id: &str, serve_dir: bool, mode: Mode, edit: impl FnOnce(String) -> String) -> Quickstart {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf_dir = dir.path().join("conf");
        fs::create_dir(&conf_dir).expect("mkdir conf");
        let yaml = conf_dir.join("filterplane.yaml");
        fs::write(&yaml, example_yaml()).expect("write config");
        let fp = Filterplane::start(if serve_dir { &conf_dir } else { &yaml }, dir.path());
        let ports = EnvoyPorts::new(fp.xds_port);
        let bootstrap = edit(example_bootstrap(mode.bootstrap(), ports, node_id));
        let envoy = Envoy::start(&bootstrap, ports, dir.path(), "envoy");
        let q = Quickstart { fp, envoy, yaml, node_id: node_id.to_owned(), dir };
        q.wait_for_header("v1");
        q
    }

    /// The `x-plugin` header of a request through Envoy.
    pub fn header(&self) -> Option<String> {
        let r = self.envoy.get("/")?;
        assert_eq!(r.status, 200, "{r:?}");
        r.header("x-plugin").map(str::to_owned)
    }

    pub fn wait_for_header(&self, value: &str) {
        wait_until(&format!("x-plugin: {value} through Envoy"), WAIT, || {
            (self.header().as_deref() == Some(value)).then_some(())
        });
    }

    /// This proxy's ECDS status from `/api/v1/proxies/{node}`.
    pub fn ecds_status(&self) -> Value {
        let streams = self.fp.api(&format!("/api/v1/proxies/{}", self.node_id));
        streams[0]["types"][ECDS].clone()
    }

    /// Waits until the proxy has ACKed what was last sent.
    pub fn wait_synced(&self) -> Value {
        wait_until("the proxy to ACK what was sent", WAIT, || {
            let s = self.ecds_status();
            (s["state"] == "synced").then_some(s)
        })
    }

    /// Waits until `/api/v1/rejects` holds `n` rejects, and returns them.
    pub fn wait_rejects(&self, n: usize) -> Vec<Value> {
        wait_until(&format!("{n} reject(s) in /api/v1/rejects"), WAIT, || {
            let r = self.fp.api("/api/v1/rejects");
            let list = r.as_array()?.clone();
            (list.len() == n).then_some(list)
        })
    }

    pub fn write(&self, text: &str) {
        fs::write(&self.yaml, text).expect("write config");
    }
}
