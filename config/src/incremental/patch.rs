//! A large file edited inside its entries: those entries are read again, and nothing
//! else. Re-reading a whole file costs its size (cutting every line, hashing every entry:
//! ~25 ms for a 4 MB file of 20,000 entries); comparing it with the text of the last load
//! costs a memory comparison. The edit is taken in place when the lines it touches lie
//! inside entries of one section that still cut as as many entries; anything else (a
//! section's key, the header, an entry added or removed) reads the file as before.
//!
//! An edit that adds or removes lines moves everything after it: later entries' cells in
//! the file's line table move (their resources, shared with the generations serving
//! them, stay as they are), and the documents' line indexes move with them, so errors
//! still name the lines the file has now.

use std::{collections::HashSet, path::Path, sync::Arc};

use super::{compile_item, key, FileState, LoadStats};
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
    /// Its resource's cell in the file's line table, if it has one.
    pub slot: Option<u32>,
}

/// An entry of the edited region as the new text has it: its bytes from the region's
/// start, its first line counted from the region's, its text.
struct NewItem<'a> {
    at: usize,
    line: usize,
    text: &'a str,
}

/// `state` (read from `state.text`) made to stand for `text`, if `text` differs from it
/// only inside entries of one section that still cut as as many entries; `false`
/// otherwise (nothing that matters changed then: the caller reads the file whole).
/// What changed goes to `changes`: entries that only moved, with the resources they
/// replace, and the new and gone resources of the entries edited.
pub(super) fn patch(
    file: &Path,
    state: &mut FileState,
    text: &str,
    stats: &mut LoadStats,
    changes: &mut crate::order::Changes,
) -> bool {
    let (Some(before), Some(docs)) = (state.text.as_deref(), state.docs.as_mut()) else { return false };
    let (a, b) = (before.as_bytes(), text.as_bytes());
    let prefix = common_prefix(a, b);
    if prefix == a.len() && a.len() == b.len() {
        return true;
    }
    let suffix = common_suffix(a, b).min(a.len().min(b.len()) - prefix);
    // The edit as whole lines of the old text: from its first line's start to its last
    // line's end (the text after it is common, so the new text's region ends as far on).
    let from = a[..prefix].iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
    let old_end = a.len() - suffix;
    let to = match old_end {
        0 => 0,
        e if a[e - 1] == b'\n' => e,
        e => a[e..].iter().position(|&c| c == b'\n').map_or(a.len(), |i| e + i + 1),
    };
    let spans = &state.spans;
    // The entries it touches: the one holding its first line (and the one before, when it
    // starts at an entry's first line: lines added at an entry's end look like lines
    // added before the next one), to the one holding its last.
    let Some(mut first) = spans.partition_point(|s| s.start <= from).checked_sub(1) else { return false };
    if from == spans[first].start && first > 0 && spans[first - 1].end == from {
        first -= 1;
    }
    let last = if to > from { spans.partition_point(|s| s.start < to).saturating_sub(1) } else { first };
    if last < first || from < spans[first].start || to > spans[last].end {
        return false;
    }
    let (head, tail) = (&spans[first], &spans[last]);
    let same_run = spans[first..=last].windows(2).all(|w| {
        w[0].end == w[1].start && (w[0].doc, w[0].section, w[0].indent) == (w[1].doc, w[1].section, w[1].indent)
    });
    if !same_run {
        return false;
    }
    let grown = b.len() as isize - a.len() as isize;
    let Some(region) = tail.end.checked_add_signed(grown).and_then(|end| text.get(head.start..end)) else {
        return false;
    };
    // What follows must still start a line (an entry's last newline removed joins the
    // next line to it).
    if !(region.ends_with('\n') || head.start + region.len() == text.len()) {
        return false;
    }
    let Some(items) = cut_run(region, head.indent).filter(|items| items.len() == last - first + 1) else {
        return false;
    };
    let moved = newlines(region.as_bytes()) as isize - newlines(&a[head.start..tail.end]) as isize;
    // A table most of whose cells are no longer any entry's is left for a read of the
    // whole file, which starts a new one.
    let lines = state.lines.clone();
    if lines.len() > 2 * spans.len() + 4096 {
        return false;
    }
    // Everything that can fail is done before anything changes.
    let (section, rt) = SECTIONS[head.section];
    let mut found = Vec::with_capacity(items.len());
    for item in &items {
        let line = head.line + item.line;
        let new_key = key(section, item.text);
        let cached = match state.items.get(&new_key) {
            Some(c) => c.clone(),
            None => {
                let Some(resource) = compile_item(file, section, rt, item.text, line) else { return false };
                stats.compiled += 1;
                super::held(resource, line, &lines)
            }
        };
        found.push((new_key, cached));
    }
    // An entry takes the cell of the resource its text had unless another entry has that
    // text too (outside the edit, or earlier in it): a duplicate gets a cell of its own.
    let hits = found.iter().filter(|(k, _)| state.items.contains_key(k)).map(|(k, _)| *k);
    let outside = keys_among(hits, spans[..first].iter().chain(&spans[last + 1..]));
    let mut placed = Vec::with_capacity(found.len());
    for (k, (new_key, cached)) in found.into_iter().enumerate() {
        let own = !outside.contains(&new_key) && !placed.iter().any(|(key, _)| *key == new_key);
        let (index, line) = (spans[first + k].index, head.line + items[k].line);
        placed.push((new_key, super::place(cached, line, (section, index), &lines, own)));
    }
    let (head_start, head_line, doc) = (head.start, head.line, head.doc);
    let mut gone = Vec::new();
    for (k, ((new_key, cached), item)) in placed.into_iter().zip(&items).enumerate() {
        let span = &mut state.spans[first + k];
        span.slot = cached.resource.origin.line.slot_in(&lines);
        let Some(slot) = docs.get_mut(span.doc).and_then(|d| d.entries.get_mut(span.entry)) else { return false };
        let was = std::mem::replace(slot, cached.resource.clone());
        if !Arc::ptr_eq(&was, slot) {
            if span.key == new_key {
                changes.moved.push((was, slot.clone()));
            } else {
                changes.stale.push(was);
                changes.fresh.push(slot.clone());
            }
        }
        span.start = head_start + item.at;
        span.end = span.start + item.text.len();
        span.line = head_line + item.line;
        let old_key = std::mem::replace(&mut span.key, new_key);
        if old_key != new_key {
            gone.push(old_key);
        }
        state.items.insert(new_key, cached);
    }
    // Later entries move: their cells, one add each. An entry without one (it names no
    // line, or its line did not fit a cell) is placed again: a copy that says its line,
    // where it names one.
    let mut uncelled = Vec::new();
    let mut cells = lines.cells_mut();
    for (k, span) in state.spans.iter_mut().enumerate().skip(last + 1) {
        span.start = span.start.saturating_add_signed(grown);
        span.end = span.end.saturating_add_signed(grown);
        if moved == 0 {
            continue;
        }
        span.line = span.line.saturating_add_signed(moved);
        match span.slot.and_then(|s| cells.get_mut(s as usize)) {
            Some(cell) => *cell = u32::try_from(span.line).unwrap_or(*cell),
            None => uncelled.push(k),
        }
    }
    drop(cells);
    for k in uncelled {
        let span = &mut state.spans[k];
        let (section, _) = SECTIONS[span.section];
        let Some(cached) = state.items.get(&span.key).cloned() else { return false };
        let cached = super::place(cached, span.line, (section, span.index), &lines, true);
        span.slot = cached.resource.origin.line.slot_in(&lines);
        let Some(slot) = docs.get_mut(span.doc).and_then(|d| d.entries.get_mut(span.entry)) else { return false };
        let was = std::mem::replace(slot, cached.resource.clone());
        if !Arc::ptr_eq(&was, slot) {
            changes.moved.push((was, slot.clone()));
        }
        state.items.insert(span.key, cached);
    }
    if moved != 0 {
        for d in docs.iter_mut().skip(doc) {
            d.parsed.shift_lines_after(head_line, moved);
        }
    }
    // The old texts' entries go unless another entry has the same text.
    let still = keys_among(gone.iter().copied(), state.spans.iter());
    for k in gone.into_iter().filter(|k| !still.contains(k)) {
        state.items.remove(&k);
    }
    stats.patched += 1;
    true
}

/// Which of `keys` (the texts an edit touched) an entry of `spans` has: one pass, a
/// comparison per entry for the usual few keys, a set when an edit touched many (it may
/// touch thousands of a file's hundred thousand entries).
fn keys_among<'a>(keys: impl Iterator<Item = [u8; 16]>, spans: impl Iterator<Item = &'a Span>) -> HashSet<[u8; 16]> {
    let wanted: Vec<[u8; 16]> = keys.collect();
    if wanted.len() > 16 {
        let set: HashSet<[u8; 16]> = wanted.into_iter().collect();
        return spans.filter(|s| set.contains(&s.key)).map(|s| s.key).collect();
    }
    spans.filter(|s| wanted.contains(&s.key)).map(|s| s.key).collect()
}

/// `run` (the text of consecutive entries of one section, their dashes at `indent`) cut
/// into its entries; `None` unless it starts with an entry and every line after an
/// entry's first is indented deeper (or blank, or a comment), with no tab or directive
/// opening a line and no anchor or alias.
fn cut_run(run: &str, indent: usize) -> Option<Vec<NewItem<'_>>> {
    if super::has_anchor_or_alias(run) {
        return None;
    }
    let mut items: Vec<NewItem<'_>> = Vec::new();
    let (mut at, mut open) = (0usize, None::<(usize, usize)>);
    for (n, line) in run.split_inclusive('\n').enumerate() {
        let start = at;
        at += line.len();
        let bare = line.trim_end_matches(['\n', '\r']);
        let body = bare.trim_start_matches(' ');
        let spaces = bare.len() - body.len();
        if body.starts_with('\t') || body.starts_with('%') {
            return None;
        }
        if open.is_some() && (body.is_empty() || body.starts_with('#') || spaces > indent) {
            continue;
        }
        if spaces != indent || !(body == "-" || body.starts_with("- ")) {
            return None;
        }
        if let Some((s, l)) = open.replace((start, n)) {
            items.push(NewItem { at: s, line: l, text: &run[s..start] });
        }
    }
    let (s, l) = open?;
    items.push(NewItem { at: s, line: l, text: &run[s..] });
    Some(items)
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
    fn a_run_of_entries_cuts_where_entries_start() {
        fn texts(run: &str) -> Option<Vec<(usize, usize, &str)>> {
            cut_run(run, 2).map(|items| items.iter().map(|i| (i.at, i.line, i.text)).collect())
        }
        let two = texts("  - name: a\n    port: 1\n\n    # note\n  - name: b\n");
        assert_eq!(two, Some(vec![(0, 0, "  - name: a\n    port: 1\n\n    # note\n"), (36, 4, "  - name: b\n")]));
        assert_eq!(texts("  - name: a").map(|v| v.len()), Some(1), "no newline at the end");
        assert!(texts("    port: 1\n  - name: a\n").is_none(), "not an entry's start");
        assert!(texts("  - name: a\nroutes:\n").is_none(), "a section");
        assert!(texts("  - name: a\n---\n").is_none(), "a document");
        assert!(texts("  - name: &x a\n").is_none(), "an anchor");
        assert!(texts("  - name: a\n\t x: 1\n").is_none(), "a tab");
        assert!(texts("  - name: a\n - name: b\n").is_none(), "a dash less indented");
        assert!(texts("").is_none(), "nothing");
    }
}
