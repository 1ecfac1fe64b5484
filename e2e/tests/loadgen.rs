//! Smoke run of xds-loadgen against the real binary: 50 simulated proxies, one change,
//! every one of them receives it and Filterplane sees every ACK; then the change back,
//! with the server's own fan-out time read from its histogram.

use std::time::Duration;

use filterplane_bench::{run, Change, LoadSpec, Mode};
use filterplane_e2e::{quickstart::example_yaml, Filterplane};

fn smoke(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    std::fs::write(&yaml, example_yaml()).unwrap();
    let fp = Filterplane::start(&yaml, dir.path());
    let spec = LoadSpec {
        server: format!("http://127.0.0.1:{}", fp.xds_port),
        streams: 50,
        mode,
        ecds: vec!["add-header".into()],
        eds: Vec::new(),
        tls: None,
        wildcard_lds_cds: true,
        nack: None,
        nack_containing: None,
        nack_message_bytes: 0,
        multiplex: 1,
        node_prefix: "smoke".into(),
        cluster: "smoke".into(),
        metadata: vec![("env".into(), "test".into())],
        ramp_per_sec: 500.0,
        change: Some(Change { file: yaml.clone(), from: "value: v1".into(), to: "value: v2".into() }),
        admin: Some(fp.url("")),
        metrics: Some(fp.url("/metrics")),
        timeout: Duration::from_secs(30),
        server_pid: None,
        hold: Duration::ZERO,
        // The second (back again) is read against the server's fan-out histogram.
        changes: 2,
    };
    let report = tokio::runtime::Runtime::new().unwrap().block_on(run(spec)).unwrap();
    println!("{report}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.first_full_config.count, 50);
    assert_eq!(report.change_received.as_ref().map(|p| p.count), Some(50), "every proxy received the change");
    assert_eq!(report.change_acked_by_server.as_ref().map(|p| p.count), Some(50), "Filterplane saw every ACK");
    let again = &report.repeats[0];
    assert_eq!(again.received, 50, "every proxy received the change back");
    let fanout = again.server_fanout_p99_ms.expect("the server's fan-out read from /metrics");
    // Each stream's fan-out ends before the proxy receives it, and the reading lies within
    // a bucket (a quarter, or the first millisecond) of the true quantile.
    assert!(fanout > 0.0 && fanout <= again.p99_ms * 1.25 + 1.0, "{fanout} ms against {} ms", again.p99_ms);
    assert_eq!(report.nacks_sent, 0);
    assert_eq!(report.acks_sent, report.messages_received);
    let connected = fp.metric(&format!(
        "filterplane_xds_connected_proxies{{stream_kind=\"{}\"}}",
        if mode == Mode::Sotw { "sotw" } else { "delta" }
    ));
    assert!(connected.is_some());
}

#[test]
fn loadgen_smoke_sotw() {
    smoke(Mode::Sotw);
}

#[test]
fn loadgen_smoke_delta() {
    smoke(Mode::Delta);
}
