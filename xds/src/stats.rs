//! Envoy's metrics service messages (`envoy.service.metrics.v3.StreamMetricsMessage`),
//! read for the few series rollout health gates use: downstream requests completed and
//! 5xx, the request time p99, and Wasm VM failure counters. Pure: bytes in, figures out;
//! families gates do not read are skipped without decoding them.

use bytes::Buf;
use filterplane_api::envoy_types::pb::io::prometheus::client::{Metric, MetricFamily, MetricType};
use prost::{
    encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType},
    Message,
};

/// The series of one flush, as Envoy reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Flush {
    /// `http.*.downstream_rq_completed`, summed over HTTP connection managers (not admin).
    pub requests: f64,
    /// `http.*.downstream_rq_5xx`.
    pub errors_5xx: f64,
    /// `wasm.*` failure counters (see `is_wasm_failure`).
    pub wasm_failures: f64,
    /// The p99 of `http.*.downstream_rq_time` (ms), the largest over connection managers.
    pub p99_ms: Option<f64>,
    /// Whether any series was there at all.
    pub seen: bool,
}

/// Whether a counter is one of Envoy's Wasm failure counters: `wasm.PLUGIN.vm_reload`,
/// `vm_reload_backoff`, `vm_reload_success`, `vm_reload_failure`, each of which moves only
/// after a plugin's VM failed (`FAIL_RELOAD`). Envoy 1.40 counts no failure for
/// `FAIL_CLOSE` (a trap is a 503) or `FAIL_OPEN` (the trapping request is a 5xx, then the
/// plugin is skipped).
fn is_wasm_failure(name: &str) -> bool {
    name.starts_with("wasm.") && name.rsplit('.').next().is_some_and(|last| last.starts_with("vm_reload"))
}

/// The label value of `name` on `m`, if any.
fn label<'a>(m: &'a Metric, name: &str) -> Option<&'a str> {
    m.label.iter().find(|l| l.name.as_deref() == Some(name)).and_then(|l| l.value.as_deref())
}

/// Which of the wanted series a family name is, with tags in the name or as labels
/// (`emit_tags_as_labels`); `None` for every other family, which is skipped unread.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Wanted {
    Completed,
    Errors5xx,
    /// `http.downstream_rq_xx` with `envoy_response_code_class` as a label.
    ByClass,
    Time,
    Wasm,
}

fn wanted(name: &str) -> Option<Wanted> {
    if is_wasm_failure(name) {
        return Some(Wanted::Wasm);
    }
    let rest = name.strip_prefix("http.")?;
    if rest.starts_with("admin.") {
        return None;
    }
    if rest.ends_with("downstream_rq_completed") {
        Some(Wanted::Completed)
    } else if rest.ends_with("downstream_rq_5xx") {
        Some(Wanted::Errors5xx)
    } else if rest == "downstream_rq_xx" {
        Some(Wanted::ByClass)
    } else if rest.ends_with("downstream_rq_time") {
        Some(Wanted::Time)
    } else {
        None
    }
}

/// The name of an encoded `MetricFamily` (field 1), read without decoding the rest.
fn family_name(mut buf: &[u8]) -> Option<String> {
    while buf.has_remaining() {
        let (tag, wire) = decode_key(&mut buf).ok()?;
        if tag == 1 && wire == WireType::LengthDelimited {
            let len = decode_varint(&mut buf).ok()? as usize;
            let bytes = buf.get(..len)?;
            return String::from_utf8(bytes.to_vec()).ok();
        }
        skip_field(wire, tag, &mut buf, DecodeContext::default()).ok()?;
    }
    None
}

/// The identifier's node (first message only) and the series gates read, from one
/// encoded `StreamMetricsMessage`. Families gates do not read are skipped, not decoded.
pub fn read_message(
    mut buf: &[u8],
) -> Result<(Option<filterplane_api::envoy_types::pb::envoy::config::core::v3::Node>, Flush), String> {
    use filterplane_api::envoy_types::pb::envoy::service::metrics::v3::stream_metrics_message::Identifier;
    let mut node = None;
    let mut flush = Flush::default();
    while buf.has_remaining() {
        let (tag, wire) = decode_key(&mut buf).map_err(|e| e.to_string())?;
        if wire != WireType::LengthDelimited || !(tag == 1 || tag == 2) {
            skip_field(wire, tag, &mut buf, DecodeContext::default()).map_err(|e| e.to_string())?;
            continue;
        }
        let len = decode_varint(&mut buf).map_err(|e| e.to_string())? as usize;
        if len > buf.remaining() {
            return Err("a field runs past the message".into());
        }
        let (field, rest) = buf.split_at(len);
        buf = rest;
        if tag == 1 {
            node = Identifier::decode(field).map_err(|e| e.to_string())?.node;
            continue;
        }
        let Some(kind) = family_name(field).as_deref().and_then(wanted) else { continue };
        let family = MetricFamily::decode(field).map_err(|e| e.to_string())?;
        flush.seen = true;
        for m in &family.metric {
            if label(m, "envoy_http_conn_manager_prefix") == Some("admin") {
                continue;
            }
            let counter = m.counter.as_ref().and_then(|c| c.value).unwrap_or(0.0);
            match kind {
                Wanted::Completed => flush.requests += counter,
                Wanted::Errors5xx => flush.errors_5xx += counter,
                Wanted::ByClass if label(m, "envoy_response_code_class") == Some("5") => flush.errors_5xx += counter,
                Wanted::ByClass => {}
                Wanted::Wasm => flush.wasm_failures += counter,
                Wanted::Time if family.r#type == Some(MetricType::Summary as i32) => {
                    let p99 = m.summary.as_ref().and_then(|s| {
                        s.quantile.iter().find(|q| q.quantile.is_some_and(|v| (v - 0.99).abs() < 1e-9))?.value
                    });
                    if let Some(v) = p99.filter(|v| v.is_finite()) {
                        flush.p99_ms = Some(flush.p99_ms.map_or(v, |p| p.max(v)));
                    }
                }
                Wanted::Time => {}
            }
        }
    }
    Ok((node, flush))
}

#[cfg(test)]
#[path = "stats_tests.rs"]
mod tests;
