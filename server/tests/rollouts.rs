//! Progressive rollouts against a running server (in process, loopback), with SotW
//! clients standing in for proxies: step membership, step advance after ACKs and bake,
//! rollback on NACK, and state that survives a restart.

#[allow(dead_code)]
#[path = "conformance/harness.rs"]
mod harness;

use harness::*;

fn with_rollout(value: &str, rollout: &str) -> String {
    format!("{}rollout: {rollout}\n", yaml(&[("a", value)]))
}

/// The version of `a` a client was last sent.
fn version_of(r: &filterplane_api::envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse) -> String {
    r.version_info.clone()
}

type Reply<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Waits briefly for a response on every client at once, answers each with `reply`, and
/// returns who got one (the step's proxies: the others are sent nothing).
async fn answered(
    proxies: &mut [(String, SotwClient, String)],
    reply: impl for<'a> Fn(
        &'a SotwClient,
        filterplane_api::envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
    ) -> Reply<'a>,
) -> Vec<String> {
    let window = std::time::Duration::from_millis(500);
    let got = futures_util::future::join_all(
        proxies
            .iter_mut()
            .map(|(id, c, _)| async move { (id.clone(), tokio::time::timeout(window, c.recv()).await.ok()) }),
    )
    .await;
    let mut who = Vec::new();
    for (id, r) in got {
        if let Some(r) = r {
            let (_, c, v) = proxies.iter_mut().find(|(i, _, _)| *i == id).unwrap();
            *v = r.version_info.clone();
            reply(c, r).await;
            who.push(id);
        }
    }
    who
}

async fn clients(plane: &Plane, n: usize) -> Vec<(String, SotwClient, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let id = format!("proxy-{i}");
        let mut c = SotwClient::connect(plane, &id).await;
        c.request(ECDS, &["a"], "", "").await;
        let r = c.recv_ack(&["a"]).await;
        out.push((id, c, version_of(&r)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_reaches_its_share_then_everyone() {
    let plane = Plane::start(&[("a", "v1")]).await;
    std::fs::write(plane.config_path(), with_rollout("v1", "{ steps: [50, 100], bake: 2s }")).unwrap();
    plane.wait_for("the rollout spec", |p| p.api("/api/v1/config")["last_outcome"]["result"] == "applied").await;
    let mut proxies = clients(&plane, 6).await;
    let old: Vec<String> = proxies.iter().map(|(_, _, v)| v.clone()).collect();
    std::fs::write(plane.config_path(), with_rollout("v2", "{ steps: [50, 100], bake: 2s }")).unwrap();
    // Three of six get v2 first: they ACK it; the others hear nothing yet.
    plane.wait_for("the first step", |p| p.api("/api/v1/rollouts")["rollouts"][0]["on_new"] == 3).await;
    let view = plane.api("/api/v1/rollouts");
    assert_eq!(view["rollouts"][0]["percent"], 50, "{view}");
    let first = answered(&mut proxies, |c, r| {
        Box::pin(async move { c.request(ECDS, &["a"], &r.version_info, &r.nonce).await })
    })
    .await;
    assert_eq!(first.len(), 3, "exactly the step's share: {first:?}");
    // After the bake with every member ACKed, the rest follow; once they ACK, it is done.
    for (id, c, v) in proxies.iter_mut().filter(|(id, _, _)| !first.contains(id)) {
        let r = c.recv_ack(&["a"]).await;
        assert_ne!(r.version_info, *v, "{id} moves to v2 at the last step");
    }
    plane
        .wait_for("the rollout to complete", |p| {
            p.api("/api/v1/rollouts")["rollouts"].as_array().is_some_and(|a| a.is_empty())
        })
        .await;
    let history = plane.api("/api/v1/rollouts")["history"].clone();
    assert_eq!(history[0]["outcome"], "completed", "{history}");
    assert!(plane.metric("filterplane_rollouts_total{outcome=\"completed\"}") >= 1.0);
    let _ = old;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_rolls_the_step_back_and_nobody_else_sees_it() {
    let plane = Plane::start(&[("a", "v1")]).await;
    let spec = "{ steps: [50, 100], bake: 60s, on_failure: rollback }";
    std::fs::write(plane.config_path(), with_rollout("v1", spec)).unwrap();
    plane.wait_for("the rollout spec", |p| p.api("/api/v1/config")["last_outcome"]["result"] == "applied").await;
    let mut proxies = clients(&plane, 4).await;
    let v1 = proxies[0].2.clone();
    std::fs::write(plane.config_path(), with_rollout("v2-bad", spec)).unwrap();
    plane.wait_for("the first step", |p| p.api("/api/v1/rollouts")["rollouts"][0]["on_new"] == 2).await;
    // The step's proxies NACK it (one NACK fails the rollout at once, so a member may be
    // rolled back before it was ever sent v2).
    let kept = v1.clone();
    let nacked = answered(&mut proxies, move |c, r| {
        let kept = kept.clone();
        Box::pin(async move { c.nack(ECDS, &["a"], &kept, &r.nonce, "Envoy says no").await })
    })
    .await;
    assert!(!nacked.is_empty() && nacked.len() <= 2, "{nacked:?}");
    plane.wait_for("the rollback", |p| p.api("/api/v1/rollouts")["rollouts"][0]["status"] == "failed").await;
    let view = plane.api("/api/v1/rollouts");
    let r = &view["rollouts"][0];
    assert_eq!(r["percent"], 0, "{view}");
    assert!(r["reason"].as_str().unwrap().contains("rolled back"), "{view}");
    assert_eq!(r["failures"][0]["message"], "Envoy says no");
    assert_eq!(view["history"][0]["outcome"], "rolled_back");
    // The step's proxies get v1 back; the others never heard of v2.
    for (id, c, _) in proxies.iter_mut() {
        if nacked.contains(id) {
            let r = c.recv_ack(&["a"]).await;
            assert_eq!(r.version_info, v1, "{id} is back on v1");
        } else {
            assert!(
                tokio::time::timeout(std::time::Duration::from_millis(300), c.recv()).await.is_err(),
                "{id} got nothing"
            );
        }
    }
    // Failed until the entry is edited again: an edit back to v1 ends it at once.
    std::fs::write(plane.config_path(), with_rollout("v1", spec)).unwrap();
    plane
        .wait_for("the rollout to end", |p| {
            p.api("/api/v1/rollouts")["rollouts"].as_array().is_some_and(|a| a.is_empty())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_streams_get_the_step_s_share_too() {
    let plane = Plane::start(&[("a", "v1")]).await;
    let spec = "{ steps: [50, 100], bake: 60s }";
    std::fs::write(plane.config_path(), with_rollout("v1", spec)).unwrap();
    plane.wait_for("the rollout spec", |p| p.api("/api/v1/config")["last_outcome"]["result"] == "applied").await;
    let mut streams = Vec::new();
    for i in 0..6 {
        let mut c = DeltaClient::connect(&plane, &format!("delta-{i}")).await;
        c.send(ECDS, Delta { subscribe: &["a"], ..Default::default() }).await;
        let r = c.recv_ack().await;
        assert_eq!(delta_names(&r), ["a"]);
        streams.push((c, r.resources[0].version.clone()));
    }
    std::fs::write(plane.config_path(), with_rollout("v2", spec)).unwrap();
    plane.wait_for("the first step", |p| p.api("/api/v1/rollouts")["rollouts"][0]["on_new"] == 3).await;
    let window = std::time::Duration::from_millis(500);
    let got = futures_util::future::join_all(
        streams.iter_mut().map(|(c, _)| async move { tokio::time::timeout(window, c.recv_ack()).await.ok() }),
    )
    .await;
    let updated: Vec<_> = got.iter().flatten().collect();
    assert_eq!(updated.len(), 3, "half of six");
    for (r, (_, v1)) in got.iter().zip(&streams) {
        if let Some(r) = r {
            assert_ne!(&r.resources[0].version, v1, "a step's proxy gets the new version");
        }
    }
    plane.wait_for("every step proxy ACKed", |p| p.api("/api/v1/rollouts")["rollouts"][0]["acked"] == 3).await;
}

/// Issue 20: a failing rollout kept every failing proxy and its whole message (400 with
/// 4 KiB messages and 40 edits: a 67 MB rollouts view). It keeps a count and a few
/// examples, their messages cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_counts_its_failures_and_keeps_a_few_examples() {
    let plane = Plane::start(&[("a", "v1")]).await;
    let spec = "{ steps: [50, 100], bake: 60s, max_nacks: 1000 }";
    std::fs::write(plane.config_path(), with_rollout("v1", spec)).unwrap();
    plane.wait_for("the rollout spec", |p| p.api("/api/v1/config")["last_outcome"]["result"] == "applied").await;
    let mut proxies = clients(&plane, 40).await;
    let v1 = proxies[0].2.clone();
    std::fs::write(plane.config_path(), with_rollout("v2", spec)).unwrap();
    plane.wait_for("the first step", |p| p.api("/api/v1/rollouts")["rollouts"][0]["on_new"] == 20).await;
    let long = "Envoy says no. ".repeat(300);
    let nacked = answered(&mut proxies, move |c, r| {
        let (kept, long) = (v1.clone(), long.clone());
        Box::pin(async move { c.nack(ECDS, &["a"], &kept, &r.nonce, &long).await })
    })
    .await;
    assert_eq!(nacked.len(), 20);
    plane.wait_for("every NACK counted", |p| p.api("/api/v1/rollouts")["rollouts"][0]["failure_count"] == 20).await;
    let view = plane.api("/api/v1/rollouts");
    let failures = view["rollouts"][0]["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 10, "ten examples");
    assert!(failures.iter().all(|f| f["message"].as_str().unwrap().len() < 1100), "messages cut to 1 KiB");
    assert!(view.to_string().len() < 40_000, "{} bytes", view.to_string().len());
}
