//! Real servers the Wasm tests need beside Envoy: Debian's `docker-registry`
//! (distribution v2) and Python's `http.server`, both on loopback, plus proxy-wasm modules
//! built from WebAssembly text.

use std::{fs, path::Path, process::Command, time::Duration};

use crate::{free_port, http_get, wait_until, Process};

/// A proxy-wasm module that adds `x-wasm: VALUE` to responses, from `testdata/add_header.wat`.
pub fn header_module(value: &str) -> Vec<u8> {
    let text = include_str!("../testdata/add_header.wat")
        .replace("{VALUE}", value)
        .replace("{LEN}", &value.len().to_string())
        .replace("{EXTRA}", "");
    wat::parse_str(text).expect("the test module is valid WebAssembly text")
}

/// A module that adds `x-wasm` to responses but traps (`unreachable`) on every request's
/// headers: Envoy accepts it, and it fails at the first request.
pub fn trapping_module() -> Vec<u8> {
    let text = include_str!("../testdata/add_header.wat").replace("{VALUE}", "trap").replace("{LEN}", "4").replace(
        "{EXTRA}",
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) unreachable)"#,
    );
    wat::parse_str(text).expect("the trapping module is valid WebAssembly text")
}

/// A local OCI registry, plain HTTP on 127.0.0.1.
pub struct Registry {
    _process: Process,
    pub addr: String,
}

/// The hex SHA-256 of `bytes` by the system's `sha256sum`, independent of Filterplane's
/// own code.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let f = dir.path().join("hash-me");
    fs::write(&f, bytes).expect("write");
    let out = Command::new("sha256sum").arg(&f).output().expect("sha256sum runs");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_owned()
}

/// A registry's TLS and htpasswd authentication.
pub struct RegistrySecurity<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    /// (user, password): written as a bcrypt htpasswd file.
    pub user: (&'a str, &'a str),
}

impl Registry {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, None)
    }

    /// A registry over TLS with htpasswd authentication (the registry needs both
    /// together); `addr` is then `127.0.0.1:PORT` for https.
    pub fn start_with(dir: &Path, security: Option<RegistrySecurity<'_>>) -> Self {
        let bin = std::env::var("DOCKER_REGISTRY_BIN").unwrap_or_else(|_| "/usr/bin/docker-registry".into());
        assert!(
            Path::new(&bin).exists(),
            "{bin} not found: run scripts/test.sh (it installs docker-registry) or set DOCKER_REGISTRY_BIN"
        );
        let port = free_port();
        let root = dir.join("registry-data");
        fs::create_dir_all(&root).expect("registry dir");
        let config = dir.join("registry.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            root.display()
        );
        let secure = security.is_some();
        if let Some(s) = &security {
            let htpasswd = dir.join("htpasswd");
            let hash = bcrypt::hash(s.user.1, 5).expect("bcrypt");
            fs::write(&htpasswd, format!("{}:{hash}\n", s.user.0)).expect("htpasswd");
            text.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: filterplane-tests\n    path: {}\n",
                s.cert.display(),
                s.key.display(),
                htpasswd.display()
            ));
        }
        fs::write(&config, text).expect("registry config");
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg(&config);
        let process = Process::spawn("docker-registry", &mut cmd, dir.join("registry.log"));
        let addr = format!("127.0.0.1:{port}");
        if secure {
            wait_until("the registry", Duration::from_secs(20), || std::net::TcpStream::connect(&addr).ok());
        } else {
            wait_until("the registry", Duration::from_secs(20), || {
                http_get(&format!("http://{addr}/v2/")).filter(|r| r.status == 200)
            });
        }
        Registry { _process: process, addr }
    }
}

/// Python's `http.server` serving a directory on 127.0.0.1; its log lists each request.
pub struct FileServer {
    process: Process,
    pub url: String,
}

impl FileServer {
    pub fn start(root: &Path, logs: &Path) -> Self {
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.args(["-u", "-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"]).arg(root);
        let process = Process::spawn("http.server", &mut cmd, logs.join("http-server.log"));
        let url = format!("http://127.0.0.1:{port}");
        wait_until("the HTTP server", Duration::from_secs(20), || {
            http_get(&format!("{url}/")).filter(|r| r.status == 200)
        });
        FileServer { process, url }
    }

    /// How many GETs of `path` it has answered.
    pub fn gets(&self, path: &str) -> usize {
        let log = fs::read_to_string(&self.process.log).unwrap_or_default();
        log.lines().filter(|l| l.contains(&format!("\"GET {path} "))).count()
    }
}

/// A real etcd (Debian's `etcd-server`, v3 API) on loopback, its data in `dir`.
pub struct EtcdServer {
    process: Option<crate::Process>,
    pub port: u16,
    dir: std::path::PathBuf,
    peer: u16,
    /// Serving TLS with this CA's server certificate, asking clients for theirs.
    tls: Option<EtcdTls>,
}

/// What a TLS etcd is started with.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    pub server: crate::pki::Pair,
    /// `etcdctl`'s client certificate.
    pub client: crate::pki::Pair,
}

impl EtcdServer {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, None)
    }

    /// With `tls`: clients over TLS only, each with a certificate the CA signed
    /// (`--client-cert-auth`).
    pub fn start_with(dir: &Path, tls: Option<EtcdTls>) -> Self {
        let mut e = EtcdServer {
            process: None,
            port: crate::free_port(),
            dir: dir.to_path_buf(),
            peer: crate::free_port(),
            tls,
        };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let mut cmd = std::process::Command::new("etcd");
        cmd.args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("etcd-data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--log-level", "warn"]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.server.cert).arg("--key-file").arg(&tls.server.key);
            cmd.arg("--trusted-ca-file").arg(&tls.ca).arg("--client-cert-auth");
        }
        self.process = Some(crate::Process::spawn("etcd", &mut cmd, self.dir.join("etcd.log")));
        if self.tls.is_some() {
            // Its own client, with a certificate the CA signed.
            crate::wait_until("etcd endpoint health", std::time::Duration::from_secs(20), || {
                self.etcdctl(None, &["endpoint", "health"]).ok()
            });
            return;
        }
        let health = format!("{client}/health");
        crate::wait_until("etcd /health", std::time::Duration::from_secs(20), || {
            crate::http_get(&health).filter(|r| r.status == 200 && r.body.contains("true"))
        });
    }

    /// Runs etcd's own `etcdctl` against it (as `user`, `NAME:PASSWORD`, when given);
    /// its output, or why it failed.
    pub fn etcdctl(&self, user: Option<&str>, args: &[&str]) -> Result<String, String> {
        let mut cmd = std::process::Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3");
        match &self.tls {
            Some(tls) => {
                cmd.arg(format!("--endpoints=https://127.0.0.1:{}", self.port));
                cmd.arg("--cacert").arg(&tls.ca).arg("--cert").arg(&tls.client.cert).arg("--key").arg(&tls.client.key);
            }
            None => {
                cmd.arg(format!("--endpoints=http://127.0.0.1:{}", self.port));
            }
        }
        if let Some(user) = user {
            cmd.arg(format!("--user={user}"));
        }
        let out = cmd.args(args).output().map_err(|e| format!("etcdctl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("etcdctl {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// `etcd://127.0.0.1:PORT/PREFIX` (`etcds://` over TLS).
    pub fn url(&self, prefix: &str) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://127.0.0.1:{}/{prefix}", self.port)
    }

    /// Stops it (SIGKILL): etcd is unreachable until `restart`.
    pub fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            p.signal("-KILL");
            drop(p);
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}
