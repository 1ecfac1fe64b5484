//! gRPC's own C core (Python `grpcio`) as an ADS client, over SotW and delta: its HTTP/2
//! (header fields, flow control, pings) passes the xDS port's RFC 9113 checks unchanged.

use filterplane_e2e::{free_port, quickstart::yaml_with, Filterplane};

#[test]
fn grpc_core_streams_sotw_and_delta() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    std::fs::write(&yaml, yaml_with("v1")).unwrap();
    let fp = Filterplane::start_with_args(&yaml, dir.path(), free_port(), free_port(), &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/grpc_core_ads.py");
    let out = std::process::Command::new("python3")
        .args([script, &fp.xds_port.to_string(), "add-header"])
        .output()
        .expect("python3 runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "grpcio client failed (scripts/test.sh installs grpcio):\n{stdout}\n{stderr}");
    assert!(stdout.contains("sotw ok") && stdout.contains("delta ok: ['add-header']"), "{stdout}");
    assert_eq!(fp.metric("filterplane_limit_hits_total{limit=\"malformed_requests\"}").unwrap_or(0.0), 0.0);
}
