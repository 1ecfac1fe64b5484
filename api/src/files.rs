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

/// Longest token file read.
pub const MAX_TOKEN_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the token file is empty")]
    Empty,
    #[error("the token file is over {MAX_TOKEN_BYTES} bytes")]
    TooLong,
}

/// The token in `path`: its text without surrounding whitespace.
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    let bytes = read_small_file(path, MAX_TOKEN_BYTES).map_err(|e| {
        if e.to_string().contains("limit of") {
            TokenError::TooLong
        } else {
            TokenError::Io(e)
        }
    })?;
    let text = String::from_utf8(bytes).map_err(|_| TokenError::Io(std::io::Error::other("not UTF-8 text")))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    Ok(token.to_owned())
}
