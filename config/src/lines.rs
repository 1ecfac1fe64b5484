//! Where each node of a YAML document sits: a map from document path
//! (`extension_configs[0].typed_config.mutations`) to its 1-based line, so errors found
//! after serde has dropped positions can still name a line.

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

#[derive(Debug, Default)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
    /// The first key written twice in one mapping, with its second line: serde would keep
    /// the last one without a word.
    pub duplicate: Option<(String, usize)>,
    /// Lines before this document in its file (documents after a `---`).
    offset: usize,
    /// For documents converted from another form (Istio's): a path of the converted
    /// config (`wasm_plugins[0]`) and the path it came from (`spec`).
    aliases: Vec<(String, String)>,
}

impl LineIndex {
    /// Indexes `text`; a document that does not parse gives an empty index (serde reports
    /// the syntax error with its own position).
    pub fn build(text: &str) -> Self {
        let mut rx = Receiver::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut rx, false).is_err() {
            return Self::default();
        }
        Self { lines: rx.lines, duplicate: rx.duplicate, ..Default::default() }
    }

    /// Counts lines from `offset` lines into the file (its later documents).
    pub fn with_offset(mut self, offset: usize) -> Self {
        self.offset = offset;
        if let Some((_, line)) = &mut self.duplicate {
            *line += offset;
        }
        self
    }

    /// Lines after `after` (1-based, in the file) moved by `by`, as when lines were added
    /// or removed before them: a document wholly after it moves, and in the one that holds
    /// it, what lies after it.
    pub fn shift_after(&mut self, after: usize, by: isize) {
        let moved = |l: usize| l.checked_add_signed(by).unwrap_or(0);
        if self.offset >= after {
            self.offset = moved(self.offset);
        } else {
            let offset = self.offset;
            for l in self.lines.values_mut().filter(|l| **l + offset > after) {
                *l = moved(*l);
            }
        }
        if let Some((_, l)) = self.duplicate.as_mut().filter(|(_, l)| *l > after) {
            *l = moved(*l);
        }
    }

    /// Paths of a converted document: `from` (and what is under it) is where `to` was
    /// written in the original.
    pub fn alias(&mut self, from: impl Into<String>, to: impl Into<String>) {
        self.aliases.push((from.into(), to.into()));
    }

    /// `path` as the original wrote it (see `alias`).
    pub fn original_path(&self, path: &str) -> String {
        let best = self
            .aliases
            .iter()
            .filter(|(from, _)| {
                path == from || path.starts_with(&format!("{from}.")) || path.starts_with(&format!("{from}["))
            })
            .max_by_key(|(from, _)| from.len());
        match best {
            Some((from, to)) => format!("{to}{}", &path[from.len()..]),
            None => path.to_owned(),
        }
    }

    /// The line of `path`, or of its nearest indexed ancestor (a path into a field that
    /// does not exist points at its parent).
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let original = self.original_path(path);
        let mut p = original.as_str();
        loop {
            if let Some(l) = self.lines.get(p) {
                return Some(*l + self.offset);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

enum Frame {
    Map { key: Option<String>, seen: std::collections::HashSet<String> },
    Seq { index: usize },
}

#[derive(Default)]
struct Receiver {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
    duplicate: Option<(String, usize)>,
}

impl Receiver {
    fn path(&self) -> String {
        let mut s = String::new();
        for f in &self.stack {
            match f {
                Frame::Map { key: Some(k), .. } => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Frame::Map { key: None, .. } => {}
                Frame::Seq { index } => s.push_str(&format!("[{index}]")),
            }
        }
        s
    }

    /// Called when a node (scalar or container) begins. Returns true if it was a map key.
    fn begin_node(&mut self, key_text: Option<&str>, mark: Marker) -> bool {
        if let Some(Frame::Map { key, seen }) = self.stack.last_mut() {
            if key.is_none() {
                let text = key_text.unwrap_or("?").to_owned();
                // `<<` merges another mapping in: repeating it is no duplicate.
                let again = text != "<<" && key_text.is_some() && !seen.insert(text.clone());
                *key = Some(text);
                let p = self.path();
                if again && self.duplicate.is_none() {
                    self.duplicate = Some((p.clone(), mark.line()));
                }
                self.lines.insert(p, mark.line());
                return true;
            }
        }
        let p = self.path();
        self.lines.entry(p).or_insert(mark.line());
        false
    }

    /// Called when a value node has ended: move the parent on to its next entry.
    fn end_value(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { key, .. }) => *key = None,
            Some(Frame::Seq { index }) => *index += 1,
            None => {}
        }
    }
}

impl MarkedEventReceiver for Receiver {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(s, ..) if !self.begin_node(Some(&s), mark) => {
                self.end_value();
            }
            Event::Alias(_) if !self.begin_node(None, mark) => {
                self.end_value();
            }
            Event::MappingStart(..) => {
                self.begin_node(None, mark);
                self.stack.push(Frame::Map { key: None, seen: Default::default() });
            }
            Event::SequenceStart(..) => {
                self.begin_node(None, mark);
                self.stack.push(Frame::Seq { index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.end_value();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_lines_of_keys_sequence_items_and_flow_mappings() {
        let text = "version: 1\nextension_configs:\n  - name: a\n    typed_config:\n      \"@type\": t\n      mutations: { response_mutations: [ { append: {} } ] }\n  - name: b\n";
        let idx = LineIndex::build(text);
        assert_eq!(idx.line_of("version"), Some(1));
        assert_eq!(idx.line_of("extension_configs[0].name"), Some(3));
        assert_eq!(idx.line_of("extension_configs[0].typed_config.@type"), Some(5));
        assert_eq!(idx.line_of("extension_configs[0].typed_config.mutations.response_mutations[0].append"), Some(6));
        assert_eq!(idx.line_of("extension_configs[1].name"), Some(7));
        assert_eq!(idx.line_of("extension_configs[1].nope.deeper"), Some(7));
        assert_eq!(idx.duplicate, None);
    }

    #[test]
    fn a_key_written_twice_in_one_mapping_is_found() {
        let text = "version: 1\nextension_configs:\n  - name: a\n    typed_config:\n      \"@type\": t\n      value: 1\n      value: 2\n";
        let idx = LineIndex::build(text);
        assert_eq!(idx.duplicate, Some(("extension_configs[0].typed_config.value".to_string(), 7)));
        let flow = LineIndex::build("a: { b: 1, b: 2 }\n");
        assert_eq!(flow.duplicate.map(|d| d.0), Some("a.b".to_string()));
        assert_eq!(LineIndex::build("a: { b: 1 }\nc: { b: 2 }\n").duplicate, None, "one key per mapping");
    }
}
