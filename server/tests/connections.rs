//! Connections to the xDS port (issue 20, items 3 and 4): a cap in total and per client
//! address, and clients that connect and say nothing, against a running server on
//! loopback.

#[allow(dead_code)]
#[path = "conformance/harness.rs"]
mod harness;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use harness::*;

/// A plaintext connection from `from` (a loopback address) that sends the HTTP/2
/// preface: `Some` when the server answers with its SETTINGS, `None` when it closed it.
fn speaking_connection(server: SocketAddr, from: [u8; 4]) -> Option<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    socket.connect(&server.into()).unwrap();
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").ok()?;
    let mut head = [0u8; 9];
    s.read_exact(&mut head).ok()?;
    (head[3] == 4).then_some(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_connections_are_capped_in_total_and_per_address() {
    let plane = Plane::start_with(&[("a", "1")], |s| {
        s.limits.max_xds_connections = 50;
        s.limits.max_xds_connections_per_address = 30;
    })
    .await;
    let xds = plane.xds;
    let (from_one, refused_same, from_two, refused_full) = tokio::task::spawn_blocking(move || {
        let one: Vec<_> = (0..31).filter_map(|_| speaking_connection(xds, [127, 0, 0, 1])).collect();
        let refused_same = speaking_connection(xds, [127, 0, 0, 1]).is_none();
        let two: Vec<_> = (0..25).filter_map(|_| speaking_connection(xds, [127, 0, 0, 2])).collect();
        let refused_full = speaking_connection(xds, [127, 0, 0, 3]).is_none();
        let counts = (one.len(), refused_same, two.len(), refused_full);
        drop((one, two));
        counts
    })
    .await
    .unwrap();
    assert_eq!(from_one, 30, "30 from one address, no more");
    assert!(refused_same);
    assert_eq!(from_two, 20, "50 in all");
    assert!(refused_full, "a connection over the total cap is closed");
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"xds_connections_per_address\"}") >= 2.0);
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"xds_connections\"}") >= 5.0);
    // The places are given back: a proxy connects and is served.
    plane.wait_for("connections closed", |p| p.metric("filterplane_xds_connections") == 0.0).await;
    let mut c = SotwClient::connect(&plane, "after").await;
    c.request(ECDS, &["a"], "", "").await;
    assert_eq!(ecds_names(&c.recv().await.resources), ["a"]);
    assert!(plane.healthy());
}

/// A self-signed certificate for 127.0.0.1 and its key, as PEM files in `dir`.
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("xds.pem"), dir.join("xds-key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path, cert.der().to_vec())
}

/// Before, 1,100 connections that never sent a byte held the port's 1,024 handshake
/// slots until they timed out: a real handshake waited 7.9 s on the xDS port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_delay_a_tls_handshake() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = certificate(dir.path());
    let plane = Plane::start_with(&[("a", "1")], |s| {
        s.security.xds_tls_cert = Some(cert.clone());
        s.security.xds_tls_key = Some(key.clone());
        s.limits.handshake_timeout = std::time::Duration::from_secs(60);
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..1100 {
        silent.push(tokio::net::TcpStream::connect(plane.xds).await.unwrap());
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(der)).unwrap();
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(plane.xds).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    // Well under the 60 s the silent ones may wait: the handshake does not queue behind them.
    let started = std::time::Instant::now();
    let handshake = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp)).await;
    println!("a TLS handshake behind 1,100 silent connections: {} ms", started.elapsed().as_millis());
    assert!(matches!(handshake, Ok(Ok(_))), "the TLS handshake finished: {:?}", handshake.map(|r| r.err()));
    assert!(plane.healthy());
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_port_is_full_the_oldest_silent_connection_makes_room() {
    let plane = Plane::start_with(&[("a", "1")], |s| {
        s.limits.max_xds_connections = 100;
        s.limits.handshake_timeout = std::time::Duration::from_secs(60);
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(tokio::net::TcpStream::connect(plane.xds).await.unwrap());
    }
    // The port is full of clients that said nothing; a proxy still gets in and is served.
    let mut c = SotwClient::connect(&plane, "real").await;
    c.request(ECDS, &["a"], "", "").await;
    assert_eq!(ecds_names(&c.recv().await.resources), ["a"]);
    assert!(plane.metric("filterplane_limit_hits_total{limit=\"silent_connections_evicted\"}") >= 1.0);
    // The evicted one was closed by the server.
    let mut buf = [0u8; 1];
    let first = &mut silent[0];
    let read = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(first, &mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the oldest silent connection was closed: {read:?}");
}
