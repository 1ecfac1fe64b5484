//! Is it a proxy-wasm module Envoy can load? Checked before serving, because Envoy NACKs
//! most broken modules with only "Unable to create Wasm plugin", and a module without an
//! exported memory is even ACKed and then crashes Envoy on the first request.

use wasmparser::{ExternalKind, Parser, Payload};

/// Module names a proxy-wasm module may import from (the host ABI and WASI).
const HOST_MODULES: [&str; 3] = ["env", "wasi_snapshot_preview1", "wasi_unstable"];

/// Checks `bytes`: valid WebAssembly, exports `memory`, exactly one
/// `proxy_abi_version_*`, an allocator, and imports only from the host.
pub fn check_module(bytes: &[u8]) -> Result<(), String> {
    wasmparser::Validator::new().validate_all(bytes).map_err(|e| format!("not valid WebAssembly: {e}"))?;
    let mut exports: Vec<(String, ExternalKind)> = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| format!("not valid WebAssembly: {e}"))? {
            Payload::ImportSection(reader) => {
                for import in reader {
                    let import = import.map_err(|e| e.to_string())?;
                    if !HOST_MODULES.contains(&import.module) {
                        return Err(format!(
                            "imports {}.{} from a module the proxy-wasm host does not provide (only {})",
                            import.module,
                            import.name,
                            HOST_MODULES.join(", ")
                        ));
                    }
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(|e| e.to_string())?;
                    exports.push((export.name.to_owned(), export.kind));
                }
            }
            _ => {}
        }
    }
    let has = |name: &str, kind: ExternalKind| exports.iter().any(|(n, k)| n == name && *k == kind);
    if !has("memory", ExternalKind::Memory) {
        return Err("does not export `memory` (Envoy would accept it and crash on the first request)".into());
    }
    let abi: Vec<&str> =
        exports.iter().filter(|(n, _)| n.starts_with("proxy_abi_version_")).map(|(n, _)| n.as_str()).collect();
    match abi.as_slice() {
        [_] => {}
        [] => return Err("exports no proxy_abi_version_* function: not a proxy-wasm module".into()),
        many => return Err(format!("exports several ABI versions ({}); exactly one is allowed", many.join(", "))),
    }
    if !has("malloc", ExternalKind::Func) && !has("proxy_on_memory_allocate", ExternalKind::Func) {
        return Err("exports no allocator (`malloc` or `proxy_on_memory_allocate`)".into());
    }
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A proxy-wasm module that adds `x-wasm: VALUE` to responses.
    pub fn header_module(value: &str) -> Vec<u8> {
        wat::parse_str(header_module_wat(value, "")).expect("valid WAT")
    }

    /// The module text shared with the end-to-end tests (`e2e/testdata/add_header.wat`),
    /// with `{VALUE}`, `{LEN}` and `{EXTRA}` filled in.
    pub fn header_module_wat(value: &str, extra: &str) -> String {
        include_str!("../../../e2e/testdata/add_header.wat")
            .replace("{VALUE}", value)
            .replace("{LEN}", &value.len().to_string())
            .replace("{EXTRA}", extra)
    }

    #[test]
    fn a_proxy_wasm_module_passes() {
        check_module(&header_module("v1")).unwrap();
    }

    #[test]
    fn broken_modules_are_refused_with_the_reason() {
        assert!(check_module(b"not wasm").unwrap_err().contains("not valid WebAssembly"));
        let no_memory = header_module_wat("v1", "").replace(r#"(memory (export "memory") 17)"#, "(memory 17)");
        assert!(check_module(&wat::parse_str(no_memory).unwrap()).unwrap_err().contains("memory"));
        let no_abi = header_module_wat("v1", "").replace(r#"(func (export "proxy_abi_version_0_2_1"))"#, "");
        assert!(check_module(&wat::parse_str(no_abi).unwrap()).unwrap_err().contains("proxy_abi_version"));
        let two_abi = header_module_wat("v1", r#"(func (export "proxy_abi_version_0_1_0"))"#);
        assert!(check_module(&wat::parse_str(two_abi).unwrap()).unwrap_err().contains("several"));
        let no_malloc = header_module_wat("v1", "").replace(r#"(export "malloc")"#, "");
        assert!(check_module(&wat::parse_str(no_malloc).unwrap()).unwrap_err().contains("allocator"));
        let foreign = header_module_wat("v1", r#"(import "evil" "f" (func))"#);
        // Imports must come first in WAT; put it there.
        let foreign = foreign.replacen("(module\n", "(module\n  (import \"evil\" \"f\" (func))\n", 1).replace(
            r#"(import "evil" "f" (func))
)"#,
            ")",
        );
        assert!(check_module(&wat::parse_str(foreign).unwrap()).unwrap_err().contains("evil.f"));
    }
}
