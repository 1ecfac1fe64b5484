//! Hostile and malformed input against a running Filterplane (in process, loopback): each
//! test sends the bad input and checks that the server stays up, answers `/healthz`
//! promptly, and keeps serving the last good config to a connected client.

#[allow(dead_code)]
#[path = "conformance/harness.rs"]
mod harness;

use std::time::Duration;

use filterplane_api::envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use harness::*;

/// A SotW client that has the config `a`, ACKed.
async fn client_with_a(plane: &Plane) -> SotwClient {
    let mut c = SotwClient::connect(plane, "steady").await;
    c.request(ECDS, &["a"], "", "").await;
    let r = c.recv_ack(&["a"]).await;
    assert_eq!(ecds_names(&r.resources), ["a"]);
    c
}

/// After the bad input: still healthy, still serving `a`, and the next good edit reaches
/// the connected client.
async fn still_serving(plane: &Plane, c: &mut SotwClient) {
    assert!(plane.healthy(), "/healthz answers at once");
    plane.set(&[("a", "after")]).await;
    let r = c.recv_ack(&["a"]).await;
    assert_eq!(ecds_names(&r.resources), ["a"], "the connected proxy gets the next good config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_yaml_is_refused_without_a_crash() {
    let plane = Plane::start(&[("a", "1")]).await;
    let mut c = client_with_a(&plane).await;
    // 10,000 levels of block sequences (20 KB): once a stack overflow that aborted serve.
    let errors = plane.refuse(&format!("version: 1\nx:\n{}1\n", "- ".repeat(10_000))).await;
    assert!(errors[0]["message"].as_str().unwrap_or("").contains("nested deeper"), "{errors:?}");
    // 600 KB of flow nesting: once 20-38 s to refuse (past `refuse`'s wait).
    plane.refuse(&format!("version: 1\nx: {}\n", "[".repeat(600_000))).await;
    still_serving(&plane, &mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_at_the_config_path_is_refused_not_read() {
    let plane = Plane::start(&[("a", "1")]).await;
    let mut c = client_with_a(&plane).await;
    let path = plane.config_path().to_path_buf();
    let attempted = plane.api("/api/v1/config")["last_attempt_at"].clone();
    std::fs::remove_file(&path).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(&path).status().unwrap().success());
    plane
        .wait_for("the FIFO to be refused", |p| {
            let c = p.api("/api/v1/config");
            c["last_attempt_at"] != attempted
                && c["last_outcome"]["errors"][0]["message"].as_str().is_some_and(|m| m.contains("not a regular file"))
        })
        .await;
    std::fs::remove_file(&path).unwrap();
    still_serving(&plane, &mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_subscriptions_are_linear_and_bounded() {
    let plane = Plane::start(&[("a", "1")]).await;
    let mut c = client_with_a(&plane).await;
    // Just under the limit: 9,999 names that do not exist, answered at once (this was
    // quadratic: 200,000 names took 48 s of CPU).
    let names: Vec<String> = (0..9_999).map(|i| format!("missing-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut d = DeltaClient::connect(&plane, "many").await;
    d.send(ECDS, Delta { subscribe: &refs, ..Default::default() }).await;
    let r = d.recv_ack().await;
    assert_eq!(r.removed_resources.len(), 9_999, "each named as not existing");
    d.send(ECDS, Delta { unsubscribe: &refs, ..Default::default() }).await;
    d.send(ECDS, Delta { subscribe: &["a"], ..Default::default() }).await;
    assert_eq!(delta_names(&d.recv_ack().await), ["a"]);
    // Over the limit: the stream ends with RESOURCE_EXHAUSTED, counted.
    let names: Vec<String> = (0..200_000).map(|i| format!("missing-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut greedy = DeltaClient::connect(&plane, "greedy").await;
    greedy.send(ECDS, Delta { subscribe: &refs, ..Default::default() }).await;
    let status = greedy.ended().await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    // The limit is what the proxy is served (1) plus --max-subscribed-names (10,000).
    assert!(status.message().contains("limit of 10001"), "{status:?}");
    assert_eq!(plane.metric("filterplane_limit_hits_total{limit=\"subscribed_names\"}"), 1.0);
    still_serving(&plane, &mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_huge_nack_is_kept_once_and_cut() {
    let plane = Plane::start(&[("a", "1")]).await;
    let mut c = SotwClient::connect(&plane, "nacker").await;
    c.request(ECDS, &["a"], "", "").await;
    let r = c.recv().await;
    let huge = "x".repeat(1 << 20);
    for _ in 0..50 {
        c.nack(ECDS, &["a"], "", &r.nonce, &huge).await;
    }
    // A request that must be answered, so the NACKs above were all read.
    c.request(ECDS, &["a", "b"], "", &r.nonce).await;
    c.recv().await;
    let rejects = plane.api("/api/v1/rejects");
    assert_eq!(rejects.as_array().map(Vec::len), Some(1), "one nonce, one reject");
    let message = rejects[0]["message"].as_str().unwrap_or("");
    assert!(message.len() < 4200 && message.ends_with("(1048576 bytes in all)"), "cut: {} bytes", message.len());
    assert_eq!(
        plane.metric(
            "filterplane_xds_rejects_total{type_url=\"type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig\"}"
        ),
        1.0
    );
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"nack_message_bytes\"}") >= 1.0);
    assert!(plane.healthy());
}

/// The server's first HTTP/2 SETTINGS, read off a raw connection that sent the preface.
fn server_settings(addr: std::net::SocketAddr) -> Vec<(u16, u32)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").unwrap();
    let mut header = [0u8; 9];
    s.read_exact(&mut header).unwrap();
    assert_eq!(header[3], 4, "the server's first frame is SETTINGS");
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    payload
        .chunks(6)
        .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_in_streams_and_handshake_time() {
    let plane = Plane::start_with(&[("a", "1")], |s| {
        s.limits.max_streams_per_connection = 7;
        s.limits.handshake_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let mut c = client_with_a(&plane).await;
    // SETTINGS_MAX_CONCURRENT_STREAMS (0x3) is advertised.
    let xds = plane.xds;
    let settings = tokio::task::spawn_blocking(move || server_settings(xds)).await.unwrap();
    assert!(settings.contains(&(3, 7)), "{settings:?}");
    // A connection that never sends the preface is closed after the handshake timeout.
    let silent = tokio::net::TcpStream::connect(plane.xds).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            silent.readable().await.unwrap();
            match silent.try_read(&mut buf) {
                Ok(0) | Err(_) if started.elapsed() > std::time::Duration::from_millis(500) => break,
                _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the silent connection was not closed");
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"handshake_timeout\"}") >= 1.0);
    still_serving(&plane, &mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_and_event_clients_are_capped() {
    let plane = Plane::start_with(&[("a", "1")], |s| {
        s.limits.max_admin_connections = 3;
        s.limits.max_event_clients = 1;
    })
    .await;
    let mut c = client_with_a(&plane).await;
    let admin = plane.admin;
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let get = |path: &str| {
            let mut s = std::net::TcpStream::connect(admin).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").as_bytes()).unwrap();
            let mut buf = vec![0u8; 512];
            let n = s.read(&mut buf).unwrap_or(0);
            (s, String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        // One event-stream client holds its connection; a second one is refused.
        let (events, first) = get("/api/v1/events");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        let (refused, second) = get("/api/v1/events");
        assert!(second.starts_with("HTTP/1.1 503") && second.contains("too many event-stream clients"), "{second}");
        // Connections until the cap: held ones send half a request, and the first one over
        // it is answered 503 at once (however many slots the harness's own requests still
        // hold). (A connection that sends nothing holds no slot: a new one evicts it.)
        let mut held = vec![events, refused];
        let mut over = String::new();
        for _ in 0..6 {
            let mut s = std::net::TcpStream::connect(admin).unwrap();
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n");
            s.set_read_timeout(Some(std::time::Duration::from_millis(500))).unwrap();
            let mut buf = vec![0u8; 512];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => {
                    over = String::from_utf8_lossy(&buf[..n]).into_owned();
                    break;
                }
                _ => held.push(s),
            }
        }
        drop(held);
        over
    })
    .await
    .unwrap();
    assert!(body.starts_with("HTTP/1.1 503") && body.contains("too many admin connections"), "{body}");
    // Once they are gone, the admin answers again, and xDS was never affected.
    plane.wait_for("the admin to answer again", |p| p.healthy()).await;
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"admin_connections\"}") >= 1.0);
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"event_clients\"}") >= 1.0);
    still_serving(&plane, &mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_in_chunks_is_applied_only_once_closed() {
    use std::io::Write;
    let plane = Plane::start(&[("a", "1")]).await;
    let mut c = client_with_a(&plane).await;
    let serving = plane.api("/api/v1/config")["serving_version"].clone();
    let text = yaml(&[("a", "2")]);
    let (head, tail) = text.split_at(12); // "version: 1\ne": still a valid document
    let mut f = std::fs::File::create(plane.config_path()).unwrap();
    f.write_all(head.as_bytes()).unwrap();
    f.flush().unwrap();
    // A window in which nothing may happen (a reload takes ~50 ms here): no event marks
    // "a reload was not applied", so this waits a fixed time on purpose.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(plane.api("/api/v1/config")["serving_version"], serving, "the half-written file was not applied");
    f.write_all(tail.as_bytes()).unwrap();
    drop(f);
    plane.wait_for("the whole file to be applied", |p| p.api("/api/v1/config")["serving_version"] != serving).await;
    let r = c.recv_ack(&["a"]).await;
    assert_eq!(ecds_names(&r.resources), ["a"], "the proxy got the whole config, never an empty one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_directory_removed_and_created_again_is_watched_again() {
    let plane = Plane::start(&[("a", "1")]).await;
    let mut c = client_with_a(&plane).await;
    let dir = plane.config_path().parent().unwrap().to_path_buf();
    let serving = plane.api("/api/v1/config")["serving_version"].clone();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(plane.config_path(), yaml(&[("a", "2")])).unwrap();
    plane.wait_for("the config in the new directory", |p| p.api("/api/v1/config")["serving_version"] != serving).await;
    c.recv_ack(&["a"]).await;
    // And the watch holds: the next edit reloads too.
    still_serving(&plane, &mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_most_of_the_config_is_held_until_confirmed() {
    let plane = Plane::start(&[("a", "1"), ("b", "1"), ("c", "1")]).await;
    let mut c = client_with_a(&plane).await;
    let serving = plane.api("/api/v1/config")["serving_version"].clone();
    // A truncated file that still parses: everything would go.
    plane.refuse_or_hold("version: 1\n", "held").await;
    let status = plane.api("/api/v1/config");
    assert_eq!(status["serving_version"], serving, "still serving the last config");
    assert_eq!(
        (status["last_outcome"]["removed"].as_u64(), status["last_outcome"]["served"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(plane.metric("filterplane_config_reloads_total{result=\"held\"}"), 1.0);
    // Removing one of three is a routine edit: applied.
    plane.set(&[("a", "2"), ("b", "1")]).await;
    c.recv_ack(&["a"]).await;
    // The operator confirms a mass removal: applied.
    std::fs::write(plane.config_path(), "version: 1\n").unwrap();
    let admin = plane.admin;
    // Not by a form on another site's page, nor on a page of another port of this host
    // (issue 20: either applied the held removal).
    let serving = plane.api("/api/v1/config")["serving_version"].clone();
    for (origin, site) in [("http://evil.example", "cross-site"), ("http://127.0.0.1:1", "same-site")] {
        let code = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
            agent
                .post(&format!("http://{admin}/api/v1/reload?confirm=true"))
                .header("origin", origin)
                .header("sec-fetch-site", site)
                .header("content-type", "application/x-www-form-urlencoded")
                .send("x=1")
                .unwrap()
                .status()
        })
        .await
        .unwrap();
        assert_eq!(code, 403, "{origin}");
    }
    assert_eq!(plane.api("/api/v1/config")["serving_version"], serving, "the cross-site requests changed nothing");
    let outcome: serde_json::Value = tokio::task::spawn_blocking(move || {
        ureq::post(&format!("http://{admin}/api/v1/reload?confirm=true"))
            .send_empty()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(outcome["result"], "applied", "{outcome}");
    assert!(plane.healthy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_module_source_does_not_hold_the_rest_of_the_config() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers every request with a body of 1,000 bytes, one byte every 2 s.
    let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = slow.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = slow.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n").await;
                for _ in 0..1000 {
                    if s.write_all(b"x").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            });
        }
    });
    let plane = Plane::start_with(&[("a", "1")], |s| s.wasm.fetch_deadline = std::time::Duration::from_secs(1)).await;
    let mut c = client_with_a(&plane).await;
    let serving = plane.api("/api/v1/config")["serving_version"].clone();
    let text = format!(
        "{}wasm_plugins:\n  - name: slow\n    url: http://{addr}/m.wasm\n    sha256: {}\n",
        yaml(&[("a", "2")]),
        "0".repeat(64)
    );
    std::fs::write(plane.config_path(), text).unwrap();
    // Within the harness's wait (the slow fetch alone would take 30 s per attempt).
    plane.wait_for("the edit beside the slow plugin", |p| p.api("/api/v1/config")["serving_version"] != serving).await;
    c.recv_ack(&["a"]).await;
    let errors = plane.api("/api/v1/config")["wasm_errors"].clone();
    assert_eq!(errors[0]["plugin"], "slow", "{errors}");
    assert!(errors[0]["message"].as_str().unwrap_or("").contains("not fetched within 1 s"), "{errors}");
    assert!(plane.healthy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_size_limit_ends_the_stream_with_an_error_status() {
    let plane = Plane::start(&[("a", "1")]).await;
    let mut c = client_with_a(&plane).await;
    let mut big = DeltaClient::connect(&plane, "big").await;
    let huge = "n".repeat(5 << 20);
    big.send(ECDS, Delta { subscribe: &[huge.as_str()], ..Default::default() }).await;
    let status = big.ended().await;
    assert_eq!(status.code(), tonic::Code::OutOfRange, "not a clean end: {status:?}");
    still_serving(&plane, &mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_connection_that_sends_nothing_gives_its_slot_back() {
    let plane = Plane::start_with(&[("a", "1")], |s| {
        s.limits.max_admin_connections = 3;
        s.limits.admin_request_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let admin = plane.admin;
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        // Two silent connections (a third slot is left for the harness's own requests);
        // the server closes them after its first-request deadline (1 s here), long before
        // this client would give up (30 s).
        let silent: Vec<_> = (0..2).map(|_| std::net::TcpStream::connect(admin).unwrap()).collect();
        for mut s in silent {
            s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
            let mut rest = Vec::new();
            let read = s.read_to_end(&mut rest);
            assert!(read.is_ok() && rest.is_empty(), "closed by the server, unanswered: {read:?} {rest:?}");
        }
    })
    .await
    .unwrap();
    plane.wait_for("the admin to answer again", |p| p.healthy()).await;
    assert_eq!(plane.metric("filterplane_limit_hits_total{limit=\"admin_idle\"}"), 2.0);
}

/// Random HTTP/2 from 400 clients (fixed seed): frames of every type with random flags,
/// streams and payloads, header blocks of random bytes, frames cut short, no preface.
/// The server answers each with GOAWAY or a reset or nothing, never panics or stalls,
/// and keeps serving the client that behaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_http2_never_takes_the_server_down() {
    let plane = Plane::start(&[("a", "1")]).await;
    let mut c = client_with_a(&plane).await;
    let xds = plane.xds;
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        for round in 0..400 {
            let Ok(mut s) = std::net::TcpStream::connect(xds) else { continue };
            s.set_read_timeout(Some(std::time::Duration::from_millis(50))).unwrap();
            let mut out = Vec::new();
            if round % 10 != 0 {
                out.extend_from_slice(PREFACE);
                out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
            }
            for _ in 0..(next() % 12) {
                let ty = (next() % 11) as u8;
                let flags = (next() % 256) as u8;
                let stream = (next() % 8) as u32;
                let len = (next() % 64) as usize;
                let mut payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if ty == 1 && next() % 2 == 0 {
                    // Something like a real request now and then, so streams get opened.
                    payload = vec![0x83, 0x86, 0x44, 0x0d];
                    payload.extend_from_slice(b"/x.Y/Anything");
                }
                let declared = if next() % 20 == 0 { len + 5 } else { len };
                out.extend_from_slice(&[(declared >> 16) as u8, (declared >> 8) as u8, declared as u8, ty, flags]);
                out.extend_from_slice(&stream.to_be_bytes());
                out.extend_from_slice(&payload);
            }
            let _ = s.write_all(&out);
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
        }
    })
    .await
    .unwrap();
    assert!(plane.healthy());
    still_serving(&plane, &mut c).await;
}

/// A client that half-sends a large request on many streams (each within its flow-control
/// window) is cut off once the connection holds 8 MiB of unfinished requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_requests_on_many_streams_are_bounded_per_connection() {
    let plane = Plane::start(&[("a", "1")]).await;
    let mut c = client_with_a(&plane).await;
    let xds = plane.xds;
    let (goaway_code, flow_control_resets) = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let frame = |out: &mut Vec<u8>, ty: u8, flags: u8, id: u32, payload: &[u8]| {
            let n = payload.len();
            out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8, ty, flags]);
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(payload);
        };
        let path = b"/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
        let mut s = std::net::TcpStream::connect(xds).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        frame(&mut out, 4, 0, 0, &[]);
        s.write_all(&out).unwrap();
        // Twelve streams, each: a gRPC message that says 4 MiB, then 900 KiB of it.
        for k in 0..12u32 {
            let id = 2 * k + 1;
            let mut out = Vec::new();
            let mut block = vec![0x83, 0x86, 0x44, path.len() as u8];
            block.extend_from_slice(path);
            frame(&mut out, 1, 0x4, id, &block);
            let mut first = vec![0u8];
            first.extend_from_slice(&(4u32 << 20).to_be_bytes());
            first.resize(16_000, b'x');
            frame(&mut out, 0, 0, id, &first);
            for _ in 0..56 {
                frame(&mut out, 0, 0, id, &[b'x'; 16_000]);
            }
            if s.write_all(&out).is_err() {
                break;
            }
        }
        // Read until the server closes: the GOAWAY's error code.
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let mut pos = 0;
        let (mut code, mut flow_control_resets) = (None, 0);
        while pos + 9 <= got.len() {
            let len = (usize::from(got[pos]) << 16) | (usize::from(got[pos + 1]) << 8) | usize::from(got[pos + 2]);
            if got[pos + 3] == 7 && pos + 9 + 8 <= got.len() {
                let p = &got[pos + 9..];
                code = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            }
            if got[pos + 3] == 3 && pos + 9 + 4 <= got.len() && got[pos + 9..pos + 13] == [0, 0, 0, 3] {
                flow_control_resets += 1;
            }
            pos += 9 + len;
        }
        (code, flow_control_resets)
    })
    .await
    .unwrap();
    let hits = plane.metric("filterplane_limit_hits_total{limit=\"buffered_request_bytes\"}");
    if transport() == filterplane_server::settings::XdsHttp2::Lean {
        assert_eq!(goaway_code, Some(0xb), "GOAWAY with ENHANCE_YOUR_CALM");
        assert_eq!(hits, 1.0);
    } else {
        // tonic's h2 holds this client to the windows it advertised before the client
        // ACKed its SETTINGS (65,535 bytes): streams reset, or the connection ended, with
        // FLOW_CONTROL_ERROR long before 8 MiB waits; past that, the connection would be
        // closed as above.
        assert!(
            flow_control_resets > 0 || goaway_code == Some(3) || hits == 1.0,
            "refused: {flow_control_resets} resets, GOAWAY {goaway_code:?}, {hits} hits"
        );
    }
    still_serving(&plane, &mut c).await;
}

/// `GET path` with a bearer token from a loopback address of the caller's choice; the
/// status code.
fn admin_get_from(admin: std::net::SocketAddr, from: [u8; 4], path: &str, token: &str) -> u16 {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&std::net::SocketAddr::from((from, 0)).into()).unwrap();
    socket.connect(&admin.into()).unwrap();
    let mut s: std::net::TcpStream = socket.into();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let req =
        format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guesses_are_slowed_per_address_without_locking_out_others() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "right-token\n").unwrap();
    let plane = Plane::start_with(&[("a", "1")], |s| {
        s.security.admin_token_file = Some(token.clone());
        s.security.metrics_public = true;
    })
    .await;
    let admin = plane.admin;
    let (guesses, operator) = tokio::task::spawn_blocking(move || {
        let guesses: Vec<u16> =
            (0..8).map(|k| admin_get_from(admin, [127, 0, 0, 9], "/api/v1/config", &format!("guess-{k}"))).collect();
        // Even the right token waits from the guessing address; another address is served.
        let blocked = admin_get_from(admin, [127, 0, 0, 9], "/api/v1/config", "right-token");
        let operator = admin_get_from(admin, [127, 0, 0, 1], "/api/v1/config", "right-token");
        (guesses.into_iter().chain([blocked]).collect::<Vec<_>>(), operator)
    })
    .await
    .unwrap();
    assert_eq!(guesses[..5], [401; 5], "the first five are answered");
    assert!(guesses[6..].iter().all(|&c| c == 429), "then the address waits: {guesses:?}");
    assert_eq!(operator, 200);
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"sign_in_backoff\"}") >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_node_id_is_refused_with_a_clear_error() {
    let plane = Plane::start(&[("a", "1")]).await;
    let mut c = DeltaClient::connect(&plane, &"n".repeat(1_100_000)).await;
    c.send(ECDS, Delta { subscribe: &["a"], ..Default::default() }).await;
    let status = c.ended().await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("1100000 bytes, over the limit of 1024"), "{}", status.message());
    assert_eq!(plane.metric("filterplane_limit_hits_total{limit=\"node_id_bytes\"}"), 1.0);
    assert_eq!(plane.api("/api/v1/proxies?limit=10")["total"].as_u64(), Some(0), "never tracked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_state_directory_serves_and_says_why_state_is_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let first = Plane::start_with(&[("a", "1")], |s| s.state.dir = Some(state.into())).await;
    // Before: "Database already open. Cannot acquire lock", exit at start.
    let second = Plane::start_with(&[("a", "1")], |s| s.state.dir = Some(state.into())).await;
    let note = second.api("/api/v1/rollouts")["store_error"].as_str().unwrap_or_default().to_owned();
    assert!(note.contains("--state-dir") && note.contains("in use by another process"), "{note}");
    assert!(first.api("/api/v1/rollouts")["store_error"].is_null());
    let mut c = SotwClient::connect(&second, "on-second").await;
    c.request(ECDS, &["a"], "", "").await;
    assert_eq!(ecds_names(&c.recv().await.resources), ["a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_state_file_is_moved_aside_and_the_server_starts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rollouts.redb"), vec![0x5a; 8192]).unwrap();
    // Before: a panic at start (exit 101: a crash loop under any supervisor).
    let plane = Plane::start_with(&[("a", "1")], |s| s.state.dir = Some(dir.path().into())).await;
    let note = plane.api("/api/v1/rollouts")["store_error"].as_str().unwrap_or_default().to_owned();
    assert!(note.contains("moved to") && note.contains("rollouts.redb.unreadable-"), "{note}");
    assert!(plane.healthy());
}

/// gRPC messages sent as given (a typed client cannot send a name that is not UTF-8).
struct RawRequests;

struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Codec for RawRequests {
    type Encode = Vec<u8>;
    type Decode = DiscoveryResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<DiscoveryResponse>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        tonic::codec::Codec::decoder(&mut tonic_prost::ProstCodec::<DiscoveryRequest, DiscoveryResponse>::default())
    }
}

/// A SotW ACK whose names are read off the wire apart from the rest of the request
/// (`StatedNames`): one that is not UTF-8 ends that stream with a status saying which
/// name, as a request prost cannot decode does, and the server serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_naming_a_resource_in_bytes_that_are_not_utf8_ends_its_stream_with_a_clear_error() {
    use prost::Message;
    let plane = Plane::start(&[("a", "1")]).await;
    let mut c = client_with_a(&plane).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", plane.xds)).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let (tx, reqs) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    );
    let mut rx = grpc
        .streaming(tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(reqs)), path, RawRequests)
        .await
        .unwrap()
        .into_inner();
    let request = |names: &[&str], version: &str, nonce: &str| DiscoveryRequest {
        node: Some(node("raw")),
        type_url: ECDS.into(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    tx.send(request(&["a"], "", "").encode_to_vec()).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), rx.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(ecds_names(&r.resources), ["a"]);
    // The ACK, its one name's byte `a` made 0xff (field 3, length 1).
    let mut ack = request(&["a"], &r.version_info, &r.nonce).encode_to_vec();
    let at = ack.windows(3).position(|w| w == [0x1a, 0x01, b'a']).expect("the name's field") + 2;
    ack[at] = 0xff;
    tx.send(ack).await.unwrap();
    let status = match tokio::time::timeout(Duration::from_secs(10), rx.message()).await {
        Ok(Err(status)) => status,
        other => panic!("expected the stream to end with a status, got {:?}", other.map(|r| r.map(|o| o.is_some()))),
    };
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("resource name 0 is not UTF-8"), "{}", status.message());
    still_serving(&plane, &mut c).await;
}
