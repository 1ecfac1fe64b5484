//! Incremental loading: a reload parses, validates, compiles and hashes only the entries
//! whose text changed. Each document is cut, by its text, into its header (everything
//! but the items of the Envoy resource sections) and those items; an item compiles on its
//! own (`compile::envoy_entry`), cached by its file, section and text, and the checks
//! across entries (names, placement, defaults) run over the whole config as before.
//!
//! The cut is a fast path, never a second reading of YAML: a document it cannot cut
//! plainly (flow-style sections, anchors and aliases, tabs, a key written twice, odd
//! indentation), and every document in which anything fails, is read whole as `load`
//! reads it, so errors are the same as ever.

use std::{collections::HashMap, path::Path, sync::Arc};

use filterplane_api::ResourceType;
use sha2::{Digest, Sha256};

use crate::{
    compile::{envoy_entry, SECTIONS},
    error::{ConfigError, ConfigErrors},
    load::{config_files, documents, parse_file, read_bounded},
    model::SCHEMA_VERSION,
    parsed::ParsedFile,
    CompiledConfig, CompiledResource,
};

/// What one load did, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadStats {
    /// Envoy resource entries read as items (cut from their document).
    pub entries: usize,
    /// Of those, the ones parsed and compiled this time (their text was new).
    pub compiled: usize,
    /// Documents read whole (not cut, or something in them failed).
    pub whole_documents: usize,
    /// Time spent reading files, reading documents and their entries (from the cache or
    /// anew), and checking and assembling the whole config.
    pub read: std::time::Duration,
    pub entries_time: std::time::Duration,
    pub check: std::time::Duration,
}

/// An entry compiled on its own, and its line relative to its item's first line.
#[derive(Debug, Clone)]
struct Cached {
    resource: Arc<CompiledResource>,
    line_delta: Option<usize>,
}

/// Loads a config again and again, compiling each time only what changed.
#[derive(Debug, Default)]
pub struct Loader {
    /// By `key(file, section, text)`: the entries of the last load.
    cache: HashMap<[u8; 16], Cached>,
    stats: LoadStats,
}

impl Loader {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the last `load` did.
    pub fn stats(&self) -> LoadStats {
        self.stats
    }

    /// Entries held for the next load.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Reads, validates and compiles the config at `path` as `crate::load_with` does,
    /// with the same result and errors.
    pub fn load(&mut self, path: &Path, max_file_bytes: u64) -> Result<CompiledConfig, ConfigErrors> {
        let mut next: HashMap<[u8; 16], Cached> = HashMap::with_capacity(self.cache.len());
        let mut stats = LoadStats::default();
        let mut parsed = Vec::new();
        let mut entries = Vec::new();
        let mut errors = Vec::new();
        for file in config_files(path)? {
            let started = std::time::Instant::now();
            let text = read_bounded(&file, max_file_bytes);
            stats.read += started.elapsed();
            let started = std::time::Instant::now();
            let text = match text {
                Ok(t) => t,
                Err(e) => {
                    let message = format!("cannot read: {e}");
                    errors.push(ConfigError { file, line: None, path: String::new(), message });
                    continue;
                }
            };
            for (offset, doc) in documents(&text) {
                let cut = (!crate::istio::is_istio(doc)).then(|| cut(doc)).flatten();
                if let Some(cut) = cut {
                    if let Some((header, items)) = self.read_cut(&file, offset, &cut, &mut next, &mut stats) {
                        parsed.push(header);
                        entries.push(items);
                        continue;
                    }
                }
                stats.whole_documents += 1;
                match crate::load::parse_document(&file, offset, doc) {
                    Ok(p) => {
                        parsed.push(p);
                        entries.push(Vec::new());
                    }
                    Err(es) => errors.extend(es),
                }
            }
            stats.entries_time += started.elapsed();
        }
        self.cache = next;
        if !errors.is_empty() {
            self.stats = stats;
            return Err(ConfigErrors(errors));
        }
        let started = std::time::Instant::now();
        let config = crate::compile::compile_with(&parsed, entries);
        stats.check = started.elapsed();
        self.stats = stats;
        config
    }

    /// A cut document's header parsed and its items compiled (from the cache where their
    /// text is known); `None` when anything in it fails (it is then read whole).
    fn read_cut(
        &self,
        file: &Path,
        offset: usize,
        cut: &Cut<'_>,
        next: &mut HashMap<[u8; 16], Cached>,
        stats: &mut LoadStats,
    ) -> Option<(ParsedFile, Vec<Arc<CompiledResource>>)> {
        // Items are compiled even when the header or another item fails, so that the
        // reload after the fix finds them cached.
        let header = crate::load::parse_document(file, offset, &cut.header).ok();
        let mut items = Vec::with_capacity(cut.items.len());
        let mut failed = false;
        for item in &cut.items {
            let (section, rt) = SECTIONS[item.section];
            // The item's first line in the file, 1-based.
            let line = offset + item.line + 1;
            let key = key(file, section, item.text);
            let cached = match self.cache.get(&key).or_else(|| next.get(&key)) {
                Some(c) => c.clone(),
                None => {
                    stats.compiled += 1;
                    let Some(resource) = compile_item(file, section, rt, item.text, line) else {
                        failed = true;
                        continue;
                    };
                    let line_delta = resource.origin.line.and_then(|l| l.checked_sub(line));
                    Cached { resource: Arc::new(resource), line_delta }
                }
            };
            if !failed {
                let mut r = CompiledResource::clone(&cached.resource);
                r.origin.line = cached.line_delta.map(|d| line + d);
                r.origin.path = format!("{section}[{}]", item.index);
                items.push(Arc::new(r));
            }
            next.insert(key, cached);
        }
        stats.entries += cut.items.len();
        Some((header?, items)).filter(|_| !failed)
    }
}

/// The cache key of an item: its file, section and text.
fn key(file: &Path, section: &str, text: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    let file = file.as_os_str().as_encoded_bytes();
    for part in [file, section.as_bytes(), text.as_bytes()] {
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

#[cfg(test)]
mod tests;
