//! A bounded fuzz run of YAML loading, in the test suite: documents made by mutating good
//! configs (bytes flipped, inserted, cut, spliced, nesting piled up) must load or be
//! refused with an error naming the file, never panic or hang. Deterministic: the seed
//! is fixed, so a finding reproduces.

use std::path::Path;

#[path = "support/rng.rs"]
mod rng;

use rng::Rng;

const SEEDS: [&str; 4] = [
    include_str!("../../examples/quickstart/filterplane.yaml"),
    include_str!("../../examples/gateway/filterplane.yaml"),
    include_str!("../../examples/wasm/filterplane.yaml"),
    "version: 1\nextension_configs:\n  - name: a\n    node_selector: { clusters: [edge], metadata: { k: v } }\n    typed_config: { \"@type\": type.googleapis.com/google.protobuf.Struct, value: { a: [1, {b: 2}] } }\n",
];

/// Pieces YAML parsers and our own code treat specially.
const TOKENS: [&str; 24] = [
    "\n",
    ": ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "'",
    "#",
    "&a ",
    "*a",
    "!!str ",
    "---\n",
    "...\n",
    "\t",
    "\0",
    "\\u0000",
    "@type",
    "typed_config",
    "placement",
    "~",
    "<<: ",
    "\u{feff}",
];

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut b = text.as_bytes().to_vec();
    for _ in 0..1 + rng.below(6) {
        let at = rng.below(b.len() + 1);
        match rng.below(7) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            1 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                b.splice(at..at, t.iter().copied());
            }
            2 => b.truncate(at),
            3 if !b.is_empty() => {
                let from = rng.below(b.len());
                let to = (from + rng.below(64)).min(b.len());
                let piece = b[from..to].to_vec();
                b.splice(at..at, piece);
            }
            4 => {
                // Nesting piled up, past any sane depth.
                let open = ["[", "{\"a\": ", "- ", "  "][rng.below(4)];
                let piece = open.repeat(1 + rng.below(3000));
                b.splice(at..at, piece.bytes());
            }
            5 if !b.is_empty() => {
                let to = (at + rng.below(32)).min(b.len());
                b.drain(at..to);
            }
            _ => {
                let line = b"\n  - name: x\n    typed_config: {}\n";
                b.splice(at..at, line.iter().copied());
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

#[test]
fn mutated_configs_load_or_are_refused_with_an_error_never_a_panic() {
    let mut rng = Rng(0x5eed_f11e_7a1e_0001);
    let file = Path::new("fuzz.yaml");
    let (mut loaded, mut refused) = (0, 0);
    for i in 0..1500 {
        let seed = SEEDS[i % SEEDS.len()];
        let text = mutate(&mut rng, seed);
        let result = std::panic::catch_unwind(|| {
            filterplane_config::load::parse_file(file, &text).map(|p| filterplane_config::compile(&[p]))
        });
        match result {
            Err(_) => panic!("input {i} panicked; it was:\n{text:?}"),
            Ok(Ok(Ok(_))) => loaded += 1,
            Ok(Ok(Err(errors))) => {
                refused += 1;
                assert!(errors.0.iter().all(|e| e.file == file), "input {i}: errors name the file");
            }
            Ok(Err(e)) => {
                refused += 1;
                assert_eq!(e.file, file, "input {i}: the error names the file");
                assert!(!e.message.is_empty());
            }
        }
    }
    // The mutations reach both outcomes (the run is not trivially all-refused).
    assert!(loaded > 0 && refused > 0, "loaded {loaded}, refused {refused}");
}

/// A mesh file: clusters and their assignments, as operators write them.
fn mesh(n: usize) -> String {
    let mut y = String::from("version: 1\n# the mesh\nclusters:\n");
    for i in 0..n {
        y.push_str(&format!(
            "  - name: svc-{i}\n    type: EDS\n    eds_cluster_config: {{ eds_config: {{ ads: {{}} }} }}\n"
        ));
    }
    y.push_str("endpoints:\n");
    for i in 0..n {
        y.push_str(&format!("  - cluster_name: svc-{i}\n    endpoints:\n      - lb_endpoints:\n          - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}\n", 8000 + i));
    }
    y
}

#[test]
fn edits_read_incrementally_give_what_a_full_read_gives() {
    let mut rng = Rng(0x5eed_f11e_7a1e_0002);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("mesh.yaml");
    // Two documents, each with extension configs after its entries (placed by the
    // document's own line index): edits that add or remove lines move both.
    let extension = |name: &str| {
        format!("extension_configs:\n  - name: {name}\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-a, value: v }} }} }} ] }}\n")
    };
    let base =
        format!("{}{}---\n{}{}", mesh(12), extension("one"), mesh(12).replace("svc-", "other-"), extension("two"));
    // Every file large enough to be edited in place; the default settle time, so each
    // load reads the file (its stamp vouches for nothing this soon).
    let mut loader = filterplane_config::incremental::Loader::new().patching_from(0);
    let (mut patched, mut current) = (0, base.clone());
    for i in 0..400 {
        // Mostly small edits of the last text that loaded (in place where they can be),
        // now and then a mutation of the seed.
        let text = match rng.below(8) {
            0 => mutate(&mut rng, &base),
            1 => base.clone(),
            _ => {
                let mut b = current.clone().into_bytes();
                let digits: Vec<usize> = (0..b.len()).filter(|&i| b[i].is_ascii_digit()).collect();
                let at = rng.below(b.len());
                if rng.below(3) > 0 && !digits.is_empty() {
                    // A port, a name's number: what edits of a mesh mostly are.
                    b[digits[rng.below(digits.len())]] = b'0' + rng.below(10) as u8;
                } else if rng.below(2) == 0 {
                    b.insert(at, [b'x', b' ', b'1', b'\n', b'#'][rng.below(5)]);
                } else {
                    b.remove(at);
                }
                String::from_utf8_lossy(&b).into_owned()
            }
        };
        std::fs::write(&file, &text).expect("write");
        let full = filterplane_config::load_with(&file, u64::MAX);
        let incremental = loader.load(&file, u64::MAX);
        patched += loader.stats().patched;
        if incremental.is_ok() {
            current.clone_from(&text);
        }
        match (&full, &incremental) {
            (Ok(a), Ok(b)) => {
                // A full read's line index gives up on some odd texts (`}#`) where an entry
                // read alone still finds its line: the one difference allowed.
                let lines = |c: &filterplane_config::CompiledConfig, keep: &filterplane_config::CompiledConfig| {
                    let mut c = c.clone();
                    for (r, k) in c.resources.iter_mut().zip(&keep.resources) {
                        if k.origin.line.get().is_none() {
                            std::sync::Arc::make_mut(r).origin.line = None.into();
                        }
                    }
                    c
                };
                assert_eq!(*a, lines(b, a), "edit {i} loads otherwise than a full read:\n{text}");
            }
            (Err(a), Err(b)) => {
                // (The same allowance: where a full read names no line, an entry read alone
                // may, and its message then names the other entry's: `mesh.yaml:61`.)
                let unlined = |es: &[filterplane_config::ConfigError], full: &[filterplane_config::ConfigError]| {
                    let mut es = es.to_vec();
                    for (e, _) in es.iter_mut().zip(full).filter(|(_, f)| f.line.is_none()) {
                        e.line = None;
                        let mut parts = e.message.split(".yaml:");
                        let mut message = parts.next().unwrap_or_default().to_owned();
                        for p in parts {
                            let bare = p.trim_start_matches(|c: char| c.is_ascii_digit());
                            message.push_str(if bare.len() < p.len() { ".yaml" } else { ".yaml:" });
                            message.push_str(bare);
                        }
                        e.message = message;
                    }
                    es
                };
                assert_eq!(a.0, unlined(&b.0, &a.0), "edit {i} fails otherwise than a full read:\n{text}");
            }
            _ => panic!("edit {i}: full {full:?}\nincremental {incremental:?}\n{text}"),
        }
    }
    assert!(patched > 50, "the in-place path ran {patched} times");
}
