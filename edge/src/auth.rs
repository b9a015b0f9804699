//! Who is connecting: JWT verification (HS256, RS256, ES256, EdDSA, or a JWKS by `kid`)
//! from a header, a query parameter or a cookie; the user claim; the namespaces a token may
//! open; the origin allow-list. Everything here runs before the upgrade, so a refusal is an
//! HTTP status — except [`Verifier::refresh`], the same checks for a token sent on an open
//! connection.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::config::{AuthConfig, NamespaceConfig, RouteConfig};
use crate::http::RequestHead;
use crate::jwks::{Fetcher, KeySet, KeyStore, Miss};

/// The key material of a route, read by the binary at start (libraries read no files).
#[derive(Debug, Clone, Default)]
pub struct RouteKeys {
    /// The content of `rs256_`, `es256_` or `eddsa_public_key_file`.
    pub pem: Option<Vec<u8>>,
    /// The content of `jwks_file`.
    pub jwks: Option<Vec<u8>>,
    /// The content of `jwks_ca_file`.
    pub jwks_ca: Option<Vec<u8>>,
    /// The key resume tokens are made and checked with (the cluster's, so that any edge
    /// takes a token another made); `None`: no resume tokens.
    pub resume: Option<proto::resume::Key>,
}

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
    #[error("namespace {0:?} is not granted: the token's claim names another")]
    NamespaceNotClaimed(String),
    #[error("the token's namespace claim {0:?} is not a namespace")]
    BadNamespaceClaim(String),
    #[error("the token has no namespace claim {0:?}")]
    MissingNamespaceClaim(String),
    #[error("origin {0:?} is not allowed")]
    OriginNotAllowed(String),
    #[error("host {0:?} is not allowed")]
    HostNotAllowed(String),
    #[error("namespace {0:?} is not valid")]
    BadNamespace(String),
    #[error("no key for the token's kid")]
    UnknownKey,
    #[error("token has been revoked")]
    Revoked,
    #[error("token is for another user")]
    OtherUser,
}

impl AuthError {
    /// The HTTP status of the refusal (docs/PROTOCOL.md §2 Connecting).
    pub fn status(&self) -> u16 {
        match self {
            Self::MissingToken
            | Self::InvalidToken(_)
            | Self::MissingUser(_)
            | Self::UnknownKey
            | Self::Revoked
            | Self::OtherUser => 401,
            Self::NamespaceNotGranted(_)
            | Self::NamespaceNotClaimed(_)
            | Self::BadNamespaceClaim(_)
            | Self::MissingNamespaceClaim(_)
            | Self::OriginNotAllowed(_)
            | Self::HostNotAllowed(_) => 403,
            Self::BadNamespace(_) => 400,
        }
    }

    /// A short label for metrics, and the whole body of the refusal: what went wrong in
    /// detail (jsonwebtoken's text, the namespace asked for) is logged at debug level only.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::InvalidToken(_) => "invalid_token",
            Self::MissingUser(_) => "missing_user",
            Self::NamespaceNotGranted(_) | Self::NamespaceNotClaimed(_) => "namespace_not_granted",
            Self::BadNamespaceClaim(_) | Self::MissingNamespaceClaim(_) => "bad_namespace_claim",
            Self::OriginNotAllowed(_) => "origin",
            Self::HostNotAllowed(_) => "host",
            Self::BadNamespace(_) => "bad_namespace",
            Self::UnknownKey => "unknown_key",
            Self::Revoked => "token_revoked",
            Self::OtherUser => "other_user",
        }
    }
}

/// A route's verifier, built once at start.
pub(crate) struct Verifier {
    keys: Keys,
    cfg: AuthConfig,
    /// The `jwks_url` fetcher, run by the edge.
    pub(crate) fetcher: Option<Arc<Fetcher>>,
}

/// How a route checks signatures.
enum Keys {
    Anonymous,
    One(DecodingKey, Box<Validation>),
    Set(Arc<KeyStore>),
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.keys {
            Keys::Anonymous => "anonymous",
            Keys::One(..) => "one key",
            Keys::Set(_) => "jwks",
        };
        f.debug_struct("Verifier").field("keys", &keys).finish()
    }
}

impl Verifier {
    pub(crate) fn new(route: &RouteConfig, material: &RouteKeys) -> Result<Self, String> {
        let cfg = route.auth.clone();
        let shared_keys = cfg.jwks_url.is_some() || cfg.jwks_file.is_some();
        if !route.anonymous && shared_keys && cfg.audience.is_empty() {
            tracing::warn!(route = %route.path, "tokens come from a key set and auth.audience is not set: a token its issuer signed for another application is accepted");
        }
        let pem = || material.pem.as_deref().ok_or("the key file was not read");
        let one = |key: DecodingKey, alg| Keys::One(key, Box::new(validation(alg, &cfg)));
        let mut fetcher = None;
        let keys = if route.anonymous {
            Keys::Anonymous
        } else if cfg.rs256_public_key_file.is_some() {
            let key = DecodingKey::from_rsa_pem(pem()?)
                .map_err(|e| format!("auth.rs256_public_key_file: not an RSA public key: {e}"))?;
            one(key, Algorithm::RS256)
        } else if cfg.es256_public_key_file.is_some() {
            let key = DecodingKey::from_ec_pem(pem()?)
                .map_err(|e| format!("auth.es256_public_key_file: not a P-256 public key: {e}"))?;
            one(key, Algorithm::ES256)
        } else if cfg.eddsa_public_key_file.is_some() {
            let key = DecodingKey::from_ed_pem(pem()?).map_err(|e| {
                format!("auth.eddsa_public_key_file: not an Ed25519 public key: {e}")
            })?;
            one(key, Algorithm::EdDSA)
        } else if cfg.jwks_file.is_some() {
            let doc = material.jwks.as_deref().ok_or("jwks_file was not read")?;
            let set = KeySet::parse(doc).map_err(|e| format!("auth.jwks_file: {e}"))?;
            Keys::Set(Arc::new(KeyStore::new(set)))
        } else if let Some(url) = &cfg.jwks_url {
            let store = Arc::new(KeyStore::default());
            let f = Fetcher::new(
                url,
                material.jwks_ca.as_deref(),
                Arc::clone(&store),
                cfg.jwks_refresh,
                cfg.jwks_refresh_min,
            )
            .map_err(|e| format!("auth.jwks_url: {e}"))?;
            fetcher = Some(Arc::new(f));
            Keys::Set(store)
        } else if let Some(secret) = &cfg.hs256_secret {
            one(
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )
        } else {
            return Err("no key configured".into());
        };
        Ok(Self { keys, cfg, fetcher })
    }

    /// Whether the route needs no token.
    pub(crate) fn anonymous(&self) -> bool {
        matches!(self.keys, Keys::Anonymous)
    }

    /// A token's claims, if its signature, algorithm, `exp`/`nbf` (and `exp` presence, when
    /// required) check out.
    pub(crate) fn decode(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
        let decode = |key: &DecodingKey, validation: &Validation| {
            jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
                .map(|d| d.claims)
                .map_err(AuthError::InvalidToken)
        };
        match &self.keys {
            Keys::Anonymous => Ok(Map::new()),
            Keys::One(key, validation) => decode(key, validation),
            Keys::Set(store) => {
                let header = jsonwebtoken::decode_header(token).map_err(AuthError::InvalidToken)?;
                let set = store.current();
                match set.select(header.kid.as_deref(), header.alg) {
                    Ok(k) => decode(&k.key, &validation(k.alg, &self.cfg)),
                    Err(Miss::UnknownKid) => Err(AuthError::UnknownKey),
                    Err(Miss::NoKid | Miss::WrongAlg) => Err(AuthError::InvalidToken(
                        jsonwebtoken::errors::ErrorKind::InvalidAlgorithm.into(),
                    )),
                }
            }
        }
    }

    /// Checks a token sent on an open connection (`refresh`) as the upgrade's was checked:
    /// the same user, and the connection's namespace still granted. Returns its claims.
    pub(crate) fn refresh(
        &self,
        route: &RouteConfig,
        token: &str,
        user: &str,
        namespace: &str,
    ) -> Result<Map<String, Value>, AuthError> {
        let claims = self.decode(token)?;
        match claims.get(&self.cfg.user_claim) {
            Some(Value::String(s)) if s == user => {}
            Some(Value::String(s)) if !s.is_empty() => return Err(AuthError::OtherUser),
            _ => return Err(AuthError::MissingUser(self.cfg.user_claim.clone())),
        }
        if !still_grants(&self.cfg, &route.namespace, &claims, namespace) {
            return Err(AuthError::NamespaceNotGranted(namespace.to_owned()));
        }
        Ok(claims)
    }

    /// Verifies the token of a request (unless anonymous) and picks its namespace. `secure`
    /// says whether the listener is TLS (`https`/`wss`), for the same-origin check.
    pub(crate) fn admit(
        &self,
        route: &RouteConfig,
        head: &RequestHead,
        secure: bool,
    ) -> Result<Identity, AuthError> {
        check_host(route, head)?;
        check_origin(route, head, secure)?;
        let (user, claims) = match &self.keys {
            Keys::Anonymous => (
                head.query
                    .get(&route.user_query)
                    .cloned()
                    .unwrap_or_default(),
                Map::new(),
            ),
            Keys::One(..) | Keys::Set(_) => {
                let token = self.token(head).ok_or(AuthError::MissingToken)?;
                let claims = self.decode(token)?;
                let user = match claims.get(&self.cfg.user_claim) {
                    Some(Value::String(s)) if !s.is_empty() => s.clone(),
                    _ => return Err(AuthError::MissingUser(self.cfg.user_claim.clone())),
                };
                (user, claims)
            }
        };
        let namespace = pick_namespace(route, head, &claims)?;
        if namespace.is_empty() || namespace.len() > 256 {
            return Err(AuthError::BadNamespace(namespace));
        }
        if !self.anonymous() && !lists(&self.cfg, &claims, &namespace) {
            return Err(AuthError::NamespaceNotGranted(namespace));
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

/// Whether a refreshed token's `claims` still grant `namespace`: the namespaces claim (when
/// present) lists it or `*`, and a route whose namespace comes from a claim finds the same
/// value there (a token may narrow what it grants, never move the connection).
fn still_grants(
    cfg: &AuthConfig,
    ns_cfg: &NamespaceConfig,
    claims: &Map<String, Value>,
    namespace: &str,
) -> bool {
    let from_claim = match ns_cfg.claim.as_ref() {
        None => true,
        Some(c) => claims.get(c).and_then(Value::as_str) == Some(namespace),
    };
    lists(cfg, claims, namespace) && from_claim
}

/// Whether the token's namespaces claim (`auth.namespaces_claim`) grants `namespace`: it
/// lists it or `*`; a token without the claim may open any namespace.
fn lists(cfg: &AuthConfig, claims: &Map<String, Value>, namespace: &str) -> bool {
    match claims.get(&cfg.namespaces_claim) {
        None => true,
        Some(Value::String(s)) => s == namespace || s == "*",
        Some(Value::Array(list)) => list
            .iter()
            .any(|v| v.as_str().is_some_and(|s| s == namespace || s == "*")),
        Some(_) => false,
    }
}

/// The token's `exp` (Unix seconds), if it has a numeric one.
pub(crate) fn expiry(claims: &Map<String, Value>) -> Option<i64> {
    let exp = claims.get("exp")?;
    exp.as_i64().or_else(|| exp.as_f64().map(|f| f as i64))
}

fn validation(alg: Algorithm, cfg: &AuthConfig) -> Validation {
    let mut v = Validation::new(alg);
    // `exp` is required unless the route opts out; `exp` and `nbf` are checked when present.
    v.required_spec_claims.clear();
    if cfg.require_exp {
        v.required_spec_claims.insert("exp".into());
    }
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = !cfg.audience.is_empty();
    if v.validate_aud {
        v.set_audience(&cfg.audience);
        v.required_spec_claims.insert("aud".into());
    }
    if let Some(issuer) = &cfg.issuer {
        v.set_issuer(&[issuer]);
        v.required_spec_claims.insert("iss".into());
    }
    v.leeway = cfg.leeway.as_secs();
    v
}

/// Where the namespace comes from (`namespace` in the route config): a claim, when the
/// route names one, is the only source (a `?namespace=` that differs is refused, the same
/// value is fine; a token without the claim, or with one that is not a string, is refused);
/// otherwise the query parameter, then the default.
fn pick_namespace(
    route: &RouteConfig,
    head: &RequestHead,
    claims: &Map<String, Value>,
) -> Result<String, AuthError> {
    let ns_cfg = &route.namespace;
    let asked = ns_cfg
        .query
        .as_ref()
        .and_then(|q| head.query.get(q))
        .filter(|v| !v.is_empty());
    let claimed = match ns_cfg.claim.as_ref().map(|c| (c, claims.get(c))) {
        None => None,
        Some((_, Some(Value::String(s)))) if !s.is_empty() => Some(s),
        Some((c, None)) => return Err(AuthError::MissingNamespaceClaim(c.clone())),
        Some((_, Some(other))) => return Err(AuthError::BadNamespaceClaim(other.to_string())),
    };
    Ok(match (claimed, asked) {
        (Some(c), Some(q)) if c != q => return Err(AuthError::NamespaceNotClaimed(q.clone())),
        (Some(c), _) => c.clone(),
        (None, Some(q)) => q.clone(),
        (None, None) => ns_cfg.default.clone(),
    })
}

/// The route's Host allow-list (`allowed_hosts`), against DNS rebinding: a page on a name
/// the attacker controls, resolved to this edge, sends its own name as the Host.
fn check_host(route: &RouteConfig, head: &RequestHead) -> Result<(), AuthError> {
    if route.allowed_hosts.is_empty() {
        return Ok(());
    }
    let host = head.header("host").unwrap_or_default();
    if route
        .allowed_hosts
        .iter()
        .any(|a| a.eq_ignore_ascii_case(host))
    {
        return Ok(());
    }
    Err(AuthError::HostNotAllowed(host.to_owned()))
}

fn check_origin(route: &RouteConfig, head: &RequestHead, secure: bool) -> Result<(), AuthError> {
    let Some(origin) = head.header("origin") else {
        return Ok(());
    };
    let listed = |list: &[String]| {
        list.iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    };
    if listed(&route.allowed_origins) {
        return Ok(());
    }
    if route.allowed_origins.is_empty() {
        // Same origin: the public origins when the route names them (a proxy terminates TLS
        // in front), else this listener's scheme with the Host header.
        let same = if route.public_origins.is_empty() {
            head.header("host")
                .is_some_and(|h| same_origin(origin, h, secure))
        } else {
            listed(&route.public_origins)
        };
        if same {
            return Ok(());
        }
    }
    Err(AuthError::OriginNotAllowed(origin.to_owned()))
}

/// Whether `origin` (`scheme://host[:port]`) is the origin of a request for `host`
/// (`host[:port]`) on a listener that is TLS (`secure`) or not: same scheme, host and port,
/// default ports filled in.
pub(crate) fn same_origin(origin: &str, host: &str, secure: bool) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    let origin_secure = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => false,
        "https" | "wss" => true,
        _ => return false,
    };
    if origin_secure != secure || rest.contains(['/', '@', '?', '#']) {
        return false;
    }
    let default_port = if secure { 443 } else { 80 };
    match (
        split_host_port(rest, default_port),
        split_host_port(host, default_port),
    ) {
        (Some((oh, op)), Some((hh, hp))) => op == hp && oh.eq_ignore_ascii_case(hh),
        _ => false,
    }
}

/// `example.com:8080` → (`example.com`, 8080); `[::1]` → (`[::1]`, default).
fn split_host_port(s: &str, default_port: u16) -> Option<(&str, u16)> {
    let (host, port) = match s.rfind(':') {
        Some(i) if !s[i..].contains(']') => (&s[..i], Some(&s[i + 1..])),
        _ => (s, None),
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        None => default_port,
        Some(p) => p.parse().ok()?,
    };
    Some((host, port))
}

/// Removes what carried the route's credential from a request head once auth has read it:
/// the token query parameter (`auth.query`), the `Authorization` header and the token cookie
/// (`auth.cookie`; the other cookies stay). Nothing after this point (connection params,
/// `ListConnections`, hook bodies, placement events, logs) can hand the token on.
pub(crate) fn strip_credentials(route: &RouteConfig, head: &mut RequestHead) {
    let auth = &route.auth;
    if let Some(q) = &auth.query {
        head.query.remove(q);
    }
    head.headers.remove("authorization");
    let Some(name) = &auth.cookie else {
        return;
    };
    let Some(cookies) = head.headers.remove("cookie") else {
        return;
    };
    let kept: Vec<&str> = cookies
        .split(';')
        .map(str::trim)
        .filter(|kv| !kv.is_empty() && kv.split_once('=').is_none_or(|(k, _)| k.trim() != name))
        .collect();
    if !kept.is_empty() {
        head.headers.insert("cookie".into(), kept.join("; "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(query: &[(&str, &str)], headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: "GET".into(),
            version: 1,
            path: "/connect".into(),
            query: query
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn same_origin_compares_scheme_host_and_port() {
        assert!(same_origin("http://h:8080", "h:8080", false));
        assert!(same_origin("HTTP://H:8080", "h:8080", false));
        assert!(same_origin("http://h", "h:80", false));
        assert!(same_origin("http://h:80", "h", false));
        assert!(same_origin("https://h", "h", true));
        assert!(same_origin("http://[::1]:9", "[::1]:9", false));
        // The scheme of the listener, not of the Origin, decides.
        assert!(!same_origin("https://h:8080", "h:8080", false));
        assert!(!same_origin("http://h:8080", "h:8080", true));
        assert!(!same_origin("http://h:8081", "h:8080", false));
        assert!(!same_origin("http://evil:8080", "h:8080", false));
        assert!(!same_origin("http://h", "h:8080", false));
        assert!(!same_origin("null", "h", false));
        assert!(!same_origin("h:8080", "h:8080", false));
        assert!(!same_origin("http://h:8080/x", "h:8080", false));
        assert!(!same_origin("http://u@h:8080", "h:8080", false));
        assert!(!same_origin("ftp://h", "h", false));
        assert!(!same_origin("http://h:x", "h", false));
    }

    #[test]
    fn hosts_and_public_origins_guard_the_route() {
        let route = RouteConfig {
            allowed_hosts: vec!["ws.example.com".into()],
            public_origins: vec!["https://ws.example.com".into()],
            ..RouteConfig::default()
        };
        let ok = head(
            &[],
            &[
                ("host", "WS.example.com"),
                ("origin", "https://ws.example.com"),
            ],
        );
        assert!(check_host(&route, &ok).is_ok());
        assert!(check_origin(&route, &ok, false).is_ok());
        let rebound = head(&[], &[("host", "evil"), ("origin", "http://evil")]);
        assert_eq!(check_host(&route, &rebound).unwrap_err().reason(), "host");
        let no_host = head(&[], &[]);
        assert!(check_host(&route, &no_host).is_err());
        // Public origins replace the listener's own scheme and Host.
        let plain = head(
            &[],
            &[
                ("host", "ws.example.com"),
                ("origin", "http://ws.example.com"),
            ],
        );
        assert!(check_origin(&route, &plain, false).is_err());
    }

    #[test]
    fn a_claimed_namespace_cannot_be_overridden() {
        let mut route = RouteConfig::default();
        route.namespace.claim = Some("tenant".into());
        let claims: Map<String, Value> =
            serde_json::from_value(serde_json::json!({"tenant": "acme"})).unwrap();
        let pick =
            |q: &[(&str, &str)], c: &Map<String, Value>| pick_namespace(&route, &head(q, &[]), c);
        assert_eq!(pick(&[], &claims).unwrap(), "acme");
        assert_eq!(pick(&[("namespace", "acme")], &claims).unwrap(), "acme");
        let e = pick(&[("namespace", "globex")], &claims).unwrap_err();
        assert_eq!((e.status(), e.reason()), (403, "namespace_not_granted"));
        // Without the claim in the token: refused, whatever the query says.
        let e = pick(&[("namespace", "q")], &Map::new()).unwrap_err();
        assert_eq!((e.status(), e.reason()), (403, "bad_namespace_claim"));
        assert!(pick(&[], &Map::new()).is_err());
        // Routes without a claim: the query, then the default.
        let plain = RouteConfig::default();
        let no_claims = Map::new();
        let q = head(&[("namespace", "q")], &[]);
        assert_eq!(pick_namespace(&plain, &q, &no_claims).unwrap(), "q");
        let bare = head(&[], &[]);
        assert_eq!(
            pick_namespace(&plain, &bare, &no_claims).unwrap(),
            "default"
        );
        // A claim that is there but not a string is refused, not skipped.
        let odd: Map<String, Value> =
            serde_json::from_value(serde_json::json!({"tenant": ["a", "b"]})).unwrap();
        assert_eq!(pick(&[("namespace", "a")], &odd).unwrap_err().status(), 403);
    }

    #[test]
    fn credentials_are_stripped_and_the_rest_kept() {
        let route = RouteConfig::default();
        let mut h = head(
            &[("token", "T"), ("room", "r")],
            &[
                ("authorization", "Bearer T"),
                ("cookie", "theme=dark; ID_TOKEN=T; other=1"),
                ("user-agent", "x"),
            ],
        );
        strip_credentials(&route, &mut h);
        assert_eq!(h.query.len(), 1);
        assert_eq!(h.query["room"], "r");
        assert_eq!(h.header("authorization"), None);
        assert_eq!(h.header("cookie"), Some("theme=dark; other=1"));
        assert_eq!(h.header("user-agent"), Some("x"));
        let mut only = head(&[], &[("cookie", "ID_TOKEN=T")]);
        strip_credentials(&route, &mut only);
        assert_eq!(only.header("cookie"), None);
    }
}

#[cfg(test)]
mod lifecycle_tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn refresh_may_narrow_but_not_move() {
        let cfg = AuthConfig::default();
        let ns = NamespaceConfig::default();
        let c = claims(json!({"namespaces": ["a", "b"]}));
        assert!(still_grants(&cfg, &ns, &c, "a"));
        assert!(still_grants(
            &cfg,
            &ns,
            &claims(json!({"namespaces": "a"})),
            "a"
        ));
        assert!(!still_grants(
            &cfg,
            &ns,
            &claims(json!({"namespaces": ["b"]})),
            "a"
        ));
        assert!(still_grants(
            &cfg,
            &ns,
            &claims(json!({"namespaces": "*"})),
            "a"
        ));
        assert!(still_grants(&cfg, &ns, &claims(json!({})), "a"));
        assert!(!still_grants(
            &cfg,
            &ns,
            &claims(json!({"namespaces": 1})),
            "a"
        ));
        let tenant = NamespaceConfig {
            claim: Some("tenant".into()),
            ..NamespaceConfig::default()
        };
        assert!(still_grants(
            &cfg,
            &tenant,
            &claims(json!({"tenant": "acme"})),
            "acme"
        ));
        assert!(!still_grants(
            &cfg,
            &tenant,
            &claims(json!({"tenant": "globex"})),
            "acme"
        ));
    }

    #[test]
    fn exp_is_required_unless_opted_out() {
        let secret = "s";
        let route = |require_exp| RouteConfig {
            auth: AuthConfig {
                hs256_secret: Some(secret.into()),
                require_exp,
                ..AuthConfig::default()
            },
            ..RouteConfig::default()
        };
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": "alice"}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        let strict = Verifier::new(&route(true), &RouteKeys::default()).unwrap();
        assert!(matches!(
            strict.decode(&token),
            Err(AuthError::InvalidToken(_))
        ));
        let lax = Verifier::new(&route(false), &RouteKeys::default()).unwrap();
        assert_eq!(lax.decode(&token).unwrap()["sub"], "alice");
        assert_eq!(expiry(&claims(json!({"exp": 12}))), Some(12));
        assert_eq!(expiry(&claims(json!({"exp": "12"}))), None);
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let secret = "s";
        let route = RouteConfig {
            auth: AuthConfig {
                hs256_secret: Some(secret.into()),
                audience: vec!["chat".into()],
                issuer: Some("https://idp".into()),
                ..AuthConfig::default()
            },
            ..RouteConfig::default()
        };
        let v = Verifier::new(&route, &RouteKeys::default()).unwrap();
        let exp = 4_000_000_000u64;
        let sign = |c: Value| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &c,
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        };
        let ok = sign(json!({"sub": "a", "exp": exp, "aud": "chat", "iss": "https://idp"}));
        assert!(v.decode(&ok).is_ok());
        for bad in [
            json!({"sub": "a", "exp": exp, "aud": "billing", "iss": "https://idp"}),
            json!({"sub": "a", "exp": exp, "iss": "https://idp"}),
            json!({"sub": "a", "exp": exp, "aud": "chat", "iss": "https://other"}),
            json!({"sub": "a", "exp": exp, "aud": "chat"}),
        ] {
            assert!(v.decode(&sign(bad.clone())).is_err(), "{bad}");
        }
    }
}
