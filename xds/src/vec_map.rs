//! A map kept as a sorted `Vec`: what every xDS stream holds per type and per resource.
//! Streams hold a handful of types and usually a few resources each, and there are tens
//! of thousands of streams; a `BTreeMap` allocates a node for eleven entries even for
//! one, which made these maps a third of the server's memory per idle stream.

use std::borrow::Borrow;

use serde::ser::{Serialize, SerializeMap, Serializer};

/// Entries up to which a map grows one slot at a time.
const EXACT_UP_TO: usize = 8;

/// Sorted by key, no duplicate keys. Lookups are binary searches; inserting is O(n),
/// which for the sizes held per stream is cheaper than any tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VecMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K: Ord, V> VecMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for one more entry: exactly one while the map is small (most hold one to a
    /// few entries, and `Vec`'s first growth to four left three empty slots in every
    /// stream: 1.3 KiB of a one-type stream's 3.1), doubling beyond.
    fn reserve_one(&mut self) {
        if self.0.len() == self.0.capacity() {
            if self.0.len() < EXACT_UP_TO {
                self.0.reserve_exact(1);
            } else {
                self.0.reserve(1);
            }
        }
    }

    fn find<Q: Ord + ?Sized>(&self, key: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        self.0.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    pub fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| &mut self.0[i].1)
    }

    pub fn contains_key<Q: Ord + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.find(key).is_ok()
    }

    /// Inserts or replaces; returns the value it replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.reserve_one();
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    /// The value under `key`, inserting `make()` first when there is none.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        let i = match self.find(&key) {
            Ok(i) => i,
            Err(i) => {
                self.reserve_one();
                self.0.insert(i, (key, make()));
                i
            }
        };
        &mut self.0[i].1
    }

    pub fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.0.retain_mut(|(k, v)| keep(k, v));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.0.iter_mut().map(|(_, v)| v)
    }
}

/// Panics when `key` is absent, as `BTreeMap`'s indexing does.
impl<K: Ord + Borrow<Q>, Q: Ord + ?Sized, V> std::ops::Index<&Q> for VecMap<K, V> {
    type Output = V;
    fn index(&self, key: &Q) -> &V {
        self.get(key).expect("no entry for this key in VecMap")
    }
}

/// Later entries win over earlier ones with the same key, as with `BTreeMap`.
impl<K: Ord, V> FromIterator<(K, V)> for VecMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut v: Vec<(K, V)> = iter.into_iter().collect();
        // Stable: equal keys keep their order, so the last one can be kept.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(K, V)> = Vec::with_capacity(v.len());
        for (k, val) in v {
            match out.last_mut() {
                Some(last) if last.0 == k => last.1 = val,
                _ => out.push((k, val)),
            }
        }
        Self(out)
    }
}

/// A JSON object, as a `BTreeMap` would be.
impl<K: Serialize, V: Serialize> Serialize for VecMap<K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_sorted_map() {
        let mut m: VecMap<String, u32> =
            [("b".to_owned(), 1), ("a".to_owned(), 2), ("b".to_owned(), 3)].into_iter().collect();
        assert_eq!(m.iter().map(|(k, v)| (k.as_str(), *v)).collect::<Vec<_>>(), [("a", 2), ("b", 3)]);
        assert_eq!(m.insert("c".into(), 4), None);
        assert_eq!(m.insert("a".into(), 5), Some(2));
        assert_eq!(m.get("a"), Some(&5));
        *m.get_or_insert_with("0".into(), || 9) += 1;
        assert_eq!(m.keys().map(String::as_str).collect::<Vec<_>>(), ["0", "a", "b", "c"]);
        assert_eq!(m.get("0"), Some(&10));
        assert_eq!(m.remove("b"), Some(3));
        m.retain(|k, _| k != "c");
        assert_eq!(m.len(), 2);
        assert!(!m.contains_key("c"));
        assert_eq!(serde_json::to_string(&m).unwrap_or_default(), r#"{"0":10,"a":5}"#);
    }

    #[test]
    fn small_maps_hold_no_empty_slots_and_large_ones_grow_by_doubling() {
        let mut m: VecMap<u32, [u8; 200]> = VecMap::new();
        for k in 0..EXACT_UP_TO as u32 {
            m.get_or_insert_with(k, || [0; 200]);
            assert_eq!(m.0.capacity(), m.len(), "exact while small");
        }
        for k in EXACT_UP_TO as u32..1000 {
            m.insert(k, [1; 200]);
        }
        assert_eq!(m.len(), 1000);
        assert!(m.0.capacity() < 2 * 1000, "amortized beyond: {}", m.0.capacity());
    }
}
