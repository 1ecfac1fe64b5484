//! Loading the config into the cache: at start, when the file or directory changes
//! (debounced), and on SIGHUP. A config that fails validation is refused as a whole;
//! the last good one keeps serving and the errors are kept for the admin API.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use filterplane_config::{ConfigError, ConfigErrors};
use notify::{
    event::{AccessKind, AccessMode, ModifyKind, RenameMode},
    EventKind, RecursiveMode, Watcher,
};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{cache::SnapshotCache, metrics::Metrics, tracker::now};
use filterplane_wasm::{resolve, PluginError, WasmSupport};

/// Quiet time after the last file event before reloading: editors write a file in
/// several steps (truncate, write, rename), and one reload should see the end result.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// Quiet time after an event that says the change is finished (the config file closed
/// after writing or renamed into place, a ConfigMap's `..data` swapped): only long enough
/// to take in a burst of such events as one reload.
pub const SETTLE: Duration = Duration::from_millis(5);

/// Quiet time after one file of a config directory was closed after writing or renamed
/// into place: that file is whole, and a tool writing several (`cp`, `rsync`, a checkout)
/// writes the next within a millisecond or two, which restarts the wait.
pub const FILE_SETTLE: Duration = Duration::from_millis(20);

/// The longest a reload waits for the files to be quiet once they changed (unless a write
/// is still open): under a steady stream of edits, each reload takes what came in since
/// the last one.
pub const BURST_LIMIT: Duration = Duration::from_millis(100);

/// Quiet time after a write that has not been closed yet: the writer is still at it (a
/// file written in chunks must never be applied half-written), and only a writer that
/// died with the file open leaves it this long.
pub const WRITE_FALLBACK: Duration = Duration::from_secs(10);

/// How often the watched directory is checked for having been removed and created again
/// (a watch does not survive its directory).
pub const WATCH_CHECK: Duration = Duration::from_secs(1);

/// One config error as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorView {
    pub file: String,
    pub line: Option<usize>,
    pub path: String,
    pub message: String,
}

impl From<&ConfigError> for ErrorView {
    fn from(e: &ConfigError) -> Self {
        Self { file: e.file.display().to_string(), line: e.line, path: e.path.clone(), message: e.message.clone() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ReloadOutcome {
    /// No load attempted yet.
    Pending,
    /// A new version is being served.
    Applied { version: String },
    /// The config compiled to the version already served.
    Unchanged { version: String },
    /// Refused; the previous version (if any) keeps serving.
    Failed { errors: Vec<ErrorView> },
    /// Valid, but it would remove more of what is served than `--max-removal-percent`
    /// allows (a truncated file that still parses, a directory emptied by mistake): held
    /// until confirmed (`filterplane reload --confirm`, SIGHUP). The previous version keeps
    /// serving.
    Held { version: String, removed: usize, served: usize, examples: Vec<String> },
}

/// The result of the last reload, for the admin API and `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    pub config_path: String,
    /// The version being served; `None` until a config has loaded.
    pub serving_version: Option<String>,
    pub serving_since: Option<String>,
    pub last_attempt_at: Option<String>,
    pub last_trigger: Option<String>,
    pub last_duration_ms: Option<f64>,
    pub last_outcome: ReloadOutcome,
    /// Wasm plugins of the last reload whose new version could not be served.
    pub wasm_errors: Vec<PluginError>,
}

/// Loads the config at one path into the cache.
#[derive(Debug)]
pub struct ConfigReloader {
    path: PathBuf,
    cache: Arc<SnapshotCache>,
    metrics: Arc<Metrics>,
    wasm: Option<WasmSupport>,
    /// The latest status; receivers (the admin page) wake on every reload.
    status: watch::Sender<ReloadStatus>,
    /// A reload that removes more than this share of the served resources is held
    /// (100: never).
    max_removal_percent: u8,
    /// Largest config file read.
    max_config_bytes: u64,
    /// `--preflight-envoy`: a real Envoy checks what changed before it is served.
    preflight: Option<Arc<crate::preflight::Preflight>>,
    /// Compiles only the entries whose text changed since the last reload.
    loader: Arc<std::sync::Mutex<filterplane_config::incremental::Loader>>,
}

impl ConfigReloader {
    pub fn new(path: PathBuf, cache: Arc<SnapshotCache>, metrics: Arc<Metrics>) -> Self {
        let status = ReloadStatus {
            config_path: path.display().to_string(),
            serving_version: None,
            serving_since: None,
            last_attempt_at: None,
            last_trigger: None,
            last_duration_ms: None,
            last_outcome: ReloadOutcome::Pending,
            wasm_errors: Vec::new(),
        };
        Self {
            path,
            cache,
            metrics,
            wasm: None,
            status: watch::Sender::new(status),
            max_removal_percent: 100,
            max_config_bytes: filterplane_config::load::MAX_FILE_BYTES,
            preflight: None,
            loader: Default::default(),
        }
    }

    /// Has a real Envoy validate what changed before it is served.
    pub fn with_preflight(mut self, preflight: Option<Arc<crate::preflight::Preflight>>) -> Self {
        self.preflight = preflight;
        self
    }

    /// Reads no config file larger than `bytes`.
    pub fn with_max_config_bytes(mut self, bytes: u64) -> Self {
        self.max_config_bytes = bytes;
        self
    }

    /// Holds reloads that would remove more than `percent` of the served resources.
    pub fn with_removal_guard(mut self, percent: u8) -> Self {
        self.max_removal_percent = percent.min(100);
        self
    }

    /// What `config` would remove of what is served, when that is more than the guard
    /// allows: (removed, served, a few of the removed).
    fn removes_too_much(&self, config: &filterplane_config::CompiledConfig) -> Option<(usize, usize, Vec<String>)> {
        if self.max_removal_percent >= 100 {
            return None;
        }
        let current = self.cache.current()?;
        let removed = removed_names(&current.config.resources, &config.resources);
        if removed.is_empty() {
            return None;
        }
        let served = served_names(&current.config.resources);
        let over = removed.len() * 100 > served * usize::from(self.max_removal_percent);
        (over && !removed.is_empty()).then(|| {
            let examples = removed.iter().take(5).map(|(rt, name)| format!("{rt} {name}")).collect();
            (removed.len(), served, examples)
        })
    }

    /// Lets this reloader serve Wasm plugins.
    pub fn with_wasm(mut self, wasm: WasmSupport) -> Self {
        self.wasm = Some(wasm);
        self
    }

    pub fn wasm(&self) -> Option<&WasmSupport> {
        self.wasm.as_ref()
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.borrow().clone()
    }

    /// Wakes after every reload attempt.
    pub fn changes(&self) -> watch::Receiver<ReloadStatus> {
        self.status.subscribe()
    }

    /// Loads, validates and compiles the config, and publishes it if it is good (and
    /// removes no more than the guard allows).
    pub async fn reload(&self, trigger: &str) -> ReloadOutcome {
        self.reload_with(trigger, false).await
    }

    /// As `reload`, applying even a config that removes more than the guard allows: the
    /// operator said so (SIGHUP, `filterplane reload --confirm`).
    pub async fn reload_confirmed(&self, trigger: &str) -> ReloadOutcome {
        self.reload_with(trigger, true).await
    }

    async fn reload_with(&self, trigger: &str, confirmed: bool) -> ReloadOutcome {
        let started = Instant::now();
        let (path, max, loader) = (self.path.clone(), self.max_config_bytes, self.loader.clone());
        // (Reloads run one at a time; the lock only hands the cache to the blocking task.)
        let loaded = tokio::task::spawn_blocking(move || {
            let mut loader = loader.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (loader.load(&path, max), loader.stats())
        })
        .await;
        let stats = loaded.as_ref().map(|(_, s)| *s).unwrap_or_default();
        let result = loaded.map(|(r, _)| r).unwrap_or_else(|e| {
            Err(ConfigErrors(vec![ConfigError {
                file: self.path.clone(),
                line: None,
                path: String::new(),
                message: format!("config load task failed: {e}"),
            }]))
        });
        let mut wasm_errors = Vec::new();
        let result = match (result, &self.wasm) {
            (Ok(config), Some(w)) if config.fetches_wasm() => {
                let previous = self.cache.current();
                let pinned = self.cache.pinned_modules();
                let (config, errors) =
                    resolve(config, &w.fetcher, &w.delivery, previous.as_deref().map(|g| g.config.as_ref()), pinned)
                        .await;
                wasm_errors = errors;
                Ok(config)
            }
            (Ok(config), None) if config.fetches_wasm() => Err(ConfigErrors(vec![ConfigError {
                file: self.path.clone(),
                line: None,
                path: "wasm_plugins".into(),
                message: "this server was started without Wasm support".into(),
            }])),
            (other, _) => other,
        };
        let result = match (result, &self.preflight) {
            (Ok(config), Some(p)) => {
                let checked = std::time::Instant::now();
                let verdict = p.check(&config).await;
                tracing::debug!(ms = checked.elapsed().as_secs_f64() * 1e3, "pre-flight validation");
                verdict.map(|()| config)
            }
            (other, _) => other,
        };
        let elapsed = started.elapsed();
        let too_much = match &result {
            Ok(config) if !confirmed => self.removes_too_much(config),
            _ => None,
        };
        let outcome = match result {
            Ok(config) if too_much.is_some() => {
                let (removed, served, examples) = too_much.unwrap_or_default();
                tracing::warn!(version = %config.version, removed, served, trigger, ?examples, "config held: it would remove more than --max-removal-percent of what is served; confirm with `filterplane reload --confirm` or SIGHUP");
                ReloadOutcome::Held { version: config.version.to_string(), removed, served, examples }
            }
            Ok(config) => {
                let version = config.version.to_string();
                let resources = config.resources.len();
                for n in &config.notices {
                    tracing::info!(notice = %n, "config note");
                }
                if self.cache.publish(config) {
                    tracing::info!(
                        %version,
                        resources,
                        compiled = stats.compiled,
                        trigger,
                        ms = elapsed.as_secs_f64() * 1e3,
                        "config applied"
                    );
                    ReloadOutcome::Applied { version }
                } else {
                    tracing::info!(%version, trigger, "config unchanged");
                    ReloadOutcome::Unchanged { version }
                }
            }
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(trigger, "config refused: {e}");
                }
                ReloadOutcome::Failed { errors: errors.0.iter().map(ErrorView::from).collect() }
            }
        };
        let result = match &outcome {
            ReloadOutcome::Applied { .. } => "applied",
            ReloadOutcome::Unchanged { .. } => "unchanged",
            ReloadOutcome::Held { .. } => "held",
            ReloadOutcome::Failed { .. } | ReloadOutcome::Pending => "failed",
        };
        self.metrics.reload(result, elapsed);
        let at = now();
        self.status.send_modify(|status| {
            if let ReloadOutcome::Applied { version } = &outcome {
                status.serving_version = Some(version.clone());
                status.serving_since = Some(at.clone());
            }
            status.last_attempt_at = Some(at);
            status.last_trigger = Some(trigger.to_owned());
            status.last_duration_ms = Some(elapsed.as_secs_f64() * 1e3);
            status.last_outcome = outcome.clone();
            status.wasm_errors = wasm_errors;
        });
        outcome
    }

    /// Starts watching SIGHUP and the config's files. Call it before the first load: a
    /// change made while that load runs then still causes a reload, and once the server
    /// reports ready every later edit is seen. Either half failing to start (say, the
    /// inotify instance limit) is logged and leaves the other working.
    pub fn start_watch(self: &Arc<Self>) -> ConfigWatch {
        let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP; the config still reloads when its files change");
                None
            }
        };
        let (tx, events) = mpsc::channel::<Change>(64);
        let watched = dir_identity(&self.path);
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = match self.watch_files(tx.clone(), lost.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, path = %self.path.display(), "cannot watch the config files; reload with SIGHUP");
                None
            }
        };
        ConfigWatch { reloader: self.clone(), watcher, tx, watched, lost, events, hup }
    }

    /// Watches the config's directory; `lost` is set when the directory itself goes (the
    /// watch ends with it).
    fn watch_files(
        &self,
        tx: mpsc::Sender<Change>,
        lost: Arc<std::sync::atomic::AtomicBool>,
    ) -> notify::Result<notify::RecommendedWatcher> {
        let relevant = RelevantPaths::new(&self.path);
        let dir = filterplane_config::load::config_dir(&self.path).to_path_buf();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                if matches!(ev.kind, EventKind::Remove(_)) && ev.paths.contains(&dir) {
                    lost.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if let Some(change) = relevant.classify(&ev) {
                    // A full channel already means "reload pending".
                    let _ = tx.try_send(change);
                }
            }
            Err(e) => tracing::warn!(error = %e, "file watch error"),
        })?;
        // Watch the directory, not the file: editors and Kubernetes ConfigMaps replace
        // files by rename, which ends a watch on the file itself.
        watcher.watch(filterplane_config::load::config_dir(&self.path), RecursiveMode::NonRecursive)?;
        Ok(watcher)
    }
}

type Key<'a> = (filterplane_api::ResourceType, &'a str);

fn key(r: &filterplane_config::CompiledResource) -> Key<'_> {
    (r.resource_type, r.name.as_str())
}

/// The names (type and name) of `old` that `new` no longer has, both in serving order
/// (sorted by type and name). Walks both at once; the resources they share (the same
/// allocation: a reload keeps every entry it did not change) are passed by their address,
/// without reading them.
fn removed_names<'a>(
    old: &'a [Arc<filterplane_config::CompiledResource>],
    new: &[Arc<filterplane_config::CompiledResource>],
) -> Vec<Key<'a>> {
    let (mut removed, mut j) = (Vec::new(), 0);
    for o in old {
        if new.get(j).is_some_and(|n| Arc::ptr_eq(n, o)) {
            j += 1;
            continue;
        }
        let present = loop {
            let Some(n) = new.get(j) else { break false };
            match key(n).cmp(&key(o)) {
                std::cmp::Ordering::Less => j += 1,
                std::cmp::Ordering::Equal => break true,
                std::cmp::Ordering::Greater => break false,
            }
        };
        // (The one passed last may have had its name: an entry of a name written twice.)
        let present = present || j.checked_sub(1).and_then(|p| new.get(p)).is_some_and(|n| key(n) == key(o));
        if !present && removed.last() != Some(&key(o)) {
            removed.push(key(o));
        }
    }
    removed
}

/// How many names (type and name) `resources`, in serving order, serve.
fn served_names(resources: &[Arc<filterplane_config::CompiledResource>]) -> usize {
    resources.iter().enumerate().filter(|(i, r)| *i == 0 || key(&resources[i - 1]) != key(r)).count()
}

/// The watched directory's device and inode: they change when it is removed and created
/// again, which ends an inotify watch on it.
fn dir_identity(config: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(filterplane_config::load::config_dir(config)).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// A running watch on the config (see [`ConfigReloader::start_watch`]).
pub struct ConfigWatch {
    reloader: Arc<ConfigReloader>,
    /// `None` when the files cannot be watched (SIGHUP only, until the check below
    /// manages to watch again).
    watcher: Option<notify::RecommendedWatcher>,
    /// For watchers made anew.
    tx: mpsc::Sender<Change>,
    /// The directory the watcher watches (`dir_identity`).
    watched: Option<(u64, u64)>,
    /// Set by the watcher when that directory was removed (a new one may reuse its inode).
    lost: Arc<std::sync::atomic::AtomicBool>,
    events: mpsc::Receiver<Change>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl ConfigWatch {
    /// Reloads on file changes and SIGHUP until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut check = tokio::time::interval(WATCH_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Tried again every check; said once.
        let mut warned = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = check.tick() => {
                    let now = dir_identity(&self.reloader.path);
                    let lost = self.lost.load(std::sync::atomic::Ordering::Relaxed);
                    if now.is_some() && (lost || now != self.watched || self.watcher.is_none()) {
                        // The directory was removed and created again (or could not be
                        // watched before): watch the new one, and read what it holds.
                        self.lost.store(false, std::sync::atomic::Ordering::Relaxed);
                        match self.reloader.watch_files(self.tx.clone(), self.lost.clone()) {
                            Ok(w) => {
                                tracing::info!(path = %self.reloader.path.display(), "watching the config directory (re-created, or watchable again)");
                                self.watcher = Some(w);
                                self.watched = now;
                                warned = false;
                                self.reloader.reload("config directory re-created").await;
                            }
                            Err(e) if !warned => {
                                warned = true;
                                tracing::warn!(error = %e, "cannot watch the config files; trying again every second (SIGHUP reloads meanwhile)");
                            }
                            Err(e) => tracing::debug!(error = %e, "cannot watch the config files yet"),
                        }
                    }
                }
                _ = async {
                    match self.hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // An operator's signal: it also applies a reload the guard held.
                    self.reloader.reload_confirmed("SIGHUP").await;
                }
                Some(mut change) = self.events.recv() => {
                    // Debounce: wait until the files have been quiet for as long as the
                    // last event asks (a write not closed yet: WRITE_FALLBACK; a partial
                    // change: DEBOUNCE; a finished one: SETTLE or FILE_SETTLE), but no
                    // longer than BURST_LIMIT unless a write is still open: files that
                    // change without pause (endpoints churning) are read at that pace.
                    let limit = tokio::time::Instant::now() + BURST_LIMIT;
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(change.quiet_time()) => break,
                            _ = tokio::time::sleep_until(limit), if change != Change::Writing => break,
                            more = self.events.recv() => match more {
                                Some(c) => change = c,
                                None => break,
                            },
                        }
                    }
                    self.reloader.reload("file change").await;
                }
            }
        }
    }
}

/// What a file event says about the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// A file is being written and not closed yet: wait for the close.
    Writing,
    /// Something changed and more may follow: one file of a config directory (others may
    /// be on their way), or a file removed.
    Partial,
    /// The change is finished: the config file was closed after writing or renamed into
    /// place, or a ConfigMap's `..data` was swapped (all its files at once).
    Complete,
    /// One file of a config directory is finished (closed after writing, or renamed into
    /// place); others may follow at once.
    FileFinished,
}

impl Change {
    fn quiet_time(self) -> Duration {
        match self {
            Change::Writing => WRITE_FALLBACK,
            Change::Partial => DEBOUNCE,
            Change::Complete => SETTLE,
            Change::FileFinished => FILE_SETTLE,
        }
    }
}

/// Which changes in the watched directory concern the config: the config file itself, or
/// any YAML file of a config directory, and Kubernetes ConfigMap volumes' `..data`
/// symlink swap. Anything else in the directory (logs, editor backups) is ignored.
struct RelevantPaths {
    file_name: Option<std::ffi::OsString>,
}

impl RelevantPaths {
    fn new(config: &Path) -> Self {
        Self { file_name: if config.is_dir() { None } else { config.file_name().map(ToOwned::to_owned) } }
    }

    /// `None` for events that do not concern the config (other files, reads).
    fn classify(&self, ev: &notify::Event) -> Option<Change> {
        let renamed = matches!(ev.kind, EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)));
        let closed = match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => return None,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => false,
            _ => return None,
        };
        // A rename names (from, to): it is finished when a config file is where it ends up.
        let into_place = ev.paths.last().filter(|p| renamed && self.matches(p));
        let path = match into_place {
            Some(p) => p,
            None => ev.paths.iter().find(|p| self.matches(p))?,
        };
        let (renamed_into_place, finished) = (into_place.is_some(), closed || into_place.is_some());
        let data_swap = path.file_name().is_some_and(|n| n == "..data");
        let complete = (data_swap && (renamed_into_place || matches!(ev.kind, EventKind::Create(_))))
            || (self.file_name.is_some() && finished);
        // Written and not closed yet: the writer is still at it. (Not a create alone: a
        // FIFO, a link or a directory is never closed after writing; a file's writes
        // follow its create.)
        let configmap = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("..data"));
        let writing = !configmap && matches!(ev.kind, EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any));
        Some(if complete {
            Change::Complete
        } else if finished && !configmap {
            Change::FileFinished
        } else if writing && !renamed {
            Change::Writing
        } else {
            Change::Partial
        })
    }

    fn matches(&self, changed: &Path) -> bool {
        let Some(name) = changed.file_name() else { return false };
        if name.to_str().is_some_and(|n| n.starts_with("..data")) {
            return true;
        }
        match &self.file_name {
            Some(f) => name == f.as_os_str(),
            None => {
                let n = name.to_string_lossy();
                !n.starts_with('.') && (n.ends_with(".yaml") || n.ends_with(".yml"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_that_never_rest_are_read_at_the_burst_limit() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let file = move |k: usize| root.join(format!("s{}.yaml", k % 4));
        let yaml =
            |k: usize| format!("version: 1\nclusters:\n  - name: c{}\n    connect_timeout: {}s\n", k % 4, 1 + k % 7);
        for k in 0..4 {
            std::fs::write(file(k), yaml(k)).unwrap();
        }
        let cache = Arc::new(SnapshotCache::default());
        let reloader = Arc::new(ConfigReloader::new(dir.path().to_path_buf(), cache, Arc::new(Metrics::default())));
        let watch = reloader.start_watch();
        assert!(matches!(reloader.reload("startup").await, ReloadOutcome::Applied { .. }));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(watch.run(shutdown.clone()));
        let mut changes = reloader.changes();
        changes.borrow_and_update();
        // A file written and closed every 5 ms for 1.5 s: never 20 ms of quiet.
        let writer = tokio::spawn(async move {
            for k in 4..304 {
                std::fs::write(file(k), yaml(k)).unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let mut reloads = 0;
        while !writer.is_finished() {
            if tokio::time::timeout(Duration::from_millis(50), changes.changed()).await.is_ok() {
                reloads += 1;
            }
        }
        shutdown.cancel();
        let _ = task.await;
        // One every BURST_LIMIT plus the reload: at least several while the writes went on.
        assert!(reloads >= 4, "{reloads} reloads in 1.5 s of writes");
    }

    #[test]
    fn the_removal_guard_counts_names_that_leave() {
        let config = |names: &[&str]| {
            let yaml: String = names
                .iter()
                .map(|n| format!("  - name: {n}\n    node_selector: {{ clusters: [{n}x] }}\n    connect_timeout: 1s\n  - name: {n}\n    connect_timeout: 1s\n"))
                .collect();
            let parsed =
                filterplane_config::load::parse_file(Path::new("t.yaml"), &format!("version: 1\nclusters:\n{yaml}"))
                    .unwrap();
            filterplane_config::compile(&[parsed]).unwrap()
        };
        let (old, new) = (config(&["a", "b", "c", "e"]), config(&["b", "d", "e", "f"]));
        let names = |removed: Vec<Key<'_>>| removed.iter().map(|(_, n)| n.to_string()).collect::<Vec<_>>();
        assert_eq!(served_names(&old.resources), 4, "two entries per name, counted once");
        assert_eq!(names(removed_names(&old.resources, &new.resources)), ["a", "c"]);
        assert!(removed_names(&old.resources, &old.resources).is_empty());
        assert_eq!(removed_names(&old.resources, &[]).len(), 4);
        // Sharing entries, as a reload's configs do: b's second entry and c replaced, one
        // more entry of e, c gone, g new.
        let mut shared = old.resources.clone();
        let others = config(&["b", "e", "g"]);
        shared[3] = others.resources[1].clone();
        shared.remove(4);
        shared.remove(4);
        shared.insert(5, others.resources[2].clone());
        shared.extend(others.resources[4..].iter().cloned());
        let listed: Vec<&str> = shared.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(listed, ["a", "a", "b", "b", "e", "e", "e", "g", "g"]);
        assert_eq!(names(removed_names(&old.resources, &shared)), ["c"]);
        assert_eq!(names(removed_names(&shared, &old.resources)), ["g"]);
    }

    #[test]
    fn only_changes_to_the_config_wake_the_reloader() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("filterplane.yaml");
        std::fs::write(&file, "").unwrap();
        let for_file = RelevantPaths::new(&file);
        assert!(for_file.matches(&file));
        assert!(for_file.matches(&dir.path().join("..data")), "ConfigMap symlink swap");
        assert!(!for_file.matches(&dir.path().join("filterplane.log")), "a log beside the config is not a change");
        assert!(!for_file.matches(&dir.path().join("other.yaml")));

        let for_dir = RelevantPaths::new(dir.path());
        assert!(for_dir.matches(&dir.path().join("other.yaml")) && for_dir.matches(&dir.path().join("b.yml")));
        assert!(!for_dir.matches(&dir.path().join(".other.yaml.swp")));
        assert!(!for_dir.matches(&dir.path().join("notes.txt")));
    }

    fn event(kind: EventKind, paths: &[&Path]) -> notify::Event {
        paths.iter().fold(notify::Event::new(kind), |e, p| e.add_path(p.to_path_buf()))
    }

    #[test]
    fn a_finished_write_reloads_at_once_and_one_in_progress_waits() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("filterplane.yaml");
        std::fs::write(&file, "").unwrap();
        let (closed, written) = (
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Content)),
        );
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        let for_file = RelevantPaths::new(&file);
        assert_eq!(for_file.classify(&event(written, &[&file])), Some(Change::Writing), "wait for the close");
        assert_eq!(for_file.classify(&event(closed, &[&file])), Some(Change::Complete));
        let swap = dir.path().join(".filterplane.yaml.tmp");
        assert_eq!(for_file.classify(&event(renamed, &[&swap, &file])), Some(Change::Complete), "editor's rename");
        assert_eq!(for_file.classify(&event(renamed, &[&file, &swap])), Some(Change::Partial), "renamed away");
        let opened = EventKind::Access(AccessKind::Open(notify::event::AccessMode::Any));
        assert_eq!(for_file.classify(&event(opened, &[&file])), None, "reads are not changes");
        assert_eq!(for_file.classify(&event(closed, &[&dir.path().join("x.log")])), None);

        // A directory: one file closed may be one of several; only the ConfigMap swap is whole.
        let for_dir = RelevantPaths::new(dir.path());
        assert_eq!(for_dir.classify(&event(closed, &[&file])), Some(Change::FileFinished));
        assert_eq!(for_dir.classify(&event(renamed, &[&swap, &file])), Some(Change::FileFinished));
        let (tmp, data) = (dir.path().join("..data_tmp"), dir.path().join("..data"));
        assert_eq!(
            for_dir.classify(&event(EventKind::Create(notify::event::CreateKind::Any), &[&tmp])),
            Some(Change::Partial)
        );
        assert_eq!(for_dir.classify(&event(written, &[&file])), Some(Change::Writing));
        let removed = EventKind::Remove(notify::event::RemoveKind::File);
        assert_eq!(for_dir.classify(&event(removed, &[&file])), Some(Change::Partial));
        assert_eq!(for_dir.classify(&event(renamed, &[&tmp, &data])), Some(Change::Complete));
        assert_eq!(Change::Complete.quiet_time(), SETTLE);
        assert_eq!(Change::Partial.quiet_time(), DEBOUNCE);
        assert_eq!(Change::FileFinished.quiet_time(), FILE_SETTLE);
        assert_eq!(Change::Writing.quiet_time(), WRITE_FALLBACK);
    }
}
