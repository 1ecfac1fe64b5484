//! One parsed file, and the bounds every file is read under: a leaf that loading, the
//! Istio reader and the compiler all use (so none of them imports another for it).

use std::path::{Path, PathBuf};

use crate::{error::ConfigError, lines::LineIndex, model::Document};

/// One parsed file: the document and where each of its nodes sits.
#[derive(Debug)]
pub struct ParsedFile {
    pub path: PathBuf,
    pub doc: Document,
    pub lines: LineIndex,
    /// The lines of the file this document takes (a file may hold several, after `---`).
    pub span: std::ops::Range<usize>,
}

impl ParsedFile {
    /// Its lines after `after` (1-based, in the file) moved by `by`: lines were added or
    /// removed before them, as an edit of an entry at `after` did.
    pub fn shift_lines_after(&mut self, after: usize, by: isize) {
        let moved = |l: usize| if l > after { l.checked_add_signed(by).unwrap_or(0) } else { l };
        self.lines.shift_after(after, by);
        self.span = moved(self.span.start)..moved(self.span.end);
    }

    /// An error at `path` inside this file, with the line looked up.
    pub fn error(&self, path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let path = path.into();
        ConfigError { file: self.path.clone(), line: self.lines.line_of(&path), path, message: message.into() }
    }
}

/// The directory a config path lives in: the path itself for a config directory, else
/// the file's parent. A bare file name (`plugins.yaml`) has the empty path as its parent,
/// which is no directory at all: that is `.`.
pub fn config_dir(path: &Path) -> &Path {
    if path.is_dir() {
        return path;
    }
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Nesting a config may have, counted as `nesting_bound` counts it. Real Envoy configs
/// stay far below (serde_yaml itself refuses more than 128 levels); the YAML parsers
/// recurse once per level, and a document nested thousands deep overflows their stack.
pub const MAX_NESTING: usize = 1000;

/// Largest config file read, in bytes, unless told otherwise (`parse_all_with`).
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// An upper bound of how deep `text` nests, found in one pass without parsing: per line,
/// its indentation plus the sequence dashes that open it plus the open flow brackets
/// (outside quotes and comments). Stops counting past `MAX_NESTING`, and returns the
/// 1-based line where the bound was first exceeded.
pub fn nesting_bound(text: &str) -> Result<usize, usize> {
    let mut flow = 0usize;
    let mut deepest = 0usize;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let mut rest = &line[indent..];
        let mut dashes = 0;
        while let Some(r) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("-\t")) {
            dashes += 1;
            rest = r.trim_start_matches([' ', '\t']);
        }
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        let mut line_max = flow;
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match (quote, c) {
                (Some('"'), '\\') => {
                    chars.next();
                }
                (Some(q), c) if c == q => {
                    // '' inside a single-quoted string is an escaped quote.
                    if q == '\'' && chars.peek() == Some(&'\'') {
                        chars.next();
                    } else {
                        quote = None;
                    }
                }
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if prev == ' ' || prev == '\t' => break,
                (None, '[' | '{') => {
                    flow += 1;
                    line_max = line_max.max(flow);
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
        deepest = deepest.max(indent + dashes + line_max);
        if deepest > MAX_NESTING {
            return Err(n + 1);
        }
    }
    Ok(deepest)
}
