//! Incremental loading: a reload parses, validates, compiles and hashes only what
//! changed, by file, by document and by entry.
//!
//! - A file whose identity and times are what they were at the last load, when they had
//!   not changed for a while (`Stamp`), is not read again: its documents and entries
//!   stand as they were.
//! - A file read again is cut, by its text, into each document's header (everything but
//!   the items of the Envoy resource sections) and those items; an item compiles on its
//!   own (`compile::envoy_entry`), cached by its section and text, and keeps its shared
//!   resource while its place in the file is the same.
//! - The checks across entries (names, placement, defaults) run over the whole config as
//!   before, each at a cost of a comparison or two per entry.
//!
//! The cut is a fast path, never a second reading of YAML: a document it cannot cut
//! plainly (flow-style sections, anchors and aliases, tabs, a key written twice, odd
//! indentation), and every document in which anything fails, is read whole as `load`
//! reads it, so errors are the same as ever.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use filterplane_api::ResourceType;
use sha2::{Digest, Sha256};

use crate::{
    compile::{envoy_entry, SECTIONS},
    error::{ConfigError, ConfigErrors},
    line_table::{Line, LineTable},
    load::{config_files, documents, parse_file, read_bounded},
    model::SCHEMA_VERSION,
    order::Changes,
    parsed::ParsedFile,
    CompiledConfig, CompiledResource,
};

/// What one load did, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadStats {
    /// Envoy resource entries read as items (cut from their document, or standing with
    /// their unchanged file).
    pub entries: usize,
    /// Of those, the ones parsed and compiled this time (their text was new).
    pub compiled: usize,
    /// Documents read whole (not cut, or something in them failed).
    pub whole_documents: usize,
    /// Files read again (the others had not changed).
    pub files_read: usize,
    /// Of those, the ones edited inside their entries, taken in place (`patch`).
    pub patched: usize,
    /// Time spent reading files, reading documents and their entries (from the cache or
    /// anew), and checking and assembling the whole config.
    pub read: Duration,
    pub entries_time: Duration,
    pub check: Duration,
}

/// An entry compiled on its own as it was last placed (its line and path in its file),
/// and its line relative to its item's first line.
#[derive(Debug, Clone)]
struct Cached {
    resource: Arc<CompiledResource>,
    line_delta: Option<usize>,
}

/// A file's entries compiled on their own, by `key(section, text)`.
type Items = HashMap<[u8; 16], Cached>;

/// A file's identity, size and times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How long a file must have been unchanged when it is read for its stamp to vouch for
/// its text at later loads. A write after the read then gives the file a later change
/// time even where the filesystem keeps times coarsely (seconds, or FAT's two).
const SETTLED: Duration = Duration::from_secs(2);

impl Stamp {
    #[cfg(unix)]
    fn of(file: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(file).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    #[cfg(not(unix))]
    fn of(_file: &Path) -> Option<Self> {
        None
    }

    /// Whether the file's last change (`ctime`, which no tool sets back) was at least
    /// `settle` before `read_at`.
    fn settled_before(&self, read_at: SystemTime, settle: Duration) -> bool {
        let (secs, nanos) = self.ctime;
        let Ok(secs) = u64::try_from(secs) else { return false };
        let changed = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos.clamp(0, 999_999_999) as u32);
        changed + settle <= read_at
    }
}

/// One document of a file as the last load read it: its header (or the whole document)
/// and the entries cut from it.
#[derive(Debug)]
struct Doc {
    parsed: ParsedFile,
    entries: Vec<Arc<CompiledResource>>,
}

/// What the loader keeps of one file between loads.
#[derive(Debug, Default)]
struct FileState {
    /// Its stamp when it was read, if it had settled then: while the stamp is the same,
    /// `docs` stand without reading it.
    stamp: Option<Stamp>,
    /// Its entries compiled on their own.
    items: Items,
    /// Its documents, when it read without errors.
    docs: Option<Vec<Doc>>,
    /// A large file every document of which was cut: its text and where each entry lies
    /// in it, so that an edit inside entries reads those entries alone (`patch`).
    text: Option<String>,
    spans: Vec<patch::Span>,
    /// Its entries' first lines, which they read theirs from (`Line`).
    lines: Arc<LineTable>,
}

impl FileState {
    /// This file's line table for a new read of it: the one it has, unless most of its
    /// cells are no longer any entry's (every entry then gets a copy holding a cell of a
    /// new one, once).
    fn table_for_read(&self) -> Arc<LineTable> {
        if self.lines.len() > 2 * self.items.len() + 1024 {
            return Arc::default();
        }
        self.lines.clone()
    }
}

/// Files from this size on keep their text for `patch` (smaller ones are read again in
/// about the time a comparison takes).
const PATCH_AT_LEAST: usize = 256 * 1024;

/// Loads a config again and again, compiling each time only what changed.
#[derive(Debug, Default)]
pub struct Loader {
    /// The files of the last load, in config order.
    files: Vec<(PathBuf, FileState)>,
    /// The resources of the last load that compiled, in serving order.
    last: Vec<Arc<CompiledResource>>,
    /// Whether the last load compiled (`last` is its): only then is what a load changed
    /// known against `last`.
    last_ok: bool,
    /// What the last load made from documents' headers (every load makes them anew).
    last_made: Vec<Arc<CompiledResource>>,
    /// The summaries of `last` (what the checks and the version read of each).
    last_summaries: Vec<crate::compiled::Summary>,
    /// `SETTLED`, shorter in tests.
    settle: Option<Duration>,
    /// `PATCH_AT_LEAST`, smaller in tests.
    patch_at_least: Option<usize>,
    stats: LoadStats,
}

impl Loader {
    pub fn new() -> Self {
        Self::default()
    }

    /// A loader that trusts a file's stamp once it is `settle` old (`SETTLED` by default).
    pub fn with_settle(settle: Duration) -> Self {
        Self { settle: Some(settle), ..Self::default() }
    }

    /// A loader that edits in place files from `bytes` on (`PATCH_AT_LEAST` by default).
    pub fn patching_from(mut self, bytes: usize) -> Self {
        self.patch_at_least = Some(bytes);
        self
    }

    /// What the last `load` did.
    pub fn stats(&self) -> LoadStats {
        self.stats
    }

    /// Entries held for the next load.
    pub fn cached(&self) -> usize {
        self.files.iter().map(|(_, f)| f.items.len()).sum()
    }

    /// Reads, validates and compiles the config at `path` as `crate::load_with` does,
    /// with the same result and errors.
    pub fn load(&mut self, path: &Path, max_file_bytes: u64) -> Result<CompiledConfig, ConfigErrors> {
        let mut stats = LoadStats::default();
        let paths = config_files(path)?;
        let mut before: HashMap<PathBuf, FileState> = std::mem::take(&mut self.files).into_iter().collect();
        let mut errors = Vec::new();
        let mut changes = Changes::default();
        for file in paths {
            let old = before.remove(&file).unwrap_or_default();
            let tuning = (self.settle.unwrap_or(SETTLED), self.patch_at_least.unwrap_or(PATCH_AT_LEAST));
            let state = read_file(&file, old, max_file_bytes, tuning, (&mut stats, &mut changes), &mut errors);
            self.files.push((file, state));
        }
        // The entries of files no longer in the config are gone.
        for state in before.values() {
            changes.stale.extend(state.docs.iter().flatten().flat_map(|d| d.entries.iter().cloned()));
        }
        // Entries that only moved keep their places in the serving order.
        crate::order::moved(&mut self.last, &changes.moved);
        if !errors.is_empty() {
            self.stats = stats;
            self.last_ok = false;
            return Err(ConfigErrors(errors));
        }
        changes.stale.append(&mut self.last_made);
        let known = self.last_ok.then_some((changes.fresh.as_slice(), changes.stale.as_slice()));
        let started = Instant::now();
        let docs = self.files.iter().flat_map(|(_, f)| f.docs.iter().flatten());
        let (parsed, entries): (Vec<&ParsedFile>, Vec<&[Arc<CompiledResource>]>) =
            docs.map(|d| (&d.parsed, d.entries.as_slice())).unzip();
        let previous =
            crate::compile::Previous { resources: &self.last, summaries: &self.last_summaries, changes: known };
        let compiled = crate::compile::compile_with(&parsed, &entries, previous);
        let config = compiled.config;
        self.last_ok = config.is_ok();
        if let Ok(c) = &config {
            self.last.clone_from(&c.resources);
            self.last_made = compiled.made;
            self.last_summaries = compiled.summaries;
        }
        stats.check = started.elapsed();
        self.stats = stats;
        config
    }
}

/// `file` read for this load: as it stood, if its stamp says it did not change; else read
/// again, its entries compiled where their text is new. Errors go to `errors`.
fn read_file(
    file: &Path,
    mut old: FileState,
    max_file_bytes: u64,
    (settle, patch_at_least): (Duration, usize),
    (stats, changes): (&mut LoadStats, &mut Changes),
    errors: &mut Vec<ConfigError>,
) -> FileState {
    let stamp = Stamp::of(file);
    if let (Some(docs), true) = (&old.docs, old.stamp.is_some() && old.stamp == stamp) {
        stats.entries += docs.iter().map(|d| d.entries.len()).sum::<usize>();
        return old;
    }
    stats.files_read += 1;
    let read_at = SystemTime::now();
    let started = Instant::now();
    let text = read_bounded(file, max_file_bytes);
    stats.read += started.elapsed();
    let started = Instant::now();
    let text = match text {
        Ok(t) => t,
        Err(e) => {
            let message = format!("cannot read: {e}");
            errors.push(ConfigError { file: file.to_path_buf(), line: None, path: String::new(), message });
            return FileState { items: old.items, lines: old.lines, ..FileState::default() };
        }
    };
    if text.len() >= patch_at_least && patch::patch(file, &mut old, &text, stats, changes) {
        stats.entries += old.spans.len();
        stats.entries_time += started.elapsed();
        old.stamp = stamp.filter(|s| s.settled_before(read_at, settle));
        old.text = Some(text);
        return old;
    }
    let mut items = HashMap::with_capacity(old.items.len());
    let lines = old.table_for_read();
    let old_entries: Vec<Arc<CompiledResource>> =
        old.docs.iter().flatten().flat_map(|d| d.entries.iter().cloned()).collect();
    let mut docs = Vec::new();
    let mut failed = false;
    // Where each entry lies, while every document is cut.
    let mut spans = Some(Vec::new()).filter(|_| text.len() >= patch_at_least);
    for (offset, doc) in documents(&text) {
        let cut = (!crate::istio::is_istio(doc)).then(|| cut(doc)).flatten();
        if let Some(cut) = cut {
            let read = read_cut(file, offset, &cut, (&old.items, &mut items), &lines, stats);
            if let Some((parsed, entries, keys)) = read {
                if let Some(spans) = spans.as_mut() {
                    let slots = entries.iter().map(|e| e.origin.line.slot_in(&lines));
                    spans.extend(cut.items.iter().zip(keys).zip(slots).enumerate().map(
                        |(entry, ((item, key), slot))| {
                            let start = item.text.as_ptr() as usize - text.as_ptr() as usize;
                            patch::Span {
                                doc: docs.len(),
                                entry,
                                start,
                                end: start + item.text.len(),
                                section: item.section,
                                index: item.index,
                                line: offset + item.line + 1,
                                indent: item.text.len() - item.text.trim_start_matches(' ').len(),
                                key,
                                slot,
                            }
                        },
                    ));
                }
                docs.push(Doc { parsed, entries });
                continue;
            }
        }
        spans = None;
        stats.whole_documents += 1;
        match crate::load::parse_document(file, offset, doc) {
            Ok(parsed) => docs.push(Doc { parsed, entries: Vec::new() }),
            Err(es) => {
                errors.extend(es);
                failed = true;
            }
        }
    }
    changes.between(old_entries, docs.iter().flat_map(|d| d.entries.iter()));
    stats.entries_time += started.elapsed();
    let stamp = stamp.filter(|s| !failed && s.settled_before(read_at, settle));
    let spans = spans.filter(|_| !failed);
    FileState {
        stamp,
        items,
        docs: (!failed).then_some(docs),
        text: spans.is_some().then_some(text),
        spans: spans.unwrap_or_default(),
        lines,
    }
}

/// A cut document's header, its entries and their cache keys.
type CutRead = (ParsedFile, Vec<Arc<CompiledResource>>, Vec<[u8; 16]>);

/// A cut document's header parsed and its items compiled (from `old` where their text
/// is known), their lines held in `lines`; `None` when anything in it fails (it is then
/// read whole). Every item compiled goes to `next`.
fn read_cut(
    file: &Path,
    offset: usize,
    cut: &Cut<'_>,
    (old, next): (&Items, &mut Items),
    lines: &Arc<LineTable>,
    stats: &mut LoadStats,
) -> Option<CutRead> {
    // Items are compiled even when the header or another item fails, so that the
    // reload after the fix finds them cached.
    let header = crate::load::parse_document(file, offset, &cut.header).ok();
    let mut items = Vec::with_capacity(cut.items.len());
    let mut keys = Vec::with_capacity(cut.items.len());
    let mut failed = false;
    for item in &cut.items {
        let (section, rt) = SECTIONS[item.section];
        // The item's first line in the file, 1-based.
        let line = offset + item.line + 1;
        let key = key(section, item.text);
        // An entry whose text another of this load already has (a duplicate) gets a cell
        // of its own.
        let (cached, own) = match (next.get(&key), old.get(&key)) {
            (Some(c), _) => (c.clone(), false),
            (None, Some(c)) => (c.clone(), true),
            (None, None) => {
                stats.compiled += 1;
                let Some(resource) = compile_item(file, section, rt, item.text, line) else {
                    failed = true;
                    continue;
                };
                (held(resource, line, lines), true)
            }
        };
        let placed = place(cached, line, (section, item.index), lines, own);
        if !failed {
            items.push(placed.resource.clone());
            keys.push(key);
        }
        next.insert(key, placed);
    }
    stats.entries += cut.items.len();
    Some((header?, items, keys)).filter(|_| !failed)
}

/// `resource`, just compiled from an item whose first line is `first`, its line held in
/// `lines`.
fn held(mut resource: CompiledResource, first: usize, lines: &Arc<LineTable>) -> Cached {
    let line_delta = resource.origin.line.get().and_then(|l| l.checked_sub(first));
    resource.origin.line = hold(lines, first, line_delta);
    Cached { resource: Arc::new(resource), line_delta }
}

/// The line of an entry whose first line is `first`, `line_delta` below it, held in
/// `lines` (fixed where it cannot be).
fn hold(lines: &Arc<LineTable>, first: usize, line_delta: Option<usize>) -> Line {
    match line_delta {
        Some(d) => lines.hold(first, d).unwrap_or_else(|| Some(first + d).into()),
        None => None.into(),
    }
}

/// `cached` as entry `index` of `section` whose first line is `first`: itself, its cell
/// in `lines` set to `first`, where its path is the same and it is `own` (no other entry
/// of the file has it); else a copy that says where it is.
fn place(cached: Cached, first: usize, (section, index): (&str, usize), lines: &Arc<LineTable>, own: bool) -> Cached {
    let same_path = path_is(&cached.resource.origin.path, section, index);
    if same_path && own {
        if let Some(slot) = cached.resource.origin.line.slot_in(lines) {
            lines.set(slot, first);
            return cached;
        }
        if cached.line_delta.is_none() && cached.resource.origin.line.get().is_none() {
            return cached;
        }
    }
    let mut r = CompiledResource::clone(&cached.resource);
    r.origin.line = hold(lines, first, cached.line_delta);
    if !same_path {
        r.origin.path = format!("{section}[{index}]");
    }
    Cached { resource: Arc::new(r), line_delta: cached.line_delta }
}

/// Whether `path` is `{section}[{index}]`.
fn path_is(path: &str, section: &str, index: usize) -> bool {
    path.strip_prefix(section)
        .and_then(|p| p.strip_prefix('['))
        .and_then(|p| p.strip_suffix(']'))
        .is_some_and(|n| n.parse() == Ok(index))
}

/// The cache key of an item of a file: its section and text.
fn key(section: &str, text: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    for part in [section.as_bytes(), text.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let mut k = [0u8; 16];
    k.copy_from_slice(&h.finalize()[..16]);
    k
}

/// One item of section `section` (of type `rt`), its first line `line` of `file`,
/// compiled on its own; `None` if it is not exactly one valid entry.
fn compile_item(file: &Path, section: &str, rt: ResourceType, text: &str, line: usize) -> Option<CompiledResource> {
    // The item under its section key, as line 2 of a document of its own.
    let newline = if text.ends_with('\n') { "" } else { "\n" };
    let mini = format!("{section}:\n{text}{newline}version: {SCHEMA_VERSION}\n");
    let mut p = parse_file(file, &mini).ok()?;
    p.lines = std::mem::take(&mut p.lines).with_offset(line.checked_sub(2)?);
    match p.doc.envoy_section(rt) {
        [spec] => envoy_entry(&p, section, 0, rt, spec).ok(),
        _ => None,
    }
}

/// A document cut into its header and its Envoy resource sections' items.
#[derive(Debug)]
struct Cut<'a> {
    /// The document with the sections' lines blanked: same lines, so positions hold.
    header: String,
    items: Vec<Item<'a>>,
}

#[derive(Debug)]
struct Item<'a> {
    /// Index into `SECTIONS`.
    section: usize,
    /// Position in its section.
    index: usize,
    /// Its first line in the document, 0-based.
    line: usize,
    text: &'a str,
}

/// Cuts a block-style document; `None` for anything but plain block sequences under
/// the section keys (which is then read whole).
fn cut<'a>(doc: &'a str) -> Option<Cut<'a>> {
    if has_anchor_or_alias(doc) {
        return None;
    }
    let mut header = String::with_capacity(1024);
    let mut items: Vec<Item<'_>> = Vec::new();
    let mut seen = [false; SECTIONS.len()];
    // The section being read, the indentation of its items, the item open (its start
    // byte and first line).
    let mut section: Option<usize> = None;
    let mut indent: Option<usize> = None;
    let mut open: Option<(usize, usize)> = None;
    let mut at = 0usize;
    // Items of the section being read before this one.
    let mut before = 0usize;
    let close = |items: &mut Vec<Item<'a>>, s: usize, open: &mut Option<(usize, usize)>, end: usize, before: usize| {
        if let Some((start, line)) = open.take() {
            let index = items.len() - before;
            items.push(Item { section: s, index, line, text: &doc[start..end] });
        }
    };
    for (n, line) in doc.split_inclusive('\n').enumerate() {
        let start = at;
        at += line.len();
        let bare = line.trim_end_matches(['\n', '\r']);
        let body = bare.trim_start_matches(' ');
        let spaces = bare.len() - body.len();
        if body.starts_with('\t') || body.starts_with('%') {
            return None;
        }
        if body.is_empty() || body.starts_with('#') {
            // Blank or a comment: the open item's, or the header's.
            if section.is_some() {
                header.push('\n');
            } else {
                header.push_str(line);
            }
            continue;
        }
        let dash = body == "-" || body.starts_with("- ");
        if spaces == 0 && !dash {
            // A top-level key: the end of any section.
            if let Some(s) = section.take() {
                close(&mut items, s, &mut open, start, before);
            }
            indent = None;
            before = items.len();
            let (k, rest) = body.split_once(':')?;
            if let Some(s) = SECTIONS.iter().position(|(name, _)| *name == k) {
                let rest = rest.trim();
                if !(rest.is_empty() || rest.starts_with('#')) || std::mem::replace(&mut seen[s], true) {
                    // Flow style, or a section written twice.
                    return None;
                }
                section = Some(s);
                header.push('\n');
            } else {
                header.push_str(line);
            }
            continue;
        }
        let Some(s) = section else {
            header.push_str(line);
            continue;
        };
        header.push('\n');
        let item_indent = *indent.get_or_insert(spaces);
        match (dash, spaces.cmp(&item_indent)) {
            (true, std::cmp::Ordering::Equal) => {
                close(&mut items, s, &mut open, start, before);
                open = Some((start, n));
            }
            (_, std::cmp::Ordering::Greater) if open.is_some() => {}
            _ => return None,
        }
    }
    if let Some(s) = section {
        close(&mut items, s, &mut open, doc.len(), before);
    }
    Some(Cut { header, items })
}

/// Whether `doc` may hold a YAML anchor (`&a`) or alias (`*a`): an item using one
/// defined in another could not be read alone. Errs on the side of yes (then the
/// document is read whole).
fn has_anchor_or_alias(doc: &str) -> bool {
    let b = doc.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        (c == b'&' || c == b'*')
            && (i == 0 || matches!(b[i - 1], b' ' | b'\n' | b'[' | b'{' | b','))
            && b.get(i + 1).is_some_and(|n| !n.is_ascii_whitespace())
    })
}

mod patch;
#[cfg(test)]
mod tests;
