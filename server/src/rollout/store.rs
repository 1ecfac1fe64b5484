//! Where rollout state lives between restarts: behind `RolloutStore`, so a shared store
//! (several replicas) can take the embedded one's place. The embedded one is redb, one
//! file in `--state-dir`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::Engine;
use filterplane_api::{Any, ResourceType, ResourceVersion};
use filterplane_config::{compile::Origin, model::RolloutSpec, placement::Placement, CompiledResource, NodeSelector};
use redb::TableHandle;
use serde::{Deserialize, Serialize};
use sha2::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rollout state store: {0}")]
    Db(String),
    #[error("rollout state store: a stored record does not read: {0}")]
    Decode(String),
    #[error("rollout state {} is in use by another process (another `filterplane serve` on this host?): give each its own --state-dir, or share state through --state-store", path.display())]
    InUse { path: PathBuf },
}

fn db_error<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Everything a restart needs to resume.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StoredState {
    pub entries: Vec<super::EntryState>,
    pub history: Vec<super::HistoryEntry>,
}

/// Keeps rollout state.
pub trait RolloutStore: Send + Sync + std::fmt::Debug {
    fn load(&self) -> Result<StoredState, StoreError>;
    fn save(&self, state: &StoredState) -> Result<(), StoreError>;
    /// State another replica wrote since this one last read or wrote (a shared store).
    fn load_if_changed(&self) -> Option<StoredState> {
        None
    }
    /// Something the operator should know about the store since start (shown with the
    /// rollouts).
    fn problem_at_start(&self) -> Option<String> {
        None
    }
}

/// No store: state lives as long as the process (the state directory is another
/// process's; the note says so).
#[derive(Debug, Default)]
pub struct MemoryStore(std::sync::Mutex<StoredState>, Option<String>);

impl MemoryStore {
    pub fn with_note(note: String) -> Self {
        Self(Default::default(), Some(note))
    }
}

impl RolloutStore for MemoryStore {
    fn problem_at_start(&self) -> Option<String> {
        self.1.clone()
    }
    fn load(&self) -> Result<StoredState, StoreError> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    fn save(&self, state: &StoredState) -> Result<(), StoreError> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = state.clone();
        Ok(())
    }
}

/// The table earlier versions kept the whole state in, as one row (`LEGACY_KEY`): read,
/// then replaced by rows.
const TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("rollouts");
const LEGACY_KEY: &str = "state";
/// Each row is a table of its own (one value, key ""): redb copies a whole leaf when any
/// of its values changes, so rows sharing a table would rewrite a large neighbour (an
/// entry holding an inline Wasm module) at every save of a small one.
const ROW_PREFIX: &str = "rollout-state/";
const HISTORY_KEY: &str = "history";
const ENTRY_PREFIX: &str = "entry/";

fn row_table(name: &str) -> redb::TableDefinition<'_, &'static str, &'static [u8]> {
    redb::TableDefinition::new(name)
}

/// Opens (or creates) the database file; tests put a failing disk under it.
pub type Opener = Box<dyn Fn(&Path) -> Result<redb::Database, redb::DatabaseError> + Send + Sync>;

/// redb in `DIR/rollouts.redb`, one row per entry and one for the history, each written
/// only when it changed. A save that fails (a full disk) drops the database handle, so
/// the next save opens it again: redb refuses every write after an I/O error until then.
pub struct RedbStore {
    path: PathBuf,
    open: Opener,
    db: Mutex<Option<redb::Database>>,
    /// Rows as last committed: a save writes only the ones that differ.
    written: Mutex<BTreeMap<String, Vec<u8>>>,
    /// What went wrong at start (an unreadable file moved aside), shown until a restart.
    at_start: Option<String>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl RedbStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, Box::new(|path| redb::Database::create(path)))
    }

    /// Opens the state in `dir`. A file another process holds is an error that says so;
    /// a file that does not read (truncated, corrupted) is moved aside, loudly, and the
    /// server starts without rollout state rather than not at all.
    pub fn open_with(dir: &Path, open: Opener) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(format!("{}: {e}", dir.display())))?;
        let path = dir.join("rollouts.redb");
        let mut at_start = None;
        let db = match open_checked(&open, &path) {
            Ok(db) => db,
            Err(Opened::InUse) => return Err(StoreError::InUse { path }),
            Err(Opened::Unreadable(why)) => {
                let secs =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let aside = path.with_extension(format!("redb.unreadable-{secs}"));
                std::fs::rename(&path, &aside)
                    .map_err(|e| StoreError::Db(format!("{}: {why}; moving it aside failed: {e}", path.display())))?;
                let message = format!(
                    "{} did not read ({why}); moved to {} and started without rollout state: rollouts in progress start over from the config",
                    path.display(),
                    aside.display()
                );
                tracing::error!("{message}");
                at_start = Some(message);
                match open_checked(&open, &path) {
                    Ok(db) => db,
                    Err(Opened::InUse) => return Err(StoreError::InUse { path }),
                    Err(Opened::Unreadable(why)) => return Err(StoreError::Db(format!("{}: {why}", path.display()))),
                }
            }
        };
        Ok(Self { path, open, db: Mutex::new(Some(db)), written: Mutex::default(), at_start })
    }

    /// Runs `f` on the database, opening it again first if a failure closed it.
    fn with_db<T>(&self, f: impl FnOnce(&redb::Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        if db.is_none() {
            *db = Some(match open_checked(&self.open, &self.path) {
                Ok(d) => d,
                Err(Opened::InUse) => return Err(StoreError::InUse { path: self.path.clone() }),
                Err(Opened::Unreadable(why)) => return Err(StoreError::Db(format!("{}: {why}", self.path.display()))),
            });
        }
        let result = f(db.as_ref().ok_or_else(|| StoreError::Db("closed".into()))?);
        if result.is_err() {
            // redb answers every later write with "previous I/O error" until reopened.
            *db = None;
        }
        result
    }
}

enum Opened {
    InUse,
    Unreadable(String),
}

/// Opens the file; a panic in redb on a damaged file counts as unreadable, not a crash.
fn open_checked(open: &Opener, path: &Path) -> Result<redb::Database, Opened> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open(path))) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(Opened::InUse),
        Ok(Err(e)) => Err(Opened::Unreadable(e.to_string())),
        Err(_) => Err(Opened::Unreadable("the database library could not read it".into())),
    }
}

/// The rows `state` is written as.
fn rows(state: &StoredState) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
    fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(v).map_err(|e| StoreError::Decode(e.to_string()))
    }
    let mut rows = BTreeMap::new();
    for e in &state.entries {
        // Named by a digest of the entry's key, so a table name stays short.
        let digest = sha2::Sha256::digest(format!("{}\0{:?}", e.name, e.selector).as_bytes());
        rows.insert(format!("{ROW_PREFIX}{ENTRY_PREFIX}{}", hex::encode(&digest[..12])), json(e)?);
    }
    rows.insert(format!("{ROW_PREFIX}{HISTORY_KEY}"), json(&state.history)?);
    Ok(rows)
}

impl RolloutStore for RedbStore {
    fn load(&self) -> Result<StoredState, StoreError> {
        let decode =
            |what: &str, e: serde_json::Error| StoreError::Decode(format!("{}: {what}: {e}", self.path.display()));
        let (state, rows) = self.with_db(|db| {
            let read = db.begin_read().map_err(db_error)?;
            let mut state = StoredState::default();
            let mut rows = BTreeMap::new();
            match read.open_table(TABLE) {
                Ok(t) => {
                    if let Some(v) = t.get(LEGACY_KEY).map_err(db_error)? {
                        let old: StoredState = serde_json::from_slice(v.value()).map_err(|e| decode(LEGACY_KEY, e))?;
                        state = old;
                        // Not a row: the next save writes rows and drops the table.
                        rows.insert(LEGACY_KEY.to_owned(), Vec::new());
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(db_error(e)),
            }
            for handle in read.list_tables().map_err(db_error)? {
                let name = handle.name().to_owned();
                let Some(key) = name.strip_prefix(ROW_PREFIX) else { continue };
                let table = read.open_table(row_table(&name)).map_err(db_error)?;
                let Some(v) = table.get("").map_err(db_error)? else { continue };
                let value = v.value().to_vec();
                if key == HISTORY_KEY {
                    state.history = serde_json::from_slice(&value).map_err(|e| decode(key, e))?;
                } else {
                    state.entries.push(serde_json::from_slice(&value).map_err(|e| decode(key, e))?);
                }
                rows.insert(name, value);
            }
            Ok((state, rows))
        })?;
        *self.written.lock().unwrap_or_else(|p| p.into_inner()) = rows;
        Ok(state)
    }

    fn save(&self, state: &StoredState) -> Result<(), StoreError> {
        let rows = rows(state)?;
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let changed: Vec<(&String, &Vec<u8>)> = rows.iter().filter(|(k, v)| written.get(*k) != Some(*v)).collect();
        let gone: Vec<&String> = written.keys().filter(|k| !rows.contains_key(*k)).collect();
        if changed.is_empty() && gone.is_empty() {
            return Ok(());
        }
        self.with_db(|db| {
            let write = db.begin_write().map_err(db_error)?;
            for (k, v) in &changed {
                write.open_table(row_table(k)).map_err(db_error)?.insert("", v.as_slice()).map_err(db_error)?;
            }
            for k in &gone {
                if k.as_str() == LEGACY_KEY {
                    write.delete_table(TABLE).map_err(db_error)?;
                } else {
                    write.delete_table(row_table(k)).map_err(db_error)?;
                }
            }
            write.commit().map_err(db_error)
        })?;
        *written = rows;
        Ok(())
    }

    fn problem_at_start(&self) -> Option<String> {
        self.at_start.clone()
    }
}

/// A compiled extension config as stored: what it takes to serve it again after a
/// restart, without its YAML or a fetch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredResource {
    pub name: String,
    pub selector: NodeSelector,
    pub type_url: String,
    /// The encoded resource, base64.
    pub value: String,
    pub inner_type_url: String,
    pub version: String,
    pub origin: Origin,
    pub placement: Option<Placement>,
    pub wasm_sha256: Option<String>,
    pub envoy_fetches_code: bool,
    pub central_shas: Vec<String>,
    pub rollout: Option<RolloutSpec>,
}

impl From<&CompiledResource> for StoredResource {
    fn from(r: &CompiledResource) -> Self {
        StoredResource {
            name: r.name.clone(),
            selector: r.selector.clone(),
            type_url: r.resource.type_url.clone(),
            value: base64::engine::general_purpose::STANDARD.encode(&r.resource.value),
            inner_type_url: r.inner_type_url.clone(),
            version: r.version.to_string(),
            origin: r.origin.clone(),
            placement: r.placement.as_deref().cloned(),
            wasm_sha256: r.wasm_sha256.clone(),
            envoy_fetches_code: r.envoy_fetches_code,
            central_shas: r.central_shas.clone(),
            rollout: r.rollout.clone(),
        }
    }
}

impl StoredResource {
    pub fn to_compiled(&self) -> Result<CompiledResource, StoreError> {
        let bad = |what: &str| StoreError::Decode(format!("{}: {what}", self.name));
        Ok(CompiledResource {
            resource_type: ResourceType::ExtensionConfig,
            name: self.name.clone(),
            selector: self.selector.clone(),
            resource: Any {
                type_url: self.type_url.clone(),
                value: base64::engine::general_purpose::STANDARD.decode(&self.value).map_err(|_| bad("value"))?,
            },
            inner_type_url: self.inner_type_url.clone(),
            version: ResourceVersion::parse(&self.version).ok_or_else(|| bad("version"))?,
            origin: self.origin.clone(),
            placement: self.placement.clone().map(Arc::new),
            listener_json: None,
            wasm_sha256: self.wasm_sha256.clone(),
            envoy_fetches_code: self.envoy_fetches_code,
            central_wasm: None,
            central_shas: self.central_shas.clone(),
            rollout: self.rollout.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::*;
    use crate::rollout::{EntryState, HistoryEntry};

    /// A real file under redb, whose writes can be made to fail as on a full disk, and
    /// which counts what is written.
    #[derive(Debug)]
    struct Disk {
        file: redb::backends::FileBackend,
        full: Arc<AtomicBool>,
        written: Arc<AtomicU64>,
    }

    impl redb::StorageBackend for Disk {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.file.len()
        }
        fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
            self.file.read(offset, len)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            if self.full.load(Ordering::Relaxed) && len > self.file.len()? {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            self.file.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> Result<(), std::io::Error> {
            self.file.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            if self.full.load(Ordering::Relaxed) {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
            self.file.write(offset, data)
        }
    }

    fn store_on_disk(dir: &Path) -> (RedbStore, Arc<AtomicBool>, Arc<AtomicU64>) {
        let (full, written) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (f, w) = (full.clone(), written.clone());
        let open: Opener = Box::new(move |path| {
            let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
            let disk = Disk { file: redb::backends::FileBackend::new(file)?, full: f.clone(), written: w.clone() };
            redb::Builder::new().create_with_backend(disk)
        });
        (RedbStore::open_with(dir, open).unwrap(), full, written)
    }

    fn entry(name: &str) -> EntryState {
        EntryState { name: name.into(), selector: NodeSelector::default(), last_completed: None, active: None }
    }

    fn history(n: usize) -> Vec<HistoryEntry> {
        (0..n)
            .map(|i| HistoryEntry {
                name: "a".into(),
                from_version: None,
                to_version: format!("v{i}"),
                outcome: "rolled_back".into(),
                started_at: String::new(),
                ended_at: String::new(),
                failures: Vec::new(),
                failure_count: 400,
            })
            .collect()
    }

    #[test]
    fn a_save_writes_only_what_changed() {
        // Issue 20: every save rewrote the whole state (a 540 MB file after 40 edits).
        let dir = tempfile::tempdir().unwrap();
        let (store, _, written) = store_on_disk(dir.path());
        let big = entry(&"b".repeat(1 << 20));
        store.save(&StoredState { entries: vec![big.clone(), entry("small")], history: history(1) }).unwrap();
        let first = written.swap(0, Ordering::Relaxed);
        assert!(first > 1 << 20, "{first}");
        for n in 2..42 {
            store.save(&StoredState { entries: vec![big.clone(), entry("small")], history: history(n) }).unwrap();
        }
        let later = written.load(Ordering::Relaxed) / 40;
        println!("bytes written: first save {first}, then {later} per save that changed only the history");
        assert!(later < 200 << 10, "a save that changed only the history wrote {later} bytes");
        let back = store.load().unwrap();
        assert_eq!((back.entries.len(), back.history.len()), (2, 41));
        // An entry that went is removed.
        store.save(&StoredState { entries: vec![entry("small")], history: history(1) }).unwrap();
        assert_eq!(store.load().unwrap().entries, vec![entry("small")]);
    }

    #[test]
    fn saves_recover_by_themselves_once_the_disk_has_room() {
        let dir = tempfile::tempdir().unwrap();
        let (store, full, _) = store_on_disk(dir.path());
        store.save(&StoredState { entries: vec![entry("a")], history: history(1) }).unwrap();
        full.store(true, Ordering::Relaxed);
        let state = StoredState { entries: vec![entry("a"), entry(&"x".repeat(100_000))], history: history(2) };
        assert!(store.save(&state).is_err(), "the disk is full");
        assert!(store.save(&state).is_err(), "still full");
        full.store(false, Ordering::Relaxed);
        // Before, every save after the first failure failed until a restart.
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
        drop(store);
        let (again, _, _) = store_on_disk(dir.path());
        assert_eq!(again.load().unwrap(), state, "and it is on disk");
    }

    #[test]
    fn an_unreadable_file_is_moved_aside_and_the_server_starts_without_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            store.save(&StoredState { entries: vec![entry("a")], history: history(3) }).unwrap();
        }
        // Truncated (a crash during a copy, a full disk at the wrong moment).
        let path = dir.path().join("rollouts.redb");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
        let store = RedbStore::open(dir.path()).expect("starts");
        let note = store.problem_at_start().expect("says so");
        assert!(note.contains("rollouts.redb") && note.contains("moved to"), "{note}");
        assert_eq!(store.load().unwrap(), StoredState::default());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("rollouts.redb.unreadable-"))
            .collect();
        assert_eq!(aside.len(), 1, "the damaged file is kept for a look");
        // Garbage, too.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("rollouts.redb"), b"not a database at all").unwrap();
        assert!(RedbStore::open(other.path()).unwrap().problem_at_start().is_some());
    }

    #[test]
    fn a_state_directory_in_use_is_named_with_the_flag_to_change() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RedbStore::open(dir.path()).unwrap();
        let e = RedbStore::open(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::InUse { .. }));
        let text = e.to_string();
        assert!(text.contains("rollouts.redb") && text.contains("--state-dir"), "{text}");
    }

    #[test]
    fn the_single_row_of_earlier_versions_is_read() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = redb::Database::create(dir.path().join("rollouts.redb")).unwrap();
            let w = db.begin_write().unwrap();
            {
                let mut t = w.open_table(TABLE).unwrap();
                let old = StoredState { entries: vec![entry("a")], history: history(2) };
                t.insert(LEGACY_KEY, serde_json::to_vec(&old).unwrap().as_slice()).unwrap();
            }
            w.commit().unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        let state = store.load().unwrap();
        assert_eq!((state.entries.len(), state.history.len()), (1, 2));
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state, "rewritten as rows, the old one gone");
    }
}
