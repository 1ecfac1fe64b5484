//! `config-scale SERVICES...`: a mesh config of SERVICES EDS clusters and their
//! ClusterLoadAssignments (2·SERVICES resources), as one file and as 100 files; times,
//! in one run, the full load (what every reload did before incremental loading, as
//! b5fbd7f did) and incremental reloads after one endpoint changed, with their parts
//! and the generation and snapshot built from them.
//! `config-scale write DIR SERVICES FILES [SERVICE:PORT | SERVICE:+PORT ...]`: writes such
//! a config, or, given the edits so far (each a service whose second endpoint's port
//! changed, or, with `+`, that gained an endpoint: a line more), only the file holding the
//! last one, for bench/config-scale.sh.
//! `ADD=1 config-scale SERVICES...`: each edit adds an endpoint (the file grows a line, so
//! every later entry's line moves) instead of changing a port.

use std::time::{Duration, Instant};

use filterplane_bench::mesh::PORTS;
use filterplane_config::{incremental::Loader, NodeFacts};
use std::sync::Arc;

use filterplane_api::ResourceType;
use filterplane_xds::{plan::Plan, snapshot::Generation, stream::Subscription};

/// Service `i`'s endpoints after an edit: its second endpoint's port set to `port`, or,
/// with `add`, an endpoint at `port` added.
fn edit(ports: &mut std::collections::HashMap<usize, Vec<u16>>, i: usize, port: u16, add: bool) {
    let p = ports.entry(i).or_insert_with(|| PORTS.to_vec());
    match (add, p.get_mut(1)) {
        (false, Some(second)) => *second = port,
        _ => p.push(port),
    }
}

/// Service `j`'s endpoints' ports after the edits in `ports`.
fn ports_of(ports: &std::collections::HashMap<usize, Vec<u16>>, j: usize) -> Vec<u16> {
    ports.get(&j).cloned().unwrap_or_else(|| PORTS.to_vec())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("write") {
        let n = |i: usize| args.get(i).map(|a| a.parse::<usize>()).transpose();
        let (dir, services, files) = (std::path::Path::new(&args[1]), n(2)?.unwrap_or(1000), n(3)?.unwrap_or(1));
        // Edits so far, each `SERVICE:PORT` or `SERVICE:+PORT`: the file of the last one is
        // written.
        let mut ports: std::collections::HashMap<usize, Vec<u16>> = std::collections::HashMap::new();
        let mut last = None;
        for e in &args[4.min(args.len())..] {
            let (c, p) = e.split_once(':').ok_or_else(|| anyhow::anyhow!("SERVICE:PORT, not {e}"))?;
            let c: usize = c.parse()?;
            edit(&mut ports, c, p.trim_start_matches('+').parse()?, p.starts_with('+'));
            last = Some(c);
        }
        match last {
            Some(c) => filterplane_bench::mesh::write_one(dir, services, files, c, |j| ports_of(&ports, j))?,
            None => {
                filterplane_bench::mesh::write(dir, services, files, |j| ports_of(&ports, j))?;
            }
        }
        return Ok(());
    }
    let sizes: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let _ = filterplane_api::descriptors::pool();
    let dir = tempfile::tempdir()?;
    for n in sizes {
        for files in [1usize, 100].into_iter().filter(|f| std::env::var("FILES").map_or(true, |v| v == f.to_string())) {
            let sub = dir.path().join(format!("n{n}-{files}"));
            std::fs::create_dir_all(&sub)?;
            let path = filterplane_bench::mesh::write(&sub, n, files, |_| PORTS)?;
            let t = Instant::now();
            let full = filterplane_config::load_with(&path, u64::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
            let full_ms = ms(t.elapsed());
            drop(full);
            // A config's files have stood a while before an edit: the loader trusts a
            // file's times only once they are older than its settle time (2 s).
            std::thread::sleep(Duration::from_millis(2100));
            let mut loader = Loader::new();
            let t = Instant::now();
            loader.load(&path, u64::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
            let first = ms(t.elapsed());
            let mut edits = Vec::new();
            let mut previous: Option<Generation> = None;
            let wildcard = Arc::new(Subscription::from_sotw(ResourceType::Cluster, &[], None, usize::MAX)?);
            let names: Vec<String> = (0..n).map(|i| format!("svc-{i}")).collect();
            let by_name =
                Arc::new(Subscription::from_sotw(ResourceType::ClusterLoadAssignment, &names, None, usize::MAX)?);
            let rounds = std::env::var("EDITS").ok().and_then(|v| v.parse().ok()).unwrap_or(5u16);
            // Each edit changes (or adds) one more endpoint, as an operator's edits do.
            let add = std::env::var("ADD").is_ok_and(|v| v == "1");
            let mut ports = std::collections::HashMap::new();
            for k in 0..rounds {
                let i = (k as usize * 7919) % n;
                edit(&mut ports, i, 9000 + k, add);
                filterplane_bench::mesh::write_one(&sub, n, files, i, |j| ports_of(&ports, j))?;
                let t = Instant::now();
                let c = loader.load(&path, u64::MAX).map_err(|e| anyhow::anyhow!("{e}"))?;
                let load = t.elapsed();
                let t = Instant::now();
                let g = Generation::with_plan_after(Arc::new(c), Plan::default(), previous.as_ref());
                let gen = t.elapsed();
                let t = Instant::now();
                let s = g.snapshot_for(&NodeFacts::default());
                let snap = t.elapsed();
                // What the first stream of a push asks of the new snapshot: what changed
                // of each type since the last one, and the version of its selection (a
                // wildcard CDS and, as a mesh-sized Envoy asks, every assignment by name).
                let t = Instant::now();
                if let Some(before) = previous.as_ref().map(|p| p.snapshot_for(&NodeFacts::default())) {
                    for rt in [ResourceType::Cluster, ResourceType::ClusterLoadAssignment] {
                        anyhow::ensure!(s.changes_from(&before, rt).changed.len() <= 1);
                    }
                }
                s.selection_version_of(ResourceType::Cluster, &wildcard);
                s.selection_version_of(ResourceType::ClusterLoadAssignment, &by_name);
                let push = t.elapsed();
                anyhow::ensure!(s.all().count() == 2 * n);
                drop(s);
                previous = Some(g);
                let st = loader.stats();
                edits.push(format!(
                    "{:.1} (read {:.1} entries {:.1} check {:.1}) gen {:.1} snap {:.1} first push {:.1} files read {} in place {} compiled {}",
                    ms(load),
                    ms(st.read),
                    ms(st.entries_time),
                    ms(st.check),
                    ms(gen),
                    ms(snap),
                    ms(push),
                    st.files_read,
                    st.patched,
                    st.compiled
                ));
            }
            println!("{n} services, {files} files: full {full_ms:.1} ms, first incremental {first:.1} ms, edits (load, generation, snapshot, first push, compiled): {edits:?}");
        }
    }
    Ok(())
}
