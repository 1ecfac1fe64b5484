//! The admin page in a real headless Chromium, against a real Envoy's NACKs.

use std::path::Path;

use filterplane_e2e::{
    browser::Browser,
    quickstart::{yaml_envoy_refuses, yaml_with, Quickstart, WAIT},
    wait_until,
};

#[test]
fn admin_page_shows_proxies_and_rejects_and_updates_live() {
    let q = Quickstart::start("page-envoy", false);
    q.write(&yaml_envoy_refuses(1024));
    q.wait_rejects(1);

    let browser = Browser::start(q.dir.path());
    browser.goto(&q.fp.url("/"));
    wait_until("the page to list the proxy", WAIT, || browser.text("#proxies").contains("page-envoy").then_some(()));
    let rejects = browser.text("#rejects");
    assert!(rejects.contains("page-envoy") && rejects.contains("Buffer"), "Envoy's message on the page: {rejects}");
    assert!(browser.eval("return document.querySelector('tr.nack[data-node=\"page-envoy\"]') !== null") == true);
    assert!(browser.text("#reload").contains("applied"), "{}", browser.text("#reload"));
    assert!(browser.text("#configs").contains("add-header"));

    // A new reject shows up without a reload of the page (the marker survives).
    browser.eval("window.__marker = 'still here'; return null;");
    q.write(&yaml_envoy_refuses(2048));
    q.wait_rejects(2);
    wait_until("the page to show the second reject", WAIT, || (browser.text("#rejects-count") == "(2)").then_some(()));
    assert_eq!(browser.eval("return window.__marker"), "still here", "the page was not reloaded");
    assert_eq!(browser.text("#live"), "live", "the event stream is connected");

    let shot = q.dir.path().join("admin.png");
    browser.screenshot(&shot);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 2_000, "a real PNG screenshot");
    if let Ok(dir) = std::env::var("FILTERPLANE_SCREENSHOT_DIR") {
        std::fs::copy(&shot, Path::new(&dir).join("admin-page-nack.png")).expect("copy screenshot");
    }

    // A refused edit shows its error; fixing it clears the NACK highlight.
    q.write(&yaml_with("v2").replace("value: v2", "valu: v2"));
    wait_until("the page to show the refused reload", WAIT, || {
        let r = browser.text("#reload");
        (r.contains("failed") && r.contains("unrecognized field name 'valu'")).then_some(())
    });
    q.write(&yaml_with("v3"));
    q.wait_for_header("v3");
    wait_until("the NACK highlight to clear", WAIT, || {
        (browser.eval("return document.querySelector('tr.nack') === null") == true).then_some(())
    });
}

/// 10,000 simulated proxies (100 of them NACKing): the page shows the summary and one
/// page of 100 rows, NACKing ones first; search and paging are the server's. Prints how
/// long the page takes to be usable, and what an open page costs the server during a
/// rollout (numbers, not assertions: machines are noisy).
#[test]
fn the_page_at_ten_thousand_proxies() {
    use filterplane_e2e::{free_port, Filterplane};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    let config = |value: &str| {
        format!(
            "version: 1\nrollout: {{ steps: [10, 50, 100], bake: 1s, ack_timeout: 120s }}\nextension_configs:\n  - name: add-header\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-plugin, value: {value} }} }} }} ] }}\n  - name: broken\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-broken, value: b }} }} }} ] }}\n"
        )
    };
    std::fs::write(&yaml, config("v1")).unwrap();
    // 10,000 connections from one address: over the default per-address cap.
    let fp = Filterplane::start_with_args(
        &yaml,
        dir.path(),
        free_port(),
        free_port(),
        &["--max-xds-connections-per-address", "20000"],
    );
    let load = |prefix: &str, streams: usize, ecds: &str, nack: Option<&str>| filterplane_bench::LoadSpec {
        nack: nack.map(str::to_owned),
        ramp_per_sec: 4000.0,
        hold: Duration::from_secs(150),
        ..filterplane_bench::LoadSpec::sotw(format!("http://127.0.0.1:{}", fp.xds_port), streams, ecds, prefix)
    };
    let runs = [load("fleet", 9_900, "add-header", None), load("edge-bad", 100, "broken", Some("broken"))];
    let _generators: Vec<_> = runs
        .into_iter()
        .map(|spec| {
            std::thread::spawn(move || {
                tokio::runtime::Runtime::new()
                    .unwrap()
                    .block_on(filterplane_bench::run(spec))
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let summary = wait_until("10,000 proxies connected and answered", Duration::from_secs(120), || {
        let s = fp.api("/api/v1/summary");
        (s["proxies"] == 10_000 && s["states"]["synced"] == 9_900 && s["states"]["nacked"] == 100).then_some(s)
    });
    assert_eq!(summary["nacking"].as_array().map(Vec::len), Some(20), "the first NACKing proxies, with Envoy's words");

    let browser = Browser::start(dir.path());
    let started = Instant::now();
    browser.goto(&fp.url("/"));
    wait_until("the page to show the proxies", Duration::from_secs(30), || {
        (browser.text("#proxies-count") == "(10000 of 10000)").then_some(())
    });
    let usable = started.elapsed();
    let rows = browser.eval("return document.querySelectorAll('#proxies tbody tr').length");
    let nacking = browser.eval("return document.querySelectorAll('#proxies tbody tr.nack').length");
    assert_eq!((rows.as_u64(), nacking.as_u64()), (Some(100), Some(100)), "one page of 100, NACKing first");
    assert!(browser.text("#fleet").contains("9900"), "{}", browser.text("#fleet"));
    println!("page usable {} ms after navigation, 10,000 proxies", usable.as_millis());

    // Search and paging are the server's.
    browser.eval("const q = document.getElementById('q'); q.value = 'fleet-123'; q.dispatchEvent(new Event('input')); return null;");
    wait_until("the search", Duration::from_secs(10), || {
        (browser.text("#proxies-count") == "(11 of 10000)").then_some(())
    });
    browser.eval(
        "const q = document.getElementById('q'); q.value = ''; q.dispatchEvent(new Event('input')); return null;",
    );
    wait_until("the search cleared", Duration::from_secs(10), || {
        (browser.text("#proxies-count") == "(10000 of 10000)").then_some(())
    });
    browser.eval("document.getElementById('next').click(); return null;");
    wait_until("the second page", Duration::from_secs(10), || {
        (browser.text("#page-info") == "101–200 of 10000").then_some(())
    });
    assert_eq!(browser.eval("return document.querySelectorAll('#proxies tbody tr.nack').length").as_u64(), Some(0));

    // What an open page costs during a rollout: the server's CPU for the same rollout
    // with the page open, then closed.
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", fp.pid())).unwrap();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
    };
    let rollout = |value: &str| {
        let before = cpu();
        std::fs::write(&yaml, config(value)).unwrap();
        // Looked at twice a second, and only the cheap rollouts view: the measurement must
        // not be the test's own polling.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let v = fp.api("/api/v1/rollouts");
            if v["rollouts"].as_array().is_some_and(Vec::is_empty) && v["history"][0]["to_version"].is_string() {
                break;
            }
            assert!(Instant::now() < deadline, "the rollout did not complete: {v}");
        }
        std::thread::sleep(Duration::from_secs(1));
        let spent = cpu() - before;
        assert_eq!(fp.api("/api/v1/summary")["states"]["synced"], 9_900);
        spent
    };
    // Closed, open, closed: the order is not what is measured.
    browser.goto("about:blank");
    let closed_before = rollout("v2");
    browser.goto(&fp.url("/"));
    wait_until("the page again", Duration::from_secs(30), || {
        (browser.text("#proxies-count") == "(10000 of 10000)").then_some(())
    });
    let open = rollout("v3");
    browser.goto("about:blank");
    let closed = (closed_before + rollout("v4")) / 2.0;
    println!(
        "server CPU for a 3-step rollout to 9,900 proxies: {open:.2} s with the page open, {closed:.2} s without (mean of {closed_before:.2} before and after; {:+.1} %)",        100.0 * (open - closed) / closed.max(0.01)
    );
}

/// Issue 20: a page on another port of 127.0.0.1 (same site, another origin) that posts a
/// form to the admin API, in a real Chromium. Before, it applied a held mass removal; the
/// browser's own `Origin` and `Sec-Fetch-Site` now get it refused.
#[test]
fn a_page_of_another_origin_cannot_confirm_a_held_removal() {
    use filterplane_e2e::{free_port, services::FileServer, Filterplane};
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    std::fs::write(&yaml, yaml_with("v1")).unwrap();
    let fp = Filterplane::start_with_args(&yaml, dir.path(), free_port(), free_port(), &[]);
    let serving = fp.api("/api/v1/config")["serving_version"].clone();
    // Everything would go: held until confirmed.
    std::fs::write(&yaml, "version: 1\n").unwrap();
    wait_until("the removal to be held", WAIT, || {
        (fp.api("/api/v1/config")["last_outcome"]["result"] == "held").then_some(())
    });
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    let confirm = fp.url("/api/v1/reload?confirm=true");
    std::fs::write(
        site.join("attack.html"),
        format!(
            "<form method=post action=\"{confirm}\"><input name=x value=1></form>\
             <script>fetch(\"{confirm}\", {{method: \"POST\", mode: \"no-cors\", credentials: \"include\"}}); \
             setTimeout(() => document.forms[0].submit(), 300);</script>"
        ),
    )
    .unwrap();
    let attacker = FileServer::start(&site, dir.path());
    let browser = Browser::start(dir.path());
    browser.goto(&format!("{}/attack.html", attacker.url));
    let landed = wait_until("the form's answer", WAIT, || {
        let body = browser.text("body");
        body.contains("another").then_some(body)
    });
    assert!(landed.contains("come from the admin page itself or carry the bearer token"), "{landed}");
    let config = fp.api("/api/v1/config");
    assert_eq!(config["serving_version"], serving, "the held removal was not applied: {config}");
    assert_eq!(config["last_outcome"]["result"], "held");
}

/// Tables wider than their section (the page at `width`), by section id.
fn overflowing(browser: &Browser) -> Vec<String> {
    let v = browser.eval(
        "return [...document.querySelectorAll('section')].filter(s => s.scrollWidth > s.clientWidth + 1)\
         .map(s => s.querySelector('h2').innerText);",
    );
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap_or_default().to_owned()).collect()
}

fn save_screenshot(browser: &Browser, dir: &Path, name: &str) {
    let shot = dir.join(name);
    browser.screenshot(&shot);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 2_000, "a real PNG screenshot");
    if let Ok(out) = std::env::var("FILTERPLANE_SCREENSHOT_DIR") {
        std::fs::copy(&shot, Path::new(&out).join(name)).expect("copy screenshot");
    }
}

/// Four real Envoys through a rollout: mid-way the entry reads "old: 3, new: 1", all
/// green (held back on purpose is not behind); after a version Envoy refuses is rolled
/// back, the failure stands at the top, the entry says its version was refused and that
/// every proxy runs the last good one, and nothing is amber.
#[test]
fn a_rollout_reads_old_and_new_and_a_rollback_stands_at_the_top() {
    use filterplane_e2e::{example_bootstrap, filterplane_bin, wait_plugin_count, Envoy, EnvoyPorts, Filterplane};
    let spec = "\nrollout: { steps: [25, 100], bake: 10m, ack_timeout: 20s, on_failure: rollback }\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("filterplane.yaml"), yaml_with("v1") + spec).unwrap();
    std::fs::write(dir.path().join("token"), "page-token\n").unwrap();
    let mut fp = Filterplane::start_in(dir.path(), "filterplane.yaml", dir.path(), &["--admin-token-file", "token"]);
    fp.token = Some("page-token".into());
    let envoys: Vec<Envoy> = (0..4)
        .map(|i| {
            let ports = EnvoyPorts::new(fp.xds_port);
            let node = format!("envoy-{i}");
            Envoy::start(&example_bootstrap("quickstart/envoy.yaml", ports, &node), ports, dir.path(), &node)
        })
        .collect();
    wait_plugin_count(&envoys, "v1", 4, WAIT);

    std::fs::write(dir.path().join("filterplane.yaml"), yaml_with("v2") + spec).unwrap();
    wait_until("the first step ACKed", WAIT, || {
        (fp.api("/api/v1/rollouts")["rollouts"][0]["acked"] == 1).then_some(())
    });
    let browser = Browser::start(dir.path());
    browser.resize(1280, 1000);
    browser.goto(&fp.url("/"));
    browser.eval("document.getElementById('token').value = 'page-token'; document.getElementById('sign-in').click(); return true;");
    let row = "#configs tr[data-entry=\"add-header\"]";
    let text = wait_until("the entry's old and new versions", WAIT, || {
        let t = browser.text(row);
        (t.contains("old") && t.contains("new")).then_some(t)
    });
    let rollout = &fp.api("/api/v1/rollouts")["rollouts"][0];
    let short = |v: &serde_json::Value| v.as_str().unwrap()[..8].to_owned();
    let (old, new) = (short(&rollout["last_completed_version"]), short(&rollout["new_version"]));
    assert!(text.contains(&format!("old {old}: synced 3")), "{text}");
    assert!(text.contains(&format!("new {new}: synced 1")), "{text}");
    assert!(text.contains("filterplane.yaml:5"), "where the version comes from: {text}");
    assert_eq!(browser.eval("return document.querySelectorAll('tr.stale, tr.nack').length"), 0, "nothing amber or red");
    assert!(browser.text("#tiles").contains("1\nROLLOUTS IN PROGRESS"), "{}", browser.text("#tiles"));
    assert!(browser.text("#fleet-count") == "(4 proxies)");
    assert!(overflowing(&browser).is_empty(), "at 1280 px: {:?}", overflowing(&browser));
    save_screenshot(&browser, dir.path(), "admin-page-rollout.png");

    let promoted = std::process::Command::new(filterplane_bin())
        .args(["rollout", "promote", "add-header", "--admin", &fp.url("")])
        .arg("--token-file")
        .arg(dir.path().join("token"))
        .output()
        .unwrap();
    assert!(promoted.status.success(), "{}", String::from_utf8_lossy(&promoted.stderr));
    wait_plugin_count(&envoys, "v2", 4, WAIT);

    std::fs::write(dir.path().join("filterplane.yaml"), yaml_envoy_refuses(1024) + spec).unwrap();
    wait_until("the refused version rolled back", WAIT, || {
        (fp.api("/api/v1/rollouts")["history"][0]["outcome"] == "rolled_back").then_some(())
    });
    wait_plugin_count(&envoys, "v2", 4, WAIT);
    let alert = wait_until("the failure at the top", WAIT, || {
        let t = browser.text("#alerts");
        t.contains("Rollout of add-header rolled back").then_some(t)
    });
    assert!(alert.contains(&format!("Proxies run the last good version {new}")), "{alert}");
    assert!(alert.contains("filterplane.yaml:5 still holds the refused version"), "{alert}");
    let text = wait_until("every proxy back and synced", WAIT, || {
        let t = browser.text(row);
        t.contains(&format!("last good {new}: synced 4")).then_some(t)
    });
    assert!(text.contains("refused"), "{text}");
    let rollouts = browser.text("#rollouts");
    assert!(rollouts.contains("failed at step 1: 1 proxy refused it or timed out; rolled back"), "{rollouts}");
    assert!(!rollouts.contains("on new: 0"), "no count that contradicts the failure: {rollouts}");
    assert_eq!(browser.eval("return document.querySelectorAll('#configs tr.stale, #configs tr.nack').length"), 0);
    save_screenshot(&browser, dir.path(), "admin-page-rollback.png");
}

/// The gateway example: the `edge` listener is served with its filters placed, and a
/// proxy that ACKed it is green, not "older"; five xDS types fit 1280 px.
#[test]
fn the_gateway_example_is_green_when_synced_and_fits_1280_pixels() {
    use filterplane_e2e::{example_bootstrap, free_port, gateway::gateway_config, Envoy, EnvoyPorts, Filterplane};
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    let (xds_port, admin_port) = (free_port(), free_port());
    let ports = EnvoyPorts::new(xds_port);
    std::fs::write(&yaml, gateway_config(&ports, admin_port)).unwrap();
    let fp = Filterplane::start_on(&yaml, dir.path(), xds_port, admin_port);
    let envoy = Envoy::start(&example_bootstrap("gateway/envoy.yaml", ports, "gateway"), ports, dir.path(), "envoy");
    wait_until("the gateway to answer with its plugins", WAIT, || {
        envoy.get("/").filter(|r| r.header("x-served-by") == Some("filterplane-gateway"))
    });
    wait_until("every type synced", WAIT, || (fp.api("/api/v1/summary")["states"]["synced"] == 1).then_some(()));
    let browser = Browser::start(dir.path());
    browser.resize(1280, 1000);
    browser.goto(&fp.url("/"));
    let edge = wait_until("the edge listener's row", WAIT, || {
        let t = browser.text("#configs tr[data-entry=\"edge\"]");
        t.contains("synced 1").then_some(t)
    });
    assert!(!edge.contains("applying"), "{edge}");
    assert_eq!(browser.eval("return document.querySelectorAll('tr.stale, tr.nack').length"), 0, "nothing amber");
    let types = browser.eval("return document.querySelectorAll('#proxies thead th').length").as_u64().unwrap();
    assert!(types >= 5 + 5, "five types besides the proxy's own columns: {types}");
    assert!(overflowing(&browser).is_empty(), "at 1280 px: {:?}", overflowing(&browser));
    let count = browser.text("#configs-count");
    assert!(count.contains("2 extension configs") && count.contains("1 listener"), "{count}");
    let tiles = browser.text("#tiles");
    assert!(tiles.contains("2\nEXTENSION CONFIGS"), "only ECDS counts as extension configs: {tiles}");
    drop(fp);
}
