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
