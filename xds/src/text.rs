//! Short text kept in place: versions, nonces and resource names as a stream's events
//! and the tracker hold them, without an allocation of their own.

use serde::Serialize;

/// Bytes of text a `Text` keeps in place.
const SHORT_TEXT: usize = 22;

/// A version, nonce or resource name. Filterplane's own versions and nonces (16 hex
/// digits; a number), and most names, are kept in place, so a push records them in a
/// stream's events and a proxy's status without writing a string elsewhere in memory; a
/// longer one (a client's) is boxed. The same size as a `String`.
#[derive(Clone)]
pub enum Text {
    Short { len: u8, bytes: [u8; SHORT_TEXT] },
    Long(Box<str>),
}

impl Text {
    pub fn as_str(&self) -> &str {
        match self {
            // Only ever filled from a `&str`, cut at its end: always UTF-8.
            Text::Short { len, bytes } => std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default(),
            Text::Long(s) => s,
        }
    }

    /// The bytes, not checked again as UTF-8 (which `as_str` does, on every call): what
    /// comparisons read.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Text::Short { len, bytes } => &bytes[..usize::from(*len)],
            Text::Long(s) => s.as_bytes(),
        }
    }
}

impl From<&str> for Text {
    fn from(text: &str) -> Self {
        if text.len() > SHORT_TEXT {
            return Text::Long(text.into());
        }
        let mut bytes = [0; SHORT_TEXT];
        bytes[..text.len()].copy_from_slice(text.as_bytes());
        Text::Short { len: text.len() as u8, bytes }
    }
}

impl From<String> for Text {
    fn from(text: String) -> Self {
        match text.len() > SHORT_TEXT {
            true => Text::Long(text.into_boxed_str()),
            false => Text::from(text.as_str()),
        }
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// Maps keyed by `Text` are looked up by `&str` (its order and equality are the text's).
impl std::borrow::Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Text {}

impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialOrd for Text {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Text {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
