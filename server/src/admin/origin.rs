//! Where an admin request comes from. Two browser attacks are refused here: a page that
//! reaches the admin under a name of its own (DNS rebinding: the `Host`, and over HTTP/2
//! the `:authority`, must be the admin's own), and a page of another origin that makes
//! the browser send a request that changes something (CSRF: a cookie, or no
//! authentication at all, does not say who asked).

use axum::{
    extract::Request,
    http::{header, Method},
};

/// Whether a request's host name may be answered. A DNS-rebinding page reaches the admin
/// under a name the attacker controls; an IP address or `localhost` is no such name, and
/// a request without one (HTTP/1.0, a script) comes from no browser.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    if host.is_empty() {
        return true;
    }
    let name = host_name(host).trim_end_matches('.').to_ascii_lowercase();
    name.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || allowed.contains(&name)
}

/// `name:port`, `[v6]:port`, `[v6]`: the name alone.
fn host_name(host: &str) -> &str {
    match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    }
}

/// The names a request says it is for: its `Host` header and, over HTTP/2 (or an
/// absolute URI), the `:authority`. Every one must be allowed.
pub fn request_hosts(req: &Request) -> impl Iterator<Item = &str> {
    let host = req.headers().get_all(header::HOST).into_iter().map(|h| h.to_str().unwrap_or("\u{0}invalid"));
    host.chain(req.uri().authority().map(|a| a.as_str()))
}

/// Why a request that changes something is refused as cross-site, or `None`. Requests
/// with a bearer token are the CLI's and scripts' (a page cannot add the header to a
/// cross-site request without a CORS preflight, which this server never grants); the
/// others must come from the admin's own origin, as browsers say in `Sec-Fetch-Site` and
/// `Origin`. A client that sends neither is no browser.
pub fn cross_site(req: &Request) -> Option<&'static str> {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let headers = req.headers();
    let bearer = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("bearer ")));
    if bearer {
        return None;
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return Some("a request from another site (Sec-Fetch-Site)");
        }
    }
    let origin = headers.get(header::ORIGIN)?;
    // `scheme://host[:port]`; the scheme is not compared (TLS may end in front).
    let origin_host = origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, h)| h);
    let Some(origin_host) = origin_host else {
        return Some("a request from an opaque origin");
    };
    let own = request_hosts(req).next().unwrap_or("");
    if origin_host.eq_ignore_ascii_case(own) {
        None
    } else {
        Some("a request from another origin (Origin)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn post(headers: &[(&str, &str)]) -> Request {
        let mut b = Request::post("/api/v1/reload?confirm=true");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn a_form_post_from_another_site_is_refused() {
        let from = |h: &[(&str, &str)]| cross_site(&post(h));
        // A page of another site (what issue 20 did with a form).
        assert!(from(&[
            ("host", "127.0.0.1:18001"),
            ("origin", "http://evil.example"),
            ("sec-fetch-site", "cross-site")
        ])
        .is_some());
        // Another port of the same host: same site, not the same origin.
        assert!(from(&[("host", "127.0.0.1:18001"), ("origin", "http://127.0.0.1:8080")]).is_some());
        assert!(from(&[("host", "127.0.0.1:18001"), ("sec-fetch-site", "same-site")]).is_some());
        assert!(from(&[("host", "127.0.0.1:18001"), ("origin", "null")]).is_some());
        // The page itself, the CLI (bearer), curl (no browser headers).
        assert!(from(&[
            ("host", "127.0.0.1:18001"),
            ("origin", "http://127.0.0.1:18001"),
            ("sec-fetch-site", "same-origin")
        ])
        .is_none());
        assert!(from(&[("host", "127.0.0.1:18001"), ("origin", "http://evil.example"), ("authorization", "Bearer t")])
            .is_none());
        assert!(from(&[("host", "127.0.0.1:18001")]).is_none());
        // Reading is never refused here.
        let get = Request::get("/api/v1/config").header("origin", "http://evil.example").body(Body::empty()).unwrap();
        assert!(cross_site(&get).is_none());
    }

    #[test]
    fn the_authority_of_an_http2_request_is_checked_too() {
        let req = Request::get("http://evil.example/api/v1/config").body(Body::empty()).unwrap();
        let hosts: Vec<&str> = request_hosts(&req).collect();
        assert_eq!(hosts, ["evil.example"]);
        assert!(!hosts.iter().all(|h| host_allowed(h, &[])));
    }
}
