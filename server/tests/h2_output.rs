//! Output waiting behind HTTP/2 flow control (issue 20, item 2): clients that read their
//! socket but never open their window, on raw frames.

#[allow(dead_code)]
#[path = "conformance/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "conformance/raw_h2.rs"]
mod raw_h2;

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use filterplane_server::settings::{Settings, XdsHttp2};
use harness::Plane;
use raw_h2::*;

const METHOD: (&str, &str) = (":method", "POST");
const SCHEME: (&str, &str) = (":scheme", "http");

// Output waiting behind flow control (issue 20, item 2): clients that read their socket
// but never open their HTTP/2 window.

const ECDS: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
const DELTA_ADS: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Fifty extension configs of about 10 KB each (`tag` in every value): a SotW response
/// for all of them is about 500 KB.
fn fifty(tag: &str) -> Vec<(String, String)> {
    (0..50).map(|i| (format!("e{i}"), format!("{tag}-{}", "x".repeat(10_000)))).collect()
}

async fn set_fifty(plane: &Plane, tag: &str) {
    let entries = fifty(tag);
    let refs: Vec<(&str, &str)> = entries.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    plane.set(&refs).await;
}

async fn plane_with_fifty(set: impl FnOnce(&mut Settings)) -> Plane {
    let entries = fifty("v0");
    let refs: Vec<(&str, &str)> = entries.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    Plane::start_with(&refs, set).await
}

fn grpc(message: &impl prost::Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut m = vec![0];
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend(body);
    m
}

impl Peer {
    /// A client whose windows stay closed: SETTINGS_INITIAL_WINDOW_SIZE 0, and never a
    /// WINDOW_UPDATE. It reads whatever comes.
    fn zero_window(addr: SocketAddr) -> Peer {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        let mut p = Peer { s };
        p.send(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0]);
        p
    }

    /// Opens stream `id` (SotW or delta ADS) and subscribes it to the fifty configs.
    fn subscribe_fifty(&mut self, id: u32, delta: bool, node: &str) {
        use filterplane_api::envoy_types::pb::envoy::{
            config::core::v3::Node,
            service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest},
        };
        let names: Vec<String> = (0..50).map(|i| format!("e{i}")).collect();
        let node = Some(Node { id: node.into(), cluster: "c".into(), ..Default::default() });
        let body = if delta {
            grpc(&DeltaDiscoveryRequest {
                node,
                type_url: ECDS.into(),
                resource_names_subscribe: names,
                ..Default::default()
            })
        } else {
            grpc(&DiscoveryRequest { node, type_url: ECDS.into(), resource_names: names, ..Default::default() })
        };
        self.headers(id, 0, &[METHOD, SCHEME, (":path", if delta { DELTA_ADS } else { ADS }), ("te", "trailers")]);
        self.send(DATA, 0, id, &body);
    }

    /// Reads until the server closes, or nothing comes for a second; the frames seen.
    fn drain(&mut self) -> Vec<Frame> {
        self.drain_until_quiet(Duration::from_secs(1))
    }

    /// Reads until the server closes, or nothing comes for `quiet`; the frames seen.
    fn drain_until_quiet(&mut self, quiet: Duration) -> Vec<Frame> {
        self.s.set_read_timeout(Some(quiet)).unwrap();
        std::iter::from_fn(|| self.next()).collect()
    }

    /// Whether the server closed the connection.
    fn closed(&mut self) -> bool {
        use std::io::Read;
        self.s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        match self.s.read(&mut [0; 1]) {
            Ok(n) => n == 0,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}

/// Whether the server refused to hold more output for this client as its transport does:
/// the lean one with `lean` (a reset stream, a GOAWAY), tonic's by closing the connection
/// (hyper does not poll a body whose window is closed, so no reset could be sent).
fn refused(p: &mut Peer, frames: &[Frame], lean: impl Fn(&[Frame]) -> bool) -> bool {
    match harness::transport() {
        XdsHttp2::Lean => lean(frames),
        XdsHttp2::Tonic => p.closed(),
    }
}

fn queued(plane: &Plane) -> f64 {
    plane.metric("filterplane_xds_queued_bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sotw_stream_behind_a_closed_window_holds_one_response_per_type() {
    let plane = plane_with_fifty(|_| {}).await;
    let addr = plane.xds;
    let p = tokio::task::spawn_blocking(move || {
        let mut p = Peer::zero_window(addr);
        p.subscribe_fifty(1, false, "stuck");
        p.expect(HEADERS, 1);
        p
    })
    .await
    .unwrap();
    plane.wait_for("the first response queued", |p| queued(p) > 400_000.0).await;
    // Twenty new configurations: each response replaces the one still unsent (before, each
    // was queued behind the others: 20 × 500 KB for one stuck client).
    for k in 1..=20 {
        set_fifty(&plane, &format!("v{k}")).await;
    }
    // The stream has been handed the last one (the tracker records what it is sent).
    let served = |p: &Plane| {
        let config = p.api("/api/v1/config");
        let e0 = config["resources"].as_array()?.iter().find(|r| r["name"] == "e0")?["version"].clone();
        let proxy = p.api("/api/v1/proxies/stuck");
        (proxy[0]["types"][ECDS]["resources"]["e0"]["sent_version"] == e0).then_some(())
    };
    plane.wait_for("the last config handed to the stuck stream", |p| served(p).is_some()).await;
    let q = queued(&plane);
    assert!(q > 400_000.0 && q < 1_100_000.0, "one response waits, not twenty: {q} bytes");
    // Once the client is gone, so is what waited for it.
    drop(tokio::task::spawn_blocking(move || p.s.shutdown(std::net::Shutdown::Both)).await);
    plane.wait_for("the queue freed", |p| queued(p) == 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_stream_behind_a_closed_window_is_reset_past_its_bound() {
    let plane = plane_with_fifty(|s| s.limits.max_queued_bytes_per_stream = 1_500_000).await;
    let addr = plane.xds;
    let p = tokio::task::spawn_blocking(move || {
        let mut p = Peer::zero_window(addr);
        p.subscribe_fifty(1, true, "stuck-delta");
        p.expect(HEADERS, 1);
        p
    })
    .await
    .unwrap();
    // Delta responses cannot replace each other: four of 500 KB go over 1.5 MB.
    for k in 1..=4 {
        set_fifty(&plane, &format!("v{k}")).await;
    }
    let mut p = p;
    let reset = tokio::task::spawn_blocking(move || {
        let frames = p.drain();
        refused(&mut p, &frames, |frames| {
            frames.iter().any(|f| f.ty == RST_STREAM && f.id == 1 && f.code() == ENHANCE_YOUR_CALM)
        })
    })
    .await
    .unwrap();
    assert!(reset, "the stream is reset with ENHANCE_YOUR_CALM");
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"queued_bytes_per_stream\"}") >= 1.0);
    assert_eq!(queued(&plane), 0.0);
    assert!(plane.healthy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_its_output_bound_is_closed() {
    let plane = plane_with_fifty(|s| s.limits.max_queued_bytes_per_connection = 1_500_000).await;
    let addr = plane.xds;
    let closed = tokio::task::spawn_blocking(move || {
        let mut p = Peer::zero_window(addr);
        for (k, id) in [1, 3, 5, 7].into_iter().enumerate() {
            p.subscribe_fifty(id, false, &format!("stuck-{k}"));
        }
        let frames = p.drain();
        refused(&mut p, &frames, |frames| frames.iter().any(|f| f.ty == GOAWAY && f.code() == ENHANCE_YOUR_CALM))
    })
    .await
    .unwrap();
    assert!(closed, "GOAWAY with ENHANCE_YOUR_CALM");
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"queued_bytes_per_connection\"}") >= 1.0);
    plane.wait_for("the queue freed", |p| queued(p) == 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_clients_are_bounded_in_total_and_readers_go_on() {
    // Before: 500 zero-window streams with a 1 MB resource took RSS from 70 to 550 MB.
    let plane = plane_with_fifty(|s| s.limits.max_queued_bytes = 2_000_000).await;
    let addr = plane.xds;
    let peers = tokio::task::spawn_blocking(move || {
        (0..10)
            .map(|k| {
                let mut p = Peer::zero_window(addr);
                p.subscribe_fifty(1, false, &format!("stuck-{k}"));
                p
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    // Stuck for a second with the server over its bound: reset, with no new config and
    // before any keepalive PING.
    let resets = tokio::task::spawn_blocking(move || {
        let readers: Vec<_> = peers
            .into_iter()
            .map(|mut p| {
                std::thread::spawn(move || {
                    let frames = p.drain_until_quiet(Duration::from_secs(3));
                    refused(&mut p, &frames, |frames| {
                        frames.iter().any(|f| f.ty == RST_STREAM && f.code() == ENHANCE_YOUR_CALM)
                    })
                })
            })
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).filter(|&r| r).count()
    })
    .await
    .unwrap();
    assert!(resets >= 5, "streams past 2 MB in all are reset: {resets} of 10");
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"queued_bytes_total\"}") >= 1.0);
    // A client that reads gets everything.
    let mut c = harness::SotwClient::connect(&plane, "reader").await;
    let names: Vec<String> = (0..50).map(|i| format!("e{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    c.request(ECDS, &names, "", "").await;
    assert_eq!(c.recv_ack(&names).await.resources.len(), 50);
}
