//! Replica reports as etcd holds them: a report's items (a replica's proxies) packed by
//! size into parts under keys of their own (`NAME/p0`, `NAME/p1`, …), and put back
//! together when read. Generic over what a report and its items are.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// A report's head, as the server defines it: whose, when, how many parts.
pub trait Report: DeserializeOwned {
    type Item: DeserializeOwned + Clone;
    fn replica(&self) -> &str;
    fn at_ms(&self) -> u64;
    fn parts(&self) -> usize;
    fn items(&self) -> &[Self::Item];
    fn set_items(&mut self, items: Vec<Self::Item>);
}

/// Proxies of one report, in a key of their own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Part<T> {
    pub at_ms: u64,
    pub proxies: Vec<T>,
}

/// Bytes of one part, at most: parts are filled by size, not by count (2,000 proxies
/// with long NACK messages once made a part over etcd's limit, and that failed write
/// stopped rollouts fleet-wide).
pub const PART_BYTES: usize = 512 << 10;

/// The parts of a report: each proxy encoded once, packed into JSON `Part`s of at most
/// `PART_BYTES`. A proxy that alone is larger (node metadata of hundreds of KiB) is left
/// out and counted in the second value.
pub fn pack_parts<T: Serialize>(proxies: &[T], at_ms: u64) -> (Vec<Vec<u8>>, usize) {
    let head = format!("{{\"at_ms\":{at_ms},\"proxies\":[");
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut current = head.clone().into_bytes();
    let mut left_out = 0;
    for p in proxies {
        let Ok(json) = serde_json::to_vec(p) else {
            left_out += 1;
            continue;
        };
        if head.len() + json.len() + 2 > PART_BYTES {
            left_out += 1;
            continue;
        }
        if current.len() + json.len() + 3 > PART_BYTES {
            current.extend_from_slice(b"]}");
            parts.push(std::mem::replace(&mut current, head.clone().into_bytes()));
        }
        if current.len() > head.len() {
            current.push(b',');
        }
        current.extend_from_slice(&json);
    }
    if current.len() > head.len() {
        current.extend_from_slice(b"]}");
        parts.push(current);
    }
    (parts, left_out)
}

/// The other replicas' reports from a listing of `prefix`, each with its parts put back
/// together. A report whose parts are not all of its own moment (written meanwhile)
/// keeps the proxies that replica reported last time.
pub fn read_reports<R: Report>(listing: Vec<(String, Vec<u8>)>, prefix: &str, me: &str, previous: &[R]) -> Vec<R> {
    let mut reports: Vec<R> = Vec::new();
    let mut parts: BTreeMap<(String, usize), Part<R::Item>> = BTreeMap::new();
    for (key, value) in listing {
        let Some(rest) = key.strip_prefix(prefix) else { continue };
        match rest.rsplit_once("/p") {
            Some((name, i)) => {
                let (Ok(i), Ok(part)) = (i.parse::<usize>(), serde_json::from_slice::<Part<R::Item>>(&value)) else {
                    tracing::warn!(key = ?key, "a replica report part does not read; left out");
                    continue;
                };
                parts.insert((name.to_owned(), i), part);
            }
            None if rest == me => {}
            None => match serde_json::from_slice::<R>(&value) {
                Ok(r) => reports.push(r),
                Err(e) => tracing::warn!(key = ?key, error = %e, "a replica report does not read; left out"),
            },
        }
    }
    for r in &mut reports {
        let mine: Option<Vec<R::Item>> = (0..r.parts())
            .map(|i| parts.remove(&(r.replica().to_owned(), i)).filter(|p| p.at_ms == r.at_ms()).map(|p| p.proxies))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.into_iter().flatten().collect());
        let items = match mine {
            Some(p) => p,
            None => {
                previous.iter().find(|o| o.replica() == r.replica()).map(|o| o.items().to_vec()).unwrap_or_default()
            }
        };
        r.set_items(items);
    }
    reports
}
