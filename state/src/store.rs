//! Bytes between restarts: rows (name → bytes) behind one `Store` trait, so a shared
//! store (etcd, several replicas) can take the embedded one's place. The embedded one is
//! redb, one file in `--state-dir`, one table per row, each written only when it changed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use redb::TableHandle;

/// What a store holds: rows by name.
pub type Rows = BTreeMap<String, Vec<u8>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Db(String),
    #[error("state store: a stored record does not read: {0}")]
    Decode(String),
    #[error("rollout state {} is in use by another process (another `filterplane serve` on this host?): give each its own --state-dir, or share state through --state-store", path.display())]
    InUse { path: PathBuf },
}

fn db_error<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Keeps rows.
pub trait Store: Send + Sync + std::fmt::Debug {
    fn load(&self) -> Result<Rows, StoreError>;
    /// Makes the store hold `rows` (and no other row).
    fn save(&self, rows: &Rows) -> Result<(), StoreError>;
    /// Rows another replica wrote since this one last read or wrote (a shared store).
    fn load_if_changed(&self) -> Option<Rows> {
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
pub struct MemoryStore(std::sync::Mutex<Rows>, Option<String>);

impl MemoryStore {
    pub fn with_note(note: String) -> Self {
        Self(Default::default(), Some(note))
    }
}

impl Store for MemoryStore {
    fn problem_at_start(&self) -> Option<String> {
        self.1.clone()
    }
    fn load(&self) -> Result<Rows, StoreError> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    fn save(&self, rows: &Rows) -> Result<(), StoreError> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = rows.clone();
        Ok(())
    }
}

/// The table earlier versions kept the whole state in, as one value under `LEGACY_KEY`:
/// read as the row of that name; a save without that row drops the table.
const TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("rollouts");
pub const LEGACY_KEY: &str = "state";

fn row_table(name: &str) -> redb::TableDefinition<'_, &'static str, &'static [u8]> {
    redb::TableDefinition::new(name)
}

/// Opens (or creates) the database file; tests put a failing disk under it.
pub type Opener = Box<dyn Fn(&Path) -> Result<redb::Database, redb::DatabaseError> + Send + Sync>;

/// redb in `DIR/rollouts.redb`, each row written only when it changed. A save that fails (a full disk) drops the database handle, so
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

/// Each row is a table of its own (one value, key ""): redb copies a whole leaf when any
/// of its values changes, so rows sharing a table would rewrite a large neighbour (an
/// entry holding an inline Wasm module) at every save of a small one.
impl Store for RedbStore {
    fn load(&self) -> Result<Rows, StoreError> {
        let rows = self.with_db(|db| {
            let read = db.begin_read().map_err(db_error)?;
            let mut rows = BTreeMap::new();
            match read.open_table(TABLE) {
                Ok(t) => {
                    if let Some(v) = t.get(LEGACY_KEY).map_err(db_error)? {
                        rows.insert(LEGACY_KEY.to_owned(), v.value().to_vec());
                    }
                }
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(db_error(e)),
            }
            for handle in read.list_tables().map_err(db_error)? {
                let name = handle.name().to_owned();
                if name == TABLE.name() {
                    continue;
                }
                let table = read.open_table(row_table(&name)).map_err(db_error)?;
                let Some(v) = table.get("").map_err(db_error)? else { continue };
                rows.insert(name, v.value().to_vec());
            }
            Ok(rows)
        })?;
        *self.written.lock().unwrap_or_else(|p| p.into_inner()) = rows.clone();
        Ok(rows)
    }

    fn save(&self, rows: &Rows) -> Result<(), StoreError> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let changed: Vec<(&String, &Vec<u8>)> = rows.iter().filter(|(k, v)| written.get(*k) != Some(*v)).collect();
        let gone: Vec<&String> = written.keys().filter(|k| !rows.contains_key(*k)).collect();
        if changed.is_empty() && gone.is_empty() {
            return Ok(());
        }
        self.with_db(|db| {
            let write = db.begin_write().map_err(db_error)?;
            for (k, v) in &changed {
                if k.as_str() == LEGACY_KEY {
                    write.open_table(TABLE).map_err(db_error)?.insert(LEGACY_KEY, v.as_slice()).map_err(db_error)?;
                } else {
                    write.open_table(row_table(k)).map_err(db_error)?.insert("", v.as_slice()).map_err(db_error)?;
                }
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
        *written = rows.clone();
        Ok(())
    }

    fn problem_at_start(&self) -> Option<String> {
        self.at_start.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    };

    use super::*;

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

    /// The rows of a state with these entries (each row as large as its name) and a
    /// history of `history` records (about as large as the rollout history's).
    fn rows(entries: &[&str], history: usize) -> Rows {
        let mut rows: Rows = entries
            .iter()
            .map(|e| (format!("rollout-state/entry/{}-{}", &e[..e.len().min(8)], e.len()), e.as_bytes().to_vec()))
            .collect();
        rows.insert("rollout-state/history".into(), vec![b'h'; history * 150]);
        rows
    }

    fn entries(rows: &Rows) -> usize {
        rows.keys().filter(|k| k.contains("/entry/")).count()
    }

    fn history_len(rows: &Rows) -> usize {
        rows.get("rollout-state/history").map_or(0, |h| h.len() / 150)
    }

    #[test]
    fn a_save_writes_only_what_changed() {
        // Issue 20: every save rewrote the whole state (a 540 MB file after 40 edits).
        let dir = tempfile::tempdir().unwrap();
        let (store, _, written) = store_on_disk(dir.path());
        let big = "b".repeat(1 << 20);
        store.save(&rows(&[&big, "small"], 1)).unwrap();
        let first = written.swap(0, Ordering::Relaxed);
        assert!(first > 1 << 20, "{first}");
        for n in 2..42 {
            store.save(&rows(&[&big, "small"], n)).unwrap();
        }
        let later = written.load(Ordering::Relaxed) / 40;
        println!("bytes written: first save {first}, then {later} per save that changed only the history");
        assert!(later < 200 << 10, "a save that changed only the history wrote {later} bytes");
        let back = store.load().unwrap();
        assert_eq!((entries(&back), history_len(&back)), (2, 41));
        // An entry that went is removed.
        store.save(&rows(&["small"], 1)).unwrap();
        assert_eq!(store.load().unwrap(), rows(&["small"], 1));
    }

    #[test]
    fn saves_recover_by_themselves_once_the_disk_has_room() {
        let dir = tempfile::tempdir().unwrap();
        let (store, full, _) = store_on_disk(dir.path());
        store.save(&rows(&["a"], 1)).unwrap();
        full.store(true, Ordering::Relaxed);
        let state = rows(&["a", &"x".repeat(100_000)], 2);
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
            store.save(&rows(&["a"], 3)).unwrap();
        }
        // Truncated (a crash during a copy, a full disk at the wrong moment).
        let path = dir.path().join("rollouts.redb");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
        let store = RedbStore::open(dir.path()).expect("starts");
        let note = store.problem_at_start().expect("says so");
        assert!(note.contains("rollouts.redb") && note.contains("moved to"), "{note}");
        assert_eq!(store.load().unwrap(), Rows::default());
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
                t.insert(LEGACY_KEY, b"the whole state, as earlier versions wrote it".as_slice()).unwrap();
            }
            w.commit().unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        let state = store.load().unwrap();
        assert_eq!(
            state.get(LEGACY_KEY).map(Vec::as_slice),
            Some(&b"the whole state, as earlier versions wrote it"[..])
        );
        // The caller reads it and saves its rows: the old table goes.
        store.save(&rows(&["a"], 2)).unwrap();
        assert_eq!(store.load().unwrap(), rows(&["a"], 2), "rewritten as rows, the old one gone");
        drop(store);
        let reopened = RedbStore::open(dir.path()).unwrap();
        assert!(!reopened.load().unwrap().contains_key(LEGACY_KEY));
    }
}
