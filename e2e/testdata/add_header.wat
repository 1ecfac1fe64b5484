;; A minimal proxy-wasm module (ABI 0.2.1) that adds `x-wasm: {VALUE}` to every response.
;; Used by the unit tests (server/src/wasm/check.rs) and the end-to-end tests, which fill in
;; {VALUE}, {LEN} (its length) and {EXTRA} (more module fields, or nothing).
(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 17)
  (data (i32.const 16) "x-wasm")
  (data (i32.const 64) "{VALUE}")
  ;; A bump allocator for what the host hands the plugin; it starts over past 1 MiB,
  ;; which is plenty for a module that keeps nothing between calls.
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param $size i32) (result i32)
    (local $p i32)
    (if (i32.gt_u (i32.add (global.get $heap) (local.get $size)) (i32.const 1048576))
      (then (global.set $heap (i32.const 4096))))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $p))
  ;; 2 = the response header map.
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 2) (i32.const 16) (i32.const 6) (i32.const 64) (i32.const {LEN})))
    (i32.const 0))
  {EXTRA}
)
