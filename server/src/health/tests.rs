//! Keeping running totals of proxies' stats.

use super::*;

#[test]
fn cumulative_and_delta_counters_give_the_same_windows_and_restarts_count_from_zero() {
    let store = HealthStore::default();
    assert!(store.open("cum", false, 0) && store.open("delta", true, 0));
    let flush = |requests: f64, errors_5xx: f64| Flush { requests, errors_5xx, seen: true, ..Default::default() };
    for (t, (cum, delta)) in
        [((100.0, 0.0), (100.0, 0.0)), ((150.0, 5.0), (50.0, 5.0)), ((170.0, 5.0), (20.0, 0.0))].into_iter().enumerate()
    {
        let at = 1_000 * (t as u64 + 1);
        store.record("cum", flush(cum.0, cum.1), at);
        store.record("delta", flush(delta.0, delta.1), at);
    }
    for node in ["cum", "delta"] {
        let w = store.window(node, 1_000).unwrap();
        assert_eq!((w.requests, w.errors_5xx), (70.0, 5.0), "{node}: after the first flush");
        assert_eq!(store.window(node, 0).unwrap().requests, 70.0, "{node}: from the first flush kept");
        assert_eq!(store.window(node, 1_500).unwrap().requests, 20.0, "{node}: the straddling interval left out");
    }
    // Envoy restarted: its counters start again.
    store.record("cum", flush(10.0, 1.0), 4_000);
    let w = store.window("cum", 3_000).unwrap();
    assert_eq!((w.requests, w.errors_5xx), (10.0, 1.0));
    assert!((store.window("cum", 1_000).unwrap().ratio_5xx() - 6.0 / 80.0).abs() < 1e-9);
    assert_eq!(store.window("nobody", 0), None);
}

#[test]
fn samples_and_proxies_are_bounded() {
    let store = HealthStore::default();
    store.open("p", false, 0);
    for i in 0..(MAX_SAMPLES as u64 * 2) {
        store.record("p", Flush { requests: i as f64, seen: true, ..Default::default() }, i * 1_000);
    }
    let kept = store.proxies.lock().unwrap()["p"].samples.len();
    assert_eq!(kept, MAX_SAMPLES);
    // A window reaching past what is kept counts from the oldest kept flush.
    let w = store.window("p", 0).unwrap();
    assert_eq!(w.requests, (MAX_SAMPLES - 1) as f64);
}

#[test]
fn a_departed_proxys_stats_go_some_minutes_after_its_stream_ended() {
    let store = HealthStore::default();
    store.open("stays", false, 0);
    store.open("leaves", false, 0);
    store.open("back", false, 0);
    let ten_minutes = RETAIN_AFTER_END_MS;
    store.close("leaves", 1_000);
    store.close("back", 1_000);
    store.open("back", false, ten_minutes / 2); // reconnected in time: its history stays
    store.open("other", false, ten_minutes + 2_000);
    assert_eq!(store.len(), 3, "leaves went; stays, back and other are kept");
    assert_eq!(store.window("leaves", 0), None);
}
