//! Guesses of the admin token slowed down per client address: after `FREE_FAILURES`
//! wrong tokens (a bearer header, a session cookie or the sign-in form), each next
//! attempt from that address waits twice as long as the last, up to `MAX_DELAY`; one
//! right attempt clears it. Other addresses, the operator's among them, are not touched.
//! (Before: about 5,000 guesses a second.)

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Wrong attempts from one address before any wait.
pub const FREE_FAILURES: u32 = 5;
/// The first wait; each next failure doubles it.
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// The longest wait.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// Addresses remembered; past it, those not waiting are forgotten first.
const MAX_ADDRESSES: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    until: Instant,
}

#[derive(Debug, Default)]
pub struct SignInBackoff {
    by_address: Mutex<HashMap<IpAddr, Failures>>,
}

impl SignInBackoff {
    /// `Err(wait)` while `ip` must wait before its next attempt.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let map = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&ip) {
            Some(f) if f.until > now => Err(f.until - now),
            _ => Ok(()),
        }
    }

    /// A wrong token from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut map = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ADDRESSES && !map.contains_key(&ip) {
            map.retain(|_, f| f.until > now);
            if map.len() >= MAX_ADDRESSES {
                map.clear();
            }
        }
        let f = map.entry(ip).or_insert(Failures { count: 0, until: now });
        f.count = f.count.saturating_add(1);
        if f.count > FREE_FAILURES {
            let doublings = (f.count - FREE_FAILURES - 1).min(16);
            f.until = now + (FIRST_DELAY * 2u32.pow(doublings)).min(MAX_DELAY);
        }
    }

    /// The right token from `ip`: its count starts again.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut map = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if !map.is_empty() {
            map.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses_wait_longer_each_time_from_their_address_only() {
        let b = SignInBackoff::default();
        let (guesser, operator): (IpAddr, IpAddr) = ([127, 0, 0, 9].into(), [127, 0, 0, 1].into());
        let t = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert!(b.check(guesser, t).is_ok());
            b.failed(guesser, t);
        }
        assert!(b.check(guesser, t).is_ok(), "the first few are free");
        b.failed(guesser, t);
        assert_eq!(b.check(guesser, t), Err(Duration::from_secs(1)));
        b.failed(guesser, t);
        assert_eq!(b.check(guesser, t), Err(Duration::from_secs(2)));
        for _ in 0..20 {
            b.failed(guesser, t);
        }
        assert_eq!(b.check(guesser, t), Err(MAX_DELAY));
        assert!(b.check(operator, t).is_ok(), "another address is not locked out");
        assert!(b.check(guesser, t + MAX_DELAY).is_ok());
        b.succeeded(guesser);
        b.failed(guesser, t);
        assert!(b.check(guesser, t).is_ok(), "a right token starts the count again");
    }
}
