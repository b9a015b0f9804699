//! `switchboard token`: mints an HS256 test token, so trying an authenticated route needs no
//! other tool.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};

/// What goes into the token.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub secret: String,
    /// The user claim's name and value, e.g. `sub` = `alice`.
    pub user_claim: String,
    pub user: String,
    /// Namespaces the token may open; empty = no `namespaces` claim (any namespace).
    pub namespaces: Vec<String>,
    pub ttl: Duration,
}

/// The signed token.
pub fn mint(spec: &TokenSpec) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = Map::new();
    claims.insert(spec.user_claim.clone(), Value::String(spec.user.clone()));
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(now + spec.ttl.as_secs()));
    if !spec.namespaces.is_empty() {
        claims.insert("namespaces".into(), json!(spec.namespaces));
    }
    let key = EncodingKey::from_secret(spec.secret.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
}
