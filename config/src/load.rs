//! Reading a config file, or a directory of `*.yaml` / `*.yml` files, and parsing each
//! into the schema types with positions kept for later errors.

use std::path::{Path, PathBuf};

use crate::{
    error::{ConfigError, ConfigErrors},
    lines::LineIndex,
    model::{Document, SCHEMA_VERSION},
};

pub use crate::parsed::{config_dir, nesting_bound, ParsedFile, MAX_FILE_BYTES, MAX_NESTING};

/// The files `path` stands for: itself, or the YAML files directly inside it, by name.
pub fn config_files(path: &Path) -> Result<Vec<PathBuf>, ConfigErrors> {
    let io_err = |e: std::io::Error| ConfigError {
        file: path.to_path_buf(),
        line: None,
        path: String::new(),
        message: format!("cannot read: {e}"),
    };
    if !path.is_dir() {
        // (Whether it is a regular file is checked where it is opened: `read_bounded`.)
        std::fs::metadata(path).map_err(io_err)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut unreadable = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io_err)? {
        let p = entry.map_err(io_err)?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if !yaml || name.starts_with('.') {
            continue;
        }
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => files.push(p),
            // A config file that cannot be read must not drop its resources silently: a
            // broken or looping symlink, a FIFO, a directory named *.yaml.
            Ok(_) => unreadable.push((p, "not a regular file".to_owned())),
            Err(e) => unreadable.push((p, format!("cannot read: {e}"))),
        }
    }
    if !unreadable.is_empty() {
        return Err(ConfigErrors(
            unreadable
                .into_iter()
                .map(|(file, message)| ConfigError { file, line: None, path: String::new(), message })
                .collect(),
        ));
    }
    files.sort();
    if files.is_empty() {
        return Err(io_err(std::io::Error::other("directory holds no *.yaml or *.yml file")).into());
    }
    Ok(files)
}

/// Reads and parses every file, collecting every error.
pub fn parse_all(path: &Path) -> Result<Vec<ParsedFile>, ConfigErrors> {
    parse_all_with(path, MAX_FILE_BYTES)
}

/// `parse_all`, reading no file larger than `max_file_bytes`.
pub fn parse_all_with(path: &Path, max_file_bytes: u64) -> Result<Vec<ParsedFile>, ConfigErrors> {
    let mut parsed = Vec::new();
    let mut errors = Vec::new();
    for file in config_files(path)? {
        match read_bounded(&file, max_file_bytes) {
            Ok(text) => {
                for (offset, doc) in documents(&text) {
                    match parse_document(&file, offset, doc) {
                        Ok(p) => parsed.push(p),
                        Err(es) => errors.extend(es),
                    }
                }
            }
            Err(e) => {
                errors.push(ConfigError { file, line: None, path: String::new(), message: format!("cannot read: {e}") })
            }
        }
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Document `doc` of `file`, `offset` lines into it: Filterplane's schema or Istio's.
pub fn parse_document(file: &Path, offset: usize, doc: &str) -> Result<ParsedFile, Vec<ConfigError>> {
    let result = if crate::istio::is_istio(doc) {
        crate::istio::parse(file, doc).map_err(|e| e.0)
    } else {
        parse_file(file, doc).map_err(|e| vec![e])
    };
    match result {
        Ok(mut p) => {
            p.lines = std::mem::take(&mut p.lines).with_offset(offset);
            p.span = p.span.start + offset..p.span.end + offset;
            Ok(p)
        }
        Err(es) => Err(es
            .into_iter()
            .map(|mut e| {
                e.line = e.line.map(|l| l + offset);
                e
            })
            .collect()),
    }
}

/// The YAML documents of a file (separated by `---` lines), each with the number of
/// lines before it. Documents holding only comments are skipped; a file of nothing but
/// comments is one (empty) document, so it still gets its error.
pub fn documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let (mut start, mut start_line) = (0usize, 0usize);
    let mut at = 0usize;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare == "---" || bare.starts_with("--- ") {
            docs.push((start_line, &text[start..at]));
            start = at + line.len();
            start_line = n + 1;
        }
        at += line.len();
    }
    docs.push((start_line, &text[start..]));
    let content = |d: &str| d.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let kept: Vec<(usize, &str)> = docs.iter().copied().filter(|(_, d)| content(d)).collect();
    if kept.is_empty() {
        return vec![(0, text)];
    }
    kept
}

/// A regular file's text, at most `max` bytes.
pub(crate) fn read_bounded(file: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    // A FIFO or a device would block the read forever (or never end).
    if !std::fs::metadata(file)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    // Sized for the file as opened (no regrowing copies: a 22 MB file read into a growing
    // string costs about twice the read itself), bounded by `max`.
    let f = std::fs::File::open(file)?;
    let len = f.metadata().map_or(0, |m| m.len()).min(max.saturating_add(1));
    let mut text = String::with_capacity(usize::try_from(len).unwrap_or(0).saturating_add(1));
    f.take(max.saturating_add(1)).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than the limit of {max} bytes (--max-config-bytes)")));
    }
    Ok(text)
}

/// Parses one document of `text`, read from `file`.
pub fn parse_file(file: &Path, text: &str) -> Result<ParsedFile, ConfigError> {
    // Refused before any recursive parser sees it: those would overflow their stack (block
    // nesting) or take seconds (flow nesting) on a document nested thousands deep.
    if let Err(line) = nesting_bound(text) {
        return Err(ConfigError {
            file: file.to_path_buf(),
            line: Some(line),
            path: String::new(),
            message: format!(
                "nested deeper than {MAX_NESTING} levels (indentation, sequence dashes and brackets); refused unparsed"
            ),
        });
    }
    let lines = LineIndex::build(text);
    if let Some((path, line)) = &lines.duplicate {
        return Err(ConfigError {
            file: file.to_path_buf(),
            line: Some(*line),
            path: path.clone(),
            message: "duplicate key (the later one would silently replace the earlier)".into(),
        });
    }
    let de = serde_yaml::Deserializer::from_str(text);
    let doc: Document = serde_path_to_error::deserialize(de).map_err(|e| {
        let mut path = e.path().to_string();
        // serde_path_to_error writes `?` for a position it could not name (a syntax
        // error inside a value): keep the part it could.
        if let Some(i) = path.find('?') {
            path.truncate(i);
            path = path.trim_end_matches('.').to_owned();
        }
        let inner = e.into_inner();
        let mut line = inner.location().map(|l| l.line()).or_else(|| lines.line_of(&path));
        let mut message = inner.to_string();
        // Errors the YAML scanner words with a byte position (a control character) or
        // without a place (a second document): find their line in the text.
        if let Some(at) = message.split(" at position ").nth(1).and_then(|p| p.trim().parse::<usize>().ok()) {
            line = Some(text.as_bytes().iter().take(at).filter(|b| **b == b'\n').count() + 1);
        }
        if message.contains("more than one document") {
            let mut content = false;
            for (n, l) in text.lines().enumerate() {
                if content && (l == "---" || l.starts_with("--- ")) {
                    line = Some(n + 1);
                    message = "a second YAML document starts here; put each config in its own file".into();
                    break;
                }
                content |= !l.trim().is_empty() && !l.trim_start().starts_with('#') && !l.starts_with("---");
            }
        }
        // serde_yaml appends its own "at line L column C" and may prefix the path; both
        // are shown separately.
        if let Some(i) = message.find(" at line ") {
            message.truncate(i);
        }
        if let Some(rest) = message.strip_prefix(&format!("{path}: ")) {
            message = rest.to_owned();
        }
        ConfigError { file: file.to_path_buf(), line, path: if path == "." { String::new() } else { path }, message }
    })?;
    let parsed = ParsedFile { path: file.to_path_buf(), doc, lines, span: 1..text.lines().count() + 2 };
    if parsed.doc.version != SCHEMA_VERSION {
        return Err(parsed.error(
            "version",
            format!(
                "unsupported schema version {}; this Filterplane reads version {SCHEMA_VERSION}",
                parsed.doc.version
            ),
        ));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_before_any_parser_recurses() {
        // 10,000 levels of block sequences and 200,000 of flow brackets: each parsed on a
        // thread with a 128 KiB stack, which a recursive parser would overflow.
        let block = format!("version: 1\nx:\n{}1\n", "- ".repeat(10_000));
        let flow = format!("version: 1\nx: {}\n", "[".repeat(200_000));
        let json = format!("version: 1\nx: {}1{}\n", "{\"a\": ".repeat(100_000), "}".repeat(100_000));
        for (what, text) in [("block", block), ("flow", flow), ("json", json)] {
            let e = std::thread::Builder::new()
                .stack_size(128 << 10)
                .spawn(move || parse_file(Path::new("deep.yaml"), &text).unwrap_err())
                .unwrap()
                .join()
                .unwrap();
            assert!(e.message.contains("nested deeper than 1000 levels"), "{what}: {e}");
            assert!(e.line.is_some(), "{what}: the line is named");
        }
    }

    #[test]
    fn ordinary_nesting_and_brackets_in_strings_pass_the_bound() {
        let text = "version: 1\nextension_configs:\n  - name: a\n    typed_config: { \"@type\": x, v: \"[[[{{{\" , w: '[[[''[' } # [[[\n";
        assert!(nesting_bound(text).unwrap() < 20);
        assert_eq!(nesting_bound(&"  ".repeat(600)), Err(1), "1,200 columns of indentation");
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.yaml");
        std::fs::write(&file, format!("version: 1\n# {}\n", "x".repeat(2000))).unwrap();
        let e = parse_all_with(&file, 1000).unwrap_err();
        assert!(e.0[0].message.contains("larger than the limit of 1000 bytes"), "{e}");
        assert!(parse_all_with(&file, 4000).is_ok());
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("filterplane.yaml");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        let e = parse_all(&fifo).unwrap_err();
        assert!(e.0[0].message.contains("not a regular file"), "{e}");
    }

    #[test]
    fn broken_and_looping_symlinks_in_a_directory_are_errors_not_silence() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "version: 1\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone.yaml"), dir.path().join("b.yaml")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("c.yaml"), dir.path().join("c.yaml")).unwrap();
        let e = config_files(dir.path()).unwrap_err();
        let named: Vec<String> = e.0.iter().map(|e| e.file.display().to_string()).collect();
        assert!(named.iter().any(|f| f.ends_with("b.yaml")) && named.iter().any(|f| f.ends_with("c.yaml")), "{e}");
        assert!(e.0.iter().all(|e| e.message.starts_with("cannot read")), "{e}");
    }

    #[test]
    fn errors_without_a_place_get_their_line_from_the_text() {
        let nul = "version: 1\nextension_configs:\n  - name: a\n    typed_config: {}\n  - name: b\0\n";
        let e = parse_file(Path::new("n.yaml"), nul).unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        let two = "# leading comment\n---\nversion: 1\nextension_configs: []\n---\nversion: 1\n";
        let e = parse_file(Path::new("m.yaml"), two).unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("second YAML document"), "{e}");
        // Read as a file, its documents are taken one by one.
        let docs = documents(two);
        assert_eq!(docs.iter().map(|(o, _)| *o).collect::<Vec<_>>(), [2, 5]);
        assert_eq!(documents("# only a comment\n"), [(0, "# only a comment\n")]);
    }

    #[test]
    fn later_documents_count_their_lines_from_the_top_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "version: 1\n---\nversion: 1\nextension_configs:\n  - name: a\n    typed_config: 3\n")
            .unwrap();
        let e = crate::load(&f).unwrap_err();
        assert_eq!(e.0[0].line, Some(6), "{e}");
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        assert_eq!(config_dir(Path::new("plugins.yaml")), Path::new("."));
        assert_eq!(config_dir(Path::new("conf/plugins.yaml")), Path::new("conf"));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(config_dir(dir.path()), dir.path(), "a config directory is its own");
    }
}
