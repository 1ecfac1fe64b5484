//! The gRPC services: ADS and the standalone ECDS service. Each stream is a loop that
//! feeds requests and new snapshots to its state machine and sends what it returns.

use std::{pin::Pin, sync::Arc};

use filterplane_api::{
    envoy_types::pb::envoy::service::{
        discovery::v3::{
            aggregated_discovery_service_server::AggregatedDiscoveryService, DeltaDiscoveryRequest,
            DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        },
        extension::v3::extension_config_discovery_service_server::ExtensionConfigDiscoveryService,
    },
    ResourceType,
};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    cache::SnapshotCache,
    tracker::{AckTracker, StreamId, StreamKind},
    xds::{
        sotw::{SotwStream, Step},
        stream::StreamEvent,
    },
};

/// What every stream needs from the rest of the server.
#[derive(Debug, Clone)]
pub struct XdsContext {
    pub cache: Arc<SnapshotCache>,
    pub tracker: Arc<AckTracker>,
    pub shutdown: CancellationToken,
    /// Owns every stream task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

/// Implements the gRPC service traits; cheap to clone.
#[derive(Debug, Clone)]
pub struct XdsServices {
    ctx: XdsContext,
}

/// How many responses may wait for a slow client before its stream stops reading.
const STREAM_BUFFER: usize = 16;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl XdsServices {
    pub fn new(ctx: XdsContext) -> Self {
        Self { ctx }
    }

    fn start_sotw(
        &self,
        only: Option<ResourceType>,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> ResponseStream<DiscoveryResponse> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let ctx = self.ctx.clone();
        self.ctx.tasks.spawn(run_sotw(ctx, only, request.into_inner(), tx, peer));
        Box::pin(ReceiverStream::new(rx))
    }
}

fn control_plane_id() -> String {
    format!("filterplane/{}", env!("CARGO_PKG_VERSION"))
}

async fn run_sotw(
    ctx: XdsContext,
    only: Option<ResourceType>,
    mut requests: Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    peer: String,
) {
    let mut machine = SotwStream::new(only, control_plane_id());
    let mut generations = ctx.cache.subscribe();
    let mut stream_id: Option<StreamId> = None;
    loop {
        let step = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            msg = requests.message() => match msg {
                Ok(Some(req)) => {
                    if stream_id.is_none() {
                        if let Some(node) = req.node.as_ref() {
                            let info = crate::xds::stream::NodeInfo::from(node);
                            let id = ctx.tracker.connect(&info, StreamKind::Sotw, peer.clone());
                            tracing::info!(node_id = %info.facts.id, cluster = %info.facts.cluster, %peer, user_agent = %info.user_agent, "proxy connected");
                            stream_id = Some(id);
                            if let Some(g) = generations.borrow_and_update().clone() {
                                machine.on_snapshot(g.snapshot_for(&info.facts));
                            }
                        }
                    }
                    match machine.on_request(req) {
                        Ok(step) => step,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "closing xDS stream");
                            let _ = tx.send(Err(e.into())).await;
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(%peer, %status, "xDS stream ended by the client");
                    break;
                }
            },
            changed = generations.changed() => {
                if changed.is_err() {
                    break;
                }
                let generation = generations.borrow_and_update().clone();
                match (generation, machine.node()) {
                    (Some(g), Some(node)) => machine.on_snapshot(g.snapshot_for(&node.facts)),
                    _ => continue,
                }
            }
        };
        if !deliver(&ctx, stream_id, &machine, step, &tx).await {
            break;
        }
    }
    if let Some(id) = stream_id {
        ctx.tracker.disconnect(id);
        let node_id = machine.node().map(|n| n.facts.id.as_str()).unwrap_or_default();
        tracing::info!(node_id, %peer, "proxy disconnected");
    }
}

/// Records the step's events and sends its responses. False when the client is gone.
async fn deliver(
    ctx: &XdsContext,
    stream_id: Option<StreamId>,
    machine: &SotwStream,
    step: Step,
    tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
) -> bool {
    let node_id = machine.node().map(|n| n.facts.id.as_str()).unwrap_or_default();
    for event in &step.events {
        log_event(node_id, event);
        if let Some(id) = stream_id {
            ctx.tracker.record(id, event);
        }
    }
    for response in step.responses {
        if tx.send(Ok(response)).await.is_err() {
            return false;
        }
    }
    true
}

fn log_event(node_id: &str, event: &StreamEvent) {
    match event {
        StreamEvent::Nacked { rt, version, nonce, code, message, .. } => {
            tracing::warn!(node_id, type_url = %rt, version, nonce, code, message, "NACK")
        }
        StreamEvent::Acked { rt, version, nonce } => {
            tracing::debug!(node_id, type_url = %rt, version, nonce, "ACK")
        }
        StreamEvent::Sent { rt, version, nonce, resources, bytes } => {
            tracing::debug!(node_id, type_url = %rt, version, nonce, resources = resources.len(), bytes, "sent")
        }
        StreamEvent::Subscribed { rt, wildcard, names } => {
            tracing::debug!(node_id, type_url = %rt, wildcard, ?names, "subscription")
        }
        StreamEvent::Current { rt, version, .. } => {
            tracing::debug!(node_id, type_url = %rt, version, "client is up to date; nothing sent")
        }
        StreamEvent::UnsupportedType { type_url } => {
            tracing::warn!(node_id, type_url, "request for a type Filterplane does not serve; not answered")
        }
    }
}

const DELTA_NOT_YET: &str =
    "incremental (delta) xDS is not served yet: configure the xDS source with api_type GRPC (state of the world)";

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServices {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.start_sotw(None, request)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(DELTA_NOT_YET))
    }
}

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for XdsServices {
    type StreamExtensionConfigsStream = ResponseStream<DiscoveryResponse>;
    type DeltaExtensionConfigsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamExtensionConfigsStream>, Status> {
        Ok(Response::new(self.start_sotw(Some(ResourceType::ExtensionConfig), request)))
    }

    async fn delta_extension_configs(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaExtensionConfigsStream>, Status> {
        Err(Status::unimplemented(DELTA_NOT_YET))
    }

    /// REST-style fetch: one request, the current answer (also when unchanged).
    async fn fetch_extension_configs(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let mut req = request.into_inner();
        let node = req.node.as_ref().ok_or_else(|| Status::invalid_argument("the request must carry the node"))?;
        let generation = self.ctx.cache.current().ok_or_else(|| Status::unavailable("no configuration loaded yet"))?;
        let mut machine = SotwStream::new(Some(ResourceType::ExtensionConfig), control_plane_id());
        machine.on_snapshot(generation.snapshot_for(&crate::xds::stream::NodeInfo::from(node).facts));
        // A fetch always answers: forget what the client says it has.
        req.version_info.clear();
        req.response_nonce.clear();
        req.error_detail = None;
        let mut step = machine.on_request(req)?;
        step.responses.pop().map(Response::new).ok_or_else(|| Status::internal("no response computed"))
    }
}
