//! The gRPC services: ADS and the standalone ECDS service, state of the world and delta.
//! Each stream is one loop, the same for both flavours, that feeds requests and new
//! snapshots to its state machine and sends what it returns.

use std::{pin::Pin, sync::Arc, time::Instant};

use filterplane_api::{
    envoy_types::pb::envoy::{
        config::core::v3::Node,
        service::{
            discovery::v3::{
                aggregated_discovery_service_server::AggregatedDiscoveryService, DeltaDiscoveryRequest,
                DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            },
            extension::v3::extension_config_discovery_service_server::ExtensionConfigDiscoveryService,
        },
    },
    ResourceType,
};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use filterplane_config::NodeFacts;

use crate::{
    cache::{Snapshot, SnapshotCache},
    identity::IdentityRules,
    tls::PeerInfo,
    tracker::{AckTracker, PeerAuth, StreamId, StreamKind},
    xds::{
        delta::DeltaStream,
        sotw::SotwStream,
        stream::{NodeInfo, Step, StreamCore, StreamEvent, StreamSettings},
        ProtocolError,
    },
};

/// What every stream needs from the rest of the server.
#[derive(Debug, Clone)]
pub struct XdsContext {
    pub cache: Arc<SnapshotCache>,
    pub tracker: Arc<AckTracker>,
    pub shutdown: CancellationToken,
    pub settings: Arc<StreamSettings>,
    pub security: Arc<XdsSecurity>,
}

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
    fn admit(&self, tracker: &AckTracker, peer: &PeerInfo, facts: &NodeFacts) -> Result<(), Status> {
        let identity = peer.identity.as_deref();
        let Err(message) = self.rules.check(identity, &facts.id, &facts.cluster) else { return Ok(()) };
        let addr = peer.addr.map(|a| a.to_string()).unwrap_or_default();
        let certificate = identity.map(|i| i.names()).unwrap_or_default();
        if tracker.refuse(&facts.id, &facts.cluster, &addr, certificate, &message) {
            tracing::warn!(node_id = ?facts.id, cluster = ?facts.cluster, peer = %addr, reason = ?message, "xDS stream refused: the node does not match the client certificate (logged once per node and certificate; see /api/v1/refusals)");
        }
        Err(Status::permission_denied(message))
    }

    /// Whether sensitive resources are kept from this client.
    fn withholds(&self, peer: &PeerInfo) -> bool {
        self.sensitive_to_authenticated_only && peer.identity.is_none()
    }
}

/// A protocol state machine the stream loop can drive.
pub trait Protocol: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    const KIND: StreamKind;

    fn request_node(req: &Self::Request) -> Option<&Node>;
    fn core(&self) -> &StreamCore;
    fn core_mut(&mut self) -> &mut StreamCore;
    fn on_request(&mut self, req: Self::Request) -> Result<Step<Self::Response>, ProtocolError>;
    fn on_snapshot(&mut self, snapshot: Arc<Snapshot>) -> Step<Self::Response>;
    /// When `on_timer` has something to do next, if ever.
    fn next_wakeup(&self) -> Option<Instant>;
    fn on_timer(&mut self, now: Instant) -> Step<Self::Response>;
}

impl Protocol for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const KIND: StreamKind = StreamKind::Sotw;

    fn request_node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn core(&self) -> &StreamCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut StreamCore {
        &mut self.core
    }
    fn on_request(&mut self, req: DiscoveryRequest) -> Result<Step<DiscoveryResponse>, ProtocolError> {
        SotwStream::on_request(self, req)
    }
    fn on_snapshot(&mut self, snapshot: Arc<Snapshot>) -> Step<DiscoveryResponse> {
        SotwStream::on_snapshot(self, snapshot)
    }
    fn next_wakeup(&self) -> Option<Instant> {
        SotwStream::next_wakeup(self)
    }
    fn on_timer(&mut self, now: Instant) -> Step<DiscoveryResponse> {
        SotwStream::on_timer(self, now)
    }
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const KIND: StreamKind = StreamKind::Delta;

    fn request_node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn core(&self) -> &StreamCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut StreamCore {
        &mut self.core
    }
    fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<Step<DeltaDiscoveryResponse>, ProtocolError> {
        DeltaStream::on_request(self, req)
    }
    fn on_snapshot(&mut self, snapshot: Arc<Snapshot>) -> Step<DeltaDiscoveryResponse> {
        DeltaStream::on_snapshot(self, snapshot)
    }
    fn next_wakeup(&self) -> Option<Instant> {
        DeltaStream::next_wakeup(self)
    }
    fn on_timer(&mut self, now: Instant) -> Step<DeltaDiscoveryResponse> {
        DeltaStream::on_timer(self, now)
    }
}

/// Implements the gRPC service traits; cheap to clone.
#[derive(Debug, Clone)]
pub struct XdsServices {
    ctx: XdsContext,
}

pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl XdsServices {
    pub fn new(ctx: XdsContext) -> Self {
        Self { ctx }
    }

    /// The response stream *is* the stream's loop: no task and no channel per stream.
    /// It runs while tonic polls it, so a client that stops reading (HTTP/2 flow control)
    /// also stops its requests from being read.
    fn start<P: Protocol>(&self, machine: P, request: Request<Streaming<P::Request>>) -> ResponseStream<P::Response> {
        let info = peer_info(&request);
        let peer = info.addr.map(|a| a.to_string()).unwrap_or_default();
        let withhold = self.ctx.security.withholds(&info);
        let state = StreamLoop {
            info: Some(Box::new(info)),
            withhold,
            generations: self.ctx.cache.subscribe(),
            ctx: self.ctx.clone(),
            machine,
            requests: request.into_inner(),
            peer,
            stream_id: None,
            pending: Vec::new().into_iter(),
            done: false,
        };
        Box::pin(futures_util::stream::unfold(state, |mut s| async move { s.next().await.map(|item| (item, s)) }))
    }
}

/// What every response names as its `control_plane.identifier`.
pub const CONTROL_PLANE_ID: &str = concat!("filterplane/", env!("CARGO_PKG_VERSION"));

/// One stream's loop state. Dropping it (the client went away, or the server shut the
/// stream) takes the proxy out of the tracker.
struct StreamLoop<P: Protocol> {
    ctx: XdsContext,
    machine: P,
    requests: Streaming<P::Request>,
    generations: tokio::sync::watch::Receiver<Option<Arc<crate::cache::Generation>>>,
    peer: String,
    /// The connection's TLS and client certificate, until the node is identified (boxed
    /// and then dropped: every idle stream would carry it).
    info: Option<Box<PeerInfo>>,
    /// Sensitive resources are kept from this stream.
    withhold: bool,
    stream_id: Option<StreamId>,
    /// Responses of the last step not sent yet. Emptied (allocation and all) once
    /// sent, so an idle stream holds none.
    pending: std::vec::IntoIter<P::Response>,
    done: bool,
}

impl<P: Protocol> Drop for StreamLoop<P> {
    fn drop(&mut self) {
        if let Some(id) = self.stream_id {
            self.ctx.tracker.disconnect(id);
            let node_id = self.machine.core().node().map(|n| n.facts.id.as_str()).unwrap_or_default();
            tracing::info!(node_id = ?node_id, peer = %self.peer, "proxy disconnected");
        }
    }
}

impl<P: Protocol> StreamLoop<P> {
    /// The next response to send; `None` ends the stream.
    async fn next(&mut self) -> Option<Result<P::Response, Status>> {
        loop {
            if let Some(r) = self.pending.next() {
                if self.pending.len() == 0 {
                    self.pending = Vec::new().into_iter();
                }
                return Some(Ok(r));
            }
            if self.done {
                return None;
            }
            let wakeup = self.machine.next_wakeup();
            let step = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return None,
                _ = sleep_until(wakeup) => self.machine.on_timer(Instant::now()),
                msg = self.requests.message() => match msg {
                    Ok(Some(req)) => {
                        if let Err(status) = self.identify(&req) {
                            self.done = true;
                            return Some(Err(status));
                        }
                        match self.machine.on_request(req) {
                            Ok(step) => step,
                            Err(e) => {
                                if let Some(limit) = e.limit() {
                                    self.ctx.tracker.metrics().limit_hit(limit);
                                }
                                tracing::warn!(peer = %self.peer, error = %e, "closing xDS stream");
                                self.done = true;
                                return Some(Err(e.into()));
                            }
                        }
                    }
                    Ok(None) => return None,
                    // A request the server could not read (over the 4 MiB message limit, not
                    // protobuf): the client is told why, not given a clean end.
                    Err(status) if matches!(status.code(), tonic::Code::OutOfRange | tonic::Code::Internal) => {
                        tracing::warn!(peer = %self.peer, status = ?status, "closing xDS stream: unreadable request");
                        self.done = true;
                        return Some(Err(status));
                    }
                    Err(status) => {
                        tracing::debug!(peer = %self.peer, status = ?status, "xDS stream ended by the client");
                        return None;
                    }
                },
                changed = self.generations.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    let generation = self.generations.borrow_and_update().clone();
                    match (generation, self.machine.core().node()) {
                        (Some(g), Some(node)) => {
                            let snapshot = g.snapshot_for_stream(&node.facts, self.withhold);
                            self.machine.on_snapshot(snapshot)
                        }
                        _ => continue,
                    }
                }
            };
            for limit in &step.limits {
                self.ctx.tracker.metrics().limit_hit(limit);
            }
            let node_id = self.machine.core().node().map(|n| n.facts.id.as_str()).unwrap_or_default();
            for event in &step.events {
                log_event(node_id, event);
                if let Some(id) = self.stream_id {
                    self.ctx.tracker.record(id, event);
                }
            }
            self.pending = step.responses.into_iter();
        }
    }

    /// On the first request that names the node: check it against the client
    /// certificate, register the proxy and hand the machine its snapshot.
    fn identify(&mut self, req: &P::Request) -> Result<(), Status> {
        if self.stream_id.is_some() {
            return Ok(());
        }
        let Some(node) = P::request_node(req) else { return Ok(()) };
        let info = Arc::new(NodeInfo::from(node));
        let peer = self.info.take().map(|b| *b).unwrap_or_default();
        self.ctx.security.admit(&self.ctx.tracker, &peer, &info.facts)?;
        self.machine.core_mut().set_node(info.clone());
        let auth = PeerAuth {
            tls: peer.tls,
            certificate: peer.identity.as_ref().map(|i| i.names()).unwrap_or_default(),
            sensitive_withheld: self.withhold,
        };
        self.stream_id = Some(self.ctx.tracker.connect_as(info.clone(), P::KIND, self.peer.clone(), auth));
        tracing::info!(node_id = ?info.facts.id, cluster = ?info.facts.cluster, peer = %self.peer, user_agent = ?info.user_agent, kind = P::KIND.label(), tls = peer.tls, authenticated = peer.identity.is_some(), "proxy connected");
        if let Some(g) = self.generations.borrow_and_update().clone() {
            self.machine.on_snapshot(g.snapshot_for_stream(&info.facts, self.withhold));
        }
        Ok(())
    }
}

/// What the connection says about the client (TLS, certificate, address).
fn peer_info<T>(request: &Request<T>) -> PeerInfo {
    request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .unwrap_or_else(|| PeerInfo { addr: request.remote_addr(), ..Default::default() })
}

/// Sleeps until `at`, or forever. The timer is boxed: nearly every stream has nothing
/// due, and an inline `Sleep` would sit in every idle stream's state.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => Box::pin(tokio::time::sleep_until(at.into())).await,
        None => std::future::pending().await,
    }
}

fn log_event(node_id: &str, event: &StreamEvent) {
    match event {
        StreamEvent::Nacked { rt, version, nonce, code, message, .. } => {
            tracing::warn!(node_id = ?node_id, type_url = %rt, version, nonce = ?nonce, code, error_detail = ?message, "NACK")
        }
        StreamEvent::Acked { rt, version, nonce, .. } => {
            tracing::debug!(node_id = ?node_id, type_url = %rt, version, nonce = ?nonce, "ACK")
        }
        StreamEvent::Sent { rt, version, nonce, resources, removed, bytes, .. } => {
            tracing::debug!(node_id = ?node_id, type_url = %rt, version, nonce, resources = resources.len(), removed = removed.len(), bytes, "sent")
        }
        StreamEvent::Subscribed { rt, wildcard, names } => {
            tracing::debug!(node_id = ?node_id, type_url = %rt, wildcard, names = names.len(), "subscription")
        }
        StreamEvent::Current { rt, version, .. } => {
            tracing::debug!(node_id = ?node_id, type_url = %rt, version, "client is up to date; nothing sent")
        }
        StreamEvent::CodeFetchPending { rt, version, nonce, message, attempt, retries, .. } => {
            tracing::info!(node_id = ?node_id, type_url = %rt, version, nonce = ?nonce, error_detail = ?message, attempt, retries, "NACK while Envoy fetches a Wasm module; sending it again")
        }
        StreamEvent::UnsupportedType { type_url } => {
            tracing::warn!(node_id = ?node_id, type_url = ?type_url, "request for a type Filterplane does not serve; not answered")
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServices {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(
            self.start(SotwStream::with_settings(None, CONTROL_PLANE_ID, self.ctx.settings.clone()), request),
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(
            self.start(DeltaStream::with_settings(None, CONTROL_PLANE_ID, self.ctx.settings.clone()), request),
        ))
    }
}

const ECDS: Option<ResourceType> = Some(ResourceType::ExtensionConfig);

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for XdsServices {
    type StreamExtensionConfigsStream = ResponseStream<DiscoveryResponse>;
    type DeltaExtensionConfigsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamExtensionConfigsStream>, Status> {
        Ok(Response::new(
            self.start(SotwStream::with_settings(ECDS, CONTROL_PLANE_ID, self.ctx.settings.clone()), request),
        ))
    }

    async fn delta_extension_configs(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaExtensionConfigsStream>, Status> {
        Ok(Response::new(
            self.start(DeltaStream::with_settings(ECDS, CONTROL_PLANE_ID, self.ctx.settings.clone()), request),
        ))
    }

    /// REST-style fetch: one request, the current answer (also when unchanged).
    async fn fetch_extension_configs(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let info = peer_info(&request);
        let mut req = request.into_inner();
        let node = req.node.as_ref().ok_or(ProtocolError::MissingNode)?;
        let facts = NodeInfo::from(node).facts;
        self.ctx.security.admit(&self.ctx.tracker, &info, &facts)?;
        let generation = self.ctx.cache.current().ok_or_else(|| Status::unavailable("no configuration loaded yet"))?;
        let mut machine = SotwStream::new(ECDS, CONTROL_PLANE_ID);
        machine.on_snapshot(generation.snapshot_for_stream(&facts, self.ctx.security.withholds(&info)));
        // A fetch always answers: forget what the client says it has.
        req.version_info.clear();
        req.response_nonce.clear();
        req.error_detail = None;
        let mut step = machine.on_request(req)?;
        step.responses.pop().map(Response::new).ok_or_else(|| Status::internal("no response computed"))
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
