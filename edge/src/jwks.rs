//! JSON Web Key Sets: parsing, key selection by `kid`, and the fetcher of `auth.jwks_url`.
//!
//! A set is parsed once into [`KeySet`] (asymmetric keys only: a secret published in a key
//! set would be no secret). A token picks its key by `kid`; without `kid` it may use the
//! only key of a one-key set. The key's algorithm (its `alg`, or the one its type implies)
//! must be the token's: a token cannot choose how it is checked.
//!
//! The fetcher is the one piece of the edge that reads something at runtime: it fetches
//! the URL at start and every `jwks_refresh`, and again when a token names an unknown `kid`,
//! at most once per `jwks_refresh_min`. A failed fetch keeps the last good set; failures
//! are logged with the host and the error, never the URL's path or query.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The largest key set accepted, in bytes.
const MAX_BODY: usize = 1024 * 1024;
/// The bound on one fetch: connect, TLS, request and body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong with a key set or its URL.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JwksError {
    #[error("not a JWKS document: {0}")]
    Parse(#[source] serde_json::Error),
    #[error("the key set has no usable key")]
    NoKeys,
    #[error("{0}")]
    Url(&'static str),
    #[error("no CA certificate in jwks_ca_file")]
    NoCa,
    #[error("fetch failed: {0}")]
    Fetch(String),
    #[error("fetch answered HTTP {0}")]
    Status(u16),
    #[error("fetch took longer than {0:?}")]
    Timeout(Duration),
}

/// One usable key.
#[derive(Clone)]
pub(crate) struct SetKey {
    pub(crate) kid: Option<String>,
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
}

impl std::fmt::Debug for SetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// A parsed key set.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeySet {
    pub(crate) keys: Vec<SetKey>,
}

/// Why no key of the set verifies a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Miss {
    /// The set has no key with the token's `kid`: a refetch may find it.
    UnknownKid,
    /// The token has no `kid` and the set has more than one key.
    NoKid,
    /// The key's algorithm is not the token's.
    WrongAlg,
}

impl KeySet {
    /// Parses a JWKS document; keys that cannot verify signatures are skipped.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, JwksError> {
        let set: JwkSet = serde_json::from_slice(bytes).map_err(JwksError::Parse)?;
        let keys: Vec<SetKey> = set.keys.iter().filter_map(usable).collect();
        if keys.is_empty() {
            return Err(JwksError::NoKeys);
        }
        Ok(Self { keys })
    }

    /// The key for a token with header `kid` and `alg`.
    pub(crate) fn select(&self, kid: Option<&str>, alg: Algorithm) -> Result<&SetKey, Miss> {
        let key = match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or(Miss::UnknownKid)?,
            None if self.keys.len() == 1 => &self.keys[0],
            None => return Err(Miss::NoKid),
        };
        if key.alg != alg {
            return Err(Miss::WrongAlg);
        }
        Ok(key)
    }
}

/// A key as [`SetKey`], if it is an asymmetric signing key jsonwebtoken can use.
fn usable(jwk: &Jwk) -> Option<SetKey> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    let alg = match jwk.common.key_algorithm {
        Some(a) => Algorithm::try_from(a).ok()?,
        None => implied,
    };
    // The declared algorithm must belong to the key's type (no RSA key used as HMAC).
    let family_ok = matches!(
        (&jwk.algorithm, alg),
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ) | (
            AlgorithmParameters::EllipticCurve(_),
            Algorithm::ES256 | Algorithm::ES384
        ) | (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA)
    );
    if !family_ok {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(SetKey {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}

/// The current set of a JWKS route, replaced whole by each good fetch.
#[derive(Debug, Default)]
pub(crate) struct KeyStore(RwLock<Arc<KeySet>>);

impl KeyStore {
    pub(crate) fn new(set: KeySet) -> Self {
        Self(RwLock::new(Arc::new(set)))
    }

    pub(crate) fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn replace(&self, set: KeySet) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
    }
}

/// A JWKS URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JwksUrl {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) path: String,
}

impl JwksUrl {
    /// The `Host` header: the host (bracketed if IPv6), and the port unless the default.
    pub(crate) fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Checks `auth.jwks_url`: `https://host[:port]/path`, or `http://` to a loopback host (a
/// sidecar on the same machine: nothing crosses a network).
pub(crate) fn check_url(url: &str) -> Result<(), JwksError> {
    parse_url(url).map(drop)
}

pub(crate) fn parse_url(url: &str) -> Result<JwksUrl, JwksError> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(JwksError::Url("must start with https://"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(JwksError::Url("credentials in the URL are not supported"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or(JwksError::Url("bad IPv6 host"))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(JwksError::Url("has no host"));
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| JwksError::Url("bad port"))?,
        None if tls => 443,
        None => 80,
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !tls && !loopback {
        return Err(JwksError::Url(
            "must start with https:// (http:// only to a loopback host)",
        ));
    }
    Ok(JwksUrl {
        tls,
        host: host.to_owned(),
        port,
        path: path.to_owned(),
    })
}

/// Fetches a route's `jwks_url` into its [`KeyStore`].
pub(crate) struct Fetcher {
    url: JwksUrl,
    tls: Option<tokio_rustls::TlsConnector>,
    store: Arc<KeyStore>,
    refresh: Duration,
    min_interval: Duration,
    /// When the last fetch started; the lock also makes refetches single-flight.
    last: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("host", &self.url.host)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// `ca_pem`: the CAs of `jwks_ca_file`; none: the system's roots.
    pub(crate) fn new(
        url: &str,
        ca_pem: Option<&[u8]>,
        store: Arc<KeyStore>,
        refresh: Duration,
        min_interval: Duration,
    ) -> Result<Self, JwksError> {
        let url = parse_url(url)?;
        let tls = if url.tls {
            Some(connector(ca_pem)?)
        } else {
            None
        };
        Ok(Self {
            url,
            tls,
            store,
            refresh,
            min_interval,
            last: tokio::sync::Mutex::new(None),
        })
    }

    /// Fetches again because a token named an unknown `kid`, unless a fetch started less
    /// than `jwks_refresh_min` ago (a fetch under way is waited for); true when a new set is
    /// in place.
    pub(crate) async fn refetch_for_unknown_kid(&self) -> bool {
        let mut last = self.last.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.min_interval) {
            return false;
        }
        *last = Some(Instant::now());
        self.fetch_and_store("unknown kid").await
    }

    /// Fetches at start and every `jwks_refresh` until `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            {
                let mut last = self.last.lock().await;
                *last = Some(Instant::now());
                self.fetch_and_store("periodic").await;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.refresh) => {}
            }
        }
    }

    async fn fetch_and_store(&self, why: &'static str) -> bool {
        let host = &self.url.host;
        match self.fetch().await {
            Ok(set) => {
                tracing::info!(%host, keys = set.keys.len(), why, "jwks fetched");
                self.store.replace(set);
                true
            }
            Err(error) => {
                tracing::warn!(%host, %error, why, "jwks fetch failed; keeping the last good set");
                false
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, JwksError> {
        let body = tokio::time::timeout(FETCH_TIMEOUT, self.get())
            .await
            .map_err(|_| JwksError::Timeout(FETCH_TIMEOUT))??;
        KeySet::parse(&body)
    }

    async fn get(&self) -> Result<Bytes, JwksError> {
        let fetch = |e: &dyn std::fmt::Display| JwksError::Fetch(e.to_string());
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|e| fetch(&e))?;
        match &self.tls {
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from(self.url.host.clone())
                    .map_err(|e| fetch(&e))?;
                let stream = tls.connect(name, tcp).await.map_err(|e| fetch(&e))?;
                self.exchange(stream).await
            }
            None => self.exchange(tcp).await,
        }
    }

    async fn exchange<S>(&self, io: S) -> Result<Bytes, JwksError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let fetch = |e: &dyn std::fmt::Display| JwksError::Fetch(e.to_string());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| fetch(&e))?;
        // hyper's connection future drives the socket while we read the response; it ends
        // with this fetch (aborted on drop).
        let driver = AbortOnDrop(tokio::spawn(conn));
        let host = self.url.host_header();
        let req = hyper::Request::get(self.url.path.as_str())
            .header(hyper::header::HOST, host)
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, "switchboard-edge")
            .body(Empty::<Bytes>::new())
            .map_err(|e| fetch(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| fetch(&e))?;
        if !resp.status().is_success() {
            return Err(JwksError::Status(resp.status().as_u16()));
        }
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| fetch(&*e))?
            .to_bytes();
        drop(driver);
        Ok(body)
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A TLS connector trusting `ca_pem`, or the system's roots.
fn connector(ca_pem: Option<&[u8]>) -> Result<tokio_rustls::TlsConnector, JwksError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem).flatten() {
                roots.add(cert).map_err(|_| JwksError::NoCa)?;
            }
            if roots.is_empty() {
                return Err(JwksError::NoCa);
            }
        }
        None => {
            // The system's trust store, read once when the route is built.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| JwksError::Fetch(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ES_PRIV: &[u8] = include_bytes!("../../tests/fixtures/es256_private.pem");
    const ED_PRIV: &[u8] = include_bytes!("../../tests/fixtures/ed25519_private.pem");

    fn jwk(pem: &[u8], alg: Algorithm, kid: Option<&str>, declare_alg: bool) -> Value {
        let key = match alg {
            Algorithm::EdDSA => jsonwebtoken::EncodingKey::from_ed_pem(pem).unwrap(),
            _ => jsonwebtoken::EncodingKey::from_ec_pem(pem).unwrap(),
        };
        let mut j = serde_json::to_value(Jwk::from_encoding_key(&key, alg).unwrap()).unwrap();
        if let Some(kid) = kid {
            j["kid"] = Value::from(kid);
        }
        if !declare_alg {
            j.as_object_mut().unwrap().remove("alg");
        }
        j
    }

    use serde_json::{Value, json};

    #[test]
    fn parses_and_selects_by_kid() {
        let doc = json!({"keys": [
            jwk(ES_PRIV, Algorithm::ES256, Some("ec"), true),
            jwk(ED_PRIV, Algorithm::EdDSA, Some("ed"), false),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc", "x": "AA", "y": "AA"},
        ]});
        let set = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(
            set.keys.len(),
            2,
            "symmetric and encryption keys are skipped"
        );
        assert_eq!(
            set.select(Some("ec"), Algorithm::ES256).unwrap().alg,
            Algorithm::ES256
        );
        // No `alg` on the key: its type implies EdDSA.
        assert_eq!(
            set.select(Some("ed"), Algorithm::EdDSA).unwrap().alg,
            Algorithm::EdDSA
        );
        assert_eq!(
            set.select(Some("ec"), Algorithm::HS256).unwrap_err(),
            Miss::WrongAlg
        );
        assert_eq!(
            set.select(Some("hmac"), Algorithm::HS256).unwrap_err(),
            Miss::UnknownKid
        );
        assert_eq!(
            set.select(Some("new"), Algorithm::ES256).unwrap_err(),
            Miss::UnknownKid
        );
        assert_eq!(set.select(None, Algorithm::ES256).unwrap_err(), Miss::NoKid);
        let one = json!({"keys": [jwk(ES_PRIV, Algorithm::ES256, None, true)]});
        let one = KeySet::parse(one.to_string().as_bytes()).unwrap();
        assert!(
            one.select(None, Algorithm::ES256).is_ok(),
            "a one-key set needs no kid"
        );
    }

    #[test]
    fn refuses_documents_without_usable_keys() {
        assert!(matches!(KeySet::parse(b"nope"), Err(JwksError::Parse(_))));
        assert!(matches!(
            KeySet::parse(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#),
            Err(JwksError::NoKeys)
        ));
        // An RSA-typed key that declares HS256 is not used as a secret.
        let rsa_as_hmac =
            json!({"keys": [{"kty": "RSA", "alg": "HS256", "n": "AQAB", "e": "AQAB"}]});
        assert!(matches!(
            KeySet::parse(rsa_as_hmac.to_string().as_bytes()),
            Err(JwksError::NoKeys)
        ));
    }

    #[test]
    fn urls_are_https_or_loopback_http() {
        let u = parse_url("https://idp.example.com/.well-known/jwks.json").unwrap();
        assert_eq!(
            (u.tls, u.port, u.path.as_str()),
            (true, 443, "/.well-known/jwks.json")
        );
        let u = parse_url("http://127.0.0.1:8081").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (false, "127.0.0.1", 8081, "/")
        );
        let u = parse_url("http://[::1]:9/k").unwrap();
        assert_eq!(
            (u.host.as_str(), u.host_header()),
            ("::1", "[::1]:9".to_owned())
        );
        assert_eq!(parse_url("https://idp:443/k").unwrap().host_header(), "idp");
        assert!(parse_url("http://idp.example.com/k").is_err());
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("https://user:pw@idp/k").is_err());
        assert!(parse_url("https://idp:notaport/k").is_err());
    }
}
