//! `churn`: endpoints changing without pause, pushed to SotW and delta proxies at once.
//!
//! Writes a mesh config (SERVICES EDS clusters and their assignments, spread over FILES
//! files), waits for the server to serve it, connects SOTW and DELTA simulated proxies
//! (one connection each), each subscribed to a window of WINDOW assignments (proxy `k`
//! of a mode to `svc-(k·WINDOW mod SERVICES)` onwards, so every service is watched by
//! about as many proxies), then changes RATE endpoints per second for SECS seconds: each
//! change gives one random service's second endpoint the next port (1024 + its sequence
//! number) and rewrites that service's file.
//!
//! Staleness is from a change's write to each proxy watching that service receiving it
//! or a later change of the same service (which holds it). Printed: staleness p50 / p99
//! / max per 10 s window (a growing backlog would show as a rising p99), changes a
//! watching proxy never got, and the server's CPU per second and per change.
//!
//! Usage: churn SERVER_BIN [--services N] [--files F] [--sotw N] [--delta N] [--window W]
//!        [--rate R] [--secs S]

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use clap::Parser;
use filterplane_api::{
    envoy_types::pb::envoy::{
        config::{
            core::v3::{address::Address as AddressKind, socket_address::PortSpecifier, Node},
            endpoint::v3::{lb_endpoint::HostIdentifier, ClusterLoadAssignment},
        },
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
            DiscoveryRequest,
        },
    },
    Any, ResourceType,
};
use filterplane_bench::mesh::PORTS;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser)]
struct Args {
    /// The Filterplane binary to serve the config.
    server_bin: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 100)]
    files: usize,
    #[arg(long, default_value_t = 1_000)]
    sotw: usize,
    #[arg(long, default_value_t = 1_000)]
    delta: usize,
    #[arg(long, default_value_t = 100)]
    window: usize,
    /// Endpoint changes per second.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    #[arg(long, default_value_t = 60)]
    secs: u64,
}

/// The first port a change gives: change `k` gives `FIRST_PORT + k` (but for the
/// `UNCHANGED` ports, which changes skip).
const FIRST_PORT: u32 = 1024;
const UNCHANGED: [u32; 2] = [PORTS[0] as u32, PORTS[1] as u32];

/// What the writer did and what the proxies saw.
#[derive(Default)]
struct Log {
    /// Per service: its changes so far (sequence number, when written).
    changes: Vec<Mutex<Vec<(u32, Instant)>>>,
    /// (seconds into the run the change was written, staleness in µs) of every change a
    /// watching proxy got.
    seen: Mutex<Vec<(u32, u32)>>,
    bytes: AtomicU64,
    /// Changes received by SotW and by delta proxies.
    by_mode: [AtomicU64; 2],
    /// When the first change was written.
    writing: std::sync::OnceLock<Instant>,
}

/// One proxy's view of one service: how many of its changes it has.
struct Watch {
    got: HashMap<usize, usize>,
}

impl Watch {
    /// An assignment arrived: every change of its service up to the one it holds is here.
    fn received(&mut self, log: &Log, any: &Any, mode: usize) {
        let Ok(cla) = ClusterLoadAssignment::decode(any.value.as_slice()) else { return };
        let Some(service) = cla.cluster_name.strip_prefix("svc-").and_then(|n| n.parse::<usize>().ok()) else {
            return;
        };
        let port = cla
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .filter_map(|e| match &e.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => ep.address.as_ref(),
                _ => None,
            })
            .filter_map(|a| match &a.address {
                Some(AddressKind::SocketAddress(s)) => match s.port_specifier {
                    Some(PortSpecifier::PortValue(p)) => Some(p),
                    _ => None,
                },
                _ => None,
            })
            // `PORTS`: the endpoints' before any change.
            .find(|p| !UNCHANGED.contains(p));
        let Some(seq) = port.and_then(|p| p.checked_sub(FIRST_PORT)) else { return };
        let Some(changes) = log.changes.get(service) else { return };
        let now = Instant::now();
        let changes = changes.lock().unwrap_or_else(|p| p.into_inner());
        let from = self.got.entry(service).or_insert(0);
        let upto = changes.partition_point(|(s, _)| *s <= seq);
        if upto > *from {
            let mut seen = log.seen.lock().unwrap_or_else(|p| p.into_inner());
            let started = log.writing.get().copied().unwrap_or(now);
            log.by_mode[mode].fetch_add((upto - *from) as u64, Ordering::Relaxed);
            for (_, written) in &changes[*from..upto] {
                let at = written.saturating_duration_since(started).as_secs() as u32;
                seen.push((at, now.duration_since(*written).as_micros() as u32));
            }
            *from = upto;
        }
    }
}

fn node(mode: &str, k: usize) -> Node {
    Node { id: format!("churn-{mode}-{k}"), cluster: "churn".into(), ..Default::default() }
}

async fn sotw(k: usize, channel: tonic::transport::Channel, names: Vec<String>, log: Arc<Log>) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    let t = ResourceType::ClusterLoadAssignment.type_url().to_owned();
    tx.send(DiscoveryRequest {
        node: Some(node("sotw", k)),
        type_url: t.clone(),
        resource_names: names.clone(),
        ..Default::default()
    })
    .await?;
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut watch = Watch { got: HashMap::new() };
    while let Some(r) = responses.message().await? {
        log.bytes.fetch_add(r.encoded_len() as u64, Ordering::Relaxed);
        for any in &r.resources {
            watch.received(&log, any, 0);
        }
        let ack = DiscoveryRequest {
            type_url: t.clone(),
            resource_names: names.clone(),
            version_info: r.version_info,
            response_nonce: r.nonce,
            ..Default::default()
        };
        tx.send(ack).await?;
    }
    Ok(())
}

async fn delta(k: usize, channel: tonic::transport::Channel, names: Vec<String>, log: Arc<Log>) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    let t = ResourceType::ClusterLoadAssignment.type_url().to_owned();
    tx.send(DeltaDiscoveryRequest {
        node: Some(node("delta", k)),
        type_url: t.clone(),
        resource_names_subscribe: names,
        ..Default::default()
    })
    .await?;
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut watch = Watch { got: HashMap::new() };
    while let Some(r) = responses.message().await? {
        log.bytes.fetch_add(r.encoded_len() as u64, Ordering::Relaxed);
        for res in &r.resources {
            if let Some(any) = &res.resource {
                watch.received(&log, any, 1);
            }
        }
        tx.send(DeltaDiscoveryRequest { type_url: t.clone(), response_nonce: r.nonce, ..Default::default() }).await?;
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The server's user + system CPU so far.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; after the command name, 0-based 11 and 12.
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    Duration::from_millis(ticks * 10)
}

fn applied(admin: u16) -> u64 {
    let Ok(mut r) = ureq::get(&format!("http://127.0.0.1:{admin}/metrics")).call() else { return 0 };
    let text = r.body_mut().read_to_string().unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("filterplane_config_reloads_total{result=\"applied\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let _ = rlimit::increase_nofile_limit(20_000);
    let dir = tempfile::tempdir()?;
    let config = filterplane_bench::mesh::write(dir.path(), a.services, a.files, |_| PORTS)?;
    // A config's files have stood a while before endpoints start to move.
    std::thread::sleep(Duration::from_millis(2100));
    let (xds, admin) = (free_port()?, free_port()?);
    let log_path = std::env::var_os("CHURN_SERVER_LOG").map_or_else(|| dir.path().join("server.log"), PathBuf::from);
    let mut server = std::process::Command::new(&a.server_bin)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--xds-addr", &format!("127.0.0.1:{xds}"), "--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--max-config-bytes", &(1u64 << 30).to_string()])
        // Every proxy connects from 127.0.0.1.
        .args(["--max-xds-connections-per-address", "1000000", "--cache-dir"])
        .arg(dir.path().join("cache"))
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let pid = server.id();
    let waited = Instant::now();
    while applied(admin) < 1 {
        anyhow::ensure!(waited.elapsed() < Duration::from_secs(300), "the server did not load the config");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = Arc::new(Log { changes: (0..a.services).map(|_| Mutex::default()).collect(), ..Default::default() });
    let mut watchers = vec![0usize; a.services];
    let endpoint = format!("http://127.0.0.1:{xds}");
    let mut proxies = Vec::new();
    for (mode, count) in [("sotw", a.sotw), ("delta", a.delta)] {
        for k in 0..count {
            let first = k * a.window % a.services;
            let names = (0..a.window.min(a.services))
                .map(|j| (first + j) % a.services)
                .inspect(|&s| watchers[s] += 1)
                .map(|s| format!("svc-{s}"))
                .collect();
            let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())?.connect().await?;
            let (log, task) = (log.clone(), mode == "sotw");
            proxies.push(tokio::spawn(async move {
                let r = if task { sotw(k, channel, names, log).await } else { delta(k, channel, names, log).await };
                if let Err(e) = r {
                    eprintln!("proxy {k}: {e}");
                }
            }));
        }
    }
    // Every proxy has its first response before the changes start.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let connected_bytes = log.bytes.load(Ordering::Relaxed);
    let (cpu0, t0, applied0) = (cpu(pid), Instant::now(), applied(admin));
    let _ = log.writing.set(Instant::now());
    let writer = {
        let (log, dir) = (log.clone(), dir.path().to_path_buf());
        let (services, files, rate, secs) = (a.services, a.files, a.rate, a.secs);
        tokio::task::spawn_blocking(move || write_changes(&log, &dir, services, files, rate, secs))
    };
    let written = writer.await??;
    let cpu_writing = cpu(pid) - cpu0;
    let wall = t0.elapsed();
    // Time for the last changes to arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reloads = applied(admin) - applied0;
    let ended = proxies.iter().filter(|p| p.is_finished()).count();
    let pushed = log.bytes.load(Ordering::Relaxed) - connected_bytes;
    let _ = server.kill();
    let _ = server.wait();
    for p in proxies {
        p.abort();
    }
    let seen = std::mem::take(&mut *log.seen.lock().unwrap_or_else(|p| p.into_inner()));
    let expected: usize =
        log.changes.iter().zip(&watchers).map(|(c, w)| c.lock().unwrap_or_else(|p| p.into_inner()).len() * w).sum();
    let watched = watchers.iter().sum::<usize>() as f64 / a.services as f64;
    println!(
        "{} services in {} files; {} SotW + {} delta proxies, {} assignments each (each service watched by {watched:.1} on average); {} changes/s for {} s",
        a.services, a.files, a.sotw, a.delta, a.window, a.rate, a.secs
    );
    println!(
        "written {written} changes in {:.1} s; {reloads} reloads applied ({:.1} changes per reload); received {} of {expected} (change, watching proxy) pairs ({} missing)",
        wall.as_secs_f64(),
        written as f64 / reloads.max(1) as f64,
        seen.len(),
        expected.saturating_sub(seen.len())
    );
    println!(
        "server CPU while changing: {:.2} s over {:.1} s ({:.0} % of a core), {:.2} ms per change; pushed {:.1} MB ({:.0} bytes per delivered change)",
        cpu_writing.as_secs_f64(),
        wall.as_secs_f64(),
        cpu_writing.as_secs_f64() / wall.as_secs_f64() * 100.0,
        cpu_writing.as_secs_f64() * 1e3 / written.max(1) as f64,
        pushed as f64 / 1e6,
        pushed as f64 / seen.len().max(1) as f64
    );
    println!(
        "received by SotW proxies {}, by delta proxies {}; proxies whose stream ended before the run did: {ended}",
        log.by_mode[0].load(Ordering::Relaxed),
        log.by_mode[1].load(Ordering::Relaxed)
    );
    let mut all: Vec<u32> = seen.iter().map(|(_, s)| *s).collect();
    all.sort_unstable();
    println!(
        "staleness, write to proxy (ms): p50 {:.0}, p99 {:.0}, max {:.0}",
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        percentile(&all, 1.0)
    );
    let secs = a.secs as u32;
    for from in (0..secs).step_by(10) {
        let mut w: Vec<u32> = seen.iter().filter(|(at, _)| (from..from + 10).contains(at)).map(|(_, s)| *s).collect();
        w.sort_unstable();
        println!(
            "  changes written {from}-{} s: {} received, p50 {:.0}, p99 {:.0}, max {:.0} ms",
            (from + 10).min(secs),
            w.len(),
            percentile(&w, 0.5),
            percentile(&w, 0.99),
            percentile(&w, 1.0)
        );
    }
    Ok(())
}

/// Changes `rate` endpoints a second for `secs` seconds (a random service each, its file
/// rewritten); returns how many.
fn write_changes(log: &Log, dir: &Path, services: usize, files: usize, rate: u64, secs: u64) -> anyhow::Result<usize> {
    let mut ports: HashMap<usize, u16> = HashMap::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let started = Instant::now();
    let total = (rate * secs) as usize;
    anyhow::ensure!(
        total < (u16::MAX as u32 - FIRST_PORT) as usize,
        "at most {} changes",
        u16::MAX as u32 - FIRST_PORT
    );
    let mut written = 0;
    for seq in 0..total {
        let port = (FIRST_PORT + seq as u32) as u16;
        if UNCHANGED.contains(&u32::from(port)) {
            continue;
        }
        // On schedule: change `seq` is due at seq / rate seconds.
        let due = started + Duration::from_secs_f64(seq as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let service = (rng % services as u64) as usize;
        ports.insert(service, port);
        log.changes[service].lock().unwrap_or_else(|p| p.into_inner()).push((seq as u32, Instant::now()));
        filterplane_bench::mesh::write_one(dir, services, files, service, |j| {
            [PORTS[0], ports.get(&j).copied().unwrap_or(PORTS[1])]
        })?;
        written += 1;
    }
    Ok(written)
}
