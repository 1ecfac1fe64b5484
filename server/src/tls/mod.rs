//! TLS on Filterplane's ports (rustls): server certificates read from files and read again
//! when the files change (checked at each handshake, so a renewed certificate is used by
//! the next connection and open ones go on), optional client certificates (mTLS) with
//! the identity they carry. (Connections are accepted, and handshakes run, in
//! `accept`; `conn` is the connection itself, holding no buffer while idle.)

mod conn;

pub use conn::TlsConn;

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::SystemTime,
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_path_buf(), message: message.to_string() }
}

/// Whether clients must show a certificate from the client CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// A client without a valid certificate is refused in the handshake.
    #[default]
    Required,
    /// A client may connect without a certificate; it is then unauthenticated (no node
    /// identity, and no sensitive resources with --sensitive-to-authenticated-only). A
    /// certificate it does show must still be valid.
    Optional,
}

/// A port's TLS files, as the command line names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CAs client certificates must chain to (mTLS).
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

impl TlsFiles {
    /// From a port's flags: both of cert and key, or neither (plaintext); a client CA
    /// needs them.
    pub fn from_flags(
        port: &str,
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
        client_ca: Option<&PathBuf>,
        client_auth: ClientAuth,
    ) -> Result<Option<TlsFiles>, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: client_ca.cloned(),
                client_auth,
            })),
            (None, None) if client_ca.is_some() => Err(TlsError::Config(format!(
                "--{port}-client-ca needs --{port}-tls-cert and --{port}-tls-key: client certificates are checked in a TLS handshake"
            ))),
            (None, None) => Ok(None),
            _ => Err(TlsError::Config(format!("--{port}-tls-cert and --{port}-tls-key go together"))),
        }
    }

    /// What the start-up line says of this port: `TLS` or `mTLS (...)`.
    pub fn security(&self) -> String {
        match (&self.client_ca, self.client_auth) {
            (None, _) => "TLS".into(),
            (Some(_), ClientAuth::Required) => "mTLS (client certificate required)".into(),
            (Some(_), ClientAuth::Optional) => "TLS, client certificate optional".into(),
        }
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(self.cert.as_path()), Some(self.key.as_path()), self.client_ca.as_deref()].into_iter().flatten()
    }
}

/// What a file looked like when it was read: a change of any of it means read again.
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    files
        .paths()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len(), m.ino()))))
        .collect()
}

/// A port's server config, built again when its files change.
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    alpn: Vec<Vec<u8>>,
    port: &'static str,
    /// The config in use and the stamp it was read at; the last stamp that failed (so a
    /// bad file is reported once, not at every handshake).
    current: Mutex<(Stamp, Arc<ServerConfig>, Option<Stamp>)>,
    metrics: Arc<Metrics>,
}

impl ReloadingTls {
    /// Reads the files; an error here is fatal (nothing to serve with).
    pub fn new(
        port: &'static str,
        files: TlsFiles,
        alpn: &[&[u8]],
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let at = stamp(&files);
        let config = build(&files, &alpn)?;
        Ok(Arc::new(Self { files, alpn, port, current: Mutex::new((at, config, None)), metrics }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The config for the next handshake: read again if a file changed since. A change
    /// that does not load (a key not written yet, a certificate that does not match it)
    /// keeps the previous config, is logged once, and is tried again when the files
    /// change again.
    pub fn config(&self) -> Arc<ServerConfig> {
        let now = stamp(&self.files);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if now == current.0 || current.2.as_ref() == Some(&now) {
            return current.1.clone();
        }
        match build(&self.files, &self.alpn) {
            Ok(config) => {
                tracing::info!(port = self.port, cert = %self.files.cert.display(), "TLS files changed: new connections use them; open ones go on");
                self.metrics.tls_reloads.get_or_create(&crate::metrics::ResultLabel::new("applied")).inc();
                *current = (now, config, None);
            }
            Err(e) => {
                tracing::warn!(port = self.port, error = %e, "TLS files changed but do not load; still using the previous ones");
                self.metrics.tls_reloads.get_or_create(&crate::metrics::ResultLabel::new("failed")).inc();
                current.2 = Some(now);
            }
        }
        current.1.clone()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn build(files: &TlsFiles, alpn: &[Vec<u8>]) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| file_error(&files.key, format!("no PEM private key: {e}")))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|e| file_error(ca, format!("not a CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let verifier = match files.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| file_error(ca, e))?)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| file_error(&files.cert, format!("certificate and key do not go together: {e}")))?;
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// A PEM file: regular, at most `secret::MAX_SMALL_FILE` bytes.
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::secret::read_small_file(path, crate::secret::MAX_SMALL_FILE).map_err(|e| file_error(path, e))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// Who a client proved to be with its certificate (mTLS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// URI SANs, e.g. `spiffe://example.org/ns/edge/sa/gateway`.
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// The subject, for messages.
    pub subject: String,
}

impl PeerIdentity {
    /// Reads the SANs of a (verified) leaf certificate.
    pub fn from_der(der: &[u8]) -> Option<PeerIdentity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut identity = PeerIdentity { subject: cert.subject().to_string(), ..Default::default() };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::URI(u) => identity.uris.push((*u).to_owned()),
                    x509_parser::extensions::GeneralName::DNSName(d) => identity.dns.push((*d).to_owned()),
                    _ => {}
                }
            }
        }
        Some(identity)
    }

    /// Every SAN as `uri:...` / `dns:...`, for messages.
    pub fn names(&self) -> Vec<String> {
        self.uris.iter().map(|u| format!("uri:{u}")).chain(self.dns.iter().map(|d| format!("dns:{d}"))).collect()
    }
}

/// What a connection tells the services about its client.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    /// The connection is TLS.
    pub tls: bool,
    /// The client showed a certificate the client CA vouches for.
    pub identity: Option<Arc<PeerIdentity>>,
}

/// An accepted connection, TLS or not.
#[derive(Debug)]
pub enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

impl MaybeTls {
    pub fn peer(&self) -> PeerInfo {
        match self {
            MaybeTls::Plain(s) => PeerInfo { addr: s.peer_addr().ok(), tls: false, identity: None },
            MaybeTls::Tls(s) => {
                let identity = s
                    .common()
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| PeerIdentity::from_der(leaf.as_ref()))
                    .map(Arc::new);
                PeerInfo { addr: s.tcp().peer_addr().ok(), tls: true, identity }
            }
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_come_in_pairs() {
        let p = PathBuf::from("x.pem");
        assert!(TlsFiles::from_flags("xds", None, None, None, ClientAuth::Required).unwrap().is_none());
        assert!(TlsFiles::from_flags("xds", Some(&p), None, None, ClientAuth::Required).is_err());
        let e = TlsFiles::from_flags("xds", None, None, Some(&p), ClientAuth::Required).unwrap_err();
        assert!(e.to_string().contains("--xds-client-ca needs --xds-tls-cert"), "{e}");
        let f = TlsFiles::from_flags("xds", Some(&p), Some(&p), Some(&p), ClientAuth::Required).unwrap().unwrap();
        assert_eq!(f.security(), "mTLS (client certificate required)");
    }
}
