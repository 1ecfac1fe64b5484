//! The order resources are served in: by type and name, each name's entries in file
//! order (the first entry a proxy matches wins). A reload that changes a few entries
//! puts those few in their places among the entries it kept, in the order the last
//! reload worked out, instead of sorting every entry again: at 100,000 resources a full
//! sort chases two pointers per comparison for about 45 ms on this project's machines.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasherDefault, Hasher},
    sync::Arc,
};

use crate::CompiledResource;

/// At most this share of the entries new (1 in 8) is placed one by one; more is sorted.
const PLACE_AT_MOST_ONE_IN: usize = 8;

fn key(r: &CompiledResource) -> (filterplane_api::ResourceType, &str) {
    (r.resource_type, r.name.as_str())
}

/// What a load changed in a config's resources against the last one's, as the loader
/// saw it reading the files.
#[derive(Debug, Default)]
pub struct Changes {
    /// Entries that only moved in their file: the last load's resource and its copy.
    pub moved: Vec<Moved>,
    /// Resources new to this load (compiled, or copied to another place) and the last
    /// load's that are no longer in it.
    pub fresh: Vec<Arc<CompiledResource>>,
    pub stale: Vec<Arc<CompiledResource>>,
}

/// What changed, where a caller knows it: the resources new since the last config, and
/// the last config's that are gone.
pub type Told<'a> = (&'a [Arc<CompiledResource>], &'a [Arc<CompiledResource>]);

impl Changes {
    /// A file's entries were `old` and are `new` now: the ones only in `new` are fresh, the
    /// ones only in `old` stale.
    pub(crate) fn between<'a>(
        &mut self,
        old: Vec<Arc<CompiledResource>>,
        new: impl Iterator<Item = &'a Arc<CompiledResource>> + Clone,
    ) {
        let now: PtrSet = new.clone().map(Arc::as_ptr).collect();
        let was: PtrSet = old.iter().map(Arc::as_ptr).collect();
        self.fresh.extend(new.filter(|r| !was.contains(&Arc::as_ptr(r))).cloned());
        self.stale.extend(old.into_iter().filter(|r| !now.contains(&Arc::as_ptr(r))));
    }
}

/// A config's resources in serving order; when its new ones were placed among the last
/// config's rather than all sorted, where they went (their places in it, ascending) and
/// where the others were in the last config's order (ascending).
pub struct Ordered {
    pub resources: Vec<Arc<CompiledResource>>,
    pub placed: Option<(Vec<usize>, Vec<usize>)>,
}

/// `file_ordered` (every resource of a config, in file order) in serving order.
/// `previous` is the last config's resources in serving order: the entries of
/// `file_ordered` that are among them (the same allocation: unchanged files' entries, held
/// by the loader) keep their order, and the others are placed by binary search. Where a
/// new entry shares its name with a kept one, only file order can tell which comes first,
/// and everything is sorted. `known` is what changed (new, gone) when the caller knows
/// it: the rest is `previous` less the gone, found without a set of every resource.
pub fn serving_order(
    file_ordered: Vec<Arc<CompiledResource>>,
    previous: &[Arc<CompiledResource>],
    known: Option<Told<'_>>,
) -> Ordered {
    let all_sorted = |file_ordered| Ordered { resources: sorted(file_ordered), placed: None };
    if previous.is_empty() {
        return all_sorted(file_ordered);
    }
    let (added, kept): (Vec<_>, Vec<(usize, _)>) = match known {
        Some((fresh, stale)) if fresh.len() * PLACE_AT_MOST_ONE_IN <= file_ordered.len() => {
            let gone: PtrSet = stale.iter().map(Arc::as_ptr).collect();
            let kept: Vec<_> = previous.iter().enumerate().filter(|(_, r)| !gone.contains(&Arc::as_ptr(r))).collect();
            // (What the caller knew must add up; else the sets say.)
            if kept.len() + fresh.len() != file_ordered.len() {
                return serving_order(file_ordered, previous, None);
            }
            (fresh.to_vec(), kept)
        }
        Some(_) => return all_sorted(file_ordered),
        None => {
            let now: PtrSet = file_ordered.iter().map(Arc::as_ptr).collect();
            let before: PtrSet = previous.iter().map(Arc::as_ptr).collect();
            let added: Vec<_> = file_ordered.iter().filter(|r| !before.contains(&Arc::as_ptr(r))).cloned().collect();
            if added.len() * PLACE_AT_MOST_ONE_IN > file_ordered.len() {
                return all_sorted(file_ordered);
            }
            (added, previous.iter().enumerate().filter(|(_, r)| now.contains(&Arc::as_ptr(r))).collect())
        }
    };
    let added = sorted(added);
    // Where each new entry goes among the kept ones: before the first greater key.
    let mut at = Vec::with_capacity(added.len());
    for r in &added {
        match kept.binary_search_by(|(_, k)| key(k).cmp(&key(r))) {
            Ok(_) => return all_sorted(file_ordered),
            Err(i) => at.push(i),
        }
    }
    let mut out = Vec::with_capacity(file_ordered.len());
    let mut placed = Vec::with_capacity(added.len());
    let mut was = Vec::with_capacity(kept.len());
    let mut next = added.into_iter().zip(at).peekable();
    for (i, (p, k)) in kept.into_iter().enumerate() {
        while let Some((r, _)) = next.next_if(|(_, j)| *j == i) {
            placed.push(out.len());
            out.push(r);
        }
        was.push(p);
        out.push(k.clone());
    }
    for (r, _) in next {
        placed.push(out.len());
        out.push(r);
    }
    // (Tests build with debug assertions: there, what the caller knew is checked against
    // the sets at every load.)
    #[cfg(debug_assertions)]
    if known.is_some() {
        let by_sets = serving_order(file_ordered, previous, None).resources;
        debug_assert!(
            by_sets.len() == out.len() && by_sets.iter().zip(&out).all(|(a, b)| Arc::ptr_eq(a, b)),
            "the changes told were wrong"
        );
    }
    Ordered { resources: out, placed: Some((placed, was)) }
}

/// An entry that moved in its file (the lines before it changed): its resource as the
/// last load placed it, and its copy that says where it is now.
pub type Moved = (Arc<CompiledResource>, Arc<CompiledResource>);

/// `previous` (a config's resources in serving order) with each entry that only moved in
/// its file replaced by its copy, in its place: it is served where it was, and
/// `serving_order` then finds it kept instead of placing it again (an edit that adds a
/// line near the top of a large file moves every entry after it).
pub fn moved(previous: &mut [Arc<CompiledResource>], moved: &[Moved]) {
    if moved.is_empty() {
        return;
    }
    let copies: HashMap<*const CompiledResource, &Arc<CompiledResource>, BuildHasherDefault<PtrHasher>> =
        moved.iter().map(|(was, now)| (Arc::as_ptr(was), now)).collect();
    for r in previous.iter_mut() {
        if let Some(now) = copies.get(&Arc::as_ptr(r)) {
            *r = Arc::clone(now);
        }
    }
}

/// A stable sort by type and name.
fn sorted(mut resources: Vec<Arc<CompiledResource>>) -> Vec<Arc<CompiledResource>> {
    resources.sort_by(|a, b| key(a).cmp(&key(b)));
    resources
}

type PtrSet = HashSet<*const CompiledResource, BuildHasherDefault<PtrHasher>>;

/// Hashes an address (a multiply: addresses are already spread, and SipHash costs more
/// than the rest of the lookup).
#[derive(Default)]
struct PtrHasher(u64);

impl Hasher for PtrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, file: &str) -> Arc<CompiledResource> {
        let parsed = crate::load::parse_file(
            std::path::Path::new(file),
            &format!("version: 1\nclusters:\n  - name: {name}\n    connect_timeout: 1s\n"),
        )
        .expect("parses");
        let spec = &parsed.doc.envoy_section(filterplane_api::ResourceType::Cluster)[0];
        Arc::new(
            crate::compile::envoy_entry(&parsed, "clusters", 0, filterplane_api::ResourceType::Cluster, spec)
                .expect("compiles"),
        )
    }

    fn names(rs: &[Arc<CompiledResource>]) -> Vec<(&str, &str)> {
        rs.iter().map(|r| (r.name.as_str(), r.origin.file.to_str().unwrap_or_default())).collect()
    }

    #[test]
    fn new_entries_take_their_places_among_the_kept_ones_and_ties_follow_file_order() {
        let (a, c, e) = (r("a", "1.yaml"), r("c", "1.yaml"), r("e", "2.yaml"));
        let before = sorted(vec![e.clone(), a.clone(), c.clone()]);
        // c changed (a new allocation), b and f are new, e stays: placed, not sorted.
        let (b, c2, f) = (r("b", "1.yaml"), r("c", "1.yaml"), r("f", "2.yaml"));
        let mut files = vec![a.clone(), b, c2.clone()];
        files.extend([e.clone(), f]);
        let got = serving_order(files.clone(), &before, None).resources;
        assert_eq!(got, sorted(files.clone()));
        assert!(Arc::ptr_eq(&got[2], &c2), "the changed entry is the new one");
        // A new entry named like a kept one, in an earlier file: file order decides.
        let e0 = r("e", "0.yaml");
        let mut files = vec![e0.clone()];
        files.extend(got.iter().cloned());
        let again = serving_order(files, &got, None).resources;
        assert_eq!(names(&again)[3..5], [("e", "0.yaml"), ("e", "2.yaml")]);
        // Entries that only moved in their file take their old ones' places and are kept:
        // the copies are served where the old ones were.
        let mut previous = again.clone();
        let copies: Vec<Moved> = previous.iter().map(|r| (r.clone(), Arc::new(CompiledResource::clone(r)))).collect();
        moved(&mut previous, &copies[1..]);
        assert!(Arc::ptr_eq(&previous[0], &again[0]) && Arc::ptr_eq(&previous[1], &copies[1].1));
        let files: Vec<_> =
            std::iter::once(again[0].clone()).chain(copies[1..].iter().map(|(_, c)| c.clone())).collect();
        let served = serving_order(files, &previous, None).resources;
        assert!(served.iter().zip(&previous).all(|(a, b)| Arc::ptr_eq(a, b)), "kept in place, not sorted");
        // Nothing before: sorted.
        assert_eq!(
            names(&serving_order(vec![e, c, a], &[], None).resources),
            [("a", "1.yaml"), ("c", "1.yaml"), ("e", "2.yaml")]
        );
    }

    #[test]
    fn told_what_changed_the_order_needs_no_set_of_every_resource_and_says_where_new_ones_went() {
        let kept: Vec<_> = (0..20).map(|i| r(&format!("k{i:02}"), "1.yaml")).collect();
        let before = sorted(kept.clone());
        // k05 changed (a new allocation), k10x is new.
        let (k05, k10x) = (r("k05", "1.yaml"), r("k10x", "1.yaml"));
        let mut files = kept.clone();
        files[5] = k05.clone();
        files.push(k10x.clone());
        let by_sets = serving_order(files.clone(), &before, None);
        let (fresh, stale) = ([k05.clone(), k10x.clone()], [kept[5].clone()]);
        let told = serving_order(files.clone(), &before, Some((&fresh, &stale)));
        assert!(told.resources.iter().zip(&by_sets.resources).all(|(a, b)| Arc::ptr_eq(a, b)));
        let kept_were: Vec<usize> = (0..20).filter(|&i| i != 5).collect();
        assert_eq!(told.placed, Some((vec![5, 11], kept_were.clone())));
        assert_eq!(by_sets.placed, Some((vec![5, 11], kept_were)));
        assert!(Arc::ptr_eq(&told.resources[11], &k10x));
        // Told wrong (k05's old one not said gone): the counts disagree and the sets decide.
        let wrong = serving_order(files, &before, Some((&fresh, &[])));
        assert!(wrong.resources.iter().zip(&told.resources).all(|(a, b)| Arc::ptr_eq(a, b)));
    }
}
