//! Envoy's client status service (CSDS) on the xDS port, asked by gRPC's own C core
//! (Python `grpcio`, messages encoded by hand) about real Envoys, one of which NACKs.

use filterplane_e2e::{
    example_bootstrap,
    quickstart::{ECDS, WAIT},
    wait_until, Envoy, EnvoyPorts, Filterplane,
};
use serde_json::Value;

/// `add-header` for everybody, but a Buffer filter for `csds-bad`, which its listener
/// does not allow: that Envoy NACKs it.
const YAML: &str = r#"version: 1
extension_configs:
  - name: add-header
    node_selector: { ids: [csds-bad] }
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
      max_request_bytes: 1024
  - name: add-header
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
      mutations:
        response_mutations:
          - append: { header: { key: x-plugin, value: v1 } }
"#;

fn ask(fp: &Filterplane, prefix: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/csds_client.py");
    let out = std::process::Command::new("python3")
        .args([script, &fp.xds_port.to_string(), prefix])
        .output()
        .expect("python3 runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "grpcio CSDS client failed:\n{stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn ecds_of<'a>(proxies: &'a Value, node: &str) -> Option<&'a Value> {
    let p = proxies.as_array()?.iter().find(|p| p["node"] == node)?;
    p["configs"].as_array()?.iter().find(|c| c["type_url"] == ECDS && c["name"] == "add-header")
}

#[test]
fn csds_reports_each_proxys_resources_acked_and_nacked_to_an_independent_client() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    std::fs::write(&yaml, YAML).unwrap();
    let fp = Filterplane::start(&yaml, dir.path());
    let envoys: Vec<Envoy> = ["csds-ok", "csds-bad"]
        .iter()
        .map(|node| {
            let ports = EnvoyPorts::new(fp.xds_port);
            Envoy::start(&example_bootstrap("quickstart/envoy.yaml", ports, node), ports, dir.path(), node)
        })
        .collect();
    let both = wait_until("both Envoys ACKed or NACKed", WAIT, || {
        let v = ask(&fp, "csds-");
        let ok = ecds_of(&v["stream"], "csds-ok")?["client_status"] == "ACKED";
        let bad = ecds_of(&v["stream"], "csds-bad")?["client_status"] == "NACKED";
        (ok && bad).then_some(v)
    });
    let ok = ecds_of(&both["stream"], "csds-ok").unwrap();
    assert_eq!(ok["config_status"], "SYNCED", "{ok}");
    assert_eq!(ok["has_content"], true, "the stream asked with contents: {ok}");
    assert!(!ok["version"].as_str().unwrap().is_empty());
    let bad = ecds_of(&both["stream"], "csds-bad").unwrap();
    assert_eq!(bad["config_status"], "ERROR", "{bad}");
    assert!(bad["error"].as_str().unwrap().contains("Buffer"), "Envoy's own message: {bad}");
    // The unary call: node ids with the prefix only, without contents.
    let v = ask(&fp, "csds-o");
    let fetched = v["fetch"].as_array().unwrap();
    assert_eq!(fetched.len(), 1, "{v}");
    assert_eq!(fetched[0]["node"], "csds-ok");
    assert!(fetched[0]["configs"].as_array().unwrap().iter().all(|c| c["has_content"] == false), "{v}");
    drop(envoys);
}
