//! A real headless Chromium, driven over the W3C WebDriver protocol through Debian's
//! chromedriver: plain JSON over loopback HTTP, no browser download, no CDN.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use base64::Engine;
use serde_json::{json, Value};

use crate::{free_port, wait_until, Process};

/// One browser session; the driver and the browser go away on drop.
pub struct Browser {
    base: String,
    session: String,
    agent: ureq::Agent,
    _driver: Process,
    _profile: tempfile::TempDir,
}

fn find(env: &str, default: &str) -> PathBuf {
    let p = std::env::var(env).map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(default));
    assert!(
        p.exists(),
        "{} not found: run scripts/test.sh (it installs chromium and chromium-driver) or set {env}",
        p.display()
    );
    p
}

impl Browser {
    /// Starts chromedriver and a fresh headless Chromium (own profile, no background
    /// networking: this machine has no network beyond loopback).
    pub fn start(logs: &Path) -> Self {
        let chromium = find("CHROMIUM_BIN", "/usr/bin/chromium");
        let driver_bin = find("CHROMEDRIVER_BIN", "/usr/bin/chromedriver");
        let port = free_port();
        let mut cmd = Command::new(driver_bin);
        cmd.arg(format!("--port={port}")).arg("--allowed-ips=127.0.0.1");
        let driver = Process::spawn("chromedriver", &mut cmd, logs.join("chromedriver.log"));
        let base = format!("http://127.0.0.1:{port}");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        wait_until("chromedriver to be ready", Duration::from_secs(20), || {
            let mut r = agent.get(&format!("{base}/status")).call().ok()?;
            let v: Value = r.body_mut().read_json().ok()?;
            (v["value"]["ready"] == true).then_some(())
        });
        let profile = tempfile::tempdir().expect("profile dir");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1440,1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let mut b = Browser { base, session: String::new(), agent, _driver: driver, _profile: profile };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_owned();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let res = match (method, body) {
            ("POST", Some(b)) => self.agent.post(&url).send_json(b),
            ("POST", None) => self.agent.post(&url).send_json(json!({})),
            ("DELETE", _) => self.agent.delete(&url).call(),
            _ => self.agent.get(&url).call(),
        };
        let mut res = res.unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let v: Value = res.body_mut().read_json().unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        assert!(v["value"]["error"].is_null(), "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", &format!("/session/{}/url", self.session), Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// `innerText` of the element matching `selector` ("" if there is none).
    pub fn text(&self, selector: &str) -> String {
        let script = format!("const e = document.querySelector({}); return e ? e.innerText : '';", json!(selector));
        self.eval(&script).as_str().unwrap_or_default().to_owned()
    }

    /// Sets the window's outer size in CSS pixels.
    pub fn resize(&self, width: u32, height: u32) {
        self.call(
            "POST",
            &format!("/session/{}/window/rect", self.session),
            Some(json!({ "width": width, "height": height })),
        );
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self, path: &Path) {
        let b64 = self.call("GET", &format!("/session/{}/screenshot", self.session), None);
        let png =
            base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap_or_default()).expect("base64 PNG");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let url = format!("{}/session/{}", self.base, self.session);
            let _ = self.agent.delete(&url).call();
        }
    }
}
