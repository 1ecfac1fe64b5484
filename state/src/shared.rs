//! Rows in etcd, for several replicas: one key holds them all, written with
//! compare-and-swap on its revision, so a replica that wrote on stale state learns of
//! the newer one and merges it before it writes again.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::{
    etcd::{Etcd, EtcdError},
    store::{Rows, Store, StoreError, LEGACY_KEY},
};

/// Reports whether etcd answered (`None`) or why not.
pub type Reachability = Arc<dyn Fn(Option<String>) + Send + Sync>;

/// A facade over a background task, since the callers are synchronous: `save` hands the
/// rows to the task, which writes them with compare-and-swap; `load_if_changed` returns
/// what another replica wrote.
#[derive(Debug)]
pub struct EtcdStore {
    shared: Arc<Mutex<StoreShared>>,
    wake: Arc<tokio::sync::Notify>,
}

#[derive(Debug, Default)]
struct StoreShared {
    initial: Rows,
    /// Written by another replica, not read yet.
    unseen: Option<Rows>,
    /// To write.
    pending: Option<Rows>,
    /// The revision of the key as last read or written.
    revision: i64,
}

/// The value of the key: the rows as one JSON object (a row's bytes are JSON). A value
/// as earlier versions wrote it (the whole rollout state, one JSON document) reads as the
/// legacy row.
fn encode(rows: &Rows) -> Result<Vec<u8>, String> {
    let mut object = serde_json::Map::new();
    for (k, v) in rows {
        let value: serde_json::Value = serde_json::from_slice(v).map_err(|e| format!("row {k}: {e}"))?;
        object.insert(k.clone(), value);
    }
    serde_json::to_vec(&serde_json::json!({ "rows": object })).map_err(|e| e.to_string())
}

fn decode(bytes: &[u8]) -> Result<Rows, String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    match value.get("rows").and_then(|r| r.as_object()) {
        Some(rows) => {
            rows.iter().map(|(k, v)| serde_json::to_vec(v).map(|b| (k.clone(), b)).map_err(|e| e.to_string())).collect()
        }
        None => Ok([(LEGACY_KEY.to_owned(), bytes.to_vec())].into()),
    }
}

impl EtcdStore {
    /// Reads `key`, then keeps it in step in the background until `shutdown`.
    pub async fn open(
        etcd: Etcd,
        key: String,
        reachability: Reachability,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let (value, revision) = etcd.get(&key).await.map_err(|e| StoreError::Db(e.to_string()))?;
        let initial = match value {
            Some(v) => decode(&v).map_err(|e| StoreError::Decode(format!("etcd key {key}: {e}")))?,
            None => Rows::default(),
        };
        let shared = Arc::new(Mutex::new(StoreShared { initial, revision, ..Default::default() }));
        let wake = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(sync_loop(etcd, key, shared.clone(), wake.clone(), reachability, shutdown));
        Ok(Self { shared, wake })
    }
}

async fn sync_loop(
    etcd: Etcd,
    key: String,
    shared: Arc<Mutex<StoreShared>>,
    wake: Arc<tokio::sync::Notify>,
    reachability: Reachability,
    shutdown: CancellationToken,
) {
    let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let (pending, revision) = {
            let s = lock();
            (s.pending.clone(), s.revision)
        };
        let result = async {
            if let Some(rows) = pending {
                let body = encode(&rows)?;
                match etcd.put_if(&key, revision, body, 0).await.map_err(|e: EtcdError| e.to_string())? {
                    Some(rev) => {
                        let mut s = lock();
                        s.revision = rev;
                        // (A newer save may have come meanwhile: it goes next turn.)
                        if s.pending.as_ref() == Some(&rows) {
                            s.pending = None;
                        }
                        return Ok(());
                    }
                    None => {
                        // Someone else wrote first: theirs is read below, and the caller
                        // merges it with what it has before it saves again.
                        lock().pending = None;
                        tracing::info!("the state changed in etcd meanwhile; reading it");
                    }
                }
            }
            let (value, rev) = etcd.get(&key).await.map_err(|e| e.to_string())?;
            let mut s = lock();
            if rev != s.revision {
                s.revision = rev;
                if let Some(v) = value {
                    match decode(&v) {
                        Ok(rows) => s.unseen = Some(rows),
                        Err(e) => tracing::error!(key = %key, error = %e, "the state in etcd does not read; ignored"),
                    }
                }
            }
            Ok::<(), String>(())
        }
        .await;
        if let Err(e) = result {
            reachability(Some(e));
        }
    }
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Rows, StoreError> {
        Ok(self.shared.lock().unwrap_or_else(|p| p.into_inner()).initial.clone())
    }

    fn save(&self, rows: &Rows) -> Result<(), StoreError> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).pending = Some(rows.clone());
        self.wake.notify_one();
        Ok(())
    }

    fn load_if_changed(&self) -> Option<Rows> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).unseen.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_the_earlier_single_document_reads_as_the_legacy_row() {
        let rows: Rows = [
            ("rollout-state/history".to_owned(), b"[]".to_vec()),
            ("rollout-state/entry/ab".to_owned(), br#"{"name":"a"}"#.to_vec()),
        ]
        .into();
        assert_eq!(decode(&encode(&rows).unwrap()).unwrap(), rows);
        let earlier = br#"{"entries":[],"history":[]}"#;
        assert_eq!(decode(earlier).unwrap(), [(LEGACY_KEY.to_owned(), earlier.to_vec())].into());
        assert!(decode(b"not json").is_err());
    }
}
