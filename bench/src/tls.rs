//! Mutual TLS for the load generator: each connection verifies the server against a CA
//! and presents a client certificate, as Envoys do against a server run with
//! `--xds-client-ca` (and `--node-identity`).

use std::{path::Path, sync::Arc};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl ClientTls {
    /// From PEM files: the CA that signed the server's certificate, and this client's
    /// certificate and key. `server_name` is what the server's certificate must name.
    pub fn load(ca: &Path, cert: &Path, key: &Path, server_name: &str) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("read {}", ca.display()))? {
            roots.add(c.with_context(|| format!("{}: bad PEM", ca.display()))?)?;
        }
        let chain = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("read {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: bad PEM", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("read {}", key.display()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = ServerName::try_from(server_name.to_owned())?;
        Ok(Self { config: Arc::new(config), server_name })
    }

    /// A gRPC channel to `endpoint` over a fresh TLS connection.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        let tls = self.clone();
        let connector = tower::service_fn(move |uri: Uri| {
            let tls = tls.clone();
            async move {
                let host = uri.host().unwrap_or("127.0.0.1").trim_matches(|c| c == '[' || c == ']').to_owned();
                let tcp = tokio::net::TcpStream::connect((host.as_str(), uri.port_u16().unwrap_or(443))).await?;
                tcp.set_nodelay(true)?;
                let connector = tokio_rustls::TlsConnector::from(tls.config);
                let stream = connector.connect(tls.server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        endpoint.connect_with_connector(connector).await
    }
}
