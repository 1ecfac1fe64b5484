//! The content-addressed module cache on disk: `sha256/<hex>.wasm`, plus what each OCI
//! tag last resolved to (`refs/<hash of the reference>`). It survives restarts; its
//! size is bounded, least recently used modules go first, and modules being served are
//! never evicted.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::metrics::WasmMetrics;

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    last_used: SystemTime,
}

#[derive(Debug)]
pub struct WasmModuleCache {
    dir: PathBuf,
    max_bytes: u64,
    entries: Mutex<HashMap<String, Entry>>,
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl WasmModuleCache {
    /// Opens (creating) the cache in `dir`, indexing what an earlier run left there.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("sha256"))?;
        std::fs::create_dir_all(dir.join("refs"))?;
        let mut entries = HashMap::new();
        for e in std::fs::read_dir(dir.join("sha256"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".wasm") else { continue };
            let meta = e.metadata()?;
            entries.insert(
                hex.to_owned(),
                Entry { size: meta.len(), last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH) },
            );
        }
        Ok(Self { dir: dir.to_path_buf(), max_bytes, entries: Mutex::new(entries) })
    }

    fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join("sha256").join(format!("{sha256}.wasm"))
    }

    /// Where the module with this SHA-256 is stored, if it is (for serving it).
    pub fn file(&self, sha256: &str) -> Option<PathBuf> {
        let known = self.entries.lock().unwrap_or_else(|p| p.into_inner()).contains_key(sha256);
        known.then(|| self.path_of(sha256))
    }

    /// The module, if cached; counts a hit or a miss. The bytes are checked against
    /// their name, so a corrupted file is a miss (and is dropped).
    pub fn get(&self, sha256: &str, metrics: &WasmMetrics) -> Option<Bytes> {
        let found = self.file(sha256).and_then(|p| std::fs::read(p).ok()).filter(|b| sha256_hex(b) == sha256);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match found {
            Some(bytes) => {
                metrics.cache_lookup("hit");
                if let Some(e) = entries.get_mut(sha256) {
                    e.last_used = SystemTime::now();
                }
                // Recency survives restarts through the file's mtime.
                let _ = std::fs::File::options()
                    .append(true)
                    .open(self.path_of(sha256))
                    .and_then(|f| f.set_modified(SystemTime::now()));
                Some(Bytes::from(bytes))
            }
            None => {
                metrics.cache_lookup("miss");
                if entries.remove(sha256).is_some() {
                    let _ = std::fs::remove_file(self.path_of(sha256));
                }
                None
            }
        }
    }

    /// Stores a module under its SHA-256 (written to a temp file, then renamed, so a
    /// crash never leaves a half module under a valid name). Returns the SHA-256.
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<String> {
        let sha = sha256_hex(bytes);
        let tmp = self.dir.join("sha256").join(format!(".{sha}.tmp"));
        // A failed write (a full disk) leaves no partial file behind.
        if let Err(e) = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, self.path_of(&sha))) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha.clone(), Entry { size: bytes.len() as u64, last_used: SystemTime::now() });
        Ok(sha)
    }

    /// Evicts least recently used modules until the cache fits its bound, sparing
    /// `pinned` (modules being served). Returns the SHA-256s evicted.
    pub fn evict(&self, pinned: &HashSet<String>) -> Vec<String> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut total: u64 = entries.values().map(|e| e.size).sum();
        let mut by_age: Vec<(String, Entry)> = entries.iter().map(|(k, e)| (k.clone(), *e)).collect();
        by_age.sort_by_key(|(_, e)| e.last_used);
        let mut evicted = Vec::new();
        for (sha, e) in by_age {
            if total <= self.max_bytes {
                break;
            }
            if pinned.contains(&sha) {
                continue;
            }
            entries.remove(&sha);
            let _ = std::fs::remove_file(self.path_of(&sha));
            total -= e.size;
            evicted.push(sha);
        }
        evicted
    }

    /// (entries, bytes) now held.
    pub fn usage(&self) -> (u64, u64) {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        (entries.len() as u64, entries.values().map(|e| e.size).sum())
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        self.dir.join("refs").join(sha256_hex(reference.as_bytes()))
    }

    /// What `reference` (an OCI tag) resolved to last time: (manifest digest, module SHA-256).
    pub fn resolved(&self, reference: &str) -> Option<(String, String)> {
        let text = std::fs::read_to_string(self.ref_path(reference)).ok()?;
        let (digest, sha) = text.trim().split_once(' ')?;
        Some((digest.to_owned(), sha.to_owned()))
    }

    pub fn set_resolved(&self, reference: &str, digest: &str, sha256: &str) -> std::io::Result<()> {
        std::fs::write(self.ref_path(reference), format!("{digest} {sha256}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = WasmModuleCache::open(dir.path(), 1 << 20).unwrap();
        let bytes = b"\0asm module";
        // The module's place is taken by a non-empty directory: the rename fails, as a
        // full disk fails the write.
        let target = cache.path_of(&sha256_hex(bytes));
        std::fs::create_dir_all(target.join("x")).unwrap();
        assert!(cache.put(bytes).is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("sha256"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn lru_eviction_spares_pinned_modules_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = WasmMetrics::default();
        let cache = WasmModuleCache::open(dir.path(), 25).unwrap();
        let a = cache.put(&[1u8; 10]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = cache.put(&[2u8; 10]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let c = cache.put(&[3u8; 10]).unwrap();
        // a is the oldest, but pinned: b goes.
        assert_eq!(cache.evict(&[a.clone()].into()), std::slice::from_ref(&b));
        assert_eq!(cache.usage(), (2, 20));
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(cache.get(&a, &m).is_some(), "a used now: c is the least recently used");
        let d = cache.put(&[4u8; 10]).unwrap();
        assert_eq!(cache.evict(&HashSet::new()), [c]);
        assert!(cache.get(&b, &m).is_none());

        let reopened = WasmModuleCache::open(dir.path(), 25).unwrap();
        assert_eq!(reopened.usage(), (2, 20));
        assert_eq!(reopened.get(&d, &m).as_deref(), Some(&[4u8; 10][..]));
        let text = m.render();
        assert!(text.contains("filterplane_wasm_cache_lookups_total{result=\"hit\"} 2"), "{text}");
        assert!(text.contains("filterplane_wasm_cache_lookups_total{result=\"miss\"} 1"), "{text}");
    }

    #[test]
    fn corrupted_file_is_a_miss_and_refs_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = WasmMetrics::default();
        let cache = WasmModuleCache::open(dir.path(), 1 << 20).unwrap();
        let a = cache.put(b"module").unwrap();
        std::fs::write(dir.path().join("sha256").join(format!("{a}.wasm")), b"tampered").unwrap();
        assert!(cache.get(&a, &m).is_none());
        assert_eq!(cache.usage(), (0, 0));
        assert!(cache.resolved("r/x:v1").is_none());
        cache.set_resolved("r/x:v1", "sha256:abc", &a).unwrap();
        assert_eq!(cache.resolved("r/x:v1"), Some(("sha256:abc".into(), a)));
    }
}
