//! Filterplane's view of the xDS API: type URLs, Envoy's protobuf descriptor pool,
//! Envoy-native JSON to protobuf `Any`, and content hashing for resource versions.
//! Knows nothing about sockets or tokio; the one file reader, bounded, is `files`.

#![deny(clippy::unwrap_used)]

pub mod descriptors;
pub mod json;
pub mod types;
pub mod version;

pub use envoy_types;
pub use envoy_types::pb::google::protobuf::Any;
pub use json::{any_from_json, JsonToAnyError, TypedMessage};
pub use types::ResourceType;
pub use version::{content_version, hmac_sha256_hex, ResourceVersion};
pub mod files;
