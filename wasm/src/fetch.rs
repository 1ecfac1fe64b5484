//! Fetching modules: from a confined file root, over HTTP(S) with timeouts, bounded
//! retries with backoff and a size limit, or from an OCI registry (tags resolved to
//! digests). Every module is checked against its SHA-256 and parsed before it is cached.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use filterplane_config::{
    model::{PullPolicy, PullSecret},
    wasm::{ModuleSource, WasmPlugin},
};
use oci_client::secrets::RegistryAuth;

use crate::{
    cache::{sha256_hex, WasmModuleCache},
    check::check_module,
    creds,
    metrics::{ResultLabel, WasmMetrics},
    oci,
};

/// How fetching behaves; from the command line.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// `file://` modules must be under this directory.
    pub file_root: PathBuf,
    /// Registries (`host:port`) that may be reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Per attempt.
    pub timeout: Duration,
    pub attempts: u32,
    pub max_module_bytes: u64,
    /// How long one reload waits for all its modules: a fetch still running then counts
    /// as failed for that reload (the plugin keeps its previous version), so a slow
    /// source never holds the rest of the config.
    pub deadline: Duration,
    /// Addresses HTTP(S) downloads may not connect to (SSRF guard).
    pub guard: Arc<crate::guard::AddressGuard>,
    /// Credentials for plugins without `image_pull_secret` (`--registry-auth-file`, else
    /// `$DOCKER_CONFIG/config.json`): a registry without an entry is pulled anonymously.
    pub registry_auth_file: Option<PathBuf>,
    /// PEM certificates of private CAs registries and module servers use
    /// (`--registry-ca-file`), trusted besides the system's.
    pub registry_ca_pem: Option<Vec<u8>>,
}

/// Why a module could not be had. The kind is the metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("download failed: {0}")]
    Download(String),
    #[error("checksum mismatch: expected sha256 {expected}, got {actual}")]
    Checksum { expected: String, actual: String },
    #[error("invalid module: {0}")]
    Invalid(String),
}

impl FetchError {
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::Download(_) => "download_failure",
            FetchError::Checksum { .. } => "checksum_mismatch",
            FetchError::Invalid(_) => "invalid_module",
        }
    }
}

/// A module ready to serve.
#[derive(Debug, Clone)]
pub struct Module {
    pub sha256: String,
    pub bytes: Bytes,
}

pub struct WasmFetcher {
    pub cache: WasmModuleCache,
    settings: FetchSettings,
    http: reqwest::Client,
    pub metrics: WasmMetrics,
}

impl std::fmt::Debug for WasmFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmFetcher")
            .field("cache", &self.cache)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl WasmFetcher {
    pub fn new(cache: WasmModuleCache, settings: FetchSettings, metrics: WasmMetrics) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.timeout)
            .timeout(settings.timeout)
            .no_proxy()
            .dns_resolver(Arc::new(crate::guard::GuardedResolver(settings.guard.clone())))
            .redirect(crate::guard::redirect_policy(settings.guard.clone()))
            .tls_certs_merge(match &settings.registry_ca_pem {
                Some(pem) => reqwest::Certificate::from_pem_bundle(pem)?,
                None => Vec::new(),
            })
            .build()?;
        let fetcher = Self { cache, settings, http, metrics };
        fetcher.update_cache_gauges();
        Ok(fetcher)
    }

    fn update_cache_gauges(&self) {
        let (entries, bytes) = self.cache.usage();
        self.metrics.cache_entries.set(entries as i64);
        self.metrics.cache_bytes.set(bytes as i64);
    }

    /// `module`, given up after the reload's deadline.
    pub async fn module_in_time(&self, plugin: &WasmPlugin) -> Result<Module, FetchError> {
        let deadline = self.settings.deadline;
        tokio::time::timeout(deadline, self.module(plugin)).await.unwrap_or_else(|_| {
            self.metrics.fetches.get_or_create(&ResultLabel { result: "download_failure" }).inc();
            Err(FetchError::Download(format!(
                "not fetched within {} s (--wasm-fetch-deadline-secs); tried again at the next reload",
                deadline.as_secs()
            )))
        })
    }

    /// The plugin's module, from the cache when the pull policy allows, else fetched,
    /// verified, checked and cached.
    pub async fn module(&self, plugin: &WasmPlugin) -> Result<Module, FetchError> {
        let started = Instant::now();
        let result = self.module_inner(plugin).await;
        let label = match &result {
            Ok((_, true)) => None,
            Ok((_, false)) => Some("success"),
            Err(e) => Some(e.kind()),
        };
        if let Some(result) = label {
            self.metrics.fetches.get_or_create(&ResultLabel { result }).inc();
            self.metrics.fetch_duration.observe(started.elapsed().as_secs_f64());
        }
        self.update_cache_gauges();
        result.map(|(m, _)| m)
    }

    /// The module, and whether it came from the cache.
    async fn module_inner(&self, plugin: &WasmPlugin) -> Result<(Module, bool), FetchError> {
        // An HTTP(S) URL is pinned by its SHA-256: a cached module with that SHA-256 is what
        // the URL serves, so there is no need to go out. Not so for OCI: a tag names
        // whatever it was last pushed to, and a pin that disagrees with the tag's
        // resolution is a mismatch to report, never a cached module to serve instead
        // (`pull_oci` resolves the tag as the pull policy says and verifies the pin).
        if let (Some(sha), ModuleSource::Http(_)) = (&plugin.sha256, &plugin.source) {
            if let Some(bytes) = self.cache.get(sha, &self.metrics) {
                return Ok((Module { sha256: sha.clone(), bytes }, true));
            }
        }
        let bytes = match &plugin.source {
            ModuleSource::File(path) => self.read_file(path).await?,
            ModuleSource::Http(url) => self.download(url).await?,
            ModuleSource::Oci { registry, repository, tag, digest } => {
                let auth =
                    registry_auth(plugin.pull_secret.as_ref(), registry, self.settings.registry_auth_file.as_deref())?;
                let reference = oci::reference(registry, repository, tag.as_deref(), digest.as_deref());
                return self.pull_oci(plugin, &reference, &auth).await;
            }
        };
        self.accept(plugin, bytes).map(|m| (m, false))
    }

    /// Verifies, checks and caches fetched bytes.
    fn accept(&self, plugin: &WasmPlugin, bytes: Bytes) -> Result<Module, FetchError> {
        let sha = sha256_hex(&bytes);
        let Module { bytes, .. } = verify(plugin, Module { sha256: sha.clone(), bytes })?;
        let started = Instant::now();
        check_module(&bytes).map_err(FetchError::Invalid)?;
        self.metrics.compile_duration.observe(started.elapsed().as_secs_f64());
        self.cache.put(&bytes).map_err(|e| FetchError::Download(format!("cannot write to the module cache: {e}")))?;
        Ok(Module { sha256: sha, bytes })
    }

    async fn read_file(&self, path: &std::path::Path) -> Result<Bytes, FetchError> {
        let root = self.settings.file_root.canonicalize().map_err(|e| {
            FetchError::Download(format!("file root {} is not usable: {e}", self.settings.file_root.display()))
        })?;
        let full = path.canonicalize().map_err(|e| FetchError::Download(format!("{}: {e}", path.display())))?;
        if !full.starts_with(&root) {
            return Err(FetchError::Download(format!(
                "{} is outside the allowed file root {} (--wasm-file-root)",
                full.display(),
                root.display()
            )));
        }
        let meta =
            tokio::fs::metadata(&full).await.map_err(|e| FetchError::Download(format!("{}: {e}", full.display())))?;
        // A FIFO or a device would block the read (and with it the reload) forever.
        if !meta.is_file() {
            return Err(FetchError::Download(format!("{}: not a regular file", full.display())));
        }
        if meta.len() > self.settings.max_module_bytes {
            return Err(FetchError::Download(format!(
                "{} is {} bytes, over the limit of {}",
                full.display(),
                meta.len(),
                self.settings.max_module_bytes
            )));
        }
        tokio::fs::read(&full)
            .await
            .map(Bytes::from)
            .map_err(|e| FetchError::Download(format!("{}: {e}", full.display())))
    }

    /// GET with bounded retries and exponential backoff, streaming under a size limit.
    async fn download(&self, url: &str) -> Result<Bytes, FetchError> {
        if let Ok(parsed) = reqwest::Url::parse(url) {
            self.settings.guard.check_url(&parsed).map_err(|e| FetchError::Download(format!("{url}: refused: {e}")))?;
        }
        let mut last = String::new();
        for attempt in 0..self.settings.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << (attempt - 1).min(5))).await;
            }
            match self.download_once(url).await {
                Ok(b) => return Ok(b),
                // Too big or a client error will not get better by asking again.
                Err((false, e)) => return Err(FetchError::Download(e)),
                Err((true, e)) => {
                    tracing::warn!(url, attempt = attempt + 1, error = %e, "module download failed");
                    last = e;
                }
            }
        }
        Err(FetchError::Download(format!("{url}: {last} (after {} attempts)", self.settings.attempts)))
    }

    /// One attempt; the error says whether retrying may help.
    async fn download_once(&self, url: &str) -> Result<Bytes, (bool, String)> {
        get_bounded(self.http.get(url), url, "module", self.settings.max_module_bytes).await
    }

    /// OCI: resolve the tag (unless `IfNotPresent` and resolved before), then take the
    /// module from the cache or the registry.
    async fn pull_oci(
        &self,
        plugin: &WasmPlugin,
        reference: &oci_client::Reference,
        auth: &RegistryAuth,
    ) -> Result<(Module, bool), FetchError> {
        let key = reference.whole();
        if plugin.pull_policy == PullPolicy::IfNotPresent {
            if let Some((_, sha)) = self.cache.resolved(&key) {
                if let Some(bytes) = self.cache.get(&sha, &self.metrics) {
                    return verify(plugin, Module { sha256: sha, bytes }).map(|m| (m, true));
                }
            }
        }
        // A client of its own: an OCI client keeps the first credentials it is given per
        // registry, and plugins on one registry may each have their own (or none).
        let client = oci::client(&self.settings);
        let registry =
            oci::Registry { client: &client, http: &self.http, insecure: &self.settings.insecure_registries };
        let mut last = String::new();
        for attempt in 0..self.settings.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << (attempt - 1).min(5))).await;
            }
            match oci::pull(&registry, reference, auth, self.settings.max_module_bytes, |sha| {
                self.cache.get(sha, &self.metrics)
            })
            .await
            {
                Ok(pulled) => {
                    let from_cache = pulled.from_cache;
                    let module = if from_cache {
                        Module { sha256: sha256_hex(&pulled.bytes), bytes: pulled.bytes }
                    } else {
                        self.accept(plugin, pulled.bytes)?
                    };
                    let _ = self.cache.set_resolved(&key, &pulled.manifest_digest, &module.sha256);
                    return verify(plugin, module).map(|m| (m, from_cache));
                }
                Err(oci::PullError::Permanent(e)) => return Err(FetchError::Download(format!("{key}: {e}"))),
                Err(oci::PullError::Invalid(e)) => return Err(FetchError::Invalid(format!("{key}: {e}"))),
                Err(oci::PullError::Transient(e)) => {
                    tracing::warn!(reference = %key, attempt = attempt + 1, error = %e, "registry pull failed");
                    last = e;
                }
            }
        }
        Err(FetchError::Download(format!("{key}: {last} (after {} attempts)", self.settings.attempts)))
    }
}

/// Sends `request` (a GET of `url`) and reads the body (`what` it is, for the error), at
/// most `limit` bytes: a server that sends more, or without end, is cut off there. The
/// error says whether asking again may help (a connection failure or a 5xx may; a 4xx
/// or an oversized body will not).
pub async fn get_bounded(
    request: reqwest::RequestBuilder,
    url: &str,
    what: &str,
    limit: u64,
) -> Result<Bytes, (bool, String)> {
    let mut res = request.send().await.map_err(|e| {
        // A refused address (the SSRF guard) will not change by asking again.
        let text = error_chain(&e);
        (!text.contains("refused:") && !text.contains("redirect to"), format!("{url}: {text}"))
    })?;
    let status = res.status();
    if !status.is_success() {
        return Err((status.is_server_error(), format!("{url}: HTTP {status}")));
    }
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| (true, format!("{url}: {e}")))? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err((false, format!("{url}: {what} larger than the limit of {limit} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// An error with its causes, as one line (reqwest puts the reason in a source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// The module is the one the plugin pinned, if it pinned one.
fn verify(plugin: &WasmPlugin, module: Module) -> Result<Module, FetchError> {
    match &plugin.sha256 {
        Some(expected) if *expected != module.sha256 => {
            Err(FetchError::Checksum { expected: expected.clone(), actual: module.sha256 })
        }
        _ => Ok(module),
    }
}

/// Credentials for `registry`, from where the plugin says (`secret`), else from the
/// default file. The secret is never logged: errors name where it was to come from, not
/// what it holds.
pub fn registry_auth(
    secret: Option<&PullSecret>,
    registry: &str,
    default_file: Option<&std::path::Path>,
) -> Result<RegistryAuth, FetchError> {
    let read_file = |path: &std::path::Path, what: &str| {
        filterplane_api::files::read_small_file(path, filterplane_api::files::MAX_SMALL_FILE)
            .and_then(|b| String::from_utf8(b).map_err(|_| std::io::Error::other("not UTF-8 text")))
            .map_err(|e| FetchError::Download(format!("{what}: cannot read {}: {e}", path.display())))
    };
    let (text, from) = match secret {
        None => {
            let Some(path) = default_file else { return Ok(RegistryAuth::Anonymous) };
            let text = read_file(path, "registry auth file")?;
            let from = format!("registry auth file {}", path.display());
            return match creds::parse(&text, registry, &from) {
                Ok(auth) => Ok(auth),
                // Not every registry needs credentials.
                Err(creds::CredsError::NoEntry { .. }) => Ok(RegistryAuth::Anonymous),
                Err(e) => Err(FetchError::Download(e.to_string())),
            };
        }
        Some(PullSecret::Env(var)) => (
            std::env::var(var).map_err(|_| {
                FetchError::Download(format!("image_pull_secret: environment variable {var} is not set"))
            })?,
            format!("image_pull_secret: environment variable {var}"),
        ),
        Some(PullSecret::File(path)) => {
            (read_file(path, "image_pull_secret")?, format!("image_pull_secret: file {}", path.display()))
        }
    };
    creds::parse(&text, registry, &from).map_err(|e| FetchError::Download(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use filterplane_config::{compile::Origin, model::WasmPluginSpec};

    use super::*;
    use crate::check::tests::header_module;

    fn fetcher(dir: &Path, file_root: &Path) -> WasmFetcher {
        let cache = WasmModuleCache::open(&dir.join("cache"), 1 << 20).unwrap();
        let settings = FetchSettings {
            file_root: file_root.to_path_buf(),
            insecure_registries: vec!["127.0.0.1:1".into()],
            timeout: Duration::from_secs(2),
            attempts: 1,
            max_module_bytes: 1 << 20,
            deadline: Duration::from_secs(60),
            guard: Default::default(),
            registry_auth_file: None,
            registry_ca_pem: None,
        };
        WasmFetcher::new(cache, settings, WasmMetrics::default()).unwrap()
    }

    fn plugin(yaml: &str, base: &Path) -> WasmPlugin {
        let spec: WasmPluginSpec = serde_yaml::from_str(yaml).unwrap();
        let origin = Origin { file: base.join("c.yaml"), line: None, path: "wasm_plugins[0]".into() };
        WasmPlugin::from_spec(&spec, base, origin).unwrap()
    }

    /// An HTTP server on `ip` that answers every GET with `reply` (status line + headers
    /// + body), and counts the requests.
    async fn http_server(ip: &str, reply: Vec<u8>) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&reply).await;
            }
        });
        (format!("http://{addr}"), hits)
    }

    #[tokio::test]
    async fn denied_addresses_are_refused_directly_and_through_redirects() {
        let dir = tempfile::tempdir().unwrap();
        let module = header_module("guarded");
        let sha = crate::cache::sha256_hex(&module);
        // The module on 127.0.0.2 (denied below), and a redirect to it from 127.0.0.1.
        let (target, target_hits) = http_server(
            "127.0.0.2",
            [
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", module.len())
                    .into_bytes(),
                module.clone(),
            ]
            .concat(),
        )
        .await;
        let (redirector, _) = http_server(
            "127.0.0.1",
            format!(
                "HTTP/1.1 302 Found\r\nlocation: {target}/m.wasm\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            .into_bytes(),
        )
        .await;
        let mut f = fetcher(dir.path(), dir.path());
        let deny: crate::guard::Cidr = "127.0.0.2/32".parse().unwrap();
        f.settings.guard = Arc::new(crate::guard::AddressGuard::new(&[deny], &[]));
        let f = WasmFetcher::new(
            WasmModuleCache::open(&dir.path().join("cache2"), 1 << 20).unwrap(),
            f.settings.clone(),
            f.metrics.clone(),
        )
        .unwrap();
        for url in [format!("{target}/m.wasm"), format!("{redirector}/m.wasm")] {
            let p = plugin(&format!("{{name: p, url: '{url}', sha256: '{sha}'}}"), dir.path());
            let e = f.module(&p).await.unwrap_err();
            assert_eq!(e.kind(), "download_failure", "{url}");
            assert!(e.to_string().contains("127.0.0.2/32"), "{url}: {e}");
        }
        assert_eq!(target_hits.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing was sent to the denied address");
        // A name that resolves only to denied addresses: refused after DNS.
        let mut by_name = f.settings.clone();
        let deny: Vec<crate::guard::Cidr> = ["127.0.0.0/8", "::1/128"].iter().map(|c| c.parse().unwrap()).collect();
        by_name.guard = Arc::new(crate::guard::AddressGuard::new(&deny, &[]));
        let g = WasmFetcher::new(
            WasmModuleCache::open(&dir.path().join("cache3"), 1 << 20).unwrap(),
            by_name,
            f.metrics.clone(),
        )
        .unwrap();
        let port = redirector.rsplit(':').next().unwrap();
        let p = plugin(&format!("{{name: p, url: 'http://localhost:{port}/m.wasm', sha256: '{sha}'}}"), dir.path());
        let e = g.module(&p).await.unwrap_err();
        assert!(e.to_string().contains("localhost: refused"), "{e}");
        // Without the deny entry the same redirect is followed.
        let open = fetcher(dir.path(), dir.path());
        let p = plugin(&format!("{{name: p, url: '{redirector}/m.wasm', sha256: '{sha}'}}"), dir.path());
        assert_eq!(open.module(&p).await.unwrap().sha256, sha);
    }

    #[tokio::test]
    async fn pull_policy_decides_whether_a_resolved_tag_is_asked_again() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), dir.path());
        let sha = f.cache.put(&header_module("v1")).unwrap();
        // The registry at 127.0.0.1:1 refuses every connection.
        f.cache.set_resolved("127.0.0.1:1/plugins/hdr:v1", "sha256:feed", &sha).unwrap();
        let cached = plugin("{name: p, url: 'oci://127.0.0.1:1/plugins/hdr:v1'}", dir.path());
        assert_eq!(cached.pull_policy, PullPolicy::IfNotPresent, "a fixed tag defaults to IfNotPresent");
        assert_eq!(f.module(&cached).await.unwrap().sha256, sha, "IfNotPresent: the cached resolution, no network");

        let always =
            plugin("{name: p, url: 'oci://127.0.0.1:1/plugins/hdr:v1', image_pull_policy: Always}", dir.path());
        let e = f.module(&always).await.unwrap_err();
        assert_eq!(e.kind(), "download_failure", "Always asks the registry: {e}");

        let latest = plugin("{name: p, url: 'oci://127.0.0.1:1/plugins/hdr'}", dir.path());
        assert_eq!(latest.pull_policy, PullPolicy::Always, "no tag means latest, checked every time");
    }

    #[tokio::test]
    async fn pinned_sha256_in_the_cache_needs_no_download() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), dir.path());
        let sha = f.cache.put(&header_module("v1")).unwrap();
        let p = plugin(&format!("{{name: p, url: 'http://127.0.0.1:1/m.wasm', sha256: {sha}}}"), dir.path());
        assert_eq!(f.module(&p).await.unwrap().sha256, sha);
        let other = "0".repeat(64);
        let p = plugin(&format!("{{name: p, url: 'http://127.0.0.1:1/m.wasm', sha256: '{other}'}}"), dir.path());
        assert_eq!(f.module(&p).await.unwrap_err().kind(), "download_failure");
    }

    #[tokio::test]
    async fn a_pin_that_disagrees_with_the_tag_is_a_checksum_mismatch_even_when_cached() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), dir.path());
        let v1 = f.cache.put(&header_module("v1")).unwrap();
        let other = f.cache.put(&header_module("other")).unwrap();
        // Filterplane resolved the tag v1 to module v1 before; the YAML pins another
        // module that happens to be cached too.
        f.cache.set_resolved("127.0.0.1:1/plugins/hdr:v1", "sha256:feed", &v1).unwrap();
        let pinned =
            plugin(&format!("{{name: p, url: 'oci://127.0.0.1:1/plugins/hdr:v1', sha256: {other}}}"), dir.path());
        let e = f.module(&pinned).await.unwrap_err();
        assert_eq!(e.kind(), "checksum_mismatch", "{e}");
        assert!(e.to_string().contains(&v1) && e.to_string().contains(&other), "names both modules: {e}");
        // Pinned to what the tag resolves to: served from the cache, no network.
        let agreeing =
            plugin(&format!("{{name: p, url: 'oci://127.0.0.1:1/plugins/hdr:v1', sha256: {v1}}}"), dir.path());
        assert_eq!(f.module(&agreeing).await.unwrap().sha256, v1);
    }

    #[tokio::test]
    async fn files_are_confined_checked_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("good.wasm"), header_module("v1")).unwrap();
        std::fs::write(root.join("bad.wasm"), b"\0asm garbage").unwrap();
        std::fs::write(dir.path().join("outside.wasm"), header_module("v1")).unwrap();
        let f = fetcher(dir.path(), &root);

        let good = f.module(&plugin("{name: p, url: 'file://good.wasm'}", &root)).await.unwrap();
        assert_eq!(good.sha256, sha256_hex(&header_module("v1")));
        let e = f.module(&plugin("{name: p, url: 'file://../outside.wasm'}", &root)).await.unwrap_err();
        assert!(e.to_string().contains("outside the allowed file root"), "{e}");
        let e = f.module(&plugin("{name: p, url: 'file://bad.wasm'}", &root)).await.unwrap_err();
        assert_eq!(e.kind(), "invalid_module");
        let fifo = root.join("fifo.wasm");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let e = tokio::time::timeout(
            Duration::from_secs(5),
            f.module(&plugin("{name: p, url: 'file://fifo.wasm'}", &root)),
        )
        .await
        .expect("a FIFO is refused, not read")
        .unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let wrong = "1".repeat(64);
        let e = f
            .module(&plugin(&format!("{{name: p, url: 'file://good.wasm', sha256: '{wrong}'}}"), &root))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "checksum_mismatch");
        let text = f.metrics.render();
        assert!(text.contains("filterplane_wasm_remote_fetches_total{result=\"checksum_mismatch\"} 1"), "{text}");
        assert!(text.contains("filterplane_wasm_remote_fetches_total{result=\"invalid_module\"} 1"), "{text}");
    }

    /// A fetcher for a plain-HTTP registry at `registry` (on loopback), one attempt.
    fn registry_fetcher(dir: &Path, registry: &str) -> WasmFetcher {
        let cache = WasmModuleCache::open(&dir.join("cache"), 1 << 20).unwrap();
        let settings = FetchSettings {
            file_root: dir.to_path_buf(),
            insecure_registries: vec![registry.to_owned()],
            timeout: Duration::from_secs(10),
            attempts: 1,
            max_module_bytes: 1 << 20,
            deadline: Duration::from_secs(60),
            guard: Default::default(),
            registry_auth_file: None,
            registry_ca_pem: None,
        };
        WasmFetcher::new(cache, settings, WasmMetrics::default()).unwrap()
    }

    /// A registry on loopback that asks for Basic auth and records, per manifest request,
    /// the path and the Authorization header; every manifest is "not found".
    async fn recording_registry() -> (String, Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let Ok(Some(request)) = lines.next_line().await else { return };
                    let path = request.split_whitespace().nth(1).unwrap_or_default().to_owned();
                    let mut auth = None;
                    while let Ok(Some(h)) = lines.next_line().await {
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            if k.eq_ignore_ascii_case("authorization") {
                                auth = Some(v.trim().to_owned());
                            }
                        }
                    }
                    let reply = if path == "/v2/" {
                        "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"fake\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    } else {
                        log.lock().unwrap().push((path, auth));
                        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
                    };
                    let _ = write.write_all(reply.as_bytes()).await;
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn each_plugin_pulls_with_its_own_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, seen) = recording_registry().await;
        let f = registry_fetcher(dir.path(), &registry);
        std::fs::write(dir.path().join("a-creds"), "user-a:pw-a").unwrap();
        std::fs::write(dir.path().join("c-creds"), "user-c:pw-c").unwrap();
        let secret = |who: &str| format!(", image_pull_secret: {{ file: '{}' }}", dir.path().join(who).display());
        for (repo, extra) in [("a", secret("a-creds")), ("b", String::new()), ("c", secret("c-creds"))] {
            let p = plugin(&format!("{{name: {repo}, url: 'oci://{registry}/{repo}:v1'{extra}}}"), dir.path());
            assert_eq!(f.module(&p).await.unwrap_err().kind(), "download_failure");
        }
        // base64 of "user-a:pw-a" and "user-c:pw-c".
        let basic =
            |who: &str| Some(format!("Basic {}", if who == "a" { "dXNlci1hOnB3LWE=" } else { "dXNlci1jOnB3LWM=" }));
        let auth_of = |repo: &str| {
            let seen = seen.lock().unwrap();
            seen.iter().find(|(path, _)| path.starts_with(&format!("/v2/{repo}/"))).map(|(_, a)| a.clone())
        };
        assert_eq!(auth_of("a"), Some(basic("a")));
        assert_eq!(auth_of("b"), Some(None), "no secret: no credentials, not another plugin's");
        assert_eq!(auth_of("c"), Some(basic("c")), "its own, not the first plugin's");
    }

    #[tokio::test]
    async fn an_endless_blob_is_cut_off_at_its_declared_size() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let registry = listener.local_addr().unwrap().to_string();
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = sent.clone();
        let layer = format!("sha256:{}", "a".repeat(64));
        let manifest = format!(
            "{{\"schemaVersion\": 2, \"mediaType\": \"application/vnd.oci.image.manifest.v1+json\", \"config\": {{\"mediaType\": \"application/vnd.module.wasm.config.v1+json\", \"digest\": \"{layer}\", \"size\": 2}}, \"layers\": [{{\"mediaType\": \"{}\", \"digest\": \"{layer}\", \"size\": 288}}]}}",
            oci::WASM_LAYER
        );
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (counter, manifest) = (counter.clone(), manifest.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if request.starts_with("GET /v2/ ") {
                        let _ =
                            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}").await;
                    } else if request.contains("/manifests/") {
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", manifest.len());
                        let _ = s.write_all(format!("{head}{manifest}").as_bytes()).await;
                    } else {
                        // The blob: declared 288 bytes, sent without end.
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n").await;
                        let chunk = vec![0u8; 64 << 10];
                        while s.write_all(&chunk).await.is_ok() {
                            counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let f = registry_fetcher(dir.path(), &registry);
        let p = plugin(&format!("{{name: p, url: 'oci://{registry}/endless-blob:v1'}}"), dir.path());
        let e = f.module(&p).await.unwrap_err();
        assert_eq!(e.kind(), "download_failure", "{e}");
        let read = sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(read < 64 << 20, "{read} bytes were taken from the endless blob");
    }

    #[tokio::test]
    async fn an_endless_manifest_is_cut_off_not_buffered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let registry = listener.local_addr().unwrap().to_string();
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = sent.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if String::from_utf8_lossy(&buf[..n]).starts_with("GET /v2/ ") {
                        let _ =
                            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}").await;
                        return;
                    }
                    // A manifest that never ends, as fast as the reader takes it.
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\nconnection: close\r\n\r\n{\"layers\": [").await;
                    let chunk = vec![b' '; 64 << 10];
                    while s.write_all(&chunk).await.is_ok() {
                        counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let f = registry_fetcher(dir.path(), &registry);
        let p = plugin(&format!("{{name: p, url: 'oci://{registry}/endless:v1'}}"), dir.path());
        let e = f.module(&p).await.unwrap_err();
        assert!(e.to_string().contains("manifest larger than"), "{e}");
        // Read up to the bound and dropped, not buffered without end.
        let read = sent.load(std::sync::atomic::Ordering::Relaxed);
        assert!(read < 64 << 20, "{read} bytes were taken from the endless manifest");
    }

    #[test]
    fn credentials_come_from_env_or_file_and_errors_do_not_show_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cred");
        std::fs::write(&file, "user:s3cret\n").unwrap();
        let auth = registry_auth(Some(&PullSecret::File(file)), "r:1", None).unwrap();
        assert!(matches!(auth, RegistryAuth::Basic(u, p) if u == "user" && p == "s3cret"));
        std::fs::write(dir.path().join("bad"), "s3cret-without-colon").unwrap();
        let e = registry_auth(Some(&PullSecret::File(dir.path().join("bad"))), "r:1", None).unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
        let e = registry_auth(Some(&PullSecret::Env("FILTERPLANE_TEST_SURELY_UNSET".into())), "r:1", None).unwrap_err();
        assert!(e.to_string().contains("FILTERPLANE_TEST_SURELY_UNSET is not set"));
        // The default file: its entry for the registry, or anonymous when it has none.
        let docker = dir.path().join("config.json");
        std::fs::write(&docker, r#"{"auths": {"r:1": {"username": "d", "password": "p"}}}"#).unwrap();
        let auth = registry_auth(None, "r:1", Some(&docker)).unwrap();
        assert!(matches!(auth, RegistryAuth::Basic(u, _) if u == "d"));
        assert!(matches!(registry_auth(None, "other:2", Some(&docker)).unwrap(), RegistryAuth::Anonymous));
        assert!(matches!(registry_auth(None, "r:1", None).unwrap(), RegistryAuth::Anonymous));
    }
}
