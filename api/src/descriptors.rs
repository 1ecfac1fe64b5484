//! The descriptor pool of every protobuf type envoy-types was generated from: Envoy's API,
//! xds, udpa, validate and the well-known types. Decoded once, on first use (~50 ms).

use std::sync::OnceLock;

use prost_reflect::DescriptorPool;

static ENCODED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

/// The process-wide pool. Panics only if the bytes compiled into this binary are corrupt,
/// which the unit tests below would catch at build time.
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(ENCODED).expect("envoy-types ships a valid FileDescriptorSet"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_has_envoy_and_well_known_types() {
        let pool = pool();
        for name in [
            "envoy.config.listener.v3.Listener",
            "envoy.config.core.v3.TypedExtensionConfig",
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "envoy.extensions.filters.http.wasm.v3.Wasm",
            "google.protobuf.Struct",
        ] {
            assert!(pool.get_message_by_name(name).is_some(), "{name} missing");
        }
    }
}
