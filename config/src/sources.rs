//! Where a Wasm module comes from (file, HTTP(S), OCI) and what a pin looks like: a leaf
//! that plugins and Envoy-native Wasm configs both read.

use std::path::PathBuf;

/// Where a module comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModuleSource {
    /// A path, relative ones taken from the config file's directory.
    File(PathBuf),
    /// An http:// or https:// URL.
    Http(String),
    /// `registry/repository` plus a tag, a digest, or both.
    Oci { registry: String, repository: String, tag: Option<String>, digest: Option<String> },
}

impl ModuleSource {
    /// Parses a plugin `url`. `base` is the directory relative `file://` paths start from.
    pub fn parse(url: &str, base: &std::path::Path) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err("file:// needs a path".into());
            }
            let p = PathBuf::from(path);
            return Ok(ModuleSource::File(if p.is_absolute() { p } else { base.join(p) }));
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return Ok(ModuleSource::Http(url.to_owned()));
        }
        let Some(rest) = url.strip_prefix("oci://") else {
            return Err(format!("\"{url}\" must start with file://, http://, https:// or oci://"));
        };
        let (rest, digest) = match rest.split_once('@') {
            Some((r, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| format!("digest \"{d}\" must be sha256:<64 hex digits>"))?;
                check_sha256(hex)?;
                (r, Some(d.to_owned()))
            }
            None => (rest, None),
        };
        let (registry, path) =
            rest.split_once('/').ok_or_else(|| format!("\"{url}\" needs oci://REGISTRY/REPOSITORY[:TAG]"))?;
        // A ':' after the last '/' is a tag; one before it belongs to the registry's port.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_owned())),
            _ => (path, None),
        };
        if registry.is_empty() || repository.is_empty() {
            return Err(format!("\"{url}\" needs oci://REGISTRY/REPOSITORY[:TAG]"));
        }
        Ok(ModuleSource::Oci { registry: registry.into(), repository: repository.into(), tag, digest })
    }
}

/// A 64-digit lowercase hex SHA-256, or why not.
pub fn check_sha256(hex: &str) -> Result<(), String> {
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(format!("\"{hex}\" is not a SHA-256 (64 lowercase hex digits)"))
    }
}
