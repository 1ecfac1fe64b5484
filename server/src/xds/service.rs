//! The xDS methods: ADS and the standalone ECDS service, state of the world and delta.
//! Each stream is a handler that feeds requests and new configuration generations to
//! its protocol state machine and hands back what it sends; the connection (`h2.rs`)
//! does the I/O.

use std::{sync::Arc, time::Instant};

use filterplane_api::{
    envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse},
    ResourceType,
};
use filterplane_h2::{ConnContext, OutMessage, Output, Status};
use prost::Message;

use filterplane_config::NodeFacts;

use crate::{
    cache::SnapshotCache,
    identity::IdentityRules,
    log_limit::{self, Cut},
    tls::PeerInfo,
    tracker::{AckTracker, PeerAuth, Tracked},
    xds::{
        delta::DeltaStream,
        sotw::SotwStream,
        status_of,
        stream::{NodeInfo, Step, StreamEvent, StreamSettings},
        wire::Wire,
        ProtocolError,
    },
};
use filterplane_xds::{protocol::Protocol, snapshot::Generation};

/// What every stream needs from the rest of the server.
#[derive(Debug, Clone)]
pub struct XdsContext {
    pub cache: Arc<SnapshotCache>,
    pub tracker: Arc<AckTracker>,
    pub settings: Arc<StreamSettings>,
    pub security: Arc<XdsSecurity>,
    /// What proxies report of their traffic (the metrics service), for rollout gates.
    pub health: Arc<crate::health::HealthStore>,
}

pub use crate::settings::defaults::{MAX_CSDS_RESPONSE_BYTES, MAX_NODE_ID_BYTES};

/// Who may claim which node, and who gets secrets.
#[derive(Debug, Clone, Default)]
pub struct XdsSecurity {
    /// `--node-identity`.
    pub rules: IdentityRules,
    /// `--sensitive-to-authenticated-only`.
    pub sensitive_to_authenticated_only: bool,
}

impl XdsSecurity {
    /// Whether the node a client claims goes with its certificate; the refusal is
    /// recorded (and logged the first time) when it does not.
    pub(crate) fn admit(&self, tracker: &AckTracker, peer: &PeerInfo, facts: &NodeFacts) -> Result<(), Status> {
        let identity = peer.identity.as_deref();
        let Err(message) = self.rules.check(identity, &facts.id, &facts.cluster) else { return Ok(()) };
        let addr = peer.addr.map(|a| a.to_string()).unwrap_or_default();
        let certificate = identity.map(|i| i.names()).unwrap_or_default();
        if tracker.refuse(&facts.id, &facts.cluster, &addr, certificate, &message) {
            if let Some(left_out) = log_limit::REFUSALS.admit() {
                tracing::warn!(node_id = %Cut(&facts.id), cluster = %Cut(&facts.cluster), peer = %addr, reason = %Cut(&message), left_out, "xDS stream refused: the node does not match the client certificate (logged once per node and certificate; see /api/v1/refusals)");
            }
        }
        Err(Status::permission_denied(message))
    }

    /// Whether sensitive resources are kept from this client.
    fn withholds(&self, peer: &PeerInfo) -> bool {
        self.sensitive_to_authenticated_only && peer.identity.is_none()
    }
}

/// Builds the per-stream handlers of the xDS methods; cheap to clone.
#[derive(Debug, Clone)]
pub struct XdsServices {
    ctx: XdsContext,
}

/// What every response names as its `control_plane.identifier`.
pub const CONTROL_PLANE_ID: &str = concat!("filterplane/", env!("CARGO_PKG_VERSION"));

const ECDS: Option<ResourceType> = Some(ResourceType::ExtensionConfig);

/// The xDS methods, by gRPC path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    AdsSotw,
    AdsDelta,
    EcdsSotw,
    EcdsDelta,
    /// `FetchExtensionConfigs`: one request, one answer.
    EcdsFetch,
    /// Client status: `StreamClientStatus` and `FetchClientStatus`.
    CsdsStream,
    CsdsFetch,
    /// Envoy's metrics service sink: `StreamMetrics`.
    Metrics,
}

impl Method {
    pub fn from_path(path: &[u8]) -> Option<Method> {
        Some(match path {
            b"/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources" => Method::AdsSotw,
            b"/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources" => Method::AdsDelta,
            b"/envoy.service.extension.v3.ExtensionConfigDiscoveryService/StreamExtensionConfigs" => Method::EcdsSotw,
            b"/envoy.service.extension.v3.ExtensionConfigDiscoveryService/DeltaExtensionConfigs" => Method::EcdsDelta,
            b"/envoy.service.extension.v3.ExtensionConfigDiscoveryService/FetchExtensionConfigs" => Method::EcdsFetch,
            b"/envoy.service.status.v3.ClientStatusDiscoveryService/StreamClientStatus" => Method::CsdsStream,
            b"/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus" => Method::CsdsFetch,
            b"/envoy.service.metrics.v3.MetricsService/StreamMetrics" => Method::Metrics,
            _ => return None,
        })
    }
}

/// What a connection knows of its client, lent to its streams.
#[derive(Debug, Clone, Default)]
pub struct ConnPeer {
    pub info: PeerInfo,
    /// The address, as logged and shown.
    pub addr: String,
    /// Sensitive resources are kept from this connection's streams.
    pub withhold: bool,
}

impl XdsServices {
    pub fn new(ctx: XdsContext) -> Self {
        Self { ctx }
    }

    pub fn ctx(&self) -> &XdsContext {
        &self.ctx
    }

    /// What the connection keeps of its client.
    pub fn peer(&self, info: PeerInfo) -> ConnPeer {
        let addr = info.addr.map(|a| a.to_string()).unwrap_or_default();
        let withhold = self.ctx.security.withholds(&info);
        ConnPeer { info, addr, withhold }
    }

    /// The handler of one new stream of `method`.
    pub fn open(&self, method: Method) -> Handler {
        let settings = self.ctx.settings.clone();
        match method {
            Method::AdsSotw => {
                Handler::Sotw(Box::new(XdsStream::new(SotwStream::with_settings(None, CONTROL_PLANE_ID, settings))))
            }
            Method::EcdsSotw => {
                Handler::Sotw(Box::new(XdsStream::new(SotwStream::with_settings(ECDS, CONTROL_PLANE_ID, settings))))
            }
            Method::AdsDelta => {
                Handler::Delta(Box::new(XdsStream::new(DeltaStream::with_settings(None, CONTROL_PLANE_ID, settings))))
            }
            Method::EcdsDelta => {
                Handler::Delta(Box::new(XdsStream::new(DeltaStream::with_settings(ECDS, CONTROL_PLANE_ID, settings))))
            }
            Method::EcdsFetch => Handler::Fetch,
            Method::CsdsStream => Handler::Csds { unary: false },
            Method::CsdsFetch => Handler::Csds { unary: true },
            Method::Metrics => Handler::Metrics(Box::default()),
        }
    }

    /// A client status (CSDS) request, answered as a gRPC message. With `--node-identity`
    /// rules only a client with a certificate may ask (it sees other proxies' configs);
    /// resources that hold a secret are never sent with their content.
    pub fn client_status(&self, peer: &ConnPeer, bytes: &[u8]) -> Result<Vec<u8>, Status> {
        if !self.ctx.security.rules.0.is_empty() && peer.info.identity.is_none() {
            return Err(Status::permission_denied(
                "client status needs a client certificate here (--node-identity is set)",
            ));
        }
        let req = filterplane_api::envoy_types::pb::envoy::service::status::v3::ClientStatusRequest::decode(bytes)
            .map_err(|e| Status::invalid_argument(format!("could not decode the request: {e}")))?;
        let answer = crate::xds::csds::answer(&req, &self.ctx.tracker, &self.ctx.cache, !peer.withhold)?;
        let body = answer.encode_to_vec();
        if body.len() > MAX_CSDS_RESPONSE_BYTES {
            self.ctx.tracker.metrics().limit_hit("csds_response_bytes");
            return Err(Status::resource_exhausted(format!(
                "the client status of every proxy asked for is {} bytes, over the limit of {MAX_CSDS_RESPONSE_BYTES}: ask for fewer (node_matchers) or set exclude_resource_contents",
                body.len()
            )));
        }
        let mut framed = Vec::with_capacity(body.len() + 5);
        framed.push(0);
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(&body);
        Ok(framed)
    }

    /// REST-style fetch: one request, the current answer (also when unchanged).
    pub fn fetch_extension_configs(
        &self,
        peer: &ConnPeer,
        mut req: DiscoveryRequest,
    ) -> Result<Wire<DiscoveryResponse>, Status> {
        let node = req.node.as_ref().ok_or(ProtocolError::MissingNode).map_err(status_of)?;
        let facts = NodeInfo::from(node).facts;
        self.ctx.security.admit(&self.ctx.tracker, &peer.info, &facts)?;
        let generation = self.ctx.cache.current().ok_or_else(|| Status::unavailable("no configuration loaded yet"))?;
        let mut machine = SotwStream::new(ECDS, CONTROL_PLANE_ID);
        let now = Instant::now();
        machine.on_snapshot_wire(generation.snapshot_for_stream(&facts, peer.withhold), now);
        // A fetch always answers: forget what the client says it has.
        req.version_info.clear();
        req.response_nonce.clear();
        req.error_detail = None;
        let mut step = machine.on_request_wire(req, now).map_err(status_of)?;
        step.responses.pop().ok_or_else(|| Status::internal("no response computed"))
    }
}

/// The handler of one stream, by method.
#[derive(Debug)]
pub enum Handler {
    Sotw(Box<XdsStream<SotwStream>>),
    Delta(Box<XdsStream<DeltaStream>>),
    /// Waits for its one request.
    Fetch,
    /// Client status (CSDS): each request answered; `unary`: one request, one answer.
    Csds {
        unary: bool,
    },
    /// Envoy's stats, for rollout health gates.
    Metrics(Box<crate::xds::metrics_service::MetricsStream>),
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr, fetch => $f:expr) => {
        match $self {
            Handler::Sotw($s) => $e,
            Handler::Delta($s) => $e,
            Handler::Fetch | Handler::Csds { .. } | Handler::Metrics(_) => $f,
        }
    };
}

/// A configuration generation (`None`: none loaded yet), and when it was published:
/// every stream takes its step as happening then, so a push reads the clock once, not
/// once per stream. (A hold's grace then counts from the publish, at most a scheduling
/// delay earlier than from the stream's turn.)
#[derive(Debug, Clone)]
pub struct NewGeneration(pub Option<Arc<Generation>>, pub Instant);

/// What one connection's streams share: the xDS services and the peer.
#[derive(Debug)]
pub struct XdsConn {
    pub services: XdsServices,
    pub peer: ConnPeer,
}

impl ConnContext for XdsConn {
    fn peer(&self) -> &str {
        &self.peer.addr
    }

    fn limit_hit(&self, limit: &'static str) {
        self.services.ctx.tracker.metrics().limit_hit(limit);
    }
}

impl filterplane_h2::Handler for Handler {
    type Context = XdsConn;
    type Event = NewGeneration;
    type Method = Method;

    fn route(path: &[u8]) -> Option<Method> {
        Method::from_path(path)
    }

    fn open(ctx: &XdsConn, method: Method) -> Self {
        ctx.services.open(method)
    }

    fn on_message(&mut self, ctx: &XdsConn, bytes: &[u8], out: &mut Output) {
        let (services, peer) = (&ctx.services, &ctx.peer);
        if let Handler::Metrics(m) = self {
            m.on_message(&services.ctx, peer, bytes, out);
            return;
        }
        if let Handler::Csds { unary } = self {
            match services.client_status(peer, bytes) {
                Ok(bytes) => out.messages.push(OutMessage { bytes, supersedes: None }),
                Err(status) => out.end = Some(status),
            }
            if *unary && out.end.is_none() {
                out.end = Some(Status::ok(""));
            }
            return;
        }
        each!(self, s => s.on_message(&services.ctx, peer, bytes, out), fetch => {
            let result = DiscoveryRequest::decode(bytes)
                .map_err(|e| Status::internal(format!("could not decode the request: {e}")))
                .and_then(|req| services.fetch_extension_configs(peer, req))
                .map(Wire::into_grpc);
            match result {
                Ok(bytes) => {
                    out.messages.push(OutMessage { bytes, supersedes: None });
                    out.end = Some(Status::ok(""));
                }
                Err(status) => out.end = Some(status),
            }
        })
    }

    fn on_requests_end(&mut self, _ctx: &XdsConn, out: &mut Output) {
        if let Handler::Metrics(m) = self {
            m.on_end(out);
            return;
        }
        out.end = Some(match self {
            Handler::Fetch | Handler::Csds { unary: true } => Status::invalid_argument("no request sent"),
            _ => Status::ok(""),
        });
    }

    /// A new generation of the configuration.
    fn on_event(&mut self, ctx: &XdsConn, event: &NewGeneration, out: &mut Output) {
        let NewGeneration(Some(generation), at) = event else { return };
        each!(self, s => s.on_generation(&ctx.services.ctx, &ctx.peer, generation, *at, out), fetch => ())
    }

    fn next_wakeup(&self) -> Option<Instant> {
        each!(self, s => s.machine.next_wakeup(), fetch => None)
    }

    fn on_timer(&mut self, ctx: &XdsConn, now: Instant, out: &mut Output) {
        each!(self, s => {
            let step = Protocol::on_timer(&mut s.machine, now);
            s.after(&ctx.services.ctx, step, now, out)
        }, fetch => ())
    }
}

/// One xDS stream: its protocol state machine, and its place in the tracker. Dropping it
/// (the client went away, or the server ended the stream) takes the proxy out of the
/// tracker.
#[derive(Debug)]
pub struct XdsStream<P: Protocol> {
    machine: P,
    /// Set once the node is identified; with the tracker to leave on drop.
    registered: Option<(Tracked, Arc<AckTracker>, Box<str>)>,
}

impl<P: Protocol> Drop for XdsStream<P> {
    fn drop(&mut self) {
        if let Some((tracked, tracker, peer)) = self.registered.take() {
            tracker.disconnect(tracked.id);
            let node_id = self.machine.core().node().map(|n| n.facts.id.as_str()).unwrap_or_default();
            if let Some(left_out) = log_limit::CONNECTS.admit() {
                tracing::info!(node_id = %Cut(node_id), peer = %peer, left_out, "proxy disconnected");
            }
        }
    }
}

impl<P: Protocol> XdsStream<P>
where
    P::Response: prost::Message,
{
    fn new(machine: P) -> Self {
        Self { machine, registered: None }
    }

    fn on_message(&mut self, ctx: &XdsContext, peer: &ConnPeer, bytes: &[u8], out: &mut Output) {
        let decoded = match &self.registered {
            Some(_) => P::decode_without_node(bytes),
            None => P::decode_first(bytes),
        };
        let req = match decoded {
            Ok(r) => r,
            Err(e) => {
                // Not protobuf: the client is told why, not given a clean end.
                if let Some(left_out) = log_limit::REFUSALS.admit() {
                    tracing::warn!(peer = %peer.addr, error = %e, left_out, "closing xDS stream: unreadable request");
                }
                out.end = Some(Status::internal(format!("could not decode the request: {e}")));
                return;
            }
        };
        if let Err(status) = self.identify(ctx, peer, &req) {
            out.end = Some(status);
            return;
        }
        let now = Instant::now();
        match self.machine.on_request(req, now) {
            Ok(step) => self.after(ctx, step, now, out),
            Err(e) => {
                if let Some(limit) = e.limit() {
                    ctx.tracker.metrics().limit_hit(limit);
                }
                if let Some(left_out) = log_limit::REFUSALS.admit() {
                    tracing::warn!(peer = %peer.addr, error = %Cut(&e.to_string()), left_out, "closing xDS stream");
                }
                out.end = Some(status_of(e));
            }
        }
    }

    /// A new generation, published at `at`: the step happens then for every stream.
    fn on_generation(
        &mut self,
        ctx: &XdsContext,
        peer: &ConnPeer,
        generation: &Generation,
        at: Instant,
        out: &mut Output,
    ) {
        let Some(node) = self.machine.core().node() else { return };
        let snapshot = generation.snapshot_for_stream(&node.facts, peer.withhold);
        let step = self.machine.on_snapshot(snapshot, at);
        // What it sends goes out now (the tracker times the ACK from here), whatever
        // the step took as its time; the clock is read only then.
        let now = if step.events.is_empty() { at } else { Instant::now() };
        if step.events.iter().any(|e| matches!(e, StreamEvent::Sent { .. })) {
            ctx.tracker.metrics().xds_push_fanout.observe(now.saturating_duration_since(at).as_secs_f64());
        }
        self.after(ctx, step, now, out);
    }

    /// Records what a step did (at `now`) and encodes what it sends.
    fn after(&mut self, ctx: &XdsContext, step: Step<Wire<P::Response>>, now: Instant, out: &mut Output) {
        for limit in &step.limits {
            ctx.tracker.metrics().limit_hit(limit);
        }
        let node_id = self.machine.core().node().map(|n| n.facts.id.as_str()).unwrap_or_default();
        for event in &step.events {
            log_event(node_id, event);
            if let Some((tracked, tracker, _)) = &self.registered {
                tracker.record_on(tracked, event, now);
            }
        }
        // Each response has its `Sent` event, in order. A SotW response (the whole state
        // of its type) that still waits unsent is replaced by a newer one of its type.
        let sent = step.events.iter().filter_map(|e| match e {
            StreamEvent::Sent { rt, incremental, .. } => Some((!*incremental).then_some(*rt as u8)),
            _ => None,
        });
        out.messages.extend(
            step.responses
                .into_iter()
                .zip(sent.chain(std::iter::repeat(None)))
                .map(|(w, supersedes)| OutMessage { bytes: w.into_grpc(), supersedes }),
        );
        if step.limits.contains(&crate::xds::wire::RESPONSE_BYTES) {
            out.end = Some(Status::resource_exhausted(
                "a response for this proxy would be over gRPC's 4 GiB (its resources are too large together)",
            ));
        }
    }

    /// On the first request that names the node: check it against the client
    /// certificate, register the proxy and hand the machine its snapshot.
    fn identify(&mut self, ctx: &XdsContext, peer: &ConnPeer, req: &P::Request) -> Result<(), Status> {
        if self.registered.is_some() {
            return Ok(());
        }
        let Some(node) = P::request_node(req) else { return Ok(()) };
        let longest = node.id.len().max(node.cluster.len());
        if longest > MAX_NODE_ID_BYTES {
            // Node ids go into every log line, report and page about the proxy (a 1.1 MB
            // one made a replica's etcd report too large for etcd).
            ctx.tracker.metrics().limit_hit("node_id_bytes");
            return Err(Status::invalid_argument(format!(
                "the node's id or cluster is {longest} bytes, over the limit of {MAX_NODE_ID_BYTES}"
            )));
        }
        let info = Arc::new(NodeInfo::from(node));
        ctx.security.admit(&ctx.tracker, &peer.info, &info.facts)?;
        self.machine.core_mut().set_node(info.clone());
        let auth = PeerAuth {
            tls: peer.info.tls,
            certificate: peer.info.identity.as_ref().map(|i| i.names()).unwrap_or_default(),
            sensitive_withheld: peer.withhold,
        };
        let tracked = ctx.tracker.connect_tracked(info.clone(), P::KIND, peer.addr.clone(), auth);
        self.registered = Some((tracked, ctx.tracker.clone(), peer.addr.as_str().into()));
        if let Some(left_out) = log_limit::CONNECTS.admit() {
            tracing::info!(node_id = %Cut(&info.facts.id), cluster = %Cut(&info.facts.cluster), peer = %peer.addr, user_agent = %Cut(&info.user_agent), kind = P::KIND.label(), tls = peer.info.tls, authenticated = peer.info.identity.is_some(), left_out, "proxy connected");
        }
        if let Some(g) = ctx.cache.current() {
            // Nothing is subscribed yet: the first answer comes from the request itself,
            // and this only sets the snapshot.
            let _ = self.machine.on_snapshot(g.snapshot_for_stream(&info.facts, peer.withhold), Instant::now());
        }
        Ok(())
    }
}

fn log_event(node_id: &str, event: &StreamEvent) {
    match event {
        StreamEvent::Nacked { rt, version, nonce, code, message, .. } => {
            if let Some(left_out) = log_limit::NACKS.admit() {
                tracing::warn!(node_id = %Cut(node_id), type_url = %rt, version, nonce = %Cut(nonce), code, error_detail = %Cut(message), left_out, "NACK")
            }
        }
        StreamEvent::Acked { rt, version, nonce, .. } => {
            tracing::debug!(node_id = %Cut(node_id), type_url = %rt, version, nonce = %Cut(nonce), "ACK")
        }
        StreamEvent::Sent { rt, version, nonce, resources, removed, bytes, .. } => {
            tracing::debug!(node_id = %Cut(node_id), type_url = %rt, version = %version, nonce = %nonce, resources = resources.len(), removed = removed.len(), bytes, "sent")
        }
        StreamEvent::Subscribed { rt, wildcard, names } => {
            tracing::debug!(node_id = %Cut(node_id), type_url = %rt, wildcard, names = names.len(), "subscription")
        }
        StreamEvent::Current { rt, version, .. } => {
            tracing::debug!(node_id = %Cut(node_id), type_url = %rt, version, "client is up to date; nothing sent")
        }
        StreamEvent::CodeFetchPending { rt, version, nonce, message, attempt, retries, .. } => {
            if let Some(left_out) = log_limit::NACKS.admit() {
                tracing::info!(node_id = %Cut(node_id), type_url = %rt, version, nonce = %Cut(nonce), error_detail = %Cut(message), attempt, retries, left_out, "NACK while Envoy fetches a Wasm module; sending it again")
            }
        }
        StreamEvent::UnsupportedType { type_url } => {
            if let Some(left_out) = log_limit::REFUSALS.admit() {
                tracing::warn!(node_id = %Cut(node_id), type_url = %Cut(type_url), left_out, "request for a type Filterplane does not serve; not answered")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use filterplane_api::ResourceType;

    use super::*;

    /// Everything logged, as the fmt layer writes it.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn what_clients_send_cannot_forge_a_log_line() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            let nack = StreamEvent::Nacked {
                rt: ResourceType::ExtensionConfig,
                version: "v".into(),
                kept_version: String::new(),
                nonce: "1\nFORGED nonce".into(),
                code: 13,
                message: "bad\n2026-01-01T00:00:00Z  INFO FORGED line\u{1b}[31m".into(),
                resources: vec![],
            };
            log_event("evil\nFORGED node", &nack);
            log_event("n", &StreamEvent::UnsupportedType { type_url: "t\nFORGED type".into() });
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2, "one line per event: {text}");
        assert!(!text.contains('\u{1b}'), "no raw escape sequence: {text:?}");
        assert!(text.lines().all(|l| !l.starts_with("FORGED") && !l.starts_with("2026-01-01")), "{text}");
    }
}
