//! The xDS port's HTTP/2, rule by rule (RFC 9113), with a scripted peer: raw frames in,
//! the frames the server answers with out. Each test sends what one rule forbids and
//! checks the error the RFC names (a stream reset, or GOAWAY for the connection); after a
//! stream error, the same connection still serves a well-formed request.

#[allow(dead_code)]
#[path = "conformance/harness.rs"]
mod harness;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use harness::Plane;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PRIORITY_FLAG: u8 = 0x20;

const PROTOCOL_ERROR: u32 = 0x1;
const STREAM_CLOSED: u32 = 0x5;

const ADS: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// A frame the server sent.
#[derive(Debug)]
struct Frame {
    ty: u8,

    id: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn code(&self) -> u32 {
        let p = if self.ty == GOAWAY { &self.payload[4..8] } else { &self.payload[..4] };
        u32::from_be_bytes([p[0], p[1], p[2], p[3]])
    }
}

/// One raw HTTP/2 client connection, past the preface and SETTINGS.
struct Peer {
    s: TcpStream,
}

impl Peer {
    fn connect(addr: SocketAddr) -> Peer {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        let mut p = Peer { s };
        p.send(SETTINGS, 0, 0, &[]);
        p
    }

    fn send(&mut self, ty: u8, flags: u8, id: u32, payload: &[u8]) {
        let n = payload.len();
        let mut out = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, ty, flags];
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(payload);
        self.s.write_all(&out).unwrap();
    }

    /// The next frame, or `None` once the server closed the connection.
    fn next(&mut self) -> Option<Frame> {
        let mut h = [0u8; 9];
        self.s.read_exact(&mut h).ok()?;
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let mut payload = vec![0; len];
        self.s.read_exact(&mut payload).ok()?;
        let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        Some(Frame { ty: h[3], id, payload })
    }

    /// The first frame of type `ty` on stream `id` (0 for the connection).
    fn expect(&mut self, ty: u8, id: u32) -> Frame {
        loop {
            let f = self.next().unwrap_or_else(|| panic!("closed before a frame of type {ty} on stream {id}"));
            if f.ty == ty && f.id == id {
                return f;
            }
            assert!(f.ty != GOAWAY, "unexpected GOAWAY (code {}) waiting for type {ty} on {id}", f.code());
            assert!(f.ty != RST_STREAM || f.id != id, "unexpected RST_STREAM {} on {id}", f.code());
        }
    }

    fn expect_reset(&mut self, id: u32, code: u32) {
        let f = self.expect(RST_STREAM, id);
        assert_eq!(f.code(), code, "RST_STREAM code on stream {id}");
    }

    fn expect_goaway(&mut self, code: u32) {
        let f = self.expect(GOAWAY, 0);
        assert_eq!(f.code(), code, "GOAWAY code: {}", String::from_utf8_lossy(&f.payload[8..]));
    }

    /// A request on `id` that is well-formed, with the fields in `extra` after the usual ones.
    fn request(&mut self, id: u32, flags: u8, extra: &[(&str, &str)]) {
        let mut fields = vec![(":method", "POST"), (":scheme", "http"), (":path", ADS), (":authority", "xds")];
        fields.extend([("content-type", "application/grpc"), ("te", "trailers")]);
        fields.extend_from_slice(extra);
        self.headers(id, flags, &fields);
    }

    /// HEADERS with these fields, each a literal without indexing (RFC 7541, 6.2.2).
    fn headers(&mut self, id: u32, flags: u8, fields: &[(&str, &str)]) {
        self.send(HEADERS, flags | END_HEADERS, id, &block(fields));
    }

    /// After a stream error the connection goes on: a request on `id` is answered.
    fn still_serves(&mut self, id: u32) {
        self.request(id, END_STREAM, &[]);
        let f = self.expect(HEADERS, id);
        assert_eq!(f.payload.first(), Some(&0x88), ":status 200 (static table entry 8)");
    }
}

fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.push(0);
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    }
    b
}

/// Runs `script` against a fresh server on a blocking thread.
async fn against_server(script: impl FnOnce(Peer) + Send + 'static) {
    let plane = Plane::start(&[("a", "1")]).await;
    let addr = plane.xds;
    tokio::task::spawn_blocking(move || script(Peer::connect(addr))).await.unwrap();
    assert!(plane.healthy());
}

/// Each malformed request (RFC 9113, 8.1.1) is reset with PROTOCOL_ERROR on its own, and
/// the next request on the connection is served.
async fn malformed(fields: &'static [(&'static str, &'static str)]) {
    against_server(|mut p| {
        p.headers(1, 0, fields);
        p.expect_reset(1, PROTOCOL_ERROR);
        p.still_serves(3);
    })
    .await;
}

const METHOD: (&str, &str) = (":method", "POST");
const SCHEME: (&str, &str) = (":scheme", "http");
const PATH: (&str, &str) = (":path", ADS);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_2_1_an_upper_case_field_name_is_malformed() {
    malformed(&[METHOD, SCHEME, PATH, ("Content-Type", "application/grpc")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_2_2_a_connection_specific_field_is_malformed() {
    malformed(&[METHOD, SCHEME, PATH, ("connection", "keep-alive")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_2_2_te_other_than_trailers_is_malformed() {
    malformed(&[METHOD, SCHEME, PATH, ("te", "trailers, deflate")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_3_1_a_request_without_path_is_malformed() {
    malformed(&[METHOD, SCHEME, ("content-type", "application/grpc")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_3_a_repeated_pseudo_header_is_malformed() {
    malformed(&[METHOD, METHOD, SCHEME, PATH]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_3_a_pseudo_header_after_a_regular_field_is_malformed() {
    malformed(&[METHOD, SCHEME, ("content-type", "application/grpc"), PATH]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_3_a_response_pseudo_header_in_a_request_is_malformed() {
    malformed(&[(":status", "200"), METHOD, SCHEME, PATH]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_1_a_pseudo_header_in_trailers_is_malformed() {
    against_server(|mut p| {
        p.request(1, 0, &[]);
        p.expect(HEADERS, 1);
        p.headers(1, END_STREAM, &[(":method", "POST")]);
        p.expect_reset(1, PROTOCOL_ERROR);
        p.still_serves(3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_1_1_data_that_disagrees_with_content_length_is_malformed() {
    against_server(|mut p| {
        // Less than announced, then the end.
        p.request(1, 0, &[("content-length", "10")]);
        p.send(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]);
        p.expect_reset(1, PROTOCOL_ERROR);
        // More than announced.
        p.request(3, 0, &[("content-length", "2")]);
        p.send(DATA, 0, 3, &[0, 0, 0, 0, 0]);
        p.expect_reset(3, PROTOCOL_ERROR);
        p.still_serves(5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_rst_stream_on_an_idle_stream_is_a_connection_error() {
    against_server(|mut p| {
        p.send(RST_STREAM, 0, 1, &8u32.to_be_bytes());
        p.expect_goaway(PROTOCOL_ERROR);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_window_update_on_an_idle_stream_is_a_connection_error() {
    against_server(|mut p| {
        p.send(WINDOW_UPDATE, 0, 1, &100u32.to_be_bytes());
        p.expect_goaway(PROTOCOL_ERROR);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_data_on_an_idle_stream_is_a_connection_error() {
    against_server(|mut p| {
        p.send(DATA, 0, 1, &[0; 5]);
        p.expect_goaway(PROTOCOL_ERROR);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_frames_after_the_clients_end_stream_are_stream_closed() {
    against_server(|mut p| {
        // Half-closed (remote): the client ended its side; the ADS stream stays open.
        p.request(1, 0, &[]);
        p.expect(HEADERS, 1);
        p.send(DATA, END_STREAM, 1, &[]);
        p.send(DATA, 0, 1, &[0; 5]);
        p.expect_reset(1, STREAM_CLOSED);
        // HEADERS the same way.
        p.request(3, 0, &[]);
        p.expect(HEADERS, 3);
        p.send(DATA, END_STREAM, 3, &[]);
        p.headers(3, END_STREAM, &[("x", "y")]);
        p.expect_reset(3, STREAM_CLOSED);
        p.still_serves(5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_frames_after_the_clients_rst_stream_are_stream_closed() {
    against_server(|mut p| {
        p.request(1, 0, &[]);
        p.expect(HEADERS, 1);
        p.send(RST_STREAM, 0, 1, &8u32.to_be_bytes());
        p.send(DATA, 0, 1, &[0; 5]);
        p.expect_reset(1, STREAM_CLOSED);
        p.request(3, 0, &[]);
        p.expect(HEADERS, 3);
        p.send(RST_STREAM, 0, 3, &8u32.to_be_bytes());
        p.request(3, 0, &[]);
        p.expect_reset(3, STREAM_CLOSED);
        p.still_serves(5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_1_a_stream_id_lower_than_the_last_is_a_connection_error() {
    against_server(|mut p| {
        p.request(5, 0, &[]);
        p.expect(HEADERS, 5);
        p.request(3, 0, &[]);
        p.expect_goaway(PROTOCOL_ERROR);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_3_1_a_stream_depending_on_itself_is_a_stream_error() {
    against_server(|mut p| {
        // HEADERS with a priority part naming its own stream.
        let mut payload = 1u32.to_be_bytes().to_vec();
        payload.push(16);
        payload.extend(block(&[METHOD, SCHEME, PATH]));
        p.send(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, &payload);
        p.expect_reset(1, PROTOCOL_ERROR);
        // A PRIORITY frame doing the same to an open stream.
        p.request(3, 0, &[]);
        p.expect(HEADERS, 3);
        let mut prio = 3u32.to_be_bytes().to_vec();
        prio.push(16);
        p.send(PRIORITY, 0, 3, &prio);
        p.expect_reset(3, PROTOCOL_ERROR);
        p.still_serves(5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_in_flight_when_this_side_ended_the_stream_is_dropped_quietly() {
    against_server(|mut p| {
        // A method that does not exist: trailers only, then this side resets the stream.
        p.headers(1, 0, &[METHOD, SCHEME, (":path", "/no.Such/Method")]);
        p.expect_reset(1, 0);
        // The client did not know yet: its DATA is not an error.
        p.send(DATA, 0, 1, &[0; 5]);
        p.still_serves(3);
    })
    .await;
}

// Output waiting behind flow control (issue 20, item 2): clients that read their socket
// but never open their HTTP/2 window.

const ECDS: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
const DELTA_ADS: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const ENHANCE_YOUR_CALM: u32 = 0xb;

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

async fn plane_with_fifty(flags: &[&str]) -> Plane {
    let entries = fifty("v0");
    let refs: Vec<(&str, &str)> = entries.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    Plane::start_with(&refs, flags).await
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
        self.s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        std::iter::from_fn(|| self.next()).collect()
    }
}

fn queued(plane: &Plane) -> f64 {
    plane.metric("filterplane_xds_queued_bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sotw_stream_behind_a_closed_window_holds_one_response_per_type() {
    let plane = plane_with_fifty(&[]).await;
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    let q = queued(&plane);
    assert!(q > 400_000.0 && q < 1_100_000.0, "one response waits, not twenty: {q} bytes");
    // Once the client is gone, so is what waited for it.
    drop(tokio::task::spawn_blocking(move || p.s.shutdown(std::net::Shutdown::Both)).await);
    plane.wait_for("the queue freed", |p| queued(p) == 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_stream_behind_a_closed_window_is_reset_past_its_bound() {
    let plane = plane_with_fifty(&["--max-queued-bytes-per-stream", "1500000"]).await;
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
    let frames = tokio::task::spawn_blocking(move || p.drain()).await.unwrap();
    assert!(
        frames.iter().any(|f| f.ty == RST_STREAM && f.id == 1 && f.code() == ENHANCE_YOUR_CALM),
        "the stream is reset with ENHANCE_YOUR_CALM"
    );
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"queued_bytes_per_stream\"}") >= 1.0);
    assert_eq!(queued(&plane), 0.0);
    assert!(plane.healthy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_its_output_bound_is_closed() {
    let plane = plane_with_fifty(&["--max-queued-bytes-per-connection", "1500000"]).await;
    let addr = plane.xds;
    let frames = tokio::task::spawn_blocking(move || {
        let mut p = Peer::zero_window(addr);
        for (k, id) in [1, 3, 5, 7].into_iter().enumerate() {
            p.subscribe_fifty(id, false, &format!("stuck-{k}"));
        }
        p.drain()
    })
    .await
    .unwrap();
    let goaway = frames.iter().find(|f| f.ty == GOAWAY).expect("GOAWAY");
    assert_eq!(goaway.code(), ENHANCE_YOUR_CALM);
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"queued_bytes_per_connection\"}") >= 1.0);
    plane.wait_for("the queue freed", |p| queued(p) == 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_clients_are_bounded_in_total_and_readers_go_on() {
    // Before: 500 zero-window streams with a 1 MB resource took RSS from 70 to 550 MB.
    let plane = plane_with_fifty(&["--max-queued-bytes", "2000000"]).await;
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
    // Stuck for over a second, then a new configuration: each of them gets new output.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    set_fifty(&plane, "v1").await;
    let resets = tokio::task::spawn_blocking(move || {
        peers
            .into_iter()
            .map(|mut p| p.drain().iter().any(|f| f.ty == RST_STREAM && f.code() == ENHANCE_YOUR_CALM))
            .filter(|&r| r)
            .count()
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

/// The admin port answers HTTP/2 too: its DNS-rebinding check reads `:authority` as it
/// reads `Host` (before, `:authority: evil.example` got 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_checks_the_authority_of_http2_requests() {
    let plane = Plane::start(&[("a", "1")]).await;
    let admin = plane.admin;
    let statuses = tokio::task::spawn_blocking(move || {
        let mut p = Peer::connect(admin);
        let mut decoder = loona_hpack::Decoder::new();
        let mut status = |p: &mut Peer, id: u32, authority: &'static str| {
            let fields =
                [(":method", "GET"), (":scheme", "http"), (":path", "/api/v1/config"), (":authority", authority)];
            p.headers(id, END_STREAM, &fields);
            let f = p.expect(HEADERS, id);
            let fields = decoder.decode(&f.payload).unwrap();
            String::from_utf8(fields.into_iter().find(|(n, _)| n == b":status").unwrap().1).unwrap()
        };
        (status(&mut p, 1, "evil.example"), status(&mut p, 3, "127.0.0.1"))
    })
    .await
    .unwrap();
    assert_eq!(statuses, ("421".to_owned(), "200".to_owned()));
}
