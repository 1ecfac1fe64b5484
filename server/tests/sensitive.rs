//! `--sensitive-to-authenticated-only`: a proxy without a client certificate gets the
//! config without the resources that hold secrets (SDS Secrets, a listener with a private
//! key inline); the rest still reaches it, and the admin API says what it goes without.

#[allow(dead_code)]
#[path = "conformance/harness.rs"]
mod harness;

use filterplane_api::Any;
use harness::*;
use prost::Message;

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

const CONFIG: &str = r#"version: 1
extension_configs:
  - name: a
    typed_config: { "@type": type.googleapis.com/google.protobuf.Struct, value: { a: 1 } }
listeners:
  - name: plain
    address: { socket_address: { address: 127.0.0.1, port_value: 10001 } }
    filter_chains: [ { filters: [ { name: envoy.filters.network.tcp_proxy, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: p, cluster: c } } ] } ]
  - name: keyed
    address: { socket_address: { address: 127.0.0.1, port_value: 10002 } }
    filter_chains:
      - transport_socket:
          name: envoy.transport_sockets.tls
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
            common_tls_context:
              tls_certificates: [ { certificate_chain: { inline_string: CERT }, private_key: { inline_string: INLINE-KEY } } ]
        filters: [ { name: envoy.filters.network.tcp_proxy, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: k, cluster: c } } ]
secrets:
  - name: server-key
    tls_certificate: { certificate_chain: { inline_string: CERT }, private_key: { inline_string: SDS-KEY } }
"#;

fn names(resources: &[Any]) -> Vec<String> {
    let mut v: Vec<String> = resources
        .iter()
        .map(|a| {
            // Listener and Secret both have `name` as field 1.
            #[derive(prost::Message)]
            struct Named {
                #[prost(string, tag = "1")]
                name: String,
            }
            Named::decode(a.value.as_slice()).map(|n| n.name).unwrap_or_default()
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_kept_from_proxies_without_a_client_certificate() {
    let plane = Plane::start_with(&[("a", "1")], |s| s.security.sensitive_to_authenticated_only = true).await;
    std::fs::write(plane.config_path(), CONFIG).unwrap();
    plane
        .wait_for("the config with secrets", |p| p.api("/api/v1/config_dump").to_string().contains("server-key"))
        .await;
    // The dump shows them, redacted.
    let dump = plane.api("/api/v1/config_dump").to_string();
    assert!(!dump.contains("INLINE-KEY") && !dump.contains("SDS-KEY") && dump.contains("[redacted]"), "{dump}");

    let mut c = SotwClient::connect(&plane, "plaintext-proxy").await;
    c.request(LDS, &[], "", "").await;
    let listeners = c.recv_ack(&[]).await;
    assert_eq!(names(&listeners.resources), ["plain"], "the keyed listener is withheld");
    c.request(SDS, &["server-key"], "", "").await;
    c.request(ECDS, &["a"], "", "").await;
    // The secret is never sent (an answer for it, if any, is empty); the extension
    // config is.
    let mut r = c.recv().await;
    if r.type_url == SDS {
        assert!(r.resources.is_empty(), "the secret was sent");
        c.request(SDS, &["server-key"], &r.version_info, &r.nonce).await;
        r = c.recv().await;
    }
    assert_eq!(r.type_url, ECDS);
    assert_eq!(ecds_names(&r.resources), ["a"]);

    let proxy = plane.api("/api/v1/proxies/plaintext-proxy");
    assert_eq!(proxy[0]["auth"]["sensitive_withheld"], true, "{proxy}");
    assert_eq!(proxy[0]["auth"]["tls"], false);
    // What this proxy is served, as the admin API dumps it: no keyed listener, no secret.
    let served = plane.api("/api/v1/config_dump?node_id=plaintext-proxy").to_string();
    assert!(served.contains("\"plain\"") && !served.contains("keyed") && !served.contains("server-key"), "{served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_every_proxy_gets_them() {
    let plane = Plane::start(&[("a", "1")]).await;
    std::fs::write(plane.config_path(), CONFIG).unwrap();
    plane
        .wait_for("the config with secrets", |p| p.api("/api/v1/config_dump").to_string().contains("server-key"))
        .await;
    let mut c = SotwClient::connect(&plane, "any").await;
    c.request(LDS, &[], "", "").await;
    assert_eq!(names(&c.recv_ack(&[]).await.resources), ["keyed", "plain"]);
    c.request(SDS, &["server-key"], "", "").await;
    let r = c.recv_ack(&["server-key"]).await;
    assert_eq!((r.type_url.as_str(), names(&r.resources)), (SDS, vec!["server-key".to_owned()]));
}
