//! Is it a proxy-wasm module Envoy can load? Checked before serving, because Envoy NACKs
//! most broken modules with only "Unable to create Wasm plugin", and a module without an
//! exported memory is even ACKed and then crashes Envoy on the first request.

use wasmparser::{ExternalKind, FuncType, Parser, Payload, TypeRef, ValType};

/// Module names a proxy-wasm module may import from (the host ABI and WASI).
const HOST_MODULES: [&str; 3] = ["env", "wasi_snapshot_preview1", "wasi_unstable"];

/// Signatures (parameter count, result count; all i32) of the callbacks of the
/// proxy-wasm ABI 0.2.x that Envoy calls. A callback with another signature makes Envoy
/// refuse the module.
const CALLBACKS_0_2: [(&str, usize, usize); 14] = [
    ("malloc", 1, 1),
    ("proxy_on_memory_allocate", 1, 1),
    ("proxy_on_context_create", 2, 0),
    ("proxy_on_vm_start", 2, 1),
    ("proxy_on_configure", 2, 1),
    ("proxy_on_tick", 1, 0),
    ("proxy_on_request_headers", 3, 1),
    ("proxy_on_response_headers", 3, 1),
    ("proxy_on_request_body", 3, 1),
    ("proxy_on_response_body", 3, 1),
    ("proxy_on_request_trailers", 2, 1),
    ("proxy_on_response_trailers", 2, 1),
    ("proxy_on_done", 1, 1),
    ("proxy_on_log", 1, 0),
];

/// Checks `bytes`: valid WebAssembly, exports `memory`, exactly one
/// `proxy_abi_version_*`, an allocator, callbacks with the ABI's signatures (0.2.x), and
/// imports only from the host.
pub fn check_module(bytes: &[u8]) -> Result<(), String> {
    wasmparser::Validator::new().validate_all(bytes).map_err(|e| format!("not valid WebAssembly: {e}"))?;
    let mut exports: Vec<(String, ExternalKind, u32)> = Vec::new();
    let mut types: Vec<FuncType> = Vec::new();
    // The type of every function by index: imported ones first, then the module's own.
    let mut functions: Vec<u32> = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| format!("not valid WebAssembly: {e}"))? {
            Payload::TypeSection(reader) => {
                for ty in reader.into_iter_err_on_gc_types() {
                    types.push(ty.map_err(|e| e.to_string())?);
                }
            }
            Payload::FunctionSection(reader) => {
                for ty in reader {
                    functions.push(ty.map_err(|e| e.to_string())?);
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader {
                    let import = import.map_err(|e| e.to_string())?;
                    if let TypeRef::Func(ty) = import.ty {
                        functions.push(ty);
                    }
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
                    exports.push((export.name.to_owned(), export.kind, export.index));
                }
            }
            _ => {}
        }
    }
    let has = |name: &str, kind: ExternalKind| exports.iter().any(|(n, k, _)| n == name && *k == kind);
    if !has("memory", ExternalKind::Memory) {
        return Err("does not export `memory` (Envoy would accept it and crash on the first request)".into());
    }
    let abi: Vec<&str> =
        exports.iter().filter(|(n, _, _)| n.starts_with("proxy_abi_version_")).map(|(n, _, _)| n.as_str()).collect();
    match abi.as_slice() {
        [v] if v.starts_with("proxy_abi_version_0_2_") => {
            for (name, kind, index) in &exports {
                let Some((_, params, results)) = CALLBACKS_0_2.iter().find(|(c, _, _)| c == name) else { continue };
                if *kind != ExternalKind::Func {
                    continue;
                }
                let ty = functions.get(*index as usize).and_then(|t| types.get(*t as usize));
                let all_i32 = |v: &[ValType]| v.iter().all(|t| *t == ValType::I32);
                let ok = ty.is_some_and(|t| {
                    t.params().len() == *params
                        && t.results().len() == *results
                        && all_i32(t.params())
                        && all_i32(t.results())
                });
                if !ok {
                    return Err(format!(
                        "callback `{name}` must take {params} i32 and return {results} i32 under {v}; Envoy would refuse the module"
                    ));
                }
            }
        }
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
        include_str!("../../e2e/testdata/add_header.wat")
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
        let bad_sig = header_module_wat("v1", "")
            .replace(
                "(func (export \"proxy_on_response_headers\") (param i32 i32 i32) (result i32)",
                "(func (export \"proxy_on_response_headers\") (param i32 i32) (result i32)",
            )
            .replace("(i32.const {LEN})", "(i32.const 2)");
        let e = check_module(&wat::parse_str(bad_sig).unwrap()).unwrap_err();
        assert!(e.contains("proxy_on_response_headers") && e.contains("3 i32"), "{e}");
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
