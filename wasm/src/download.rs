//! Downloads, bounded, and the settings every module source is fetched under: a leaf
//! that the HTTP(S) and OCI sources both use.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;

/// How fetching behaves; from the command line.
#[derive(Debug, Clone)]
pub struct FetchSettings {
    /// `file://` modules must be under this directory.
    pub file_root: PathBuf,
    /// Registries (`host:port`) that may be reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Per attempt.
    pub timeout: Duration,
    pub attempts: u32,
    pub max_module_bytes: u64,
    /// How long one reload waits for all its modules: a fetch still running then counts
    /// as failed for that reload (the plugin keeps its previous version), so a slow
    /// source never holds the rest of the config.
    pub deadline: Duration,
    /// Addresses HTTP(S) downloads may not connect to (SSRF guard).
    pub guard: Arc<crate::guard::AddressGuard>,
    /// Credentials for plugins without `image_pull_secret` (`--registry-auth-file`, else
    /// `$DOCKER_CONFIG/config.json`): a registry without an entry is pulled anonymously.
    pub registry_auth_file: Option<PathBuf>,
    /// PEM certificates of private CAs registries and module servers use
    /// (`--registry-ca-file`), trusted besides the system's.
    pub registry_ca_pem: Option<Vec<u8>>,
}

/// Sends `request` (a GET of `url`) and reads the body (`what` it is, for the error), at
/// most `limit` bytes: a server that sends more, or without end, is cut off there. The
/// error says whether asking again may help (a connection failure or a 5xx may; a 4xx
/// or an oversized body will not).
pub async fn get_bounded(
    request: reqwest::RequestBuilder,
    url: &str,
    what: &str,
    limit: u64,
) -> Result<Bytes, (bool, String)> {
    let mut res = request.send().await.map_err(|e| {
        // A refused address (the SSRF guard) will not change by asking again.
        let text = error_chain(&e);
        (!text.contains("refused:") && !text.contains("redirect to"), format!("{url}: {text}"))
    })?;
    let status = res.status();
    if !status.is_success() {
        return Err((status.is_server_error(), format!("{url}: HTTP {status}")));
    }
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| (true, format!("{url}: {e}")))? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err((false, format!("{url}: {what} larger than the limit of {limit} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// An error with its causes, as one line (reqwest puts the reason in a source).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}
