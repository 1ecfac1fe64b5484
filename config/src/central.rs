//! Envoy-native Wasm configs whose code Filterplane fetches itself (as Istio's agent
//! does): any `vm_config.code` in an extension config that is `remote` (an `http_uri` and
//! a `sha256`, which may be left out: then what was fetched is pinned) or `local.filename`. The server fetches and checks each module like a
//! `wasm_plugins` entry's and rewrites the code to Filterplane's own delivery, so the
//! original URL never reaches Envoy. `wasm_fetch: envoy` on the entry opts out.

use std::path::Path;

use serde_json::Value;

use crate::sources::{check_sha256, ModuleSource};

/// One module an extension config's code names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRef {
    /// Where the `code` object is in the typed_config's canonical JSON.
    pub at: Vec<Step>,
    /// The same, as text for errors (`config.vm_config.code.remote`).
    pub path: String,
    /// As written (`https://...`, `oci://...`, a file name).
    pub url: String,
    pub source: ModuleSource,
    pub sha256: Option<String>,
}

/// One step into a JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// An extension config whose modules Filterplane fetches.
#[derive(Debug, Clone, PartialEq)]
pub struct CentralWasm {
    /// The typed_config as canonical JSON, `"@type"` included.
    pub typed_config: Value,
    pub modules: Vec<CodeRef>,
}

/// Finds every `vm_config.code` to fetch in `typed_config` (canonical JSON); an error
/// names the path inside it.
pub fn find(typed_config: &Value, base: &Path) -> Result<Vec<CodeRef>, (String, String)> {
    let mut found = Vec::new();
    walk(typed_config, &mut Vec::new(), &mut found, base)?;
    Ok(found)
}

fn text_path(at: &[Step]) -> String {
    let mut s = String::new();
    for step in at {
        match step {
            Step::Key(k) if s.is_empty() => s.push_str(k),
            Step::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn walk(v: &Value, at: &mut Vec<Step>, found: &mut Vec<CodeRef>, base: &Path) -> Result<(), (String, String)> {
    match v {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                at.push(Step::Index(i));
                walk(item, at, found, base)?;
                at.pop();
            }
        }
        Value::Object(obj) => {
            if let Some(code) = obj.get("vm_config").and_then(|vm| vm.get("code")) {
                at.extend([Step::Key("vm_config".into()), Step::Key("code".into())]);
                if let Some(r) = code_ref(code, at, base)? {
                    found.push(r);
                }
                at.truncate(at.len() - 2);
            }
            for (k, item) in obj {
                at.push(Step::Key(k.clone()));
                walk(item, at, found, base)?;
                at.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

fn code_ref(code: &Value, at: &[Step], base: &Path) -> Result<Option<CodeRef>, (String, String)> {
    let path = text_path(at);
    let (url, sha256, sub) = if let Some(remote) = code.get("remote") {
        let uri = remote.pointer("/http_uri/uri").and_then(Value::as_str).unwrap_or_default();
        let sha = remote.get("sha256").and_then(Value::as_str).filter(|s| !s.is_empty());
        (uri.to_owned(), sha.map(str::to_owned), "remote.http_uri.uri")
    } else if let Some(file) = code.pointer("/local/filename").and_then(Value::as_str) {
        let url = if file.contains("://") { file.to_owned() } else { format!("file://{file}") };
        (url, None, "local.filename")
    } else {
        // Inline bytes or strings: nothing to fetch.
        return Ok(None);
    };
    let source = ModuleSource::parse(&url, base).map_err(|m| (format!("{path}.{sub}"), m))?;
    if let Some(h) = &sha256 {
        check_sha256(h).map_err(|m| (format!("{path}.remote.sha256"), m))?;
    }
    // Without a sha256 (Istio's EnvoyFilter Wasm examples), the module is fetched once and
    // the code rewritten to what was fetched, pinned to its digest, like a plugin's.
    Ok(Some(CodeRef { at: at.to_vec(), path, url, source, sha256 }))
}

/// The JSON value at `at`, for rewriting.
pub fn at_mut<'v>(v: &'v mut Value, at: &[Step]) -> Option<&'v mut Value> {
    at.iter().try_fold(v, |v, step| match step {
        Step::Key(k) => v.get_mut(k.as_str()),
        Step::Index(i) => v.get_mut(*i),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn finds_remote_and_local_code_at_any_depth() {
        let sha = "a".repeat(64);
        let config = json!({ "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": { "vm_config": { "code": { "remote": { "http_uri": { "uri": "http://127.0.0.1:1/m.wasm" }, "sha256": sha } } } },
            "other": [ { "vm_config": { "code": { "local": { "filename": "m.wasm" } } } },
                       { "vm_config": { "code": { "local": { "inline_bytes": "AGFzbQ==" } } } } ] });
        let found = find(&config, Path::new("/tmp")).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].path, "config.vm_config.code");
        assert_eq!(found[0].sha256.as_deref(), Some(sha.as_str()));
        assert_eq!(found[1].path, "other[0].vm_config.code");
        assert_eq!(found[1].url, "file://m.wasm");
        let mut v = config.clone();
        assert!(at_mut(&mut v, &found[1].at).unwrap().get("local").is_some());
    }

    #[test]
    fn an_unpinned_download_is_fetched_and_pinned_by_what_was_fetched() {
        let config = json!({ "config": { "vm_config": { "code": { "remote": { "http_uri": { "uri": "https://x.test/m.wasm" } } } } } });
        let found = find(&config, Path::new("/")).unwrap();
        assert_eq!((found[0].url.as_str(), found[0].sha256.as_deref()), ("https://x.test/m.wasm", None));
        let bad = json!({ "config": { "vm_config": { "code": { "remote": { "http_uri": { "uri": "https://x.test/m.wasm" }, "sha256": "nope" } } } } });
        assert_eq!(find(&bad, Path::new("/")).unwrap_err().0, "config.vm_config.code.remote.sha256");
    }
}
