//! Tokens clients present: HS256 JWTs and the `Authorization` header that carries one.

use serde_json::{Value, json};

/// An HS256 JWT of `claims` signed with `secret`.
pub fn hs256(claims: &Value, secret: impl AsRef<[u8]>) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_ref()),
    )
    .expect("HS256 signs any claims")
}

/// An HS256 JWT for `user` (`sub`) valid for ten minutes, signed with `secret`.
pub fn user_token(user: &str, secret: &str) -> String {
    hs256(&json!({"sub": user, "exp": unix_now() + 600}), secret)
}

/// The `Authorization` header value carrying `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Seconds since the Unix epoch, for `exp` claims.
pub fn unix_now() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(now.as_secs()).expect("seconds fit an i64")
}
