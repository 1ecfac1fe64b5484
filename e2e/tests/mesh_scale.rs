//! A mesh-sized Envoy: 50,000 EDS clusters over state-of-the-world ADS. It subscribes to
//! 50,000 ClusterLoadAssignment names (over the old fixed limit of 10,000), and a change
//! to one endpoint costs it that one assignment, not all 50,000 again: Envoy keeps every
//! other endpoint (xDS allows leaving out unchanged resources of every type but
//! listeners and clusters), and traffic through an unchanged cluster never fails.

use std::{fmt::Write as _, fs, time::Duration};

use filterplane_e2e::{
    example_bootstrap, free_port, http_get_large, traffic::Traffic, wait_until, Envoy, EnvoyPorts, Filterplane,
};

const SERVICES: usize = 50_000;
const CHANGED: usize = 777;
/// A debug build reads 100,000 resources in tens of seconds on a 2-core machine.
const WAIT: Duration = Duration::from_secs(180);
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// `SERVICES` EDS clusters whose endpoints are Filterplane's admin (it answers
/// `/healthz`), cluster `changed` on `changed_host`, and a listener sending everything to
/// `svc-0`.
fn mesh(listener: u16, admin: u16, changed_host: &str) -> String {
    let mut y = String::with_capacity(SERVICES * 330);
    y.push_str("version: 1\nlisteners:\n");
    write!(
        y,
        r#"  - name: edge
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener} }} }}
    filter_chains:
      - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
              stat_prefix: edge
              route_config:
                virtual_hosts: [ {{ name: all, domains: ["*"], routes: [ {{ match: {{ prefix: "/" }}, route: {{ cluster: svc-0, prefix_rewrite: /healthz }} }} ] }} ]
              http_filters:
                - name: envoy.filters.http.router
                  typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    )
    .unwrap();
    y.push_str("clusters:\n");
    for i in 0..SERVICES {
        writeln!(y, "  - name: svc-{i}\n    type: EDS\n    connect_timeout: 1s\n    eds_cluster_config: {{ eds_config: {{ ads: {{}}, resource_api_version: V3 }} }}").unwrap();
    }
    y.push_str("endpoints:\n");
    for i in 0..SERVICES {
        let host = if i == CHANGED { changed_host } else { "127.0.0.1" };
        writeln!(y, "  - cluster_name: svc-{i}\n    endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: {host}, port_value: {admin} }} }} }} }} ] }} ]").unwrap();
    }
    y
}

/// Each cluster's endpoint as Envoy's `/clusters` lists it: `(cluster, "host:port")`.
fn endpoints(envoy: &Envoy) -> Option<Vec<(String, String)>> {
    let body = http_get_large(&format!("http://127.0.0.1:{}/clusters", envoy.admin_port))?;
    let endpoint = |l: &str| {
        let mut parts = l.split("::");
        let (cluster, address, stat) = (parts.next()?, parts.next()?, parts.next()?);
        (stat == "cx_active" && cluster.starts_with("svc-")).then(|| (cluster.to_owned(), address.to_owned()))
    };
    Some(body.lines().filter_map(endpoint).collect())
}

#[test]
fn a_sotw_envoy_with_50000_eds_clusters_gets_one_assignment_for_one_endpoint_change() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("filterplane.yaml");
    let (xds_port, admin_port) = (free_port(), free_port());
    let ports = EnvoyPorts::new(xds_port);
    fs::write(&yaml, mesh(ports.listener, admin_port, "127.0.0.1")).unwrap();
    let fp = Filterplane::start_on(&yaml, dir.path(), xds_port, admin_port);
    // Envoy keeps no stats here: 50,000 clusters' stats would take gigabytes.
    let bootstrap = format!(
        "{}\nstats_config: {{ stats_matcher: {{ reject_all: true }} }}\n",
        example_bootstrap("gateway/envoy.yaml", ports, "mesh-envoy")
    );
    assert!(bootstrap.contains("api_type: GRPC"), "state of the world");
    let envoy = Envoy::start(&bootstrap, ports, dir.path(), "envoy");

    // Every assignment served and ACKed, the stream never ended at a subscription limit.
    // (Read from /metrics: this proxy's row in the API lists 100,000 resources.)
    let acks = format!("filterplane_xds_acks_total{{type_url=\"{EDS}\"}}");
    let not_synced = format!("filterplane_proxies_not_synced{{type_url=\"{EDS}\"}}");
    let synced = || (fp.metric(&acks)? >= 1.0 && fp.metric(&not_synced)? == 0.0).then_some(());
    wait_until("the assignments ACKed", WAIT, synced);
    let all = wait_until("Envoy to list 50,000 endpoints", WAIT, || endpoints(&envoy).filter(|e| e.len() == SERVICES));
    assert_eq!(fp.metric("filterplane_limit_hits_total{limit=\"subscribed_names\"}").unwrap_or(0.0), 0.0);
    assert_eq!(fp.metric("filterplane_xds_connections"), Some(1.0), "one stream, never ended");
    let expected = format!("127.0.0.1:{admin_port}");
    assert!(all.iter().all(|(_, a)| *a == expected));

    let series = format!("filterplane_xds_pushed_bytes_total{{type_url=\"{EDS}\"}}");
    let before = fp.metric(&series).expect("EDS bytes counted");
    assert!(before > 1_000_000.0, "the first response carried all 50,000 ({before} bytes)");

    // Traffic through an unchanged cluster while one endpoint elsewhere changes.
    let traffic = Traffic::start(ports.listener, 2, "/", "content-type");
    wait_until("traffic through svc-0", WAIT, || (traffic.take().by_status.get(&200) > Some(&0)).then_some(()));
    let fanout = "filterplane_xds_push_fanout_seconds_count";
    let fanned = fp.metric(fanout).unwrap_or(0.0);
    fs::write(&yaml, mesh(ports.listener, admin_port, "127.0.0.2")).unwrap();
    let moved = format!("127.0.0.2:{admin_port}");
    let now = wait_until("svc-777's new endpoint in Envoy", WAIT, || {
        endpoints(&envoy).filter(|e| e.iter().any(|(c, a)| c == &format!("svc-{CHANGED}") && *a == moved))
    });
    wait_until("the change ACKed", WAIT, || (fp.metric(&not_synced)? == 0.0).then_some(()));
    let tally = traffic.stop();

    assert!(fp.metric(fanout).unwrap_or(0.0) > fanned, "the push to Envoy timed in the fan-out histogram");
    let pushed = fp.metric(&series).expect("EDS bytes counted") - before;
    println!("EDS bytes: first response {before}, one endpoint's change {pushed}");
    assert!(pushed > 0.0 && pushed <= 2_000.0, "one endpoint's change cost {pushed} bytes of EDS");
    assert_eq!(now.len(), SERVICES, "Envoy kept every other cluster's endpoints");
    for (cluster, address) in &now {
        let want = if *cluster == format!("svc-{CHANGED}") { &moved } else { &expected };
        assert_eq!(address, want, "{cluster}");
    }
    assert!(tally.responses > 0);
    assert_eq!(tally.not_ok(), 0, "non-200 responses through the change: {:?}", tally.samples);
    assert!(fp.log_text().contains("compiled=1"), "only the changed assignment was compiled again");
}
