//! Content-addressed versions. A version is the hash of what is served, so the same YAML
//! gives the same versions after a restart or on another replica, and a reconnecting Envoy
//! sees no change.

use std::fmt;

use sha2::{Digest, Sha256};

/// A resource or resource-set version: the first 16 hex digits of a SHA-256, held
/// inline (every stream keeps one per resource it was sent; no allocation for them).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ResourceVersion([u8; 16]);

impl ResourceVersion {
    /// A version as it went over the wire; `None` for anything Filterplane would not have
    /// sent (another control plane's, or garbage).
    pub fn parse(text: &str) -> Option<Self> {
        let bytes: [u8; 16] = text.as_bytes().try_into().ok()?;
        bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')).then_some(Self(bytes))
    }

    /// The hex digits; empty for the default (no version).
    pub fn as_str(&self) -> &str {
        if self.0[0] == 0 {
            return "";
        }
        // Only ever built from hex digits, so always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for ResourceVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ResourceVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl serde::Serialize for ResourceVersion {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl PartialEq<str> for ResourceVersion {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
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
    let mut hex = [0u8; 16];
    // 8 bytes make exactly 16 hex digits.
    let _ = hex::encode_to_slice(&digest[..8], &mut hex);
    ResourceVersion(hex)
}

/// HMAC-SHA256 of `message` under `key`, in lowercase hex (the module server's path
/// keys, the admin API's session tokens).
pub fn hmac_sha256_hex(key: &[u8], message: &[u8]) -> String {
    use hmac::Mac;
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
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
        assert!(a.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(ResourceVersion::default().as_str(), "");
        assert_eq!(ResourceVersion::parse(a.as_str()), Some(a));
        assert_eq!(ResourceVersion::parse("v1"), None);
        assert_eq!(ResourceVersion::parse("ABCDEF0123456789"), None, "only lower-case hex is ours");
    }
}
