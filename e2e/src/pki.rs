//! Certificates made at test time (rcgen): a CA, the server's certificate for
//! 127.0.0.1/localhost, and client certificates with the SANs a test needs, written as
//! PEM files.

use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};

/// A CA that signs certificates into `dir`.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    /// The CA certificate's PEM file.
    pub cert: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    /// A new CA named `name`, its certificate in `dir/NAME-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("self-sign");
        let cert = dir.join(format!("{name}-ca.pem"));
        fs::write(&cert, issuer.pem()).expect("write CA");
        Ca { issuer, dir: dir.to_path_buf(), cert }
    }

    /// A certificate for `sans` (`uri:...`, `dns:...`, `ip:...`), written as
    /// `dir/FILE.pem` and `dir/FILE-key.pem`.
    pub fn issue(&self, file: &str, sans: &[&str], server: bool) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, file);
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.split_once(':') {
                Some(("uri", v)) => SanType::URI(v.try_into().expect("URI SAN")),
                Some(("dns", v)) => SanType::DnsName(v.try_into().expect("DNS SAN")),
                Some(("ip", v)) => SanType::IpAddress(v.parse().expect("IP SAN")),
                _ => panic!("SAN {s}: uri:, dns: or ip:"),
            })
            .collect();
        params.extended_key_usages =
            vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let pair = Pair { cert: self.dir.join(format!("{file}.pem")), key: self.dir.join(format!("{file}-key.pem")) };
        write_pair(&pair, &cert.pem(), &key.serialize_pem());
        pair
    }

    /// The usual server certificate: 127.0.0.1 and localhost.
    pub fn server(&self, file: &str) -> Pair {
        self.issue(file, &["ip:127.0.0.1", "dns:localhost"], true)
    }
}

/// Writes the key first and the certificate last, each by rename: a reader never sees
/// half a file.
pub fn write_pair(pair: &Pair, cert_pem: &str, key_pem: &str) {
    for (path, text) in [(&pair.key, key_pem), (&pair.cert, cert_pem)] {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text).expect("write PEM");
        fs::rename(&tmp, path).expect("rename PEM");
    }
}

/// The serial number of the certificate a TLS server on `127.0.0.1:port` presents, as
/// `openssl s_client` sees it (with `client` as the client certificate).
pub fn served_serial(port: u16, ca: &Path, client: &Pair) -> Option<String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -alpn h2 -CAfile {} -cert {} -key {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
            ca.display(),
            client.cert.display(),
            client.key.display()
        ))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    text.strip_prefix("serial=").map(str::to_owned)
}

/// A certificate file's serial number.
pub fn file_serial(cert: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .expect("openssl runs");
    String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("serial=").to_owned()
}
