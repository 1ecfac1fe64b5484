//! What the README and docs/ tell people to run, run as written: the quickstart on a copy
//! (its commands, its refusal message to the character, the status table), and the
//! rollout walk-through's script starting Envoys that get what Filterplane serves, with
//! the version the docs say Envoy refuses refused by a real Envoy. (Every `filterplane`
//! command line of the docs is parsed by the binary's own flags in the cli's tests.)

use std::{
    fs,
    process::{Command, Stdio},
    time::Duration,
};

use filterplane_e2e::{
    envoy_bin, example_bootstrap, filterplane_bin, free_port, http_get, wait_until, workspace_root, Envoy, EnvoyPorts,
    Filterplane,
};

const WAIT: Duration = Duration::from_secs(30);

fn doc(path: &str) -> String {
    fs::read_to_string(workspace_root().join(path)).unwrap()
}

/// The lines of the fenced block that follows the first line containing `after`.
fn block_after(text: &str, after: &str) -> Vec<String> {
    nth_block_after(text, after, 0)
}

/// The lines of the `nth` fenced block (from 0) after the first line containing `after`,
/// less the fence's indentation (a block inside a list item is indented).
fn nth_block_after(text: &str, after: &str, nth: usize) -> Vec<String> {
    let rest = &text[text.find(after).unwrap_or_else(|| panic!("no {after:?} in the doc"))..];
    let mut lines = rest.lines();
    let mut block = Vec::new();
    for _ in 0..=nth {
        let fence = lines.by_ref().find(|l| l.trim_start().starts_with("```")).expect("a fenced block");
        let indent = fence.len() - fence.trim_start().len();
        block = lines
            .by_ref()
            .take_while(|l| !l.trim_start().starts_with("```"))
            .map(|l| l.get(indent..).unwrap_or("").trim_end().to_owned())
            .collect();
    }
    block
}

fn x_plugin(port: u16) -> Option<String> {
    http_get(&format!("http://127.0.0.1:{port}/"))?.header("x-plugin").map(str::to_owned)
}

#[test]
fn the_quickstart_runs_as_the_readme_writes_it() {
    let readme = doc("README.md");
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(workspace_root().join("examples"), dir.path().join("examples")).unwrap();
    // Step 1's copy, as written.
    let copy = block_after(&readme, "Copy the example and start Filterplane on it");
    assert!(copy[0].starts_with("cp -r examples/quickstart my-quickstart"), "{copy:?}");
    let ok = Command::new("sh").arg("-c").arg(&copy[0]).current_dir(dir.path()).status().unwrap();
    assert!(ok.success());
    assert!(copy[1].ends_with("serve --config my-quickstart/filterplane.yaml"), "{copy:?}");
    let fp = Filterplane::start_in(dir.path(), "my-quickstart/filterplane.yaml", dir.path(), &[]);
    let ports = EnvoyPorts::new(fp.xds_port);
    let envoy = Envoy::start(
        &example_bootstrap("quickstart/envoy.yaml", ports, "quickstart-envoy"),
        ports,
        dir.path(),
        "envoy",
    );
    wait_until("x-plugin: v1", WAIT, || (x_plugin(envoy.listener_port).as_deref() == Some("v1")).then_some(()));

    let yaml = dir.path().join("my-quickstart/filterplane.yaml");
    fs::write(&yaml, fs::read_to_string(&yaml).unwrap().replace("value: v1", "value: v2")).unwrap();
    wait_until("x-plugin: v2", WAIT, || (x_plugin(envoy.listener_port).as_deref() == Some("v2")).then_some(()));
    assert!(fs::read_to_string(workspace_root().join("examples/quickstart/filterplane.yaml"))
        .unwrap()
        .contains("value: v1"));

    // Step 5: the refusal, to the character.
    let refusal = block_after(&readme, "Filterplane refuses it and says where");
    fs::write(&yaml, fs::read_to_string(&yaml).unwrap().replace("value: v2", "valu: v2")).unwrap();
    wait_until("the refusal in the log", WAIT, || fp.log_text().contains(&refusal[0]).then_some(()));
    assert_eq!(x_plugin(envoy.listener_port).as_deref(), Some("v2"), "Envoy keeps serving v2");

    // Step 6: the status table's header and row, as shown.
    let shown = block_after(&readme, "or ask from the terminal");
    assert_eq!(shown[0], "cargo run --bin filterplane -- status");
    let table = nth_block_after(&readme, "or ask from the terminal", 1);
    let out = Command::new(filterplane_bin()).args(["status", "--admin", &fp.url("")]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(out.status.code(), Some(3), "the last reload failed: {text}");
    assert_eq!(lines[1], table[1], "{text}");
    let row = table[2].rsplit_once(' ').unwrap().0;
    assert!(lines[2].starts_with(row), "{:?} does not start like {row:?}", lines[2]);
}

/// `count` free ports in a row, taken from the harness's allocator (so no other test of
/// this process is handed one of them).
fn free_run(count: u16) -> u16 {
    loop {
        let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        if ports.windows(2).all(|w| w[1] == w[0] + 1) {
            return ports[0];
        }
    }
}

#[test]
fn the_walkthrough_script_starts_envoys_and_the_refused_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    fs::copy(workspace_root().join("examples/quickstart/filterplane.yaml"), &yaml).unwrap();
    let fp = Filterplane::start(&yaml, dir.path());
    let listener = free_run(6);
    let admin = listener + 3;
    let mut script = Command::new(workspace_root().join("examples/rollout/envoys.sh"))
        .arg("3")
        .env("ENVOY", envoy_bin())
        .env("XDS_PORT", fp.xds_port.to_string())
        .env("LISTENER_PORT", listener.to_string())
        .env("ADMIN_PORT", admin.to_string())
        .env("WORK_DIR", dir.path().join("envoys"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    for i in 0..3 {
        wait_until(&format!("envoy-{i} through the script"), WAIT, || {
            (x_plugin(listener + i).as_deref() == Some("v1")).then_some(())
        });
    }
    let proxies = fp.api("/api/v1/proxies");
    let mut ids: Vec<&str> = proxies.as_array().unwrap().iter().filter_map(|p| p["node_id"].as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["envoy-0", "envoy-1", "envoy-2"]);

    // The walk-through's "version Envoy refuses", as the docs write it.
    let refused = block_after(&doc("docs/rollouts.md"), "which Filterplane accepts and Envoy does not").join("\n");
    let text = fs::read_to_string(&yaml).unwrap();
    let start = text.find("extension_configs:").unwrap();
    fs::write(&yaml, format!("{}{refused}\n", &text[..start])).unwrap();
    wait_until("three NACKs of the docs' version", WAIT, || {
        (fp.api("/api/v1/rejects").as_array().map(Vec::len) == Some(3)).then_some(())
    });
    assert_eq!(x_plugin(listener).as_deref(), Some("v1"), "Envoy keeps what it ran");

    // Ctrl-C (here SIGTERM) stops every Envoy it started.
    let _ = Command::new("kill").arg("-TERM").arg(script.id().to_string()).status();
    assert!(script.wait().unwrap().success());
    wait_until("the Envoys gone", WAIT, || {
        (0..3).all(|i| http_get(&format!("http://127.0.0.1:{}/", listener + i)).is_none()).then_some(())
    });
}
