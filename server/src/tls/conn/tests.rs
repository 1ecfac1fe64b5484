//! `TlsConn` against rustls's buffered client (tokio-rustls) over loopback TCP.

use std::{sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::TlsConn;

struct Pki {
    ca: CertificateDer<'static>,
    server: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    client: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

fn pki() -> Pki {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names).unwrap().signed_by(&key, &issuer).unwrap();
        (vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
    };
    Pki {
        ca: issuer.der().clone(),
        server: leaf(vec!["localhost".into()]),
        client: leaf(vec!["client.example".into()]),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    Arc::new(roots)
}

fn server_config(pki: &Pki, client_ca: bool) -> Arc<rustls::ServerConfig> {
    let builder =
        rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().unwrap();
    let builder = if client_ca {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&pki.ca), provider());
        builder.with_client_cert_verifier(verifier.build().unwrap())
    } else {
        builder.with_no_client_auth()
    };
    Arc::new(builder.with_single_cert(pki.server.0.clone(), pki.server.1.clone_key()).unwrap())
}

fn client_config(
    pki: &Pki,
    with_cert: bool,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots(&pki.ca));
    Arc::new(if with_cert {
        builder.with_client_auth_cert(pki.client.0.clone(), pki.client.1.clone_key()).unwrap()
    } else {
        builder.with_no_client_auth()
    })
}

/// A server accepting one connection, and a client connected to it.
async fn pair(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (std::io::Result<TlsConn>, std::io::Result<tokio_rustls::client::TlsStream<TcpStream>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        TlsConn::accept(tcp, server).await
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client);
    let client = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await;
    let server = tokio::time::timeout(Duration::from_secs(10), accept).await.unwrap().unwrap();
    (server, client)
}

/// The server's handshake when a client sends `bytes` and closes its side.
async fn handshake_after(server: Arc<rustls::ServerConfig>, bytes: &[u8]) -> std::io::Result<TlsConn> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        TlsConn::accept(tcp, server).await
    });
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    tcp.shutdown().await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), accept).await.unwrap().unwrap();
    drop(tcp);
    result
}

fn idle(conn: &TlsConn) -> bool {
    conn.incoming.bytes.capacity() == 0 && conn.plaintext.bytes.capacity() == 0 && conn.outgoing.bytes.capacity() == 0
}

/// Echoes until the peer closes, then closes its side.
async fn echo(mut conn: TlsConn) -> TlsConn {
    let mut buf = vec![0u8; 8192];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => conn.write_all(&buf[..n]).await.unwrap(),
            Err(e) => panic!("server read: {e}"),
        }
        conn.flush().await.unwrap();
    }
    conn.shutdown().await.unwrap();
    conn
}

#[tokio::test]
async fn data_both_ways_over_tls_1_3_and_1_2_and_nothing_held_between() {
    let pki = pki();
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let (server, client) = pair(server_config(&pki, true), client_config(&pki, true, &[version])).await;
        let (server, client) = (server.unwrap(), client.unwrap());
        assert_eq!(server.common().protocol_version(), Some(version.version));
        let leaf = server.common().peer_certificates().and_then(|c| c.first()).cloned();
        assert_eq!(leaf.as_ref(), pki.client.0.first(), "the client's certificate is known");
        assert!(idle(&server), "nothing held after the handshake: {server:?}");

        let echoing = tokio::spawn(echo(server));
        // 3 MB in writes of every size, records of every size, read back as they come.
        let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let (mut read, mut write) = tokio::io::split(client);
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut at = 0;
                let mut size = 1;
                while at < sent.len() {
                    let end = (at + size).min(sent.len());
                    write.write_all(&sent[at..end]).await.unwrap();
                    at = end;
                    size = size * 3 % 70_001 + 1;
                }
                write.flush().await.unwrap();
                write
            })
        };
        let mut got = vec![0u8; sent.len()];
        read.read_exact(&mut got).await.unwrap();
        assert!(got == sent, "what came back is what was sent");
        let mut write = writer.await.unwrap();
        write.shutdown().await.unwrap();
        // The server saw close_notify, closed its side: the client reads a clean end.
        let mut rest = Vec::new();
        read.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let server = echoing.await.unwrap();
        assert!(idle(&server), "nothing held once all is written: {server:?}");
    }
}

#[tokio::test]
async fn a_key_update_from_the_client_is_answered_and_data_goes_on() {
    let pki = pki();
    let (server, client) =
        pair(server_config(&pki, false), client_config(&pki, false, &[&rustls::version::TLS13])).await;
    let (server, mut client) = (server.unwrap(), client.unwrap());
    let echoing = tokio::spawn(echo(server));
    for round in 0..3u8 {
        client.get_mut().1.refresh_traffic_keys().unwrap();
        let message = vec![round; 40_000];
        client.write_all(&message).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0u8; message.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, message);
    }
    client.shutdown().await.unwrap();
    echoing.await.unwrap();
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_with_an_alert() {
    let pki = pki();
    let (server, client) =
        pair(server_config(&pki, true), client_config(&pki, false, &[&rustls::version::TLS13])).await;
    assert!(server.is_err(), "the handshake failed on the server");
    // TLS 1.3: the client finishes first and learns of the refusal on its first read.
    let message = match client {
        Err(e) => e.to_string(),
        Ok(mut client) => {
            let _ = client.write_all(b"hello").await;
            let mut buf = [0u8; 16];
            match client.read(&mut buf).await {
                Err(e) => e.to_string(),
                Ok(n) => format!("read {n} bytes"),
            }
        }
    };
    assert!(message.contains("CertificateRequired"), "the client was told why: {message}");
}

#[tokio::test]
async fn bytes_that_are_not_tls_fail_the_handshake() {
    let pki = pki();
    let e =
        handshake_after(server_config(&pki, false), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect_err("refused");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
}

#[tokio::test]
async fn a_peer_that_stops_mid_handshake_or_mid_stream_ends_the_connection() {
    let pki = pki();
    // Mid-handshake: half a ClientHello, then the end of the stream.
    let e =
        handshake_after(server_config(&pki, false), &[0x16, 0x03, 0x01, 0x01, 0x00, 0x01]).await.expect_err("refused");
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");

    // Mid-stream, without close_notify: the reader is told the data may be cut.
    let (server, client) =
        pair(server_config(&pki, false), client_config(&pki, false, &[&rustls::version::TLS13])).await;
    let (mut server, client) = (server.unwrap(), client.unwrap());
    let (tcp, _) = client.into_inner();
    drop(tcp);
    let mut buf = [0u8; 16];
    let e = server.read(&mut buf).await.expect_err("cut");
    // Or the session tickets sent on the way found the socket reset.
    use std::io::ErrorKind::*;
    assert!(matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe), "{e}");
}

#[tokio::test]
async fn vectored_writes_come_out_whole_and_in_order() {
    let pki = pki();
    let (server, client) =
        pair(server_config(&pki, false), client_config(&pki, false, &[&rustls::version::TLS13])).await;
    let (mut server, mut client) = (server.unwrap(), client.unwrap());
    // A frame header beside its payload, an empty slice, then more than one write takes.
    let parts: [Vec<u8>; 4] = [vec![1; 9], vec![2; 100], Vec::new(), (0..70_000u32).map(|i| i as u8).collect()];
    let expected: Vec<u8> = parts.concat();
    let writer = tokio::spawn(async move {
        let mut at = 0;
        while at < expected.len() {
            // What is left of the parts, as slices, as a writer of frames would pass them.
            let mut skip = at;
            let mut slices = Vec::new();
            for part in &parts {
                let from = skip.min(part.len());
                skip -= from;
                slices.push(std::io::IoSlice::new(&part[from..]));
            }
            let n = server.write_vectored(&slices).await.unwrap();
            assert!(n > 0, "a vectored write makes progress");
            at += n;
        }
        server.flush().await.unwrap();
        (server, expected)
    });
    let mut got = vec![0u8; 9 + 100 + 70_000];
    client.read_exact(&mut got).await.unwrap();
    let (server, expected) = writer.await.unwrap();
    assert!(got == expected, "the bytes arrive as the slices held them");
    assert!(idle(&server), "nothing held once written: {server:?}");
}
