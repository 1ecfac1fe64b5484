//! Files an operator names, read with a bound.

use std::{io::Read, path::Path};

/// Largest certificate, key, CA bundle, credentials or token file read.
pub const MAX_SMALL_FILE: u64 = 1 << 20;

/// A small file an operator names (a certificate, a key, credentials, a token): a regular
/// file (a FIFO would block the reader forever) of at most `max` bytes.
pub fn read_small_file(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than the limit of {max} bytes")));
    }
    Ok(bytes)
}
