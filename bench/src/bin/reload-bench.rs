//! `reload-bench N...`: times one reload of N extension configs, the way `serve` does it:
//! read + parse + validate against Envoy's descriptors + compile + build the snapshot a
//! proxy gets. Prints the median of several runs per N.

use std::time::{Duration, Instant};

use filterplane_config::NodeFacts;
use filterplane_xds::snapshot::Generation;

/// A ~200-byte header-mutation config per entry, like the quickstart's.
fn yaml(n: usize) -> String {
    let mut y = String::with_capacity(n * 300);
    y.push_str("version: 1\nextension_configs:\n");
    for i in 0..n {
        y.push_str(&format!(
            "  - name: cfg-{i}\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation\n      mutations: {{ response_mutations: [ {{ append: {{ header: {{ key: x-cfg-{i}, value: value-{i} }} }} }} ] }}\n"
        ));
    }
    y
}

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() { vec![10, 1000, 10000] } else { sizes };
    // Decode the descriptor pool once, as `serve` does at start.
    let _ = filterplane_api::descriptors::pool();
    let dir = tempfile::tempdir()?;
    println!("{:>8} {:>12} {:>12} {:>12}", "configs", "load (ms)", "snapshot (ms)", "total (ms)");
    for n in sizes {
        let path = dir.path().join(format!("c{n}.yaml"));
        std::fs::write(&path, yaml(n))?;
        let runs = if n >= 10000 { 5 } else { 11 };
        let mut loads = Vec::new();
        let mut snaps = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let config = filterplane_config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
            let loaded = t.elapsed();
            let t = Instant::now();
            let generation = Generation::new(config);
            let snapshot = generation.snapshot_for(&NodeFacts::default());
            anyhow::ensure!(snapshot.all().count() == n);
            snaps.push(t.elapsed());
            loads.push(loaded);
        }
        let median = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() / 2].as_secs_f64() * 1e3
        };
        let (l, s) = (median(&mut loads), median(&mut snaps));
        println!("{n:>8} {l:>12.2} {s:>12.2} {:>12.2}", l + s);
    }
    Ok(())
}
