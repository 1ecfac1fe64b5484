//! Filterplane's YAML: the schema, loading a file or directory, validation against
//! Envoy's descriptors with file/line/path errors, and compiling to xDS resources.
//! Opens no sockets and keeps no global state.

#![deny(clippy::unwrap_used)]

pub mod central;
pub mod compile;
pub mod compiled;
pub mod error;
pub mod incremental;
pub mod istio;
pub mod line_table;
pub mod lines;
pub mod load;
pub mod model;
pub mod order;
pub mod parsed;
pub mod placement;
pub mod selector;
pub mod sources;
pub mod wasm;

use std::path::Path;

pub use compile::{assemble_listener, compile, CompiledConfig, CompiledResource, Origin};
pub use error::{ConfigError, ConfigErrors};
pub use model::{Document, NodeSelector, SCHEMA_VERSION};
pub use selector::{NodeFacts, VersionPattern};

/// Reads, validates and compiles the config at `path` (a file or a directory).
pub fn load(path: &Path) -> Result<CompiledConfig, ConfigErrors> {
    load_with(path, load::MAX_FILE_BYTES)
}

/// `load`, reading no config file larger than `max_file_bytes`.
pub fn load_with(path: &Path, max_file_bytes: u64) -> Result<CompiledConfig, ConfigErrors> {
    let files = load::parse_all_with(path, max_file_bytes)?;
    compile(&files)
}

#[cfg(test)]
mod tests;
