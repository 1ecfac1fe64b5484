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

/// The types this proxy subscribes to, in Envoy's order: CDS, LDS, then ECDS.
fn subscriptions(spec: &LoadSpec) -> Vec<(ResourceType, Vec<String>)> {
    let mut subs = Vec::new();
    if spec.wildcard_lds_cds {
        subs.push((ResourceType::Cluster, vec![]));
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

/// Notes a response of type `rt` at `now`.
fn received(
    i: usize,
    rt: &str,
    started: Instant,
    seen: &mut HashSet<String>,
    want: usize,
    times: &[Mutex<ProxyTimes>],
    shared: &Shared,
) {
    seen.insert(rt.to_owned());
    let now = Instant::now();
    let Ok(mut t) = times[i].lock() else { return };
    if t.first_full_config.is_none() && seen.len() >= want {
        t.first_full_config = Some(now - started);
    }
    let armed = shared.change_armed.load(Ordering::Acquire);
    if armed && rt == ResourceType::ExtensionConfig.type_url() && t.change_received.is_none() {
        if let Some(written) = *shared.change_written.lock().unwrap_or_else(|p| p.into_inner()) {
            t.change_received = Some(now.saturating_duration_since(written));
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
    let mut seen = HashSet::new();
    while let Some(r) = responses.message().await? {
        shared.messages.fetch_add(1, Ordering::Relaxed);
        let len = r.encoded_len() as u64;
        shared.bytes.fetch_add(len, Ordering::Relaxed);
        if shared.change_armed.load(Ordering::Relaxed) {
            shared.change_bytes.fetch_add(len, Ordering::Relaxed);
        }
        received(i, &r.type_url, started, &mut seen, subs.len(), times, shared);
        let names = subs.iter().find(|(rt, _)| rt.type_url() == r.type_url).map(|(_, n)| n.clone()).unwrap_or_default();
        let refuse = spec.nack.as_ref().is_some_and(|n| holds(&r.resources, n));
        let req = DiscoveryRequest {
            type_url: r.type_url.clone(),
            resource_names: names,
            // A NACK keeps the last accepted version, as Envoy does.
            version_info: if refuse { String::new() } else { r.version_info.clone() },
            response_nonce: r.nonce.clone(),
            error_detail: refuse.then(|| Status {
                code: 13,
                message: "xds-loadgen: NACK requested".into(),
                details: vec![],
            }),
            ..Default::default()
        };
        if refuse {
            shared.nacks.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.acks.fetch_add(1, Ordering::Relaxed);
        }
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
    let mut seen = HashSet::new();
    while let Some(r) = responses.message().await? {
        shared.messages.fetch_add(1, Ordering::Relaxed);
        let len = r.encoded_len() as u64;
        shared.bytes.fetch_add(len, Ordering::Relaxed);
        if shared.change_armed.load(Ordering::Relaxed) {
            shared.change_bytes.fetch_add(len, Ordering::Relaxed);
        }
        received(i, &r.type_url, started, &mut seen, subs.len(), times, shared);
        let refuse = spec.nack.as_ref().is_some_and(|n| r.resources.iter().any(|x| &x.name == n));
        let req = DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: refuse.then(|| Status {
                code: 13,
                message: "xds-loadgen: NACK requested".into(),
                details: vec![],
            }),
            ..Default::default()
        };
        if refuse {
            shared.nacks.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.acks.fetch_add(1, Ordering::Relaxed);
        }
        tx.send(req).await?;
    }
    Ok(())
}

/// Whether a SotW response holds the named resource (by the `name` field every xDS
/// resource has first; good enough to find it without knowing the type).
fn holds(resources: &[filterplane_api::Any], name: &str) -> bool {
    resources.iter().any(|a| {
        filterplane_api::envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig::decode(a.value.as_slice())
            .map(|t| t.name == name)
            .unwrap_or(false)
    })
}
