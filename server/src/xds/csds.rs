//! Envoy's Client Status Discovery Service (`envoy.service.status.v3`) on the xDS port:
//! for the proxies a request's node matchers name (all when none), what each was sent and
//! how it took it, as Envoy's and Istio's tooling read it. One `ClientConfig` per proxy
//! stream, one `GenericXdsConfig` per resource it was sent: its version, its content
//! (unless excluded, and never a resource that holds a secret), `config_status` (SYNCED,
//! STALE, ERROR) and `client_status` (ACKED, REQUESTED, NACKED with Envoy's message).

use std::time::SystemTime;

use filterplane_api::{
    envoy_types::pb::{
        envoy::{
            admin::v3::{ClientResourceStatus, UpdateFailureState},
            config::core::v3::Node,
            r#type::matcher::v3::{string_matcher::MatchPattern, NodeMatcher, StringMatcher},
            service::status::v3::{
                client_config::GenericXdsConfig, ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus,
            },
        },
        google::protobuf::Timestamp,
    },
    ResourceType,
};
use filterplane_h2::Status;

use crate::{
    cache::SnapshotCache,
    tracker::{AckTracker, ProxyStatus, Stamp},
};

/// Whether `m` matches `text`; `Err` for a matcher this server does not evaluate.
fn string_matches(m: &StringMatcher, text: &str) -> Result<bool, String> {
    let (text, fold) = if m.ignore_case { (text.to_lowercase(), true) } else { (text.to_owned(), false) };
    let norm = |s: &str| if fold { s.to_lowercase() } else { s.to_owned() };
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => text == norm(s),
        Some(MatchPattern::Prefix(s)) => text.starts_with(&norm(s)),
        Some(MatchPattern::Suffix(s)) => text.ends_with(&norm(s)),
        Some(MatchPattern::Contains(s)) => text.contains(&norm(s)),
        None => true,
        Some(_) => return Err("only exact, prefix, suffix and contains node id matchers are supported".into()),
    })
}

/// Whether a proxy matches any of `matchers` (all match when there are none).
fn selected(matchers: &[NodeMatcher], node_id: &str) -> Result<bool, Status> {
    if matchers.is_empty() {
        return Ok(true);
    }
    for m in matchers {
        if !m.node_metadatas.is_empty() {
            return Err(Status::invalid_argument("node_metadatas matchers are not supported; match the node id"));
        }
        let hit = match &m.node_id {
            Some(id) => string_matches(id, node_id).map_err(Status::invalid_argument)?,
            None => true,
        };
        if hit {
            return Ok(true);
        }
    }
    Ok(false)
}

fn timestamp(t: Option<SystemTime>) -> Option<Timestamp> {
    let d = t?.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    Some(Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 })
}

/// One proxy stream's `ClientConfig`. `contents`: with each resource's content as served
/// (resources holding a secret never are).
fn client_config(p: &ProxyStatus, cache: &SnapshotCache, contents: bool) -> ClientConfig {
    let facts = p.facts();
    let snapshot = cache.current().map(|g| g.snapshot_for_stream(facts, p.auth.sensitive_withheld));
    let mut generic = Vec::new();
    for rt in ResourceType::ALL {
        let Some(t) = p.types.get(&rt) else { continue };
        for (name, r) in t.resources.iter() {
            let sent = r.sent_version.to_string();
            let nacked = r.nacked_version.as_ref().is_some_and(|v| *v == r.sent_version);
            let acked = r.acked_version.as_ref().is_some_and(|v| *v == r.sent_version);
            let (config_status, client_status) = if nacked {
                (ConfigStatus::Error, ClientResourceStatus::Nacked)
            } else if acked {
                (ConfigStatus::Synced, ClientResourceStatus::Acked)
            } else {
                (ConfigStatus::Stale, ClientResourceStatus::Requested)
            };
            let xds_config = contents
                .then(|| snapshot.as_ref()?.resource(rt, name))
                .flatten()
                .filter(|s| s.version == r.sent_version && !filterplane_api::json::holds_sensitive(&s.any))
                .map(|s| s.any.clone());
            let error_state = nacked.then(|| UpdateFailureState {
                details: t.last_nack.as_ref().map(|n| n.message.clone()).unwrap_or_default(),
                version_info: sent.clone(),
                last_update_attempt: timestamp(t.sent_at.map(Stamp::wall)),
                failed_configuration: None,
            });
            generic.push(GenericXdsConfig {
                type_url: rt.type_url().to_owned(),
                name: name.to_string(),
                version_info: r.acked_version.as_ref().map(|v| v.to_string()).unwrap_or(sent),
                xds_config,
                last_updated: timestamp(if acked { t.acked_at } else { t.sent_at }.map(Stamp::wall)),
                config_status: config_status as i32,
                client_status: client_status as i32,
                error_state,
                is_static_resource: false,
            });
        }
    }
    ClientConfig {
        node: Some(Node {
            id: facts.id.clone(),
            cluster: facts.cluster.clone(),
            user_agent_name: p.node.user_agent.clone(),
            ..Default::default()
        }),
        generic_xds_configs: generic,
        client_scope: String::new(),
        ..Default::default()
    }
}

/// The answer to one `ClientStatusRequest`.
pub fn answer(
    req: &ClientStatusRequest,
    tracker: &AckTracker,
    cache: &SnapshotCache,
    contents_allowed: bool,
) -> Result<ClientStatusResponse, Status> {
    let mut config = Vec::new();
    let mut failed = None;
    tracker.for_each(|p| {
        if failed.is_some() {
            return;
        }
        match selected(&req.node_matchers, p.node_id()) {
            Ok(true) => config.push(client_config(p, cache, contents_allowed && !req.exclude_resource_contents)),
            Ok(false) => {}
            Err(e) => failed = Some(e),
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    config.sort_by(|a, b| a.node.as_ref().map(|n| &n.id).cmp(&b.node.as_ref().map(|n| &n.id)));
    Ok(ClientStatusResponse { config })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(p: MatchPattern, ignore_case: bool) -> NodeMatcher {
        NodeMatcher { node_id: Some(StringMatcher { match_pattern: Some(p), ignore_case }), node_metadatas: vec![] }
    }

    #[test]
    fn node_matchers_select_by_node_id() {
        assert!(selected(&[], "any").unwrap());
        assert!(selected(&[id(MatchPattern::Exact("edge-1".into()), false)], "edge-1").unwrap());
        assert!(!selected(&[id(MatchPattern::Exact("edge-1".into()), false)], "edge-2").unwrap());
        assert!(selected(&[id(MatchPattern::Prefix("EDGE".into()), true)], "edge-7").unwrap());
        assert!(selected(
            &[id(MatchPattern::Suffix("-7".into()), false), id(MatchPattern::Exact("x".into()), false)],
            "edge-7"
        )
        .unwrap());
        assert!(selected(&[id(MatchPattern::Contains("dg".into()), false)], "edge").unwrap());
        assert!(selected(&[id(MatchPattern::SafeRegex(Default::default()), false)], "edge").is_err());
    }
}
