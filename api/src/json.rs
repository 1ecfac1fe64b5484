//! Envoy-native JSON (proto3 JSON mapping with `@type`, nested `Any`, camelCase or
//! snake_case names) to protobuf `Any`, checked against Envoy's descriptors.

use prost_reflect::{DeserializeOptions, DynamicMessage, ReflectMessage, SerializeOptions};
use serde_json::Value;

use crate::{descriptors::pool, Any};

const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// Why a `typed_config` was refused. `path` is relative to the value handed in
/// (empty for the value itself), in `a.b[2].c` form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JsonToAnyError {
    pub path: String,
    pub message: String,
}

impl JsonToAnyError {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

/// A message that passed the descriptors: encoded once, plus its canonical JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedMessage {
    pub any: Any,
    /// Proto field names, defaults skipped, object keys sorted at every level: two
    /// spellings of the same config (camelCase vs snake_case, key order, map order)
    /// give the same string, which is what versions hash.
    pub canonical_json: String,
}

/// Turns `{"@type": ..., fields...}` into an `Any` of that type. Unknown types, unknown
/// fields and wrong value types are errors naming the path to the offending field.
pub fn any_from_json(value: &Value) -> Result<TypedMessage, JsonToAnyError> {
    let mut expanded = Vec::new();
    let value = expand_typed_structs(value, "", &mut expanded)?;
    typed_from_json(&value).map_err(|mut e| {
        e.path = path_in_typed_struct(&e.path, &expanded);
        e
    })
}

/// The type URLs of `TypedStruct`, which Envoy accepts wherever an `Any` stands: a
/// `type_url` and the message's fields as a `Struct` in `value`.
pub const TYPED_STRUCT_URLS: [&str; 2] =
    ["type.googleapis.com/xds.type.v3.TypedStruct", "type.googleapis.com/udpa.type.v1.TypedStruct"];

/// `v` with every `TypedStruct` (at any depth) replaced by the `Any` JSON of the message
/// it stands for, so it is checked, hashed and served exactly as that message written
/// out. `expanded` gets the path of each one replaced.
fn expand_typed_structs(v: &Value, path: &str, expanded: &mut Vec<String>) -> Result<Value, JsonToAnyError> {
    let join = |key: &str| if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| expand_typed_structs(item, &format!("{path}[{i}]"), expanded))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(obj)
            if obj.get("@type").and_then(Value::as_str).is_some_and(|t| TYPED_STRUCT_URLS.contains(&t)) =>
        {
            if let Some(k) = obj.keys().find(|k| !matches!(k.as_str(), "@type" | "type_url" | "value")) {
                return Err(JsonToAnyError::at(join(k), "a TypedStruct has only \"type_url\" and \"value\""));
            }
            let Some(type_url) = obj.get("type_url").and_then(Value::as_str) else {
                return Err(JsonToAnyError::at(
                    join("type_url"),
                    "a TypedStruct needs the type_url of the message it holds",
                ));
            };
            let inner = obj.get("value").cloned().unwrap_or_else(|| Value::Object(Default::default()));
            let name = type_url.strip_prefix(TYPE_URL_PREFIX).unwrap_or(type_url);
            let message = if has_special_json_form(name) {
                serde_json::json!({ "@type": type_url, "value": inner })
            } else {
                let Value::Object(mut fields) = inner else {
                    return Err(JsonToAnyError::at(join("value"), "must be a mapping of the message's fields"));
                };
                fields.insert("@type".into(), Value::String(type_url.to_owned()));
                Value::Object(fields)
            };
            // Paths are recorded where the message now stands (its fields right below it).
            expanded.push(path.to_owned());
            expand_typed_structs(&message, path, expanded).map_err(|mut e| {
                e.path = path_in_typed_struct(&e.path, std::slice::from_ref(&path.to_owned()));
                e
            })
        }
        Value::Object(obj) => obj
            .iter()
            .map(|(k, item)| Ok((k.clone(), expand_typed_structs(item, &join(k), expanded)?)))
            .collect::<Result<serde_json::Map<_, _>, _>>()
            .map(Value::Object),
        other => Ok(other.clone()),
    }
}

/// An error path in the expanded JSON, as the user wrote it: into each TypedStruct's
/// `value` (or its `type_url` for the type), innermost first (each step rewrites only
/// what follows its own place, which the outer ones contain).
fn path_in_typed_struct(path: &str, expanded: &[String]) -> String {
    let mut within: Vec<&String> = expanded
        .iter()
        .filter(|p| {
            p.is_empty()
                || path == p.as_str()
                || path.starts_with(&format!("{p}."))
                || path.starts_with(&format!("{p}["))
        })
        .collect();
    within.sort_by_key(|p| std::cmp::Reverse(p.len()));
    let mut path = path.to_owned();
    for at in within {
        let rest = path[at.len()..].trim_start_matches('.').to_owned();
        let field = if rest.is_empty() {
            String::new()
        } else if rest == "@type" || rest.starts_with("@type.") {
            "type_url".to_owned()
        } else {
            format!("value.{rest}")
        };
        path = match (at.is_empty(), field.is_empty()) {
            (true, _) => field,
            (false, true) => at.clone(),
            (false, false) => format!("{at}.{field}"),
        };
    }
    path
}

fn typed_from_json(value: &Value) -> Result<TypedMessage, JsonToAnyError> {
    let Some(obj) = value.as_object() else {
        return Err(JsonToAnyError::at("", "expected a mapping with an \"@type\" key"));
    };
    let type_url = match obj.get("@type") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(JsonToAnyError::at("@type", "must be a string")),
        None => return Err(JsonToAnyError::at("", "missing \"@type\"")),
    };
    let Some(type_name) = type_url.strip_prefix(TYPE_URL_PREFIX) else {
        return Err(JsonToAnyError::at("@type", format!("\"{type_url}\" must start with \"{TYPE_URL_PREFIX}\"")));
    };
    let Some(desc) = pool().get_message_by_name(type_name) else {
        return Err(JsonToAnyError::at("@type", format!("unknown type \"{type_url}\": not a message in Envoy's API")));
    };
    // proto3 JSON: an Any holding a well-known type with a special JSON form (a wrapper,
    // Duration, Struct, ...) carries it under "value"; any other message's fields sit
    // beside "@type".
    let (body, prefix) = if has_special_json_form(type_name) {
        let mut rest = obj.iter().filter(|(k, _)| *k != "@type" && *k != "value");
        if let Some((k, _)) = rest.next() {
            return Err(JsonToAnyError::at(
                k.as_str(),
                format!("{type_name} is written as {{\"@type\": ..., \"value\": ...}}; unexpected key"),
            ));
        }
        let value = obj.get("value").cloned().ok_or_else(|| {
            JsonToAnyError::at("", format!("{type_name} is written as {{\"@type\": ..., \"value\": ...}}"))
        })?;
        (value, "value")
    } else {
        let mut fields = obj.clone();
        fields.remove("@type");
        (Value::Object(fields), "")
    };

    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(body, &mut track);
    let message =
        DynamicMessage::deserialize_with_options(desc, de, &DeserializeOptions::new().deny_unknown_fields(true))
            .map_err(|e| {
                let inner = track.path().to_string();
                let inner = inner.trim_start_matches('.');
                let path = match (prefix, inner) {
                    ("", p) => p.to_owned(),
                    (pre, "") => pre.to_owned(),
                    (pre, p) => format!("{pre}.{p}"),
                };
                JsonToAnyError::at(path, e.to_string())
            })?;

    let canonical = message
        .serialize_with_options(
            serde_json::value::Serializer,
            &SerializeOptions::new().use_proto_field_name(true).skip_default_fields(true),
        )
        .map_err(|e| JsonToAnyError::at("", format!("cannot re-encode as JSON: {e}")))?;
    let mut canonical_json = String::new();
    write_canonical(&canonical, &mut canonical_json);

    Ok(TypedMessage {
        any: Any { type_url: type_url.to_owned(), value: prost::Message::encode_to_vec(&message) },
        canonical_json,
    })
}

/// Well-known types whose proto3 JSON form is not an object of their fields.
fn has_special_json_form(type_name: &str) -> bool {
    matches!(
        type_name.strip_prefix("google.protobuf."),
        Some(
            "Duration"
                | "Timestamp"
                | "FieldMask"
                | "Struct"
                | "Value"
                | "ListValue"
                | "DoubleValue"
                | "FloatValue"
                | "Int64Value"
                | "UInt64Value"
                | "Int32Value"
                | "UInt32Value"
                | "BoolValue"
                | "StringValue"
                | "BytesValue"
        )
    )
}

/// Decodes an `Any` of any type in the pool back to Envoy-native JSON (for config dumps).
pub fn any_to_json(any: &Any) -> Result<Value, JsonToAnyError> {
    any_to_json_with(any, |_| {})
}

/// `any_to_json` with every field Envoy marks sensitive (`udpa.annotations.sensitive`:
/// private keys, passwords, session ticket keys) shown as `[redacted]`, at any depth and
/// inside nested `Any`s, as Envoy's own config dump does.
pub fn any_to_json_redacted(any: &Any) -> Result<Value, JsonToAnyError> {
    any_to_json_with(any, redact)
}

fn any_to_json_with(any: &Any, edit: impl FnOnce(&mut DynamicMessage)) -> Result<Value, JsonToAnyError> {
    let name = any.type_url.strip_prefix(TYPE_URL_PREFIX).unwrap_or(&any.type_url);
    let desc = pool()
        .get_message_by_name(name)
        .ok_or_else(|| JsonToAnyError::at("@type", format!("unknown type \"{}\"", any.type_url)))?;
    let mut msg =
        DynamicMessage::decode(desc, any.value.as_slice()).map_err(|e| JsonToAnyError::at("", e.to_string()))?;
    edit(&mut msg);
    let v = msg
        .serialize_with_options(
            serde_json::value::Serializer,
            &SerializeOptions::new().use_proto_field_name(true).skip_default_fields(true),
        )
        .map_err(|e| JsonToAnyError::at("", e.to_string()))?;
    let type_url = Value::String(any.type_url.clone());
    Ok(match v {
        Value::Object(mut m) if !has_special_json_form(name) => {
            m.insert("@type".into(), type_url);
            Value::Object(m)
        }
        other => serde_json::json!({ "@type": type_url, "value": other }),
    })
}

const REDACTED: &str = "[redacted]";

/// Whether `any` holds a value in a field Envoy marks sensitive (a private key, a
/// password), at any depth and inside nested `Any`s. Unknown types hold none we can see.
pub fn holds_sensitive(any: &Any) -> bool {
    let name = any.type_url.strip_prefix(TYPE_URL_PREFIX).unwrap_or(&any.type_url);
    let Some(desc) = pool().get_message_by_name(name) else { return false };
    let Ok(msg) = DynamicMessage::decode(desc, any.value.as_slice()) else { return false };
    let mut redacted = msg.clone();
    redact(&mut redacted);
    redacted != msg
}

/// Whether Envoy's API marks `field` sensitive.
fn sensitive(field: &prost_reflect::FieldDescriptor) -> bool {
    static EXT: std::sync::OnceLock<Option<prost_reflect::ExtensionDescriptor>> = std::sync::OnceLock::new();
    let Some(ext) = EXT.get_or_init(|| pool().get_extension_by_name("udpa.annotations.sensitive")) else {
        return false;
    };
    field.options().get_extension(ext).as_bool() == Some(true)
}

/// Replaces what Envoy marks sensitive in `msg` (see `any_to_json_redacted`).
pub fn redact(msg: &mut DynamicMessage) {
    let fields: Vec<_> = msg.descriptor().fields().filter(|f| msg.has_field(f)).collect();
    for f in fields {
        let all = sensitive(&f);
        redact_value(msg.get_field_mut(&f), all);
    }
}

/// Redacts inside `v`; with `all`, every string and bytes leaf (the field itself is
/// sensitive), else only the sensitive fields of messages below.
fn redact_value(v: &mut prost_reflect::Value, all: bool) {
    use prost_reflect::Value as V;
    match v {
        V::String(s) if all => *s = REDACTED.into(),
        V::Bytes(b) if all => *b = bytes::Bytes::from_static(REDACTED.as_bytes()),
        V::List(items) => items.iter_mut().for_each(|i| redact_value(i, all)),
        V::Map(entries) => entries.values_mut().for_each(|i| redact_value(i, all)),
        V::Message(m) if m.descriptor().full_name() == "google.protobuf.Any" => redact_any(m, all),
        V::Message(m) if all => redact_all(m),
        V::Message(m) => redact(m),
        _ => {}
    }
}

/// Every string and bytes leaf of `msg`.
fn redact_all(msg: &mut DynamicMessage) {
    let fields: Vec<_> = msg.descriptor().fields().filter(|f| msg.has_field(f)).collect();
    for f in fields {
        redact_value(msg.get_field_mut(&f), true);
    }
}

/// An `Any` inside a message: its payload decoded, redacted and encoded again (unknown
/// payloads are dropped whole when `all`, kept otherwise: they hold nothing we can see).
fn redact_any(any: &mut DynamicMessage, all: bool) {
    use prost::Message;
    let type_url = any.get_field_by_name("type_url").and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    let value = any.get_field_by_name("value").and_then(|v| v.as_bytes().cloned()).unwrap_or_default();
    let name = type_url.strip_prefix(TYPE_URL_PREFIX).unwrap_or(&type_url);
    let decoded = pool().get_message_by_name(name).and_then(|d| DynamicMessage::decode(d, value.as_ref()).ok());
    match decoded {
        Some(mut inner) => {
            if all {
                redact_all(&mut inner);
            } else {
                redact(&mut inner);
            }
            any.set_field_by_name("value", prost_reflect::Value::Bytes(inner.encode_to_vec().into()));
        }
        None if all => any.set_field_by_name("value", prost_reflect::Value::Bytes(bytes::Bytes::new())),
        None => {}
    }
}

/// `v` as JSON text with object keys sorted at every level: equal values, equal text.
pub fn canonical_string(v: &Value) -> String {
    let mut s = String::new();
    write_canonical(v, &mut s);
    s
}

/// JSON with object keys sorted at every level, whatever map type serde_json was built with.
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HM: &str = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation";

    #[test]
    fn camel_and_snake_case_give_the_same_message() {
        let snake = json!({"@type": HM, "mutations": {"response_mutations": [
            {"append": {"header": {"key": "x-plugin", "value": "v1"}}}]}});
        let camel = json!({"@type": HM, "mutations": {"responseMutations": [
            {"append": {"header": {"key": "x-plugin", "value": "v1"}}}]}});
        let a = any_from_json(&snake).unwrap();
        let b = any_from_json(&camel).unwrap();
        assert_eq!(a.canonical_json, b.canonical_json);
        assert_eq!(a.any, b.any);
        assert_eq!(a.any.type_url, HM);
        assert!(a.canonical_json.contains("response_mutations"));
    }

    #[test]
    fn struct_maps_hash_the_same_whatever_the_key_order() {
        let w = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
        let mk = |cfg: Value| {
            json!({"@type": w, "config": {"name": "p", "configuration": {
            "@type": "type.googleapis.com/google.protobuf.Struct", "value": cfg}}})
        };
        let a = any_from_json(&mk(json!({"a": 1, "b": {"c": 2, "d": 3}}))).unwrap();
        let b = any_from_json(&mk(json!({"b": {"d": 3, "c": 2}, "a": 1}))).unwrap();
        assert_eq!(a.canonical_json, b.canonical_json);
    }

    #[test]
    fn unknown_field_is_reported_with_its_path() {
        let v = json!({"@type": HM, "mutations": {"response_mutations": [
            {"append": {"header": {"key": "x", "valu": "v1"}}}]}});
        let e = any_from_json(&v).unwrap_err();
        assert_eq!(e.path, "mutations.response_mutations[0].append.header");
        assert!(e.message.contains("valu"), "{e:?}");
    }

    #[test]
    fn wrong_value_type_is_reported_with_its_path() {
        let v = json!({"@type": HM, "mutations": {"response_mutations": "nope"}});
        let e = any_from_json(&v).unwrap_err();
        assert_eq!(e.path, "mutations.response_mutations");
    }

    #[test]
    fn unknown_type_and_missing_type_are_errors() {
        let e = any_from_json(&json!({"@type": "type.googleapis.com/envoy.Nope"})).unwrap_err();
        assert_eq!(e.path, "@type");
        assert!(e.message.contains("unknown type"));
        let e = any_from_json(&json!({"mutations": {}})).unwrap_err();
        assert!(e.message.contains("missing"));
    }

    #[test]
    fn well_known_types_use_the_value_form() {
        let d = "type.googleapis.com/google.protobuf.Duration";
        let m = any_from_json(&json!({"@type": d, "value": "1.5s"})).unwrap();
        assert_eq!(any_to_json(&m.any).unwrap(), json!({"@type": d, "value": "1.500s"}));
        let e = any_from_json(&json!({"@type": d, "seconds": 1})).unwrap_err();
        assert_eq!(e.path, "seconds");
        let e = any_from_json(&json!({"@type": d, "value": 5})).unwrap_err();
        assert_eq!(e.path, "value");
        let s = "type.googleapis.com/google.protobuf.Struct";
        assert!(any_from_json(&json!({"@type": s, "value": {"a": [1, "b"]}})).is_ok());
    }

    #[test]
    fn any_round_trips_to_json() {
        let v = json!({"@type": HM, "mutations": {"response_mutations": [
            {"append": {"header": {"key": "x-plugin", "value": "v1"}}}]}});
        let m = any_from_json(&v).unwrap();
        assert_eq!(any_to_json(&m.any).unwrap(), v);
    }
}

#[cfg(test)]
mod redaction_tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn private_keys_are_redacted_at_any_depth_and_inside_anys() {
        let key = json!({ "inline_string": "-----BEGIN PRIVATE KEY----- SECRET" });
        let cert = json!({ "inline_string": "-----BEGIN CERTIFICATE----- PUBLIC" });
        let secret = json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": "s",
            "tls_certificate": { "certificate_chain": cert, "private_key": key },
        });
        let listener = json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "l",
            "filter_chains": [{ "transport_socket": { "name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": { "tls_certificates": [{ "certificate_chain": cert, "private_key": key }] },
            } } }],
        });
        for doc in [secret, listener] {
            let any = any_from_json(&doc).unwrap().any;
            let plain = any_to_json(&any).unwrap().to_string();
            assert!(plain.contains("SECRET"), "the unredacted dump has it");
            assert!(holds_sensitive(&any), "{plain}");
            let shown = any_to_json_redacted(&any).unwrap().to_string();
            assert!(!shown.contains("SECRET"), "{shown}");
            assert!(shown.contains("[redacted]") && shown.contains("PUBLIC"), "certificates stay: {shown}");
        }
        let plain = json!({ "@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "l",
            "filter_chains": [{ "transport_socket": { "name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": { "tls_certificate_sds_secret_configs": [{ "name": "by-sds" }] } } } }] });
        assert!(!holds_sensitive(&any_from_json(&plain).unwrap().any), "a secret named, not held");
    }
}

#[cfg(test)]
mod typed_struct_tests {
    use serde_json::json;

    use super::*;

    const HM: &str = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation";

    fn mutation() -> Value {
        json!({ "mutations": { "response_mutations": [ { "append": { "header": { "key": "x", "value": "1" } } } ] } })
    }

    #[test]
    fn a_typed_struct_is_the_message_it_holds() {
        let mut typed = mutation();
        typed["@type"] = json!(HM);
        let want = any_from_json(&typed).unwrap();
        for url in TYPED_STRUCT_URLS {
            let ts = json!({ "@type": url, "type_url": HM, "value": mutation() });
            assert_eq!(any_from_json(&ts).unwrap(), want, "{url}: same bytes, same canonical JSON");
        }
    }

    #[test]
    fn nested_typed_structs_anywhere_an_any_stands() {
        let inner = json!({ "@type": TYPED_STRUCT_URLS[1], "type_url": HM, "value": mutation() });
        let outer = json!({ "@type": TYPED_STRUCT_URLS[0],
            "type_url": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "value": { "name": "n", "typed_config": inner } });
        let got = any_from_json(&outer).unwrap();
        let mut plain_inner = mutation();
        plain_inner["@type"] = json!(HM);
        let plain = json!({ "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig", "name": "n", "typed_config": plain_inner });
        assert_eq!(got, any_from_json(&plain).unwrap());
    }

    #[test]
    fn errors_point_into_the_value_as_written() {
        let mut bad = mutation();
        bad["mutations"]["response_mutations"][0]["append"]["header"]["valu"] = json!("1");
        let ts = json!({ "@type": TYPED_STRUCT_URLS[0], "type_url": HM, "value": bad });
        let e = any_from_json(&ts).unwrap_err();
        assert_eq!(e.path, "value.mutations.response_mutations[0].append.header", "{e:?}");
        assert!(e.message.contains("'valu'"), "{e:?}");
        let e = any_from_json(&json!({ "@type": TYPED_STRUCT_URLS[0], "type_url": "type.googleapis.com/nope.Nope" }))
            .unwrap_err();
        assert_eq!(e.path, "type_url", "{e:?}");
        let e = any_from_json(&json!({ "@type": TYPED_STRUCT_URLS[0], "value": {} })).unwrap_err();
        assert_eq!(e.path, "type_url");
        let e = any_from_json(&json!({ "@type": TYPED_STRUCT_URLS[0], "type_url": HM, "extra": 1 })).unwrap_err();
        assert_eq!(e.path, "extra");
        // Nested: the path runs through both values.
        let inner = json!({ "@type": TYPED_STRUCT_URLS[1], "type_url": HM, "value": { "nope": 1 } });
        let outer = json!({ "@type": TYPED_STRUCT_URLS[0],
            "type_url": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "value": { "name": "n", "typed_config": inner } });
        let e = any_from_json(&outer).unwrap_err();
        assert_eq!((e.path.as_str(), e.message.contains("'nope'")), ("value.typed_config", true), "{e:?}");
    }
}
