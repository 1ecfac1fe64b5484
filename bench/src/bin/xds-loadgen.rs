//! `xds-loadgen`: simulated Envoys against an ADS server. See `--help`.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use filterplane_bench::{run, tls::ClientTls, Change, LoadSpec, Mode};

/// Simulates N Envoys against any ADS server and reports connect time, time to first
/// full config, and the propagation of a change it triggers by rewriting a file.
#[derive(Debug, Parser)]
#[command(name = "xds-loadgen", version)]
struct Args {
    /// The ADS server.
    #[arg(long, default_value = "http://127.0.0.1:18000")]
    server: String,
    #[arg(long, default_value_t = 100)]
    streams: usize,
    #[arg(long, value_enum, default_value_t = Mode::Sotw)]
    mode: Mode,
    /// ECDS resource names to subscribe to (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "add-header")]
    ecds: Vec<String>,
    /// Subscribe to the ClusterLoadAssignments `PREFIX0` … `PREFIX{N-1}` (`svc-` names
    /// the services of `config-scale write`): `N` or `PREFIX:N`.
    #[arg(long, value_parser = parse_eds)]
    eds: Option<(String, usize)>,
    /// Do not subscribe to wildcard CDS and LDS.
    #[arg(long)]
    no_wildcard: bool,
    /// NACK every response holding this resource.
    #[arg(long)]
    nack: Option<String>,
    /// Streams per HTTP/2 connection (1: each proxy its own connection, as Envoys do).
    #[arg(long, default_value_t = 1)]
    multiplex: usize,
    #[arg(long, default_value = "loadgen")]
    node_prefix: String,
    #[arg(long, default_value = "loadgen")]
    cluster: String,
    /// Node metadata KEY=VALUE (repeatable).
    #[arg(long, value_parser = parse_kv)]
    metadata: Vec<(String, String)>,
    /// New streams per second during ramp-up (0: as fast as possible).
    #[arg(long, default_value_t = 2000.0)]
    ramp_per_sec: f64,
    /// Trigger a change: rewrite this file, replacing --change-from with --change-to.
    #[arg(long, requires_all = ["change_from", "change_to"])]
    change_file: Option<PathBuf>,
    #[arg(long)]
    change_from: Option<String>,
    #[arg(long)]
    change_to: Option<String>,
    /// Filterplane's admin URL, to measure when it saw each ACK of the change.
    #[arg(long)]
    admin: Option<String>,
    /// Filterplane's /metrics URL: each repeated change reports the server's own fan-out
    /// p50 and p99 (`filterplane_xds_push_fanout_seconds`) beside what the proxies saw.
    #[arg(long)]
    metrics: Option<String>,
    /// Seconds to wait for first configs and for the change.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// The server's pid, to sample its memory and CPU (Linux).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Make the change this many times (back and forth): the first as always, each later
    /// one measured on its own, its server CPU including a second after the last receipt
    /// (the ACKs); the report gives their spread.
    #[arg(long, default_value_t = 1)]
    changes: usize,
    /// Keep every stream open (and ACKing) this long after the change, before reporting:
    /// to profile the server under further changes made by hand.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
    /// Mutual TLS: the CA that signed the server's certificate (PEM); with --tls-cert
    /// and --tls-key, this client's certificate and key.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// The name the server's certificate must hold.
    #[arg(long, default_value = "localhost")]
    tls_server_name: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_eds(s: &str) -> Result<(String, usize), String> {
    let (prefix, n) = s.rsplit_once(':').unwrap_or(("svc-", s));
    let n = n.parse().map_err(|e| format!("{s}: {e}"))?;
    Ok((prefix.to_owned(), n))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("{s}: expected KEY=VALUE"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let change = match (a.change_file, a.change_from, a.change_to) {
        (Some(file), Some(from), Some(to)) => Some(Change { file, from, to }),
        _ => None,
    };
    let tls = match (&a.tls_ca, &a.tls_cert, &a.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some(ClientTls::load(ca, cert, key, &a.tls_server_name)?),
        _ => None,
    };
    let spec = LoadSpec {
        server: a.server,
        streams: a.streams,
        mode: a.mode,
        ecds: a.ecds.into_iter().filter(|n| !n.is_empty()).collect(),
        eds: a.eds.map(|(prefix, n)| (0..n).map(|i| format!("{prefix}{i}")).collect()).unwrap_or_default(),
        wildcard_lds_cds: !a.no_wildcard,
        nack: a.nack,
        nack_containing: None,
        nack_message_bytes: 0,
        multiplex: a.multiplex,
        node_prefix: a.node_prefix,
        cluster: a.cluster,
        metadata: a.metadata,
        ramp_per_sec: a.ramp_per_sec,
        change,
        admin: a.admin,
        metrics: a.metrics,
        timeout: Duration::from_secs(a.timeout_secs),
        server_pid: a.server_pid,
        hold: Duration::from_secs(a.hold_secs),
        changes: a.changes.max(1),
        tls,
    };
    let report = run(spec).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    if !report.errors.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
