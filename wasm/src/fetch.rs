//! Fetching modules: from a confined file root, over HTTP(S) with timeouts, bounded
//! retries with backoff and a size limit, or from an OCI registry (tags resolved to
//! digests). Every module is checked against its SHA-256 and parsed before it is cached.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use filterplane_config::{
    model::{PullPolicy, PullSecret},
    wasm::{ModuleSource, WasmPlugin},
};
use oci_client::secrets::RegistryAuth;

pub use crate::download::{get_bounded, FetchSettings};
use crate::{
    cache::{sha256_hex, WasmModuleCache},
    check::check_module,
    creds,
    metrics::{ResultLabel, WasmMetrics},
    oci,
};

/// Why a module could not be had. The kind is the metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("download failed: {0}")]
    Download(String),
    #[error("checksum mismatch: expected sha256 {expected}, got {actual}")]
    Checksum { expected: String, actual: String },
    #[error("invalid module: {0}")]
    Invalid(String),
    /// `signature_missing`, `signature_invalid` or `signature_untrusted_key`.
    #[error("{0}: {1}")]
    Signature(&'static str, String),
}

impl FetchError {
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::Download(_) => "download_failure",
            FetchError::Checksum { .. } => "checksum_mismatch",
            FetchError::Invalid(_) => "invalid_module",
            FetchError::Signature(kind, _) => kind,
        }
    }
}

/// A module ready to serve.
#[derive(Debug, Clone)]
pub struct Module {
    pub sha256: String,
    pub bytes: Bytes,
}

/// Where the detached signature of a file or http(s) module is: `signature_url` when
/// given, else the module's own location with `.sig` appended.
fn signature_location(source: &ModuleSource, signature_url: Option<&str>) -> Option<ModuleSource> {
    match signature_url {
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => Some(ModuleSource::Http(u.to_owned())),
        Some(u) => Some(ModuleSource::File(u.strip_prefix("file://").unwrap_or(u).into())),
        None => match source {
            ModuleSource::File(p) => Some(ModuleSource::File(format!("{}.sig", p.display()).into())),
            ModuleSource::Http(u) => Some(ModuleSource::Http(format!("{u}.sig"))),
            ModuleSource::Oci { .. } => None,
        },
    }
}

pub struct WasmFetcher {
    pub cache: WasmModuleCache,
    settings: FetchSettings,
    http: reqwest::Client,
    pub metrics: WasmMetrics,
    /// The trusted key that verified each module (by SHA-256) the last time it was checked.
    verified: std::sync::Mutex<std::collections::HashMap<String, String>>,
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
        let fetcher = Self { cache, settings, http, metrics, verified: Default::default() };
        fetcher.update_cache_gauges();
        Ok(fetcher)
    }

    /// The trusted key that verified the module with this SHA-256, if one did.
    pub fn verified_by(&self, sha256: &str) -> Option<String> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner()).get(sha256).cloned()
    }

    fn update_cache_gauges(&self) {
        let (entries, bytes) = self.cache.usage();
        self.metrics.cache_entries.set(entries as i64);
        self.metrics.cache_bytes.set(bytes as i64);
    }

    /// `module`, its signature checked (`check_signature`), given up after the reload's
    /// deadline.
    pub async fn module_in_time(&self, plugin: &WasmPlugin) -> Result<Module, FetchError> {
        let deadline = self.settings.deadline;
        let checked = async {
            let module = self.module(plugin).await?;
            if let Some(key) = self.check_signature(plugin, &module).await? {
                self.verified.lock().unwrap_or_else(|p| p.into_inner()).insert(module.sha256.clone(), key);
            }
            Ok(module)
        };
        tokio::time::timeout(deadline, checked).await.unwrap_or_else(|_| {
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

    /// Which trusted key signed `module` (`None`: no keys asked, or none required and no
    /// signature there); a module that fails the check is refused like a checksum
    /// mismatch. Signatures are small and fetched each time: a module verified under other
    /// keys is verified again.
    pub async fn check_signature(&self, plugin: &WasmPlugin, module: &Module) -> Result<Option<String>, FetchError> {
        let Some(v) = &plugin.verification else { return Ok(None) };
        let result = self.signature_inner(plugin, v, module).await;
        let label = match &result {
            Ok(Some(_)) => "verified",
            Ok(None) => "unsigned",
            Err(e) => e.kind(),
        };
        self.metrics.signature_verifications.get_or_create(&ResultLabel { result: label }).inc();
        result
    }

    async fn signature_inner(
        &self,
        plugin: &WasmPlugin,
        v: &filterplane_config::compiled::Verification,
        module: &Module,
    ) -> Result<Option<String>, FetchError> {
        let digest = &module.sha256;
        let missing = |why: String| {
            if v.require {
                Err(FetchError::Signature(
                    "signature_missing",
                    format!("{why} (module sha256 {digest}; require: true)"),
                ))
            } else {
                Ok(None)
            }
        };
        let Some(at) = signature_location(&plugin.source, v.signature_url.as_deref()) else {
            return self.check_cosign(plugin, v, module).await;
        };
        let text = match &at {
            ModuleSource::File(path) => {
                match self.confined(path).and_then(|p| Some((std::fs::metadata(&p).ok()?, p))) {
                    Some((m, full)) if m.is_file() && m.len() <= crate::sign::MAX_SIGNATURE_BYTES as u64 => {
                        tokio::fs::read(&full)
                            .await
                            .map_err(|e| FetchError::Download(format!("{}: {e}", path.display())))?
                    }
                    Some((m, _)) if m.is_file() => {
                        return Err(FetchError::Signature(
                            "signature_invalid",
                            format!(
                                "{}: {} bytes, over the limit of {}",
                                path.display(),
                                m.len(),
                                crate::sign::MAX_SIGNATURE_BYTES
                            ),
                        ))
                    }
                    _ => return missing(format!("no signature at {}", path.display())),
                }
            }
            ModuleSource::Http(url) => {
                if let Ok(parsed) = reqwest::Url::parse(url) {
                    self.settings
                        .guard
                        .check_url(&parsed)
                        .map_err(|e| FetchError::Download(format!("{url}: refused: {e}")))?;
                }
                match get_bounded(self.http.get(url), url, "signature", crate::sign::MAX_SIGNATURE_BYTES as u64).await {
                    Ok(b) => b.to_vec(),
                    Err((_, e)) if e.contains("HTTP 404") => return missing(format!("no signature at {url} (404)")),
                    Err((_, e)) if e.contains("larger than the limit") => {
                        return Err(FetchError::Signature("signature_invalid", e))
                    }
                    Err((_, e)) => return Err(FetchError::Download(e)),
                }
            }
            ModuleSource::Oci { .. } => return missing("no signature".into()),
        };
        let place = match &at {
            ModuleSource::File(p) => p.display().to_string(),
            ModuleSource::Http(u) => u.clone(),
            ModuleSource::Oci { .. } => String::new(),
        };
        let sig = crate::sign::decode_signature(&text)
            .map_err(|m| FetchError::Signature("signature_invalid", format!("{place}: {m}")))?;
        let mut keys = Vec::new();
        for (name, pem) in &v.keys {
            let key = crate::sign::PublicKey::from_pem(name, pem)
                .map_err(|e| FetchError::Signature("signature_untrusted_key", format!("key {name}: {e}")))?;
            keys.push(key);
        }
        match crate::sign::verified_by(&keys, &module.bytes, &sig) {
            Some(k) => Ok(Some(k.name.clone())),
            None => Err(FetchError::Signature(
                "signature_untrusted_key",
                format!(
                    "the signature at {place} over module sha256 {digest} verifies with none of the trusted keys ({})",
                    v.keys.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    /// An OCI module's cosign signatures (the `sha256-HEX.sig` tag beside the manifest it
    /// was pulled from): any payload naming that manifest and signed by a trusted key.
    async fn check_cosign(
        &self,
        plugin: &WasmPlugin,
        v: &filterplane_config::compiled::Verification,
        module: &Module,
    ) -> Result<Option<String>, FetchError> {
        let ModuleSource::Oci { registry, repository, tag, digest } = &plugin.source else { return Ok(None) };
        let reference = oci::reference(registry, repository, tag.as_deref(), digest.as_deref());
        let key = reference.whole();
        let manifest_digest = match self.cache.resolved(&key) {
            Some((d, sha)) if sha == module.sha256 => d,
            _ => {
                return Err(FetchError::Download(format!(
                    "{key}: the manifest of module sha256 {} is not known",
                    module.sha256
                )))
            }
        };
        let auth = registry_auth(plugin.pull_secret.as_ref(), registry, self.settings.registry_auth_file.as_deref())?;
        let client = oci::client(&self.settings);
        let reg = oci::Registry { client: &client, http: &self.http, insecure: &self.settings.insecure_registries };
        let found = oci::cosign_signatures(&reg, &reference, &auth, &manifest_digest).await.map_err(|e| match e {
            oci::PullError::Invalid(m) => FetchError::Signature("signature_invalid", format!("{key}: {m}")),
            oci::PullError::Permanent(m) | oci::PullError::Transient(m) => FetchError::Download(format!("{key}: {m}")),
        })?;
        let place = format!("{key} (tag {}.sig)", manifest_digest.replace(':', "-"));
        if found.is_empty() {
            return if v.require {
                Err(FetchError::Signature(
                    "signature_missing",
                    format!("no cosign signature of manifest {manifest_digest} at {place} (module sha256 {}; require: true)", module.sha256),
                ))
            } else {
                Ok(None)
            };
        }
        let mut keys = Vec::new();
        for (name, pem) in &v.keys {
            keys.push(
                crate::sign::PublicKey::from_pem(name, pem)
                    .map_err(|e| FetchError::Signature("signature_untrusted_key", format!("key {name}: {e}")))?,
            );
        }
        let mut named = 0;
        for (payload, sig) in &found {
            if !oci::payload_names(payload, &manifest_digest) {
                continue;
            }
            named += 1;
            let Ok(sig) = crate::sign::decode_signature(sig.as_bytes()) else { continue };
            if let Some(k) = crate::sign::verified_by(&keys, payload, &sig) {
                return Ok(Some(k.name.clone()));
            }
        }
        let names = v.keys.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
        if named == 0 {
            return Err(FetchError::Signature(
                "signature_invalid",
                format!(
                    "{place}: {} payload(s), none a cosign container image signature of manifest {manifest_digest}",
                    found.len()
                ),
            ));
        }
        Err(FetchError::Signature(
            "signature_untrusted_key",
            format!("{place}: no signature of manifest {manifest_digest} (module sha256 {}) verifies with the trusted keys ({names})", module.sha256),
        ))
    }

    /// The module, and whether it came from the cache.
    async fn module_inner(&self, plugin: &WasmPlugin) -> Result<(Module, bool), FetchError> {
        // An HTTP(S) URL is pinned by its SHA-256: once that URL was fetched and served
        // that SHA-256, the cached module is what it serves, so there is no need to go out.
        // A URL not fetched before is fetched and verified, even when a module with the
        // pinned SHA-256 is cached: a URL changed with a stale pin is a checksum mismatch
        // naming both digests, never the old module served silently. Not so for OCI: a
        // tag names whatever it was last pushed to, and a pin that disagrees with the
        // tag's resolution is a mismatch to report, never a cached module to serve
        // instead (`pull_oci` resolves the tag as the pull policy says and verifies it).
        if let (Some(sha), ModuleSource::Http(url)) = (&plugin.sha256, &plugin.source) {
            let fetched_before = self.cache.resolved(&Self::url_key(url)).is_some_and(|(_, s)| s == *sha);
            if fetched_before {
                if let Some(bytes) = self.cache.get(sha, &self.metrics) {
                    return Ok((Module { sha256: sha.clone(), bytes }, true));
                }
            }
        }
        // An HTTP(S) URL without a pin (as Istio's docs write them): `IfNotPresent` serves
        // what the URL gave the last time it was fetched; `Always` fetches at every reload.
        if let (None, ModuleSource::Http(url), PullPolicy::IfNotPresent) =
            (&plugin.sha256, &plugin.source, plugin.pull_policy)
        {
            if let Some((_, sha)) = self.cache.resolved(&Self::url_key(url)) {
                if let Some(bytes) = self.cache.get(&sha, &self.metrics) {
                    return Ok((Module { sha256: sha, bytes }, true));
                }
            }
        }
        let bytes = match &plugin.source {
            ModuleSource::File(path) => self.read_file(path).await?,
            ModuleSource::Http(url) => {
                let bytes = self.download(url).await?;
                let module = self.accept(plugin, bytes)?;
                // Remembered (with the cache): this URL served this module.
                let _ = self.cache.set_resolved(&Self::url_key(url), url, &module.sha256);
                return Ok((module, false));
            }
            ModuleSource::Oci { registry, repository, tag, digest } => {
                let auth =
                    registry_auth(plugin.pull_secret.as_ref(), registry, self.settings.registry_auth_file.as_deref())?;
                let reference = oci::reference(registry, repository, tag.as_deref(), digest.as_deref());
                return self.pull_oci(plugin, &reference, &auth).await;
            }
        };
        self.accept(plugin, bytes).map(|m| (m, false))
    }

    /// Where the cache remembers what an HTTP(S) URL served.
    fn url_key(url: &str) -> String {
        format!("url {url}")
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

    /// `path`, if it exists and is inside `--wasm-file-root` (a signature beside a module
    /// is read under the same rule as the module).
    fn confined(&self, path: &std::path::Path) -> Option<std::path::PathBuf> {
        let root = self.settings.file_root.canonicalize().ok()?;
        path.canonicalize().ok().filter(|full| full.starts_with(&root))
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
#[path = "fetch_tests.rs"]
mod tests;
