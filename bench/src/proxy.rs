//! One simulated Envoy: subscribes like Envoy does, ACKs (or NACKs) every response, and
//! notes when its configs arrive.

use std::{
    collections::HashSet,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Instant,
};

use filterplane_api::{
    envoy_types::pb::{
        envoy::{
            config::core::v3::Node,
            service::discovery::v3::{
                aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
                DiscoveryRequest,
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
    }
}

async fn sotw(
    i: usize,
    spec: &LoadSpec,
    channel: Channel,
    shared: &Shared,
    times: &[Mutex<ProxyTimes>],
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(16);
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
        tx.send(req).await?;
    }
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
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
        tx.send(req).await?;
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
    let (tx, rx) = mpsc::channel(16);
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
        tx.send(req).await?;
    }
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
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
        tx.send(req).await?;
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
