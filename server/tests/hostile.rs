//! Hostile and malformed input against a running Filterplane (in process, loopback): each
//! test sends the bad input and checks that the server stays up, answers `/healthz`
//! promptly, and keeps serving the last good config to a connected client.

#[allow(dead_code)]
#[path = "conformance/harness.rs"]
mod harness;

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
    // 600 KB of flow nesting: once 20-38 s to refuse.
    let started = std::time::Instant::now();
    plane.refuse(&format!("version: 1\nx: {}\n", "[".repeat(600_000))).await;
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "refused in {:?}", started.elapsed());
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
    let started = std::time::Instant::now();
    d.send(ECDS, Delta { subscribe: &refs, ..Default::default() }).await;
    let r = d.recv_ack().await;
    assert_eq!(r.removed_resources.len(), 9_999, "each named as not existing");
    d.send(ECDS, Delta { unsubscribe: &refs, ..Default::default() }).await;
    d.send(ECDS, Delta { subscribe: &["a"], ..Default::default() }).await;
    assert_eq!(delta_names(&d.recv_ack().await), ["a"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());
    // Over the limit: the stream ends with RESOURCE_EXHAUSTED, counted.
    let names: Vec<String> = (0..200_000).map(|i| format!("missing-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut greedy = DeltaClient::connect(&plane, "greedy").await;
    greedy.send(ECDS, Delta { subscribe: &refs, ..Default::default() }).await;
    let status = greedy.ended().await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limit of 10000"), "{status:?}");
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
