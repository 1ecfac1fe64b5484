//! Health gates: whether a step's own traffic, from its proxies' stats, lets it complete.
//! Pure: the engine hands in what the step's proxies and the others did since the step
//! began.

use std::time::Duration;

use filterplane_config::model::{HealthSpec, InsufficientTraffic};

use crate::fleet::Traffic;

/// What the gates say about a step now.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every gate held over enough requests (or too little traffic passes by setting).
    Pass,
    /// No verdict yet: too few requests, or the bake is not over.
    Wait(String),
    /// A gate failed (its name, as `filterplane_rollout_gate_failures_total` counts it),
    /// with the figures that failed it.
    Fail(&'static str, String),
}

/// Judges `step` (the step's proxies that run the new version) against `spec`, with
/// `baseline` (the proxies still on the old version) for `baseline_margin`. `elapsed`:
/// since the step began; `bake`: the step's bake. A gate crossing fails at once, once
/// the step has `min_requests`; a pass needs the bake over.
pub fn judge(spec: &HealthSpec, step: &Traffic, baseline: &Traffic, elapsed: Duration, bake: Duration) -> Verdict {
    let requests = step.requests;
    if let Some(max) = spec.max_wasm_failures {
        // A failing VM is decisive at any request count.
        if step.wasm_failures > max as f64 {
            return Verdict::Fail(
                "max_wasm_failures",
                format!(
                    "{:.0} Wasm VM failures (wasm.*.vm_reload*) on the step's {} proxies, over max_wasm_failures {max}",
                    step.wasm_failures, step.proxies
                ),
            );
        }
    }
    // With a baseline to judge against, it needs its requests too (its proxies' first
    // flush since the step began may come after the step's).
    let baseline_short = spec.baseline_margin.is_some()
        && baseline.proxies > 0
        && baseline.requests < (spec.min_requests as f64).max(1.0);
    if requests < spec.min_requests as f64 || requests == 0.0 || baseline_short {
        let mut figures = format!(
            "{requests:.0} requests on the step's {} proxies with stats, min_requests {}",
            step.proxies, spec.min_requests
        );
        if baseline_short {
            figures.push_str(&format!("; baseline {:.0} requests on {} proxies", baseline.requests, baseline.proxies));
        }
        if elapsed < bake + spec.max_wait {
            return Verdict::Wait(figures);
        }
        return match spec.insufficient_traffic {
            InsufficientTraffic::Fail => Verdict::Fail(
                "min_requests",
                format!(
                "too little traffic to judge: {figures} after the bake and max_wait {} (insufficient_traffic: fail)",
                humantime::format_duration(spec.max_wait)
            ),
            ),
            InsufficientTraffic::Pass => Verdict::Pass,
        };
    }
    if let Some(max) = spec.max_5xx_ratio {
        let ratio = step.ratio_5xx();
        let mut limit = max.0;
        let mut against = String::new();
        if let (Some(margin), true) = (spec.baseline_margin, baseline.requests > 0.0) {
            // Judged against the old version in the same window: what the step adds.
            limit = limit.max(baseline.ratio_5xx() + margin.0);
            against = format!(
                "; baseline {:.4} over {:.0} requests on {} proxies, margin {}",
                baseline.ratio_5xx(),
                baseline.requests,
                baseline.proxies,
                margin.0
            );
        }
        if ratio > limit {
            return Verdict::Fail(
                "max_5xx_ratio",
                format!(
                "5xx ratio {ratio:.4} ({:.0} of {requests:.0} requests on {} proxies) over max_5xx_ratio {}{against}",
                step.errors_5xx, step.proxies, max.0
            ),
            );
        }
    }
    if let (Some(max), Some(p99)) = (spec.max_p99_latency, step.p99_ms) {
        if p99 > max.as_secs_f64() * 1e3 {
            return Verdict::Fail(
                "max_p99_latency",
                format!(
                    "request time p99 {p99:.1} ms over max_p99_latency {} ({requests:.0} requests)",
                    humantime::format_duration(max)
                ),
            );
        }
    }
    if elapsed < bake {
        return Verdict::Wait(format!("baking; {requests:.0} requests, 5xx ratio {:.4}", step.ratio_5xx()));
    }
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use filterplane_config::model::Ratio;

    use super::*;

    fn spec() -> HealthSpec {
        HealthSpec {
            max_5xx_ratio: Some(Ratio(0.05)),
            min_requests: 50,
            max_p99_latency: Some(Duration::from_millis(250)),
            max_wasm_failures: Some(0),
            baseline_margin: None,
            max_wait: Duration::from_secs(60),
            insufficient_traffic: InsufficientTraffic::Fail,
        }
    }

    fn traffic(requests: f64, errors_5xx: f64) -> Traffic {
        Traffic { requests, errors_5xx, proxies: 1, ..Default::default() }
    }

    const BAKE: Duration = Duration::from_secs(15);

    #[test]
    fn a_gate_crossed_with_enough_requests_fails_at_once_and_a_healthy_step_passes_after_the_bake() {
        let s = spec();
        let none = Traffic::default();
        let v = judge(&s, &traffic(100.0, 30.0), &none, Duration::from_secs(2), BAKE);
        assert!(matches!(&v, Verdict::Fail(_, m) if m.contains("0.3000") && m.contains("30 of 100")), "{v:?}");
        assert!(matches!(judge(&s, &traffic(100.0, 1.0), &none, Duration::from_secs(2), BAKE), Verdict::Wait(_)));
        assert_eq!(judge(&s, &traffic(100.0, 1.0), &none, BAKE, BAKE), Verdict::Pass);
        let trapped = Traffic { wasm_failures: 2.0, ..traffic(3.0, 0.0) };
        assert!(
            matches!(judge(&s, &trapped, &none, Duration::ZERO, BAKE), Verdict::Fail(_, m) if m.contains("2 Wasm VM failures"))
        );
        let slow = Traffic { p99_ms: Some(900.0), ..traffic(100.0, 0.0) };
        assert!(matches!(judge(&s, &slow, &none, BAKE, BAKE), Verdict::Fail(_, m) if m.contains("p99 900.0 ms")));
    }

    #[test]
    fn too_little_traffic_waits_then_fails_or_passes_by_setting() {
        let mut s = spec();
        let none = Traffic::default();
        let few = traffic(10.0, 10.0);
        assert!(matches!(judge(&s, &few, &none, BAKE, BAKE), Verdict::Wait(m) if m.contains("min_requests 50")));
        let late = BAKE + s.max_wait;
        assert!(matches!(judge(&s, &few, &none, late, BAKE), Verdict::Fail(_, m) if m.contains("too little traffic")));
        s.insufficient_traffic = InsufficientTraffic::Pass;
        assert_eq!(judge(&s, &few, &none, late, BAKE), Verdict::Pass);
        s.min_requests = 0;
        assert!(
            matches!(judge(&s, &none, &none, BAKE, BAKE), Verdict::Wait(_) | Verdict::Pass),
            "no request is no verdict"
        );
    }

    #[test]
    fn with_a_baseline_the_step_fails_only_for_what_it_adds() {
        let mut s = spec();
        s.max_5xx_ratio = Some(Ratio(0.01));
        s.baseline_margin = Some(Ratio(0.005));
        let quiet = Traffic { proxies: 3, ..Traffic::default() };
        let v = judge(&s, &traffic(100.0, 2.0), &quiet, BAKE, BAKE);
        assert!(matches!(&v, Verdict::Wait(m) if m.contains("baseline 0 requests on 3 proxies")), "{v:?}");
        let old = Traffic { proxies: 3, ..traffic(300.0, 6.0) };
        assert_eq!(judge(&s, &traffic(100.0, 2.0), &old, BAKE, BAKE), Verdict::Pass, "2 % like the old version");
        let v = judge(&s, &traffic(100.0, 8.0), &old, BAKE, BAKE);
        assert!(matches!(&v, Verdict::Fail(_, m) if m.contains("baseline 0.0200")), "{v:?}");
    }
}
