//! Envoy-native JSON (proto3 JSON mapping with `@type`, nested `Any`, camelCase or
//! snake_case names) to protobuf `Any`, checked against Envoy's descriptors.

use prost_reflect::{DeserializeOptions, DynamicMessage, SerializeOptions};
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
    let name = any.type_url.strip_prefix(TYPE_URL_PREFIX).unwrap_or(&any.type_url);
    let desc = pool()
        .get_message_by_name(name)
        .ok_or_else(|| JsonToAnyError::at("@type", format!("unknown type \"{}\"", any.type_url)))?;
    let msg = DynamicMessage::decode(desc, any.value.as_slice()).map_err(|e| JsonToAnyError::at("", e.to_string()))?;
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
