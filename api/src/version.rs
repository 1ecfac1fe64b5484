//! Content-addressed versions. A version is the hash of what is served, so the same YAML
//! gives the same versions after a restart or on another replica, and a reconnecting Envoy
//! sees no change.

use std::fmt;

use sha2::{Digest, Sha256};

/// A resource or resource-set version: the first 16 hex digits of a SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ResourceVersion(String);

impl ResourceVersion {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Hashes the parts in order, each length-prefixed so ("ab","c") and ("a","bc") differ.
pub fn content_version<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> ResourceVersion {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    ResourceVersion(hex::encode(&digest[..8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_stable_and_length_prefixed() {
        let a = content_version([b"ab".as_slice(), b"c"]);
        let b = content_version([b"a".as_slice(), b"bc"]);
        assert_ne!(a, b);
        assert_eq!(a, content_version([b"ab".as_slice(), b"c"]));
        assert_eq!(a.as_str().len(), 16);
    }
}
