//! Revoked tokens: the entries of the revocation bucket (JetStream KV in cluster mode, the
//! in-process store in `dev`). `Admin.Revoke` writes them; every edge watches the bucket and
//! closes the matching connections. An entry is ignored once `until` has passed, and the
//! bucket's maximum age removes it for good.

use serde::{Deserialize, Serialize};

/// The default bucket.
pub const BUCKET: &str = "sb_revoked";
/// The longest a revocation lasts, and the bucket's maximum age: 7 days.
pub const MAX_TTL_SECS: u64 = 7 * 24 * 3600;

/// What a revocation matches: one token (`jti`) or every token of a subject (`sub`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Jti,
    Sub,
}

/// One entry of the bucket (its value, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub kind: Kind,
    /// The `jti` or `sub` claim it matches.
    pub value: String,
    /// Only connections in this namespace; none: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Unix seconds after which the entry no longer applies.
    pub until: i64,
    /// Why, for operators (never shown to clients).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl Revocation {
    /// The entry's key in the bucket: one per (kind, namespace, value).
    pub fn key(&self) -> String {
        let kind = match self.kind {
            Kind::Jti => "jti",
            Kind::Sub => "sub",
        };
        let ns = self.namespace.as_deref().unwrap_or("");
        format!("{kind}:{}:{ns}:{}", ns.len(), self.value)
    }

    /// Whether the entry still applies at `now` (Unix seconds).
    pub fn live(&self, now: i64) -> bool {
        now < self.until
    }

    /// Whether it matches a token with these claims, used in `namespace`.
    pub fn matches(&self, jti: Option<&str>, sub: Option<&str>, namespace: &str) -> bool {
        let claim = match self.kind {
            Kind::Jti => jti,
            Kind::Sub => sub,
        };
        claim == Some(self.value.as_str())
            && self.namespace.as_deref().is_none_or(|n| n == namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_and_expiry() {
        let r = Revocation {
            kind: Kind::Sub,
            value: "alice".into(),
            namespace: Some("acme".into()),
            until: 100,
            reason: String::new(),
        };
        assert!(r.matches(None, Some("alice"), "acme"));
        assert!(!r.matches(None, Some("alice"), "globex"));
        assert!(!r.matches(Some("alice"), None, "acme"));
        assert!(r.live(99) && !r.live(100));
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Revocation>(&json).unwrap(), r);
        assert_eq!(r.key(), "sub:4:acme:alice");
    }
}
