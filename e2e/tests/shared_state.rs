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

/// Issue 21: etcd as production runs it. TLS with client certificates, authentication
/// by user and password (set up by etcd's own `etcdctl`, a user allowed only under its
/// prefix), and several endpoints, the first one dead: the replica fails over, leads,
/// and its keys are in etcd. A replica with a wrong password does not start, and says why.
#[test]
fn etcd_over_tls_with_a_client_certificate_auth_and_a_dead_first_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ca = filterplane_e2e::pki::Ca::new(dir.path(), "etcd");
    let tls = filterplane_e2e::services::EtcdTls {
        ca: ca.cert.clone(),
        server: ca.server("etcd-server"),
        client: ca.issue("etcdctl", &["dns:etcdctl"], false),
    };
    let etcd = EtcdServer::start_with(dir.path(), Some(tls));
    for args in [
        &["role", "add", "root"][..],
        &["user", "add", "root:rootpw"],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "fp"],
        &["role", "grant-permission", "fp", "--prefix=true", "readwrite", "secure/"],
        &["user", "add", "fp:fp-password"],
        &["user", "grant-role", "fp", "fp"],
        &["auth", "enable"],
    ] {
        etcd.etcdctl(None, args).unwrap();
    }
    let client = ca.issue("filterplane-client", &["dns:filterplane"], false);
    fs::write(dir.path().join("password"), "fp-password\n").unwrap();
    fs::write(dir.path().join("wrong"), "not-it\n").unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    fs::write(&yaml, yaml_with("v1")).unwrap();
    // Nothing listens on the first endpoint.
    let url = etcd.url("secure").replace("etcds://", &format!("etcds://127.0.0.1:{},", free_port()));
    let fp = {
        let dir_for = dir.path().join("one");
        fs::create_dir_all(&dir_for).unwrap();
        let (cert, key) = (client.cert.to_str().unwrap(), client.key.to_str().unwrap());
        let password = dir.path().join("password");
        Filterplane::start_with_args(
            &yaml,
            &dir_for,
            free_port(),
            free_port(),
            &[
                "--state-store",
                &url,
                "--state-store-ca-file",
                ca.cert.to_str().unwrap(),
                "--state-store-cert-file",
                cert,
                "--state-store-key-file",
                key,
                "--state-store-user",
                "fp",
                "--state-store-password-file",
                password.to_str().unwrap(),
                "--replica-name",
                "one",
            ],
        )
    };
    let shared = wait_until("leading through the second endpoint", Duration::from_secs(30), || {
        let s = fp.api("/api/v1/rollouts")["shared"].clone();
        (s["is_leader"] == true && s["reachable"] == true).then_some(s)
    });
    assert_eq!(shared["leader"], "one", "{shared}");
    let leader = etcd.etcdctl(Some("fp:fp-password"), &["get", "--print-value-only", "secure/leader"]).unwrap();
    assert_eq!(leader.trim(), "one", "the leader key, as etcd's own client reads it");
    let reports =
        etcd.etcdctl(Some("fp:fp-password"), &["get", "--prefix", "--keys-only", "secure/replicas/"]).unwrap();
    assert!(reports.contains("secure/replicas/one"), "{reports}");
    // The wrong password: refused by etcd at start, and said so (nothing served from a
    // state it cannot read).
    let out = std::process::Command::new(filterplane_e2e::filterplane_bin())
        .arg("serve")
        .arg("--config")
        .arg(&yaml)
        .args(["--xds-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
        .arg("--cache-dir")
        .arg(dir.path().join("two"))
        .args(["--state-store", &url, "--state-store-ca-file", ca.cert.to_str().unwrap()])
        .args(["--state-store-cert-file", client.cert.to_str().unwrap()])
        .args(["--state-store-key-file", client.key.to_str().unwrap()])
        .args(["--state-store-user", "fp", "--state-store-password-file"])
        .arg(dir.path().join("wrong"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--state-store") && stderr.contains("authentication failed"), "{stderr}");
    assert_eq!(fp.api("/api/v1/rollouts")["shared"]["leader"], "one", "the other one leads on");
}
