//! The gateway example as the tests run it: its config on a test's ports, and what
//! Envoy's own config dump says about the `edge` listener's filter chains.

use serde_json::Value;

use crate::{example_text, Envoy, EnvoyPorts};

/// The filters of the `edge` listener's chain, as Envoy's own config dump shows them.
pub fn edge_filters(envoy: &Envoy) -> Vec<Value> {
    let dump = envoy.admin("/config_dump?resource=dynamic_listeners").map(|r| r.body).unwrap_or_default();
    let v: Value = serde_json::from_str(&dump).unwrap_or(Value::Null);
    v["configs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == "edge")
        .flat_map(|c| {
            c["active_state"]["listener"]["filter_chains"][0]["filters"].as_array().cloned().unwrap_or_default()
        })
        .collect()
}

pub fn names(filters: &[Value]) -> Vec<String> {
    filters.iter().filter_map(|f| f["name"].as_str().map(str::to_owned)).collect()
}

/// The HTTP filter names of the `edge` listener's connection manager.
pub fn http_filters(envoy: &Envoy) -> Vec<String> {
    let hcm = edge_filters(envoy).into_iter().last().unwrap_or(Value::Null);
    names(hcm["typed_config"]["http_filters"].as_array().map(Vec::as_slice).unwrap_or_default())
}

/// The example's config on this test's ports: the listener's, and the backend's
/// (Filterplane's admin).
pub fn gateway_config(ports: &EnvoyPorts, admin_port: u16) -> String {
    example_text("gateway/filterplane.yaml")
        .replace("port_value: 10000", &format!("port_value: {}", ports.listener))
        .replace("port_value: 18001", &format!("port_value: {admin_port}"))
}
