//! What the protocol state machines' unit tests share.

use std::{path::Path, sync::Arc};

use filterplane_config::NodeFacts;

use crate::cache::{Generation, Snapshot};

/// A snapshot holding one header-mutation extension config per (name, header value).
pub fn snapshot(entries: &[(&str, &str)]) -> Arc<Snapshot> {
    let mut yaml = String::from("version: 1\nextension_configs:\n");
    for (name, value) in entries {
        yaml.push_str(&format!(
            "  - name: {name}\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-plugin, value: \"{value}\" }} }} }} ] }}\n"
        ));
    }
    let parsed = filterplane_config::load::parse_file(Path::new("test.yaml"), &yaml).expect("test YAML parses");
    let config = filterplane_config::compile(&[parsed]).expect("test YAML compiles");
    Generation::new(config).snapshot_for(&NodeFacts::default())
}
