//! What a run measured, and how it is printed.

use std::{
    sync::atomic::Ordering,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{LoadSpec, Mode, ProxyTimes, Shared};

/// p50/p95/p99/max of a set of durations, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(mut v: Vec<Duration>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort();
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1].as_secs_f64() * 1e3;
        Self { count: v.len(), p50_ms: at(0.50), p95_ms: at(0.95), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50={:.1}ms p95={:.1}ms p99={:.1}ms max={:.1}ms",
            self.count, self.p50_ms, self.p95_ms, self.p99_ms, self.max_ms
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub streams: usize,
    pub mode: Mode,
    pub ramp_secs: f64,
    pub connect: Percentiles,
    pub first_full_config: Percentiles,
    /// File write to each proxy's receipt of the change.
    pub change_received: Option<Percentiles>,
    /// File write to the server recording each proxy's ACK of it (Filterplane only).
    pub change_acked_by_server: Option<Percentiles>,
    pub messages_received: u64,
    pub bytes_received: u64,
    /// Bytes received from the change's write on.
    pub change_bytes_received: u64,
    pub acks_sent: u64,
    pub nacks_sent: u64,
    pub server: ServerSample,
    pub errors: Vec<String>,
    /// Every change of the run (`--changes`), in order.
    pub repeats: Vec<Repeat>,
}

/// The server process, sampled through /proc.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerSample {
    pub rss_before_kib: Option<u64>,
    /// With every stream open and idle.
    pub rss_idle_kib: Option<u64>,
    /// CPU (user + system) the server spent from the change's write until every proxy had it.
    pub cpu_secs_for_change: Option<f64>,
}

impl ServerSample {
    pub fn kib_per_stream(&self, streams: usize) -> Option<f64> {
        Some((self.rss_idle_kib?.saturating_sub(self.rss_before_kib?)) as f64 / streams.max(1) as f64)
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

/// User + system CPU seconds a process has used.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}

/// One change of a run: its p50 and p99, the server's CPU for it, and this load
/// generator's over the same window (on one machine the two share the cores, so together
/// they bound how soon the last proxy can have the change).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Repeat {
    pub received: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub server_cpu_secs: f64,
    pub loadgen_cpu_secs: f64,
    /// The server's own part (`filterplane_xds_push_fanout_seconds` over this change, read
    /// with `--metrics`): from the config reaching its xDS port to each stream's response.
    pub server_fanout_p50_ms: Option<f64>,
    pub server_fanout_p99_ms: Option<f64>,
}

impl Repeat {
    pub fn of(received: Vec<Duration>, server_cpu_secs: f64, loadgen_cpu_secs: f64) -> Self {
        let received_n = received.len();
        let p = Percentiles::of(received);
        Repeat {
            received: received_n,
            p50_ms: p.p50_ms,
            p99_ms: p.p99_ms,
            server_cpu_secs,
            loadgen_cpu_secs,
            server_fanout_p50_ms: None,
            server_fanout_p99_ms: None,
        }
    }
}

/// A Prometheus histogram's cumulative buckets, upper bound first, from the text at `url`.
pub(crate) async fn histogram_buckets(url: &str, name: &str) -> Option<Vec<(f64, f64)>> {
    let (url, prefix) = (url.to_owned(), format!("{name}_bucket{{le=\""));
    let text = tokio::task::spawn_blocking(move || ureq::get(&url).call().ok()?.body_mut().read_to_string().ok())
        .await
        .ok()
        .flatten()?;
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let (le, count) = l.strip_prefix(&prefix)?.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    (!buckets.is_empty()).then_some(buckets)
}

/// The `q` quantile, in ms, of what a histogram counted between two readings of its
/// buckets (seconds), interpolated within the bucket it falls in; past the last finite
/// bound, that bound (an understatement, as Prometheus's `histogram_quantile` gives).
pub(crate) fn histogram_quantile_ms(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> =
        after.iter().map(|&(le, n)| (le, n - before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1))).collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let want = q * total;
    let mut below = (0.0, 0.0);
    for &(le, n) in &counts {
        if n >= want {
            if le.is_infinite() {
                return Some(below.0 * 1000.0);
            }
            let share = if n > below.1 { (want - below.1) / (n - below.1) } else { 1.0 };
            return Some((below.0 + (le - below.0) * share) * 1000.0);
        }
        below = (le, n);
    }
    None
}

/// Median, least and most of `v`.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    match (v.first(), v.last()) {
        (Some(&lo), Some(&hi)) => (v[v.len() / 2], lo, hi),
        _ => (0.0, 0.0, 0.0),
    }
}

impl Report {
    pub(crate) fn new(
        spec: &LoadSpec,
        ramp: Duration,
        times: &[ProxyTimes],
        shared: &Shared,
        server_acks: Option<Vec<Duration>>,
        server: ServerSample,
    ) -> Self {
        let collect = |f: &dyn Fn(&ProxyTimes) -> Option<Duration>| times.iter().filter_map(f).collect::<Vec<_>>();
        let mut errors = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
        let missing_first = times.iter().filter(|t| t.first_full_config.is_none()).count();
        if missing_first > 0 {
            errors.push(format!("{missing_first} proxies never got their first full config"));
        }
        let change_received = spec.change.as_ref().map(|_| {
            let got = collect(&|t| t.change_received);
            if got.len() < times.len() {
                errors.push(format!("{} proxies never received the change", times.len() - got.len()));
            }
            Percentiles::of(got)
        });
        Report {
            streams: spec.streams,
            mode: spec.mode,
            ramp_secs: ramp.as_secs_f64(),
            connect: Percentiles::of(collect(&|t| t.connect)),
            first_full_config: Percentiles::of(collect(&|t| t.first_full_config)),
            change_received,
            change_acked_by_server: server_acks.map(Percentiles::of),
            messages_received: shared.messages.load(Ordering::Relaxed),
            bytes_received: shared.bytes.load(Ordering::Relaxed),
            change_bytes_received: shared.change_bytes.load(Ordering::Relaxed),
            acks_sent: shared.acks.load(Ordering::Relaxed),
            nacks_sent: shared.nacks.load(Ordering::Relaxed),
            server,
            errors,
            repeats: Vec::new(),
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "streams: {} ({:?}), ramp-up {:.1}s", self.streams, self.mode, self.ramp_secs)?;
        writeln!(f, "connect:            {}", self.connect)?;
        writeln!(f, "first full config:  {}", self.first_full_config)?;
        if let Some(p) = &self.change_received {
            writeln!(f, "change -> received: {p}")?;
            writeln!(f, "bytes received for the change: {}", self.change_bytes_received)?;
        }
        if let Some(p) = &self.change_acked_by_server {
            writeln!(f, "change -> server saw ACK: {p}")?;
        }
        writeln!(
            f,
            "received: {} messages, {} bytes; sent {} ACKs, {} NACKs",
            self.messages_received, self.bytes_received, self.acks_sent, self.nacks_sent
        )?;
        if let (Some(before), Some(idle)) = (self.server.rss_before_kib, self.server.rss_idle_kib) {
            writeln!(
                f,
                "server RSS: {before} KiB before, {idle} KiB with {} idle streams ({:.1} KiB per stream)",
                self.streams,
                self.server.kib_per_stream(self.streams).unwrap_or(0.0)
            )?;
        }
        if let Some(cpu) = self.server.cpu_secs_for_change {
            writeln!(f, "server CPU for the change: {cpu:.2}s")?;
        }
        if !self.repeats.is_empty() {
            let (cpu, cpu_lo, cpu_hi) = spread(self.repeats.iter().map(|r| r.server_cpu_secs).collect());
            let (p99, p99_lo, p99_hi) = spread(self.repeats.iter().map(|r| r.p99_ms).collect());
            let (lg, lg_lo, lg_hi) = spread(self.repeats.iter().map(|r| r.loadgen_cpu_secs).collect());
            let fanout: Vec<f64> = self.repeats.iter().filter_map(|r| r.server_fanout_p99_ms).collect();
            if !fanout.is_empty() {
                let (m, lo, hi) = spread(fanout);
                writeln!(f, "server fan-out p99 median {m:.1}ms (min {lo:.1}, max {hi:.1})")?;
            }
            writeln!(
                f,
                "{} more changes (CPU: push and ACKs): server CPU per push median {cpu:.3}s (min {cpu_lo:.3}, max {cpu_hi:.3}); p99 median {p99:.1}ms (min {p99_lo:.1}, max {p99_hi:.1}); load generator CPU median {lg:.3}s (min {lg_lo:.3}, max {lg_hi:.3})",
                self.repeats.len()
            )?;
            for (i, r) in self.repeats.iter().enumerate() {
                writeln!(
                    f,
                    "  change {}: {} received, p50 {:.1}ms p99 {:.1}ms, server CPU {:.3}s, load generator CPU {:.3}s",
                    i + 2,
                    r.received,
                    r.p50_ms,
                    r.p99_ms,
                    r.server_cpu_secs,
                    r.loadgen_cpu_secs
                )?;
            }
        }
        write!(f, "errors: {}", self.errors.len())?;
        for e in self.errors.iter().take(10) {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// For each simulated proxy, how long after `written` Filterplane recorded its ACK of
/// the ECDS change (`acked_at` in `/api/v1/proxies`), polling until all are in.
pub(crate) async fn server_ack_latencies(
    admin: &str,
    written: SystemTime,
    spec: &LoadSpec,
    timeout: Duration,
) -> Vec<Duration> {
    let url = format!("{}/api/v1/proxies", admin.trim_end_matches('/'));
    let prefix = format!("{}-", spec.node_prefix);
    let deadline = std::time::Instant::now() + timeout;
    let ecds = filterplane_api::ResourceType::ExtensionConfig.type_url();
    loop {
        let url = url.clone();
        let body: Option<serde_json::Value> = tokio::task::spawn_blocking(move || {
            let mut r = ureq::get(&url).call().ok()?;
            r.body_mut().with_config().limit(1 << 30).read_json().ok()
        })
        .await
        .ok()
        .flatten();
        let mut latencies = Vec::new();
        for p in body.as_ref().and_then(|b| b.as_array()).into_iter().flatten() {
            if !p["node_id"].as_str().is_some_and(|n| n.starts_with(&prefix)) {
                continue;
            }
            let acked = p["types"][ecds]["acked_at"].as_str().and_then(|t| humantime::parse_rfc3339(t).ok());
            if let Some(d) = acked.and_then(|a| a.duration_since(written).ok()) {
                latencies.push(d);
            }
        }
        if latencies.len() >= spec.streams || std::time::Instant::now() > deadline {
            return latencies;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quantile_is_read_between_two_readings_of_the_buckets() {
        let before = [(0.1, 10.0), (0.2, 10.0), (0.4, 10.0), (f64::INFINITY, 10.0)];
        // 100 more: 50 under 100 ms, 40 in (100, 200], 10 in (200, 400].
        let after = [(0.1, 60.0), (0.2, 100.0), (0.4, 110.0), (f64::INFINITY, 110.0)];
        let ms = |q| histogram_quantile_ms(&before, &after, q).unwrap();
        assert!((ms(0.5) - 100.0).abs() < 1e-6);
        assert!((ms(0.7) - 150.0).abs() < 1e-6, "halfway into the second bucket");
        assert!((ms(0.95) - 300.0).abs() < 1e-6);
        assert_eq!(histogram_quantile_ms(&after, &after, 0.99), None, "nothing counted between");
    }
}
