//! Reading a config file, or a directory of `*.yaml` / `*.yml` files, and parsing each
//! into the schema types with positions kept for later errors.

use std::path::{Path, PathBuf};

use crate::{
    error::{ConfigError, ConfigErrors},
    lines::LineIndex,
    model::{Document, SCHEMA_VERSION},
};

/// One parsed file: the document and where each of its nodes sits.
#[derive(Debug)]
pub struct ParsedFile {
    pub path: PathBuf,
    pub doc: Document,
    pub lines: LineIndex,
}

impl ParsedFile {
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

/// The files `path` stands for: itself, or the YAML files directly inside it, by name.
pub fn config_files(path: &Path) -> Result<Vec<PathBuf>, ConfigErrors> {
    let io_err = |e: std::io::Error| ConfigError {
        file: path.to_path_buf(),
        line: None,
        path: String::new(),
        message: format!("cannot read: {e}"),
    };
    if !path.is_dir() {
        std::fs::metadata(path).map_err(io_err)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io_err)? {
        let p = entry.map_err(io_err)?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if yaml && !name.starts_with('.') && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(io_err(std::io::Error::other("directory holds no *.yaml or *.yml file")).into());
    }
    Ok(files)
}

/// Reads and parses every file, collecting every error.
pub fn parse_all(path: &Path) -> Result<Vec<ParsedFile>, ConfigErrors> {
    let mut parsed = Vec::new();
    let mut errors = Vec::new();
    for file in config_files(path)? {
        match std::fs::read_to_string(&file) {
            Ok(text) => match parse_file(&file, &text) {
                Ok(p) => parsed.push(p),
                Err(e) => errors.push(e),
            },
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

/// Parses one document of `text`, read from `file`.
pub fn parse_file(file: &Path, text: &str) -> Result<ParsedFile, ConfigError> {
    let lines = LineIndex::build(text);
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
        let line = inner.location().map(|l| l.line()).or_else(|| lines.line_of(&path));
        let mut message = inner.to_string();
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
    let parsed = ParsedFile { path: file.to_path_buf(), doc, lines };
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
    fn a_bare_file_name_lives_in_the_current_directory() {
        assert_eq!(config_dir(Path::new("plugins.yaml")), Path::new("."));
        assert_eq!(config_dir(Path::new("conf/plugins.yaml")), Path::new("conf"));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(config_dir(dir.path()), dir.path(), "a config directory is its own");
    }
}
