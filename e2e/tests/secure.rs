//! Filterplane across a network, with a real Envoy and certificates made at test time:
//! xDS over mTLS with node identity, certificate files replaced while Envoy is connected,
//! remote Wasm over the TLS module listener, and the admin API behind its token (and TLS),
//! with private keys never shown.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use filterplane_e2e::{
    browser::Browser,
    example_bootstrap, example_text, filterplane_bin, free_port, http_get, http_get_with,
    pki::{file_serial, served_serial, write_pair, Ca, Pair},
    services::header_module,
    wait_until, Envoy, EnvoyPorts, Filterplane,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const SPIFFE: &str = "spiffe://example.org/envoy/";

struct Secure {
    fp: Filterplane,
    ca: Ca,
    dir: tempfile::TempDir,
    yaml: PathBuf,
    server: Pair,
    modules_port: u16,
}

/// Filterplane with xDS over mTLS (`--node-identity`: a proxy may claim the node its
/// SPIFFE id names), modules on a TLS listener of their own, and `extra` flags.
fn start(config: &str, extra: &[&str]) -> Secure {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "fp");
    let server = ca.server("server");
    let yaml = dir.path().join("filterplane.yaml");
    fs::write(&yaml, config).unwrap();
    let modules_port = free_port();
    let rule = format!("uri={SPIFFE}*,node=$1");
    let modules_addr = format!("127.0.0.1:{modules_port}");
    let mut args: Vec<&str> = vec![
        "--xds-tls-cert",
        server.cert.to_str().unwrap(),
        "--xds-tls-key",
        server.key.to_str().unwrap(),
        "--xds-client-ca",
        ca.cert.to_str().unwrap(),
        "--node-identity",
        &rule,
        "--modules-addr",
        &modules_addr,
        "--modules-tls-cert",
        server.cert.to_str().unwrap(),
        "--modules-tls-key",
        server.key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let fp = Filterplane::start_with_args(&yaml, dir.path(), free_port(), free_port(), &args);
    Secure { fp, ca, dir, yaml, server, modules_port }
}

impl Secure {
    /// An Envoy on `examples/secure/envoy.yaml` naming `node_id`, with a client
    /// certificate `cert` (from `ca`) for `spiffe://example.org/envoy/<san_node>`.
    fn envoy(&self, node_id: &str, san_node: &str, ca: &Ca) -> Envoy {
        let pki = self.dir.path().join(format!("pki-{node_id}"));
        fs::create_dir_all(&pki).unwrap();
        let client = ca.issue(&format!("client-{node_id}"), &[&format!("uri:{SPIFFE}{san_node}")], false);
        fs::copy(&client.cert, pki.join("envoy.pem")).unwrap();
        fs::copy(&client.key, pki.join("envoy-key.pem")).unwrap();
        // Envoy trusts Filterplane's CA whatever CA signed its own certificate.
        fs::copy(&self.ca.cert, pki.join("ca.pem")).unwrap();
        let ports = EnvoyPorts::new(self.fp.xds_port);
        let text = example_bootstrap("secure/envoy.yaml", ports, node_id);
        assert!(text.contains("port_value: 18002") && text.contains("/etc/filterplane/pki/"));
        let text = text
            .replace("port_value: 18002", &format!("port_value: {}", self.modules_port))
            .replace("/etc/filterplane/pki/", &format!("{}/", pki.display()));
        Envoy::start(&text, ports, self.dir.path(), node_id)
    }

    fn header(envoy: &Envoy, name: &str) -> Option<String> {
        envoy.get("/").and_then(|r| r.header(name).map(str::to_owned))
    }

    fn wait_header(envoy: &Envoy, name: &str, value: &str) {
        wait_until(&format!("{name}: {value} through Envoy"), WAIT, || {
            (Self::header(envoy, name).as_deref() == Some(value)).then_some(())
        });
    }
}

fn quickstart_with(value: &str) -> String {
    example_text("quickstart/filterplane.yaml").replace("value: v1", &format!("value: {value}"))
}

#[test]
fn mtls_node_identity_and_certificates_replaced_while_connected() {
    let s = start(&quickstart_with("v1"), &[]);
    let good = s.envoy("secure-envoy", "secure-envoy", &s.ca);
    Secure::wait_header(&good, "x-plugin", "v1");
    let proxy = s.fp.api("/api/v1/proxies/secure-envoy");
    assert_eq!(proxy[0]["auth"]["tls"], true, "{proxy}");
    assert_eq!(proxy[0]["auth"]["certificate"], serde_json::json!([format!("uri:{SPIFFE}secure-envoy")]));
    let stream_id = proxy[0]["stream_id"].clone();

    // A certificate from another CA: refused in the handshake, never a proxy.
    let other_ca = Ca::new(s.dir.path(), "other");
    let foreign = s.envoy("foreign", "foreign", &other_ca);
    wait_until("a refused handshake", WAIT, || {
        (s.fp.metric(r#"filterplane_tls_handshake_failures_total{port="xds"}"#)? >= 1.0).then_some(())
    });
    wait_until("Envoy to see the refusal", WAIT, || {
        (foreign.stat("cluster.filterplane.ssl.connection_error")? >= 1).then_some(())
    });
    // Not `control_plane.connected_state`: Envoy sets it to 1 when it opens a stream,
    // before the handshake, so it flickers while Envoy retries. What counts is no config.
    assert!(Secure::header(&foreign, "x-plugin").is_none(), "the foreign Envoy got no config");
    assert_eq!(http_get(&s.fp.url("/api/v1/proxies/foreign")).map(|r| r.status), Some(404));

    // A valid certificate for secure-envoy, claiming another node: the stream ends with
    // PERMISSION_DENIED, counted, logged once, shown.
    let impostor = s.envoy("impostor", "secure-envoy", &s.ca);
    let refusal = wait_until("the impostor refused at least twice (Envoy retries)", WAIT, || {
        let r = s.fp.api("/api/v1/refusals");
        let first = r.as_array()?.iter().find(|r| r["node_id"] == "impostor")?.clone();
        (first["count"].as_u64()? >= 2).then_some(first)
    });
    assert_eq!(refusal["certificate"], serde_json::json!([format!("uri:{SPIFFE}secure-envoy")]));
    assert!(refusal["message"].as_str().unwrap().contains("no --node-identity rule allows it"), "{refusal}");
    assert!(s.fp.metric("filterplane_xds_identity_refusals_total").unwrap() >= 2.0);
    let log = s.fp.log_text();
    assert_eq!(log.matches("xDS stream refused").count(), 1, "logged once per node and certificate");
    assert_eq!(http_get(&s.fp.url("/api/v1/proxies/impostor")).map(|r| r.status), Some(404));
    assert!(Secure::header(&impostor, "x-plugin").is_none(), "the impostor got no config");
    // And the page shows it.
    let browser = Browser::start(s.dir.path());
    browser.goto(&s.fp.url("/"));
    wait_until("the page to list the refusal", WAIT, || {
        let t = browser.text("#refusals");
        (t.contains("impostor") && t.contains(&format!("uri:{SPIFFE}secure-envoy"))).then_some(())
    });

    // Replace the server certificate (a new key too) while Envoy is connected: the next
    // handshake presents it, the open stream goes on and still carries changes.
    let client = s.ca.issue("probe", &[&format!("uri:{SPIFFE}probe")], false);
    let before = served_serial(s.fp.xds_port, &s.ca.cert, &client).expect("TLS answers");
    assert_eq!(before, file_serial(&s.server.cert));
    let renewed = s.ca.server("renewed");
    write_pair(&s.server, &fs::read_to_string(&renewed.cert).unwrap(), &fs::read_to_string(&renewed.key).unwrap());
    let after = file_serial(&s.server.cert);
    assert_ne!(before, after);
    wait_until("new handshakes to use the new certificate", WAIT, || {
        (served_serial(s.fp.xds_port, &s.ca.cert, &client)? == after).then_some(())
    });
    assert!(s.fp.metric(r#"filterplane_tls_reloads_total{result="applied"}"#).unwrap() >= 1.0);
    fs::write(&s.yaml, quickstart_with("after-renewal")).unwrap();
    Secure::wait_header(&good, "x-plugin", "after-renewal");
    let proxy = s.fp.api("/api/v1/proxies/secure-envoy");
    assert_eq!(proxy[0]["stream_id"], stream_id, "the same stream, never dropped: {proxy}");
    assert_eq!(good.stat("control_plane.connected_state"), Some(1));
}

/// `curl` over TLS trusting `ca`: (status, body).
fn curl(url: &str, ca: &Path, headers: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--noproxy", "*", "-o", "-", "-w", "\n%{http_code}", "--cacert"]).arg(ca);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn remote_wasm_over_the_tls_module_listener() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("hdr.wasm");
    fs::write(&module, header_module("over-tls")).unwrap();
    let config = format!(
        "version: 1\nwasm_plugins:\n  - name: add-header\n    url: file://{}\n    delivery: remote\n    plugin_config: {{ greeting: hi }}\n",
        module.display()
    );
    let root = dir.path().to_str().unwrap().to_owned();
    let s = start(&config, &["--wasm-file-root", &root]);
    let envoy = s.envoy("secure-envoy", "secure-envoy", &s.ca);
    Secure::wait_header(&envoy, "x-wasm", "over-tls");
    assert_eq!(s.fp.metric("filterplane_wasm_module_downloads_total"), Some(1.0), "downloaded from the module port");

    let dump = s.fp.api("/api/v1/config_dump");
    let remote = &dump["resources"][0]["resource"]["typed_config"]["config"]["vm_config"]["code"]["remote"];
    let uri = remote["http_uri"]["uri"].as_str().unwrap().to_owned();
    let sha = remote["sha256"].as_str().unwrap().to_owned();
    let base = format!("https://127.0.0.1:{}", s.modules_port);
    assert!(uri.starts_with(&format!("{base}/modules/")) && !uri.contains(&sha), "{uri}");
    let (status, body) = curl(&uri, &s.ca.cert, &[]);
    assert_eq!((status, body.len() > 8), (200, true));
    // Nothing but modules there, and no module by a guessable path.
    for path in ["/", "/healthz", "/metrics", "/api/v1/config", "/api/v1/config_dump"] {
        assert_eq!(curl(&format!("{base}{path}"), &s.ca.cert, &[]).0, 404, "{path} on the module port");
    }
    for guess in [format!("/modules/sha256/{sha}"), format!("/modules/{sha}")] {
        assert_eq!(curl(&format!("{base}{guess}"), &s.ca.cert, &[]).0, 404, "{guess}");
    }
    // The admin port does not serve modules when a module port does.
    let path = uri.trim_start_matches(&base).to_owned();
    assert_eq!(http_get(&s.fp.url(&path)).map(|r| r.status), Some(404));
    // Plaintext to the TLS module port gets nothing.
    assert!(http_get(&format!("http://127.0.0.1:{}{path}", s.modules_port)).is_none_or(|r| r.status != 200));

    // A module no served config refers to any more is not served.
    fs::write(&s.yaml, "version: 1\nextension_configs:\n  - name: add-header\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations: { response_mutations: [ { append: { header: { key: x-plugin, value: plain } } } ] }\n").unwrap();
    Secure::wait_header(&envoy, "x-plugin", "plain");
    assert_eq!(curl(&uri, &s.ca.cert, &[]).0, 404, "no longer referenced");
}

/// The gateway example with one more listener, holding a private key inline (Envoy gets
/// it; nobody else sees it).
fn config_with_inline_key(key_pem: &str, cert_pem: &str, ports: [u16; 2]) -> String {
    let indent = |t: &str| t.lines().map(|l| format!("                      {l}")).collect::<Vec<_>>().join("\n");
    let listener = format!(
        "listeners:\n  - name: tls-ingress\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }}\n    filter_chains:\n      - transport_socket:\n          name: envoy.transport_sockets.tls\n          typed_config:\n            \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n            common_tls_context:\n              tls_certificates:\n                - certificate_chain:\n                    inline_string: |\n{}\n                  private_key:\n                    inline_string: |\n{}\n        filters:\n          - name: envoy.filters.network.tcp_proxy\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n              stat_prefix: t\n              cluster: backend\n",
        ports[1],
        indent(cert_pem),
        indent(key_pem)
    );
    let text = example_text("gateway/filterplane.yaml");
    assert!(text.contains("listeners:\n") && text.contains("port_value: 10000"));
    text.replace("port_value: 10000", &format!("port_value: {}", ports[0])).replacen("listeners:\n", &listener, 1)
}

/// Writes an empty config at `yaml` (the real one needs Envoy's ports) and returns it.
fn yaml_placeholder(yaml: &Path) -> PathBuf {
    fs::write(yaml, "version: 1\n").unwrap();
    yaml.to_path_buf()
}

#[test]
fn admin_token_tls_host_check_and_private_keys_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "admin");
    let admin_cert = ca.server("admin");
    let inline = ca.server("inline");
    let key_pem = fs::read_to_string(&inline.key).unwrap();
    // A distinctive piece of the key's base64 body.
    let key_body: String = key_pem.lines().nth(1).unwrap().chars().take(40).collect();
    let token_file = dir.path().join("token");
    fs::write(&token_file, "t0ken-for-tests\n").unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    let mut fp = Filterplane::start_with_args(
        &yaml_placeholder(&yaml),
        dir.path(),
        free_port(),
        free_port(),
        &["--admin-token-file", token_file.to_str().unwrap()],
    );
    // A real Envoy gets the listener, key and all, over loopback.
    let ports = EnvoyPorts::new(fp.xds_port);
    let config =
        config_with_inline_key(&key_pem, &fs::read_to_string(&inline.cert).unwrap(), [ports.listener, free_port()]);
    fs::write(&yaml, config).unwrap();
    let envoy = Envoy::start(&example_bootstrap("gateway/envoy.yaml", ports, "keyed"), ports, dir.path(), "envoy");

    // Without the token: 401 everywhere but the probes.
    for path in ["/", "/api/v1/config", "/api/v1/proxies", "/api/v1/config_dump", "/metrics"] {
        let r = http_get(&fp.url(path)).unwrap();
        assert_eq!(r.status, 401, "{path}");
    }
    let r = http_get(&fp.url("/api/v1/config")).unwrap();
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"filterplane\""));
    assert_eq!(http_get(&fp.url("/healthz")).unwrap().status, 200);
    assert_eq!(http_get(&fp.url("/readyz")).unwrap().status, 200);
    let wrong = [("authorization", "Bearer nope")];
    assert_eq!(http_get_with(&fp.url("/api/v1/config"), &wrong).unwrap().status, 401);
    fp.token = Some("t0ken-for-tests".into());
    let proxies = wait_until("Envoy to ACK the listener", WAIT, || {
        let p = fp.api("/api/v1/proxies/keyed");
        let lds = &p[0]["types"]["type.googleapis.com/envoy.config.listener.v3.Listener"];
        (lds["state"] == "synced").then_some(p)
    });
    assert!(fp.metric("filterplane_admin_unauthorized_total").unwrap() >= 7.0);
    // A foreign Host is refused even with the token (DNS rebinding).
    let foreign = [("host", "rebind.attacker.example"), ("authorization", "Bearer t0ken-for-tests")];
    assert_eq!(http_get_with(&fp.url("/api/v1/config"), &foreign).unwrap().status, 421);

    // The CLI sends the token from --token-file, and says what is missing without it.
    let cli = |args: &[&str]| Command::new(filterplane_bin()).args(args).output().unwrap();
    let out = cli(&["status", "--admin", &fp.url(""), "--token-file", token_file.to_str().unwrap()]);
    let status_text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && status_text.contains("keyed"),
        "{status_text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["status", "--admin", &fp.url("")]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--token-file"));
    let out = cli(&["reload", "--admin", &fp.url(""), "--token-file", token_file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // The private key appears nowhere: not in the config dumps (all, or as a proxy gets
    // them), the API, `filterplane status`, the page, or the log (debug level).
    let dump = fp.api("/api/v1/config_dump").to_string();
    assert!(dump.contains("[redacted]") && dump.contains("tls-ingress"), "{dump}");
    let mut shown =
        vec![dump, fp.api("/api/v1/config_dump?node_id=keyed").to_string(), proxies.to_string(), status_text];
    for path in ["/api/v1/config", "/api/v1/rejects", "/api/v1/proxies"] {
        shown.push(fp.api(path).to_string());
    }
    let browser = Browser::start(dir.path());
    browser.goto(&fp.url("/"));
    browser.eval("document.getElementById('token').value = 't0ken-for-tests'; document.getElementById('sign-in').click(); return true;");
    wait_until("the page, signed in, to list the proxy", WAIT, || {
        browser.text("#proxies").contains("keyed").then_some(())
    });
    shown.push(browser.eval("return document.documentElement.outerHTML;").to_string());
    shown.push(fp.log_text());
    for (i, text) in shown.iter().enumerate() {
        assert!(!text.contains(&key_body), "shown #{i} holds the private key");
    }
    assert!(fp.log_text().contains("sent"), "the log is at debug level, so it would show");
    assert_eq!(envoy.stat("listener_manager.lds.update_rejected"), Some(0));

    // Admin over TLS: the CLI trusts the CA it is given.
    fp.extra_args.extend(
        ["--admin-tls-cert", admin_cert.cert.to_str().unwrap(), "--admin-tls-key", admin_cert.key.to_str().unwrap()]
            .map(String::from),
    );
    fp.restart();
    let https = format!("https://127.0.0.1:{}", fp.admin_port);
    let auth = "authorization: Bearer t0ken-for-tests";
    let (status, body) = curl(&format!("{https}/api/v1/config"), &ca.cert, &[auth]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(curl(&format!("{https}/api/v1/config"), &ca.cert, &[]).0, 401);
    let out = cli(&[
        "status",
        "--admin",
        &https,
        "--token-file",
        token_file.to_str().unwrap(),
        "--ca-file",
        ca.cert.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _: Value = serde_json::from_str(&body).unwrap();
}

/// Envoy's metrics service on the same port, under the same rules: stats claiming a node
/// the client certificate may not claim are refused; a client flooding stats messages gets
/// them merged (one kept a second), and its stream is answered.
#[test]
fn stats_for_another_node_are_refused_and_a_flood_is_merged() {
    let s = start(&quickstart_with("v1"), &[]);
    let client = s.ca.issue("stats-client", &[&format!("uri:{SPIFFE}secure-envoy")], false);
    let stats = |node: &str, count: usize| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/stats_client.py");
        let out = std::process::Command::new("python3")
            .arg(script)
            .arg(s.fp.xds_port.to_string())
            .args([&s.ca.cert, &client.cert, &client.key])
            .args([node, &count.to_string()])
            .output()
            .expect("python3 runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let refused = stats("impostor", 3);
    assert!(refused.starts_with("PERMISSION_DENIED"), "{refused}");
    assert_eq!(stats("secure-envoy", 2_000), "OK");
    let merged = s.fp.metric("filterplane_limit_hits_total{limit=\"stats_flushes_merged\"}").unwrap_or(0.0);
    assert!(merged >= 1_990.0, "a flood is merged, not kept: {merged}");
    assert!(s.fp.metric("filterplane_xds_identity_refusals_total").unwrap() >= 1.0);
}
