//! `serve --settings FILE`: the flags of `serve` kept in one reviewed YAML file, keyed by
//! the flags' own names (`max-streams-per-connection: 64`), and `serve --print-settings`:
//! every value in effect and where it came from.
//!
//! Precedence: the command line, then `FILTERPLANE_*` variables, then the file, then the
//! defaults. The file is read once, checked like a config (an unknown key, a value of the
//! wrong kind or one its flag refuses is an error naming the file and the line), and each
//! of its entries whose flag was not given otherwise becomes that flag, so clap checks
//! what it checks for the command line (`requires`, ranges) the same way.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{parser::ValueSource, ArgAction, ArgMatches, Command};
use filterplane_config::lines::LineIndex;

/// Largest settings file read: a file of every flag is a few KiB.
pub const MAX_SETTINGS_FILE_BYTES: u64 = 1 << 20;

/// Flags of `serve` a settings file may not hold: the file itself, and actions.
const NOT_SETTINGS: &[&str] = &["settings", "print-settings", "help"];

/// One entry of the file, as the flag it stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The flag's long name (the key).
    pub key: String,
    /// The line of the key.
    pub line: usize,
    /// Its values, as they would follow `--key` (none for a flag that is on).
    pub values: Vec<OsString>,
}

/// A read and checked settings file.
#[derive(Debug, Clone)]
pub struct SettingsFile {
    pub path: PathBuf,
    pub entries: Vec<Entry>,
}

impl SettingsFile {
    /// Reads and checks `path` against `serve`'s flags. Relative paths in it are relative
    /// to the file's directory, as in a config.
    pub fn read(path: &Path, serve: &Command) -> Result<Self, String> {
        let shown = path.display();
        let size = std::fs::metadata(path).map_err(|e| format!("{shown}: cannot read the settings file: {e}"))?.len();
        if size > MAX_SETTINGS_FILE_BYTES {
            return Err(format!(
                "{shown}: the settings file is {size} bytes, more than the {MAX_SETTINGS_FILE_BYTES} read"
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: cannot read the settings file: {e}"))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base, serve)
    }

    /// Checks `text` (the contents of `path`) against `serve`'s flags.
    pub fn parse(text: &str, path: &Path, base: &Path, serve: &Command) -> Result<Self, String> {
        let shown = path.display();
        let lines = LineIndex::build(text);
        if let Some((key, line)) = &lines.duplicate {
            return Err(format!("{shown}:{line}: {key}: written twice; keep one"));
        }
        let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| match e.location() {
            Some(at) => format!("{shown}:{}: not YAML: {e}", at.line()),
            None => format!("{shown}: not YAML: {e}"),
        })?;
        let map = match value {
            serde_yaml::Value::Null => serde_yaml::Mapping::new(),
            serde_yaml::Value::Mapping(m) => m,
            _ => return Err(format!("{shown}:1: a settings file is a mapping of flag names to values")),
        };
        let mut entries = Vec::new();
        for (k, v) in map {
            let Some(key) = k.as_str().map(str::to_owned) else {
                return Err(format!("{shown}: a key that is not a string: {}", scalar_text(&k).unwrap_or_default()));
            };
            let line = lines.line_of(&key).unwrap_or(1);
            let at = format!("{shown}:{line}: {key}");
            let arg = serve
                .get_arguments()
                .find(|a| a.get_long() == Some(key.as_str()) && !NOT_SETTINGS.contains(&key.as_str()));
            let Some(arg) = arg else {
                let dashed = key.replace('_', "-");
                let hint = if NOT_SETTINGS.contains(&key.as_str()) {
                    " (a flag of the command line only)".to_owned()
                } else if dashed != key && serve.get_arguments().any(|a| a.get_long() == Some(dashed.as_str())) {
                    format!(" (the flag is written `{dashed}`)")
                } else {
                    " (keys are the long flags of `filterplane serve --help`, without the dashes)".to_owned()
                };
                return Err(format!("{at}: not a setting{hint}"));
            };
            let flag = matches!(arg.get_action(), ArgAction::SetTrue);
            let many = matches!(arg.get_action(), ArgAction::Append);
            let is_path = arg.get_value_parser().type_id() == std::any::TypeId::of::<PathBuf>();
            let values: Vec<OsString> = match (&v, flag) {
                (serde_yaml::Value::Bool(on), true) => {
                    if !on {
                        // Off is the default of every on/off flag: nothing to pass.
                        continue;
                    }
                    Vec::new()
                }
                (_, true) => return Err(format!("{at}: true or false")),
                (serde_yaml::Value::Sequence(items), false) => {
                    if !many {
                        return Err(format!("{at}: one value, not a list"));
                    }
                    items
                        .iter()
                        .map(|i| scalar_text(i).ok_or_else(|| format!("{at}: a list of plain values")))
                        .collect::<Result<Vec<_>, _>>()?
                        .into_iter()
                        .map(OsString::from)
                        .collect()
                }
                (v, false) => vec![OsString::from(scalar_text(v).ok_or_else(|| format!("{at}: a plain value"))?)],
            };
            let values: Vec<OsString> = if is_path {
                values.into_iter().map(|v| base.join(PathBuf::from(v)).into_os_string()).collect()
            } else {
                values
            };
            for value in &values {
                check_value(arg, &key, value).map_err(|why| format!("{at}: {why}"))?;
            }
            entries.push(Entry { key, line, values });
        }
        Ok(Self { path: path.to_owned(), entries })
    }

    /// The command-line words of the entries whose flag `given` says was not set on the
    /// command line or by its variable.
    pub fn args(&self, given: impl Fn(&str) -> bool) -> Vec<OsString> {
        let mut out = Vec::new();
        for e in self.entries.iter().filter(|e| !given(&e.key)) {
            if e.values.is_empty() {
                out.push(OsString::from(format!("--{}", e.key)));
            }
            for v in &e.values {
                let mut word = OsString::from(format!("--{}=", e.key));
                word.push(v);
                out.push(word);
            }
        }
        out
    }
}

/// A YAML scalar as the text a flag takes.
fn scalar_text(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Whether the flag's own parser takes `value`: clap's message, without its usage lines.
fn check_value(arg: &clap::Arg, key: &str, value: &OsString) -> Result<(), String> {
    let alone = arg
        .clone()
        .required(false)
        .requires(clap::builder::Resettable::Reset)
        .env(None)
        .default_value(None)
        .num_args(1);
    let mut word = OsString::from(format!("--{key}="));
    word.push(value);
    Command::new("settings")
        .no_binary_name(true)
        .disable_help_flag(true)
        .disable_version_flag(true)
        .arg(alone)
        .try_get_matches_from([word])
        .map(|_| ())
        .map_err(|e| {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            // "invalid value 'x' for '--flag <FLAG>': why": the key already names the flag.
            match (first.find(" for '--"), first.find("': ")) {
                (Some(from), Some(to)) if from < to => format!("{}{}", &first[..from], &first[to + 1..]),
                _ => first.to_owned(),
            }
        })
}

/// Where a value in effect came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    CommandLine,
    Environment(String),
    File(PathBuf, usize),
    Default,
    Unset,
}

/// `serve --print-settings`: every flag of `serve` with its value in effect, as a settings
/// file (so it can start one), each line saying where the value came from.
pub fn report(serve_cmd: &Command, matches: &ArgMatches, file: Option<&SettingsFile>, from_file: &[String]) -> String {
    let mut out = String::from("# The settings of `filterplane serve` in effect, and where each came from.\n");
    out.push_str("# Precedence: command line, then FILTERPLANE_* variables, then --settings FILE, then defaults.\n");
    for arg in serve_cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_SETTINGS.contains(&long) {
            continue;
        }
        let id = arg.get_id().as_str();
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => match file.filter(|_| from_file.iter().any(|k| k == long)) {
                Some(f) => {
                    let line = f.entries.iter().find(|e| e.key == long).map(|e| e.line).unwrap_or(1);
                    Source::File(f.path.clone(), line)
                }
                None => Source::CommandLine,
            },
            Some(ValueSource::EnvVariable) => {
                Source::Environment(arg.get_env().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default())
            }
            Some(ValueSource::DefaultValue) => Source::Default,
            _ => Source::Unset,
        };
        let values: Vec<String> =
            matches.get_raw(id).map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect()).unwrap_or_default();
        let flag = matches!(arg.get_action(), ArgAction::SetTrue);
        let value = if flag {
            matches.get_flag(id).to_string()
        } else if matches!(arg.get_action(), ArgAction::Append) {
            format!("[{}]", values.iter().map(|v| yaml_scalar(v)).collect::<Vec<_>>().join(", "))
        } else {
            values.first().map(|v| yaml_scalar(v)).unwrap_or_default()
        };
        let unset = source == Source::Unset;
        let from = match source {
            Source::CommandLine => "command line".to_owned(),
            Source::Environment(var) => format!("environment ({var})"),
            Source::File(path, line) => format!("settings file {}:{line}", path.display()),
            Source::Default => "default".to_owned(),
            Source::Unset => "not set".to_owned(),
        };
        if unset && !flag && values.is_empty() {
            out.push_str(&format!("# {long}:  # {from}\n"));
        } else {
            out.push_str(&format!("{long}: {value}  # {from}\n"));
        }
    }
    out
}

/// `v` written so YAML reads it back as the same text.
fn yaml_scalar(v: &str) -> String {
    let plain = !v.is_empty()
        && matches!(serde_yaml::from_str::<serde_yaml::Value>(v), Ok(ref p) if scalar_text(p).as_deref() == Some(v))
        && !v.contains(": ")
        && !v.contains(" #")
        && !v.contains(',')
        && !v.starts_with(['[', '{', '*', '&', '!', '|', '>', '\'', '"', '%', '@', '`', '#']);
    if plain {
        v.to_owned()
    } else {
        format!("'{}'", v.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn serve() -> Command {
        crate::args::Cli::command().find_subcommand("serve").cloned().expect("serve")
    }

    fn parse(text: &str) -> Result<SettingsFile, String> {
        SettingsFile::parse(text, Path::new("/etc/fp/settings.yaml"), Path::new("/etc/fp"), &serve())
    }

    #[test]
    fn entries_become_the_flags_they_name() {
        let f = parse(
            "# reviewed\nmax-streams-per-connection: 64\nxds-addr: 0.0.0.0:18000\nmetrics-public: true\n\
             sensitive-to-authenticated-only: false\ninsecure-registry: [a:5000, b:5000]\nconfig: conf/\n\
             state-dir: /var/lib/fp\n",
        )
        .expect("valid");
        let words: Vec<String> = f.args(|_| false).into_iter().map(|w| w.into_string().expect("utf-8")).collect();
        assert_eq!(
            words,
            [
                "--max-streams-per-connection=64",
                "--xds-addr=0.0.0.0:18000",
                "--metrics-public",
                "--insecure-registry=a:5000",
                "--insecure-registry=b:5000",
                "--config=/etc/fp/conf/",
                "--state-dir=/var/lib/fp",
            ]
        );
        assert_eq!(f.entries[0].line, 2);
        // What the command line or a variable set is left out.
        let words = f.args(|k| k == "xds-addr" || k == "config");
        assert_eq!(words.len(), 5);
    }

    #[test]
    fn mistakes_name_the_file_and_line() {
        let cases = [
            ("xds-addr: 127.0.0.1:1\nmax-streams: 5\n", "/etc/fp/settings.yaml:2: max-streams: not a setting"),
            ("max_streams_per_connection: 5\n", "(the flag is written `max-streams-per-connection`)"),
            (
                "\n\nmax-removal-percent: 200\n",
                "settings.yaml:3: max-removal-percent: invalid value '200': 200 is not in 0..=100",
            ),
            ("max-streams-per-connection: many\n", ":1: max-streams-per-connection: invalid value 'many'"),
            ("metrics-public: yes please\n", ":1: metrics-public: true or false"),
            ("xds-addr: [a, b]\n", ":1: xds-addr: one value, not a list"),
            ("xds-addr: {a: b}\n", ":1: xds-addr: a plain value"),
            ("xds-addr: 1\nxds-addr: 2\n", ":2: xds-addr: written twice"),
            ("settings: other.yaml\n", ":1: settings: not a setting (a flag of the command line only)"),
            ("- a\n- b\n", ":1: a settings file is a mapping"),
            ("a: [\n", "not YAML"),
            ("xds-client-auth: sometimes\n", ":1: xds-client-auth: invalid value 'sometimes'"),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains("Usage"), "{err}");
        }
        assert!(parse("").expect("empty").entries.is_empty());
    }

    #[test]
    fn every_setting_is_written_back_so_yaml_reads_the_same() {
        for v in ["64", "0.0.0.0:18000", "a b", "x: y", "1,2", "", "it's", "#x", "true", "[a]"] {
            let doc = format!("k: {}", yaml_scalar(v));
            let back: serde_yaml::Value = serde_yaml::from_str(&doc).expect("yaml");
            assert_eq!(back.get("k").and_then(scalar_text).as_deref(), Some(v), "{doc}");
        }
    }
}
