//! What clients can make the server log (issue 20, item 14): client text cut, per-event
//! lines rate-limited with a count of what was left out. Its own test binary: it installs
//! the process's log subscriber.

#[allow(dead_code)]
#[path = "conformance/harness.rs"]
mod harness;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use harness::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_streams_with_long_node_ids_logs_a_bounded_amount() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt().with_env_filter("info").with_ansi(false).with_writer(move || writer.clone()).init();
    let plane = Plane::start(&[("a", "1")]).await;
    let long = "n".repeat(1000);
    let started = std::time::Instant::now();
    for k in 0..600 {
        let mut c = DeltaClient::connect(&plane, &format!("{long}-{k}")).await;
        c.send(ECDS, Delta { subscribe: &["a"], ..Default::default() }).await;
        c.recv().await;
        c.send(ECDS, Delta { nonce: "bogus", error: Some(&"e".repeat(4000)), ..Default::default() }).await;
    }
    let seconds = started.elapsed().as_secs() + 1;
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("proxy connected") || l.contains("NACK")).collect();
    // 20 lines a second per kind at most (connect, disconnect share one budget).
    assert!(lines.len() as u64 <= 2 * 20 * (seconds + 1), "{} lines in {seconds} s", lines.len());
    assert!(text.contains("left_out="), "the lines let through say how many were left out");
    let longest = text.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1500, "client text is cut in logs: a line of {longest} bytes");
    // A cut id is marked with its whole length (1,002 to 1,004 bytes: "-k" appended).
    assert!((1002..=1004).any(|n| text.contains(&format!("…(cut, {n} bytes)"))), "a cut node id names its length");
}
