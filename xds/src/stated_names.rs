//! The names a state-of-the-world request states, read off the wire without a `String`
//! per name. Envoy states its whole subscription in every request, so a mesh-sized Envoy
//! names 50,000 assignments in every ACK: decoded, that is 50,000 allocations per ACK,
//! most of a push's work on such a stream, for a list that almost always is the one the
//! stream stated last. Read here, the list is one copy of its bytes, checked as UTF-8
//! and hashed; the state machine makes `String`s of it only when the hash says the list
//! changed.

use std::hash::{BuildHasher, Hasher};

use prost::{
    bytes::Buf,
    encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType},
    DecodeError,
};

/// `DiscoveryRequest.resource_names`.
const RESOURCE_NAMES: u32 = 3;

/// A request that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RequestDecodeError {
    #[error(transparent)]
    Protobuf(#[from] DecodeError),
    #[error("resource name {index} runs past the end of the request")]
    NamePastTheEnd { index: usize },
    #[error("resource name {index} is not UTF-8")]
    NameNotUtf8 { index: usize },
    #[error("the resource names take over 4 GiB")]
    NamesTooLong,
}

/// A request's list of names: decoded, or as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatedNames {
    Decoded(Vec<String>),
    /// The names one after another, and where each ends.
    Wire {
        text: String,
        ends: Vec<u32>,
    },
}

impl Default for StatedNames {
    fn default() -> Self {
        StatedNames::Decoded(Vec::new())
    }
}

impl StatedNames {
    /// The names field of an encoded `DiscoveryRequest` (every other field skipped). What
    /// prost's decoding of the field refuses is refused: a name that is not UTF-8, a
    /// length past the end.
    pub fn read(mut buf: &[u8]) -> Result<Self, RequestDecodeError> {
        // The names are most of such a request: one allocation for them all.
        let (mut text, mut ends) = (String::with_capacity(buf.len()), Vec::new());
        while buf.has_remaining() {
            let (tag, wire_type) = decode_key(&mut buf)?;
            if tag != RESOURCE_NAMES || wire_type != WireType::LengthDelimited {
                skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
                continue;
            }
            let len = decode_varint(&mut buf)?;
            let index = ends.len();
            let len = usize::try_from(len)
                .ok()
                .filter(|l| *l <= buf.len())
                .ok_or(RequestDecodeError::NamePastTheEnd { index })?;
            let (name, rest) = buf.split_at(len);
            let name = std::str::from_utf8(name).map_err(|_| RequestDecodeError::NameNotUtf8 { index })?;
            text.push_str(name);
            let end = u32::try_from(text.len()).map_err(|_| RequestDecodeError::NamesTooLong)?;
            ends.push(end);
            buf = rest;
        }
        Ok(StatedNames::Wire { text, ends })
    }

    pub fn len(&self) -> usize {
        match self {
            StatedNames::Decoded(names) => names.len(),
            StatedNames::Wire { ends, .. } => ends.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The names, in the order stated.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let (decoded, wire) = match self {
            StatedNames::Decoded(names) => (Some(names.iter().map(String::as_str)), None),
            StatedNames::Wire { text, ends } => {
                let starts = std::iter::once(0).chain(ends.iter().copied());
                let cut = starts.zip(ends.iter().copied()).map(|(a, b)| text.get(a as usize..b as usize).unwrap_or(""));
                (None, Some(cut))
            }
        };
        decoded.into_iter().flatten().chain(wire.into_iter().flatten())
    }

    /// The list's hash under `key` (the stream's): the same for the same names in the
    /// same order, however they were read.
    pub fn hash(&self, key: &impl BuildHasher) -> u64 {
        let mut h = key.build_hasher();
        h.write_usize(self.len());
        for name in self.iter() {
            h.write(name.as_bytes());
            h.write_u8(0xff);
        }
        h.finish()
    }

    pub fn into_vec(self) -> Vec<String> {
        match self {
            StatedNames::Decoded(names) => names,
            wire => wire.iter().map(str::to_string).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use filterplane_api::envoy_types::pb::{
        envoy::{config::core::v3::Node, service::discovery::v3::DiscoveryRequest},
        google::rpc::Status,
    };
    use prost::Message;

    use super::*;

    /// Read off the wire, a request's names are what prost decodes, in order, with the
    /// same hash as the decoded list; every other field (a node, an error with its own
    /// strings) is skipped. A name that is not UTF-8, or runs past the end, is refused.
    #[test]
    fn names_read_off_the_wire_are_the_decoded_names() {
        for names in [vec![], vec!["a"], vec!["svc-2", "", "svc-1", "ünï", "svc-2", "*"]] {
            let req = DiscoveryRequest {
                version_info: "v".into(),
                node: Some(Node { id: "n".into(), ..Default::default() }),
                resource_names: names.iter().map(|n| n.to_string()).collect(),
                type_url: "t".into(),
                response_nonce: "3".into(),
                error_detail: Some(Status { code: 3, message: "svc-9".into(), details: vec![] }),
                ..Default::default()
            };
            let wire = StatedNames::read(&req.encode_to_vec()).unwrap();
            let decoded = StatedNames::Decoded(req.resource_names.clone());
            assert_eq!(wire.iter().collect::<Vec<_>>(), names);
            assert_eq!(wire.len(), names.len());
            let key = std::collections::hash_map::RandomState::new();
            assert_eq!(wire.hash(&key), decoded.hash(&key), "{names:?}");
            assert_eq!(wire.into_vec(), req.resource_names);
        }
        let key = std::collections::hash_map::RandomState::new();
        let split = |a: &[&str]| StatedNames::Decoded(a.iter().map(|s| s.to_string()).collect()).hash(&key);
        assert_ne!(split(&["ab", "c"]), split(&["a", "bc"]), "where a name ends is part of the hash");
        let bad_utf8 = [0x1a, 0x02, 0xc3, 0x28];
        assert!(matches!(StatedNames::read(&bad_utf8), Err(RequestDecodeError::NameNotUtf8 { index: 0 })));
        assert!(DiscoveryRequest::decode(&bad_utf8[..]).is_err(), "prost refuses it too");
        let past_the_end = [0x1a, 0x09, b'a'];
        assert!(matches!(StatedNames::read(&past_the_end), Err(RequestDecodeError::NamePastTheEnd { index: 0 })));
        assert!(DiscoveryRequest::decode(&past_the_end[..]).is_err());
    }
}
