//! Snapshots: the one seam between compiled config and the xDS protocol. A `Generation`
//! is one successfully compiled config (with the rollout plan it is served under);
//! proxies that match the same entries share one immutable `Snapshot`, built on first use
//! and kept for the life of the generation. Publishing generations is the server's.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, OnceLock, Weak},
};

use dashmap::DashMap;
use filterplane_api::{content_version, Any, ResourceType, ResourceVersion};
use filterplane_config::{assemble_listener, placement::Placement, CompiledConfig, CompiledResource, NodeFacts};

pub use crate::plan::{Plan, PlanEntry};
use crate::{
    resource_map::{Edit, SetHash},
    stream::{set_version, Subscription},
};

/// One resource as served: encoded once per generation and shared by every stream.
#[derive(Debug)]
pub struct ServedResource {
    pub name: String,
    pub version: ResourceVersion,
    pub any: Any,
    /// Envoy fetches this Wasm config's code itself: a NACK may only mean the module is
    /// not in Envoy's cache yet, and the response is sent again (see `StreamSettings`).
    pub envoy_fetches_code: bool,
    /// What it becomes in a state-of-the-world and in a delta response, encoded when
    /// the first stream sends it (`xds::wire`).
    sotw_entry: OnceLock<Box<[u8]>>,
    delta_entry: OnceLock<Box<[u8]>>,
    /// Its share of the hash of every set it is in (`SetHash`), worked out once.
    entry_hash: OnceLock<[u64; 4]>,
}

impl ServedResource {
    pub fn new(name: String, version: ResourceVersion, any: Any, envoy_fetches_code: bool) -> Self {
        Self {
            name,
            version,
            any,
            envoy_fetches_code,
            sotw_entry: OnceLock::new(),
            delta_entry: OnceLock::new(),
            entry_hash: OnceLock::new(),
        }
    }

    /// Its share of a `SetHash`.
    pub fn entry_hash(&self) -> &[u64; 4] {
        self.entry_hash.get_or_init(|| crate::resource_map::entry_hash(&self.name, &self.version))
    }

    /// Field 2 of a `DiscoveryResponse` carrying it.
    pub fn sotw_entry(&self) -> &[u8] {
        self.sotw_entry.get_or_init(|| crate::wire::sotw_entry(&self.any).into())
    }

    /// Field 2 of a `DeltaDiscoveryResponse` carrying it.
    pub fn delta_entry(&self) -> &[u8] {
        self.delta_entry.get_or_init(|| crate::wire::delta_entry(&self.name, self.version.as_str(), &self.any).into())
    }
}

pub use crate::resource_map::ResourceMap;

/// What one group of proxies is served. Immutable.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub config_version: ResourceVersion,
    types: BTreeMap<ResourceType, ResourceMap>,
    /// Extension configs whose filters are placed into this snapshot's listeners, sorted:
    /// a proxy may still drain a listener that refers to one of them after it leaves.
    placed: Vec<String>,
    /// Versions of what streams select, worked out once (`selection_version`).
    selections: BTreeMap<ResourceType, SelectionVersions>,
    /// What changed of a type since a snapshot this one replaced, worked out once for
    /// all the group's streams (`changes_from`); the last `MAX_CHANGE_MEMOS`.
    changes: Mutex<Vec<ChangeMemo>>,
    /// The first of those answers per type, read without the lock (and without touching
    /// the earlier snapshot's counts): almost every stream of a push asks for it.
    first_changes: [OnceLock<(Weak<Snapshot>, Arc<TypeChanges>)>; ResourceType::ALL.len()],
}

/// A snapshot this one replaced (held weakly: its allocation stays while the memo does,
/// so its address cannot name another), a type, and what changed of it.
type ChangeMemo = (Weak<Snapshot>, ResourceType, Arc<TypeChanges>);

/// How many `changes_from` answers a snapshot keeps (a group's streams almost all come
/// from the same snapshot).
const MAX_CHANGE_MEMOS: usize = 8;

/// What changed of one type between two snapshots, in name order.
#[derive(Debug)]
pub struct TypeChanges {
    /// New names and new versions.
    pub changed: Arc<[Arc<ServedResource>]>,
    /// The same, by name and version, as the tracker records a response: a stream that
    /// subscribes to all of `changed` (most do) shares both lists instead of copying them.
    pub named: crate::stream::Carried,
    /// Names that left.
    pub removed: Vec<String>,
}

/// The versions of a snapshot's selections of one type, for the streams that select
/// the same set. Without it every stream hashed its set on every push (a SHA-256 per
/// stream and type), though a group's proxies almost all select alike.
#[derive(Debug, Default)]
struct SelectionVersions {
    /// Every resource of the type (a wildcard subscription).
    all: OnceLock<ResourceVersion>,
    /// The first list of names a stream selected by, and its version.
    named: OnceLock<NamedSelection>,
}

impl SelectionVersions {
    /// `before`'s memos of `rt`, for a snapshot derived from it by `edits`: kept as they
    /// are when nothing of the type changed; else the named selection's hash is updated
    /// by what changed among its names (the wildcard's comes from the patched map).
    fn carried(before: &Snapshot, rt: ResourceType, edits: Option<&[Edit]>) -> Self {
        let memo = SelectionVersions::default();
        let Some(was) = before.selections.get(&rt) else { return memo };
        let Some(edits) = edits else {
            if let Some(v) = was.all.get() {
                let _ = memo.all.set(*v);
            }
            if let Some(n) = was.named.get() {
                let _ = memo.named.set(n.clone());
            }
            return memo;
        };
        if let Some(named) = was.named.get() {
            let mut hash = named.hash;
            for (name, now) in edits.iter().filter(|(n, _)| named.names.binary_search(n).is_ok()) {
                if let Some(old) = before.resource(rt, name) {
                    hash.remove(old);
                }
                if let Some(now) = now {
                    hash.add(now);
                }
            }
            let _ = memo.named.set(NamedSelection::new(named.names.clone(), hash));
        }
        memo
    }
}

/// What one list of names selects of a snapshot, hashed: a snapshot derived from this
/// one updates the hash by what changed among those names (`Generation::derive_common`).
#[derive(Debug, Clone)]
struct NamedSelection {
    names: Arc<[String]>,
    hash: SetHash,
    version: ResourceVersion,
    /// The shared (interned) subscription of state-of-the-world streams that name this
    /// list: they are known by address, without comparing their names, which for a
    /// mesh-sized Envoy is 50,000 comparisons per stream per push. Held weakly (its
    /// allocation stays while this does, so the address names no other).
    interned: OnceLock<Weak<Subscription>>,
}

impl NamedSelection {
    fn new(names: Arc<[String]>, hash: SetHash) -> Self {
        NamedSelection { names, hash, version: hash.version(), interned: OnceLock::new() }
    }

    /// Whether `subscription` names this list.
    fn names_as(&self, subscription: &Arc<Subscription>) -> bool {
        if self.interned.get().is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(subscription))) {
            return true;
        }
        let same = *self.names == *subscription.names();
        if same {
            let _ = self.interned.set(Arc::downgrade(subscription));
        }
        same
    }
}

/// A snapshot's version: the hash of every resource's name and version, by type.
fn config_version(types: &BTreeMap<ResourceType, ResourceMap>) -> ResourceVersion {
    let hashes: Vec<(ResourceType, [u8; 40])> = types.iter().map(|(rt, m)| (*rt, m.hash().to_bytes())).collect();
    content_version(hashes.iter().flat_map(|(rt, h)| [rt.type_url().as_bytes(), &h[..]]))
}

impl Snapshot {
    /// The version of `selected`, which `subscription` selected of this snapshot's `rt`:
    /// `set_version(selected)`, hashed once for all streams that subscribe alike.
    pub fn selection_version(
        &self,
        rt: ResourceType,
        subscription: &Subscription,
        selected: &[&Arc<ServedResource>],
    ) -> ResourceVersion {
        if selected.is_empty() {
            // A type the snapshot has none of (most configs have no clusters), or names
            // it does not have.
            static EMPTY: OnceLock<ResourceVersion> = OnceLock::new();
            return *EMPTY.get_or_init(|| set_version(&[]));
        }
        let Some(memo) = self.selections.get(&rt) else {
            return set_version(selected);
        };
        // What a subscription selects depends only on these (`Subscription::select`).
        if subscription.wildcard {
            let all = self.types.get(&rt).map(|m| m.hash()).unwrap_or_default();
            return *memo.all.get_or_init(|| all.version());
        }
        let named = memo.named.get_or_init(|| {
            let hash = SetHash::of(selected.iter().copied());
            NamedSelection::new(subscription.names().into(), hash)
        });
        if *named.names == *subscription.names() {
            named.version
        } else {
            set_version(selected)
        }
    }

    /// The version of what `subscription` selects of `rt`, as `selection_version`.
    /// Selects only when no stream of the group worked it out before.
    pub fn selection_version_of(&self, rt: ResourceType, subscription: &Arc<Subscription>) -> ResourceVersion {
        let memo = self.selections.get(&rt);
        let known = memo.and_then(|m| match subscription.wildcard {
            true => m.all.get().copied(),
            false => m.named.get().filter(|n| n.names_as(subscription)).map(|n| n.version),
        });
        match known {
            Some(version) => version,
            None => self.selection_version(rt, subscription, &subscription.select(self.resources(rt))),
        }
    }

    /// What changed of `rt` since `before`: worked out once per pair of snapshots (one
    /// pass over both), then shared by every stream of the group, each of which takes what
    /// it subscribes to. What a push costs a stream is then what changed, not what it
    /// subscribes to.
    pub fn changes_from(&self, before: &Arc<Snapshot>, rt: ResourceType) -> Arc<TypeChanges> {
        // A memo's weak reference keeps the earlier snapshot's allocation: a live snapshot
        // at that address is that one.
        let first = &self.first_changes[rt as usize];
        if let Some((_, c)) = first.get().filter(|(w, _)| std::ptr::eq(w.as_ptr(), Arc::as_ptr(before))) {
            return c.clone();
        }
        let key = Arc::downgrade(before);
        // Held while working it out: the group's other streams wait for it rather than
        // work it out again.
        let mut memo = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, c)) = memo.iter().find(|(w, t, _)| *t == rt && Weak::ptr_eq(w, &key)) {
            return c.clone();
        }
        let empty = ResourceMap::new();
        let (old, new) = (before.resources(rt).unwrap_or(&empty), self.resources(rt).unwrap_or(&empty));
        let (mut changed, mut removed) = (Vec::new(), Vec::new());
        new.diff(old, |o, n| match (o, n) {
            (Some(o), Some(n)) if Arc::ptr_eq(o, n) || o.version == n.version => {}
            (_, Some(n)) => changed.push(n.clone()),
            (Some(o), None) => removed.push(o.name.clone()),
            (None, None) => {}
        });
        let named = changed.iter().map(|r| (r.name.clone(), r.version)).collect();
        let changes = Arc::new(TypeChanges { changed: changed.into(), named, removed });
        if memo.len() >= MAX_CHANGE_MEMOS {
            memo.remove(0);
        }
        let _ = first.set((key.clone(), changes.clone()));
        memo.push((key, rt, changes.clone()));
        changes
    }

    pub fn resources(&self, t: ResourceType) -> Option<&ResourceMap> {
        self.types.get(&t)
    }

    pub fn resource(&self, t: ResourceType, name: &str) -> Option<&Arc<ServedResource>> {
        self.types.get(&t)?.get(name)
    }

    /// Whether the filter of extension config `name` is placed into this snapshot's
    /// listeners.
    pub fn places(&self, name: &str) -> bool {
        self.placed.binary_search_by(|n| n.as_str().cmp(name)).is_ok()
    }

    /// Every resource, by type then name.
    pub fn all(&self) -> impl Iterator<Item = (ResourceType, &Arc<ServedResource>)> {
        self.types.iter().flat_map(|(t, m)| m.values().map(move |r| (*t, r)))
    }
}

/// A compiled config and the per-group snapshots cut from it.
#[derive(Debug)]
pub struct Generation {
    pub config: Arc<CompiledConfig>,
    /// Parallel to `config.resources`.
    served: Vec<Arc<ServedResource>>,
    /// Entries with a node selector: the only ones a node's group depends on.
    selective: Vec<u32>,
    /// Keyed by the indices of the selective entries a node matches (and `WITHHELD`
    /// for proxies that get no sensitive resources).
    groups: DashMap<Vec<u32>, Arc<Snapshot>>,
    /// The group of proxies that match no selector, outside any rollout: most proxies
    /// of most configs, each of which looks its snapshot up once per push (without the
    /// map's hashing and shard lock, shared by every stream).
    common: OnceLock<Arc<Snapshot>>,
    /// Parallel to `config.resources`: holds a secret (an SDS Secret, or a field Envoy
    /// marks sensitive). Worked out the first time a proxy must go without them.
    sensitive: std::sync::OnceLock<Vec<bool>>,
    /// Rollouts in progress: which proxies get an entry's new version, and what the
    /// others get.
    pub plan: Plan,
    /// Per plan entry, by resource index: the index of its resource in
    /// `config.resources`, of the entry in `plan.entries`, and the last completed version
    /// as served (`None`: the others do not get the entry).
    planned: Vec<Planned>,
}

/// What each of `resources` is served as: `previous`'s resource where it served the same
/// entry (the same allocation, or the same type, name and version: an entry compiled
/// anew from the same text), else a new one. Both lists are in serving order, so one
/// walk over them pairs them, comparing names only where the two differ. Also says which
/// entries are not the previous config's (by index in each config): neither the same
/// allocation nor served alike to the same proxies.
fn served_after(
    resources: &[Arc<CompiledResource>],
    previous: Option<&Generation>,
) -> (Vec<Arc<ServedResource>>, Touched) {
    let new = |r: &CompiledResource| {
        Arc::new(ServedResource::new(r.name.clone(), r.version, r.resource.clone(), r.envoy_fetches_code))
    };
    let Some(previous) = previous else {
        return (resources.iter().map(|r| new(r)).collect(), Touched::default());
    };
    let before = &previous.config.resources;
    fn key(r: &CompiledResource) -> (ResourceType, &str) {
        (r.resource_type, r.name.as_str())
    }
    let mut out = Vec::with_capacity(resources.len());
    let mut touched = Touched::default();
    let mut i = 0;
    for (k, r) in resources.iter().enumerate() {
        let mut taken = None;
        let mut own = false;
        while let Some(b) = before.get(i) {
            if Arc::ptr_eq(b, r) {
                taken = Some(i);
                own = true;
                i += 1;
                break;
            }
            match key(b).cmp(&key(r)) {
                std::cmp::Ordering::Less => touched.gone.push(i as u32),
                std::cmp::Ordering::Greater => break,
                std::cmp::Ordering::Equal => {
                    let same = b.version == r.version && b.envoy_fetches_code == r.envoy_fetches_code;
                    taken = same.then_some(i);
                    // Served to the same proxies in the same way: the previous entry's own.
                    own = same && b.selector == r.selector && b.placement == r.placement;
                    if !own {
                        touched.gone.push(i as u32);
                    }
                    i += 1;
                    break;
                }
            }
            i += 1;
        }
        if !own {
            touched.new.push(k as u32);
        }
        out.push(match taken.and_then(|k| previous.served.get(k)) {
            Some(s) => s.clone(),
            None => new(r),
        });
    }
    touched.gone.extend(i as u32..before.len() as u32);
    (out, touched)
}

/// Changed entries beyond which a reload's common snapshot is built whole rather than
/// derived (or an eighth of the config, if more).
const CHUNK_EDITS: usize = crate::resource_map::CHUNK;

/// The entries of a config that are not the previous config's (`new`, by index in it),
/// and the previous config's that are not this one's (`gone`).
#[derive(Debug, Default)]
struct Touched {
    new: Vec<u32>,
    gone: Vec<u32>,
}

/// `list` sorted by name, keeping the first resource of each name: as it is when it comes
/// from a config in serving order, which this only checks.
fn first_of_each_name(mut list: Vec<Arc<ServedResource>>) -> Vec<Arc<ServedResource>> {
    if !list.windows(2).all(|w| w[0].name < w[1].name) {
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list.dedup_by(|later, first| later.name == first.name);
    }
    list
}

/// An entry under rollout: its index in the config, in the plan, its last completed
/// version and its carried ones.
type Planned = (u32, usize, Option<OldVersion>, Vec<OldVersion>);

/// An entry's last completed version, as compiled and as served.
type OldVersion = (Arc<CompiledResource>, Arc<ServedResource>);

/// The group key's mark for an entry a node gets the last completed version of.
const ON_OLD: u32 = 0x8000_0000;
/// The group key's mark for an entry a node gets a carried version of: `ON_CARRIED |
/// layer << 24 | index` (layers below `MAX_CARRIED`, indices below 2^24).
const ON_CARRIED: u32 = 0x4000_0000;
const INDEX_BITS: u32 = 0x00FF_FFFF;

/// The version of an entry a group gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    New,
    Old,
    Carried(usize),
}

fn served_version(o: &Arc<CompiledResource>) -> OldVersion {
    let served = Arc::new(ServedResource::new(o.name.clone(), o.version, o.resource.clone(), o.envoy_fetches_code));
    (o.clone(), served)
}

/// The group key's mark for proxies that get no sensitive resources.
const WITHHELD: u32 = u32::MAX;

impl Generation {
    pub fn new(config: CompiledConfig) -> Self {
        Self::with_plan(Arc::new(config), Plan::default())
    }

    /// A generation of `config` with the rollouts of `plan`.
    pub fn with_plan(config: Arc<CompiledConfig>, plan: Plan) -> Self {
        Self::with_plan_after(config, plan, None)
    }

    /// `with_plan`, taking from `previous` (the generation it replaces) each resource it
    /// served alike, with what that resource encoded for the streams: a reload that
    /// changes one entry of a large config makes one.
    pub fn with_plan_after(config: Arc<CompiledConfig>, plan: Plan, previous: Option<&Generation>) -> Self {
        let (served, touched) = served_after(&config.resources, previous);
        let selective = config
            .resources
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.selector.is_empty())
            .map(|(i, _)| i as u32)
            .collect();
        let mut planned: Vec<Planned> = plan
            .entries
            .iter()
            .enumerate()
            .filter_map(|(at, e)| {
                let i = config.resources.iter().position(|r| {
                    r.resource_type == ResourceType::ExtensionConfig && r.name == e.name && r.selector == e.selector
                })?;
                let old = e.old.as_ref().map(served_version);
                let carried = e.carried.iter().take(crate::plan::MAX_CARRIED).map(|(_, r)| served_version(r)).collect();
                Some((i as u32, at, old, carried))
            })
            .collect();
        planned.sort_by_key(|(i, _, _, _)| *i);
        let generation = Self {
            config,
            served,
            selective,
            groups: DashMap::new(),
            common: OnceLock::new(),
            sensitive: Default::default(),
            plan,
            planned,
        };
        if let Some(previous) = previous {
            generation.derive_common(previous, &touched);
        }
        generation
    }

    /// The common group's snapshot (proxies that match no selector, outside any
    /// rollout) as `previous`'s with the few resources `touched` changed, when that is
    /// all that changed for it: a reload that changes one entry of 100,000 then costs
    /// the streams' first push a lookup per changed name, not a snapshot built whole
    /// (50-90 ms). The snapshot shares every chunk of resources the change did not fall
    /// in (`ResourceMap::patched`), and the first list of names a stream selected by is
    /// hashed again by what changed among them. Left to the first stream to build whole
    /// when rollouts are in progress, when a changed entry places a filter into
    /// listeners, when a changed listener would be served with placed filters, or when
    /// more entries changed than `CHUNK_EDITS` or an eighth of the config.
    fn derive_common(&self, previous: &Generation, touched: &Touched) {
        let Some(before) = previous.common.get() else { return };
        let resources = &self.config.resources;
        let (new, gone) = (&touched.new, &touched.gone);
        if !self.planned.is_empty()
            || !previous.planned.is_empty()
            || new.len() + gone.len() > CHUNK_EDITS.max(resources.len() / 8)
        {
            return;
        }
        let olds = new
            .iter()
            .map(|&i| &resources[i as usize])
            .chain(gone.iter().map(|&i| &previous.config.resources[i as usize]));
        let mut keys: Vec<(ResourceType, &str)> = Vec::with_capacity(new.len() + gone.len());
        for r in olds {
            let listener_with_filters = r.resource_type == ResourceType::Listener && !before.placed.is_empty();
            if r.placement.is_some() || listener_with_filters {
                return;
            }
            keys.push((r.resource_type, r.name.as_str()));
        }
        keys.sort_unstable();
        keys.dedup();
        // What each name that changed is served as now: the first of its entries (in
        // serving order) without a selector, as `cut` takes it.
        let mut edits: BTreeMap<ResourceType, Vec<Edit>> = BTreeMap::new();
        for (rt, name) in keys {
            let from = resources.partition_point(|r| (r.resource_type, r.name.as_str()) < (rt, name));
            let winner = resources[from..]
                .iter()
                .take_while(|r| r.resource_type == rt && r.name == name)
                .position(|r| r.selector.is_empty())
                .map(|k| self.served[from + k].clone());
            let was = before.resource(rt, name);
            if was.zip(winner.as_ref()).is_some_and(|(a, b)| Arc::ptr_eq(a, b)) || (was.is_none() && winner.is_none()) {
                continue;
            }
            edits.entry(rt).or_default().push((name.to_string(), winner));
        }
        let mut types = before.types.clone();
        for (rt, edits) in &edits {
            let map = match types.get(rt) {
                Some(m) => m.patched(edits),
                None => ResourceMap::from_sorted(edits.iter().filter_map(|(_, r)| r.clone()).collect()),
            };
            if map.is_empty() {
                types.remove(rt);
            } else {
                types.insert(*rt, map);
            }
        }
        let selections = types
            .keys()
            .map(|rt| (*rt, SelectionVersions::carried(before, *rt, edits.get(rt).map(Vec::as_slice))))
            .collect();
        let snap = Snapshot {
            config_version: config_version(&types),
            types,
            placed: before.placed.clone(),
            selections,
            changes: Mutex::default(),
            first_changes: Default::default(),
        };
        #[cfg(debug_assertions)]
        self.check_derived(&snap);
        let snap = Arc::new(snap);
        self.groups.insert(Vec::new(), snap.clone());
        let _ = self.common.set(snap);
    }

    /// Debug builds (the tests): a derived snapshot is the one `cut` builds whole.
    #[cfg(any(test, debug_assertions))]
    fn check_derived(&self, derived: &Snapshot) {
        let whole = self.cut(&[], 0, false);
        let list = |s: &Snapshot| s.all().map(|(t, r)| (t, r.name.clone(), r.version)).collect::<Vec<_>>();
        assert_eq!(list(derived), list(&whole), "a derived snapshot holds what one built whole holds");
        assert_eq!(derived.config_version, whole.config_version);
        assert_eq!(derived.placed, whole.placed);
        for (rt, memo) in &derived.selections {
            if let Some(named) = memo.named.get() {
                let names: Vec<String> = named.names.to_vec();
                let selected: Vec<_> = names.iter().filter_map(|n| whole.resource(*rt, n)).collect();
                assert_eq!(named.version, set_version(&selected), "the carried selection's version");
            }
        }
    }

    pub fn version(&self) -> &ResourceVersion {
        &self.config.version
    }

    /// The snapshot for a node: shared with every node that matches the same entries.
    /// Runs once per stream per config change, so it only looks at entries that have a
    /// selector: every node gets the others.
    pub fn snapshot_for(&self, node: &NodeFacts) -> Arc<Snapshot> {
        self.snapshot_for_stream(node, false)
    }

    /// Whether entry `i` holds a secret.
    fn is_sensitive(&self, i: usize) -> bool {
        let flags = self.sensitive.get_or_init(|| {
            self.config
                .resources
                .iter()
                .map(|r| r.resource_type == ResourceType::Secret || filterplane_api::json::holds_sensitive(&r.resource))
                .collect()
        });
        flags.get(i).copied().unwrap_or(false)
    }

    /// The names of the resources a proxy that may not have secrets goes without.
    pub fn withheld(&self, node: &NodeFacts) -> Vec<String> {
        let all = self.snapshot_for_stream(node, false);
        let without = self.snapshot_for_stream(node, true);
        all.all().filter(|(t, r)| without.resource(*t, &r.name).is_none()).map(|(_, r)| r.name.clone()).collect()
    }

    /// As `snapshot_for`; with `withhold_sensitive`, without the resources that hold
    /// secrets (`--sensitive-to-authenticated-only`, for a proxy without a client
    /// certificate).
    pub fn snapshot_for_stream(&self, node: &NodeFacts, withhold_sensitive: bool) -> Arc<Snapshot> {
        let mut group: Vec<u32> = self
            .selective
            .iter()
            .copied()
            .filter(|&i| self.config.resources[i as usize].selector.matches(node))
            .collect();
        // Entries in a rollout whose new version this node does not get yet (ascending,
        // after the selective indices, so the key stays sorted).
        let old_from = group.len();
        for (i, at, _, _) in &self.planned {
            match self.plan.entries[*at].side(&node.id) {
                crate::plan::Side::New => {}
                crate::plan::Side::Old => group.push(ON_OLD | *i),
                crate::plan::Side::Carried(layer) => group.push(ON_CARRIED | ((layer as u32) << 24) | *i),
            }
        }
        group[old_from..].sort_unstable();
        if withhold_sensitive {
            group.push(WITHHELD);
        }
        let common = group.is_empty();
        if let Some(s) = self.common.get().filter(|_| common) {
            return s.clone();
        }
        if let Some(s) = self.groups.get(&group) {
            return s.clone();
        }
        let snap = Arc::new(self.cut(&group, old_from, withhold_sensitive));
        let snap = self.groups.entry(group).or_insert(snap).clone();
        if common {
            let _ = self.common.set(snap.clone());
        }
        snap
    }

    /// The snapshot of the group `group` (its selective entries, then its rollout marks
    /// from `old_from`), built whole.
    fn cut(&self, group: &[u32], old_from: usize, withhold_sensitive: bool) -> Snapshot {
        let marks = &group[old_from..];
        let got = |i: u32| -> Got {
            if marks.binary_search(&(ON_OLD | i)).is_ok() {
                return Got::Old;
            }
            match marks.iter().find(|&&m| m & 0xC000_0000 == ON_CARRIED && m & INDEX_BITS == i) {
                Some(m) => Got::Carried(((m >> 24) & 0x3F) as usize),
                None => Got::New,
            }
        };
        // Every entry this group gets, in config order (which decides same-name entries),
        // and which of its versions.
        let key: Vec<(u32, Got)> = (0..self.config.resources.len() as u32)
            .filter(|i| {
                self.config.resources[*i as usize].selector.is_empty() || group[..old_from].binary_search(i).is_ok()
            })
            .filter(|i| !withhold_sensitive || !self.is_sensitive(*i as usize))
            .map(|i| (i, got(i)))
            .filter(|(i, g)| *g == Got::New || self.version_of(*i, *g).is_some())
            .collect();
        let resource = |(i, g): (u32, Got)| -> &CompiledResource {
            match self.version_of(i, g) {
                Some((r, _)) => r,
                None => &self.config.resources[i as usize],
            }
        };
        // Filters placed into listeners: those of the extension configs this group gets
        // (entries sharing a name share their placement).
        let mut placements: Vec<&Placement> = Vec::new();
        for &k in &key {
            if let Some(p) = resource(k).placement.as_deref() {
                if !placements.iter().any(|q| q.filter_name == p.filter_name) {
                    placements.push(p);
                }
            }
        }
        // The config is in serving order (by type, then name, then file order), so each
        // type's resources come sorted and the first of a name is the one that wins.
        let mut lists: BTreeMap<ResourceType, Vec<Arc<ServedResource>>> = BTreeMap::new();
        for &(i, g) in &key {
            let r = resource((i, g));
            let list = lists.entry(r.resource_type).or_default();
            if list.last().is_some_and(|l| l.name == r.name) {
                continue;
            }
            list.push(match self.version_of(i, g) {
                Some((_, served)) => served.clone(),
                None => self.served_for_group(i as usize, &placements),
            });
        }
        let types: BTreeMap<ResourceType, ResourceMap> =
            lists.into_iter().map(|(rt, list)| (rt, ResourceMap::from_sorted(first_of_each_name(list)))).collect();
        let mut placed: Vec<String> = placements.iter().map(|p| p.filter_name.clone()).collect();
        placed.sort_unstable();
        let selections = types.keys().map(|&rt| (rt, SelectionVersions::default())).collect();
        Snapshot {
            config_version: config_version(&types),
            types,
            placed,
            selections,
            changes: Mutex::default(),
            first_changes: Default::default(),
        }
    }

    /// The version `g` of resource `i` when it is not the config's: the last completed
    /// one, or a carried one, if it is in a rollout and has it.
    fn version_of(&self, i: u32, g: Got) -> Option<(&CompiledResource, &Arc<ServedResource>)> {
        let at = self.planned.binary_search_by_key(&i, |(j, _, _, _)| *j).ok()?;
        let (_, _, old, carried) = &self.planned[at];
        let v = match g {
            Got::New => return None,
            Got::Old => old.as_ref()?,
            Got::Carried(layer) => carried.get(layer)?,
        };
        Some((v.0.as_ref(), &v.1))
    }

    /// A resource as this group is served it: listeners get the group's placed filters,
    /// encoded here once per group.
    fn served_for_group(&self, i: usize, placements: &[&Placement]) -> Arc<ServedResource> {
        let r = &self.config.resources[i];
        if placements.is_empty() {
            return self.served[i].clone();
        }
        match assemble_listener(r, placements) {
            None => self.served[i].clone(),
            Some(Ok((any, version))) => Arc::new(ServedResource::new(r.name.clone(), version, any, false)),
            Some(Err(e)) => {
                // compile() placed every filter into every listener already, so this
                // means a bug; serve the listener as written rather than nothing.
                tracing::error!(listener = %r.name, error = %e, "cannot place filters; serving the listener as written");
                self.served[i].clone()
            }
        }
    }

    /// How many distinct snapshots (node groups) have been cut so far.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const ECDS: ResourceType = ResourceType::ExtensionConfig;

    fn generation(yaml: &str) -> Generation {
        let parsed = filterplane_config::load::parse_file(Path::new("t.yaml"), yaml).unwrap();
        Generation::new(filterplane_config::compile(&[parsed]).unwrap())
    }

    #[test]
    fn a_new_generation_takes_what_the_last_one_served_alike() {
        let cluster = |name: &str, timeout: &str| format!("  - name: {name}\n    connect_timeout: {timeout}\n");
        let yaml = |b: &str, extra: &str| {
            format!("version: 1\nclusters:\n{}{}{}{extra}", cluster("a", "1s"), cluster("b", b), cluster("d", "1s"))
        };
        let first = generation(&yaml("1s", ""));
        // Compiled anew from the same text (other allocations): b changed, c arrived.
        let parsed =
            filterplane_config::load::parse_file(Path::new("t.yaml"), &yaml("2s", &cluster("c", "1s"))).unwrap();
        let config = Arc::new(filterplane_config::compile(&[parsed]).unwrap());
        let next = Generation::with_plan_after(config, Plan::default(), Some(&first));
        let (s1, s2) = (first.snapshot_for(&NodeFacts::default()), next.snapshot_for(&NodeFacts::default()));
        let same = |n: &str| {
            let (a, b) = (s1.resource(ResourceType::Cluster, n), s2.resource(ResourceType::Cluster, n));
            a.zip(b).is_some_and(|(a, b)| Arc::ptr_eq(a, b))
        };
        assert_eq!([same("a"), same("b"), same("c"), same("d")], [true, false, false, true]);
        assert!(s2.resource(ResourceType::Cluster, "c").is_some());
        assert_ne!(
            s1.resource(ResourceType::Cluster, "b").unwrap().version,
            s2.resource(ResourceType::Cluster, "b").unwrap().version
        );
    }

    fn entry(name: &str, selector: &str, value: &str) -> String {
        format!(
            "  - name: {name}\n    node_selector: {selector}\n    typed_config: {{ \"@type\": type.googleapis.com/google.protobuf.StringValue, value: {value} }}\n"
        )
    }

    fn node(id: &str, cluster: &str) -> NodeFacts {
        NodeFacts { id: id.into(), cluster: cluster.into(), ..Default::default() }
    }

    /// A node outside the new version's threshold gets the newest carried version its
    /// rank falls under, else the last completed one; each group its own snapshot.
    #[test]
    fn a_plan_serves_new_carried_and_old_versions_by_rank() {
        let compiled = |v: &str| {
            let yaml = format!("version: 1\nextension_configs:\n{}", entry("hdr", "{}", v));
            let parsed = filterplane_config::load::parse_file(Path::new("t.yaml"), &yaml).unwrap();
            filterplane_config::compile(&[parsed]).unwrap()
        };
        let (v1, v2, v3) = (compiled("one"), compiled("two"), compiled("three"));
        let r = |c: &CompiledConfig| c.resources[0].clone();
        let ids: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
        let mut ranks: Vec<u64> = ids.iter().map(|id| crate::plan::rank(id, "hdr")).collect();
        ranks.sort_unstable();
        // The lowest ten get v3, the next ten keep v2, the rest keep v1.
        let plan = Plan {
            entries: vec![PlanEntry {
                name: "hdr".into(),
                selector: Default::default(),
                threshold: Some(ranks[9]),
                carried: vec![(ranks[19], r(&v2))],
                old: Some(r(&v1)),
            }],
        };
        let g = Generation::with_plan(Arc::new(v3.clone()), plan);
        let mut got = std::collections::HashMap::new();
        for id in &ids {
            let version = g.snapshot_for(&node(id, "c")).resource(ECDS, "hdr").unwrap().version;
            *got.entry(version).or_insert(0) += 1;
        }
        let count = |c: &CompiledConfig| got.get(&c.resources[0].version).copied().unwrap_or(0);
        assert_eq!((count(&v3), count(&v2), count(&v1)), (10, 10, 20), "{got:?}");
    }

    #[test]
    fn a_selection_version_is_the_hash_of_what_that_subscription_selects() {
        let g = generation(&format!(
            "version: 1\nextension_configs:\n{}{}{}",
            entry("a", "{}", "x"),
            entry("b", "{}", "y"),
            entry("c", "{}", "z")
        ));
        let snap = g.snapshot_for(&node("n", "edge"));
        let sub = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            crate::stream::Subscription::from_sotw(ECDS, &names, None, 100).unwrap()
        };
        // Asked in this order, each after the memo holds another list, and again: every
        // answer is the hash of that subscription's own selection.
        for names in [&["b", "a"][..], &["*"], &["c"], &["a", "b"], &["*", "a"], &["missing"], &["c"], &["*"]] {
            let s = sub(names);
            let selected = s.select(snap.resources(ECDS));
            assert_eq!(snap.selection_version(ECDS, &s, &selected), set_version(&selected), "{names:?}");
        }
        let all = sub(&["*"]);
        let some = sub(&["a"]);
        assert_ne!(
            snap.selection_version(ECDS, &all, &all.select(snap.resources(ECDS))),
            snap.selection_version(ECDS, &some, &some.select(snap.resources(ECDS)))
        );
        // Asked by shared subscriptions (as SotW streams hold them): the memo knows the
        // one that named its list by address; another naming the same list, or another
        // list, still gets its own selection's version.
        let fresh = g.snapshot_for(&node("m", "edge"));
        let (a, a_again, c) = (Arc::new(sub(&["a", "b"])), Arc::new(sub(&["b", "a"])), Arc::new(sub(&["c"])));
        for s in [&a, &a, &a_again, &c, &a, &c] {
            let selected = s.select(fresh.resources(ECDS));
            assert_eq!(fresh.selection_version_of(ECDS, s), set_version(&selected));
        }
        let memo = fresh.selections[&ECDS].named.get().unwrap();
        assert!(memo.interned.get().is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&a))));
        // A type the snapshot has none of: the empty set's version, as before.
        let none: Vec<&Arc<ServedResource>> = Vec::new();
        assert_eq!(snap.selection_version(ResourceType::Cluster, &sub(&["x"]), &none), set_version(&none));
    }

    /// What changed since an earlier snapshot is worked out once per earlier snapshot and
    /// type, whichever is asked first (the first one read without the lock), and each
    /// answer is that pair's own.
    #[test]
    fn what_changed_is_worked_out_once_per_earlier_snapshot_and_type() {
        let of = |x: &str, y: &str| {
            let g =
                generation(&format!("version: 1\nextension_configs:\n{}{}", entry("a", "{}", x), entry("b", "{}", y)));
            g.snapshot_for(&node("n", "c"))
        };
        let (one, two, now) = (of("v1", "v1"), of("v2", "v1"), of("v2", "v2"));
        let names = |c: &TypeChanges| c.changed.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        let since_one = now.changes_from(&one, ECDS);
        assert_eq!(names(&since_one), ["a", "b"]);
        let since_two = now.changes_from(&two, ECDS);
        assert_eq!(names(&since_two), ["b"]);
        assert!(names(&now.changes_from(&now, ECDS)).is_empty());
        assert!(now.changes_from(&one, ResourceType::Cluster).changed.is_empty());
        for _ in 0..2 {
            assert!(Arc::ptr_eq(&now.changes_from(&one, ECDS), &since_one), "the first, read without the lock");
            assert!(Arc::ptr_eq(&now.changes_from(&two, ECDS), &since_two), "a later one, from the memo");
        }
        assert_eq!(since_two.named.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["b"]);
    }

    /// A reload that changes a few entries derives the common group's snapshot from the
    /// last one: what one built whole holds (`check_derived`), sharing what did not
    /// change, with the versions streams ask for already worked out. Edits: a value
    /// changed, entries added and removed, a same-name entry whose selector goes (it
    /// wins now) and comes back, a selective entry changed (nothing for the group), a
    /// whole type gone. A filter placed into listeners, or a rollout, leaves the
    /// snapshot to be built whole.
    #[test]
    fn a_reload_derives_the_common_snapshot_from_the_last_one() {
        let clusters = |n: usize, timeout: &str| -> String {
            (0..n)
                .map(|i| format!("  - name: c{i:03}\n    connect_timeout: {}\n", if i == 7 { timeout } else { "1s" }))
                .collect()
        };
        let mesh = |n: usize, timeout: &str, ecds: &[(&str, &str, &str)]| -> String {
            let ecds: String = ecds.iter().map(|(name, selector, value)| entry(name, selector, value)).collect();
            let section = if ecds.is_empty() { String::new() } else { format!("extension_configs:\n{ecds}") };
            format!("version: 1\nclusters:\n{}{section}", clusters(n, timeout))
        };
        let (edge, all) = ("{ clusters: [edge] }", "{}");
        let configs = [
            mesh(300, "1s", &[("a", all, "x"), ("b", all, "y")]),
            mesh(300, "2s", &[("a", all, "x"), ("b", all, "y")]),
            mesh(301, "2s", &[("a", all, "x"), ("aa", all, "new"), ("b", all, "y")]),
            mesh(290, "2s", &[("a", edge, "edge"), ("a", all, "x")]),
            mesh(290, "2s", &[("a", all, "edge"), ("b", edge, "b")]),
            mesh(290, "2s", &[("a", edge, "edge2"), ("a", all, "x")]),
            mesh(290, "3s", &[]),
            mesh(290, "3s", &[("z", all, "z")]),
        ];
        let compile = |yaml: &str| {
            let parsed = filterplane_config::load::parse_file(Path::new("t.yaml"), yaml).unwrap();
            Arc::new(filterplane_config::compile(&[parsed]).unwrap())
        };
        let names: Vec<String> = ["c007", "c100", "c295", "nope"].iter().map(|n| n.to_string()).collect();
        let by_name =
            Arc::new(crate::stream::Subscription::from_sotw(ResourceType::Cluster, &names, None, 100).unwrap());
        let mut last = Generation::new(Arc::try_unwrap(compile(&configs[0])).unwrap());
        for (step, yaml) in configs.iter().enumerate().skip(1) {
            let before = last.snapshot_for(&NodeFacts::default());
            before.selection_version_of(ResourceType::Cluster, &by_name);
            let next = Generation::with_plan_after(compile(yaml), Plan::default(), Some(&last));
            let derived = next.common.get().unwrap_or_else(|| panic!("step {step}: derived")).clone();
            next.check_derived(&derived);
            assert!(Arc::ptr_eq(&derived, &next.snapshot_for(&NodeFacts::default())));
            let (was, now) =
                (before.resources(ResourceType::Cluster).unwrap(), derived.resources(ResourceType::Cluster).unwrap());
            assert!(now.shared_chunks(was) >= 1, "step {step}: the untouched chunk of clusters is shared");
            let memo = derived.selections[&ResourceType::Cluster].named.get().map(|n| n.version);
            let selected = by_name.select(derived.resources(ResourceType::Cluster));
            assert_eq!(memo, Some(set_version(&selected)), "step {step}: the named selection, carried");
            assert_eq!(
                derived.changes_from(&before, ResourceType::Cluster).changed.len(),
                [0, 1, 1, 0, 0, 0, 1, 0][step],
                "step {step}"
            );
            last = next;
        }
        // A rollout in progress: built whole, on first use.
        let rollout = PlanEntry {
            name: "z".into(),
            selector: Default::default(),
            threshold: Some(0),
            carried: vec![],
            old: None,
        };
        let rolling = Generation::with_plan_after(last.config.clone(), Plan { entries: vec![rollout] }, Some(&last));
        assert!(rolling.common.get().is_none(), "a rollout in progress: built whole");
        // A changed entry that places a filter into listeners: built whole, on first use.
        let placing = |v: &str, timeout: &str| {
            let listener = crate::test_support::listener_yaml(&[("stamp", v)], &["stamp"]);
            format!("{listener}clusters:\n  - name: backend\n    connect_timeout: {timeout}\n")
        };
        let first = Generation::new(Arc::try_unwrap(compile(&placing("one", "1s"))).unwrap());
        first.snapshot_for(&NodeFacts::default());
        // A cluster changed beside placed filters: derived, the listener as assembled.
        let other = Generation::with_plan_after(compile(&placing("one", "2s")), Plan::default(), Some(&first));
        let derived = other.common.get().expect("a cluster changed: derived").clone();
        other.check_derived(&derived);
        let second = Generation::with_plan_after(compile(&placing("two", "2s")), Plan::default(), Some(&other));
        assert!(second.common.get().is_none(), "a placed filter changed: built whole");
    }

    #[test]
    fn nodes_matching_the_same_entries_share_one_snapshot() {
        let g = generation(&format!(
            "version: 1\nextension_configs:\n{}{}",
            entry("all", "{}", "x"),
            entry("edge-only", "{ clusters: [edge] }", "y")
        ));
        let a = g.snapshot_for(&node("a", "edge"));
        let b = g.snapshot_for(&node("b", "edge"));
        let c = g.snapshot_for(&node("c", "mesh"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(g.group_count(), 2);
        assert!(a.resource(ECDS, "edge-only").is_some());
        assert!(c.resource(ECDS, "edge-only").is_none());
        assert!(c.resource(ECDS, "all").is_some());
        assert_ne!(a.config_version, c.config_version);
    }

    #[test]
    fn first_matching_entry_of_a_name_wins() {
        let g = generation(&format!(
            "version: 1\nextension_configs:\n{}{}",
            entry("hdr", "{ clusters: [canary] }", "canary"),
            entry("hdr", "{}", "stable")
        ));
        let canary = g.snapshot_for(&node("a", "canary"));
        let stable = g.snapshot_for(&node("b", "edge"));
        let v = |s: &Snapshot| s.resource(ECDS, "hdr").unwrap().version;
        assert_ne!(v(&canary), v(&stable));
        assert_eq!(v(&stable), g.config.resources.iter().find(|r| r.selector.is_empty()).unwrap().version);
    }
}
