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
    /// The version the proxy reports (`1.40.0` for Envoy 1.40.0); empty when it says none.
    #[serde(default)]
    pub version: String,
}

/// A regular expression over a proxy's version, compiled once; compared and hashed by
/// its text. Bounded: a pattern is at most 256 bytes and compiles under regex's own size
/// limit, so no pattern can cost more than linear time per match.
#[derive(Debug, Clone)]
pub struct VersionPattern {
    text: String,
    regex: regex::Regex,
}

impl VersionPattern {
    pub const MAX_BYTES: usize = 256;

    pub fn new(text: &str) -> Result<Self, String> {
        if text.len() > Self::MAX_BYTES {
            return Err(format!("a version pattern is at most {} bytes", Self::MAX_BYTES));
        }
        let regex = regex::RegexBuilder::new(text).size_limit(1 << 20).build().map_err(|e| {
            format!("{text:?} is not a regular expression: {}", e.to_string().lines().last().unwrap_or(""))
        })?;
        Ok(Self { text: text.to_owned(), regex })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_match(&self, version: &str) -> bool {
        self.regex.is_match(version)
    }
}

impl PartialEq for VersionPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for VersionPattern {}

impl std::hash::Hash for VersionPattern {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl serde::Serialize for VersionPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for VersionPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        VersionPattern::new(&text).map_err(serde::de::Error::custom)
    }
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
            && self.envoy_version.as_ref().is_none_or(|p| p.is_match(&node.version))
    }

    pub fn is_empty(&self) -> bool {
        // Field by field: this runs for every resource of every reload.
        let NodeSelector { ids, clusters, metadata, locality, labels, envoy_version } = self;
        ids.is_empty()
            && clusters.is_empty()
            && metadata.is_empty()
            && locality.region.is_none()
            && locality.zone.is_none()
            && locality.sub_zone.is_none()
            && labels.is_empty()
            && envoy_version.is_none()
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
            version: "1.40.0".into(),
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
            envoy_version: None,
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
    fn a_version_pattern_is_a_regular_expression_over_the_reported_version() {
        let s = |p: &str| NodeSelector { envoy_version: Some(VersionPattern::new(p).unwrap()), ..Default::default() };
        assert!(s(r"^1\.40\..*").matches(&node()));
        assert!(s("1.4").matches(&node()), "unanchored, as Istio's proxyVersion");
        assert!(!s(r"^1\.39\.").matches(&node()));
        assert!(
            !s(".+").matches(&NodeFacts { version: String::new(), ..node() }),
            "no version: only patterns that match empty"
        );
        assert!(VersionPattern::new("(").unwrap_err().contains("not a regular expression"));
        assert!(VersionPattern::new(&"a".repeat(300)).is_err());
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
