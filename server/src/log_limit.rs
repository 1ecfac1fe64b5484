//! Log lines driven by clients, kept bounded: what a client sent is escaped and cut
//! before it is logged, and per-event lines (a proxy connected, a NACK, a refusal, a
//! failed sign-in, a failed accept) are rate-limited, with a count of what was left out.
//! Without it, 50,000 streams logged 31 MB in about a second.

use std::{
    fmt,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Characters of a client's text that a log line carries.
pub const MAX_LOGGED_CHARS: usize = 256;

/// A client's text as a log line shows it: escaped like `{:?}` and cut to
/// `MAX_LOGGED_CHARS`, the cut marked with the full length.
pub struct Cut<'a>(pub &'a str);

impl fmt::Display for Cut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        match s.char_indices().nth(MAX_LOGGED_CHARS) {
            None => write!(f, "{s:?}"),
            Some((end, _)) => write!(f, "{:?}…(cut, {} bytes)", &s[..end], s.len()),
        }
    }
}

impl fmt::Debug for Cut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// At most `per_window` lines of one kind per `window`; past that, lines are counted
/// and the next line let through says how many were left out.
#[derive(Debug)]
pub struct LogBudget {
    window: Duration,
    per_window: u32,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    pub const fn new(window: Duration, per_window: u32) -> Self {
        Self { window, per_window, state: Mutex::new(Window { start: None, used: 0, suppressed: 0 }) }
    }

    /// `Some(n)` when this line may be logged (`n` lines of its kind were left out since
    /// the last one logged); `None` when it is left out.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if w.start.is_none_or(|s| now.duration_since(s) >= self.window) {
            w.start = Some(now);
            w.used = 0;
        }
        if w.used >= self.per_window {
            w.suppressed += 1;
            return None;
        }
        w.used += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

/// Per-event lines, by kind: each kind at most this many a second.
pub static CONNECTS: LogBudget = LogBudget::new(Duration::from_secs(1), 20);
pub static NACKS: LogBudget = LogBudget::new(Duration::from_secs(1), 20);
pub static REFUSALS: LogBudget = LogBudget::new(Duration::from_secs(1), 10);
pub static SIGN_IN_FAILURES: LogBudget = LogBudget::new(Duration::from_secs(1), 10);
/// A replica's report not written whole: one line a minute.
pub static REPORT_FAILURES: LogBudget = LogBudget::new(Duration::from_secs(60), 1);
/// Failed accepts (out of file descriptors, most likely): one line every ten seconds.
pub static ACCEPT_FAILURES: LogBudget = LogBudget::new(Duration::from_secs(10), 1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_is_escaped_and_cut() {
        assert_eq!(Cut("a\nb").to_string(), "\"a\\nb\"");
        let long = "é".repeat(1000);
        let shown = Cut(&long).to_string();
        assert!(shown.ends_with("…(cut, 2000 bytes)"), "{shown}");
        assert_eq!(shown.matches('é').count(), MAX_LOGGED_CHARS);
    }

    #[test]
    fn lines_past_the_budget_are_counted_and_reported_by_the_next() {
        let b = LogBudget::new(Duration::from_secs(1), 2);
        let t = Instant::now();
        assert_eq!(b.admit_at(t), Some(0));
        assert_eq!(b.admit_at(t), Some(0));
        assert_eq!(b.admit_at(t), None);
        assert_eq!(b.admit_at(t), None);
        assert_eq!(b.admit_at(t + Duration::from_secs(1)), Some(2));
    }
}
