//! Matching node selectors against what an Envoy says about itself.

use std::collections::BTreeMap;

use crate::model::NodeSelector;

/// The parts of an Envoy `Node` that selectors look at, flattened to strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeFacts {
    pub id: String,
    pub cluster: String,
    pub metadata: BTreeMap<String, String>,
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
    /// `node.metadata.LABELS`, when the node has it (Istio proxies do).
    pub labels: Option<BTreeMap<String, String>>,
}

impl NodeSelector {
    pub fn matches(&self, node: &NodeFacts) -> bool {
        let any =
            |patterns: &[String], value: &str| patterns.is_empty() || patterns.iter().any(|p| glob_match(p, value));
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        any(&self.ids, &node.id)
            && any(&self.clusters, &node.cluster)
            && self.metadata.iter().all(|(k, want)| node.metadata.get(k).is_some_and(|have| glob_match(want, have)))
            && eq(&self.locality.region, &node.region)
            && eq(&self.locality.zone, &node.zone)
            && eq(&self.locality.sub_zone, &node.sub_zone)
            && self.labels.iter().all(|(k, want)| {
                let have = node.labels.as_ref().unwrap_or(&node.metadata).get(k);
                have.is_some_and(|have| glob_match(want, have))
            })
    }

    pub fn is_empty(&self) -> bool {
        *self == NodeSelector::default()
    }
}

/// `*` matches any run of characters; everything else is literal.
fn glob_match(pattern: &str, value: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = value.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LocalitySelector;

    fn node() -> NodeFacts {
        NodeFacts {
            id: "edge-1".into(),
            cluster: "edge".into(),
            metadata: [("env".to_string(), "prod".to_string())].into(),
            region: "eu".into(),
            zone: "eu-1a".into(),
            sub_zone: String::new(),
            labels: None,
        }
    }

    #[test]
    fn empty_selector_matches_everyone() {
        assert!(NodeSelector::default().matches(&node()));
    }

    #[test]
    fn all_criteria_must_hold_and_lists_are_alternatives() {
        let mut s = NodeSelector {
            ids: vec!["other".into(), "edge-*".into()],
            clusters: vec!["edge".into()],
            metadata: [("env".to_string(), "prod".to_string())].into(),
            locality: LocalitySelector { region: Some("eu".into()), ..Default::default() },
            labels: Default::default(),
        };
        assert!(s.matches(&node()));
        s.locality.zone = Some("us-1a".into());
        assert!(!s.matches(&node()));
        s.locality.zone = None;
        s.metadata.insert("tier".into(), "gold".into());
        assert!(!s.matches(&node()), "missing metadata key never matches");
    }

    #[test]
    fn labels_match_metadata_labels_or_top_level_metadata() {
        let s = NodeSelector { labels: [("app".to_string(), "gw".to_string())].into(), ..Default::default() };
        let mut n = node();
        assert!(!s.matches(&n));
        n.metadata.insert("app".into(), "gw".into());
        assert!(s.matches(&n), "a node without LABELS: top-level metadata");
        n.labels = Some([("app".to_string(), "other".to_string())].into());
        assert!(!s.matches(&n), "LABELS, when present, is what counts");
        n.labels = Some([("app".to_string(), "gw".to_string())].into());
        assert!(s.matches(&n));
    }

    #[test]
    fn glob_patterns() {
        assert!(glob_match("edge-*", "edge-1"));
        assert!(glob_match("*-1", "edge-1"));
        assert!(glob_match("e*g*1", "edge-1"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("edge", "edge-1"));
        assert!(!glob_match("a*a", "a"));
    }
}
