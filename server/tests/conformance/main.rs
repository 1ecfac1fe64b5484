//! xDS protocol conformance: each rule a named test, for state of the world and delta,
//! driven by a scripted client against a real Filterplane over gRPC.
//!
//! "Nothing is sent" is never checked by waiting: the test makes a change that must be
//! sent and checks that the next response is that one.

mod harness;

use harness::*;

mod sotw {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_request_without_node_ends_the_stream_with_invalid_argument() {
        use filterplane_api::envoy_types::pb::envoy::service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
        };
        let plane = Plane::start(&[("a", "1")]).await;
        let mut client =
            AggregatedDiscoveryServiceClient::connect(format!("http://{}", plane.xds)).await.expect("connect");
        let req = DiscoveryRequest { type_url: ECDS.into(), resource_names: vec!["a".into()], ..Default::default() };
        let mut rx = client.stream_aggregated_resources(tokio_stream::iter([req])).await.expect("stream").into_inner();
        let status = rx.message().await.expect_err("the stream ends with a gRPC status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("must carry the node"), "{status:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_request_gets_the_subscribed_resources() {
        let plane = Plane::start(&[("a", "1"), ("b", "1")]).await;
        let mut c = SotwClient::connect(&plane, "n").await;
        c.request(ECDS, &["a"], "", "").await;
        let r = c.recv().await;
        assert_eq!(r.type_url, ECDS);
        assert_eq!(ecds_names(&r.resources), ["a"]);
        assert!(!r.version_info.is_empty() && !r.nonce.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ack_is_tracked_and_not_answered() {
        let plane = Plane::start(&[("a", "1")]).await;
        let mut c = SotwClient::connect(&plane, "acker").await;
        c.request(ECDS, &["a"], "", "").await;
        let r = c.recv_ack(&["a"]).await;
        plane
            .wait_for("the ACK", |p| {
                p.api("/api/v1/proxies/acker")[0]["types"][ECDS]["acked_version"] == r.version_info.as_str()
            })
            .await;
        plane.set(&[("a", "2")]).await;
        let next = c.recv().await;
        assert_ne!(next.version_info, r.version_info, "the ACK itself produced no response");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nack_is_not_resent_and_the_fix_is() {
        let plane = Plane::start(&[("a", "1")]).await;
        let mut c = SotwClient::connect(&plane, "nacker").await;
        c.request(ECDS, &["a"], "", "").await;
        let good = c.recv_ack(&["a"]).await;
        plane.set(&[("a", "bad")]).await;
        let bad = c.recv().await;
        c.nack(ECDS, &["a"], &good.version_info, &bad.nonce, "refused").await;
        plane.wait_for("the reject", |p| p.api("/api/v1/rejects").as_array().is_some_and(|a| a.len() == 1)).await;
        plane.set(&[("a", "fixed")]).await;
        let fixed = c.recv().await;
        assert_ne!(fixed.version_info, bad.version_info, "the NACKed version was not sent again");
        assert_ne!(fixed.version_info, good.version_info);
        let reject = &plane.api("/api/v1/rejects")[0];
        assert_eq!(
            (reject["version"].as_str(), reject["kept_version"].as_str()),
            (Some(bad.version_info.as_str()), Some(good.version_info.as_str()))
        );
        assert_eq!(plane.metric(&format!("filterplane_xds_rejects_total{{type_url=\"{ECDS}\"}}")), 1.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsubscribe_narrows_the_next_response_and_stops_its_pushes() {
        let plane = Plane::start(&[("a", "1"), ("b", "1")]).await;
        let mut c = SotwClient::connect(&plane, "n").await;
        c.request(ECDS, &["a", "b"], "", "").await;
        let r = c.recv().await;
        assert_eq!(ecds_names(&r.resources), ["a", "b"]);
        c.request(ECDS, &["a"], &r.version_info, &r.nonce).await;
        let r = c.recv_ack(&["a"]).await;
        // A new version for the narrower set, carrying nothing: the client has "a".
        assert!(r.resources.is_empty());
        plane.set(&[("a", "1"), ("b", "2")]).await;
        plane.set(&[("a", "2"), ("b", "2")]).await;
        let next = c.recv().await;
        assert_eq!(ecds_names(&next.resources), ["a"], "b's change was not pushed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removed_resource_disappears_from_the_next_response() {
        let plane = Plane::start(&[("a", "1"), ("b", "1")]).await;
        let mut c = SotwClient::connect(&plane, "n").await;
        c.request(ECDS, &["a", "b"], "", "").await;
        c.recv_ack(&["a", "b"]).await;
        plane.set(&[("a", "1")]).await;
        // A new version, without "b" and without "a" (unchanged: the client keeps it).
        assert!(c.recv().await.resources.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reconnect_with_the_current_version_gets_nothing_until_a_change() {
        let plane = Plane::start(&[("a", "1")]).await;
        let mut first = SotwClient::connect(&plane, "n").await;
        first.request(ECDS, &["a"], "", "").await;
        let r = first.recv_ack(&["a"]).await;
        drop(first);
        let mut again = SotwClient::connect(&plane, "n").await;
        again.request(ECDS, &["a"], &r.version_info, "").await;
        plane.set(&[("a", "2")]).await;
        let next = again.recv().await;
        assert_ne!(next.version_info, r.version_info, "the first response is the change, not a resend");
        // A reconnect with an old version is answered at once.
        let mut stale = SotwClient::connect(&plane, "n2").await;
        stale.request(ECDS, &["a"], &r.version_info, "").await;
        assert_eq!(stale.recv().await.version_info, next.version_info);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_resource_names_are_answered_by_their_absence() {
        let plane = Plane::start(&[("a", "1")]).await;
        let mut c = SotwClient::connect(&plane, "n").await;
        c.request(ECDS, &["a", "nope"], "", "").await;
        assert_eq!(ecds_names(&c.recv().await.resources), ["a"]);
        let mut only_unknown = SotwClient::connect(&plane, "n2").await;
        only_unknown.request(ECDS, &["nope"], "", "").await;
        assert!(only_unknown.recv().await.resources.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn several_types_are_multiplexed_on_one_stream() {
        let plane = Plane::start(&[("a", "1")]).await;
        let mut c = SotwClient::connect(&plane, "n").await;
        c.request(CDS, &[], "", "").await;
        let cds = c.recv().await;
        assert_eq!((cds.type_url.as_str(), cds.resources.len()), (CDS, 0), "wildcard CDS answered, even empty");
        c.request(ECDS, &["a"], "", "").await;
        let ecds = c.recv().await;
        assert_eq!(ecds.type_url, ECDS);
        assert_ne!(cds.nonce, ecds.nonce);
        c.request(CDS, &[], &cds.version_info, &cds.nonce).await;
        c.request(ECDS, &["a"], &ecds.version_info, &ecds.nonce).await;
        plane.set(&[("a", "2")]).await;
        assert_eq!(c.recv().await.type_url, ECDS, "only the type that changed is pushed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn out_of_order_nonces_are_ignored() {
        let plane = Plane::start(&[("a", "1"), ("b", "1")]).await;
        let mut c = SotwClient::connect(&plane, "n").await;
        c.request(ECDS, &["a"], "", "").await;
        let r1 = c.recv().await;
        plane.set(&[("a", "2"), ("b", "1")]).await;
        let r2 = c.recv().await;
        // A request quoting the superseded nonce, even one that asks for more, is ignored.
        c.request(ECDS, &["a", "b"], &r1.version_info, &r1.nonce).await;
        c.request(ECDS, &["a"], &r2.version_info, &r2.nonce).await;
        plane.set(&[("a", "3"), ("b", "1")]).await;
        let r3 = c.recv().await;
        assert_eq!(ecds_names(&r3.resources), ["a"], "the stale request changed nothing");
    }
}

mod delta {
    use super::*;

    /// `filterplane_xds_push_fanout_seconds`: one observation per stream a new config
    /// changed something for, over either protocol; first responses and streams the
    /// change leaves alone are not pushes of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_stream_a_change_reaches_is_timed_once_in_the_fanout_histogram() {
        const COUNT: &str = "filterplane_xds_push_fanout_seconds_count";
        let plane = Plane::start(&[("a", "1"), ("b", "1")]).await;
        let mut delta = DeltaClient::connect(&plane, "d").await;
        delta.send(ECDS, Delta { subscribe: &["a"], ..Default::default() }).await;
        delta.recv_ack().await;
        let mut sotw = SotwClient::connect(&plane, "s").await;
        sotw.request(ECDS, &["a"], "", "").await;
        sotw.recv_ack(&["a"]).await;
        let mut other = SotwClient::connect(&plane, "o").await;
        other.request(ECDS, &["b"], "", "").await;
        other.recv_ack(&["b"]).await;
        assert_eq!(plane.metric(COUNT), 0.0, "first responses are not pushes of a change");

        let changed = std::time::Instant::now();
        plane.set(&[("a", "2"), ("b", "1")]).await;
        assert_eq!(delta_names(&delta.recv().await), ["a"]);
        assert_eq!(ecds_names(&sotw.recv().await.resources), ["a"]);
        let both_in = changed.elapsed().as_secs_f64();
        // Timed before it was framed, so counted by the time it arrived.
        assert_eq!(plane.metric(COUNT), 2.0, "the delta and the SotW stream of 'a', not the one of 'b'");
        assert_eq!(plane.metric("filterplane_xds_push_fanout_seconds_bucket{le=\"+Inf\"}"), 2.0);
        // Each push's time lies within the change's write and its receipt.
        let sum = plane.metric("filterplane_xds_push_fanout_seconds_sum");
        assert!(sum > 0.0 && sum <= 2.0 * both_in, "{sum} s for two pushes received within {both_in} s");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_request_gets_the_subscribed_resources() {
        let plane = Plane::start(&[("a", "1"), ("b", "1")]).await;
        let mut c = DeltaClient::connect(&plane, "n").await;
        c.send(ECDS, Delta { subscribe: &["a"], ..Default::default() }).await;
        let r = c.recv().await;
        assert_eq!(delta_names(&r), ["a"]);
        assert!(r.removed_resources.is_empty());
        assert!(!r.resources[0].version.is_empty() && !r.nonce.is_empty() && !r.system_version_info.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ack_is_tracked_and_only_changes_are_sent() {
        let plane = Plane::start(&[("a", "1"), ("b", "1")]).await;
        let mut c = DeltaClient::connect(&plane, "acker").await;
        c.send(ECDS, Delta { subscribe: &["a", "b"], ..Default::default() }).await;
        let r = c.recv_ack().await;
        assert_eq!(delta_names(&r), ["a", "b"]);
        plane
            .wait_for("the ACK", |p| {
                p.api("/api/v1/proxies/acker")[0]["types"][ECDS]["acked_version"] == r.system_version_info.as_str()
            })
            .await;
        assert_eq!(plane.api("/api/v1/proxies/acker")[0]["stream_kind"], "delta");
        plane.set(&[("a", "1"), ("b", "2")]).await;
        assert_eq!(delta_names(&c.recv().await), ["b"], "only what changed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nack_is_not_resent_and_the_fix_is() {
        let plane = Plane::start(&[("a", "1")]).await;
        let mut c = DeltaClient::connect(&plane, "nacker").await;
        c.send(ECDS, Delta { subscribe: &["a"], ..Default::default() }).await;
        let good = c.recv_ack().await;
        plane.set(&[("a", "bad")]).await;
        let bad = c.recv().await;
        c.send(ECDS, Delta { nonce: &bad.nonce, error: Some("refused"), ..Default::default() }).await;
        plane.wait_for("the reject", |p| p.api("/api/v1/rejects").as_array().is_some_and(|a| a.len() == 1)).await;
        let reject = &plane.api("/api/v1/rejects")[0];
        assert_eq!(reject["version"].as_str(), Some(bad.system_version_info.as_str()));
        assert_eq!(reject["kept_version"].as_str(), Some(good.system_version_info.as_str()));
        assert_eq!(reject["resources"], serde_json::json!(["a"]));
        plane.set(&[("a", "fixed")]).await;
        let fixed = c.recv().await;
        assert_ne!(fixed.resources[0].version, bad.resources[0].version);
        assert_eq!(plane.metric(&format!("filterplane_xds_rejects_total{{type_url=\"{ECDS}\"}}")), 1.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsubscribe_stops_pushes_for_that_resource() {
        let plane = Plane::start(&[("a", "1"), ("b", "1")]).await;
        let mut c = DeltaClient::connect(&plane, "n").await;
        c.send(ECDS, Delta { subscribe: &["a", "b"], ..Default::default() }).await;
        let r = c.recv().await;
        c.send(ECDS, Delta { nonce: &r.nonce, unsubscribe: &["b"], ..Default::default() }).await;
        plane.set(&[("a", "1"), ("b", "2")]).await;
        plane.set(&[("a", "2"), ("b", "2")]).await;
        let next = c.recv().await;
        assert_eq!(delta_names(&next), ["a"], "b is neither resent nor removed");
        assert!(next.removed_resources.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removed_resource_is_named_in_removed_resources() {
        let plane = Plane::start(&[("a", "1"), ("b", "1")]).await;
        let mut c = DeltaClient::connect(&plane, "n").await;
        c.send(ECDS, Delta { subscribe: &["a", "b"], ..Default::default() }).await;
        c.recv_ack().await;
        plane.set(&[("a", "1")]).await;
        let r = c.recv().await;
        assert!(r.resources.is_empty());
        assert_eq!(r.removed_resources, ["b"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reconnect_with_known_versions_is_not_sent_them_again() {
        let plane = Plane::start(&[("a", "1"), ("b", "1")]).await;
        let mut first = DeltaClient::connect(&plane, "n").await;
        first.send(ECDS, Delta { subscribe: &["a", "b"], ..Default::default() }).await;
        let r = first.recv_ack().await;
        let versions: Vec<(String, String)> = r.resources.iter().map(|x| (x.name.clone(), x.version.clone())).collect();
        drop(first);
        let mut again = DeltaClient::connect(&plane, "n").await;
        let initial: Vec<(&str, &str)> = vec![(versions[0].0.as_str(), versions[0].1.as_str()), ("b", "outdated")];
        again.send(ECDS, Delta { subscribe: &["a", "b"], initial: &initial, ..Default::default() }).await;
        let r = again.recv().await;
        assert_eq!(delta_names(&r), ["b"], "a was known at its current version; b was not");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_resource_names_are_reported_removed() {
        let plane = Plane::start(&[("a", "1")]).await;
        let mut c = DeltaClient::connect(&plane, "n").await;
        c.send(ECDS, Delta { subscribe: &["a", "nope"], ..Default::default() }).await;
        let r = c.recv().await;
        assert_eq!(delta_names(&r), ["a"]);
        assert_eq!(r.removed_resources, ["nope"], "'does not exist' is said at once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn several_types_are_multiplexed_on_one_stream() {
        let plane = Plane::start(&[("a", "1")]).await;
        let mut c = DeltaClient::connect(&plane, "n").await;
        c.send(CDS, Delta::default()).await;
        let cds = c.recv().await;
        assert_eq!((cds.type_url.as_str(), cds.resources.len()), (CDS, 0), "wildcard CDS answered, even empty");
        c.send(ECDS, Delta { subscribe: &["a"], ..Default::default() }).await;
        let ecds = c.recv().await;
        assert_eq!(ecds.type_url, ECDS);
        assert_ne!(cds.nonce, ecds.nonce);
        c.send(CDS, Delta { nonce: &cds.nonce, ..Default::default() }).await;
        c.send(ECDS, Delta { nonce: &ecds.nonce, ..Default::default() }).await;
        plane.set(&[("a", "2")]).await;
        assert_eq!(c.recv().await.type_url, ECDS, "only the type that changed is pushed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_nonces_are_ignored_but_subscriptions_apply() {
        let plane = Plane::start(&[("a", "1"), ("b", "1")]).await;
        let mut c = DeltaClient::connect(&plane, "n").await;
        c.send(ECDS, Delta { subscribe: &["a"], ..Default::default() }).await;
        c.recv().await;
        c.send(ECDS, Delta { nonce: "no-such-nonce", error: Some("x"), subscribe: &["b"], ..Default::default() }).await;
        let r = c.recv().await;
        assert_eq!(delta_names(&r), ["b"], "delta subscription changes apply whatever the nonce");
        assert_eq!(
            plane.api("/api/v1/rejects").as_array().map(Vec::len),
            Some(0),
            "the NACK of an unknown nonce is ignored"
        );
    }
}

/// Bytes on the wire for one change among 100 extension configs: both protocols carry
/// only the changed one (SotW may leave out unchanged resources of every type but
/// listeners and clusters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_change_among_a_hundred_configs_carries_only_that_one_over_sotw_and_delta() {
    let names: Vec<String> = (0..100).map(|i| format!("cfg-{i:03}")).collect();
    let entries = |changed: &str| -> Vec<(&str, String)> {
        names
            .iter()
            .map(|n| (n.as_str(), if n == "cfg-042" { changed.to_owned() } else { format!("{n}-value") }))
            .collect()
    };
    let e1 = entries("one");
    let e1: Vec<(&str, &str)> = e1.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let plane = Plane::start(&e1).await;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();

    let mut s = SotwClient::connect(&plane, "sotw").await;
    s.request(ECDS, &refs, "", "").await;
    s.recv_ack(&refs).await;
    let mut d = DeltaClient::connect(&plane, "delta").await;
    d.send(ECDS, Delta { subscribe: &refs, ..Default::default() }).await;
    d.recv_ack().await;

    let e2 = entries("two");
    let e2: Vec<(&str, &str)> = e2.iter().map(|(n, v)| (*n, v.as_str())).collect();
    plane.set(&e2).await;
    let sotw_r = s.recv().await;
    assert_eq!(ecds_names(&sotw_r.resources), ["cfg-042"]);
    let sotw = prost::Message::encoded_len(&sotw_r);
    let delta_r = d.recv().await;
    assert_eq!(delta_names(&delta_r), ["cfg-042"]);
    let delta = prost::Message::encoded_len(&delta_r);
    println!("one change among 100 extension configs: SotW {sotw} bytes, delta {delta} bytes");
    assert!(sotw < 400 && delta < 400, "delta {delta} B, SotW {sotw} B");
}
