//! Client ↔ edge JSON frames.
//!
//! Every frame is a JSON object whose routing field is named by the route's dialect
//! ([`Key`]): `type` (native, hyperexpress, bodhi), `event` (monument) or `handler`
//! (MonoRail); the dialect table itself is `edge_core::dialect`. Frames the edge sends are
//! built with [`FrameBuilder`], which writes JSON text directly: a frame for many connections
//! is built once and its bytes shared.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The routing field of a dialect.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Key {
    #[default]
    Type,
    Event,
    Handler,
}

impl Key {
    pub const ALL: [Key; 3] = [Key::Type, Key::Event, Key::Handler];

    pub fn as_str(self) -> &'static str {
        match self {
            Key::Type => "type",
            Key::Event => "event",
            Key::Handler => "handler",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Machine-readable codes of error frames (docs/PROTOCOL.md §7 Error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidJson,
    MissingType,
    InvalidFrame,
    UnknownResource,
    InvalidTopic,
    Forbidden,
    RateLimited,
    NoResponders,
    Timeout,
    Unavailable,
    TooManyRequests,
    UnknownVerb,
    InvalidEvent,
    NotSupported,
    InvalidToken,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::MissingType => "missing_type",
            Self::InvalidFrame => "invalid_frame",
            Self::UnknownResource => "unknown_resource",
            Self::InvalidTopic => "invalid_topic",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::NoResponders => "no_responders",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::TooManyRequests => "too_many_requests",
            Self::UnknownVerb => "unknown_verb",
            Self::InvalidEvent => "invalid_event",
            Self::NotSupported => "not_supported",
            Self::InvalidToken => "invalid_token",
        }
    }
}

/// Why a client frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not a JSON object")]
    InvalidJson(#[source] Option<serde_json::Error>),
    #[error("frame has no string \"{0}\" field")]
    MissingKey(&'static str),
}

/// A parsed client frame: its routing value, its optional `id`, and the whole object.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub verb: String,
    pub id: Option<Value>,
    pub body: Map<String, Value>,
}

impl ClientFrame {
    /// Parses a text frame whose routing field is `key`.
    pub fn parse(text: &str, key: Key) -> Result<Self, FrameError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| FrameError::InvalidJson(Some(e)))?;
        let Value::Object(body) = value else {
            return Err(FrameError::InvalidJson(None));
        };
        let verb = match body.get(key.as_str()) {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(FrameError::MissingKey(key.as_str())),
        };
        let id = body
            .get("id")
            .filter(|v| v.is_string() || v.is_number())
            .cloned();
        Ok(Self { verb, id, body })
    }

    /// A string field.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.body.get(name).and_then(Value::as_str)
    }

    /// A boolean field (absent = false).
    pub fn flag(&self, name: &str) -> bool {
        self.body
            .get(name)
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }
}

/// Writes one frame as JSON text: `{"<key>":"<verb>", …fields}`.
#[derive(Debug)]
pub struct FrameBuilder(String);

impl FrameBuilder {
    pub fn new(key: Key, verb: &str) -> Self {
        let mut s = String::with_capacity(64);
        s.push_str("{\"");
        s.push_str(key.as_str());
        s.push_str("\":");
        push_json_str(&mut s, verb);
        Self(s)
    }

    /// Adds `"id"` when the client frame had one.
    pub fn id(self, id: Option<&Value>) -> Self {
        match id {
            Some(v) => self.value("id", v),
            None => self,
        }
    }

    pub fn str(mut self, name: &str, value: &str) -> Self {
        self.name(name);
        push_json_str(&mut self.0, value);
        self
    }

    pub fn value(mut self, name: &str, value: &Value) -> Self {
        self.name(name);
        self.0.push_str(&value.to_string());
        self
    }

    /// Adds a field whose value is JSON text already (not checked here).
    pub fn raw(mut self, name: &str, json: &str) -> Self {
        self.name(name);
        self.0.push_str(json);
        self
    }

    pub fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }

    fn name(&mut self, name: &str) {
        self.0.push(',');
        push_json_str(&mut self.0, name);
        self.0.push(':');
    }
}

/// An error frame: `{"<key>":"error","id"?,"code","message"}`.
pub fn error(key: Key, id: Option<&Value>, code: ErrorCode, message: &str) -> String {
    FrameBuilder::new(key, "error")
        .id(id)
        .str("code", code.as_str())
        .str("message", message)
        .finish()
}

/// Returns `bytes` as JSON text if they are one valid JSON value, else the same bytes as
/// a JSON string (lossy UTF-8), so a frame never carries invalid JSON.
pub fn json_or_string(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if serde_json::from_str::<&RawValue>(text).is_ok() => text.trim().to_owned(),
        _ => Value::String(String::from_utf8_lossy(bytes).into_owned()).to_string(),
    }
}

fn push_json_str(out: &mut String, s: &str) {
    // serde_json escapes exactly as JSON requires.
    out.push_str(&Value::String(s.to_owned()).to_string());
}

/// Longest `message_id` a backend may set.
pub const MAX_MESSAGE_ID: usize = 128;

/// A backend's message id: empty (none), or up to [`MAX_MESSAGE_ID`] visible ASCII
/// characters, so that it fits a NATS header and a JSON string unescaped.
pub fn validate_message_id(id: &str) -> Result<(), String> {
    if id.len() > MAX_MESSAGE_ID {
        return Err(format!("message_id is longer than {MAX_MESSAGE_ID} bytes"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return Err("message_id must be visible ASCII without quotes or backslashes".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_writes_valid_json() {
        let f = FrameBuilder::new(Key::Handler, "li\"st")
            .id(Some(&Value::from(7)))
            .str("topic", "a/b")
            .raw("payload", "{\"x\":1}")
            .finish();
        let v: Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["handler"], "li\"st");
        assert_eq!(v["id"], 7);
        assert_eq!(v["payload"]["x"], 1);
    }

    #[test]
    fn parse_reads_routing_field_and_id() {
        let f = ClientFrame::parse(r#"{"event":"data:get:x","id":"a"}"#, Key::Event).unwrap();
        assert_eq!(f.verb, "data:get:x");
        assert_eq!(f.id, Some(Value::from("a")));
        assert!(matches!(
            ClientFrame::parse(r#"{"type":1}"#, Key::Type),
            Err(FrameError::MissingKey("type"))
        ));
        assert!(matches!(
            ClientFrame::parse("[1]", Key::Type),
            Err(FrameError::InvalidJson(_))
        ));
        assert!(matches!(
            ClientFrame::parse("{", Key::Type),
            Err(FrameError::InvalidJson(_))
        ));
    }

    #[test]
    fn payloads_are_always_json() {
        assert_eq!(json_or_string(b" {\"a\":1} "), "{\"a\":1}");
        assert_eq!(json_or_string(b"hello"), "\"hello\"");
    }
}
