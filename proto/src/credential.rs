//! Node credentials: how an edge or a coordinator proves to a coordinator which node it is.
//!
//! Every process of a cluster holds the same cluster secret. From it each derives its own
//! credential, `sbn1.<role>.<mac>.<node id>`, where `mac` is HMAC-SHA256 of the role and the
//! node id under the secret. A coordinator that holds the secret verifies a credential
//! without any state and learns the role and node id it allows: an edge may report only as
//! itself, and an API key (which is not a node credential) cannot report at all. A process
//! given only its own credential (not the secret) can act as no other node.

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// Prefix and version of the format.
const PREFIX: &str = "sbn1";
/// Domain separation: a MAC made for anything else never verifies as a credential.
const CONTEXT: &[u8] = b"switchboard node credential v1";

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Edge,
    Coordinator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Edge => "edge",
            Self::Coordinator => "coordinator",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "edge" => Some(Self::Edge),
            "coordinator" => Some(Self::Coordinator),
            _ => None,
        }
    }
}

/// The node a valid credential speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub role: Role,
    pub id: String,
}

/// The credential of `node_id` in `role` under `secret`.
pub fn mint(secret: &[u8], role: Role, node_id: &str) -> String {
    let mac = mac(secret, role, node_id).finalize().into_bytes();
    format!("{PREFIX}.{}.{}.{node_id}", role.as_str(), hex(&mac))
}

/// The node `credential` speaks for, if it was minted under `secret`. The comparison is
/// constant-time.
pub fn verify(secret: &[u8], credential: &str) -> Option<Node> {
    let mut parts = credential.splitn(4, '.');
    let (prefix, role, mac_hex, node_id) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if prefix != PREFIX || node_id.is_empty() {
        return None;
    }
    let role = Role::parse(role)?;
    let presented = unhex(mac_hex)?;
    mac(secret, role, node_id).verify_slice(&presented).ok()?;
    Some(Node {
        role,
        id: node_id.to_owned(),
    })
}

/// Whether `text` has the shape of a node credential (used to tell callers apart without
/// verifying).
pub fn looks_like(text: &str) -> bool {
    text.starts_with(PREFIX) && text.as_bytes().get(PREFIX.len()) == Some(&b'.')
}

fn mac(secret: &[u8], role: Role, node_id: &str) -> Hmac<Sha256> {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let mut m = <Hmac<Sha256>>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    m.update(CONTEXT);
    m.update(&[0]);
    m.update(role.as_str().as_bytes());
    m.update(&[0]);
    m.update(node_id.as_bytes());
    m
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_verifies_as_its_node_only() {
        let c = mint(b"secret", Role::Edge, "edge-1.zone.a");
        assert_eq!(
            verify(b"secret", &c),
            Some(Node {
                role: Role::Edge,
                id: "edge-1.zone.a".into()
            })
        );
        assert_eq!(verify(b"other", &c), None);
        // Another node id or role with the same MAC is refused.
        let forged = c.replace("edge-1", "edge-2");
        assert_eq!(verify(b"secret", &forged), None);
        let promoted = c.replacen(".edge.", ".coordinator.", 1);
        assert_eq!(verify(b"secret", &promoted), None);
    }

    #[test]
    fn malformed_credentials_are_refused() {
        for bad in [
            "",
            "sbn1",
            "sbn1.edge",
            "sbn1.edge.zz.e1",
            "sbn1.edge.abc.e1",
            "sbn1.root.00.e1",
            "sbn2.edge.00.e1",
        ] {
            assert_eq!(verify(b"secret", bad), None, "{bad}");
        }
        let c = mint(b"secret", Role::Coordinator, "c1");
        assert!(looks_like(&c));
        assert!(!looks_like("sb_abcdef"));
        assert_eq!(verify(b"secret", c.trim_end_matches("c1")), None);
    }
}
