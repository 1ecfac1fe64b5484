//! Rollout state as it is kept and shown: each entry's rollout, the history, and their
//! stored form (rows of JSON, so a store writes only the rows that changed).

use std::{collections::BTreeMap, sync::Arc};

use base64::Engine as _;
use filterplane_api::{Any, ResourceType, ResourceVersion};
use filterplane_config::{
    compile::Origin,
    model::{OnFailure, RolloutSpec},
    placement::Placement,
    CompiledResource, NodeSelector,
};
use serde::{Deserialize, Serialize};
use sha2::Digest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Paused,
    /// Failed: NACKs over `max_nacks`, ACK timeouts, or aborted by an operator. Stays so
    /// until the entry is edited.
    Failed,
}

/// A proxy that failed the new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub node_id: String,
    /// Envoy's message, or why it counts as failed.
    pub message: String,
}

/// Failing proxies a rollout keeps as examples (it counts them all): 400 NACKing proxies
/// with 4 KiB messages kept whole made a 67 MB rollouts view and a 540 MB state file.
pub const FAILURE_EXAMPLES: usize = 10;
/// An example's message, cut to this.
pub const FAILURE_MESSAGE_BYTES: usize = 1024;

/// The proxies that failed a step: how many, and the first few.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Failures {
    pub(crate) count: usize,
    pub(crate) examples: Vec<Failure>,
}

impl Failures {
    pub(crate) fn push(&mut self, node_id: impl FnOnce() -> String, message: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < FAILURE_EXAMPLES {
            let message = filterplane_xds::stream::truncated(&message(), FAILURE_MESSAGE_BYTES);
            self.examples.push(Failure { node_id: node_id(), message });
        }
    }
}

/// A rollout in progress (or failed and waiting for an edit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Active {
    pub spec: RolloutSpec,
    pub new: StoredResource,
    /// Index into `spec.steps`.
    pub step: usize,
    pub threshold: Option<u64>,
    pub started_ms: u64,
    pub step_started_ms: u64,
    pub status: Status,
    /// The first `FAILURE_EXAMPLES` failing proxies.
    pub failures: Vec<Failure>,
    /// Failing proxies in all.
    #[serde(default)]
    pub failure_count: usize,
    /// Why it failed (`on_failure` taken, or aborted).
    pub reason: Option<String>,
    /// The new versions of rollouts this one superseded, newest first, with the
    /// thresholds they had reached: proxies not on this rollout's version keep those.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub carried: Vec<Carried>,
    /// With `baseline_margin`: the last baseline measured (the proxies not on the new
    /// version, over the step that completed last), for the last step, which has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
}

/// The old version's figures over a completed step, kept for the steps that follow.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub requests: f64,
    pub errors_5xx: f64,
    pub proxies: usize,
}

/// A superseded rollout's version, still run by the proxies its threshold covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Carried {
    pub threshold: u64,
    pub version: StoredResource,
}

impl Active {
    /// The current step's percent (a spec edited to fewer steps ends at 100).
    pub(crate) fn percent(&self) -> u8 {
        self.spec.steps.get(self.step).copied().unwrap_or(100)
    }

    pub(crate) fn last_step(&self) -> bool {
        self.step + 1 >= self.spec.steps.len()
    }
}

/// One entry's rollout state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryState {
    pub name: String,
    pub selector: NodeSelector,
    pub last_completed: Option<StoredResource>,
    pub active: Option<Active>,
}

/// A past rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub name: String,
    pub from_version: Option<String>,
    pub to_version: String,
    /// `completed`, `promoted`, `rolled_back`, `halted`, `aborted`, `superseded`, `reverted`.
    pub outcome: String,
    pub started_at: String,
    pub ended_at: String,
    /// The first `FAILURE_EXAMPLES` failing proxies, and how many in all.
    pub failures: Vec<Failure>,
    #[serde(default)]
    pub failure_count: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActionError {
    #[error("no rollout of {0:?} is in progress")]
    NoRollout(String),
    #[error("the rollout of {0:?} failed; edit the entry to start a new one")]
    Failed(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutView {
    pub name: String,
    pub selector: NodeSelector,
    pub status: Status,
    pub steps: Vec<u8>,
    pub step: usize,
    /// Percent of the matching proxies meant to be on the new version now.
    pub percent: u8,
    pub new_version: String,
    pub last_completed_version: Option<String>,
    pub started_at: String,
    pub step_started_at: String,
    pub bake: String,
    pub on_failure: OnFailure,
    pub matching_proxies: usize,
    /// Proxies of the step (on the new version), and how they stand.
    pub on_new: usize,
    pub acked: usize,
    pub nacked: usize,
    pub waiting: usize,
    /// The first `FAILURE_EXAMPLES` failing proxies, and how many in all.
    pub failures: Vec<Failure>,
    pub failure_count: usize,
    pub reason: Option<String>,
    /// With health gates, while it runs: the step's traffic since the step began, and
    /// the other proxies' (the baseline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<StepHealth>,
}

/// A running step's live health, from its proxies' stats.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepHealth {
    pub requests: f64,
    pub errors_5xx: f64,
    pub ratio_5xx: f64,
    pub p99_ms: Option<f64>,
    /// Step proxies whose stats are in it.
    pub proxies: usize,
    pub baseline_requests: f64,
    pub baseline_ratio_5xx: f64,
}

impl StepHealth {
    pub fn of(step: &crate::fleet::Traffic, baseline: &crate::fleet::Traffic) -> Self {
        StepHealth {
            requests: step.requests,
            errors_5xx: step.errors_5xx,
            ratio_5xx: step.ratio_5xx(),
            p99_ms: step.p99_ms,
            proxies: step.proxies,
            baseline_requests: baseline.requests,
            baseline_ratio_5xx: baseline.ratio_5xx(),
        }
    }
}

/// A stored record that does not read.
#[derive(Debug, thiserror::Error)]
#[error("rollout state: a stored record does not read: {0}")]
pub struct DecodeError(pub String);

/// Everything a restart needs to resume.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StoredState {
    pub entries: Vec<EntryState>,
    pub history: Vec<HistoryEntry>,
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
    pub fn to_compiled(&self) -> Result<CompiledResource, DecodeError> {
        let bad = |what: &str| DecodeError(format!("{}: {what}", self.name));
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

/// The row earlier versions kept the whole state in (read; the next save replaces it).
pub const LEGACY_ROW: &str = "state";
/// Rows of this state start so; a row per entry and one for the history.
pub const ROW_PREFIX: &str = "rollout-state/";
const HISTORY_KEY: &str = "history";
const ENTRY_PREFIX: &str = "entry/";

impl StoredState {
    /// The rows this state is written as: one per entry (named by a digest of its key, so
    /// a row name stays short) and one for the history.
    pub fn to_rows(&self) -> Result<BTreeMap<String, Vec<u8>>, DecodeError> {
        fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, DecodeError> {
            serde_json::to_vec(v).map_err(|e| DecodeError(e.to_string()))
        }
        let mut rows = BTreeMap::new();
        for e in &self.entries {
            let digest = sha2::Sha256::digest(format!("{}\0{:?}", e.name, e.selector).as_bytes());
            rows.insert(format!("{ROW_PREFIX}{ENTRY_PREFIX}{}", hex::encode(&digest[..12])), json(e)?);
        }
        rows.insert(format!("{ROW_PREFIX}{HISTORY_KEY}"), json(&self.history)?);
        Ok(rows)
    }

    /// The state `rows` hold (`where_` names them in errors). Rows of other names are
    /// not this state's and are skipped.
    pub fn from_rows(rows: &BTreeMap<String, Vec<u8>>, where_: &str) -> Result<Self, DecodeError> {
        let decode = |what: &str, e: serde_json::Error| DecodeError(format!("{where_}: {what}: {e}"));
        let mut state = match rows.get(LEGACY_ROW).filter(|v| !v.is_empty()) {
            Some(v) => serde_json::from_slice(v).map_err(|e| decode(LEGACY_ROW, e))?,
            None => StoredState::default(),
        };
        for (name, value) in rows {
            let Some(key) = name.strip_prefix(ROW_PREFIX) else { continue };
            if key == HISTORY_KEY {
                state.history = serde_json::from_slice(value).map_err(|e| decode(key, e))?;
            } else {
                state.entries.push(serde_json::from_slice(value).map_err(|e| decode(key, e))?);
            }
        }
        Ok(state)
    }
}
