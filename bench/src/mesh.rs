//! Mesh-sized configs for the config-scale benchmark and tests: `n` EDS clusters and
//! their `n` ClusterLoadAssignments (2·n resources), as one file or spread over files.

use std::path::Path;

/// Cluster `i` of a mesh config, as YAML list items (EDS over ADS).
pub fn cluster(i: usize) -> String {
    format!(
        "  - name: svc-{i}\n    type: EDS\n    connect_timeout: 1s\n    eds_cluster_config: {{ eds_config: {{ ads: {{}}, resource_api_version: V3 }} }}\n"
    )
}

/// The ports of a service's endpoints in a config not edited yet: two endpoints, one line
/// each.
pub const PORTS: [u16; 2] = [8080, 8081];

/// The ClusterLoadAssignment of cluster `i`: an endpoint per port in `ports`, one line
/// each (so an endpoint added or removed changes the file's line count).
pub fn assignment(i: usize, ports: &[u16]) -> String {
    use std::fmt::Write;
    let a = 1 + (i / 250) % 250;
    let b = 1 + i % 250;
    let mut y = format!("  - cluster_name: svc-{i}\n    endpoints:\n      - lb_endpoints:\n");
    for (k, port) in ports.iter().enumerate() {
        let host = k + 1;
        let _ = writeln!(
            y,
            "          - endpoint: {{ address: {{ socket_address: {{ address: 10.{a}.{b}.{host}, port_value: {port} }} }} }}"
        );
    }
    y
}

/// Services `range` as one document, the endpoints of each as `ports_of` says.
pub fn document<P: AsRef<[u16]>>(range: std::ops::Range<usize>, ports_of: impl Fn(usize) -> P) -> String {
    let mut y = String::with_capacity(range.len() * 420);
    y.push_str("version: 1\nclusters:\n");
    for i in range.clone() {
        y.push_str(&cluster(i));
    }
    y.push_str("endpoints:\n");
    for i in range {
        y.push_str(&assignment(i, ports_of(i).as_ref()));
    }
    y
}

/// Writes `services` services as `files` files (`files` = 1: `dir/mesh.yaml`), each
/// service's endpoints as `ports_of` says; returns the config path.
pub fn write<P: AsRef<[u16]>>(
    dir: &Path,
    services: usize,
    files: usize,
    ports_of: impl Fn(usize) -> P,
) -> std::io::Result<std::path::PathBuf> {
    if files <= 1 {
        let path = dir.join("mesh.yaml");
        std::fs::write(&path, document(0..services, ports_of))?;
        return Ok(path);
    }
    let per = services.div_ceil(files);
    for f in 0..files {
        let range = (f * per).min(services)..((f + 1) * per).min(services);
        std::fs::write(dir.join(format!("svc-{f:04}.yaml")), document(range, &ports_of))?;
    }
    Ok(dir.to_path_buf())
}

/// The file of a `files`-file config holding service `i`.
/// Rewrites only the file of `write(dir, services, files, ports_of)` that holds service
/// `changed`, as an operator's edit of one service does (renamed into place).
pub fn write_one<P: AsRef<[u16]>>(
    dir: &Path,
    services: usize,
    files: usize,
    changed: usize,
    ports_of: impl Fn(usize) -> P,
) -> std::io::Result<()> {
    let file = file_of(dir, services, files, changed);
    let per = if files <= 1 { services } else { services.div_ceil(files) };
    let first = changed / per * per;
    // Renamed into place, as a writer that never pauses must: a file written in place may
    // be read half-written.
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = file.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, document(first..(first + per).min(services), ports_of))?;
    std::fs::rename(&tmp, file)
}

pub fn file_of(dir: &Path, services: usize, files: usize, i: usize) -> std::path::PathBuf {
    if files <= 1 {
        return dir.join("mesh.yaml");
    }
    dir.join(format!("svc-{:04}.yaml", i / services.div_ceil(files)))
}
