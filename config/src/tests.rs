//! Loading, validation and compile behaviour, through the public `load`.

use std::path::Path;

use super::*;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

const GOOD: &str = r#"version: 1
extension_configs:
  - name: add-header
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
      mutations: { response_mutations: [ { append: { header: { key: x-plugin, value: v1 } } } ] }
"#;

#[test]
fn good_file_compiles_to_one_ecds_resource() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", GOOD);
    let c = load(&dir.path().join("a.yaml")).unwrap();
    assert_eq!(c.resources.len(), 1);
    let r = &c.resources[0];
    assert_eq!(r.name, "add-header");
    assert_eq!(r.resource.type_url, "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig");
    assert!(r.inner_type_url.ends_with("HeaderMutation"));
    assert_eq!(r.origin.line.get(), Some(3));
}

#[test]
fn versions_depend_on_content_only() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", GOOD);
    let a = load(dir.path()).unwrap();
    // Same config, different spelling: camelCase and a comment.
    let respelled = GOOD.replace("response_mutations", "responseMutations") + "# comment\n";
    write(dir.path(), "a.yaml", &respelled);
    let b = load(dir.path()).unwrap();
    assert_eq!(a.version, b.version);
    assert_eq!(a.resources[0].version, b.resources[0].version);
    write(dir.path(), "a.yaml", &GOOD.replace("v1", "v2"));
    let c = load(dir.path()).unwrap();
    assert_ne!(a.resources[0].version, c.resources[0].version);
    assert_ne!(a.version, c.version);
}

#[test]
fn unknown_field_inside_typed_config_names_file_line_and_path() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &GOOD.replace("value: v1", "valu: v1"));
    let errs = load(dir.path()).unwrap_err();
    assert_eq!(errs.0.len(), 1);
    let e = &errs.0[0];
    assert!(e.file.ends_with("a.yaml"));
    assert_eq!(e.line, Some(6));
    assert_eq!(e.path, "extension_configs[0].typed_config.mutations.response_mutations[0].append.header");
    assert!(e.message.contains("valu"), "{e}");
}

#[test]
fn unknown_type_is_rejected_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &GOOD.replace("v3.HeaderMutation", "v3.HeaderMutatio"));
    let e = &load(dir.path()).unwrap_err().0[0];
    assert_eq!(e.path, "extension_configs[0].typed_config.@type");
    assert_eq!(e.line, Some(5));
    assert!(e.message.contains("unknown type"));
}

#[test]
fn schema_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &GOOD.replace("  - name: add-header", "  - nam: add-header"));
    let e = &load(dir.path()).unwrap_err().0[0];
    assert_eq!(e.line, Some(3));
    assert!(e.message.contains("unknown field `nam`"), "{e}");

    write(dir.path(), "a.yaml", &GOOD.replace("version: 1", "version: 2"));
    let e = &load(dir.path()).unwrap_err().0[0];
    assert_eq!((e.path.as_str(), e.line), ("version", Some(1)));

    write(dir.path(), "a.yaml", "version: 1\nextension_configs: {}\n");
    let e = &load(dir.path()).unwrap_err().0[0];
    assert_eq!(e.path, "extension_configs");
}

#[test]
fn every_error_is_reported_and_duplicates_across_files_point_at_both() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", GOOD);
    let second = GOOD.replace("value: v1", "value: v7")
        + r#"  - name: ""
    typed_config: { "@type": type.googleapis.com/google.protobuf.Struct, value: {} }
  - name: broken
    typed_config: { "@type": type.googleapis.com/google.protobuf.Duration, value: 5 }
"#;
    write(dir.path(), "b.yaml", &second);
    let errs = load(dir.path()).unwrap_err();
    let text = errs.to_string();
    assert_eq!(errs.0.len(), 3, "{text}");
    assert!(text.contains("duplicate extension config name \"add-header\": the entry at"), "{text}");
    assert!(text.contains("a.yaml:3"), "{text}");
    assert!(text.contains("b.yaml:7: extension_configs[1].name: must not be empty"), "{text}");
    assert!(text.contains("extension_configs[2].typed_config"), "{text}");
}

#[test]
fn an_entry_whose_document_has_no_line_index_is_not_given_another_documents_line() {
    // The second document's flow mapping goes on at the first column: serde_yaml reads
    // it, the line indexer gives up on that document. Its duplicate entry must not be
    // placed by the first document's index (which has an entry of the same path).
    let cluster = |name: &str| format!("  - name: {name}\n    connect_timeout: 1s\n");
    let text = format!(
        "version: 1\nclusters:\n{}{}---\nversion: 1\nclusters:\n{}    load_assignment: {{ cluster_name: b\n}}\n{}",
        cluster("a"),
        cluster("z"),
        cluster("b"),
        cluster("b")
    );
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &text);
    let errs = load(&dir.path().join("a.yaml")).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!((errs[0].path.as_str(), errs[0].line), ("clusters[1].name", None), "{errs:?}");
}

#[test]
fn directory_merges_yaml_files_in_name_order_and_ignores_others() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b.yml", &GOOD.replace("add-header", "second"));
    write(dir.path(), "a.yaml", GOOD);
    write(dir.path(), "notes.txt", "not yaml");
    write(dir.path(), ".a.yaml.swp", "junk");
    let c = load(dir.path()).unwrap();
    let names: Vec<&str> = c.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["add-header", "second"]);
    assert_eq!(c.files.len(), 2);
}

#[test]
fn syntax_error_and_missing_path_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", "version: 1\nextension_configs: [\n");
    let e = &load(dir.path()).unwrap_err().0[0];
    assert!(e.line.is_some(), "{e}");
    let e = &load(&dir.path().join("missing.yaml")).unwrap_err().0[0];
    assert!(e.message.contains("cannot read"));
}

#[test]
fn selector_is_part_of_the_config_version_not_the_resource_version() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", GOOD);
    let a = load(dir.path()).unwrap();
    let with_sel = GOOD.replace("    typed_config:", "    node_selector: { clusters: [edge] }\n    typed_config:");
    write(dir.path(), "a.yaml", &with_sel);
    let b = load(dir.path()).unwrap();
    assert_eq!(a.resources[0].version, b.resources[0].version);
    assert_ne!(a.version, b.version);
    assert_eq!(b.resources[0].selector.clusters, ["edge"]);
}

#[test]
fn one_name_may_have_entries_for_different_proxies_but_none_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let canary = GOOD.replace("    typed_config:", "    node_selector: { clusters: [canary] }\n    typed_config:");
    let both = format!("{canary}{}", GOOD.replace("version: 1\nextension_configs:\n", ""));
    write(dir.path(), "a.yaml", &both);
    let c = load(dir.path()).unwrap();
    assert_eq!(c.resources.len(), 2);
    assert_eq!(c.resources[0].selector.clusters, ["canary"], "file order kept for one name");

    // A catch-all first makes every later entry of that name unreachable.
    let shadowed = format!("{GOOD}{}", canary.replace("version: 1\nextension_configs:\n", ""));
    write(dir.path(), "a.yaml", &shadowed);
    let e = &load(dir.path()).unwrap_err().0[0];
    assert_eq!(e.path, "extension_configs[1].name");
    assert!(e.message.contains("already matches every proxy"), "{e}");
}

const GATEWAY: &str = r#"version: 1
extension_configs:
  - name: stamp
    placement: { listeners: [edge], phase: STATS }
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
      mutations: { response_mutations: [ { append: { header: { key: x, value: "1" } } } ] }
listeners:
  - name: edge
    address: { socket_address: { address: 127.0.0.1, port_value: 10000 } }
    filter_chains:
      - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
              stat_prefix: edge
              route_config: { name: local }
              http_filters:
                - name: envoy.filters.http.router
                  typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  - name: tcp
    address: { socket_address: { address: 127.0.0.1, port_value: 10001 } }
    filter_chains:
      - filters:
          - name: envoy.filters.network.tcp_proxy
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: tcp, cluster: backend }
clusters:
  - name: backend
    connect_timeout: 1s
endpoints:
  - cluster_name: backend
routes:
  - name: local
"#;

#[test]
fn envoy_resources_and_placement_compile() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", GATEWAY);
    let c = load(dir.path()).unwrap();
    let kinds: Vec<(&str, &str)> =
        c.resources.iter().map(|r| (r.resource_type.short_name(), r.name.as_str())).collect();
    assert_eq!(
        kinds,
        [("LDS", "edge"), ("LDS", "tcp"), ("RDS", "local"), ("CDS", "backend"), ("EDS", "backend"), ("ECDS", "stamp")]
    );
    let edge = c.resources.iter().find(|r| r.name == "edge").unwrap();
    let stamp = c.resources.iter().find(|r| r.name == "stamp").unwrap();
    let (_, v1) = assemble_listener(edge, &[stamp.placement.as_deref().unwrap()]).unwrap().unwrap();
    assert_ne!(v1, edge.version, "placing a filter changes the listener");
    // Changing only the plugin's config does not change the placed listener.
    write(dir.path(), "a.yaml", &GATEWAY.replace("value: \"1\"", "value: \"2\""));
    let c2 = load(dir.path()).unwrap();
    let edge2 = c2.resources.iter().find(|r| r.name == "edge").unwrap();
    let stamp2 = c2.resources.iter().find(|r| r.name == "stamp").unwrap();
    assert_ne!(stamp.version, stamp2.version);
    let (_, v2) = assemble_listener(edge2, &[stamp2.placement.as_deref().unwrap()]).unwrap().unwrap();
    assert_eq!(v1, v2);
}

fn placement_error(from: &str, to: &str) -> ConfigError {
    let dir = tempfile::tempdir().unwrap();
    let text = GATEWAY.replace(from, to);
    assert_ne!(text, GATEWAY, "{from}");
    write(dir.path(), "a.yaml", &text);
    let errs = load(dir.path()).unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    errs.0[0].clone()
}

#[test]
fn impossible_placements_are_errors_that_say_where() {
    let e = placement_error("listeners: [edge]", "listeners: [edge, nope]");
    assert_eq!((e.path.as_str(), e.line), ("extension_configs[0].placement.listeners[1]", Some(4)));
    assert!(e.message.contains("no listener named \"nope\""), "{e}");

    let e = placement_error("listeners: [edge]", "listeners: [tcp]");
    assert_eq!(e.path, "extension_configs[0].placement");
    assert!(e.message.contains("matches no HTTP connection manager"), "{e}");

    let e = placement_error("                - name: envoy.filters.http.router", "                - name: stamp\n                  typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }\n                - name: envoy.filters.http.router");
    assert_eq!(e.path, "listeners[0].filter_chains[0].filters[0].typed_config.http_filters");
    assert!(e.message.contains("already has a filter named \"stamp\""), "{e}");

    let e = placement_error("{ listeners: [edge], phase: STATS }", "{ listeners: [edge], chain: network }");
    assert_eq!(e.path, "extension_configs[0].placement.chain");
    assert!(e.message.contains("is an HTTP filter; it cannot go in a network filter chain"), "{e}");

    let e = placement_error("phase: STATS", "phase: LATE");
    assert!(e.message.contains("unknown variant `LATE`"), "{e}");

    let e = placement_error("  - name: edge\n", "  - name: edge\n    node_selector: { clusters: 7 }\n");
    assert_eq!(e.path, "listeners[0].node_selector");

    let e = placement_error("  - cluster_name: backend", "  - cluster_name: \"\"");
    assert_eq!(e.path, "endpoints[0].cluster_name");

    let e = placement_error("    connect_timeout: 1s", "    connect_timeout: soon");
    assert_eq!((e.path.as_str(), e.line), ("clusters[0].connect_timeout", Some(29)));
}

#[test]
fn pull_secrets_read_as_the_readme_writes_them() {
    let plugin = |secret: &str| {
        format!("version: 1\nwasm_plugins:\n  - name: p\n    url: oci://127.0.0.1:5000/p:v1\n    image_pull_secret: {secret}\n")
    };
    let secret_of = |secret: &str| {
        let parsed = load::parse_file(Path::new("s.yaml"), &plugin(secret)).map_err(|e| e.to_string())?;
        Ok::<_, String>(parsed.doc.wasm_plugins[0].image_pull_secret.clone())
    };
    assert_eq!(secret_of("{ env: REGISTRY_CREDS }"), Ok(Some(model::PullSecret::Env("REGISTRY_CREDS".into()))));
    assert_eq!(secret_of("{ file: /run/secrets/r }"), Ok(Some(model::PullSecret::File("/run/secrets/r".into()))));
    let both = secret_of("{ env: A, file: /b }").unwrap_err();
    assert!(both.contains("exactly one of `env`") && both.contains("image_pull_secret"), "{both}");
    assert!(secret_of("{ envv: A }").unwrap_err().contains("unknown field"));
}

#[test]
fn a_duplicate_key_inside_typed_config_is_an_error_with_its_line() {
    let text = "version: 1\nextension_configs:\n  - name: a\n    typed_config:\n      \"@type\": type.googleapis.com/google.protobuf.StringValue\n      value: one\n      value: two\n";
    let e = load::parse_file(Path::new("d.yaml"), text).unwrap_err();
    assert_eq!((e.line, e.path.as_str()), (Some(7), "extension_configs[0].typed_config.value"), "{e}");
    assert!(e.message.contains("duplicate key"), "{e}");
}

#[test]
fn trusted_keys_are_read_at_load_and_bad_ones_are_errors_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let pem = "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n";
    write(dir.path(), "release.pub", pem);
    write(dir.path(), "private.pem", "-----BEGIN PRIVATE KEY-----\nMC4\n-----END PRIVATE KEY-----\n");
    let plugin = "wasm_plugins:\n  - name: p\n    url: oci://r/p:v1\n";
    let with = |verification: &str| format!("version: 1\n{verification}{plugin}");
    write(dir.path(), "a.yaml", &with("wasm_verification: { keys: [release.pub], require: true }\n"));
    let c = load(&dir.path().join("a.yaml")).unwrap();
    let v = c.wasm_plugins[0].verification.as_ref().unwrap();
    assert_eq!((v.keys[0].0.as_str(), v.keys[0].1.as_str(), v.require), ("release.pub", pem, true));
    assert_eq!(c.wasm_verification.as_deref(), Some(&**v), "the default, for Envoy-native Wasm code too");

    for (verification, path, says) in [
        ("wasm_verification: { keys: [missing.pub] }\n", "wasm_verification.keys[0]", "cannot read"),
        ("wasm_verification: { keys: [private.pem] }\n", "wasm_verification.keys[0]", "public key"),
        ("wasm_verification: { require: true }\n", "wasm_verification", "at least one key"),
    ] {
        write(dir.path(), "a.yaml", &with(verification));
        let e = load(&dir.path().join("a.yaml")).unwrap_err();
        assert_eq!((e.0[0].path.as_str(), e.0[0].line), (path, Some(2)), "{e}");
        assert!(e.0[0].message.contains(says), "{e}");
    }
    // A plugin's own keys replace the default; without any keys anywhere it is an error.
    write(
        dir.path(),
        "a.yaml",
        &format!("version: 1\n{plugin}    verification: {{ signature_url: https://x/p.sig }}\n"),
    );
    let e = load(&dir.path().join("a.yaml")).unwrap_err();
    assert_eq!(e.0[0].path, "wasm_plugins[0].verification", "{e}");
    // One default for the whole config: two files may repeat it, not differ.
    write(dir.path(), "a.yaml", &with("wasm_verification: { keys: [release.pub] }\n"));
    write(dir.path(), "b.yaml", "version: 1\nwasm_verification: { keys: [release.pub], require: true }\n");
    let e = load(dir.path()).unwrap_err();
    assert!(e.0[0].message.contains("one default for the whole config"), "{e}");
}
