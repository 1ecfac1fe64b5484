//! What operators script against, the way they meet it: the CLI's JSON, YAML and exit
//! codes, `/metrics` through Prometheus's own `promtool`, log lines a log pipeline reads,
//! and completions a real shell parses. Against the real binary and a real Envoy, one
//! that NACKs.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
    time::Duration,
};

use filterplane_e2e::{
    filterplane_bin, free_port, http_get_with,
    quickstart::{example_yaml, yaml_envoy_refuses, yaml_with, Quickstart, ECDS},
    wait_until,
};
use serde_json::Value;

fn cli(args: &[&str]) -> Output {
    Command::new(filterplane_bin()).args(args).output().expect("run filterplane")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn status_speaks_json_and_yaml_follows_one_node_and_gates_a_pipeline() {
    let q = Quickstart::start("ops-1", false);
    let admin = q.fp.url("");
    let admin = admin.as_str();

    // Everything, for a script: the serving version, the last reload, every proxy.
    let o = cli(&["status", "-o", "json", "--admin", admin]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc: Value = serde_json::from_str(&stdout(&o)).expect("status -o json is JSON");
    assert_eq!(doc["serving_version"], q.fp.api("/api/v1/config")["serving_version"]);
    assert_eq!(doc["last_reload"]["result"], "applied");
    assert!(doc["proxies"].as_array().unwrap().iter().any(|p| p["node_id"] == "ops-1"), "{doc}");

    // Synced: the gate opens.
    let o = cli(&["status", "--wait-synced", "20s", "--admin", admin]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));

    // One node: each resource, its versions, ACKed.
    let o = cli(&["status", "ops-1", "--admin", admin]);
    let table = stdout(&o);
    let row =
        table.lines().find(|l| l.starts_with("ECDS") && l.contains("add-header")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.ends_with("ACKED"), "{table}");

    // Envoy refuses the next version: the gate closes at once, with Envoy's reason.
    q.write(&yaml_envoy_refuses(1024));
    q.wait_rejects(1);
    let o = cli(&["status", "--wait-synced", "20s", "--admin", admin]);
    assert_eq!(o.status.code(), Some(4), "{}", stdout(&o));
    assert!(stdout(&o).contains("NOT SYNCED: ops-1 NACKs"), "{}", stdout(&o));
    let o = cli(&["status", "ops-1", "-o", "yaml", "--admin", admin]);
    let doc: serde_yaml::Value = serde_yaml::from_str(&stdout(&o)).expect("status -o yaml is YAML");
    let nack = doc["streams"][0]["types"][ECDS]["last_nack"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(nack.contains("Buffer"), "Envoy's own message: {nack}");
    let table = stdout(&cli(&["status", "ops-1", "--admin", admin]));
    assert!(table.contains("NACKED") && table.contains("ECDS NACK of"), "{table}");

    // What that proxy is sent, as Envoy-native JSON.
    let o = cli(&["config-dump", "ops-1", "--admin", admin]);
    let dump: Value = serde_json::from_str(&stdout(&o)).expect("config-dump is JSON");
    let ecds =
        dump["resources"].as_array().unwrap().iter().find(|r| r["type_url"] == ECDS && r["name"] == "add-header");
    assert!(ecds.is_some_and(|r| r["resource"].is_object()), "{dump}");

    // A reload that fails: status says so in its exit status.
    q.write(&yaml_with("v3").replace("extension_configs:", "extension_configz:"));
    wait_until("the reload to fail", Duration::from_secs(20), || {
        (q.fp.api("/api/v1/config")["last_outcome"]["result"] == "failed").then_some(())
    });
    assert_eq!(cli(&["status", "--admin", admin]).status.code(), Some(3));

    // A node that is not there, and a rollout that is not there: said, and non-zero.
    let o = cli(&["status", "nobody", "--wait-synced", "1s", "--admin", admin]);
    assert_eq!(o.status.code(), Some(4));
    assert!(stdout(&o).contains("nobody is not connected"), "{}", stdout(&o));
    let o = cli(&["rollout", "status", "no-such-entry", "--admin", admin]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no rollout of \"no-such-entry\""), "{o:?}");
    q.write(&example_yaml());
}

#[test]
fn metrics_pass_promtool_with_a_nacking_proxy_and_speak_openmetrics_when_asked() {
    let q = Quickstart::start("ops-metrics", false);
    q.write(&yaml_envoy_refuses(1024));
    q.wait_rejects(1);
    let text = q.fp.get("/metrics").expect("metrics").body;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let value =
        |series: &str| text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse::<f64>().ok());
    assert_eq!(value(&format!("filterplane_proxies_not_synced{{type_url=\"{ECDS}\"}}")), Some(1.0), "{text}");
    assert!(value("process_resident_memory_bytes").is_some_and(|v| v > 1e6), "{text}");
    assert!(value("process_open_fds").is_some_and(|v| v > 3.0), "{text}");
    assert!(value("process_cpu_seconds_total").is_some_and(|v| v > 0.0), "{text}");
    assert!(text.contains("filterplane_build_info{version=\""), "{text}");
    assert_eq!(value("filterplane_rollouts_active{state=\"running\"}"), Some(0.0), "{text}");
    assert!(!text.contains("# EOF"));

    let om = http_get_with(&q.fp.url("/metrics"), &[("accept", "application/openmetrics-text; version=1.0.0")])
        .expect("metrics");
    assert!(om.body.trim_end().ends_with("# EOF"), "OpenMetrics when asked");
    assert!(om.headers.iter().any(|(k, v)| k == "content-type" && v.starts_with("application/openmetrics-text")));
    q.write(&example_yaml());
}

/// Starts `filterplane serve` on the quickstart config with `args`, no NO_COLOR, its
/// standard error to a file (not a terminal); returns what it logged in its first second
/// of serving.
fn log_of_serve(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    std::fs::write(&yaml, example_yaml()).unwrap();
    let log = dir.path().join("log");
    let admin = free_port();
    let mut child = Command::new(filterplane_bin())
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .args(["serve", "--config"])
        .arg(&yaml)
        .args(["--xds-addr", &format!("127.0.0.1:{}", free_port()), "--admin-addr", &format!("127.0.0.1:{admin}")])
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until("ready", Duration::from_secs(20), || {
        filterplane_e2e::http_get(&format!("http://127.0.0.1:{admin}/readyz")).filter(|r| r.status == 200)
    });
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn logs_are_json_lines_when_asked_and_plain_text_off_a_terminal() {
    let json = log_of_serve(&["--log-format", "json"]);
    let lines: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let listening = lines.iter().find(|l| l["fields"]["message"] == "listening").expect("the listening line");
    assert_eq!(listening["level"], "INFO");
    assert!(listening["fields"]["xds"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{listening}");
    assert!(lines.iter().any(|l| l["fields"]["message"] == "config applied"), "{json}");

    let text = log_of_serve(&[]);
    assert!(text.contains("listening"), "{text}");
    assert!(!text.contains('\u{1b}'), "no colour codes when standard error is a file: {text:?}");
}

#[test]
fn completions_parse_in_bash_and_the_man_page_is_roff() {
    let o = cli(&["completions", "bash"]);
    assert!(o.status.success());
    let script = stdout(&o);
    assert!(script.contains("config-dump") && script.contains("--wait-synced"), "{script}");
    let mut bash = Command::new("bash").arg("-n").stdin(Stdio::piped()).spawn().unwrap();
    bash.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(bash.wait().unwrap().success(), "bash parses the completion script");
    let man = stdout(&cli(&["man"]));
    assert!(man.starts_with(".ie") || man.starts_with(".TH"), "{}", &man[..man.len().min(200)]);
    assert!(man.contains("filterplane"), "{man}");
}

/// A reviewed settings file runs the server; the command line and FILTERPLANE_*
/// variables override it, it overrides the defaults, `--print-settings` says where each
/// value came from, and a key that is no setting stops `serve` naming the file and line.
#[test]
fn a_settings_file_runs_serve_below_flags_and_variables() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("filterplane.yaml"), example_yaml()).unwrap();
    let admin = free_port();
    let settings = dir.path().join("settings.yaml");
    std::fs::write(
        &settings,
        format!(
            "# reviewed in change 1234\nconfig: filterplane.yaml\nadmin-addr: 127.0.0.1:{admin}\n\
             xds-addr: 127.0.0.1:{}\ncache-dir: cache\nmax-streams-per-connection: 64\nmetrics-public: true\n\
             max-nack-message-bytes: 100\n",
            free_port()
        ),
    )
    .unwrap();
    let settings_arg = settings.to_str().unwrap();

    let o = Command::new(filterplane_bin())
        .env("FILTERPLANE_MAX_NACK_MESSAGE_BYTES", "200")
        .args(["serve", "--settings", settings_arg, "--max-streams-per-connection", "9", "--print-settings"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = stdout(&o);
    let at = |line: usize| format!("# settings file {settings_arg}:{line}");
    let config = dir.path().join("filterplane.yaml");
    for want in [
        format!("config: {}  {}", config.display(), at(2)),
        format!("admin-addr: 127.0.0.1:{admin}  {}", at(3)),
        "max-streams-per-connection: 9  # command line".to_owned(),
        "max-nack-message-bytes: 200  # environment (FILTERPLANE_MAX_NACK_MESSAGE_BYTES)".to_owned(),
        format!("metrics-public: true  {}", at(7)),
        "drain-grace-secs: 600  # default".to_owned(),
        "# state-dir:  # not set".to_owned(),
    ] {
        assert!(report.lines().any(|l| l == want), "no line {want:?} in\n{report}");
    }
    // The report is itself a settings file serve reads.
    let copy = dir.path().join("copy.yaml");
    std::fs::write(&copy, &report).unwrap();
    let again = cli(&["serve", "--settings", copy.to_str().unwrap(), "--print-settings"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(stdout(&again).contains("max-streams-per-connection: 9  # settings file"), "{}", stdout(&again));

    // It serves with what the file says.
    let mut child = Command::new(filterplane_bin())
        .env("FILTERPLANE_SETTINGS", settings_arg)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("ready on the file's admin address", Duration::from_secs(20), || {
        filterplane_e2e::http_get(&format!("http://127.0.0.1:{admin}/readyz")).filter(|r| r.status == 200)
    });
    let _ = child.kill();
    let _ = child.wait();

    // A mistake is named with its file and line, and nothing starts.
    std::fs::write(&settings, "config: filterplane.yaml\n\nmax-streams: 5\n").unwrap();
    let o = cli(&["serve", "--settings", settings_arg]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("{settings_arg}:3: max-streams: not a setting")), "{err}");
}
