//! A large file edited inside one entry: that entry is read again, and nothing else.
//! Re-reading a whole file costs its size (cutting every line, hashing every entry:
//! ~25 ms for a 4 MB file of 20,000 entries); comparing it with the text of the last
//! load costs a memory comparison. The edit is taken in place only when it is plainly
//! inside one entry and keeps the file's line count, so every other entry keeps its
//! text, its line and its resource; anything else reads the file as before.

use std::{path::Path, sync::Arc};

use super::{compile_item, key, Cached, FileState, LoadStats};
use crate::compile::SECTIONS;

/// Where an entry cut from a file lies in its text.
#[derive(Debug, Clone)]
pub(super) struct Span {
    /// Its document (index into `FileState::docs`) and its place in that document's
    /// entries.
    pub doc: usize,
    pub entry: usize,
    /// Its bytes in the file's text.
    pub start: usize,
    pub end: usize,
    /// Index into `SECTIONS`; its place in the section; its first line (1-based); the
    /// indentation of its dash.
    pub section: usize,
    pub index: usize,
    pub line: usize,
    pub indent: usize,
    pub key: [u8; 16],
}

/// `state` (read from `state.text`) made to stand for `text`, if `text` differs from it
/// only inside one entry and has as many lines; `false` otherwise (nothing changed then).
pub(super) fn patch(file: &Path, state: &mut FileState, text: &str, stats: &mut LoadStats) -> bool {
    let (Some(before), Some(docs)) = (state.text.as_deref(), state.docs.as_mut()) else { return false };
    let (a, b) = (before.as_bytes(), text.as_bytes());
    let prefix = common_prefix(a, b);
    if prefix == a.len() && a.len() == b.len() {
        return true;
    }
    let suffix = common_suffix(a, b).min(a.len().min(b.len()) - prefix);
    let (old_end, new_end) = (a.len() - suffix, b.len() - suffix);
    if newlines(&a[prefix..old_end]) != newlines(&b[prefix..new_end]) {
        return false;
    }
    let Some(at) = state.spans.partition_point(|s| s.start <= prefix).checked_sub(1) else { return false };
    let span = &state.spans[at];
    // The edit starts after the entry's dash and ends within it.
    if prefix < span.start + span.indent + 2 || old_end > span.end {
        return false;
    }
    let grown = b.len() as isize - a.len() as isize;
    let Some(item) = usize::try_from(span.end as isize + grown).ok().and_then(|end| text.get(span.start..end)) else {
        return false;
    };
    if !still_one_item(item, span.indent) {
        return false;
    }
    let (section, rt) = SECTIONS[span.section];
    let new_key = key(section, item);
    let cached = match state.items.get(&new_key) {
        Some(c) => c.clone(),
        None => {
            let Some(resource) = compile_item(file, section, rt, item, span.line) else { return false };
            stats.compiled += 1;
            let line_delta = resource.origin.line.and_then(|l| l.checked_sub(span.line));
            Cached { resource: Arc::new(resource), line_delta }
        }
    };
    let placed = super::place(cached, span.line, section, span.index);
    let Some(slot) = docs.get_mut(span.doc).and_then(|d| d.entries.get_mut(span.entry)) else { return false };
    *slot = placed.resource.clone();
    let old_key = std::mem::replace(&mut state.spans[at].key, new_key);
    state.spans[at].end = (state.spans[at].end as isize + grown) as usize;
    for s in &mut state.spans[at + 1..] {
        s.start = (s.start as isize + grown) as usize;
        s.end = (s.end as isize + grown) as usize;
    }
    state.items.insert(new_key, placed);
    // The old text's entry goes unless another entry has the same text.
    if old_key != new_key && !state.spans.iter().any(|s| s.key == old_key) {
        state.items.remove(&old_key);
    }
    stats.patched += 1;
    true
}

/// Whether `item` (an entry's text, its dash at `indent`) still cuts as one entry: every
/// line after the first indented deeper (or blank, or a comment), no tab or directive
/// opening a line, no anchor or alias.
fn still_one_item(item: &str, indent: usize) -> bool {
    if super::has_anchor_or_alias(item) {
        return false;
    }
    item.split_inclusive('\n').enumerate().all(|(n, line)| {
        let bare = line.trim_end_matches(['\n', '\r']);
        let body = bare.trim_start_matches(' ');
        let spaces = bare.len() - body.len();
        if body.starts_with('\t') || body.starts_with('%') {
            return false;
        }
        n == 0 || body.is_empty() || body.starts_with('#') || spaces > indent
    })
}

fn newlines(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == b'\n').count()
}

/// How many bytes `a` and `b` share at their start (compared a block at a time).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let mut at = 0;
    while at + BLOCK <= n && a[at..at + BLOCK] == b[at..at + BLOCK] {
        at += BLOCK;
    }
    at + a[at..n].iter().zip(&b[at..n]).take_while(|(x, y)| x == y).count()
}

/// How many bytes `a` and `b` share at their end.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    let n = a.len().min(b.len());
    let (ea, eb) = (a.len(), b.len());
    let mut k = 0;
    while k + BLOCK <= n && a[ea - k - BLOCK..ea - k] == b[eb - k - BLOCK..eb - k] {
        k += BLOCK;
    }
    k + a[..ea - k].iter().rev().zip(b[..eb - k].iter().rev()).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_ends_are_found_across_blocks() {
        let a: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut b = a.clone();
        b[5_000] = 255;
        assert_eq!((common_prefix(&a, &b), common_suffix(&a, &b)), (5_000, 4_999));
        assert_eq!((common_prefix(&a, &a), common_suffix(&a, &a[1..])), (10_000, 9_999));
        assert_eq!(common_prefix(b"", b"x"), 0);
    }

    #[test]
    fn one_item_is_one_item() {
        assert!(still_one_item("  - name: a\n    port: 1\n\n    # note\n", 2));
        assert!(!still_one_item("  - name: a\n  - name: b\n", 2), "a second entry");
        assert!(!still_one_item("  - name: a\nroutes:\n", 2), "a section");
        assert!(!still_one_item("  - name: a\n---\n", 2), "a document");
        assert!(!still_one_item("  - name: &x a\n", 2), "an anchor");
        assert!(!still_one_item("  - name: a\n\t x: 1\n", 2), "a tab");
    }
}
