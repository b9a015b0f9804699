//! Conversions between JSON values and `google.protobuf.Struct`/`Value`, for gRPC fields
//! that carry free-form JSON (connection context, message payloads).

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};

/// A JSON object as a `Struct`.
pub fn to_struct(map: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

/// A JSON value as a protobuf `Value`.
pub fn to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        Value::Object(m) => Kind::StructValue(to_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A protobuf `Value` as JSON. Whole numbers come back as integers.
pub fn from_value(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number(*n),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(from_value).collect()),
        Some(Kind::StructValue(s)) => Value::Object(from_struct(s)),
    }
}

/// A `Struct` as a JSON object.
pub fn from_struct(s: &prost_types::Struct) -> Map<String, Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), from_value(v)))
        .collect()
}

fn number(n: f64) -> Value {
    // Integral values within i64 keep their integer form (2^63 is exactly representable).
    if n.fract() == 0.0 && n.abs() < 9.223_372_036_854_776e18 {
        #[allow(clippy::cast_possible_truncation)]
        return Value::Number(Number::from(n as i64));
    }
    Number::from_f64(n).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_json() {
        let v = serde_json::json!({"a": [1, 2.5, "x", null, true], "b": {"c": -3}});
        assert_eq!(from_value(&to_value(&v)), v);
    }
}
