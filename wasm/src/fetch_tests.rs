//! Tests of `fetch.rs`.

use std::path::Path;

use filterplane_config::{compile::Origin, model::WasmPluginSpec};

use super::*;
use crate::check::tests::header_module;

fn fetcher(dir: &Path, file_root: &Path) -> WasmFetcher {
    let cache = WasmModuleCache::open(&dir.join("cache"), 1 << 20).unwrap();
    let settings = FetchSettings {
        file_root: file_root.to_path_buf(),
        insecure_registries: vec!["127.0.0.1:1".into()],
        timeout: Duration::from_secs(2),
        attempts: 1,
        max_module_bytes: 1 << 20,
        deadline: Duration::from_secs(60),
        guard: Default::default(),
        registry_auth_file: None,
        registry_ca_pem: None,
    };
    WasmFetcher::new(cache, settings, WasmMetrics::default()).unwrap()
}

fn plugin(yaml: &str, base: &Path) -> WasmPlugin {
    let spec: WasmPluginSpec = serde_yaml::from_str(yaml).unwrap();
    let origin = Origin { file: base.join("c.yaml"), line: None.into(), path: "wasm_plugins[0]".into() };
    WasmPlugin::from_spec(&spec, base, origin).unwrap()
}

/// An HTTP server on `ip` that answers every GET with `reply` (status line + headers
/// + body), and counts the requests.
async fn http_server(ip: &str, reply: Vec<u8>) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&reply).await;
        }
    });
    (format!("http://{addr}"), hits)
}

#[tokio::test]
async fn denied_addresses_are_refused_directly_and_through_redirects() {
    let dir = tempfile::tempdir().unwrap();
    let module = header_module("guarded");
    let sha = crate::cache::sha256_hex(&module);
    // The module on 127.0.0.2 (denied below), and a redirect to it from 127.0.0.1.
    let (target, target_hits) = http_server(
        "127.0.0.2",
        [
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", module.len()).into_bytes(),
            module.clone(),
        ]
        .concat(),
    )
    .await;
    let (redirector, _) = http_server(
        "127.0.0.1",
        format!("HTTP/1.1 302 Found\r\nlocation: {target}/m.wasm\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .into_bytes(),
    )
    .await;
    let mut f = fetcher(dir.path(), dir.path());
    let deny: crate::guard::Cidr = "127.0.0.2/32".parse().unwrap();
    f.settings.guard = Arc::new(crate::guard::AddressGuard::new(&[deny], &[]));
    let f = WasmFetcher::new(
        WasmModuleCache::open(&dir.path().join("cache2"), 1 << 20).unwrap(),
        f.settings.clone(),
        f.metrics.clone(),
    )
    .unwrap();
    for url in [format!("{target}/m.wasm"), format!("{redirector}/m.wasm")] {
        let p = plugin(&format!("{{name: p, url: '{url}', sha256: '{sha}'}}"), dir.path());
        let e = f.module(&p).await.unwrap_err();
        assert_eq!(e.kind(), "download_failure", "{url}");
        assert!(e.to_string().contains("127.0.0.2/32"), "{url}: {e}");
    }
    assert_eq!(target_hits.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing was sent to the denied address");
    // A name that resolves only to denied addresses: refused after DNS.
    let mut by_name = f.settings.clone();
    let deny: Vec<crate::guard::Cidr> = ["127.0.0.0/8", "::1/128"].iter().map(|c| c.parse().unwrap()).collect();
    by_name.guard = Arc::new(crate::guard::AddressGuard::new(&deny, &[]));
    let g = WasmFetcher::new(
        WasmModuleCache::open(&dir.path().join("cache3"), 1 << 20).unwrap(),
        by_name,
        f.metrics.clone(),
    )
    .unwrap();
    let port = redirector.rsplit(':').next().unwrap();
    let p = plugin(&format!("{{name: p, url: 'http://localhost:{port}/m.wasm', sha256: '{sha}'}}"), dir.path());
    let e = g.module(&p).await.unwrap_err();
    assert!(e.to_string().contains("localhost: refused"), "{e}");
    // Without the deny entry the same redirect is followed.
    let open = fetcher(dir.path(), dir.path());
    let p = plugin(&format!("{{name: p, url: '{redirector}/m.wasm', sha256: '{sha}'}}"), dir.path());
    assert_eq!(open.module(&p).await.unwrap().sha256, sha);
}

#[tokio::test]
async fn pull_policy_decides_whether_a_resolved_tag_is_asked_again() {
    let dir = tempfile::tempdir().unwrap();
    let f = fetcher(dir.path(), dir.path());
    let sha = f.cache.put(&header_module("v1")).unwrap();
    // The registry at 127.0.0.1:1 refuses every connection.
    f.cache.set_resolved("127.0.0.1:1/plugins/hdr:v1", "sha256:feed", &sha).unwrap();
    let cached = plugin("{name: p, url: 'oci://127.0.0.1:1/plugins/hdr:v1'}", dir.path());
    assert_eq!(cached.pull_policy, PullPolicy::IfNotPresent, "a fixed tag defaults to IfNotPresent");
    assert_eq!(f.module(&cached).await.unwrap().sha256, sha, "IfNotPresent: the cached resolution, no network");

    let always = plugin("{name: p, url: 'oci://127.0.0.1:1/plugins/hdr:v1', image_pull_policy: Always}", dir.path());
    let e = f.module(&always).await.unwrap_err();
    assert_eq!(e.kind(), "download_failure", "Always asks the registry: {e}");

    let latest = plugin("{name: p, url: 'oci://127.0.0.1:1/plugins/hdr'}", dir.path());
    assert_eq!(latest.pull_policy, PullPolicy::Always, "no tag means latest, checked every time");
}

#[tokio::test]
async fn pinned_sha256_in_the_cache_needs_no_download() {
    let dir = tempfile::tempdir().unwrap();
    let f = fetcher(dir.path(), dir.path());
    let sha = f.cache.put(&header_module("v1")).unwrap();
    // That URL served that module before (remembered with the cache, across restarts).
    f.cache.set_resolved("url http://127.0.0.1:1/m.wasm", "http://127.0.0.1:1/m.wasm", &sha).unwrap();
    let p = plugin(&format!("{{name: p, url: 'http://127.0.0.1:1/m.wasm', sha256: {sha}}}"), dir.path());
    assert_eq!(f.module(&p).await.unwrap().sha256, sha);
    // Another URL with the same pin is fetched (here: nothing listens, so it fails).
    let moved = plugin(&format!("{{name: p, url: 'http://127.0.0.1:1/other.wasm', sha256: {sha}}}"), dir.path());
    assert_eq!(f.module(&moved).await.unwrap_err().kind(), "download_failure");
    let other = "0".repeat(64);
    let p = plugin(&format!("{{name: p, url: 'http://127.0.0.1:1/m.wasm', sha256: '{other}'}}"), dir.path());
    assert_eq!(f.module(&p).await.unwrap_err().kind(), "download_failure");
}

#[tokio::test]
async fn a_pin_that_disagrees_with_the_tag_is_a_checksum_mismatch_even_when_cached() {
    let dir = tempfile::tempdir().unwrap();
    let f = fetcher(dir.path(), dir.path());
    let v1 = f.cache.put(&header_module("v1")).unwrap();
    let other = f.cache.put(&header_module("other")).unwrap();
    // Filterplane resolved the tag v1 to module v1 before; the YAML pins another
    // module that happens to be cached too.
    f.cache.set_resolved("127.0.0.1:1/plugins/hdr:v1", "sha256:feed", &v1).unwrap();
    let pinned = plugin(&format!("{{name: p, url: 'oci://127.0.0.1:1/plugins/hdr:v1', sha256: {other}}}"), dir.path());
    let e = f.module(&pinned).await.unwrap_err();
    assert_eq!(e.kind(), "checksum_mismatch", "{e}");
    assert!(e.to_string().contains(&v1) && e.to_string().contains(&other), "names both modules: {e}");
    // Pinned to what the tag resolves to: served from the cache, no network.
    let agreeing = plugin(&format!("{{name: p, url: 'oci://127.0.0.1:1/plugins/hdr:v1', sha256: {v1}}}"), dir.path());
    assert_eq!(f.module(&agreeing).await.unwrap().sha256, v1);
}

#[tokio::test]
async fn files_are_confined_checked_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("good.wasm"), header_module("v1")).unwrap();
    std::fs::write(root.join("bad.wasm"), b"\0asm garbage").unwrap();
    std::fs::write(dir.path().join("outside.wasm"), header_module("v1")).unwrap();
    let f = fetcher(dir.path(), &root);

    let good = f.module(&plugin("{name: p, url: 'file://good.wasm'}", &root)).await.unwrap();
    assert_eq!(good.sha256, sha256_hex(&header_module("v1")));
    let e = f.module(&plugin("{name: p, url: 'file://../outside.wasm'}", &root)).await.unwrap_err();
    assert!(e.to_string().contains("outside the allowed file root"), "{e}");
    let e = f.module(&plugin("{name: p, url: 'file://bad.wasm'}", &root)).await.unwrap_err();
    assert_eq!(e.kind(), "invalid_module");
    let fifo = root.join("fifo.wasm");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let e =
        tokio::time::timeout(Duration::from_secs(5), f.module(&plugin("{name: p, url: 'file://fifo.wasm'}", &root)))
            .await
            .expect("a FIFO is refused, not read")
            .unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let wrong = "1".repeat(64);
    let e = f
        .module(&plugin(&format!("{{name: p, url: 'file://good.wasm', sha256: '{wrong}'}}"), &root))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "checksum_mismatch");
    let text = f.metrics.render();
    assert!(text.contains("filterplane_wasm_remote_fetches_total{result=\"checksum_mismatch\"} 1"), "{text}");
    assert!(text.contains("filterplane_wasm_remote_fetches_total{result=\"invalid_module\"} 1"), "{text}");
}

/// A fetcher for a plain-HTTP registry at `registry` (on loopback), one attempt.
fn registry_fetcher(dir: &Path, registry: &str) -> WasmFetcher {
    let cache = WasmModuleCache::open(&dir.join("cache"), 1 << 20).unwrap();
    let settings = FetchSettings {
        file_root: dir.to_path_buf(),
        insecure_registries: vec![registry.to_owned()],
        timeout: Duration::from_secs(10),
        attempts: 1,
        max_module_bytes: 1 << 20,
        deadline: Duration::from_secs(60),
        guard: Default::default(),
        registry_auth_file: None,
        registry_ca_pem: None,
    };
    WasmFetcher::new(cache, settings, WasmMetrics::default()).unwrap()
}

/// A registry on loopback that asks for Basic auth and records, per manifest request,
/// the path and the Authorization header; every manifest is "not found".
async fn recording_registry() -> (String, Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                let Ok(Some(request)) = lines.next_line().await else { return };
                let path = request.split_whitespace().nth(1).unwrap_or_default().to_owned();
                let mut auth = None;
                while let Ok(Some(h)) = lines.next_line().await {
                    if h.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        if k.eq_ignore_ascii_case("authorization") {
                            auth = Some(v.trim().to_owned());
                        }
                    }
                }
                let reply = if path == "/v2/" {
                    "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"fake\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                } else {
                    log.lock().unwrap().push((path, auth));
                    "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
                };
                let _ = write.write_all(reply.as_bytes()).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn each_plugin_pulls_with_its_own_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, seen) = recording_registry().await;
    let f = registry_fetcher(dir.path(), &registry);
    std::fs::write(dir.path().join("a-creds"), "user-a:pw-a").unwrap();
    std::fs::write(dir.path().join("c-creds"), "user-c:pw-c").unwrap();
    let secret = |who: &str| format!(", image_pull_secret: {{ file: '{}' }}", dir.path().join(who).display());
    for (repo, extra) in [("a", secret("a-creds")), ("b", String::new()), ("c", secret("c-creds"))] {
        let p = plugin(&format!("{{name: {repo}, url: 'oci://{registry}/{repo}:v1'{extra}}}"), dir.path());
        assert_eq!(f.module(&p).await.unwrap_err().kind(), "download_failure");
    }
    // base64 of "user-a:pw-a" and "user-c:pw-c".
    let basic = |who: &str| Some(format!("Basic {}", if who == "a" { "dXNlci1hOnB3LWE=" } else { "dXNlci1jOnB3LWM=" }));
    let auth_of = |repo: &str| {
        let seen = seen.lock().unwrap();
        seen.iter().find(|(path, _)| path.starts_with(&format!("/v2/{repo}/"))).map(|(_, a)| a.clone())
    };
    assert_eq!(auth_of("a"), Some(basic("a")));
    assert_eq!(auth_of("b"), Some(None), "no secret: no credentials, not another plugin's");
    assert_eq!(auth_of("c"), Some(basic("c")), "its own, not the first plugin's");
}

#[tokio::test]
async fn an_endless_blob_is_cut_off_at_its_declared_size() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = listener.local_addr().unwrap().to_string();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let layer = format!("sha256:{}", "a".repeat(64));
    let manifest = format!(
            "{{\"schemaVersion\": 2, \"mediaType\": \"application/vnd.oci.image.manifest.v1+json\", \"config\": {{\"mediaType\": \"application/vnd.module.wasm.config.v1+json\", \"digest\": \"{layer}\", \"size\": 2}}, \"layers\": [{{\"mediaType\": \"{}\", \"digest\": \"{layer}\", \"size\": 288}}]}}",
            oci::WASM_LAYER
        );
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (counter, manifest) = (counter.clone(), manifest.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                if request.starts_with("GET /v2/ ") {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}").await;
                } else if request.contains("/manifests/") {
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", manifest.len());
                    let _ = s.write_all(format!("{head}{manifest}").as_bytes()).await;
                } else {
                    // The blob: declared 288 bytes, sent without end.
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n").await;
                    let chunk = vec![0u8; 64 << 10];
                    while s.write_all(&chunk).await.is_ok() {
                        counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let f = registry_fetcher(dir.path(), &registry);
    let p = plugin(&format!("{{name: p, url: 'oci://{registry}/endless-blob:v1'}}"), dir.path());
    let e = f.module(&p).await.unwrap_err();
    assert_eq!(e.kind(), "download_failure", "{e}");
    let read = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(read < 64 << 20, "{read} bytes were taken from the endless blob");
}

#[tokio::test]
async fn an_endless_manifest_is_cut_off_not_buffered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry = listener.local_addr().unwrap().to_string();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                if String::from_utf8_lossy(&buf[..n]).starts_with("GET /v2/ ") {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}").await;
                    return;
                }
                // A manifest that never ends, as fast as the reader takes it.
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\nconnection: close\r\n\r\n{\"layers\": [").await;
                let chunk = vec![b' '; 64 << 10];
                while s.write_all(&chunk).await.is_ok() {
                    counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let f = registry_fetcher(dir.path(), &registry);
    let p = plugin(&format!("{{name: p, url: 'oci://{registry}/endless:v1'}}"), dir.path());
    let e = f.module(&p).await.unwrap_err();
    assert!(e.to_string().contains("manifest larger than"), "{e}");
    // Read up to the bound and dropped, not buffered without end.
    let read = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(read < 64 << 20, "{read} bytes were taken from the endless manifest");
}

#[test]
fn credentials_come_from_env_or_file_and_errors_do_not_show_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cred");
    std::fs::write(&file, "user:s3cret\n").unwrap();
    let auth = registry_auth(Some(&PullSecret::File(file)), "r:1", None).unwrap();
    assert!(matches!(auth, RegistryAuth::Basic(u, p) if u == "user" && p == "s3cret"));
    std::fs::write(dir.path().join("bad"), "s3cret-without-colon").unwrap();
    let e = registry_auth(Some(&PullSecret::File(dir.path().join("bad"))), "r:1", None).unwrap_err().to_string();
    assert!(!e.contains("s3cret"), "{e}");
    let e = registry_auth(Some(&PullSecret::Env("FILTERPLANE_TEST_SURELY_UNSET".into())), "r:1", None).unwrap_err();
    assert!(e.to_string().contains("FILTERPLANE_TEST_SURELY_UNSET is not set"));
    // The default file: its entry for the registry, or anonymous when it has none.
    let docker = dir.path().join("config.json");
    std::fs::write(&docker, r#"{"auths": {"r:1": {"username": "d", "password": "p"}}}"#).unwrap();
    let auth = registry_auth(None, "r:1", Some(&docker)).unwrap();
    assert!(matches!(auth, RegistryAuth::Basic(u, _) if u == "d"));
    assert!(matches!(registry_auth(None, "other:2", Some(&docker)).unwrap(), RegistryAuth::Anonymous));
    assert!(matches!(registry_auth(None, "r:1", None).unwrap(), RegistryAuth::Anonymous));
}

/// A URL changed to another module while the YAML keeps the old pin: fetched, and a
/// checksum mismatch naming both digests, though a module with the old pin is cached.
#[tokio::test]
async fn a_changed_url_with_a_stale_pin_is_a_checksum_mismatch_not_the_old_module() {
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2) = (header_module("v1"), header_module("v2"));
    let (sha1, sha2) = (crate::cache::sha256_hex(&v1), crate::cache::sha256_hex(&v2));
    let (server, hits) = http_server(
        "127.0.0.1",
        [format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", v2.len()).into_bytes(), v2]
            .concat(),
    )
    .await;
    let f = fetcher(dir.path(), dir.path());
    f.cache.put(&v1).unwrap();
    f.cache.set_resolved("url http://127.0.0.1:1/v1.wasm", "http://127.0.0.1:1/v1.wasm", &sha1).unwrap();
    let stale = plugin(&format!("{{name: p, url: '{server}/v2.wasm', sha256: {sha1}}}"), dir.path());
    let e = f.module(&stale).await.unwrap_err();
    assert_eq!(e.kind(), "checksum_mismatch", "{e}");
    assert!(e.to_string().contains(&sha1) && e.to_string().contains(&sha2), "both digests: {e}");
    assert_eq!(hits.load(std::sync::atomic::Ordering::Relaxed), 1, "the new URL was fetched");
}

#[tokio::test]
async fn an_unpinned_url_is_fetched_once_if_not_present_and_every_time_always() {
    let dir = tempfile::tempdir().unwrap();
    let module = header_module("v1");
    let reply = |m: &[u8]| {
        [
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", m.len()).into_bytes(),
            m.to_vec(),
        ]
        .concat()
    };
    let (server, hits) = http_server("127.0.0.1", reply(&module)).await;
    let f = fetcher(dir.path(), dir.path());
    let once = plugin(&format!("{{name: p, url: '{server}/m.wasm'}}"), dir.path());
    assert_eq!(once.pull_policy, PullPolicy::IfNotPresent);
    for _ in 0..2 {
        let m = f.module(&once).await.unwrap();
        assert_eq!(m.sha256, crate::cache::sha256_hex(&module), "pinned to what was fetched");
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::Relaxed), 1, "IfNotPresent: fetched once");
    let always = plugin(&format!("{{name: p, url: '{server}/m.wasm', image_pull_policy: Always}}"), dir.path());
    f.module(&always).await.unwrap();
    f.module(&always).await.unwrap();
    assert_eq!(hits.load(std::sync::atomic::Ordering::Relaxed), 3, "Always: fetched each time");
    // An unpinned module is still checked: what is not Wasm never serves.
    let (bad, _) = http_server("127.0.0.1", reply(b"not wasm")).await;
    let e = f.module(&plugin(&format!("{{name: q, url: '{bad}/m.wasm'}}"), dir.path())).await.unwrap_err();
    assert_eq!(e.kind(), "invalid_module", "{e}");
}
