//! `filterplane status`: a terminal table of proxies and their sync state per type, in
//! the spirit of `istioctl proxy-status`, read from the admin JSON API.

use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::args::{AdminClientArgs, Output};

/// Columns in the order operators read them; a type no proxy subscribes to is left out.
const COLUMNS: [(&str, &str); 6] = [
    ("CDS", "type.googleapis.com/envoy.config.cluster.v3.Cluster"),
    ("LDS", "type.googleapis.com/envoy.config.listener.v3.Listener"),
    ("EDS", "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"),
    ("RDS", "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"),
    ("ECDS", "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"),
    ("SDS", "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"),
];

/// An HTTP client for the admin API: the bearer token from `--token-file`, the CAs of
/// `--ca-file` for an https:// address.
pub struct AdminClient {
    base: String,
    agent: ureq::Agent,
    authorization: Option<String>,
}

impl AdminClient {
    pub fn new(admin: &str, client: &AdminClientArgs, timeout: Duration) -> anyhow::Result<Self> {
        let mut config =
            ureq::Agent::config_builder().timeout_global(Some(timeout)).proxy(None).http_status_as_error(false);
        if let Some(ca) = &client.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("read --ca-file {}", ca.display()))?;
            let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            anyhow::ensure!(!certs.is_empty(), "--ca-file {}: no PEM certificate in it", ca.display());
            config = config.tls_config(
                ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs)).build(),
            );
        }
        let authorization = match &client.token_file {
            Some(path) => {
                let token = filterplane_api::files::read_token(path)
                    .with_context(|| format!("read --token-file {}", path.display()))?;
                Some(format!("Bearer {token}"))
            }
            None => None,
        };
        Ok(Self { base: admin.trim_end_matches('/').to_owned(), agent: config.build().into(), authorization })
    }

    fn call(&self, method: &str, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let result = match method {
            "POST" => {
                let mut req = self.agent.post(&url);
                if let Some(a) = &self.authorization {
                    req = req.header("authorization", a);
                }
                req.send_empty()
            }
            _ => {
                let mut req = self.agent.get(&url);
                if let Some(a) = &self.authorization {
                    req = req.header("authorization", a);
                }
                req.call()
            }
        };
        let mut res = result.with_context(|| format!("{method} {url}"))?;
        let status = res.status().as_u16();
        if status == 401 {
            anyhow::bail!(
                "{method} {url}: 401: the admin API needs its bearer token: --token-file FILE (or FILTERPLANE_TOKEN_FILE)"
            );
        }
        let body = res.body_mut().read_to_string().unwrap_or_default();
        let json: Option<Value> = serde_json::from_str(&body).ok();
        if status >= 400 {
            let why = json.as_ref().and_then(|j| j["error"].as_str().map(str::to_owned)).unwrap_or(body);
            anyhow::bail!("{method} {url}: {status}: {}", why.trim());
        }
        json.with_context(|| format!("{method} {url}: not the JSON Filterplane serves"))
    }
}

/// Exit statuses `filterplane status` gates a pipeline with.
pub const EXIT_RELOAD_FAILED: u8 = 3;
pub const EXIT_NOT_SYNCED: u8 = 4;

/// Every proxy, following the pages (NACKing first).
fn all_proxies(c: &AdminClient) -> anyhow::Result<(Vec<Value>, Value)> {
    let mut proxies = Vec::new();
    let mut path = "/api/v1/proxies?limit=1000".to_owned();
    loop {
        let page = c.call("GET", &path)?;
        proxies.extend(page["proxies"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/proxies?limit=1000&cursor={}", url_segment(cursor)),
            None => return Ok((proxies, page)),
        }
    }
}

/// Whether every type of every stream runs what it was sent; `Err` names the first
/// proxy that NACKs.
fn synced(streams: &[Value]) -> Result<bool, String> {
    let mut all = true;
    for p in streams {
        for t in p["types"].as_object().map(|m| m.values().collect::<Vec<_>>()).unwrap_or_default() {
            match t["state"].as_str() {
                Some("synced") => {}
                Some("nacked") => {
                    return Err(format!("{} NACKs: {}", text(&p["node_id"]), text(&t["last_nack"]["message"])))
                }
                _ => all = false,
            }
        }
    }
    Ok(all)
}

/// `filterplane status [NODE]`: what it prints and its exit status.
pub fn status(
    admin: &str,
    client: &AdminClientArgs,
    node: Option<&str>,
    output: Output,
    wait: Option<Duration>,
) -> anyhow::Result<(String, u8)> {
    let c = AdminClient::new(admin, client, Duration::from_secs(10))?;
    let streams_of = |c: &AdminClient| -> anyhow::Result<Vec<Value>> {
        match node {
            Some(n) => match c.call("GET", &format!("/api/v1/proxies/{}", url_segment(n))) {
                Ok(v) => Ok(v.as_array().cloned().unwrap_or_default()),
                Err(e) if e.to_string().contains(": 404:") => Ok(Vec::new()),
                Err(e) => Err(e),
            },
            None => Ok(all_proxies(c)?.0),
        }
    };
    let mut verdict = None;
    if let Some(wait) = wait {
        let deadline = std::time::Instant::now() + wait;
        verdict = Some(loop {
            let streams = streams_of(&c)?;
            match synced(&streams) {
                Err(nack) => break Err(nack),
                Ok(true) if node.is_none() || !streams.is_empty() => break Ok(()),
                Ok(_) if std::time::Instant::now() >= deadline => {
                    break Err(match node {
                        Some(n) if streams.is_empty() => format!("{n} is not connected"),
                        _ => format!("not synced within {}", humantime::format_duration(wait)),
                    })
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        });
    }
    let config = c.call("GET", "/api/v1/config")?;
    let rejects = c.call("GET", "/api/v1/rejects")?;
    let mut out = match (node, output) {
        (Some(n), Output::Table) => render_node(n, &streams_of(&c)?),
        (Some(n), _) => encode(&serde_json::json!({ "node_id": n, "streams": streams_of(&c)? }), output)?,
        (None, Output::Table) => {
            let (proxies, page) = all_proxies(&c)?;
            let mut t = render(&Value::Array(proxies), &rejects, &config);
            t.push_str(&render_fleet(&c.call("GET", "/api/v1/summary")?, &page));
            t
        }
        (None, _) => {
            let doc = serde_json::json!({
                "serving_version": config["serving_version"],
                "last_reload": config["last_outcome"],
                "summary": c.call("GET", "/api/v1/summary")?,
                "proxies": all_proxies(&c)?.0,
                "rejects": rejects,
            });
            encode(&doc, output)?
        }
    };
    let mut code = 0;
    if config["last_outcome"]["result"] == "failed" {
        code = EXIT_RELOAD_FAILED;
    }
    if let Some(Err(why)) = &verdict {
        code = EXIT_NOT_SYNCED;
        if output == Output::Table {
            out.push_str(&format!("NOT SYNCED: {why}\n"));
        } else {
            eprintln!("filterplane status: not synced: {why}");
        }
    }
    Ok((out, code))
}

/// A document as JSON or YAML.
fn encode(doc: &Value, output: Output) -> anyhow::Result<String> {
    Ok(match output {
        Output::Yaml => serde_yaml::to_string(doc)?,
        _ => serde_json::to_string_pretty(doc)? + "\n",
    })
}

/// One proxy: each stream, each resource it was sent, and how Envoy took it.
pub fn render_node(node: &str, streams: &[Value]) -> String {
    if streams.is_empty() {
        return format!("{} is not connected\n", text(&Value::from(node)));
    }
    let mut out = String::new();
    for p in streams {
        out.push_str(&format!(
            "{}  cluster {}  {}  {} stream from {}\n",
            text(&p["node_id"]),
            text(&p["cluster"]),
            text(&p["user_agent"]),
            text(&p["stream_kind"]),
            text(&p["peer"])
        ));
        let mut rows = vec![["TYPE", "RESOURCE", "SENT", "ACKED", "STATUS"].map(str::to_owned).to_vec()];
        for (short_name, url) in COLUMNS {
            let t = &p["types"][url];
            let Some(resources) = t["resources"].as_object() else { continue };
            for (name, r) in resources {
                let state = if !r["nacked_version"].is_null() {
                    "NACKED"
                } else if r["acked_version"] == r["sent_version"] {
                    "ACKED"
                } else {
                    "SENT, not ACKed yet"
                };
                rows.push(vec![
                    short_name.to_owned(),
                    text(&Value::from(name.as_str())),
                    short(&r["sent_version"]),
                    short(&r["acked_version"]),
                    state.to_owned(),
                ]);
            }
        }
        out.push_str(&table(&rows));
        for (short_name, url) in COLUMNS {
            let nack = &p["types"][url]["last_nack"];
            if nack.is_object() {
                out.push_str(&format!(
                    "{short_name} NACK of {}: {}\n",
                    short(&nack["version"]),
                    text(&nack["message"])
                ));
            }
        }
    }
    out
}

/// `filterplane config-dump NODE`.
pub fn config_dump(admin: &str, client: &AdminClientArgs, node: &str, output: Output) -> anyhow::Result<String> {
    let c = AdminClient::new(admin, client, Duration::from_secs(30))?;
    encode(&c.call("GET", &format!("/api/v1/config_dump?node_id={}", url_segment(node)))?, output)
}

/// The whole fleet: states, replicas (with several), NACKing proxies and where they are.
pub fn render_fleet(summary: &Value, page: &Value) -> String {
    let mut out = String::new();
    let s = &summary["states"];
    out.push_str(&format!(
        "\nfleet: {} proxies: {} synced, {} waiting for an ACK, {} NACKing, {} sent nothing yet\n",
        text(&summary["proxies"]),
        text(&s["synced"]),
        text(&s["pending"]),
        text(&s["nacked"]),
        text(&s["not_sent"])
    ));
    if let Some(replicas) = summary["replicas"].as_array().filter(|r| !r.is_empty()) {
        let list: Vec<String> = replicas
            .iter()
            .map(|r| {
                let mut t = format!("{} ({} proxies", text(&r["replica"]), text(&r["proxies"]));
                if r["leader"] == true {
                    t.push_str(", leads rollouts");
                }
                if r["this"] == true {
                    t.push_str(", answering");
                }
                t + ")"
            })
            .collect();
        out.push_str(&format!("replicas: {}\n", list.join(", ")));
    }
    for n in summary["nacking"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let on = n["replica"].as_str().map(|r| format!(" on {}", text(&Value::from(r)))).unwrap_or_default();
        out.push_str(&format!("  NACKing: {}{on}: {}\n", text(&n["node_id"]), text(&n["message"])));
    }
    if let (Some(total), Some(shown)) = (page["matched"].as_u64(), page["proxies"].as_array().map(Vec::len)) {
        if total as usize > shown {
            out.push_str(&format!(
                "(the table shows {shown} of this replica's {total}, NACKing first; /api/v1/proxies?state=&q=&cursor= for more)\n"
            ));
        }
    }
    out
}

/// `filterplane reload [--confirm]`: asks the server to reload; returns what happened in
/// words, and whether the config is now served (applied or unchanged).
pub fn request_reload(admin: &str, confirm: bool, client: &AdminClientArgs) -> anyhow::Result<(String, bool)> {
    let c = AdminClient::new(admin, client, Duration::from_secs(120))?;
    Ok(describe_outcome(&c.call("POST", &format!("/api/v1/reload?confirm={confirm}"))?))
}

/// `filterplane rollout status [NAME]`; a NAME no rollout or history entry has is an
/// error (its names listed).
pub fn rollout_status(admin: &str, client: &AdminClientArgs, name: Option<&str>) -> anyhow::Result<String> {
    let c = AdminClient::new(admin, client, Duration::from_secs(10))?;
    let v = c.call("GET", "/api/v1/rollouts")?;
    if let Some(n) = name {
        let known: Vec<String> = ["rollouts", "history"]
            .iter()
            .flat_map(|k| v[*k].as_array().cloned().unwrap_or_default())
            .filter_map(|r| r["name"].as_str().map(str::to_owned))
            .collect();
        if !known.iter().any(|k| k == n) {
            let mut names = known;
            names.sort();
            names.dedup();
            anyhow::bail!(
                "no rollout of \"{}\" in progress or in the history (known: {})",
                text(&Value::from(n)),
                if names.is_empty() { "none".to_owned() } else { names.join(", ") }
            );
        }
    }
    Ok(render_rollouts(&v, name))
}

/// `filterplane rollout pause|resume|promote|abort NAME`.
pub fn rollout_action(admin: &str, client: &AdminClientArgs, action: &str, name: &str) -> anyhow::Result<String> {
    let c = AdminClient::new(admin, client, Duration::from_secs(10))?;
    let path = format!("/api/v1/rollouts/{}/{action}", url_segment(name));
    let r = c.call("POST", &path)?;
    Ok(format!(
        "{action}: {} ({} entr{})",
        text(&r["name"]),
        text(&r["entries"]),
        if r["entries"] == 1 { "y" } else { "ies" }
    ))
}

/// A path segment with everything but unreserved characters percent-encoded.
fn url_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Rollouts and history as a terminal table.
pub fn render_rollouts(v: &Value, name: Option<&str>) -> String {
    let wanted = |r: &Value| name.is_none_or(|n| r["name"] == n);
    let mut out = String::new();
    let rollouts: Vec<&Value> =
        v["rollouts"].as_array().map(|a| a.iter().filter(|r| wanted(r)).collect()).unwrap_or_default();
    if rollouts.is_empty() {
        out.push_str("No rollout in progress.\n");
    }
    for r in rollouts {
        let steps: Vec<String> = r["steps"].as_array().map(|s| s.iter().map(text).collect()).unwrap_or_default();
        if r["status"] == "failed" {
            // Its proxies are back on (or held at) the old version: no "on new" counts.
            out.push_str(&format!(
                "{}  FAILED at step {}/{} ({}%, steps {})  {} -> {}: {}\n",
                text(&r["name"]),
                r["step"].as_u64().unwrap_or(0) + 1,
                steps.len(),
                text(&r["percent"]),
                steps.join(","),
                short(&r["last_completed_version"]),
                short(&r["new_version"]),
                text(&r["failure_count"]) + " proxy failure(s)",
            ));
            if r["reason"].is_string() {
                out.push_str(&format!("  {}\n", text(&r["reason"])));
            }
            for f in r["failures"].as_array().map_or(&[][..], Vec::as_slice) {
                out.push_str(&format!("  {}: {}\n", text(&f["node_id"]), text(&f["message"])));
            }
            continue;
        }
        out.push_str(&format!(
            "{}  {}  step {}/{} ({}%, steps {})  on new: {} of {} (acked {}, nacked {}, waiting {})  {} -> {}\n",
            text(&r["name"]),
            text(&r["status"]).to_uppercase(),
            r["step"].as_u64().unwrap_or(0) + 1,
            steps.len(),
            text(&r["percent"]),
            steps.join(","),
            text(&r["on_new"]),
            text(&r["matching_proxies"]),
            text(&r["acked"]),
            text(&r["nacked"]),
            text(&r["waiting"]),
            short(&r["last_completed_version"]),
            short(&r["new_version"]),
        ));
        if let Some(h) = health_line(&r["health"]) {
            out.push_str(&format!("  {h}\n"));
        }
        if r["reason"].is_string() {
            out.push_str(&format!("  {}\n", text(&r["reason"])));
        }
        let examples = r["failures"].as_array().map_or(&[][..], Vec::as_slice);
        for f in examples {
            out.push_str(&format!("  {}: {}\n", text(&f["node_id"]), text(&f["message"])));
        }
        let all = r["failure_count"].as_u64().unwrap_or(0) as usize;
        if all > examples.len() {
            out.push_str(&format!("  … and {} more\n", all - examples.len()));
        }
    }
    let history: Vec<&Value> =
        v["history"].as_array().map(|a| a.iter().filter(|r| wanted(r)).take(10).collect()).unwrap_or_default();
    if !history.is_empty() {
        out.push_str("History:\n");
        for h in history {
            out.push_str(&format!(
                "  {}  {}  {} -> {}  ended {}\n",
                text(&h["name"]),
                text(&h["outcome"]).to_uppercase(),
                short(&h["from_version"]),
                short(&h["to_version"]),
                text(&h["ended_at"])
            ));
        }
    }
    out
}

fn describe_outcome(o: &Value) -> (String, bool) {
    match o["result"].as_str().unwrap_or("") {
        "applied" => (format!("applied {}", text(&o["version"])), true),
        "unchanged" => (format!("unchanged: {} is already served", text(&o["version"])), true),
        "held" => (
            format!(
                "HELD {}: it would remove {} of the {} resources served ({}); run again with --confirm to apply it",
                text(&o["version"]),
                text(&o["removed"]),
                text(&o["served"]),
                o["examples"].as_array().map(|e| e.iter().map(text).collect::<Vec<_>>().join(", ")).unwrap_or_default()
            ),
            false,
        ),
        _ => {
            let errors = o["errors"].as_array().map(Vec::as_slice).unwrap_or_default();
            let lines: Vec<String> = errors
                .iter()
                .map(|e| {
                    format!(
                        "  {}:{}: {}: {}",
                        text(&e["file"]),
                        text(&e["line"]),
                        text(&e["path"]),
                        text(&e["message"])
                    )
                })
                .collect();
            (
                format!(
                    "REFUSED with {} error(s); the last good config keeps serving\n{}",
                    errors.len(),
                    lines.join("\n")
                ),
                false,
            )
        }
    }
}

/// The table, from the JSON API's documents.
pub fn render(proxies: &Value, rejects: &Value, config: &Value) -> String {
    let proxies = proxies.as_array().map(Vec::as_slice).unwrap_or_default();
    let columns: Vec<(&str, &str)> =
        COLUMNS.into_iter().filter(|(_, url)| proxies.iter().any(|p| !p["types"][*url].is_null())).collect();
    let mut rows = vec![["NODE", "CLUSTER", "ENVOY", "STREAM"]
        .into_iter()
        .chain(columns.iter().map(|(n, _)| *n))
        .map(str::to_owned)
        .collect::<Vec<_>>()];
    for p in proxies {
        let mut row = vec![text(&p["node_id"]), text(&p["cluster"]), text(&p["user_agent"]), text(&p["stream_kind"])];
        row.extend(columns.iter().map(|(_, url)| cell(&p["types"][*url])));
        rows.push(row);
    }
    let mut out = String::new();
    let serving = config["serving_version"].as_str().unwrap_or("nothing (no valid config loaded)");
    out.push_str(&format!("config {serving}"));
    if config["last_outcome"]["result"] == "failed" {
        let n = config["last_outcome"]["errors"].as_array().map_or(0, Vec::len);
        out.push_str(&format!("; last reload FAILED with {n} error(s), see /api/v1/config"));
    }
    out.push('\n');
    if proxies.is_empty() {
        out.push_str("no proxy is connected\n");
    } else {
        out.push_str(&table(&rows));
    }
    if let Some(latest) = rejects.as_array().and_then(|r| r.first()) {
        let n = rejects.as_array().map_or(0, Vec::len);
        out.push_str(&format!(
            "\n{n} recent reject(s); latest at {} from {} ({}): {}\n",
            text(&latest["at"]),
            text(&latest["node_id"]),
            COLUMNS.iter().find(|(_, u)| latest["type_url"] == *u).map_or("?", |(n, _)| n),
            text(&latest["message"])
        ));
    }
    out
}

/// A value as the terminal may print it: what proxies sent (node ids, NACK messages) may
/// hold escape sequences or newlines, shown escaped instead of acted on.
fn text(v: &Value) -> String {
    let raw = v.as_str().map(str::to_owned).unwrap_or_else(|| if v.is_null() { String::new() } else { v.to_string() });
    if !raw.chars().any(char::is_control) {
        return raw;
    }
    raw.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// A running rollout's live step health (its gates' figures), when it has gates.
fn health_line(h: &Value) -> Option<String> {
    let requests = h["requests"].as_f64()?;
    let mut line = format!(
        "health: {requests:.0} requests on {} step proxies with stats, 5xx {:.0} (ratio {:.4})",
        text(&h["proxies"]),
        h["errors_5xx"].as_f64().unwrap_or(0.0),
        h["ratio_5xx"].as_f64().unwrap_or(0.0)
    );
    if let Some(p99) = h["p99_ms"].as_f64() {
        line.push_str(&format!(", p99 {p99:.1} ms"));
    }
    if let Some(b) = h["baseline_requests"].as_f64().filter(|b| *b > 0.0) {
        line.push_str(&format!(
            "; baseline {b:.0} requests, ratio {:.4}",
            h["baseline_ratio_5xx"].as_f64().unwrap_or(0.0)
        ));
    }
    Some(line)
}

fn short(v: &Value) -> String {
    v.as_str().map(|s| s.chars().take(8).collect()).unwrap_or_default()
}

fn cell(t: &Value) -> String {
    if t.is_null() {
        return "-".into();
    }
    match t["state"].as_str().unwrap_or("") {
        "synced" => format!("SYNCED {}", short(&t["acked_version"])),
        // Envoy NACKed while it downloads a Wasm module; the response goes again.
        "pending" if t["code_fetch"].is_object() => format!(
            "FETCHING {}→{} (resend {}/{})",
            short(&t["acked_version"]),
            short(&t["sent_version"]),
            t["code_fetch"]["attempt"],
            t["code_fetch"]["retries"]
        ),
        "pending" => format!("STALE {}→{}", short(&t["acked_version"]), short(&t["sent_version"])),
        "nacked" => format!("NACKED {} (runs {})", short(&t["last_nack"]["version"]), short(&t["acked_version"])),
        "not_sent" => "NOT SENT".into(),
        other => other.to_uppercase(),
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ECDS: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

    #[test]
    fn renders_one_row_per_stream_with_state_per_type() {
        let proxies = json!([
            {"node_id": "edge-1", "cluster": "edge", "user_agent": "envoy 1.40.0", "stream_kind": "sotw",
             "types": {ECDS: {"state": "synced", "acked_version": "0123456789abcdef", "sent_version": "0123456789abcdef"}}},
            {"node_id": "edge-2", "cluster": "edge", "user_agent": "envoy 1.40.0", "stream_kind": "sotw",
             "types": {ECDS: {"state": "nacked", "acked_version": "0123456789abcdef", "sent_version": "fedcba9876543210",
                              "last_nack": {"version": "fedcba9876543210"}}}},
            {"node_id": "edge-3", "cluster": "edge", "user_agent": "envoy 1.40.0", "stream_kind": "delta",
             "types": {ECDS: {"state": "pending", "acked_version": "0123456789abcdef", "sent_version": "fedcba9876543210",
                              "code_fetch": {"attempt": 2, "retries": 10, "message": "Unable to create Wasm plugin w"}}}},
        ]);
        let rejects = json!([{"at": "2026-01-01T00:00:00Z", "node_id": "edge-2", "type_url": ECDS, "message": "boom"}]);
        let config = json!({"serving_version": "abc", "last_outcome": {"result": "applied"}});
        let out = render(&proxies, &rejects, &config);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "config abc");
        assert!(lines[1].starts_with("NODE") && lines[1].ends_with("ECDS") && !lines[1].contains("LDS"), "{out}");
        assert!(lines[2].starts_with("edge-1") && lines[2].ends_with("SYNCED 01234567"), "{out}");
        assert!(lines[3].ends_with("NACKED fedcba98 (runs 01234567)"), "{out}");
        assert!(lines[4].ends_with("FETCHING 01234567→fedcba98 (resend 2/10)"), "{out}");
        assert!(out.contains("1 recent reject(s); latest at 2026-01-01T00:00:00Z from edge-2 (ECDS): boom"), "{out}");
    }

    #[test]
    fn the_fleet_line_names_replicas_and_where_nacking_proxies_are() {
        let summary = json!({
            "proxies": 6, "states": {"synced": 5, "pending": 0, "nacked": 1, "not_sent": 0},
            "replicas": [
                {"replica": "r0", "proxies": 2, "leader": true, "this": false},
                {"replica": "r1", "proxies": 4, "leader": false, "this": true},
            ],
            "nacking": [{"node_id": "edge-1", "replica": "r0", "message": "bad\u{1b}[2J"}],
        });
        let out = render_fleet(&summary, &json!({"proxies": [{}, {}], "matched": 4}));
        assert!(out.contains("fleet: 6 proxies: 5 synced, 0 waiting for an ACK, 1 NACKing"), "{out}");
        assert!(out.contains("replicas: r0 (2 proxies, leads rollouts), r1 (4 proxies, answering)"), "{out}");
        assert!(out.contains("NACKing: edge-1 on r0: bad") && !out.contains('\u{1b}'), "{out}");
        assert!(out.contains("shows 2 of this replica's 4"), "{out}");
    }

    #[test]
    fn what_proxies_sent_is_printed_escaped() {
        let proxies = json!([{"node_id": "evil\u{1b}[2J\nforged", "cluster": "c", "user_agent": "", "stream_kind": "sotw", "types": {}}]);
        let rejects = json!([{"at": "t", "node_id": "n", "type_url": ECDS, "message": "line\nFAKE LINE\u{1b}[31m"}]);
        let out = render(&proxies, &rejects, &json!({"serving_version": "v"}));
        assert!(!out.contains('\u{1b}'), "no raw escape sequence: {out:?}");
        assert!(out.contains("evil\\u{1b}[2J\\nforged"), "{out}");
        assert!(out.contains("line\\nFAKE LINE"), "{out}");
    }

    #[test]
    fn a_gated_rollout_shows_its_step_health_beside_the_ack_counts() {
        let v = json!({"rollouts": [{"name": "fault", "status": "running", "steps": [25, 100], "step": 0, "percent": 25,
            "on_new": 1, "matching_proxies": 4, "acked": 1, "nacked": 0, "waiting": 0, "failures": [], "failure_count": 0,
            "health": {"requests": 1200.0, "errors_5xx": 6.0, "ratio_5xx": 0.005, "p99_ms": 12.5, "proxies": 1,
                       "baseline_requests": 3600.0, "baseline_ratio_5xx": 0.004}}], "history": []});
        let out = render_rollouts(&v, None);
        assert!(out.contains("on new: 1 of 4 (acked 1, nacked 0, waiting 0)"), "{out}");
        assert!(
            out.contains("health: 1200 requests on 1 step proxies with stats, 5xx 6 (ratio 0.0050), p99 12.5 ms; baseline 3600 requests, ratio 0.0040"),
            "{out}"
        );
    }

    #[test]
    fn says_so_when_nothing_is_connected_or_the_config_failed() {
        let config = json!({"serving_version": null, "last_outcome": {"result": "failed", "errors": [{}, {}]}});
        let out = render(&json!([]), &json!([]), &config);
        assert!(out.contains("last reload FAILED with 2 error(s)"), "{out}");
        assert!(out.contains("no proxy is connected"), "{out}");
    }
}
