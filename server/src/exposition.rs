//! How `/metrics` is written: OpenMetrics to a scraper that asks for it (`Accept:
//! application/openmetrics-text`), else the Prometheus text format 0.0.4 (what
//! `promtool check metrics` and most scrapers read); and the `process_*` metrics every
//! Prometheus exporter has, read from `/proc` when scraped.

use std::time::{SystemTime, UNIX_EPOCH};

/// The content type of each format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut fields = part.split(';').map(str::trim);
            let media = fields.next().unwrap_or_default();
            let refused = fields.any(|f| f.replace(' ', "") == "q=0");
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

/// OpenMetrics text (as `prometheus-client` writes it) in the Prometheus text format:
/// counters and infos are named by their samples (`_total`, `_info`; an info becomes a
/// gauge), `# UNIT` lines, `_created` samples and `# EOF` go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // HELP comes before TYPE: held until the TYPE says what the family is.
    let mut help: Option<(&str, &str)> = None;
    let mut counters: Vec<String> = Vec::new();
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (sample, kind) = match kind {
                "counter" => {
                    counters.push(format!("{name}_created"));
                    (format!("{name}_total"), "counter")
                }
                "info" => (format!("{name}_info"), "gauge"),
                "gaugehistogram" | "stateset" | "unknown" => (name.to_owned(), "untyped"),
                k => (name.to_owned(), k),
            };
            if let Some((_, text)) = help.take().filter(|(n, _)| *n == name) {
                out.push_str(&format!("# HELP {sample} {text}\n"));
            }
            out.push_str(&format!("# TYPE {sample} {kind}\n"));
            continue;
        }
        let sample_name = line.split(['{', ' ']).next().unwrap_or_default();
        if counters.iter().any(|c| c == sample_name) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// What `/proc` says of this process.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
}

impl ProcessStats {
    /// This process, now. What cannot be read stays 0.
    pub fn read() -> ProcessStats {
        let mut s = ProcessStats::default();
        // utime and stime (fields 14 and 15) in clock ticks of USER_HZ, 100 on Linux;
        // the command (field 2) may hold spaces, so count from its closing parenthesis.
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            if let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) {
                let f: Vec<&str> = after.split_whitespace().collect();
                let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                // After ")": field 3 is index 0, so utime (14) is index 11, stime index 12.
                s.cpu_seconds = (ticks(11) + ticks(12)) as f64 / 100.0;
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let kib = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1024
            };
            s.resident_bytes = kib("VmRSS:");
            s.virtual_bytes = kib("VmSize:");
        }
        s.open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
        s.max_fds = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(0);
        s
    }
}

/// Seconds since the epoch, as `process_start_time_seconds` gives them.
pub fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let om = "# HELP filterplane_xds_pushes xDS responses sent.\n# TYPE filterplane_xds_pushes counter\n\
                  filterplane_xds_pushes_total{type_url=\"t\"} 3\nfilterplane_xds_pushes_created{type_url=\"t\"} 1.5\n\
                  # HELP filterplane_build Build.\n# TYPE filterplane_build info\nfilterplane_build_info{version=\"1\"} 1\n\
                  # HELP filterplane_q Queued.\n# TYPE filterplane_q gauge\n# UNIT filterplane_q bytes\nfilterplane_q 7\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP filterplane_xds_pushes_total xDS responses sent.\n# TYPE filterplane_xds_pushes_total counter\n\
             filterplane_xds_pushes_total{type_url=\"t\"} 3\n\
             # HELP filterplane_build_info Build.\n# TYPE filterplane_build_info gauge\nfilterplane_build_info{version=\"1\"} 1\n\
             # HELP filterplane_q Queued.\n# TYPE filterplane_q gauge\nfilterplane_q 7\n"
        );
    }

    #[test]
    fn openmetrics_only_when_asked() {
        assert!(wants_openmetrics(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
        assert!(!wants_openmetrics(None));
    }

    #[test]
    fn this_process_reads_as_itself() {
        let s = ProcessStats::read();
        assert!(s.resident_bytes > 1 << 20, "{s:?}");
        assert!(s.open_fds >= 3 && s.max_fds >= s.open_fds, "{s:?}");
        assert!(s.virtual_bytes >= s.resident_bytes, "{s:?}");
    }
}
