//! Reading Envoy's metrics messages and keeping running totals.

use filterplane_api::envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::metrics::v3::{stream_metrics_message::Identifier, StreamMetricsMessage},
    },
    io::prometheus::client::{Counter, LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary},
};
use prost::Message;

use super::*;

fn counter(name: &str, value: f64, labels: &[(&str, &str)]) -> MetricFamily {
    MetricFamily {
        name: Some(name.into()),
        r#type: Some(MetricType::Counter as i32),
        metric: vec![Metric {
            label: labels
                .iter()
                .map(|(k, v)| LabelPair { name: Some((*k).into()), value: Some((*v).into()) })
                .collect(),
            counter: Some(Counter { value: Some(value), ..Default::default() }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn message(node: Option<&str>, families: Vec<MetricFamily>) -> Vec<u8> {
    StreamMetricsMessage {
        identifier: node.map(|id| Identifier { node: Some(Node { id: id.into(), ..Default::default() }) }),
        envoy_metrics: families,
    }
    .encode_to_vec()
}

#[test]
fn only_the_series_gates_read_are_taken_and_admin_is_left_out() {
    let time = MetricFamily {
        name: Some("http.ingress.downstream_rq_time".into()),
        r#type: Some(MetricType::Summary as i32),
        metric: vec![Metric {
            summary: Some(Summary {
                sample_count: Some(10),
                quantile: vec![
                    Quantile { quantile: Some(0.5), value: Some(3.0) },
                    Quantile { quantile: Some(0.99), value: Some(42.0) },
                ],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let bytes = message(
        Some("edge-1"),
        vec![
            counter("http.ingress.downstream_rq_completed", 100.0, &[]),
            counter("http.admin.downstream_rq_completed", 7.0, &[]),
            counter("http.ingress.downstream_rq_5xx", 3.0, &[]),
            counter("http.downstream_rq_xx", 2.0, &[("envoy_response_code_class", "5")]),
            counter("http.downstream_rq_xx", 50.0, &[("envoy_response_code_class", "2")]),
            counter("cluster.x.upstream_rq_5xx", 99.0, &[]),
            counter("wasm.authz.vm_reload_backoff", 4.0, &[]),
            counter("wasm.envoy.wasm.runtime.v8.created", 9.0, &[]),
            counter("http.downstream_rq_completed", 5.0, &[("envoy_http_conn_manager_prefix", "admin")]),
            time,
        ],
    );
    let (node, flush) = read_message(&bytes).unwrap();
    assert_eq!(node.unwrap().id, "edge-1");
    assert_eq!((flush.requests, flush.errors_5xx, flush.p99_ms), (100.0, 5.0, Some(42.0)));
    assert_eq!(flush.wasm_failures, 4.0);
    assert!(read_message(&bytes[..bytes.len() - 3]).is_err(), "cut short: an error, not a guess");
}

#[test]
fn cumulative_and_delta_counters_give_the_same_windows_and_restarts_count_from_zero() {
    let store = HealthStore::default();
    assert!(store.open("cum", false, 0) && store.open("delta", true, 0));
    let flush = |requests: f64, errors_5xx: f64| Flush { requests, errors_5xx, seen: true, ..Default::default() };
    for (t, (cum, delta)) in
        [((100.0, 0.0), (100.0, 0.0)), ((150.0, 5.0), (50.0, 5.0)), ((170.0, 5.0), (20.0, 0.0))].into_iter().enumerate()
    {
        let at = 1_000 * (t as u64 + 1);
        store.record("cum", flush(cum.0, cum.1), at);
        store.record("delta", flush(delta.0, delta.1), at);
    }
    for node in ["cum", "delta"] {
        let w = store.window(node, 1_000).unwrap();
        assert_eq!((w.requests, w.errors_5xx), (70.0, 5.0), "{node}: after the first flush");
        assert_eq!(store.window(node, 0).unwrap().requests, 70.0, "{node}: from the first flush kept");
        assert_eq!(store.window(node, 1_500).unwrap().requests, 20.0, "{node}: the straddling interval left out");
    }
    // Envoy restarted: its counters start again.
    store.record("cum", flush(10.0, 1.0), 4_000);
    let w = store.window("cum", 3_000).unwrap();
    assert_eq!((w.requests, w.errors_5xx), (10.0, 1.0));
    assert!((store.window("cum", 1_000).unwrap().ratio_5xx() - 6.0 / 80.0).abs() < 1e-9);
    assert_eq!(store.window("nobody", 0), None);
}

#[test]
fn samples_and_proxies_are_bounded() {
    let store = HealthStore::default();
    store.open("p", false, 0);
    for i in 0..(MAX_SAMPLES as u64 * 2) {
        store.record("p", Flush { requests: i as f64, seen: true, ..Default::default() }, i * 1_000);
    }
    let kept = store.proxies.lock().unwrap()["p"].samples.len();
    assert_eq!(kept, MAX_SAMPLES);
    // A window reaching past what is kept counts from the oldest kept flush.
    let w = store.window("p", 0).unwrap();
    assert_eq!(w.requests, (MAX_SAMPLES - 1) as f64);
}

#[test]
fn a_departed_proxys_stats_go_some_minutes_after_its_stream_ended() {
    let store = HealthStore::default();
    store.open("stays", false, 0);
    store.open("leaves", false, 0);
    store.open("back", false, 0);
    let ten_minutes = RETAIN_AFTER_END_MS;
    store.close("leaves", 1_000);
    store.close("back", 1_000);
    store.open("back", false, ten_minutes / 2); // reconnected in time: its history stays
    store.open("other", false, ten_minutes + 2_000);
    assert_eq!(store.len(), 3, "leaves went; stays, back and other are kept");
    assert_eq!(store.window("leaves", 0), None);
}
