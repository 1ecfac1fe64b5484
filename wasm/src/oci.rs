//! OCI registries: pulling a Wasm module in either layout Envoy users meet (the Wasm OCI
//! artifact, one `application/vnd.module.wasm.content.layer.v1+wasm` layer; or the
//! single-layer image Istio accepts, a tar.gz holding `plugin.wasm`), and pushing one as
//! a Wasm OCI artifact.

use std::io::Read;

use bytes::Bytes;
use oci_client::{
    client::{ClientConfig, ClientProtocol, Config, ImageLayer},
    manifest::{OciImageManifest, OciManifest},
    secrets::RegistryAuth,
    Client, Reference, RegistryOperation,
};

use crate::download::FetchSettings;

/// The Wasm OCI artifact layer and config media types (as Istio and `wasm push` write them).
pub const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
/// The CNCF Wasm artifact layer, also accepted.
const CNCF_WASM_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// Image layers that may hold `plugin.wasm` (Istio's single-layer image).
const TAR_GZ_LAYERS: [&str; 2] =
    ["application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip"];

pub fn client(settings: &FetchSettings) -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(settings.insecure_registries.clone()),
        connect_timeout: Some(settings.timeout),
        read_timeout: Some(settings.timeout),
        extra_root_certificates: settings
            .registry_ca_pem
            .iter()
            .map(|pem| oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data: pem.clone(),
            })
            .collect(),
        ..Default::default()
    })
}

pub fn reference(registry: &str, repository: &str, tag: Option<&str>, digest: Option<&str>) -> Reference {
    match (tag, digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(registry.into(), repository.into(), t.into(), d.into()),
        (None, Some(d)) => Reference::with_digest(registry.into(), repository.into(), d.into()),
        (t, None) => Reference::with_tag(registry.into(), repository.into(), t.unwrap_or("latest").into()),
    }
}

#[derive(Debug)]
pub enum PullError {
    /// Worth retrying (connection refused, timeout, 5xx).
    Transient(String),
    /// Will not get better (not found, unauthorized, too large).
    Permanent(String),
    /// The artifact is not a Wasm module in a layout we know.
    Invalid(String),
}

fn classify(e: oci_client::errors::OciDistributionError) -> PullError {
    let text = e.to_string();
    let lower = text.to_lowercase();
    // A refused login (401/403, "authentication failure") will not pass on a retry.
    let permanent = ["not found", "unknown", "unauthorized", "denied", "authentication", "404", "401", "403"];
    if permanent.iter().any(|p| lower.contains(p)) {
        PullError::Permanent(text)
    } else {
        PullError::Transient(text)
    }
}

/// Largest manifest read: a real one is a few KB, and the OCI client library would read
/// an endless one into memory.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Where a registry is reached, and how: the library's auth (tokens), Filterplane's own
/// HTTP client for the manifest (read under a bound).
pub struct Registry<'a> {
    pub client: &'a Client,
    pub http: &'a reqwest::Client,
    pub insecure: &'a [String],
}

impl Registry<'_> {
    /// The image manifest `reference` names (an image index resolved to its linux/amd64
    /// entry, else its first) and its digest.
    async fn manifest(
        &self,
        reference: &Reference,
        auth: &RegistryAuth,
    ) -> Result<(OciImageManifest, String, Option<String>), PullError> {
        let token = self.client.auth(reference, auth, RegistryOperation::Pull).await.map_err(classify)?;
        let which = reference.digest().or(reference.tag()).unwrap_or("latest");
        let (manifest, digest) = self.manifest_once(reference, token.as_deref(), auth, which).await?;
        if let Some(pinned) = reference.digest() {
            if pinned != digest {
                return Err(PullError::Invalid(format!("the registry sent manifest {digest} for {pinned}")));
            }
        }
        match manifest {
            OciManifest::Image(m) => Ok((m, digest, token)),
            OciManifest::ImageIndex(index) => {
                let entry = index
                    .manifests
                    .iter()
                    .find(|e| {
                        e.platform
                            .as_ref()
                            .is_some_and(|p| json_text(&p.os) == "linux" && json_text(&p.architecture) == "amd64")
                    })
                    .or(index.manifests.first())
                    .ok_or_else(|| PullError::Invalid("an empty image index".into()))?;
                match self.manifest_once(reference, token.as_deref(), auth, &entry.digest).await? {
                    (OciManifest::Image(m), digest) => Ok((m, digest, token)),
                    _ => Err(PullError::Invalid("an image index inside an image index".into())),
                }
            }
        }
    }

    /// A layer's bytes through Filterplane's own client (the SSRF guard sees every
    /// address, redirects to blob storage included), at most the size the manifest
    /// declared, checked against its digest.
    async fn blob(
        &self,
        reference: &Reference,
        token: Option<&str>,
        auth: &RegistryAuth,
        layer: &oci_client::manifest::OciDescriptor,
    ) -> Result<Vec<u8>, PullError> {
        let url = format!("{}/v2/{}/blobs/{}", self.base(reference), reference.repository(), layer.digest);
        let req = authorize(self.http.get(&url), token, auth);
        let limit = u64::try_from(layer.size).unwrap_or(0);
        let body = crate::download::get_bounded(req, &url, "layer (past the size its manifest declared)", limit)
            .await
            .map_err(|(retry, e)| if retry { PullError::Transient(e) } else { PullError::Permanent(e) })?;
        if let Some(want) = layer.digest.strip_prefix("sha256:") {
            let got = crate::cache::sha256_hex(&body);
            if got != want {
                return Err(PullError::Invalid(format!(
                    "{url}: the blob's sha256 is {got}, not the {want} its manifest names"
                )));
            }
        }
        Ok(body.to_vec())
    }

    /// `http(s)://REGISTRY`.
    fn base(&self, reference: &Reference) -> String {
        let registry = reference.resolve_registry();
        let scheme = if self.insecure.iter().any(|r| r == registry) { "http" } else { "https" };
        format!("{scheme}://{registry}")
    }

    async fn manifest_once(
        &self,
        reference: &Reference,
        token: Option<&str>,
        auth: &RegistryAuth,
        which: &str,
    ) -> Result<(OciManifest, String), PullError> {
        let url = format!("{}/v2/{}/manifests/{which}", self.base(reference), reference.repository());
        let req = authorize(self.http.get(&url).header(reqwest::header::ACCEPT, MANIFEST_TYPES), token, auth);
        let body = crate::download::get_bounded(req, &url, "manifest", MAX_MANIFEST_BYTES as u64)
            .await
            .map_err(|(retry, e)| if retry { PullError::Transient(e) } else { PullError::Permanent(e) })?;
        let digest = format!("sha256:{}", crate::cache::sha256_hex(&body));
        let manifest = serde_json::from_slice(&body)
            .map_err(|e| PullError::Invalid(format!("{url}: not an OCI manifest: {e}")))?;
        Ok((manifest, digest))
    }
}

/// The registry's token, else the user's basic credentials.
fn authorize(req: reqwest::RequestBuilder, token: Option<&str>, auth: &RegistryAuth) -> reqwest::RequestBuilder {
    match (token, auth) {
        (Some(t), _) => req.bearer_auth(t),
        (None, RegistryAuth::Basic(user, password)) => req.basic_auth(user, Some(password)),
        (None, RegistryAuth::Bearer(t)) => req.bearer_auth(t),
        _ => req,
    }
}

/// A value's JSON string form (`linux`, `amd64`), or empty.
fn json_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

pub struct Pulled {
    pub bytes: Bytes,
    pub manifest_digest: String,
    /// The module came from the cache: only the manifest was fetched.
    pub from_cache: bool,
}

/// Resolves `reference` to a manifest and takes the module from it, using `cached` for a
/// module the cache already holds.
pub async fn pull(
    registry: &Registry<'_>,
    reference: &Reference,
    auth: &RegistryAuth,
    max_bytes: u64,
    cached: impl Fn(&str) -> Option<Bytes>,
) -> Result<Pulled, PullError> {
    let (manifest, manifest_digest, token) = registry.manifest(reference, auth).await?;
    let wasm_layer = manifest.layers.iter().find(|l| l.media_type == WASM_LAYER || l.media_type == CNCF_WASM_LAYER);
    let (layer, tarball) = match (wasm_layer, manifest.layers.as_slice()) {
        (Some(l), _) => (l, false),
        (None, [one]) if TAR_GZ_LAYERS.contains(&one.media_type.as_str()) => (one, true),
        _ => {
            let types: Vec<&str> = manifest.layers.iter().map(|l| l.media_type.as_str()).collect();
            return Err(PullError::Invalid(format!(
                "no Wasm layer ({WASM_LAYER}) and not a single-layer image; layers: {}",
                types.join(", ")
            )));
        }
    };
    if layer.size < 0 || layer.size as u64 > max_bytes {
        return Err(PullError::Permanent(format!(
            "the module layer is {} bytes, over the limit of {max_bytes}",
            layer.size
        )));
    }
    // A raw Wasm layer's digest is the module's SHA-256.
    if !tarball {
        if let Some(bytes) = layer.digest.strip_prefix("sha256:").and_then(&cached) {
            return Ok(Pulled { bytes, manifest_digest, from_cache: true });
        }
    }
    // At most what the manifest declared: a registry that sends more (or without end) is
    // cut off there, not buffered.
    let blob = registry.blob(reference, token.as_deref(), auth, layer).await?;
    let bytes = if tarball {
        // Decompression is CPU work of the registry's choosing: off the async runtime.
        tokio::task::spawn_blocking(move || plugin_from_tar_gz(&blob, max_bytes))
            .await
            .map_err(|e| PullError::Invalid(format!("unpacking the layer failed: {e}")))?
            .map_err(PullError::Invalid)?
    } else {
        blob
    };
    Ok(Pulled { bytes: Bytes::from(bytes), manifest_digest, from_cache: false })
}

/// cosign's payload layers and their signature annotation.
pub const COSIGN_PAYLOAD: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const COSIGN_SIGNATURE: &str = "dev.cosignproject.cosign/signature";
/// A signature payload is at most this long; at most this many are read per module.
pub const MAX_PAYLOAD_BYTES: i64 = 64 * 1024;
pub const MAX_SIGNATURE_LAYERS: usize = 32;

/// cosign's signatures of the manifest `manifest_digest` (`sha256:HEX`), from the tag
/// `sha256-HEX.sig` of the same repository: each payload layer's bytes and its
/// `dev.cosignproject.cosign/signature` annotation. Empty when there is no such tag.
pub async fn cosign_signatures(
    registry: &Registry<'_>,
    reference: &Reference,
    auth: &RegistryAuth,
    manifest_digest: &str,
) -> Result<Vec<(Vec<u8>, String)>, PullError> {
    let token = registry.client.auth(reference, auth, RegistryOperation::Pull).await.map_err(classify)?;
    let tag = format!("{}.sig", manifest_digest.replace(':', "-"));
    let manifest = match registry.manifest_once(reference, token.as_deref(), auth, &tag).await {
        Ok((OciManifest::Image(m), _)) => m,
        Ok(_) => return Err(PullError::Invalid(format!("{tag}: an image index, not cosign's signature manifest"))),
        Err(PullError::Permanent(e)) if e.contains("HTTP 404") => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for layer in manifest.layers.iter().filter(|l| l.media_type == COSIGN_PAYLOAD).take(MAX_SIGNATURE_LAYERS) {
        let Some(sig) = layer.annotations.as_ref().and_then(|a| a.get(COSIGN_SIGNATURE)) else { continue };
        if layer.size < 0 || layer.size > MAX_PAYLOAD_BYTES {
            return Err(PullError::Invalid(format!(
                "{tag}: a signature payload of {} bytes, over the limit of {MAX_PAYLOAD_BYTES}",
                layer.size
            )));
        }
        let payload = registry.blob(reference, token.as_deref(), auth, layer).await?;
        out.push((payload, sig.clone()));
    }
    Ok(out)
}

/// Pushes cosign's signature of the image `manifest_digest` beside it (the tag
/// `sha256-HEX.sig`): a simplesigning payload naming the manifest, signed with
/// `private_pem`, as `cosign sign --key` writes it. The tag it went to.
pub async fn push_cosign_signature(
    client: &Client,
    reference: &Reference,
    auth: &RegistryAuth,
    manifest_digest: &str,
    private_pem: &str,
) -> anyhow::Result<String> {
    use base64::Engine;
    let payload = serde_json::to_vec(&serde_json::json!({
        "critical": {
            "identity": { "docker-reference": format!("{}/{}", reference.registry(), reference.repository()) },
            "image": { "docker-manifest-digest": manifest_digest },
            "type": "cosign container image signature",
        },
        "optional": null,
    }))?;
    let sig = crate::sign::sign(private_pem, &payload)?;
    let annotations = std::collections::BTreeMap::from([(
        COSIGN_SIGNATURE.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(sig),
    )]);
    let tag = format!("{}.sig", manifest_digest.replace(':', "-"));
    let target = Reference::with_tag(reference.registry().to_owned(), reference.repository().to_owned(), tag.clone());
    let layers = vec![ImageLayer::new(payload, COSIGN_PAYLOAD.to_owned(), Some(annotations))];
    let config = Config::new(b"{}".to_vec(), "application/vnd.oci.image.config.v1+json".to_owned(), None);
    let manifest = OciImageManifest::build(&layers, &config, None);
    client.push(&target, &layers, config, auth, Some(manifest)).await?;
    Ok(tag)
}

/// Whether a cosign payload says it signs the image `manifest_digest`.
pub fn payload_names(payload: &[u8], manifest_digest: &str) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else { return false };
    v["critical"]["type"] == "cosign container image signature"
        && v["critical"]["image"]["docker-manifest-digest"] == manifest_digest
}

/// `plugin.wasm` (or the only `*.wasm`) from a gzipped tar layer.
fn plugin_from_tar_gz(blob: &[u8], max_bytes: u64) -> Result<Vec<u8>, String> {
    // A gzip bomb expands a small layer without end: read at most twice the module limit
    // (the module plus whatever else the image holds) and call the rest truncated.
    let inflated = flate2::read::GzDecoder::new(blob).take(max_bytes.saturating_mul(2).max(1 << 20));
    let mut archive = tar::Archive::new(inflated);
    let mut found: Option<Vec<u8>> = None;
    for entry in archive.entries().map_err(|e| format!("layer is not a tar.gz: {e}"))? {
        let mut entry = entry.map_err(|e| format!("layer is not a tar.gz: {e}"))?;
        let path = entry.path().map_err(|e| e.to_string())?.to_string_lossy().into_owned();
        let name = path.rsplit('/').next().unwrap_or_default().to_owned();
        if !name.ends_with(".wasm") {
            continue;
        }
        if entry.size() > max_bytes {
            return Err(format!("{path} is {} bytes, over the limit of {max_bytes}", entry.size()));
        }
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        if name == "plugin.wasm" {
            return Ok(bytes);
        }
        if found.replace(bytes).is_some() {
            return Err("the layer holds several .wasm files and none is plugin.wasm".into());
        }
    }
    found.ok_or_else(|| "the layer holds no plugin.wasm".into())
}

/// Pushes `module` as a Wasm OCI artifact; returns the manifest digest.
pub async fn push(
    client: &Client,
    reference: &Reference,
    auth: &RegistryAuth,
    module: Vec<u8>,
) -> anyhow::Result<String> {
    let layers = vec![ImageLayer::new(module, WASM_LAYER.to_owned(), None)];
    let config = Config::new(b"{}".to_vec(), WASM_CONFIG.to_owned(), None);
    let manifest = OciImageManifest::build(&layers, &config, None);
    client.push(reference, &layers, config, auth, Some(manifest)).await?;
    Ok(client.fetch_manifest_digest(reference, auth).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn single_layer_image_gives_its_plugin_wasm() {
        assert_eq!(plugin_from_tar_gz(&tar_gz(&[("README", b"x"), ("plugin.wasm", b"\0asm")]), 100).unwrap(), b"\0asm");
        assert_eq!(plugin_from_tar_gz(&tar_gz(&[("filter.wasm", b"\0asm")]), 100).unwrap(), b"\0asm");
        assert!(plugin_from_tar_gz(&tar_gz(&[("a.wasm", b"1"), ("b.wasm", b"2")]), 100).is_err());
        assert!(plugin_from_tar_gz(&tar_gz(&[("plugin.wasm", &[0u8; 200])]), 100).unwrap_err().contains("limit"));
        assert!(plugin_from_tar_gz(b"not gzip", 100).is_err());
    }

    #[test]
    fn a_gzip_bomb_is_not_inflated_past_the_limit() {
        // 64 MiB of zeros ahead of the plugin: compresses to ~64 KiB.
        let bomb = tar_gz(&[("padding", &vec![0u8; 64 << 20]), ("plugin.wasm", b"\0asm")]);
        assert!(bomb.len() < 1 << 20);
        let e = plugin_from_tar_gz(&bomb, 100).unwrap_err();
        assert!(e.contains("no plugin.wasm") || e.contains("tar"), "{e}");
    }

    #[test]
    fn a_refused_login_is_permanent_a_timeout_is_not() {
        use oci_client::errors::OciDistributionError as E;
        assert!(matches!(classify(E::AuthenticationFailure("bad credentials".into())), PullError::Permanent(_)));
        assert!(matches!(classify(E::GenericError(Some("connection timed out".into()))), PullError::Transient(_)));
    }

    #[test]
    fn references_default_to_latest() {
        assert_eq!(reference("r:5000", "x/y", None, None).whole(), "r:5000/x/y:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(reference("r", "x", None, Some(&d)).whole(), format!("r/x@{d}"));
    }
}
