//! One simulated Envoy: subscribes like Envoy does, ACKs (or NACKs) every response, and
//! notes when its configs arrive.

use std::{
    collections::HashSet,
    marker::PhantomData,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Instant,
};

use filterplane_api::{
    envoy_types::pb::{
        envoy::{
            config::core::v3::Node,
            service::discovery::v3::{
                DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            },
        },
        google::{
            protobuf::{value::Kind, Struct, Value},
            rpc::Status,
        },
    },
    ResourceType,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{LoadSpec, Mode, ProxyTimes, Shared};

fn node(i: usize, spec: &LoadSpec) -> Node {
    let fields =
        spec.metadata.iter().map(|(k, v)| (k.clone(), Value { kind: Some(Kind::StringValue(v.clone())) })).collect();
    Node {
        id: format!("{}-{i}", spec.node_prefix),
        cluster: spec.cluster.clone(),
        metadata: Some(Struct { fields }),
        user_agent_name: "xds-loadgen".into(),
        ..Default::default()
    }
}

/// The types this proxy subscribes to, in Envoy's order: CDS, EDS, LDS, then ECDS.
fn subscriptions(spec: &LoadSpec) -> Vec<(ResourceType, Vec<String>)> {
    let mut subs = Vec::new();
    if spec.wildcard_lds_cds {
        subs.push((ResourceType::Cluster, vec![]));
    }
    if !spec.eds.is_empty() {
        subs.push((ResourceType::ClusterLoadAssignment, spec.eds.clone()));
    }
    if spec.wildcard_lds_cds {
        subs.push((ResourceType::Listener, vec![]));
    }
    if !spec.ecds.is_empty() {
        subs.push((ResourceType::ExtensionConfig, spec.ecds.clone()));
    }
    subs
}

fn error(shared: &Shared, e: impl std::fmt::Display) {
    shared.errors.lock().unwrap_or_else(|p| p.into_inner()).push(e.to_string());
}

/// What one proxy notes about every response it gets, whatever the protocol.
struct Tally<'a> {
    i: usize,
    started: Instant,
    seen: HashSet<String>,
    want: usize,
    times: &'a [Mutex<ProxyTimes>],
    shared: &'a Shared,
}

impl Tally<'_> {
    /// Counts a response of `type_url` and `len` bytes and notes when it arrived.
    fn received(&mut self, type_url: &str, len: usize) {
        let shared = self.shared;
        shared.messages.fetch_add(1, Ordering::Relaxed);
        shared.bytes.fetch_add(len as u64, Ordering::Relaxed);
        let armed = shared.change_armed.load(Ordering::Acquire);
        if armed {
            shared.change_bytes.fetch_add(len as u64, Ordering::Relaxed);
        }
        self.seen.insert(type_url.to_owned());
        let now = Instant::now();
        let Ok(mut t) = self.times[self.i].lock() else { return };
        if t.first_full_config.is_none() && self.seen.len() >= self.want {
            t.first_full_config = Some(now - self.started);
        }
        // A change is an extension config's or an endpoint assignment's.
        let changeable = [ResourceType::ExtensionConfig, ResourceType::ClusterLoadAssignment];
        if armed && changeable.iter().any(|rt| rt.type_url() == type_url) && t.change_received.is_none() {
            if let Some(written) = *shared.change_written.lock().unwrap_or_else(|p| p.into_inner()) {
                t.change_received = Some(now.saturating_duration_since(written));
            }
        }
    }

    /// Counts the answer and gives the `error_detail` of a NACK.
    fn answer(&self, refuse: bool, message_bytes: usize) -> Option<Status> {
        if refuse {
            self.shared.nacks.fetch_add(1, Ordering::Relaxed);
            let mut message = String::from("xds-loadgen: NACK requested");
            if message_bytes > message.len() {
                message.extend(std::iter::repeat_n('.', message_bytes - message.len()));
            }
            Some(Status { code: 13, message, details: vec![] })
        } else {
            self.shared.acks.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// A stream's requests, boxed in the channel: tokio's channel allocates a block of 32 slots
/// whatever its capacity, and boxed, a slot is a pointer rather than a whole request (the
/// generator's memory per stream is what bounds how many streams one machine simulates).
fn request_channel<T: Send + 'static>() -> (mpsc::Sender<Box<T>>, impl tokio_stream::Stream<Item = T> + Send + 'static)
{
    let (tx, rx) = mpsc::channel(16);
    (tx, tokio_stream::StreamExt::map(ReceiverStream::new(rx), |b: Box<T>| *b))
}

const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Starts an ADS stream (the generated client's call, with smaller buffers): tonic's codec
/// keeps an 8 KiB encode and an 8 KiB decode buffer per stream by default, 16 of the 22 KiB
/// each simulated proxy held. Requests are a few hundred bytes and responses grow the
/// decode buffer as they need.
async fn ads_stream<Req, Resp>(
    channel: Channel,
    path: &'static str,
    requests: impl tokio_stream::Stream<Item = Req> + Send + 'static,
) -> Result<tonic::Streaming<Resp>, tonic::Status>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    // A first response can be larger than tonic's 4 MB default: all of 50,000 endpoint
    // assignments is about 7 MB (Envoy's own limit is 2 GB by default).
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
    grpc.ready().await.map_err(|e| tonic::Status::unknown(format!("channel not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let response = grpc.streaming(tonic::Request::new(requests), path, SmallBuffers::<Req, Resp>(PhantomData)).await?;
    Ok(response.into_inner())
}

/// The largest response a simulated proxy decodes.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// prost's codec with 1 KiB buffers to start with.
struct SmallBuffers<Req, Resp>(PhantomData<(Req, Resp)>);

impl<Req, Resp> tonic::codec::Codec for SmallBuffers<Req, Resp>
where
    Req: Message + Send + 'static,
    Resp: Message + Default + Send + 'static,
{
    type Encode = Req;
    type Decode = Resp;
    type Encoder = tonic_prost::ProstEncoder<Req>;
    type Decoder = tonic_prost::ProstDecoder<Resp>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<Req, Resp>::raw_encoder(small_buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<Req, Resp>::raw_decoder(small_buffers())
    }
}

fn small_buffers() -> tonic::codec::BufferSettings {
    // The yield threshold as tonic's default.
    tonic::codec::BufferSettings::new(1024, 32 * 1024)
}

pub(crate) async fn run(
    i: usize,
    spec: LoadSpec,
    channel: Channel,
    shared: Arc<Shared>,
    times: Arc<Vec<Mutex<ProxyTimes>>>,
) {
    let result = match spec.mode {
        Mode::Sotw => sotw(i, &spec, channel, &shared, &times).await,
        Mode::Delta => delta(i, &spec, channel, &shared, &times).await,
    };
    if let Err(e) = result {
        error(&shared, format!("proxy {i}: {e}"));
        if let Some(t) = times.get(i) {
            t.lock().unwrap_or_else(|p| p.into_inner()).failed = true;
        }
    }
}

async fn sotw(
    i: usize,
    spec: &LoadSpec,
    channel: Channel,
    shared: &Shared,
    times: &[Mutex<ProxyTimes>],
) -> anyhow::Result<()> {
    let (tx, rx) = request_channel();
    let node = node(i, spec);
    let subs = subscriptions(spec);
    let started = Instant::now();
    for (n, (rt, names)) in subs.iter().enumerate() {
        let req = DiscoveryRequest {
            node: (n == 0).then(|| node.clone()),
            type_url: rt.type_url().into(),
            resource_names: names.clone(),
            ..Default::default()
        };
        tx.send(Box::new(req)).await?;
    }
    let mut responses = ads_stream::<_, DiscoveryResponse>(channel, SOTW_PATH, rx).await?;
    let mut tally = Tally { i, started, seen: HashSet::new(), want: subs.len(), times, shared };
    while let Some(r) = responses.message().await? {
        tally.received(&r.type_url, r.encoded_len());
        let names = subs.iter().find(|(rt, _)| rt.type_url() == r.type_url).map(|(_, n)| n.clone()).unwrap_or_default();
        let refuse = spec.nack.as_ref().is_some_and(|n| holds(&r.resources, n, spec.nack_containing.as_deref()));
        let req = DiscoveryRequest {
            type_url: r.type_url.clone(),
            resource_names: names,
            // A NACK keeps the last accepted version, as Envoy does.
            version_info: if refuse { String::new() } else { r.version_info.clone() },
            response_nonce: r.nonce.clone(),
            error_detail: tally.answer(refuse, spec.nack_message_bytes),
            ..Default::default()
        };
        tx.send(Box::new(req)).await?;
    }
    Ok(())
}

async fn delta(
    i: usize,
    spec: &LoadSpec,
    channel: Channel,
    shared: &Shared,
    times: &[Mutex<ProxyTimes>],
) -> anyhow::Result<()> {
    let (tx, rx) = request_channel();
    let node = node(i, spec);
    let subs = subscriptions(spec);
    let started = Instant::now();
    for (n, (rt, names)) in subs.iter().enumerate() {
        let req = DeltaDiscoveryRequest {
            node: (n == 0).then(|| node.clone()),
            type_url: rt.type_url().into(),
            resource_names_subscribe: names.clone(),
            ..Default::default()
        };
        tx.send(Box::new(req)).await?;
    }
    let mut responses = ads_stream::<_, DeltaDiscoveryResponse>(channel, DELTA_PATH, rx).await?;
    let mut tally = Tally { i, started, seen: HashSet::new(), want: subs.len(), times, shared };
    while let Some(r) = responses.message().await? {
        tally.received(&r.type_url, r.encoded_len());
        let refuse = spec.nack.as_ref().is_some_and(|n| {
            r.resources.iter().any(|x| {
                &x.name == n
                    && spec.nack_containing.as_deref().is_none_or(|t| {
                        x.resource.as_ref().is_some_and(|a| a.value.windows(t.len()).any(|w| w == t.as_bytes()))
                    })
            })
        });
        let req = DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: tally.answer(refuse, spec.nack_message_bytes),
            ..Default::default()
        };
        tx.send(Box::new(req)).await?;
    }
    Ok(())
}

/// Whether a SotW response holds the named resource (by the `name` field every xDS
/// resource has first; good enough to find it without knowing the type).
fn holds(resources: &[filterplane_api::Any], name: &str, containing: Option<&str>) -> bool {
    resources.iter().any(|a| {
        let named =
            filterplane_api::envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig::decode(a.value.as_slice())
                .map(|t| t.name == name)
                .unwrap_or(false);
        named && containing.is_none_or(|t| a.value.windows(t.len()).any(|w| w == t.as_bytes()))
    })
}
