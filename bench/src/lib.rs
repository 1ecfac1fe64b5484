//! `xds-loadgen`: simulates N Envoys against any ADS server. Each simulated proxy has its
//! own HTTP/2 connection (or shares one, `--multiplex`), its own node id, cluster and
//! metadata, subscribes like Envoy (wildcard CDS and LDS, named ECDS resources), ACKs
//! every response (or NACKs the ones holding a given resource), over SotW or delta. It
//! can trigger a change by rewriting a config file and measures how long the change
//! takes to reach every proxy, and (with a Filterplane admin URL) for Filterplane to see
//! every ACK.

pub mod mesh;
mod proxy;
pub mod report;
pub mod tls;

use std::{
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
pub use report::Report;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Mode {
    Sotw,
    Delta,
}

/// A text replacement in a file that makes the server push a change.
#[derive(Debug, Clone)]
pub struct Change {
    pub file: PathBuf,
    pub from: String,
    pub to: String,
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// `http://host:port` of the ADS server.
    pub server: String,
    pub streams: usize,
    pub mode: Mode,
    /// ECDS resource names each proxy subscribes to.
    pub ecds: Vec<String>,
    /// ClusterLoadAssignment names each proxy subscribes to (as an Envoy with EDS
    /// clusters does).
    pub eds: Vec<String>,
    /// Also subscribe to CDS and LDS (wildcard), as Envoy with ADS LDS/CDS does.
    pub wildcard_lds_cds: bool,
    /// NACK every response that holds this resource.
    pub nack: Option<String>,
    /// ... only when its encoded config contains this text (a version's value).
    pub nack_containing: Option<String>,
    /// The NACK's message this long (0: a short one).
    pub nack_message_bytes: usize,
    /// Streams per HTTP/2 connection (1: every proxy its own connection, as Envoys do).
    pub multiplex: usize,
    pub node_prefix: String,
    pub cluster: String,
    pub metadata: Vec<(String, String)>,
    /// New streams per second while ramping up.
    pub ramp_per_sec: f64,
    pub change: Option<Change>,
    /// Filterplane's admin URL, to read when it saw each proxy's ACK.
    pub admin: Option<String>,
    /// Filterplane's /metrics URL, to read its own fan-out time for each repeated change.
    pub metrics: Option<String>,
    /// How long to wait for initial configs and for a change to arrive everywhere.
    pub timeout: Duration,
    /// The server's process id, to sample its memory and CPU time (Linux /proc).
    pub server_pid: Option<u32>,
    /// Streams stay open this long after the change, before the report.
    pub hold: Duration,
    /// How many times the change is made (back and forth); the first is the one the
    /// report details, and every one gives a row of `repeats`.
    pub changes: usize,
    /// Mutual TLS for every connection (`None`: plaintext).
    pub tls: Option<tls::ClientTls>,
}

impl LoadSpec {
    /// `streams` SotW proxies against `server`, each on its own connection, subscribed to
    /// the extension config `ecds` (named `NODE_PREFIX-N` in cluster `NODE_PREFIX`), ACKing
    /// everything, with no change made: tests set the rest with struct update syntax.
    pub fn sotw(server: String, streams: usize, ecds: &str, node_prefix: &str) -> Self {
        Self {
            server,
            streams,
            mode: Mode::Sotw,
            ecds: vec![ecds.to_owned()],
            eds: Vec::new(),
            wildcard_lds_cds: false,
            nack: None,
            nack_containing: None,
            nack_message_bytes: 0,
            multiplex: 1,
            node_prefix: node_prefix.to_owned(),
            cluster: node_prefix.to_owned(),
            metadata: Vec::new(),
            ramp_per_sec: 2000.0,
            change: None,
            admin: None,
            metrics: None,
            timeout: Duration::from_secs(120),
            server_pid: None,
            hold: Duration::ZERO,
            changes: 1,
            tls: None,
        }
    }
}

/// What the proxies share with the controller.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Set when the change was written: receipts after it count as propagation.
    pub change_written: Mutex<Option<Instant>>,
    /// `change_written` is set (read per message without taking the lock).
    pub change_armed: std::sync::atomic::AtomicBool,
    pub messages: AtomicU64,
    /// Bytes received after the change was written.
    pub change_bytes: AtomicU64,
    pub bytes: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub errors: Mutex<Vec<String>>,
}

/// One proxy's timings.
#[derive(Debug, Default, Clone)]
pub(crate) struct ProxyTimes {
    pub connect: Option<Duration>,
    pub first_full_config: Option<Duration>,
    /// From the change's write to the first ECDS response after it.
    pub change_received: Option<Duration>,
    /// Its stream ended with an error (reported): nothing more is waited for from it.
    pub failed: bool,
}

/// How long after the last receipt of a change the server's CPU is still counted for it
/// (its ACK handling).
const ACK_SETTLE: Duration = Duration::from_secs(1);
/// The server's histogram of its own fan-out time per stream.
const FANOUT: &str = "filterplane_xds_push_fanout_seconds";

/// Runs the load and returns what it measured.
pub async fn run(spec: LoadSpec) -> anyhow::Result<Report> {
    // Each proxy holds a socket; the default limit of 1024 would stop us short.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let shared = Arc::new(Shared::default());
    let rss_before = spec.server_pid.and_then(report::rss_kib);
    let times: Arc<Vec<Mutex<ProxyTimes>>> = Arc::new((0..spec.streams).map(|_| Mutex::default()).collect());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut channel = None;
    for i in 0..spec.streams {
        if spec.ramp_per_sec > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / spec.ramp_per_sec);
            tokio::time::sleep_until(due.into()).await;
        }
        // A new connection for every `multiplex` streams.
        let connect_started = Instant::now();
        if i % spec.multiplex.max(1) == 0 {
            let endpoint = tonic::transport::Endpoint::from_shared(spec.server.clone())?;
            let connected = match &spec.tls {
                Some(tls) => tls.connect(endpoint).await,
                None => endpoint.connect().await,
            };
            channel = match connected {
                Ok(c) => Some(c),
                Err(e) => {
                    shared.errors.lock().unwrap_or_else(|p| p.into_inner()).push(format!("connect: {e}"));
                    None
                }
            };
        }
        let Some(ch) = channel.clone() else { continue };
        if let Ok(mut t) = times[i].lock() {
            t.connect = Some(connect_started.elapsed());
        }
        tasks.spawn(proxy::run(i, spec.clone(), ch, shared.clone(), times.clone()));
    }
    let ramp = started.elapsed();

    let all = |f: &dyn Fn(&ProxyTimes) -> bool| times.iter().all(|t| t.lock().map(|t| f(&t)).unwrap_or(false));
    let deadline = Instant::now() + spec.timeout;
    while !all(&|t| t.first_full_config.is_some() || t.failed) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Let the server settle, then sample it idle with every stream open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = spec.server_pid.and_then(report::rss_kib);
    let cpu_before = spec.server_pid.and_then(report::cpu_secs);
    let mut write_wall = None;
    if let Some(change) = &spec.change {
        let text = std::fs::read_to_string(&change.file).with_context(|| format!("read {}", change.file.display()))?;
        anyhow::ensure!(text.contains(&change.from), "{} does not contain {:?}", change.file.display(), change.from);
        let new = text.replacen(&change.from, &change.to, 1);
        // Arm the receivers first, then write: a receipt can never predate the mark.
        *shared.change_written.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        shared.change_armed.store(true, std::sync::atomic::Ordering::Release);
        write_wall = Some(SystemTime::now());
        std::fs::write(&change.file, new).with_context(|| format!("write {}", change.file.display()))?;
        let deadline = Instant::now() + spec.timeout;
        while !all(&|t| t.change_received.is_some() || t.failed) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let cpu_push = match (spec.server_pid.and_then(report::cpu_secs), cpu_before) {
        (Some(after), Some(before)) if spec.change.is_some() => Some(after - before),
        _ => None,
    };
    let server =
        report::ServerSample { rss_before_kib: rss_before, rss_idle_kib: rss_idle, cpu_secs_for_change: cpu_push };
    let mut repeats = Vec::new();
    if let Some(change) = &spec.change {
        // Rows of `repeats`: each from the write until every proxy received it and the
        // server had a second for the ACKs (the first change's figure above stops at the
        // last receipt, as earlier runs did).
        for k in 1..spec.changes {
            tokio::time::sleep(ACK_SETTLE).await;
            for t in times.iter() {
                if let Ok(mut t) = t.lock() {
                    t.change_received = None;
                }
            }
            let (from, to) = if k % 2 == 1 { (&change.to, &change.from) } else { (&change.from, &change.to) };
            let text = std::fs::read_to_string(&change.file)?;
            let cpu_before = spec.server_pid.and_then(report::cpu_secs);
            let own_before = report::cpu_secs(std::process::id());
            let fanout_before = match &spec.metrics {
                Some(url) => report::histogram_buckets(url, FANOUT).await,
                None => None,
            };
            *shared.change_written.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            std::fs::write(&change.file, text.replacen(from.as_str(), to, 1))?;
            let deadline = Instant::now() + spec.timeout;
            while !all(&|t| t.change_received.is_some() || t.failed) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The ACKs too: the server's whole cost of the change.
            tokio::time::sleep(ACK_SETTLE).await;
            let cpu = match (spec.server_pid.and_then(report::cpu_secs), cpu_before) {
                (Some(after), Some(before)) => after - before,
                _ => 0.0,
            };
            let own = match (report::cpu_secs(std::process::id()), own_before) {
                (Some(after), Some(before)) => after - before,
                _ => 0.0,
            };
            let received = times.iter().filter_map(|t| t.lock().ok()?.change_received).collect();
            let mut repeat = report::Repeat::of(received, cpu, own);
            if let (Some(url), Some(before)) = (&spec.metrics, fanout_before) {
                if let Some(after) = report::histogram_buckets(url, FANOUT).await {
                    repeat.server_fanout_p50_ms = report::histogram_quantile_ms(&before, &after, 0.5);
                    repeat.server_fanout_p99_ms = report::histogram_quantile_ms(&before, &after, 0.99);
                }
            }
            repeats.push(repeat);
        }
    }
    let server_acks = match (&spec.admin, write_wall) {
        (Some(admin), Some(at)) => Some(report::server_ack_latencies(admin, at, &spec, spec.timeout).await),
        _ => None,
    };
    tokio::time::sleep(spec.hold).await;
    tasks.abort_all();
    let times: Vec<ProxyTimes> = times.iter().map(|t| t.lock().map(|t| t.clone()).unwrap_or_default()).collect();
    let mut report = Report::new(&spec, ramp, &times, &shared, server_acks, server);
    report.repeats = repeats;
    Ok(report)
}
