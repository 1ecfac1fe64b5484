//! Where rollout state lives between restarts: behind `RolloutStore`, so a shared store
//! (several replicas) can take the embedded one's place. The embedded one is redb, one
//! file in `--state-dir`.

use std::{path::Path, sync::Arc};

use base64::Engine;
use filterplane_api::{Any, ResourceType, ResourceVersion};
use filterplane_config::{compile::Origin, model::RolloutSpec, placement::Placement, CompiledResource, NodeSelector};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rollout state store: {0}")]
    Db(String),
    #[error("rollout state store: a stored record does not read: {0}")]
    Decode(String),
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
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
}

/// No store: state lives as long as the process (no `--state-dir`).
#[derive(Debug, Default)]
pub struct MemoryStore(std::sync::Mutex<StoredState>);

impl RolloutStore for MemoryStore {
    fn load(&self) -> Result<StoredState, StoreError> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    fn save(&self, state: &StoredState) -> Result<(), StoreError> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = state.clone();
        Ok(())
    }
}

const TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("rollouts");
const KEY: &str = "state";

/// redb in `DIR/rollouts.redb`.
#[derive(Debug)]
pub struct RedbStore {
    db: redb::Database,
}

impl RedbStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(db)?;
        Ok(Self { db: redb::Database::create(dir.join("rollouts.redb")).map_err(db)? })
    }
}

impl RolloutStore for RedbStore {
    fn load(&self) -> Result<StoredState, StoreError> {
        let read = self.db.begin_read().map_err(db)?;
        let table = match read.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(StoredState::default()),
            Err(e) => return Err(db(e)),
        };
        match table.get(KEY).map_err(db)? {
            Some(v) => serde_json::from_slice(v.value()).map_err(|e| StoreError::Decode(e.to_string())),
            None => Ok(StoredState::default()),
        }
    }

    fn save(&self, state: &StoredState) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(state).map_err(|e| StoreError::Decode(e.to_string()))?;
        let write = self.db.begin_write().map_err(db)?;
        {
            let mut table = write.open_table(TABLE).map_err(db)?;
            table.insert(KEY, bytes.as_slice()).map_err(db)?;
        }
        write.commit().map_err(db)
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
