//! Who is connecting: JWT verification (HS256, RS256) from a header, a query parameter or
//! a cookie; the user claim; the namespaces a token may open; the origin allow-list.
//! Everything here runs before the upgrade, so a refusal is an HTTP status.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::config::{AuthConfig, RouteConfig};
use crate::http::RequestHead;

/// The admitted identity of a connection.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub user: String,
    pub namespace: String,
    /// The token's claims (empty on anonymous routes).
    pub claims: Map<String, Value>,
}

/// Why an upgrade was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token in the request")]
    MissingToken,
    #[error("token rejected: {0}")]
    InvalidToken(#[source] jsonwebtoken::errors::Error),
    #[error("token has no string claim {0:?}")]
    MissingUser(String),
    #[error("namespace {0:?} is not granted by the token")]
    NamespaceNotGranted(String),
    #[error("origin {0:?} is not allowed")]
    OriginNotAllowed(String),
    #[error("namespace {0:?} is not valid")]
    BadNamespace(String),
}

impl AuthError {
    /// The HTTP status of the refusal (PROTOCOL.md §2).
    pub fn status(&self) -> u16 {
        match self {
            Self::MissingToken | Self::InvalidToken(_) | Self::MissingUser(_) => 401,
            Self::NamespaceNotGranted(_) | Self::OriginNotAllowed(_) => 403,
            Self::BadNamespace(_) => 400,
        }
    }

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::InvalidToken(_) => "invalid_token",
            Self::MissingUser(_) => "missing_user",
            Self::NamespaceNotGranted(_) => "namespace_not_granted",
            Self::OriginNotAllowed(_) => "origin",
            Self::BadNamespace(_) => "bad_namespace",
        }
    }
}

/// A route's verifier, built once at start.
pub(crate) struct Verifier {
    key: Option<(DecodingKey, Validation)>,
    cfg: AuthConfig,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keyed", &self.key.is_some())
            .finish()
    }
}

impl Verifier {
    /// `rs256_pem` is the content of `rs256_public_key_file`, read by the caller.
    pub(crate) fn new(route: &RouteConfig, rs256_pem: Option<&[u8]>) -> Result<Self, String> {
        let cfg = route.auth.clone();
        let key = if route.anonymous {
            None
        } else if let Some(pem) = rs256_pem {
            let key =
                DecodingKey::from_rsa_pem(pem).map_err(|e| format!("bad RS256 public key: {e}"))?;
            Some((key, validation(Algorithm::RS256, &cfg)))
        } else if let Some(secret) = &cfg.hs256_secret {
            Some((
                DecodingKey::from_secret(secret.as_bytes()),
                validation(Algorithm::HS256, &cfg),
            ))
        } else {
            return Err("no key configured".into());
        };
        Ok(Self { key, cfg })
    }

    /// Verifies the token of a request (unless anonymous) and picks its namespace.
    pub(crate) fn admit(
        &self,
        route: &RouteConfig,
        head: &RequestHead,
    ) -> Result<Identity, AuthError> {
        check_origin(route, head)?;
        let (user, claims) = match &self.key {
            None => (
                head.query
                    .get(&route.user_query)
                    .cloned()
                    .unwrap_or_default(),
                Map::new(),
            ),
            Some((key, validation)) => {
                let token = self.token(head).ok_or(AuthError::MissingToken)?;
                let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
                    .map_err(AuthError::InvalidToken)?;
                let claims = data.claims;
                let user = match claims.get(&self.cfg.user_claim) {
                    Some(Value::String(s)) if !s.is_empty() => s.clone(),
                    _ => return Err(AuthError::MissingUser(self.cfg.user_claim.clone())),
                };
                (user, claims)
            }
        };
        let ns_cfg = &route.namespace;
        let namespace = ns_cfg
            .query
            .as_ref()
            .and_then(|q| head.query.get(q))
            .filter(|v| !v.is_empty())
            .cloned()
            .or_else(|| {
                ns_cfg
                    .claim
                    .as_ref()
                    .and_then(|c| claims.get(c))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| ns_cfg.default.clone());
        if namespace.is_empty() || namespace.len() > 256 {
            return Err(AuthError::BadNamespace(namespace));
        }
        if self.key.is_some() {
            let granted = match claims.get(&self.cfg.namespaces_claim) {
                None => true,
                Some(Value::String(s)) => *s == namespace || s == "*",
                Some(Value::Array(list)) => list
                    .iter()
                    .any(|v| v.as_str().is_some_and(|s| s == namespace || s == "*")),
                Some(_) => false,
            };
            if !granted {
                return Err(AuthError::NamespaceNotGranted(namespace));
            }
        }
        Ok(Identity {
            user,
            namespace,
            claims,
        })
    }

    fn token<'h>(&self, head: &'h RequestHead) -> Option<&'h str> {
        let from_header = || {
            let v = head.header("authorization")?;
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        };
        (if self.cfg.header { from_header() } else { None })
            .or_else(|| {
                self.cfg
                    .query
                    .as_ref()
                    .and_then(|q| head.query.get(q))
                    .map(String::as_str)
            })
            .or_else(|| self.cfg.cookie.as_ref().and_then(|c| head.cookie(c)))
            .filter(|t| !t.is_empty())
    }
}

fn validation(alg: Algorithm, cfg: &AuthConfig) -> Validation {
    let mut v = Validation::new(alg);
    // `exp` and `nbf` are checked when present; tokens without `exp` are the issuer's call.
    v.required_spec_claims.clear();
    v.validate_nbf = true;
    v.validate_aud = false;
    v.leeway = cfg.leeway.as_secs();
    v
}

fn check_origin(route: &RouteConfig, head: &RequestHead) -> Result<(), AuthError> {
    let Some(origin) = head.header("origin") else {
        return Ok(());
    };
    let allowed = &route.allowed_origins;
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    if allowed.is_empty() {
        // Same-origin: the Origin's host:port equals the Host header.
        let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
        if head
            .header("host")
            .is_some_and(|h| h.eq_ignore_ascii_case(origin_host))
        {
            return Ok(());
        }
    }
    Err(AuthError::OriginNotAllowed(origin.to_owned()))
}
