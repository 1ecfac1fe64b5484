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
        std::fs::copy(&shot, Path::new(&dir).join("admin-page.png")).expect("copy screenshot");
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
