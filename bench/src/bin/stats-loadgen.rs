//! `stats-loadgen`: simulated Envoys streaming their stats to a metrics service
//! (`envoy.service.metrics.v3.MetricsService/StreamMetrics`), as Envoy's
//! `envoy.stat_sinks.metrics_service` sink does: each stream names its node first, then
//! sends every `--interval-ms` a flush of `--families` counter families (cumulative, the
//! sink's default) among which the ones rollout health gates read. With `--server-pid`,
//! prints the server's CPU (cores) and resident memory per stream over the run.

use std::time::{Duration, Instant};

use clap::Parser;
use filterplane_api::envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::metrics::v3::{
            metrics_service_client::MetricsServiceClient, stream_metrics_message::Identifier, StreamMetricsMessage,
        },
    },
    io::prometheus::client::{Counter, Metric, MetricFamily, MetricType},
};
use filterplane_bench::report::{cpu_secs, rss_kib};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Parser)]
#[command(name = "stats-loadgen", version)]
struct Args {
    /// The metrics service (Filterplane's xDS port).
    #[arg(long, default_value = "http://127.0.0.1:18000")]
    server: String,
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    multiplex: usize,
    /// Milliseconds between a stream's flushes (Envoy's stats_flush_interval).
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Counter families per flush (an Envoy with a few listeners and clusters sends
    /// several hundred).
    #[arg(long, default_value_t = 300)]
    families: usize,
    /// Seconds to measure, after every stream sent its first flush.
    #[arg(long, default_value_t = 30)]
    secs: u64,
    #[arg(long)]
    server_pid: Option<u32>,
    /// The server's admin URL, to count the messages it received
    /// (`filterplane_stats_messages_total`).
    #[arg(long)]
    admin: Option<String>,
}

/// `filterplane_stats_messages_total` at `admin`.
fn received(admin: Option<&str>) -> Option<f64> {
    let body = ureq::get(&format!("{}/metrics", admin?)).call().ok()?.into_body().read_to_string().ok()?;
    body.lines().find_map(|l| l.strip_prefix("filterplane_stats_messages_total ")?.trim().parse().ok())
}

fn family(name: String, value: f64) -> MetricFamily {
    MetricFamily {
        name: Some(name),
        r#type: Some(MetricType::Counter as i32),
        metric: vec![Metric {
            counter: Some(Counter { value: Some(value), ..Default::default() }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// One flush: the gates' series and `families - 2` others, all cumulative at `n`.
fn flush(families: usize, n: u64) -> Vec<MetricFamily> {
    let v = n as f64;
    let mut out = vec![
        family("http.ingress.downstream_rq_completed".into(), v * 100.0),
        family("http.ingress.downstream_rq_5xx".into(), v),
    ];
    out.extend((2..families).map(|i| family(format!("cluster.backend_{i}.upstream_rq_total"), v * 10.0)));
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channels = args.streams.div_ceil(args.multiplex.max(1));
    let mut clients = Vec::new();
    for _ in 0..channels {
        let channel = tonic::transport::Endpoint::from_shared(args.server.clone())?.connect().await?;
        clients.push(MetricsServiceClient::new(channel));
    }
    let bytes =
        prost::Message::encoded_len(&StreamMetricsMessage { identifier: None, envoy_metrics: flush(args.families, 1) });
    let started = Instant::now();
    let interval = Duration::from_millis(args.interval_ms);
    let mut tasks = Vec::new();
    for i in 0..args.streams {
        let mut client = clients[i / args.multiplex.max(1)].clone();
        let families = args.families;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tasks.push(tokio::spawn(async move {
            let call = tokio::spawn(async move { client.stream_metrics(ReceiverStream::new(rx)).await });
            // Spread the streams' flushes over the interval, as independent Envoys are.
            tokio::time::sleep(interval.mul_f64(i as f64 / 1000.0 % 1.0)).await;
            let mut tick = tokio::time::interval(interval);
            for n in 0u64.. {
                tick.tick().await;
                let identifier = (n == 0).then(|| Identifier {
                    node: Some(Node { id: format!("stats-{i}"), cluster: "stats".into(), ..Default::default() }),
                });
                if tx.send(StreamMetricsMessage { identifier, envoy_metrics: flush(families, n) }).await.is_err() {
                    break;
                }
            }
            drop(call);
        }));
    }
    // Every stream has sent its first flush once one interval (and the ramp) has passed.
    tokio::time::sleep(interval * 2).await;
    let ramp = started.elapsed();
    let (cpu0, rss0) = (args.server_pid.and_then(cpu_secs), args.server_pid.and_then(rss_kib));
    let got0 = received(args.admin.as_deref());
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, rss1) = (args.server_pid.and_then(cpu_secs), args.server_pid.and_then(rss_kib));
    let got = received(args.admin.as_deref()).zip(got0).map(|(b, a)| (b - a) / wall);
    println!(
        "stats-loadgen: {} streams over {channels} connections, a flush of {} families ({bytes} bytes) every {} ms each: {:.0} messages/s, {:.1} MB/s; ramp {:.1} s",
        args.streams,
        args.families,
        args.interval_ms,
        args.streams as f64 * 1000.0 / args.interval_ms as f64,
        args.streams as f64 * bytes as f64 * 1000.0 / args.interval_ms as f64 / 1e6,
        ramp.as_secs_f64()
    );
    let rate = got.unwrap_or(args.streams as f64 * 1000.0 / args.interval_ms as f64);
    if let Some(got) = got {
        println!("server received {got:.0} messages/s");
    }
    if let (Some(c0), Some(c1), Some(r1)) = (cpu0, cpu1, rss1) {
        println!(
            "server: {:.3} cores over {wall:.1} s ({:.1} µs of CPU per message received); resident {:.1} MiB ({:+.1} MiB over the run)",
            (c1 - c0) / wall,
            (c1 - c0) / wall / rate * 1e6,
            r1 as f64 / 1024.0,
            (r1 as f64 - rss0.unwrap_or(r1) as f64) / 1024.0,
        );
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}
