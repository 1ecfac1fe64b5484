//! Responses written straight into their gRPC message. Every stream a push reaches sends
//! the same resources; building a `DiscoveryResponse` per stream copied each of them
//! (type URL and bytes), encoded the copy and dropped it. Here each resource is encoded
//! once, as the field it becomes in a response, when the first stream sends it; a
//! stream's response is its version, those bytes, its type URL and its nonce, in one
//! buffer of exactly its size. The bytes are the ones prost would write for the same
//! message, fields in number order (a test checks that).

use std::{borrow::Cow, marker::PhantomData};

use bytes::BufMut;
use filterplane_api::{
    envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse, Resource},
    Any,
};
use prost::{encoding, Message};

use crate::snapshot::ServedResource;

/// One response as it goes on the wire: a gRPC message (compression flag, length,
/// protobuf) of an `M`.
pub struct Wire<M> {
    grpc: Vec<u8>,
    message: PhantomData<fn() -> M>,
}

impl<M> std::fmt::Debug for Wire<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wire({} bytes)", self.grpc.len())
    }
}

/// The limit a response over gRPC's 4 GiB hits (`filterplane_limit_hits_total`); the
/// stream ends with `RESOURCE_EXHAUSTED`.
pub const RESPONSE_BYTES: &str = "response_bytes";

/// gRPC's message prefix: a compression flag and a 4-byte length.
const PREFIX: usize = 5;

impl<M: Message + Default> Wire<M> {
    /// Frames an encoded message; `None` when it is over gRPC's 4 GiB.
    fn framed(len: usize, write: impl FnOnce(&mut Vec<u8>)) -> Option<Self> {
        let prefix = u32::try_from(len).ok()?;
        let mut grpc = Vec::with_capacity(PREFIX + len);
        grpc.push(0);
        grpc.extend_from_slice(&prefix.to_be_bytes());
        write(&mut grpc);
        debug_assert_eq!(grpc.len(), PREFIX + len, "encoded length as computed");
        Some(Self { grpc, message: PhantomData })
    }

    /// A message prost encodes (the rare paths: resends, fetches).
    pub fn of(message: &M) -> Option<Self> {
        Self::framed(message.encoded_len(), |buf| message.encode_raw(buf))
    }

    /// The protobuf's size, without the gRPC prefix.
    pub fn message_len(&self) -> usize {
        self.grpc.len() - PREFIX
    }

    /// The gRPC message, prefix included.
    pub fn into_grpc(self) -> Vec<u8> {
        self.grpc
    }

    /// The message read back. Only tests and tools need it: the bytes are Filterplane's
    /// own, so they always decode (an empty message if they ever did not).
    pub fn decode(&self) -> M {
        M::decode(&self.grpc[PREFIX..]).unwrap_or_default()
    }
}

/// Size of a length-delimited field with a one-byte key (field numbers up to 15).
fn field_len(payload: usize) -> usize {
    1 + encoding::encoded_len_varint(payload as u64) + payload
}

/// A string field, left out when empty (proto3, as prost does).
fn string_len(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        field_len(s.len())
    }
}

fn put_field(buf: &mut Vec<u8>, field: u32, payload: &[u8]) {
    encoding::encode_key(field, encoding::WireType::LengthDelimited, buf);
    encoding::encode_varint(payload.len() as u64, buf);
    buf.put_slice(payload);
}

fn put_string(buf: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        put_field(buf, field, s.as_bytes());
    }
}

/// `control_plane { identifier }`, as field `field`.
fn control_plane_len(identifier: &str) -> usize {
    field_len(string_len(identifier))
}

fn put_control_plane(buf: &mut Vec<u8>, field: u32, identifier: &str) {
    encoding::encode_key(field, encoding::WireType::LengthDelimited, buf);
    encoding::encode_varint(string_len(identifier) as u64, buf);
    put_string(buf, 1, identifier);
}

/// What a resource becomes in a state-of-the-world response: field 2, the `Any`.
pub(crate) fn sotw_entry(any: &Any) -> Vec<u8> {
    let mut buf = Vec::with_capacity(field_len(any.encoded_len()));
    encoding::message::encode(2, any, &mut buf);
    buf
}

/// What a resource becomes in a delta response: field 2, a `Resource` with its name,
/// version and `Any`.
pub(crate) fn delta_entry(name: &str, version: &str, any: &Any) -> Vec<u8> {
    let resource = Resource {
        name: name.to_owned(),
        version: version.to_owned(),
        resource: Some(any.clone()),
        ..Default::default()
    };
    let mut buf = Vec::with_capacity(field_len(resource.encoded_len()));
    encoding::message::encode(2, &resource, &mut buf);
    buf
}

/// A resource's entry: as encoded once, except on resend `attempt` (> 0) of Wasm code
/// Envoy fetches itself, which must differ from the NACKed bytes (`wire_resource`).
fn entry<'a>(r: &'a ServedResource, attempt: u32, delta: bool) -> Cow<'a, [u8]> {
    if attempt > 0 && r.envoy_fetches_code {
        let any = crate::stream::wire_resource(r, attempt);
        return Cow::Owned(if delta { delta_entry(&r.name, r.version.as_str(), &any) } else { sotw_entry(&any) });
    }
    Cow::Borrowed(if delta { r.delta_entry() } else { r.sotw_entry() })
}

/// What a response says besides its resources.
#[derive(Debug, Clone, Copy)]
pub struct Header<'a> {
    pub version: &'a str,
    pub type_url: &'a str,
    pub nonce: &'a str,
    pub control_plane: &'a str,
}

/// A state-of-the-world response carrying `resources` (resend `attempt`, 0 for none).
pub fn sotw_response(
    h: Header<'_>,
    resources: &[impl AsRef<ServedResource>],
    attempt: u32,
) -> Option<Wire<DiscoveryResponse>> {
    response(h, resources, None, attempt)
}

/// A delta response carrying `resources` and removing `removed`.
pub fn delta_response(
    h: Header<'_>,
    resources: &[impl AsRef<ServedResource>],
    removed: &[String],
    attempt: u32,
) -> Option<Wire<DeltaDiscoveryResponse>> {
    response(h, resources, Some(removed), attempt)
}

/// Both flavours share fields 1 (version), 2 (resources), 4 (type URL) and 5 (nonce);
/// delta adds 6 (removed names) and has its control plane at 7 rather than 6.
fn response<M: Message + Default>(
    h: Header<'_>,
    resources: &[impl AsRef<ServedResource>],
    removed: Option<&[String]>,
    attempt: u32,
) -> Option<Wire<M>> {
    let delta = removed.is_some();
    let removed = removed.unwrap_or_default();
    let entries = || resources.iter().map(|r| entry(r.as_ref(), attempt, delta));
    let len = string_len(h.version)
        + entries().map(|e| e.len()).sum::<usize>()
        + string_len(h.type_url)
        + string_len(h.nonce)
        + removed.iter().map(|n| field_len(n.len())).sum::<usize>()
        + control_plane_len(h.control_plane);
    Wire::framed(len, |buf| {
        // Fields in number order, as prost writes them.
        put_string(buf, 1, h.version);
        for e in entries() {
            buf.put_slice(&e);
        }
        put_string(buf, 4, h.type_url);
        put_string(buf, 5, h.nonce);
        for n in removed {
            // Repeated strings are written even when empty.
            put_field(buf, 6, n.as_bytes());
        }
        put_control_plane(buf, if delta { 7 } else { 6 }, h.control_plane);
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use filterplane_api::envoy_types::pb::envoy::config::core::v3::ControlPlane;

    use super::*;

    fn served(name: &str, value: &[u8], fetches: bool) -> Arc<ServedResource> {
        let any = Any { type_url: "type.googleapis.com/x.Y".into(), value: value.to_vec() };
        let version = filterplane_api::content_version([name.as_bytes(), value]);
        Arc::new(ServedResource::new(name.into(), version, any, fetches))
    }

    #[test]
    fn the_bytes_are_what_prost_writes_for_the_same_response() {
        let big = vec![7u8; 300];
        let sets: Vec<Vec<Arc<ServedResource>>> = vec![
            vec![],
            vec![served("a", b"", false)],
            vec![served("a", b"one", false), served("b", &big, false), served("", b"x", false)],
        ];
        for (version, nonce, cp) in [("", "", ""), ("0123456789abcdef", "17", "filterplane/0.1.0")] {
            for set in &sets {
                let refs: Vec<&Arc<ServedResource>> = set.iter().collect();
                let h = Header { version, type_url: "type.googleapis.com/t", nonce, control_plane: cp };
                let control_plane = Some(ControlPlane { identifier: cp.into() });
                let wire = sotw_response(h, &refs, 0).unwrap();
                let expected = DiscoveryResponse {
                    version_info: version.into(),
                    resources: set.iter().map(|r| r.any.clone()).collect(),
                    type_url: h.type_url.into(),
                    nonce: nonce.into(),
                    control_plane: control_plane.clone(),
                    ..Default::default()
                };
                assert_eq!(
                    wire.into_grpc(),
                    Wire::of(&expected).unwrap().into_grpc(),
                    "sotw {version:?} {}",
                    set.len()
                );

                for removed in [vec![], vec!["gone".to_string(), String::new()]] {
                    let wire = delta_response(h, &refs, &removed, 0).unwrap();
                    let expected = DeltaDiscoveryResponse {
                        system_version_info: version.into(),
                        resources: set
                            .iter()
                            .map(|r| Resource {
                                name: r.name.clone(),
                                version: r.version.to_string(),
                                resource: Some(r.any.clone()),
                                ..Default::default()
                            })
                            .collect(),
                        type_url: h.type_url.into(),
                        removed_resources: removed.clone(),
                        nonce: nonce.into(),
                        control_plane: control_plane.clone(),
                        ..Default::default()
                    };
                    let bytes = wire.into_grpc();
                    assert_eq!(bytes, Wire::of(&expected).unwrap().into_grpc(), "delta {version:?} {}", set.len());
                }
            }
        }
    }

    /// Random responses (names and strings of any length, values across one-, two- and
    /// three-byte length prefixes, removals) read back as what was put in.
    #[test]
    fn random_responses_read_back_as_built() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        let text = |next: &mut dyn FnMut(u64) -> u64| -> String {
            let len = [0, 1, 5, 127, 128, 300][next(6) as usize];
            (0..len).map(|i| ['a', 'é', '*', '\u{1F600}', '0'][(next(5) as usize + i) % 5]).collect()
        };
        for round in 0..300 {
            let count = next(5) as usize;
            let set: Vec<Arc<ServedResource>> = (0..count)
                .map(|i| {
                    let size = [0usize, 1, 127, 128, 300, 20_000][next(6) as usize];
                    served(&format!("{}{i}", text(&mut next)), &vec![(round % 251) as u8; size], false)
                })
                .collect();
            let refs: Vec<&Arc<ServedResource>> = set.iter().collect();
            let (version, nonce, cp) = (text(&mut next), text(&mut next), text(&mut next));
            let h = Header { version: &version, type_url: "type.googleapis.com/t", nonce: &nonce, control_plane: &cp };
            let sotw = sotw_response(h, &refs, 0).unwrap();
            let read = sotw.decode();
            assert_eq!(sotw.message_len(), read.encoded_len(), "round {round}");
            assert_eq!((read.version_info.as_str(), read.nonce.as_str()), (version.as_str(), nonce.as_str()));
            assert_eq!(read.resources, set.iter().map(|r| r.any.clone()).collect::<Vec<_>>());
            assert_eq!(read.control_plane.map(|c| c.identifier), Some(cp.clone()));

            let removed: Vec<String> = (0..next(4)).map(|_| text(&mut next)).collect();
            let delta = delta_response(h, &refs, &removed, 0).unwrap();
            let read = delta.decode();
            assert_eq!(delta.message_len(), read.encoded_len(), "round {round}");
            assert_eq!(read.removed_resources, removed);
            let names: Vec<&str> = read.resources.iter().map(|r| r.name.as_str()).collect();
            assert_eq!(names, set.iter().map(|r| r.name.as_str()).collect::<Vec<_>>());
            assert!(read
                .resources
                .iter()
                .zip(&set)
                .all(|(w, r)| w.version == r.version.as_str() && w.resource.as_ref() == Some(&r.any)));
        }
    }

    #[test]
    fn a_message_over_grpcs_4_gib_is_refused_before_anything_is_allocated() {
        let over = u32::MAX as usize + 1;
        assert!(Wire::<DiscoveryResponse>::framed(over, |_| unreachable!("nothing is written")).is_none());
        assert_eq!(Wire::<DiscoveryResponse>::framed(0, |_| {}).map(|w| w.into_grpc()), Some(vec![0, 0, 0, 0, 0]));
    }

    #[test]
    fn a_resend_of_code_envoy_fetches_differs_and_the_rest_does_not() {
        let r = served("w", b"\x0a\x01x", true);
        let plain = served("p", b"abc", false);
        let h = Header { version: "v", type_url: "t", nonce: "1", control_plane: "" };
        let first = sotw_response(h, &[&r, &plain], 0).unwrap().decode();
        let again = sotw_response(h, &[&r, &plain], 1).unwrap().decode();
        assert_eq!(first.resources[1], again.resources[1], "only code Envoy fetches changes");
        assert_eq!(again.resources[0], crate::stream::wire_resource(&r, 1));
    }
}
