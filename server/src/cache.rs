//! The snapshot cache: holds the generation served now and publishes new ones through a
//! `watch` channel; a new config first passes the rollouts, which decide its plan.

use std::sync::Arc;

use filterplane_config::CompiledConfig;
use filterplane_xds::snapshot::{Generation, Plan};
use tokio::sync::watch;

/// Decides the plan a new config is served with.
pub trait Planner: Send + Sync + std::fmt::Debug {
    /// The plan for `config`; `previous` is the config served until now.
    fn plan_for(&self, config: &CompiledConfig, previous: Option<&CompiledConfig>) -> Plan;
    /// Modules the plan still serves to some proxies (kept in the module cache).
    fn pinned_modules(&self) -> Vec<String>;
}

/// Holds the current generation. `None` until the first config loads: streams wait
/// rather than being told "nothing exists", which would delete a reconnecting Envoy's
/// listeners and clusters.
#[derive(Debug)]
pub struct SnapshotCache {
    tx: watch::Sender<Option<Arc<Generation>>>,
    /// Decides each new config's plan (progressive rollouts), when the server runs them.
    planner: Option<Arc<dyn Planner>>,
}

impl Default for SnapshotCache {
    fn default() -> Self {
        Self { tx: watch::Sender::new(None), planner: None }
    }
}

impl SnapshotCache {
    /// Publishes a new config. Returns false, and wakes nobody, when its version is the
    /// one already served.
    pub fn publish(&self, config: CompiledConfig) -> bool {
        if self.current().is_some_and(|g| *g.version() == config.version) {
            return false;
        }
        let previous = self.current();
        let plan = self
            .planner
            .as_ref()
            .map(|p| p.plan_for(&config, previous.as_ref().map(|g| g.config.as_ref())))
            .unwrap_or_default();
        let next = Generation::with_plan_after(Arc::new(config), plan, previous.as_deref());
        self.tx.send_replace(Some(Arc::new(next)));
        true
    }

    /// Serves the current config with the rollouts of `plan` (a step moved, a rollout
    /// ended or rolled back); nothing happens when the plan is the one served.
    pub fn replan(&self, plan: Plan) {
        let Some(current) = self.current() else { return };
        if current.plan == plan {
            return;
        }
        let next = Generation::with_plan_after(current.config.clone(), plan, Some(&current));
        self.tx.send_replace(Some(Arc::new(next)));
    }

    /// Modules that rollouts still serve to some proxies (last completed versions).
    pub fn pinned_modules(&self) -> Vec<String> {
        self.planner.as_ref().map(|p| p.pinned_modules()).unwrap_or_default()
    }

    /// A cache whose publishes go through `planner`.
    pub fn with_planner(planner: Arc<dyn Planner>) -> Self {
        Self { tx: watch::Sender::new(None), planner: Some(planner) }
    }

    pub fn current(&self) -> Option<Arc<Generation>> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Generation>>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn generation(yaml: &str) -> Generation {
        let parsed = filterplane_config::load::parse_file(Path::new("t.yaml"), yaml).unwrap();
        Generation::new(filterplane_config::compile(&[parsed]).unwrap())
    }

    fn entry(name: &str, selector: &str, value: &str) -> String {
        format!(
            "  - name: {name}\n    node_selector: {selector}\n    typed_config: {{ \"@type\": type.googleapis.com/google.protobuf.StringValue, value: {value} }}\n"
        )
    }

    #[test]
    fn publishing_the_same_version_wakes_nobody() {
        let cache = SnapshotCache::default();
        let mut rx = cache.subscribe();
        let yaml = format!("version: 1\nextension_configs:\n{}", entry("a", "{}", "x"));
        let config = || generation(&yaml).config.as_ref().clone();
        assert!(cache.publish(config()));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(!cache.publish(config()));
        assert!(!rx.has_changed().unwrap());
    }
}
