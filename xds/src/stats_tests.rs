//! Reading Envoy's metrics messages.

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
