//! The `switchboard.v1.msgpack` subprotocol: the native protocol's frames, verb for verb,
//! encoded as MessagePack instead of JSON text (docs/PROTOCOL.md §3.3). The session speaks
//! JSON; this module translates at the edge of the connection: a client's binary frame is
//! read as MessagePack and handed to the session as JSON text, and every frame for the client
//! is transcoded once (per fan-out, once for all its MessagePack recipients).
//!
//! A binary payload (routes with `binary: true`) travels as MessagePack `bin` under
//! `payload`, in the same envelope as a JSON payload would.

use serde_json::Value;

/// The subprotocol's name in `Sec-WebSocket-Protocol`.
pub(crate) const SUBPROTOCOL: &str = "switchboard.v1.msgpack";

/// Whether a request's `Sec-WebSocket-Protocol` asks for the subprotocol.
pub(crate) fn requested(header: Option<&str>) -> bool {
    header.is_some_and(|h| h.split(',').any(|p| p.trim() == SUBPROTOCOL))
}

/// A JSON frame as MessagePack (`None`: not JSON, which the edge never builds).
pub(crate) fn from_json(json: &[u8]) -> Option<Vec<u8>> {
    let value: Value = serde_json::from_slice(json).ok()?;
    rmp_serde::to_vec_named(&value).ok()
}

/// A client's MessagePack frame as JSON text for the session (`None`: not MessagePack
/// with a JSON-compatible value).
pub(crate) fn to_json(frame: &[u8]) -> Option<String> {
    use serde::Deserialize as _;
    let mut de = rmp_serde::Deserializer::from_read_ref(frame);
    // As deep as JSON frames may nest (serde_json's limit): a deeper frame could not be
    // read as JSON anyway, and the recursion stays within any thread's stack.
    de.set_max_depth(MAX_DEPTH);
    let value = Value::deserialize(&mut de).ok()?;
    serde_json::to_string(&value).ok()
}

/// How deep a MessagePack frame may nest (serde_json's recursion limit).
const MAX_DEPTH: usize = 128;

/// `{<key>: verb, "topic"?: topic, "payload": <bin>}`: a binary payload pushed to a
/// MessagePack client.
pub(crate) fn envelope(key: &str, verb: &str, topic: Option<&str>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 64);
    let fields = 2 + u32::from(topic.is_some());
    // Writes to a Vec cannot fail.
    let _ = rmp::encode::write_map_len(&mut out, fields);
    let _ = rmp::encode::write_str(&mut out, key);
    let _ = rmp::encode::write_str(&mut out, verb);
    if let Some(topic) = topic {
        let _ = rmp::encode::write_str(&mut out, "topic");
        let _ = rmp::encode::write_str(&mut out, topic);
    }
    let _ = rmp::encode::write_str(&mut out, "payload");
    let _ = rmp::encode::write_bin(&mut out, payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_without_exhausting_the_stack() {
        let nested = |depth: usize| {
            let mut frame = vec![0x91; depth]; // an array of one element, `depth` times
            frame.push(0xc0); // nil
            frame
        };
        // On a tokio worker's stack (2 MiB): without the limit, a debug build overflowed it
        // at rmp_serde's default depth (1024).
        let (ok, deep) = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || (to_json(&nested(100)), to_json(&nested(100_000))))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(ok.unwrap().len(), 100 * 2 + 4);
        assert_eq!(deep, None);
    }

    #[test]
    fn frames_round_trip_through_messagepack() {
        let json =
            r#"{"id":7,"payload":{"a":[1,2.5,"x",null,true]},"topic":"a/b","type":"publish"}"#;
        let packed = from_json(json.as_bytes()).unwrap();
        assert!(packed.len() < json.len());
        assert_eq!(to_json(&packed).unwrap(), json);
        assert_eq!(to_json(b"\xc1"), None, "never used byte");
    }

    #[test]
    fn a_binary_payload_is_bin_in_the_envelope() {
        let packed = envelope("type", "message", Some("t/1"), &[0, 159, 255]);
        let value: rmpv_like::Map = rmp_serde::from_slice(&packed).unwrap();
        assert_eq!(value.r#type, "message");
        assert_eq!(value.topic.as_deref(), Some("t/1"));
        assert_eq!(value.payload.into_vec(), vec![0, 159, 255]);
        assert!(requested(Some("chat, switchboard.v1.msgpack")));
        assert!(!requested(Some("switchboard.v1.json")));
    }

    mod rmpv_like {
        #[derive(serde::Deserialize)]
        pub(super) struct Map {
            pub(super) r#type: String,
            pub(super) topic: Option<String>,
            pub(super) payload: serde_bytes_like::Buf,
        }
        pub(super) mod serde_bytes_like {
            /// Bytes from MessagePack `bin`.
            pub(crate) struct Buf(Vec<u8>);
            impl Buf {
                pub(crate) fn into_vec(self) -> Vec<u8> {
                    self.0
                }
            }
            impl<'de> serde::Deserialize<'de> for Buf {
                fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    struct V;
                    impl serde::de::Visitor<'_> for V {
                        type Value = Buf;
                        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                            f.write_str("bytes")
                        }
                        fn visit_bytes<E>(self, v: &[u8]) -> Result<Buf, E> {
                            Ok(Buf(v.to_vec()))
                        }
                    }
                    d.deserialize_bytes(V)
                }
            }
        }
    }
}
