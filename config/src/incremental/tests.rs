use std::{path::Path, time::Duration};

use super::*;

const MAX: u64 = crate::load::MAX_FILE_BYTES;

fn cluster(i: usize) -> String {
    format!("  - name: svc-{i}\n    type: EDS\n    eds_cluster_config: {{ eds_config: {{ ads: {{}} }} }}\n")
}

fn assignment(i: usize, port: u16) -> String {
    format!(
        "  - cluster_name: svc-{i}\n    endpoints:\n      - lb_endpoints:\n          - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}\n"
    )
}

fn mesh(n: usize, changed: Option<(usize, u16)>) -> String {
    let mut y = String::from("version: 1\n# the mesh\nclusters:\n");
    for i in 0..n {
        y.push_str(&cluster(i));
    }
    y.push_str("endpoints:\n");
    for i in 0..n {
        let port = match changed {
            Some((c, p)) if c == i => p,
            _ => 8080,
        };
        y.push_str(&assignment(i, port));
    }
    y
}

/// The incremental load of `path` and the full one agree, result or errors.
fn same_as_full(loader: &mut Loader, path: &Path) -> Result<CompiledConfig, ConfigErrors> {
    let full = crate::load_with(path, MAX);
    let incremental = loader.load(path, MAX);
    match (&full, &incremental) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "incremental and full loads differ"),
        (Err(a), Err(b)) => assert_eq!(a.0, b.0, "the errors differ"),
        _ => panic!("full: {full:?}\nincremental: {incremental:?}"),
    }
    incremental
}

#[test]
fn every_example_loads_as_the_full_load_does() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for dir in std::fs::read_dir(&examples).unwrap() {
        let config = dir.unwrap().path().join("filterplane.yaml");
        if config.exists() {
            same_as_full(&mut Loader::new(), &config).unwrap();
            n += 1;
        }
    }
    assert!(n >= 3, "{n} examples");
}

#[test]
fn an_edit_compiles_only_the_changed_entry() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mesh.yaml");
    std::fs::write(&f, mesh(50, None)).unwrap();
    let mut loader = Loader::new();
    let first = same_as_full(&mut loader, &f).unwrap();
    let s = loader.stats();
    assert_eq!((s.entries, s.compiled, s.whole_documents), (100, 100, 0));
    std::fs::write(&f, mesh(50, Some((7, 9090)))).unwrap();
    let second = same_as_full(&mut loader, &f).unwrap();
    let s = loader.stats();
    assert_eq!((s.entries, s.compiled, s.whole_documents), (100, 1, 0));
    assert_ne!(first.version, second.version);
    let changed: Vec<_> = first
        .resources
        .iter()
        .zip(&second.resources)
        .filter(|(a, b)| a.version != b.version)
        .map(|(_, b)| &b.name)
        .collect();
    assert_eq!(changed, ["svc-7"]);
    // Lines added above every entry: nothing compiles again, every line moves.
    std::fs::write(&f, format!("# moved\n# down\n{}", mesh(50, Some((7, 9090))))).unwrap();
    same_as_full(&mut loader, &f).unwrap();
    assert_eq!(loader.stats().compiled, 0);
    assert_eq!(loader.cached(), 100);
}

#[test]
fn errors_name_file_line_and_path_as_a_full_load_does() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mesh.yaml");
    let mut loader = Loader::new();
    std::fs::write(&f, mesh(20, None)).unwrap();
    same_as_full(&mut loader, &f).unwrap();
    // A bad field in one entry; a duplicate name whose other entry is cached.
    let bad = mesh(20, None).replace(
        "port_value: 8080 } } }\n  - cluster_name: svc-4\n",
        "port_valu: 8080 } } }\n  - cluster_name: svc-4\n",
    );
    std::fs::write(&f, &bad).unwrap();
    let e = same_as_full(&mut loader, &f).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    assert!(e.0[0].path.starts_with("endpoints[3]"), "{e}");
    assert!(e.0[0].line.is_some(), "{e}");
    let dup = format!("{}{}", mesh(20, None), assignment(5, 1));
    std::fs::write(&f, &dup).unwrap();
    let e = same_as_full(&mut loader, &f).unwrap_err();
    assert!(e.0[0].message.contains("duplicate endpoint name \"svc-5\""), "{e}");
    assert_eq!(e.0[0].path, "endpoints[20].cluster_name", "{e}");
}

#[test]
fn documents_it_cannot_cut_are_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.yaml");
    let mut loader = Loader::new();
    let anchors = "version: 1\nclusters:\n  - &c { name: a, type: STATIC }\n  - <<: *c\n    name: b\n";
    let flow = "version: 1\nclusters: [ { name: a, type: STATIC } ]\n";
    let twice = "version: 1\nclusters:\n  - name: a\nclusters:\n  - name: b\n";
    let compact = "version: 1\nclusters:\n- name: a\n  type: STATIC\n- name: b\n  type: STATIC\n";
    let ragged = "version: 1\nclusters:\n    - name: a\n  - name: b\n";
    let crlf = "version: 1\r\nclusters:\r\n  - name: a\r\n    type: STATIC\r\n";
    let docs = "version: 1\nclusters:\n  - name: a\n---\nversion: 1\nendpoints:\n  - cluster_name: a\n";
    for (text, whole) in [(anchors, 1), (flow, 1), (twice, 1), (compact, 0), (ragged, 1), (crlf, 0), (docs, 0)] {
        std::fs::write(&f, text).unwrap();
        let _ = same_as_full(&mut loader, &f);
        assert_eq!(loader.stats().whole_documents, whole, "{text}");
    }
}

#[test]
fn a_directory_compiles_only_the_changed_file_s_entry() {
    let dir = tempfile::tempdir().unwrap();
    for k in 0..4 {
        std::fs::write(dir.path().join(format!("s{k}.yaml")), mesh(10, None).replace("svc-", &format!("s{k}-")))
            .unwrap();
    }
    let mut loader = Loader::new();
    same_as_full(&mut loader, dir.path()).unwrap();
    assert_eq!(loader.stats().compiled, 80);
    std::fs::write(dir.path().join("s2.yaml"), mesh(10, Some((3, 1))).replace("svc-", "s2-")).unwrap();
    same_as_full(&mut loader, dir.path()).unwrap();
    assert_eq!(loader.stats().compiled, 1);
    // The same text in another file is another entry (its origin differs).
    std::fs::write(dir.path().join("s4.yaml"), "version: 1\nclusters:\n".to_owned() + &cluster(99)).unwrap();
    same_as_full(&mut loader, dir.path()).unwrap();
    assert_eq!(loader.stats().compiled, 1);
}

#[test]
fn after_a_failed_load_only_the_fixed_entry_compiles() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mesh.yaml");
    let mut loader = Loader::new();
    std::fs::write(&f, mesh(30, None).replace("svc-3\n    endpoints", "svc-3\n    endpoint")).unwrap();
    same_as_full(&mut loader, &f).unwrap_err();
    std::fs::write(&f, mesh(30, None)).unwrap();
    same_as_full(&mut loader, &f).unwrap();
    assert_eq!(loader.stats().compiled, 1);
}

#[test]
fn files_that_did_not_change_are_not_read_again_and_keep_their_resources() {
    let dir = tempfile::tempdir().unwrap();
    for k in 0..3 {
        std::fs::write(dir.path().join(format!("s{k}.yaml")), mesh(10, None).replace("svc-", &format!("s{k}-")))
            .unwrap();
    }
    let mut loader = Loader::with_settle(Duration::ZERO);
    let first = same_as_full(&mut loader, dir.path()).unwrap();
    assert_eq!(loader.stats().files_read, 3);
    let again = same_as_full(&mut loader, dir.path()).unwrap();
    assert_eq!((loader.stats().files_read, loader.stats().entries), (0, 60));
    assert!(first.resources.iter().zip(&again.resources).all(|(a, b)| Arc::ptr_eq(a, b)));
    // A longer port: another size, so the stamp differs however coarse the clock.
    std::fs::write(dir.path().join("s1.yaml"), mesh(10, Some((3, 18080))).replace("svc-", "s1-")).unwrap();
    let edited = same_as_full(&mut loader, dir.path()).unwrap();
    assert_eq!((loader.stats().files_read, loader.stats().compiled), (1, 1));
    let moved: Vec<&str> = again
        .resources
        .iter()
        .zip(&edited.resources)
        .filter(|(a, b)| !Arc::ptr_eq(a, b))
        .map(|(_, b)| b.name.as_str())
        .collect();
    assert_eq!(moved, ["s1-3"], "only the edited entry is a new resource");
    // A file removed, one added: their entries leave and arrive in their places.
    std::fs::remove_file(dir.path().join("s0.yaml")).unwrap();
    std::fs::write(dir.path().join("s5.yaml"), mesh(2, None).replace("svc-", "s5-")).unwrap();
    same_as_full(&mut loader, dir.path()).unwrap();
    assert_eq!(loader.stats().files_read, 1);
}

#[test]
fn an_edit_right_after_a_load_is_read_even_at_the_same_size() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mesh.yaml");
    let mut loader = Loader::new();
    std::fs::write(&f, mesh(5, None)).unwrap();
    same_as_full(&mut loader, &f).unwrap();
    // The same size, within the same tick of the file system's clock: the file had not
    // settled when it was read, so its stamp vouches for nothing.
    std::fs::write(&f, mesh(5, Some((2, 9090)))).unwrap();
    // (`same_as_full`: the full load reads the new text, and this load must agree.)
    same_as_full(&mut loader, &f).unwrap();
    assert_eq!((loader.stats().files_read, loader.stats().compiled), (1, 1));
}

/// A file holding `text`, loaded by a loader that takes every edit in place where it can
/// (any size, its stamp never trusted), and that load (checked against a full read).
fn editable(text: &str) -> (tempfile::TempDir, std::path::PathBuf, Loader, Result<CompiledConfig, ConfigErrors>) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mesh.yaml");
    let mut loader = Loader::with_settle(Duration::ZERO).patching_from(0);
    std::fs::write(&f, text).unwrap();
    let first = same_as_full(&mut loader, &f);
    (dir, f, loader, first)
}

#[test]
fn an_edit_inside_one_entry_of_a_large_file_reads_that_entry_alone() {
    let (_dir, f, mut loader, first) = editable(&mesh(20, None));
    let first = first.unwrap();
    // (The text; whether it is taken in place; how many entries compile then.)
    let edits = [
        // A port: inside one entry, as many lines.
        (mesh(20, Some((7, 9090))), Some(1)),
        // Back (the old text's entry went with it, as a full read drops it).
        (mesh(20, None), Some(1)),
        // A line more: every later entry moves (its cell in the file's line table).
        (mesh(20, None).replace("  - cluster_name: svc-4\n", "  - cluster_name: svc-4\n    # four\n"), Some(1)),
        // Two entries where there was one.
        (
            mesh(20, None).replace(
                "  - cluster_name: svc-4\n",
                "  - cluster_name: svc-40\n    endpoints: []\n  - cluster_name: svc-4\n",
            ),
            None,
        ),
        // The header.
        (mesh(20, None).replace("# the mesh", "# a mesh!"), None),
        // A broken entry: the errors of a full read.
        (mesh(20, None).replace("svc-3\n    endpoints", "svc-3\n    endpoint"), None),
        // Fixed again, and a same-length edit elsewhere at once.
        (mesh(20, Some((11, 9191))), None),
        // Then one inside an entry again.
        (mesh(20, Some((11, 9292))), Some(1)),
    ];
    for (k, (text, patched)) in edits.into_iter().enumerate() {
        std::fs::write(&f, &text).unwrap();
        let got = same_as_full(&mut loader, &f);
        let st = loader.stats();
        assert_eq!(st.patched == 1, patched.is_some(), "edit {k}");
        if let Some(compiled) = patched {
            assert_eq!(st.compiled, compiled, "edit {k}");
        }
        if k == 0 {
            let got = got.unwrap();
            let same = first.resources.iter().zip(&got.resources).filter(|(a, b)| Arc::ptr_eq(a, b)).count();
            assert_eq!(same, 39, "every other entry keeps its resource");
        }
    }
    // The same text again (touched): nothing compiled.
    std::fs::write(&f, mesh(20, Some((11, 9292)))).unwrap();
    same_as_full(&mut loader, &f).unwrap();
    assert_eq!(loader.stats().compiled, 0);
}

/// A file of two documents, each with entries of a section and, after them, extension
/// configs (which the document's own line index places).
fn two_documents(endpoints_of: impl Fn(usize) -> usize) -> String {
    let extension = |name: &str| {
        format!(
            "extension_configs:\n  - name: {name}\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-a, value: v }} }} }} ] }}\n"
        )
    };
    let assignment = |i: usize| {
        let mut y = format!("  - cluster_name: svc-{i}\n    endpoints:\n      - lb_endpoints:\n");
        for k in 0..endpoints_of(i) {
            y.push_str(&format!(
                "          - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}\n",
                8000 + k
            ));
        }
        y
    };
    let mut y = String::from("version: 1\nclusters:\n");
    for i in 0..6 {
        y.push_str(&cluster(i));
    }
    y.push_str("endpoints:\n");
    for i in 0..6 {
        y.push_str(&assignment(i));
    }
    y.push_str(&extension("first"));
    y.push_str("---\nversion: 1\nendpoints:\n");
    for i in 6..12 {
        y.push_str(&assignment(i));
    }
    y.push_str(&extension("second"));
    y
}

#[test]
fn lines_added_or_removed_inside_entries_move_everything_after_them() {
    let (_dir, f, mut loader, first) = editable(&two_documents(|_| 1));
    first.unwrap();
    let cluster_3 = "  - name: svc-3\n    type: EDS\n";
    // (The text; whether it is taken in place; how many entries compile then.) Each is
    // checked against a full read: every entry's line and path, the extension configs'
    // lines (from their documents' indexes), and the errors.
    let edits = [
        // An endpoint more in the first document: everything after it moves a line.
        (two_documents(|i| 1 + usize::from(i == 2)), Some(1)),
        // Three more, in the second document's first entry.
        (two_documents(|i| 1 + usize::from(i == 2) + 3 * usize::from(i == 6)), Some(1)),
        // Both gone again (two edits at once, far apart: the file is read).
        (two_documents(|_| 1), None),
        // Lines added at an entry's end look like lines before the next one: both are
        // read again, and the unchanged one is found in the cache.
        (two_documents(|i| 1 + 2 * usize::from(i == 4)), Some(1)),
        // An entry's lines removed.
        (two_documents(|_| 1), Some(1)),
        // A cluster renamed into a duplicate, a line more with it: the errors of a full
        // read, naming both entries' lines.
        (two_documents(|_| 1).replace(cluster_3, "  - name: svc-5\n    # was svc-3\n    type: EDS\n"), Some(1)),
        // Blank lines and a comment after an entry.
        (two_documents(|_| 1).replace(cluster_3, "  - name: svc-3\n\n\n    # three\n    type: EDS\n"), Some(1)),
        // An entry's last newline removed, joining the next entry's first line to it:
        // read whole, and refused as a full read refuses it.
        (two_documents(|_| 1).replacen("} } }\n  - cluster_name: svc-4", "} } }  - cluster_name: svc-4", 1), None),
        // Back, and an entry split in two: read whole.
        (two_documents(|_| 1).replace(cluster_3, "  - name: svc-3\n  - name: svc-33\n    type: EDS\n"), None),
    ];
    for (k, (text, patched)) in edits.into_iter().enumerate() {
        std::fs::write(&f, &text).unwrap();
        let got = same_as_full(&mut loader, &f);
        let st = loader.stats();
        assert_eq!((k, st.patched == 1), (k, patched.is_some()), "{text}");
        if let Some(compiled) = patched {
            assert_eq!((k, st.compiled), (k, compiled));
        }
        if k == 5 || k == 7 {
            let errors = got.unwrap_err().0;
            assert!(!errors.is_empty() && errors.iter().all(|e| e.line.is_some()), "{errors:?}");
            assert_eq!(errors.iter().any(|e| e.message.contains("duplicate")), k == 5, "{errors:?}");
        }
    }
}

#[test]
fn an_edit_across_many_entries_is_read_in_place_and_their_old_texts_leave_the_cache() {
    let (_dir, f, mut loader, first) = editable(&mesh(40, None));
    first.unwrap();
    // Every assignment's port at once (one run of 40 entries), a line more in the first.
    let every = mesh(40, None).replace("port_value: 8080", "port_value: 8081").replacen(
        "  - cluster_name: svc-0\n",
        "  - cluster_name: svc-0\n    # first\n",
        1,
    );
    for (text, compiled) in [(every, 40), (mesh(40, None), 40)] {
        std::fs::write(&f, &text).unwrap();
        same_as_full(&mut loader, &f).unwrap();
        assert_eq!((loader.stats().patched, loader.stats().compiled), (1, compiled));
        assert_eq!(loader.cached(), 80, "the 40 old texts are gone, as a full read drops them");
    }
    // An endpoint appended to the file's last entry, at the very end of the file.
    let appended = mesh(40, None)
        + "          - endpoint: { address: { socket_address: { address: 127.0.0.2, port_value: 8080 } } }\n";
    std::fs::write(&f, &appended).unwrap();
    same_as_full(&mut loader, &f).unwrap();
    assert_eq!((loader.stats().patched, loader.stats().compiled), (1, 1));
}

#[test]
fn entries_that_only_moved_keep_their_resources_and_every_generation_reads_their_new_lines() {
    let (_dir, f, mut loader, first) = editable(&mesh(100, None));
    let first = first.unwrap();
    let line_of = |c: &CompiledConfig, name: &str| {
        let r = c.resources.iter().find(|r| r.name == name && r.resource_type == ResourceType::ClusterLoadAssignment);
        r.and_then(|r| r.origin.line.get()).unwrap()
    };
    let before = line_of(&first, "svc-90");
    // Two lines more in the first cluster: the 199 entries after it only move.
    let text = mesh(100, None).replace("  - name: svc-0\n", "  - name: svc-0\n    # the first\n    # service\n");
    std::fs::write(&f, &text).unwrap();
    let got = same_as_full(&mut loader, &f).unwrap();
    assert_eq!((loader.stats().patched, loader.stats().compiled), (1, 1));
    let same = first.resources.iter().zip(&got.resources).filter(|(a, b)| Arc::ptr_eq(a, b)).count();
    assert_eq!(same, 199, "no copy of an entry that only moved");
    assert_eq!(line_of(&got, "svc-90"), before + 2);
    assert_eq!(line_of(&first, "svc-90"), before + 2, "the last generation names the lines the file has now");
}

#[test]
fn an_entry_written_twice_keeps_a_line_of_its_own_as_lines_move() {
    // The same entry, text and path (`endpoints[0]`), in both documents: a duplicate,
    // refused. One resource would do for both, but each must name its own line.
    let twice = |endpoints_of: fn(usize) -> usize, comment: &str| {
        two_documents(endpoints_of)
            .replace("cluster_name: svc-6\n", "cluster_name: svc-0\n")
            .replace("  - name: svc-1\n", &format!("  - name: svc-1\n{comment}"))
    };
    let (_dir, f, mut loader, first) = editable(&two_documents(|_| 1));
    first.unwrap();
    for (text, patched) in [
        (twice(|_| 1, ""), 1),
        // A line above both.
        (twice(|_| 1, "    # one\n"), 1),
        // Then one between them.
        (twice(|i| 1 + usize::from(i == 3), "    # one\n"), 1),
        // The file read whole (its header changed): both found in the cache.
        (format!("# top\n{}", twice(|_| 1, "")), 0),
        (format!("# top\n{}", twice(|_| 1, "    # one\n")), 1),
    ] {
        std::fs::write(&f, &text).unwrap();
        let errors = same_as_full(&mut loader, &f).unwrap_err().0;
        assert!(errors.iter().any(|e| e.message.contains("duplicate")), "{errors:?}");
        assert_eq!(loader.stats().patched, patched);
    }
}
