//! The resources of one type in a snapshot, by name: a sorted list cut into shared
//! chunks. A snapshot of 100,000 resources was a `BTreeMap` keyed by a copy of every
//! name, built anew per reload (tens of milliseconds, and 100,000 allocations). A chunked
//! list is built from the serving order without a copy of any name, and a snapshot that
//! differs from the last one in a few resources shares every chunk it did not touch:
//! patching it copies those chunks only, and comparing the two skips the shared ones.

use std::{cmp::Ordering, sync::Arc};

use filterplane_api::{content_version, ResourceVersion};
use sha2::{Digest, Sha256};

use crate::snapshot::ServedResource;

/// The hash of a set of resources (names and versions) that a change to a few of them
/// updates without reading the rest: the sum, modulo 2^256, of each resource's SHA-256 of
/// its name and version, with the count. A set's version is the hash of that
/// (`version`). Summing gives up what a hash over the sorted list has: sets whose entry
/// hashes sum alike are found with about 2^128 work (a generalized birthday search),
/// not 2^256. Names and versions come from the operator's own config, and a version
/// only decides whether a proxy is sent the set again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetHash {
    sum: [u64; 4],
    count: u64,
}

impl SetHash {
    pub fn of<'a>(resources: impl IntoIterator<Item = &'a Arc<ServedResource>>) -> Self {
        let mut h = Self::default();
        for r in resources {
            h.add(r);
        }
        h
    }

    pub fn add(&mut self, r: &ServedResource) {
        self.apply(r.entry_hash(), u64::overflowing_add);
        self.count = self.count.wrapping_add(1);
    }

    pub fn remove(&mut self, r: &ServedResource) {
        self.apply(r.entry_hash(), u64::overflowing_sub);
        self.count = self.count.wrapping_sub(1);
    }

    /// Adds or subtracts a 256-bit entry hash, limb by limb with the carry (or borrow).
    fn apply(&mut self, e: &[u64; 4], op: fn(u64, u64) -> (u64, bool)) {
        let mut carry = false;
        for (s, x) in self.sum.iter_mut().zip(e) {
            let (v, c1) = op(*s, *x);
            let (v, c2) = op(v, carry as u64);
            *s = v;
            carry = c1 || c2;
        }
    }

    /// The bytes the version and a snapshot's config version are hashed from.
    pub fn to_bytes(self) -> [u8; 40] {
        let mut out = [0u8; 40];
        for (chunk, v) in out.chunks_exact_mut(8).zip(self.sum.iter().chain([&self.count])) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// The set's version: what a state-of-the-world response's `version_info` says.
    pub fn version(self) -> ResourceVersion {
        content_version([&self.to_bytes()[..]])
    }
}

/// A resource's share of a `SetHash`: SHA-256 of its name and version, each prefixed by
/// its length.
pub(crate) fn entry_hash(name: &str, version: &ResourceVersion) -> [u64; 4] {
    let mut h = Sha256::new();
    for p in [name.as_bytes(), version.as_str().as_bytes()] {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    let mut out = [0u64; 4];
    for (o, chunk) in out.iter_mut().zip(digest.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *o = u64::from_le_bytes(b);
    }
    out
}

/// Resources per chunk when a map is built whole; a patched chunk splits beyond twice
/// this and disappears when empty. Small enough that a patch copies little, large enough
/// that the list of chunks stays short (400 chunks at 100,000 resources).
pub const CHUNK: usize = 256;

type Chunk = Arc<[Arc<ServedResource>]>;

/// Sorted by name, no two of a name.
#[derive(Debug, Clone, Default)]
pub struct ResourceMap {
    chunks: Vec<Chunk>,
    len: usize,
    hash: SetHash,
}

/// A change to a map: the resource a name now has, or `None` for a name that goes.
pub type Edit = (String, Option<Arc<ServedResource>>);

impl ResourceMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// The map of `sorted`, whose names must ascend strictly (checked in debug builds).
    pub fn from_sorted(sorted: Vec<Arc<ServedResource>>) -> Self {
        debug_assert!(sorted.windows(2).all(|w| w[0].name < w[1].name), "names must ascend");
        let len = sorted.len();
        let hash = SetHash::of(&sorted);
        let chunks = sorted.chunks(CHUNK).map(Chunk::from).collect();
        Self { chunks, len, hash }
    }

    /// The hash of every resource in the map (what a wildcard subscription selects).
    pub fn hash(&self) -> SetHash {
        self.hash
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chunk that holds `name` if any does: the first whose last name is not below it.
    fn chunk_of(&self, name: &str) -> usize {
        self.chunks.partition_point(|c| c.last().is_some_and(|r| r.name.as_str() < name))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ServedResource>> {
        let chunk = self.chunks.get(self.chunk_of(name))?;
        let at = chunk.binary_search_by(|r| r.name.as_str().cmp(name)).ok()?;
        chunk.get(at)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The resources of `names` (sorted, no repeats) that the map has, in name order. A
    /// long list (a mesh-sized Envoy names every assignment) is walked beside the map
    /// rather than looked up name by name: a lookup reads a dozen resources' names from
    /// scattered memory, the walk each once.
    pub fn select<'a>(&'a self, names: &[String]) -> Vec<&'a Arc<ServedResource>> {
        if names.len() * 16 < self.len {
            return names.iter().filter_map(|n| self.get(n)).collect();
        }
        let mut out = Vec::with_capacity(names.len().min(self.len));
        let mut wanted = names.iter().peekable();
        for r in self.values() {
            while wanted.next_if(|n| n.as_str() < r.name.as_str()).is_some() {}
            match wanted.peek() {
                None => break,
                Some(n) if **n == r.name => {
                    out.push(r);
                    wanted.next();
                }
                Some(_) => {}
            }
        }
        out
    }

    /// Every resource, in name order.
    pub fn values(&self) -> impl Iterator<Item = &Arc<ServedResource>> + Clone {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// This map with `edits` applied (sorted by name, one per name): a name that has a
    /// resource gets it (added or replaced), a name with `None` goes. Copies only the
    /// chunks the edits fall in; the others are shared with this map.
    pub fn patched(&self, edits: &[Edit]) -> Self {
        debug_assert!(edits.windows(2).all(|w| w[0].0 < w[1].0), "edits must be sorted, one per name");
        if self.chunks.is_empty() {
            return Self::from_sorted(edits.iter().filter_map(|(_, r)| r.clone()).collect());
        }
        let mut chunks: Vec<Chunk> = Vec::with_capacity(self.chunks.len() + 1);
        let mut len = 0;
        let mut hash = self.hash;
        let mut rest = edits;
        let last = self.chunks.len() - 1;
        for (i, chunk) in self.chunks.iter().enumerate() {
            // The edits that fall in this chunk: up to its last name (all that are left,
            // for the last chunk).
            let take = match (i == last, chunk.last()) {
                (false, Some(end)) => rest.partition_point(|(n, _)| n.as_str() <= end.name.as_str()),
                _ => rest.len(),
            };
            let (mine, after) = rest.split_at(take);
            rest = after;
            if mine.is_empty() {
                len += chunk.len();
                chunks.push(chunk.clone());
                continue;
            }
            let merged = merge(chunk, mine, &mut hash);
            len += merged.len();
            if merged.len() > 2 * CHUNK {
                chunks.extend(merged.chunks(CHUNK).map(Chunk::from));
            } else if !merged.is_empty() {
                chunks.push(merged.into());
            }
        }
        Self { chunks, len, hash }
    }

    /// The chunks this map shares with `other` by address, as a count.
    #[cfg(test)]
    pub fn shared_chunks(&self, other: &ResourceMap) -> usize {
        self.chunks.iter().filter(|c| other.chunks.iter().any(|o| Arc::ptr_eq(c, o))).count()
    }

    /// Walks this map and `before` together in name order, calling `each` with every name
    /// either has and what each has of it, except where both share a chunk at the same
    /// point of the walk: a chunk both maps hold holds the same resources.
    pub fn diff<'a>(
        &'a self,
        before: &'a ResourceMap,
        mut each: impl FnMut(Option<&'a Arc<ServedResource>>, Option<&'a Arc<ServedResource>>),
    ) {
        let (mut a, mut b) = (Cursor::new(before), Cursor::new(self));
        loop {
            if let (Some(x), Some(y)) = (a.whole_chunk(), b.whole_chunk()) {
                if Arc::ptr_eq(x, y) {
                    a.skip_chunk();
                    b.skip_chunk();
                    continue;
                }
            }
            match (a.peek(), b.peek()) {
                (None, None) => return,
                (Some(old), None) => {
                    each(Some(old), None);
                    a.advance();
                }
                (None, Some(new)) => {
                    each(None, Some(new));
                    b.advance();
                }
                (Some(old), Some(new)) => match old.name.cmp(&new.name) {
                    Ordering::Less => {
                        each(Some(old), None);
                        a.advance();
                    }
                    Ordering::Greater => {
                        each(None, Some(new));
                        b.advance();
                    }
                    Ordering::Equal => {
                        each(Some(old), Some(new));
                        a.advance();
                        b.advance();
                    }
                },
            }
        }
    }
}

/// `chunk` with `edits` (sorted, all within its range or after it) applied, and `hash`
/// updated for what left and came.
fn merge(chunk: &[Arc<ServedResource>], edits: &[Edit], hash: &mut SetHash) -> Vec<Arc<ServedResource>> {
    let mut out = Vec::with_capacity(chunk.len() + edits.len());
    let mut old = chunk.iter().peekable();
    for (name, r) in edits {
        while let Some(o) = old.next_if(|o| o.name.as_str() < name.as_str()) {
            out.push(o.clone());
        }
        if let Some(o) = old.next_if(|o| o.name == *name) {
            hash.remove(o);
        }
        if let Some(r) = r {
            hash.add(r);
            out.push(r.clone());
        }
    }
    out.extend(old.cloned());
    out
}

/// A place in a map's walk.
struct Cursor<'a> {
    map: &'a ResourceMap,
    chunk: usize,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(map: &'a ResourceMap) -> Self {
        Self { map, chunk: 0, at: 0 }
    }

    /// The chunk the cursor is at the start of, if it is at one.
    fn whole_chunk(&self) -> Option<&'a Chunk> {
        (self.at == 0).then(|| self.map.chunks.get(self.chunk)).flatten()
    }

    fn skip_chunk(&mut self) {
        self.chunk += 1;
        self.at = 0;
    }

    fn peek(&self) -> Option<&'a Arc<ServedResource>> {
        self.map.chunks.get(self.chunk)?.get(self.at)
    }

    fn advance(&mut self) {
        self.at += 1;
        if self.map.chunks.get(self.chunk).is_some_and(|c| self.at >= c.len()) {
            self.skip_chunk();
        }
    }
}

#[cfg(test)]
#[path = "../../config/tests/support/rng.rs"]
mod rng;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use filterplane_api::Any;

    use super::*;

    use super::rng;

    fn resource(name: &str, v: u8) -> Arc<ServedResource> {
        let any = Any { type_url: String::new(), value: vec![v] };
        Arc::new(ServedResource::new(name.into(), content_version([&[v][..]]), any, false))
    }

    fn names(m: &ResourceMap) -> Vec<(String, u8)> {
        m.values().map(|r| (r.name.clone(), r.any.value[0])).collect()
    }

    fn name(i: usize) -> String {
        format!("r{i:05}")
    }

    /// A patched map holds what a map built whole from the same resources holds, finds
    /// every name by lookup, and shares every chunk no edit fell in; the walk of two maps
    /// reports exactly the names whose resources differ. 300 random maps and edits.
    #[test]
    fn a_patched_map_is_the_map_of_its_resources_and_shares_what_it_did_not_touch() {
        let mut rng = rng::Rng(0x5eed_cafe);
        for round in 0..300 {
            let size = rng.below(2000);
            let before: Vec<_> = (0..size).map(|i| resource(&name(2 * i), 9)).collect();
            let map = ResourceMap::from_sorted(before.clone());
            let mut wanted: BTreeMap<usize, Option<u8>> = BTreeMap::new();
            for _ in 0..rng.below(if round % 10 == 0 { 700 } else { 60 }) {
                let v = rng.below(5);
                wanted.insert(rng.below(4400), (v < 4).then_some(v as u8));
            }
            let edits: Vec<Edit> = wanted.iter().map(|(i, v)| (name(*i), v.map(|v| resource(&name(*i), v)))).collect();
            let patched = map.patched(&edits);
            let mut expect: BTreeMap<String, Arc<ServedResource>> =
                before.iter().map(|r| (r.name.clone(), r.clone())).collect();
            for (n, r) in &edits {
                match r {
                    Some(r) => expect.insert(n.clone(), r.clone()),
                    None => expect.remove(n),
                };
            }
            let want: Vec<_> = expect.values().map(|r| (r.name.clone(), r.any.value[0])).collect();
            assert_eq!(names(&patched), want, "round {round}");
            assert_eq!(patched.len(), expect.len());
            assert_eq!(patched.hash(), SetHash::of(expect.values()), "round {round}");
            for i in 0..4400 {
                let got = patched.get(&name(i)).map(|r| r.any.value[0]);
                assert_eq!(got, expect.get(&name(i)).map(|r| r.any.value[0]), "round {round}: {}", name(i));
            }
            assert!(patched.chunks.iter().all(|c| !c.is_empty() && c.len() <= 2 * CHUNK));
            // Selecting by a list of names, short (looked up) or long (walked).
            for every in [1 + rng.below(3), 50 + rng.below(200)] {
                let wanted: Vec<String> = (0..4400).step_by(every).map(name).collect();
                let got: Vec<_> = patched.select(&wanted).into_iter().map(|r| r.name.clone()).collect();
                let want: Vec<_> = wanted.iter().filter(|n| expect.contains_key(*n)).cloned().collect();
                assert_eq!(got, want, "round {round}: every {every}th name");
            }
            // Chunks no edit fell in are shared (the last one takes every later edit).
            let untouched = map
                .chunks
                .iter()
                .enumerate()
                .filter(|(k, c)| {
                    let (first, last) = (&c[0].name, &c[c.len() - 1].name);
                    let later = *k + 1 == map.chunks.len();
                    !edits.iter().any(|(n, _)| n >= first && (later || n <= last))
                })
                .count();
            assert!(patched.shared_chunks(&map) >= untouched, "round {round}");
            let mut differ = Vec::new();
            patched.diff(&map, |old, new| {
                if !matches!((old, new), (Some(o), Some(n)) if Arc::ptr_eq(o, n)) {
                    differ.push(old.or(new).map(|r| r.name.clone()).unwrap_or_default());
                }
            });
            let want: Vec<String> =
                edits.iter().filter(|(n, r)| r.is_some() || map.contains_key(n)).map(|(n, _)| n.clone()).collect();
            assert_eq!(differ, want, "round {round}");
        }
    }

    #[test]
    fn a_map_splits_a_chunk_that_grows_past_twice_its_size_and_drops_an_empty_one() {
        let map = ResourceMap::from_sorted((0..10).map(|i| resource(&name(i * 1000), 0)).collect());
        let grow: Vec<Edit> = (1..=600).map(|i| (name(i), Some(resource(&name(i), 1)))).collect();
        let grown = map.patched(&grow);
        assert_eq!(grown.len(), 610);
        assert!(grown.chunks.len() >= 3 && grown.chunks.iter().all(|c| c.len() <= 2 * CHUNK));
        let all: Vec<Edit> = grown.values().map(|r| (r.name.clone(), None)).collect();
        let empty = grown.patched(&all);
        assert!(empty.is_empty() && empty.chunks.is_empty() && empty.get(&name(0)).is_none());
        assert_eq!(names(&empty.patched(&grow[..2])), [(name(1), 1), (name(2), 1)]);
    }
}
