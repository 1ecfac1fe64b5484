//! Node identity: which node ids and clusters a proxy may claim, given the client
//! certificate it showed (mTLS). Rules come from `--node-identity`, one per flag:
//!
//! ```text
//! uri=spiffe://example.org/ns/edge/sa/*,node=$1-*,cluster=edge
//! dns=*.gw.example.com,node=$1
//! ```
//!
//! One of `uri` (a URI SAN, e.g. a SPIFFE id), `dns` (a DNS SAN) or `san` (either) is a
//! pattern for the certificate; `node` and `cluster` (default `*`) are patterns for what
//! the stream's `node` says. In every pattern `*` matches any run of characters except
//! `/`; in `node` and `cluster`, `$1`..`$9` stand for what the certificate pattern's first
//! to ninth `*` matched, taken literally. A stream is allowed when one rule matches one
//! of its certificate's SANs, its node id and its cluster. With no rule, any node may be
//! claimed.

use crate::tls::PeerIdentity;

/// Longest SAN, node id or cluster a rule is matched against; longer ones match nothing.
pub const MAX_MATCHED_LEN: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--node-identity {rule:?}: {message}")]
pub struct RuleError {
    pub rule: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SanKind {
    Uri,
    Dns,
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    Star,
    /// `$n`: what the certificate pattern's n-th star matched (1-based).
    Capture(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern(Vec<Token>);

impl Pattern {
    fn parse(text: &str, captures: bool) -> Result<Pattern, String> {
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => {
                    if !literal.is_empty() {
                        tokens.push(Token::Literal(std::mem::take(&mut literal)));
                    }
                    if tokens.last() != Some(&Token::Star) {
                        tokens.push(Token::Star);
                    }
                }
                '$' if captures => {
                    let Some(n) = chars.next().and_then(|d| d.to_digit(10)).filter(|n| *n >= 1) else {
                        return Err(format!("{text:?}: `$` must be followed by a digit 1-9"));
                    };
                    if !literal.is_empty() {
                        tokens.push(Token::Literal(std::mem::take(&mut literal)));
                    }
                    tokens.push(Token::Capture(n as usize));
                }
                _ => literal.push(c),
            }
        }
        if !literal.is_empty() {
            tokens.push(Token::Literal(literal));
        }
        Ok(Pattern(tokens))
    }

    fn stars(&self) -> usize {
        self.0.iter().filter(|t| **t == Token::Star).count()
    }

    fn max_capture(&self) -> usize {
        self.0.iter().filter_map(|t| if let Token::Capture(n) = t { Some(*n) } else { None }).max().unwrap_or(0)
    }

    /// Matches `text`; on success, what each star matched.
    fn captures<'t>(&self, text: &'t str) -> Option<Vec<&'t str>> {
        let mut m = Matcher::new(&self.0, text, &[])?;
        m.at(0, 0).then_some(m.caps)
    }

    fn matches(&self, text: &str, captured: &[&str]) -> bool {
        Matcher::new(&self.0, text, captured).is_some_and(|mut m| m.at(0, 0))
    }
}

/// Backtracking match that remembers where it failed: each (token, position) is tried
/// once, so any pattern costs at most tokens × length² steps on a text of at most
/// `MAX_MATCHED_LEN` bytes (a node id is the client's to choose).
struct Matcher<'p, 't> {
    tokens: &'p [Token],
    text: &'t str,
    captured: &'p [&'p str],
    caps: Vec<&'t str>,
    failed: Vec<bool>,
}

impl<'p, 't> Matcher<'p, 't> {
    fn new(tokens: &'p [Token], text: &'t str, captured: &'p [&'p str]) -> Option<Self> {
        (text.len() <= MAX_MATCHED_LEN).then(|| Matcher {
            tokens,
            text,
            captured,
            caps: Vec::new(),
            failed: vec![false; (tokens.len() + 1) * (text.len() + 1)],
        })
    }

    fn at(&mut self, token: usize, pos: usize) -> bool {
        let key = token * (self.text.len() + 1) + pos;
        if self.failed[key] {
            return false;
        }
        let rest = &self.text[pos..];
        let ok = match self.tokens.get(token) {
            None => rest.is_empty(),
            Some(Token::Literal(l)) => rest.starts_with(l.as_str()) && self.at(token + 1, pos + l.len()),
            Some(Token::Capture(n)) => {
                let c = self.captured.get(n - 1).copied().unwrap_or_default();
                rest.starts_with(c) && self.at(token + 1, pos + c.len())
            }
            Some(Token::Star) => {
                // Within one path segment, longest first, at character ends only.
                let segment = rest.find('/').unwrap_or(rest.len());
                let mut found = false;
                for end in (0..=segment).rev().filter(|e| rest.is_char_boundary(*e)) {
                    self.caps.push(&self.text[pos..pos + end]);
                    if self.at(token + 1, pos + end) {
                        found = true;
                        break;
                    }
                    self.caps.pop();
                }
                found
            }
        };
        if !ok {
            self.failed[key] = true;
        }
        ok
    }
}

/// One `--node-identity` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRule {
    text: String,
    kind: SanKind,
    san: Pattern,
    node: Pattern,
    cluster: Pattern,
}

impl std::str::FromStr for IdentityRule {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Self, RuleError> {
        let err = |message: String| RuleError { rule: text.to_owned(), message };
        let mut san: Option<(SanKind, String)> = None;
        let (mut node, mut cluster): (Option<String>, Option<String>) = (None, None);
        for part in text.split(',') {
            let Some((key, value)) = part.split_once('=') else {
                return Err(err(format!("{part:?} is not KEY=VALUE")));
            };
            let (key, value) = (key.trim(), value.trim().to_owned());
            if value.is_empty() {
                return Err(err(format!("{key} is empty")));
            }
            let kind = match key {
                "uri" => SanKind::Uri,
                "dns" => SanKind::Dns,
                "san" => SanKind::Any,
                "node" => {
                    node = Some(value);
                    continue;
                }
                "cluster" => {
                    cluster = Some(value);
                    continue;
                }
                other => return Err(err(format!("unknown key {other:?} (uri, dns, san, node, cluster)"))),
            };
            if san.replace((kind, value)).is_some() {
                return Err(err("give one of uri, dns or san".into()));
            }
        }
        let Some((kind, san)) = san else {
            return Err(err("needs uri=, dns= or san= (the certificate's name it applies to)".into()));
        };
        let Some(node) = node else {
            return Err(err("needs node= (the node ids a proxy with that certificate may claim; * for any)".into()));
        };
        let san = Pattern::parse(&san, false).map_err(err)?;
        let node = Pattern::parse(&node, true).map_err(err)?;
        let cluster = Pattern::parse(cluster.as_deref().unwrap_or("*"), true).map_err(err)?;
        let used = node.max_capture().max(cluster.max_capture());
        if used > san.stars() {
            return Err(err(format!("${used} refers to a * the certificate pattern does not have")));
        }
        Ok(IdentityRule { text: text.to_owned(), kind, san, node, cluster })
    }
}

impl IdentityRule {
    fn allows(&self, identity: &PeerIdentity, node_id: &str, cluster: &str) -> bool {
        let uris = identity.uris.iter().filter(|_| self.kind != SanKind::Dns);
        let dns = identity.dns.iter().filter(|_| self.kind != SanKind::Uri);
        uris.chain(dns).any(|name| {
            self.san
                .captures(name)
                .is_some_and(|caps| self.node.matches(node_id, &caps) && self.cluster.matches(cluster, &caps))
        })
    }
}

/// Every `--node-identity` rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityRules(pub Vec<IdentityRule>);

impl IdentityRules {
    /// Whether a stream with this client identity may claim this node; `Err` says why
    /// not, in words for the gRPC status and the page.
    pub fn check(&self, identity: Option<&PeerIdentity>, node_id: &str, cluster: &str) -> Result<(), String> {
        if self.0.is_empty() {
            return Ok(());
        }
        let Some(identity) = identity else {
            return Err(format!(
                "node {node_id:?} connected without a client certificate; --node-identity rules need one"
            ));
        };
        if self.0.iter().any(|r| r.allows(identity, node_id, cluster)) {
            return Ok(());
        }
        let names = identity.names();
        Err(format!(
            "node {node_id:?} (cluster {cluster:?}) may not be claimed with a certificate for {}; no --node-identity rule allows it",
            if names.is_empty() { format!("subject {:?} with no SAN", identity.subject) } else { names.join(", ") }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(uris: &[&str], dns: &[&str]) -> PeerIdentity {
        PeerIdentity {
            uris: uris.iter().map(|s| s.to_string()).collect(),
            dns: dns.iter().map(|s| s.to_string()).collect(),
            subject: "CN=x".into(),
        }
    }

    fn rules(texts: &[&str]) -> IdentityRules {
        IdentityRules(texts.iter().map(|t| t.parse().unwrap()).collect())
    }

    #[test]
    fn a_spiffe_id_names_the_node_it_may_claim() {
        let r = rules(&["uri=spiffe://example.org/node/*,node=$1"]);
        let gw = id(&["spiffe://example.org/node/gw-1"], &[]);
        assert_eq!(r.check(Some(&gw), "gw-1", "any"), Ok(()));
        let e = r.check(Some(&gw), "gw-2", "any").unwrap_err();
        assert!(e.contains("\"gw-2\"") && e.contains("uri:spiffe://example.org/node/gw-1"), "{e}");
        // A star stays within one path segment.
        assert!(r.check(Some(&id(&["spiffe://example.org/node/a/b"], &[])), "a/b", "c").is_err());
        // What the star matched is taken literally: a SAN holding `*` claims only itself.
        assert!(r.check(Some(&id(&["spiffe://example.org/node/*"], &[])), "gw-1", "c").is_err());
        assert_eq!(r.check(Some(&id(&["spiffe://example.org/node/*"], &[])), "*", "c"), Ok(()));
    }

    #[test]
    fn globs_for_node_ids_and_clusters() {
        let r = rules(&["dns=*.edge.example.com,node=edge-$1-*,cluster=edge"]);
        let cert = id(&[], &["eu.edge.example.com"]);
        assert_eq!(r.check(Some(&cert), "edge-eu-7", "edge"), Ok(()));
        assert!(r.check(Some(&cert), "edge-us-7", "edge").is_err());
        assert!(r.check(Some(&cert), "edge-eu-7", "core").is_err(), "the cluster must match too");
        // A dns rule does not look at URI SANs.
        assert!(r.check(Some(&id(&["eu.edge.example.com"], &[])), "edge-eu-7", "edge").is_err());
    }

    #[test]
    fn no_rules_allow_anything_and_rules_need_a_certificate() {
        assert_eq!(IdentityRules::default().check(None, "n", "c"), Ok(()));
        let e = rules(&["san=*,node=*"]).check(None, "n", "c").unwrap_err();
        assert!(e.contains("without a client certificate"), "{e}");
        assert_eq!(rules(&["san=*,node=*"]).check(Some(&id(&[], &["a"])), "n", "c"), Ok(()));
        assert!(rules(&["san=*,node=*"]).check(Some(&id(&[], &[])), "n", "c").unwrap_err().contains("no SAN"));
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (text, says) in [
            ("node=a", "needs uri=, dns= or san="),
            ("uri=a", "needs node="),
            ("uri=a,dns=b,node=c", "one of uri, dns or san"),
            ("uri=a,node=$1", "$1 refers to a *"),
            ("uri=*,node=$x", "followed by a digit"),
            ("uri=*,nod=a", "unknown key"),
            ("uri=*,node", "not KEY=VALUE"),
        ] {
            let e = text.parse::<IdentityRule>().unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn long_inputs_match_nothing_quickly() {
        let r = rules(&["san=*a*b*c*d*,node=*"]);
        let long = "a".repeat(MAX_MATCHED_LEN + 1);
        assert!(r.check(Some(&id(&[], &[&long])), "n", "c").is_err());
        let hard = "a".repeat(MAX_MATCHED_LEN);
        assert!(r.check(Some(&id(&[], &[&hard])), "n", "c").is_err());
    }
}
