//! Shared state under hostile sizes (issue 20, item 7), with a real etcd: a replica whose
//! proxies NACK with long messages during a rollout keeps leading, and the rollout fails
//! on those NACKs. (Before, its report part went over etcd's limit; the failed write ended
//! every beat, the replica stopped leading but kept the leader key, and nobody led.)

use std::{fs, time::Duration};

use filterplane_e2e::{free_port, quickstart::yaml_with, services::EtcdServer, wait_until, Filterplane};

#[test]
fn nacks_with_long_messages_fail_a_rollout_led_through_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(dir.path());
    let yaml = dir.path().join("filterplane.yaml");
    let rollout = "{ steps: [50, 100], bake: 60s, max_nacks: 0, ack_timeout: 60s }";
    fs::write(&yaml, format!("{}\nrollout: {rollout}\n", yaml_with("v1"))).unwrap();
    let fp = Filterplane::start_with_args(
        &yaml,
        dir.path(),
        free_port(),
        free_port(),
        &["--state-store", &etcd.url("big"), "--replica-name", "solo"],
    );
    wait_until("leading", Duration::from_secs(20), || {
        (fp.api("/api/v1/rollouts")["shared"]["is_leader"] == true).then_some(())
    });
    // 600 simulated proxies; the step's 300 NACK v2 with 5 KB messages (4 KiB kept each:
    // 1.2 MB of messages, more than etcd takes in one value).
    let load = filterplane_bench::LoadSpec {
        nack: Some("add-header".into()),
        nack_containing: Some("v2".into()),
        nack_message_bytes: 5000,
        change: Some(filterplane_bench::Change {
            file: yaml.clone(),
            from: "value: v1".into(),
            to: "value: v2".into(),
        }),
        timeout: Duration::from_secs(60),
        ..filterplane_bench::LoadSpec::sotw(format!("http://127.0.0.1:{}", fp.xds_port), 600, "add-header", "big")
    };
    let _loadgen = std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(filterplane_bench::run(load)).map_err(|e| e.to_string())
    });
    let v = wait_until("the rollout to fail on the NACKs", Duration::from_secs(60), || {
        let v = fp.api("/api/v1/rollouts");
        (v["history"][0]["outcome"] == "rolled_back").then_some(v)
    });
    let shared = &v["shared"];
    assert_eq!(shared["is_leader"], true, "still leading: {shared}");
    assert_eq!(shared["reachable"], true, "{shared}");
    assert!(shared.get("report_error").is_none(), "the report was written whole: {shared}");
    drop(etcd);
}
