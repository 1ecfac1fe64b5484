//! Module signatures, in the formats cosign writes with a key: public keys as PEM
//! (`PUBLIC KEY`, SubjectPublicKeyInfo) for ECDSA P-256, RSA and Ed25519; a signature over
//! a blob's bytes (ECDSA with SHA-256 in ASN.1 DER, RSA PKCS#1 v1.5 or PSS with SHA-256,
//! Ed25519 over the bytes themselves), base64 as `cosign sign-blob` prints it. Private keys
//! for signing are unencrypted PKCS#8 PEM (`PRIVATE KEY`, as `openssl genpkey` writes).

use base64::Engine;
use ring::signature::{self, UnparsedPublicKey};

/// A signature (base64 text, a file's worth) is at most this long.
pub const MAX_SIGNATURE_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not PEM: {0}")]
    Pem(String),
    #[error("{0}")]
    Unsupported(String),
}

/// A trusted public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Where it came from (a path, or `inline`), as errors and the page name it.
    pub name: String,
    kind: KeyKind,
    bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    EcdsaP256,
    Rsa,
    Ed25519,
}

/// The body of the first PEM block labelled `label`.
fn pem_block(text: &str, label: &str) -> Result<Vec<u8>, KeyError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin).ok_or_else(|| {
        let found = text.lines().find(|l| l.starts_with("-----BEGIN ")).unwrap_or("no PEM block");
        KeyError::Pem(format!("expected a {begin} block, found {found}"))
    })?;
    let body = &text[start + begin.len()..];
    let stop = body.find(&end).ok_or_else(|| KeyError::Pem(format!("{begin} without {end}")))?;
    let b64: String = body[..stop].chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| KeyError::Pem(format!("{label}: {e}")))
}

/// One DER element at the front of `input`: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |acc, b| acc << 8 | usize::from(*b)), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

impl PublicKey {
    /// A `PUBLIC KEY` PEM (SubjectPublicKeyInfo), named `name`.
    pub fn from_pem(name: &str, text: &str) -> Result<Self, KeyError> {
        let spki = pem_block(text, "PUBLIC KEY")?;
        let bad = || KeyError::Pem("PUBLIC KEY is not a SubjectPublicKeyInfo".into());
        let (0x30, body, _) = der(&spki).ok_or_else(bad)? else { return Err(bad()) };
        let (0x30, alg, rest) = der(body).ok_or_else(bad)? else { return Err(bad()) };
        let (0x03, bits, _) = der(rest).ok_or_else(bad)? else { return Err(bad()) };
        let key = bits.get(1..).ok_or_else(bad)?.to_vec(); // after the unused-bits byte
        let (0x06, oid, params) = der(alg).ok_or_else(bad)? else { return Err(bad()) };
        let kind = match oid {
            OID_EC => match der(params) {
                Some((0x06, OID_P256, _)) => KeyKind::EcdsaP256,
                _ => return Err(KeyError::Unsupported("an EC key on a curve other than P-256".into())),
            },
            OID_RSA => KeyKind::Rsa,
            OID_ED25519 => KeyKind::Ed25519,
            _ => return Err(KeyError::Unsupported("a key that is not ECDSA P-256, RSA or Ed25519".into())),
        };
        Ok(PublicKey { name: name.to_owned(), kind, bytes: key })
    }

    /// Whether `sig` (raw bytes) signs `message` under this key.
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        let algs: &[&'static dyn signature::VerificationAlgorithm] = match self.kind {
            KeyKind::EcdsaP256 => &[&signature::ECDSA_P256_SHA256_ASN1],
            KeyKind::Rsa => &[&signature::RSA_PKCS1_2048_8192_SHA256, &signature::RSA_PSS_2048_8192_SHA256],
            KeyKind::Ed25519 => &[&signature::ED25519],
        };
        algs.iter().any(|alg| UnparsedPublicKey::new(*alg, &self.bytes).verify(message, sig).is_ok())
    }
}

/// A signature as written beside a module: base64 text (whitespace around it ignored).
pub fn decode_signature(text: &[u8]) -> Result<Vec<u8>, String> {
    if text.len() > MAX_SIGNATURE_BYTES {
        return Err(format!("{} bytes, over the limit of {MAX_SIGNATURE_BYTES}", text.len()));
    }
    let text = std::str::from_utf8(text).map_err(|_| "not base64 text".to_owned())?;
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(compact).map_err(|e| format!("not base64: {e}"))
}

/// Which of `keys` signed `message` with `sig`, if any.
pub fn verified_by<'k>(keys: &'k [PublicKey], message: &[u8], sig: &[u8]) -> Option<&'k PublicKey> {
    keys.iter().find(|k| k.verifies(message, sig))
}

/// Signs `message` with an unencrypted PKCS#8 private key (ECDSA P-256, RSA or Ed25519),
/// as cosign would with the same key: the raw signature.
pub fn sign(private_pem: &str, message: &[u8]) -> Result<Vec<u8>, KeyError> {
    if private_pem.contains("-----BEGIN EC PRIVATE KEY-----") || private_pem.contains("ENCRYPTED") {
        return Err(KeyError::Unsupported(
            "an EC (SEC1) or encrypted private key: convert it with `openssl pkcs8 -topk8 -nocrypt`".into(),
        ));
    }
    let pkcs8 = pem_block(private_pem, "PRIVATE KEY")?;
    let rng = ring::rand::SystemRandom::new();
    if let Ok(k) = signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng) {
        return k
            .sign(&rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| KeyError::Unsupported("ECDSA signing failed".into()));
    }
    if let Ok(k) = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8) {
        return Ok(k.sign(message).as_ref().to_vec());
    }
    if let Ok(k) = signature::RsaKeyPair::from_pkcs8(&pkcs8) {
        let mut sig = vec![0; k.public().modulus_len()];
        return k
            .sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
            .map(|()| sig)
            .map_err(|_| KeyError::Unsupported("RSA signing failed".into()));
    }
    Err(KeyError::Unsupported("a private key that is not ECDSA P-256, RSA or Ed25519 in PKCS#8".into()))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// A key pair made by openssl (code that is not ours): (private PEM, public PEM).
    fn openssl_key(dir: &std::path::Path, name: &str, args: &[&str]) -> (String, String) {
        let private = dir.join(format!("{name}.key"));
        let public = dir.join(format!("{name}.pub"));
        assert!(Command::new("openssl")
            .arg("genpkey")
            .args(args)
            .arg("-out")
            .arg(&private)
            .status()
            .unwrap()
            .success());
        assert!(Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .unwrap()
            .success());
        (std::fs::read_to_string(&private).unwrap(), std::fs::read_to_string(&public).unwrap())
    }

    /// openssl's signature of `blob` (as `cosign sign-blob` makes it with such a key).
    fn openssl_sign(dir: &std::path::Path, key: &str, blob: &[u8], raw: bool) -> Vec<u8> {
        let (k, b, s) = (dir.join("k.pem"), dir.join("blob"), dir.join("sig"));
        std::fs::write(&k, key).unwrap();
        std::fs::write(&b, blob).unwrap();
        let mut cmd = Command::new("openssl");
        if raw {
            cmd.args(["pkeyutl", "-sign", "-rawin", "-inkey"]).arg(&k).arg("-in").arg(&b).arg("-out").arg(&s);
        } else {
            cmd.args(["dgst", "-sha256", "-sign"]).arg(&k).arg("-out").arg(&s).arg(&b);
        }
        assert!(cmd.status().unwrap().success());
        std::fs::read(&s).unwrap()
    }

    #[test]
    fn keys_and_signatures_made_by_openssl_verify_and_others_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let blob = b"\0asm module bytes";
        for (name, args, raw) in [
            ("p256", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..], false),
            ("rsa", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..], false),
            ("ed25519", &["-algorithm", "ED25519"][..], true),
        ] {
            let (private, public) = openssl_key(dir.path(), name, args);
            let key = PublicKey::from_pem(name, &public).unwrap();
            let sig = openssl_sign(dir.path(), &private, blob, raw);
            assert!(key.verifies(blob, &sig), "{name}: openssl's signature");
            assert!(!key.verifies(b"other bytes", &sig), "{name}: over other bytes");
            let ours = sign(&private, blob).unwrap();
            assert!(key.verifies(blob, &ours), "{name}: our signature");
            let b64 = base64::engine::general_purpose::STANDARD.encode(&sig);
            assert_eq!(decode_signature(format!("{b64}\n").as_bytes()).unwrap(), sig);
        }
        let (_, other) = openssl_key(dir.path(), "other", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let (private, _) =
            openssl_key(dir.path(), "signer", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        let sig = openssl_sign(dir.path(), &private, blob, false);
        let keys = [PublicKey::from_pem("other", &other).unwrap()];
        assert_eq!(verified_by(&keys, blob, &sig), None, "a key that did not sign it");
    }

    #[test]
    fn keys_that_are_not_supported_are_refused_with_why() {
        let dir = tempfile::tempdir().unwrap();
        let (_, p384) = openssl_key(dir.path(), "p384", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]);
        assert!(matches!(PublicKey::from_pem("k", &p384), Err(KeyError::Unsupported(m)) if m.contains("P-256")));
        assert!(matches!(PublicKey::from_pem("k", "garbage"), Err(KeyError::Pem(_))));
        assert!(decode_signature(&vec![b'A'; MAX_SIGNATURE_BYTES + 1]).is_err());
        assert!(decode_signature(b"!!!").is_err());
    }
}
