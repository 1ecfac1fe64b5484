//! The "Limits and hardening" table and metrics list of docs/operations.md are checked against the
//! code: every bound in `settings::bounds` with its default, and every `limit` label the
//! code counts. (Labels chosen in a branch, as the output bounds', are read by eye.)

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).unwrap()
}

/// Every bound the settings hold (`settings::bounds`) has its row in the README's limits
/// table, and the row states the default the code has. (The binary's tests check that
/// every bound flag is among them.)
#[test]
fn the_readme_limits_table_states_every_bound_and_its_default() {
    let text = readme();
    let start = text.find("## Limits and hardening").expect("the limits section");
    let table: Vec<&str> =
        text[start..].lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')).collect();
    let mut wrong = Vec::new();
    for bound in filterplane_server::settings::bounds() {
        let key = if bound.flag { format!("`{}`", bound.key) } else { bound.key.to_owned() };
        let rows: Vec<&&str> = table.iter().filter(|row| row.contains(&key)).collect();
        // The default is a row's second column; a flag may share a row with others.
        let defaults: Vec<&str> = rows.iter().map(|row| row.split('|').nth(2).unwrap_or_default().trim()).collect();
        if rows.is_empty() {
            wrong.push(format!("{key}: no row"));
        } else if !defaults.iter().any(|d| d.contains(&bound.default)) {
            wrong.push(format!("{key}: docs/operations.md says {defaults:?}, the code {}", bound.default));
        }
    }
    assert!(wrong.is_empty(), "docs/operations.md's limits table disagrees with the code: {wrong:#?}");
}

#[test]
fn every_limit_label_counted_is_in_the_readme() {
    let text = readme();
    let row = text.lines().find(|l| l.starts_with("| `filterplane_limit_hits_total`")).expect("the metric's row");
    let mut labels = std::collections::BTreeSet::new();
    // Every crate's sources: the transport and the protocol count limits too.
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let mut dirs: Vec<std::path::PathBuf> =
        std::fs::read_dir(root).unwrap().flatten().map(|e| e.path().join("src")).filter(|src| src.is_dir()).collect();
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let Ok(src) = std::fs::read_to_string(&path) else { continue };
            // Labels passed straight to `limit_hit`, or named in an accept loop's settings.
            for pat in ["limit_hit(\"", "_limit: \"", "limit_hit(if settings.tls.is_some() { \""] {
                for piece in src.split(pat).skip(1) {
                    let label: String = piece.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
                    if !label.is_empty() {
                        labels.insert(label);
                    }
                }
            }
        }
    }
    assert!(labels.len() > 15, "{labels:?}");
    let missing: Vec<&String> = labels.iter().filter(|l| !row.contains(&format!("`{l}`"))).collect();
    assert!(missing.is_empty(), "limit labels docs/operations.md's metrics table does not name: {missing:?}");
}
