//! Registry credentials as users have them. A pull secret (`image_pull_secret`, or the
//! default `--registry-auth-file`, else `$DOCKER_CONFIG/config.json`) is recognised by
//! its content: `USER:PASSWORD`; a Docker `config.json` (`auths` with `auth`,
//! `username`/`password` or `identitytoken`); a Kubernetes Secret of type
//! `kubernetes.io/dockerconfigjson` or `kubernetes.io/dockercfg` (its YAML or JSON); a
//! decoded `.dockerconfigjson`; or a legacy `.dockercfg`. The entry is picked by registry
//! host. Credentials never appear in errors or logs: they name where the secret was to
//! come from and which registries it has entries for, never what it holds.

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde_json::Value;

/// Why no credentials came out of a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredsError {
    #[error("{from} has no entry for registry {registry} (it has: {known})")]
    NoEntry { from: String, registry: String, known: String },
    #[error("{from}: {what}")]
    Bad { from: String, what: String },
}

/// The credentials for `registry` (`host[:port]`) in `text`, read from `from` (for
/// errors).
pub fn parse(text: &str, registry: &str, from: &str) -> Result<RegistryAuth, CredsError> {
    let bad = |what: &str| CredsError::Bad { from: from.to_owned(), what: what.to_owned() };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(bad("empty"));
    }
    // JSON is YAML too; YAML covers a Secret written either way.
    let doc: Option<Value> = serde_yaml::from_str::<Value>(trimmed).ok().filter(|v| v.is_object());
    let Some(doc) = doc else {
        let (user, password) =
            trimmed.split_once(':').filter(|(u, _)| !u.contains(char::is_whitespace)).ok_or_else(|| {
                bad("must hold USER:PASSWORD, a Docker config.json, or a Kubernetes dockerconfigjson Secret")
            })?;
        return Ok(RegistryAuth::Basic(user.to_owned(), password.to_owned()));
    };
    let config = if doc.get("kind").and_then(Value::as_str) == Some("Secret") {
        secret_config(&doc).map_err(|w| bad(&w))?
    } else {
        doc
    };
    // config.json / .dockerconfigjson have `auths`; the legacy .dockercfg is the map itself.
    let auths = config.get("auths").unwrap_or(&config);
    let Some(auths) = auths.as_object() else { return Err(bad("`auths` is not a mapping")) };
    let entry = auths.iter().find(|(k, _)| host_of(k) == registry.to_ascii_lowercase()).map(|(_, v)| v);
    let Some(entry) = entry else {
        let known: Vec<String> = auths.keys().map(|k| host_of(k)).collect();
        return Err(CredsError::NoEntry {
            from: from.to_owned(),
            registry: registry.to_owned(),
            known: if known.is_empty() { "none".into() } else { known.join(", ") },
        });
    };
    entry_auth(entry).map_err(|w| bad(&format!("entry for {registry}: {w}")))
}

/// The docker config inside a Kubernetes Secret.
fn secret_config(secret: &Value) -> Result<Value, String> {
    let kind = secret.get("type").and_then(Value::as_str).unwrap_or_default();
    let key = match kind {
        "kubernetes.io/dockerconfigjson" => ".dockerconfigjson",
        "kubernetes.io/dockercfg" => ".dockercfg",
        other => {
            return Err(format!(
                "a Secret of type {other:?}; expected kubernetes.io/dockerconfigjson or kubernetes.io/dockercfg"
            ))
        }
    };
    let text = if let Some(s) = secret.get("stringData").and_then(|d| d.get(key)).and_then(Value::as_str) {
        s.to_owned()
    } else {
        let b64 = secret
            .get("data")
            .and_then(|d| d.get(key))
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the Secret has no data.{key}"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| format!("data.{key} is not base64"))?;
        String::from_utf8(bytes).map_err(|_| format!("data.{key} is not text"))?
    };
    serde_json::from_str(&text).map_err(|_| format!("{key} is not JSON"))
}

/// `https://index.docker.io/v1/`, `registry:5000`, `http://r:5000/v2/` → host[:port].
fn host_of(key: &str) -> String {
    let rest = key.split_once("://").map_or(key, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_ascii_lowercase()
}

fn entry_auth(entry: &Value) -> Result<RegistryAuth, String> {
    let field = |k: &str| entry.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    if let Some(token) = field("identitytoken") {
        // A refresh token: sent as the password of the token request, as registries that
        // issue them (Azure Container Registry, Harbor) take it.
        let user = field("username").unwrap_or("00000000-0000-0000-0000-000000000000");
        return Ok(RegistryAuth::Basic(user.to_owned(), token.to_owned()));
    }
    if let (Some(u), Some(p)) = (field("username"), field("password")) {
        return Ok(RegistryAuth::Basic(u.to_owned(), p.to_owned()));
    }
    let auth = field("auth").ok_or("no auth, username/password or identitytoken")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(auth).map_err(|_| "auth is not base64")?;
    let text = String::from_utf8(decoded).map_err(|_| "auth is not text")?;
    let (u, p) = text.split_once(':').ok_or("auth does not decode to USER:PASSWORD")?;
    Ok(RegistryAuth::Basic(u.to_owned(), p.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: RegistryAuth) -> (String, String) {
        match a {
            RegistryAuth::Basic(u, p) => (u, p),
            other => panic!("{other:?}"),
        }
    }

    const USER_PASS_B64: &str = "YWxpY2U6czNjcmV0"; // alice:s3cret

    #[test]
    fn every_form_users_have() {
        let want = ("alice".to_owned(), "s3cret".to_owned());
        assert_eq!(basic(parse("alice:s3cret\n", "r:5000", "f").unwrap()), want);
        let config = format!(
            r#"{{"auths": {{"other:1": {{"auth": "eDp5"}}, "https://r:5000/v2/": {{"auth": "{USER_PASS_B64}"}}}}}}"#
        );
        assert_eq!(basic(parse(&config, "r:5000", "f").unwrap()), want);
        let split = r#"{"auths": {"r:5000": {"username": "alice", "password": "s3cret"}}}"#;
        assert_eq!(basic(parse(split, "r:5000", "f").unwrap()), want);
        let legacy = format!(r#"{{"r:5000": {{"auth": "{USER_PASS_B64}", "email": "a@b"}}}}"#);
        assert_eq!(basic(parse(&legacy, "r:5000", "f").unwrap()), want);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&config);
        let secret = format!("apiVersion: v1\nkind: Secret\nmetadata: {{ name: pull }}\ntype: kubernetes.io/dockerconfigjson\ndata:\n  .dockerconfigjson: {b64}\n");
        assert_eq!(basic(parse(&secret, "r:5000", "f").unwrap()), want);
        let string_data = format!(
            "kind: Secret\ntype: kubernetes.io/dockerconfigjson\nstringData:\n  .dockerconfigjson: '{config}'\n"
        );
        assert_eq!(basic(parse(&string_data, "r:5000", "f").unwrap()), want);
        let token = r#"{"auths": {"r:5000": {"identitytoken": "tok"}}}"#;
        assert_eq!(basic(parse(token, "r:5000", "f").unwrap()).1, "tok");
    }

    #[test]
    fn errors_name_the_source_and_the_registries_never_the_secret() {
        let config = format!(r#"{{"auths": {{"https://other:1/v1/": {{"auth": "{USER_PASS_B64}"}}}}}}"#);
        let e = parse(&config, "r:5000", "file /x/config.json").unwrap_err().to_string();
        assert!(e.contains("file /x/config.json has no entry for registry r:5000 (it has: other:1)"), "{e}");
        assert!(!e.contains(USER_PASS_B64) && !e.contains("s3cret"));
        let e = parse("kind: Secret\ntype: Opaque\ndata: { a: b }\n", "r", "f").unwrap_err().to_string();
        assert!(e.contains("Opaque"), "{e}");
        let e = parse("just-a-token-no-colon", "r", "f").unwrap_err().to_string();
        assert!(e.contains("USER:PASSWORD") && !e.contains("just-a-token"), "{e}");
    }
}
