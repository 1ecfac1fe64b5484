//! Copies the FileDescriptorSet that envoy-types ships (`src/generated/types.bin`) into
//! OUT_DIR, so the descriptor pool matches the compiled Envoy types exactly.
//! envoy-types does not export it, so we find its source directory through `cargo metadata`.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform"])
        .arg(env::var("TARGET").expect("cargo sets TARGET"))
        .current_dir(&manifest_dir)
        .output()
        .expect("run cargo metadata");
    assert!(output.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let manifest = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("envoy-types is a dependency of filterplane-api");
    let src =
        PathBuf::from(manifest).parent().expect("manifest has a parent directory").join("src/generated/types.bin");
    std::fs::copy(&src, out.join("envoy_descriptors.bin")).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", src.display());
}
