//! The README's "Limits and hardening" table and metrics list are kept by hand: this
//! checks that every bound flag of `serve` and every `limit` label the code counts is
//! named there. (Labels chosen in a branch, as the output bounds', are read by eye.)

use clap::CommandFactory;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap()
}

#[test]
fn every_bound_flag_of_serve_is_in_the_readme() {
    let text = readme();
    let cli = filterplane_server::cli::Cli::command();
    let serve = cli.find_subcommand("serve").expect("serve");
    let missing: Vec<String> = serve
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| l.starts_with("max-") || l.ends_with("-timeout-secs"))
        .map(|l| format!("--{l}"))
        .filter(|flag| !text.contains(&format!("`{flag}`")))
        .collect();
    assert!(missing.is_empty(), "flags the README's limits table does not name: {missing:?}");
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
    assert!(missing.is_empty(), "limit labels the README's metrics table does not name: {missing:?}");
}
