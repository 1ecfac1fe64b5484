//! Server secrets: random bytes, keyed hashes (HMAC-SHA256), comparisons that take the
//! same time whatever the input, and secret files kept with owner-only permissions.

use std::{io::Read, path::Path};

use subtle::ConstantTimeEq;

pub use filterplane_api::files::{read_small_file, MAX_SMALL_FILE};

/// Bytes of every generated secret.
pub const SECRET_BYTES: usize = 32;

/// `n` bytes from the kernel's random source.
pub fn random_bytes(n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// HMAC-SHA256 of `message` under `key`, in lowercase hex.
pub fn hmac_hex(key: &[u8], message: &[u8]) -> String {
    filterplane_api::hmac_sha256_hex(key, message)
}

/// Whether `a == b`, in time that depends on their lengths only.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// The secret in `path`, or a new random one written there (owner read/write only) when
/// the file does not exist. A file holding fewer than `SECRET_BYTES` bytes is refused.
pub fn load_or_create(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    match read_small_file(path, MAX_SMALL_FILE) {
        Ok(bytes) if bytes.len() >= SECRET_BYTES => return Ok(bytes),
        Ok(bytes) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: a secret needs at least {SECRET_BYTES} bytes, it has {}", path.display(), bytes.len()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let secret = random_bytes(SECRET_BYTES)?;
    // create_new: two processes starting at once agree on the first one's secret.
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(mut f) => {
            std::io::Write::write_all(&mut f, &secret)?;
            f.sync_all()?;
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create(path),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_made_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/secret");
        let a = load_or_create(&path).unwrap();
        assert_eq!(a.len(), SECRET_BYTES);
        assert_eq!(load_or_create(&path).unwrap(), a, "kept across restarts");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&path, b"short").unwrap();
        assert!(load_or_create(&path).unwrap_err().to_string().contains("at least 32 bytes"));
    }

    #[test]
    fn small_files_are_regular_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, vec![b'x'; 11]).unwrap();
        assert_eq!(read_small_file(&f, 11).unwrap().len(), 11);
        assert!(read_small_file(&f, 10).unwrap_err().to_string().contains("limit of 10 bytes"));
        assert!(read_small_file(dir.path(), 10).unwrap_err().to_string().contains("not a regular file"));
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert!(read_small_file(&fifo, 10).unwrap_err().to_string().contains("not a regular file"), "no hang");
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        assert_eq!(
            hmac_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(equal(b"abc", b"abc") && !equal(b"abc", b"abd") && !equal(b"abc", b"ab"));
    }
}
