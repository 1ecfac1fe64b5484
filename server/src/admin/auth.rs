//! The admin API's bearer token (`--admin-token-file`). Scripts and the CLI send
//! `Authorization: Bearer TOKEN`; the page, which a browser opens by address (and whose
//! event stream cannot set headers), asks for the token once and then holds a session
//! cookie (`HttpOnly`, `SameSite=Strict`: a page of another site cannot send it) derived
//! from the token, so replacing the token ends every session.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use axum::{
    extract::{ConnectInfo, Request},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{Html, IntoResponse, Redirect, Response},
};

use crate::{metrics::Metrics, secret};

/// The session cookie's name.
pub const COOKIE: &str = "filterplane_session";
pub use filterplane_api::files::read_token;

/// Who may use the admin API.
#[derive(Debug)]
pub struct AdminAuth {
    path: PathBuf,
    /// The token and the file's modification time it was read at.
    current: Mutex<(Option<SystemTime>, String)>,
    /// Per process: sessions end with it.
    session_key: Vec<u8>,
    pub metrics_public: bool,
    /// The admin port is TLS: cookies get `Secure`.
    pub secure: bool,
    metrics: Arc<Metrics>,
    /// Wrong tokens slow their address down.
    backoff: super::backoff::SignInBackoff,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl AdminAuth {
    /// Reads the token; an unreadable or empty file at start is an error.
    pub fn new(path: &Path, metrics_public: bool, secure: bool, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let at = modified(path);
        let token = read_token(path).map_err(|e| anyhow::anyhow!("--admin-token-file {}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            current: Mutex::new((at, token)),
            session_key: secret::random_bytes(secret::SECRET_BYTES)?,
            metrics_public,
            secure,
            metrics,
            backoff: Default::default(),
        })
    }

    /// The token now: read again when the file changed (a file that no longer reads
    /// keeps the previous token, with a warning).
    fn token(&self) -> String {
        let at = modified(&self.path);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if at != current.0 {
            match read_token(&self.path) {
                Ok(token) => {
                    tracing::info!(path = %self.path.display(), "admin token file changed: the new token applies, sessions of the old one end");
                    *current = (at, token);
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "admin token file changed but does not read; the previous token stays");
                    current.0 = at;
                }
            }
        }
        current.1.clone()
    }

    fn session_for(&self, token: &str) -> String {
        secret::hmac_hex(&self.session_key, token.as_bytes())
    }

    /// Whether the request carries the token, or a session cookie of it.
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let token = self.token();
        let bearer = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .any(|t| secret::equal(t.trim().as_bytes(), token.as_bytes()));
        if bearer {
            return true;
        }
        let session = self.session_for(&token);
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .any(|c| secret::equal(c.as_bytes(), session.as_bytes()))
    }

    /// Whether `path` is open without the token.
    pub fn exempt(&self, path: &str) -> bool {
        matches!(path, "/healthz" | "/readyz" | "/login")
            || (path == "/metrics" && self.metrics_public)
            // Module paths are unguessable capability URLs Envoy fetches without headers.
            || path.starts_with("/modules/")
    }

    /// `POST /login` with `token=...` (a form): the session cookie and the page, or the
    /// form again.
    pub fn login(&self, body: &[u8]) -> Response {
        let given = form_value(body, "token").unwrap_or_default();
        let token = self.token();
        if !secret::equal(given.as_bytes(), token.as_bytes()) {
            self.metrics.admin_unauthorized.inc();
            if let Some(left_out) = crate::log_limit::SIGN_IN_FAILURES.admit() {
                tracing::warn!(left_out, "admin login with a wrong token");
            }
            return (StatusCode::UNAUTHORIZED, Html(login_page("That is not the token."))).into_response();
        }
        let cookie = format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{}",
            self.session_for(&token),
            if self.secure { "; Secure" } else { "" }
        );
        let mut res = Redirect::to("/").into_response();
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            res.headers_mut().insert(header::SET_COOKIE, v);
        }
        res
    }

    /// What an unauthorized request gets: the login form for the page, a 401 for the rest.
    pub fn refuse(&self, path: &str) -> Response {
        self.metrics.admin_unauthorized.inc();
        if path == "/" {
            return (StatusCode::UNAUTHORIZED, Html(login_page(""))).into_response();
        }
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"filterplane\"")],
            "this admin API needs its bearer token: Authorization: Bearer TOKEN (the server's --admin-token-file; the CLI's --token-file)\n",
        )
            .into_response()
    }
}

/// The middleware: every request but the exempt ones needs the token; an address that
/// keeps sending wrong ones waits (`backoff`).
pub async fn require(auth: Option<Arc<AdminAuth>>, req: Request, next: Next) -> Response {
    let Some(auth) = auth else { return next.run(req).await };
    let path = req.uri().path().to_owned();
    let sign_in = path == "/login" && req.method() == Method::POST;
    if auth.exempt(&path) && !sign_in {
        return next.run(req).await;
    }
    let ip = req.extensions().get::<ConnectInfo<super::AdminPeer>>().map(|c| c.0 .0.ip());
    if let Some(ip) = ip {
        if let Err(wait) = auth.backoff.check(ip, Instant::now()) {
            auth.metrics.limit_hit("sign_in_backoff");
            let secs = wait.as_secs().max(1).to_string();
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs)],
                "too many wrong tokens from this address; wait and try again\n",
            )
                .into_response();
        }
    }
    if sign_in {
        let res = next.run(req).await;
        if let Some(ip) = ip {
            match res.status() {
                StatusCode::UNAUTHORIZED => auth.backoff.failed(ip, Instant::now()),
                StatusCode::SEE_OTHER => auth.backoff.succeeded(ip),
                _ => {}
            }
        }
        return res;
    }
    if auth.authorized(req.headers()) {
        if let Some(ip) = ip {
            auth.backoff.succeeded(ip);
        }
        return next.run(req).await;
    }
    // A request with no token at all is no guess (a browser opening the page).
    let guessed = req.headers().contains_key(header::AUTHORIZATION)
        || req.headers().get_all(header::COOKIE).iter().any(|c| c.to_str().is_ok_and(|c| c.contains(COOKIE)));
    if let (true, Some(ip)) = (guessed, ip) {
        auth.backoff.failed(ip, Instant::now());
    }
    auth.refuse(&path)
}

/// One field of an `application/x-www-form-urlencoded` body.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(b)) => {
                out.push(b);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn login_page(message: &str) -> String {
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Filterplane: sign in</title>
<style>body{{font-family:system-ui,sans-serif;margin:4em auto;max-width:28em}}input{{width:100%;padding:.4em;margin:.5em 0}}.err{{color:#b00}}</style></head>
<body><h1>Filterplane</h1><p>This admin server needs its token (the file given to <code>--admin-token-file</code>).</p>
<p class="err" id="message">{message}</p>
<form method="post" action="/login"><label>Token <input type="password" name="token" id="token" autocomplete="current-password" autofocus></label>
<input type="submit" id="sign-in" value="Sign in"></form></body></html>"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode() {
        assert_eq!(form_value(b"a=1&token=s%3Dx+y%zz", "token").as_deref(), Some("s=x y%zz"));
        assert_eq!(form_value(b"token=%4", "token").as_deref(), Some("%4"));
        assert_eq!(form_value(b"other=1", "token"), None);
    }

    #[test]
    fn bearer_cookie_and_a_changed_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let auth = AdminAuth::new(&path, false, false, Arc::new(Metrics::default())).unwrap();
        let mut h = HeaderMap::new();
        assert!(!auth.authorized(&h));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert!(auth.authorized(&h));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cre"));
        assert!(!auth.authorized(&h));
        let login = auth.login(b"token=s3cret");
        assert_eq!(login.status(), StatusCode::SEE_OTHER);
        let cookie = login.headers()[header::SET_COOKIE].to_str().unwrap().to_owned();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
        let value = cookie.split(';').next().unwrap().to_owned();
        let mut c = HeaderMap::new();
        c.insert(header::COOKIE, HeaderValue::from_str(&format!("other=1; {value}")).unwrap());
        assert!(auth.authorized(&c));
        assert_eq!(auth.login(b"token=nope").status(), StatusCode::UNAUTHORIZED);
        // A new token ends the old sessions (mtime granularity: make sure it moves).
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "n3w").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
        assert!(!auth.authorized(&c), "sessions of the old token end");
        assert!(!auth.authorized(&h));
        let mut n = HeaderMap::new();
        n.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer n3w"));
        assert!(auth.authorized(&n));
        assert!(auth.exempt("/healthz") && !auth.exempt("/metrics") && !auth.exempt("/api/v1/config"));
    }
}
