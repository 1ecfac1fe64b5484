//! A real Filterplane (in process, on loopback port 0) and scripted xDS clients that
//! speak the protocol the way Envoy does, one message at a time.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use filterplane_api::envoy_types::pb::{
    envoy::{
        config::core::v3::{Node, TypedExtensionConfig},
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
            DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        },
    },
    google::rpc::Status,
};
use filterplane_server::settings::{Settings, XdsHttp2};
use prost::Message;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

pub const ECDS: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const WAIT: Duration = Duration::from_secs(10);

/// YAML with one header-mutation extension config per (name, header value).
pub fn yaml(entries: &[(&str, &str)]) -> String {
    let mut y = String::from("version: 1\nextension_configs:\n");
    for (name, value) in entries {
        y.push_str(&format!(
            "  - name: {name}\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-plugin, value: \"{value}\" }} }} }} ] }}\n"
        ));
    }
    y
}

pub struct Plane {
    _dir: tempfile::TempDir,
    yaml: PathBuf,
    pub xds: SocketAddr,
    pub admin: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The xDS port's HTTP/2 these tests run over: `FILTERPLANE_XDS_HTTP2=tonic` runs
/// them over the fallback (the test script runs the suites both ways).
pub fn transport() -> XdsHttp2 {
    match std::env::var("FILTERPLANE_XDS_HTTP2").as_deref() {
        Ok("tonic") => XdsHttp2::Tonic,
        _ => XdsHttp2::Lean,
    }
}

impl Plane {
    pub async fn start(entries: &[(&str, &str)]) -> Plane {
        Self::start_with(entries, |_| {}).await
    }

    /// Starts with settings changed by `set`.
    pub async fn start_with(entries: &[(&str, &str)], set: impl FnOnce(&mut Settings)) -> Plane {
        let dir = tempfile::tempdir().unwrap();
        let yaml = dir.path().join("filterplane.yaml");
        std::fs::write(&yaml, self::yaml(entries)).unwrap();
        let xds_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (xds, admin) = (xds_l.local_addr().unwrap(), admin_l.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let cache_dir = dir.path().join("cache");
        let mut settings = Settings::new(&yaml);
        settings.wasm.cache_dir = Some(cache_dir);
        settings.xds_http2 = transport();
        // Rollouts here start right after the server: no settle time (its rule is the
        // engine's to test).
        settings.rollout_settle = Duration::ZERO;
        set(&mut settings);
        tokio::spawn(filterplane_server::serve_on(settings, xds_l, admin_l, shutdown.clone()));
        let plane = Plane { _dir: dir, yaml, xds, admin, shutdown };
        plane.wait_for("readiness", |p| p.get_text("/readyz").is_some_and(|t| t.starts_with("ready"))).await;
        plane
    }

    fn get_text(&self, path: &str) -> Option<String> {
        let url = format!("http://{}{path}", self.admin);
        tokio::task::block_in_place(|| ureq::get(&url).call().ok()?.body_mut().read_to_string().ok())
    }

    pub fn api(&self, path: &str) -> Value {
        serde_json::from_str(&self.get_text(path).expect("admin answers")).expect("admin JSON")
    }

    /// `filterplane_*` counter value from /metrics.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.get_text("/metrics").expect("metrics");
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
    }

    pub async fn wait_for(&self, what: &str, f: impl Fn(&Plane) -> bool) {
        let start = std::time::Instant::now();
        while !f(self) {
            assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The config file the server watches.
    #[allow(dead_code)] // tests/hostile.rs
    pub fn config_path(&self) -> &std::path::Path {
        &self.yaml
    }

    /// `/healthz` answers 200 within a second.
    #[allow(dead_code)] // tests/hostile.rs
    pub fn healthy(&self) -> bool {
        let url = format!("http://{}/healthz", self.admin);
        tokio::task::block_in_place(|| {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(1))).build().into();
            agent.get(&url).call().is_ok_and(|r| r.status() == 200)
        })
    }

    /// Writes `text` as the config and waits until a reload of it failed; returns the
    /// reload's errors.
    #[allow(dead_code)] // tests/hostile.rs
    pub async fn refuse(&self, text: &str) -> Vec<Value> {
        self.refuse_or_hold(text, "failed").await;
        self.api("/api/v1/config")["last_outcome"]["errors"].as_array().cloned().unwrap_or_default()
    }

    /// Writes `text` as the config and waits until a reload of it ended with `result`
    /// (`failed` or `held`).
    #[allow(dead_code)] // tests/hostile.rs
    pub async fn refuse_or_hold(&self, text: &str, result: &str) {
        let attempted = self.api("/api/v1/config")["last_attempt_at"].clone();
        std::fs::write(&self.yaml, text).unwrap();
        self.wait_for(&format!("a reload that ends {result}"), |p| {
            let c = p.api("/api/v1/config");
            c["last_attempt_at"] != attempted && c["last_outcome"]["result"] == result
        })
        .await;
    }

    /// Replaces the config and waits until the server serves it.
    pub async fn set(&self, entries: &[(&str, &str)]) {
        let before = self.api("/api/v1/config")["serving_version"].clone();
        std::fs::write(&self.yaml, yaml(entries)).unwrap();
        self.wait_for("the new config to be applied", |p| p.api("/api/v1/config")["serving_version"] != before).await;
    }
}

pub fn node(id: &str) -> Node {
    Node { id: id.into(), cluster: "conformance".into(), ..Default::default() }
}

/// Names of the TypedExtensionConfigs in a list of `Any`.
pub fn ecds_names<'a>(anys: impl IntoIterator<Item = &'a filterplane_api::Any>) -> Vec<String> {
    anys.into_iter()
        .map(|a| TypedExtensionConfig::decode(a.value.as_slice()).expect("TypedExtensionConfig").name)
        .collect()
}

async fn connect(addr: SocketAddr) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await.expect("connect")
}

async fn next<T>(rx: &mut Streaming<T>) -> T {
    match tokio::time::timeout(WAIT, rx.message()).await {
        Ok(Ok(Some(m))) => m,
        other => panic!("expected a response, got {:?}", other.map(|r| r.map(|o| o.is_some()))),
    }
}

/// A state-of-the-world ADS client.
pub struct SotwClient {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    node: Node,
}

impl SotwClient {
    pub async fn connect(plane: &Plane, node_id: &str) -> Self {
        let (tx, reqs) = mpsc::channel(16);
        let rx =
            connect(plane.xds).await.stream_aggregated_resources(ReceiverStream::new(reqs)).await.unwrap().into_inner();
        Self { tx, rx, node: node(node_id) }
    }

    pub async fn request(&self, type_url: &str, names: &[&str], version: &str, nonce: &str) {
        self.send(type_url, names, version, nonce, None).await
    }

    pub async fn nack(&self, type_url: &str, names: &[&str], kept: &str, nonce: &str, message: &str) {
        let err = Status { code: 13, message: message.into(), details: vec![] };
        self.send(type_url, names, kept, nonce, Some(err)).await
    }

    async fn send(&self, type_url: &str, names: &[&str], version: &str, nonce: &str, error: Option<Status>) {
        let req = DiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            error_detail: error,
            ..Default::default()
        };
        self.tx.send(req).await.expect("stream open");
    }

    pub async fn recv(&mut self) -> DiscoveryResponse {
        next(&mut self.rx).await
    }

    /// Receives the next response and ACKs it with the same subscription.
    pub async fn recv_ack(&mut self, names: &[&str]) -> DiscoveryResponse {
        let r = self.recv().await;
        self.request(&r.type_url.clone(), names, &r.version_info, &r.nonce).await;
        r
    }
}

/// A delta ADS client.
pub struct DeltaClient {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    node: Node,
}

#[derive(Default)]
pub struct Delta<'a> {
    pub subscribe: &'a [&'a str],
    pub unsubscribe: &'a [&'a str],
    pub initial: &'a [(&'a str, &'a str)],
    pub nonce: &'a str,
    pub error: Option<&'a str>,
}

impl DeltaClient {
    pub async fn connect(plane: &Plane, node_id: &str) -> Self {
        let (tx, reqs) = mpsc::channel(16);
        let rx =
            connect(plane.xds).await.delta_aggregated_resources(ReceiverStream::new(reqs)).await.unwrap().into_inner();
        Self { tx, rx, node: node(node_id) }
    }

    pub async fn send(&self, type_url: &str, d: Delta<'_>) {
        let req = DeltaDiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.into(),
            resource_names_subscribe: d.subscribe.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: d.unsubscribe.iter().map(|s| s.to_string()).collect(),
            initial_resource_versions: d.initial.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            response_nonce: d.nonce.into(),
            error_detail: d.error.map(|m| Status { code: 13, message: m.into(), details: vec![] }),
            ..Default::default()
        };
        self.tx.send(req).await.expect("stream open");
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        next(&mut self.rx).await
    }

    /// The gRPC status the server ended the stream with.
    #[allow(dead_code)] // tests/hostile.rs
    pub async fn ended(&mut self) -> tonic::Status {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Err(status)) => status,
            other => {
                panic!("expected the stream to end with a status, got {:?}", other.map(|r| r.map(|o| o.is_some())))
            }
        }
    }

    pub async fn recv_ack(&mut self) -> DeltaDiscoveryResponse {
        let r = self.recv().await;
        self.send(&r.type_url.clone(), Delta { nonce: &r.nonce, ..Default::default() }).await;
        r
    }
}

/// Names in a delta response, sorted.
pub fn delta_names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = r.resources.iter().map(|x| x.name.clone()).collect();
    v.sort();
    v
}
