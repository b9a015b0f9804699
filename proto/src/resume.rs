//! Resume tokens: what lets a client that lost its connection restore its subscriptions on
//! any edge (docs/PROTOCOL.md §4.6 Resuming a session).
//!
//! A token is `sbr1.<payload>.<mac>`: the payload is the JSON of [`Resume`] in base64url and
//! the MAC is HMAC-SHA256 of it under a key every edge of the cluster derives from the
//! cluster secret ([`key`]), so any edge verifies a token another one made, and nobody
//! without the secret can make one. It holds no bearer token: a resume is accepted only from
//! a connection authenticated as usual, as the token's user in its namespace on its route.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

const PREFIX: &str = "sbr1";
/// Domain separation: the key is good for resume tokens and nothing else.
const CONTEXT: &[u8] = b"switchboard resume token v1";

/// The key resume tokens are made and checked with, derived from the cluster secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("resume::Key(<redacted>)")
    }
}

/// The resume key of a cluster whose secret is `secret`.
pub fn key(secret: &[u8]) -> Key {
    let mut m = hmac(secret);
    m.update(CONTEXT);
    Key(m.finalize().into_bytes().into())
}

/// What a resume token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    #[serde(rename = "u")]
    pub user: String,
    #[serde(rename = "n")]
    pub namespace: String,
    /// The route's path, as configured.
    #[serde(rename = "r")]
    pub route: String,
    /// Unix seconds after which the token is refused.
    #[serde(rename = "x")]
    pub exp: i64,
    /// Unix seconds when the route's connect hook last accepted this user here: a token
    /// made anew keeps it, so that skipping the hook on a resume does not last forever.
    #[serde(rename = "a", default)]
    pub accepted: i64,
    #[serde(rename = "s", default)]
    pub subscriptions: Vec<Held>,
}

/// A subscription the token restores, with its position when it is on a history topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    #[serde(rename = "t")]
    pub topic: String,
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// The token saying `resume` under `key`.
pub fn mint(key: &Key, resume: &Resume) -> String {
    let json = serde_json::to_vec(resume).unwrap_or_default();
    let payload = B64.encode(json);
    let mut m = hmac(&key.0);
    m.update(payload.as_bytes());
    let mac = B64.encode(m.finalize().into_bytes());
    format!("{PREFIX}.{payload}.{mac}")
}

/// Why a token was refused (safe to tell the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("not a resume token")]
    Malformed,
    #[error("resume token not made by this cluster")]
    Forged,
    #[error("resume token expired")]
    Expired,
}

/// What `token` says, if `key` made it and it has not expired at `now_s` (Unix seconds).
/// The MAC comparison is constant-time.
pub fn verify(key: &Key, token: &str, now_s: i64) -> Result<Resume, Refused> {
    let mut parts = token.split('.');
    let (Some(PREFIX), Some(payload), Some(mac), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refused::Malformed);
    };
    let mac = B64.decode(mac).map_err(|_| Refused::Malformed)?;
    let mut m = hmac(&key.0);
    m.update(payload.as_bytes());
    m.verify_slice(&mac).map_err(|_| Refused::Forged)?;
    let json = B64.decode(payload).map_err(|_| Refused::Malformed)?;
    let resume: Resume = serde_json::from_slice(&json).map_err(|_| Refused::Malformed)?;
    if resume.exp < now_s {
        return Err(Refused::Expired);
    }
    Ok(resume)
}

fn hmac(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    <Hmac<Sha256>>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Resume {
        Resume {
            user: "alice".into(),
            namespace: "acme".into(),
            route: "/connect".into(),
            exp: 1_000,
            accepted: 900,
            subscriptions: vec![
                Held {
                    topic: "chat/room1".into(),
                    offset: Some(41),
                    epoch: Some("e1".into()),
                },
                Held {
                    topic: "news/#".into(),
                    offset: None,
                    epoch: None,
                },
            ],
        }
    }

    #[test]
    fn a_token_verifies_under_its_key_until_it_expires() {
        let k = key(b"cluster secret of sixteen+");
        let t = mint(&k, &sample());
        assert_eq!(verify(&k, &t, 999), Ok(sample()));
        assert_eq!(verify(&k, &t, 1_000), Ok(sample()));
        assert_eq!(verify(&k, &t, 1_001), Err(Refused::Expired));
        assert_eq!(
            verify(&key(b"another cluster secret"), &t, 0),
            Err(Refused::Forged)
        );
    }

    #[test]
    fn tampered_or_malformed_tokens_are_refused() {
        let k = key(b"cluster secret of sixteen+");
        let t = mint(&k, &sample());
        let (head, mac) = t.rsplit_once('.').unwrap();
        let mut other = sample();
        other.user = "mallory".into();
        let forged_payload = mint(&k, &other);
        let forged_payload = forged_payload.split('.').nth(1).unwrap();
        let swapped = format!("sbr1.{forged_payload}.{mac}");
        assert_eq!(verify(&k, &swapped, 0), Err(Refused::Forged));
        for bad in ["", "sbr1", "sbr1.a", "sbr2.a.b", head, &format!("{t}.x")] {
            assert!(verify(&k, bad, 0).is_err(), "{bad}");
        }
        assert!(!format!("{k:?}").contains(char::is_numeric));
    }
}
