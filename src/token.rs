//! `switchboard token` mints a test token (HS256, RS256, ES256 or EdDSA, with any claims) and
//! `switchboard api-key` a fresh gRPC API key, so that trying an authenticated route or the
//! gRPC API needs no other tool; [`for_route`] is what the dev banner offers for a route.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use edge::config::RouteConfig;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::TryRngCore as _;
use serde_json::{Map, Value, json};

/// Prefix of the keys `api-key` makes: a key found in a log or a paste is recognisable.
pub const API_KEY_PREFIX: &str = "sb_";
/// Random bytes in an API key.
const API_KEY_BYTES: usize = 32;

/// `switchboard token`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The user.
    #[arg(long)]
    pub sub: String,
    /// The claim that names the user.
    #[arg(long, default_value = "sub")]
    pub user_claim: String,
    /// A namespace the token may open (repeat; none = any namespace).
    #[arg(long = "namespace")]
    pub namespaces: Vec<String>,
    /// Lifetime, e.g. 1h.
    #[arg(long, default_value = "1h", value_parser = humantime_serde::re::humantime::parse_duration)]
    pub ttl: Duration,
    /// No `exp` claim: a token that never expires (refused unless the route sets
    /// `require_exp: false`).
    #[arg(long, conflicts_with = "ttl")]
    pub no_exp: bool,
    /// A claim, K=V: V is taken as JSON if it parses (`n=1`, `admin=true`, `roles=["a"]`),
    /// else as a string. Repeat for more; wins over the claims above.
    #[arg(long = "claim", value_name = "K=V", value_parser = parse_claim)]
    pub claims: Vec<(String, Value)>,
    /// The token's id (`jti`), e.g. to revoke it.
    #[arg(long)]
    pub jti: Option<String>,
    /// The key id (`kid` header), to pick a key from a JWKS.
    #[arg(long)]
    pub kid: Option<String>,
    /// The signature algorithm.
    #[arg(long, value_enum, default_value = "HS256", ignore_case = true)]
    pub alg: Alg,
    /// PEM private key for RS256 (PKCS#1 or PKCS#8), ES256 (PKCS#8, P-256) and EdDSA
    /// (PKCS#8, Ed25519).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The HS256 secret.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
}

/// The algorithms `token` signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Alg {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
    #[value(name = "EdDSA")]
    EdDsa,
}

impl std::fmt::Display for Alg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Hs256 => "HS256",
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
        })
    }
}

/// What goes into the token, and what signs it.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// The user claim's name and value, e.g. `sub` = `alice`.
    pub user_claim: String,
    pub user: String,
    /// Namespaces the token may open; empty = no `namespaces` claim (any namespace).
    pub namespaces: Vec<String>,
    /// Lifetime; `None` = no `exp` claim.
    pub ttl: Option<Duration>,
    /// More claims, set last.
    pub claims: Vec<(String, Value)>,
    pub jti: Option<String>,
    pub kid: Option<String>,
    pub key: SigningKey,
}

/// The key that signs, already read.
#[derive(Clone)]
pub enum SigningKey {
    Hs256(String),
    /// The algorithm and the PEM private key.
    Pem(Alg, Vec<u8>),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hs256(_) => f.write_str("Hs256(..)"),
            Self::Pem(alg, _) => write!(f, "Pem({alg:?}, ..)"),
        }
    }
}

/// Why no token was made. Never shows the secret or the key.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("HS256 needs --secret or SWITCHBOARD_JWT_SECRET")]
    MissingSecret,
    #[error("{0} needs --key FILE (a PEM private key)")]
    MissingKey(Alg),
    #[error("--key is for RS256, ES256 and EdDSA; HS256 takes --secret")]
    KeyWithHs256,
    #[error("cannot read --key {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--key is not a PEM private key for {alg}: {source}")]
    BadKey {
        alg: Alg,
        source: jsonwebtoken::errors::Error,
    },
    #[error("cannot sign: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// Mints the token `args` describe and prints it; errors go to stderr.
pub fn print_token(args: &TokenArgs) -> ExitCode {
    match TokenSpec::from_args(args).and_then(|spec| mint(&spec)) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchboard: cannot mint the token: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a fresh API key for `coordinator.api.keys`.
pub fn print_api_key() -> ExitCode {
    match api_key() {
        Ok(key) => {
            println!("{key}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchboard: no randomness from the operating system: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `sb_` and 32 bytes from the operating system's generator, URL-safe base64 without
/// padding (43 characters): fits a header, an environment variable and a YAML string as is.
pub fn api_key() -> Result<String, rand::rand_core::OsError> {
    let mut bytes = [0u8; API_KEY_BYTES];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes)?;
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    Ok(format!("{API_KEY_PREFIX}{encoded}"))
}

impl TokenSpec {
    /// The spec of the command line: reads the key file.
    pub fn from_args(args: &TokenArgs) -> Result<Self, TokenError> {
        let key = match (args.alg, &args.key) {
            (Alg::Hs256, Some(_)) => return Err(TokenError::KeyWithHs256),
            (Alg::Hs256, None) => match &args.secret {
                Some(s) if !s.is_empty() => SigningKey::Hs256(s.clone()),
                _ => return Err(TokenError::MissingSecret),
            },
            (alg, None) => return Err(TokenError::MissingKey(alg)),
            (alg, Some(path)) => {
                let pem = std::fs::read(path).map_err(|source| TokenError::ReadKey {
                    path: path.clone(),
                    source,
                })?;
                SigningKey::Pem(alg, pem)
            }
        };
        Ok(Self {
            user_claim: args.user_claim.clone(),
            user: args.sub.clone(),
            namespaces: args.namespaces.clone(),
            ttl: (!args.no_exp).then_some(args.ttl),
            claims: args.claims.clone(),
            jti: args.jti.clone(),
            kid: args.kid.clone(),
            key,
        })
    }
}

/// The signed token.
pub fn mint(spec: &TokenSpec) -> Result<String, TokenError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = Map::new();
    claims.insert(spec.user_claim.clone(), Value::String(spec.user.clone()));
    claims.insert("iat".into(), json!(now));
    if let Some(ttl) = spec.ttl {
        claims.insert("exp".into(), json!(now + ttl.as_secs()));
    }
    if !spec.namespaces.is_empty() {
        claims.insert("namespaces".into(), json!(spec.namespaces));
    }
    if let Some(jti) = &spec.jti {
        claims.insert("jti".into(), json!(jti));
    }
    for (k, v) in &spec.claims {
        claims.insert(k.clone(), v.clone());
    }
    let (alg, key) = match &spec.key {
        SigningKey::Hs256(secret) => (
            Algorithm::HS256,
            EncodingKey::from_secret(secret.as_bytes()),
        ),
        SigningKey::Pem(alg, pem) => {
            let key = match alg {
                Alg::Rs256 | Alg::Hs256 => EncodingKey::from_rsa_pem(pem),
                Alg::Es256 => EncodingKey::from_ec_pem(pem),
                Alg::EdDsa => EncodingKey::from_ed_pem(pem),
            }
            .map_err(|source| TokenError::BadKey { alg: *alg, source })?;
            let alg = match alg {
                Alg::Rs256 | Alg::Hs256 => Algorithm::RS256,
                Alg::Es256 => Algorithm::ES256,
                Alg::EdDsa => Algorithm::EdDSA,
            };
            (alg, key)
        }
    };
    let mut header = Header::new(alg);
    header.kid.clone_from(&spec.kid);
    jsonwebtoken::encode(&header, &claims, &key).map_err(TokenError::Sign)
}

/// A token a route accepts, as the dev banner offers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteToken {
    /// The route is anonymous: no token.
    None,
    /// Minted now with the route's HS256 secret, which this process holds.
    Minted(String),
    /// The process holds only a public key: the `switchboard token` command that mints one
    /// with the private key (which only its owner has; `PRIVATE_KEY.pem` stands for it).
    Command(String),
}

/// A token for `user` that `route` accepts for `ttl`: the user claim, `exp`, and the `aud`,
/// `iss` and namespace claims the route requires (the namespace: the route's default).
pub fn for_route(route: &RouteConfig, user: &str, ttl: Duration) -> Result<RouteToken, TokenError> {
    if route.anonymous {
        return Ok(RouteToken::None);
    }
    let a = &route.auth;
    let mut claims = Vec::new();
    if let Some(aud) = a.audience.first() {
        claims.push(("aud".to_owned(), json!(aud)));
    }
    if let Some(iss) = &a.issuer {
        claims.push(("iss".to_owned(), json!(iss)));
    }
    if let Some(claim) = &route.namespace.claim {
        claims.push((claim.clone(), json!(route.namespace.default)));
    }
    if let Some(secret) = &a.hs256_secret {
        let spec = TokenSpec {
            user_claim: a.user_claim.clone(),
            user: user.to_owned(),
            namespaces: Vec::new(),
            ttl: Some(ttl),
            claims,
            jti: None,
            kid: None,
            key: SigningKey::Hs256(secret.clone()),
        };
        return mint(&spec).map(RouteToken::Minted);
    }
    let alg = if a.rs256_public_key_file.is_some() {
        "RS256"
    } else if a.es256_public_key_file.is_some() {
        "ES256"
    } else if a.eddsa_public_key_file.is_some() {
        "EdDSA"
    } else {
        // A key set: the token names its key.
        "ALG --kid KID"
    };
    let mut cmd = format!(
        "switchboard token --alg {alg} --key PRIVATE_KEY.pem --sub {}",
        shell_word(user)
    );
    if a.user_claim != "sub" {
        cmd.push_str(&format!(" --user-claim {}", shell_word(&a.user_claim)));
    }
    if ttl != Duration::from_secs(3600) {
        cmd.push_str(&format!(" --ttl {}s", ttl.as_secs()));
    }
    for (k, v) in &claims {
        let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        cmd.push_str(&format!(" --claim {}", shell_word(&format!("{k}={v}"))));
    }
    Ok(RouteToken::Command(cmd))
}

/// `s` as one shell word: as is when it is plain, else single-quoted.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `K=V`: V as JSON if it parses, else as a string.
fn parse_claim(s: &str) -> Result<(String, Value), String> {
    let Some((k, v)) = s.split_once('=') else {
        return Err("expected K=V".into());
    };
    if k.is_empty() {
        return Err("the claim's name is empty".into());
    }
    let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
    Ok((k.to_owned(), value))
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{DecodingKey, Validation};
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};

    use super::*;

    const RS256_PRIVATE: &str = include_str!("../tests/fixtures/rs256_private.pem");
    const RS256_PUBLIC: &str = include_str!("../tests/fixtures/rs256_public.pem");

    fn spec(key: SigningKey) -> TokenSpec {
        TokenSpec {
            user_claim: "sub".into(),
            user: "alice".into(),
            namespaces: vec!["acme".into()],
            ttl: Some(Duration::from_secs(60)),
            claims: vec![("tenant".into(), json!("acme")), ("level".into(), json!(3))],
            jti: Some("t-1".into()),
            kid: Some("k1".into()),
            key,
        }
    }

    /// The claims of `token`, verified with `key` for `alg`, and its header's `kid`.
    fn decode(token: &str, alg: Algorithm, key: &DecodingKey) -> (Map<String, Value>, String) {
        let mut v = Validation::new(alg);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &v).unwrap();
        (data.claims, data.header.kid.unwrap_or_default())
    }

    fn check(claims: &Map<String, Value>, kid: &str) {
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["namespaces"], json!(["acme"]));
        assert_eq!(
            (&claims["tenant"], &claims["level"]),
            (&json!("acme"), &json!(3))
        );
        assert_eq!(claims["jti"], "t-1");
        let (iat, exp) = (
            claims["iat"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
        );
        assert_eq!(exp - iat, 60);
        assert_eq!(kid, "k1");
    }

    #[test]
    fn every_algorithm_mints_what_its_public_key_verifies() {
        let token = mint(&spec(SigningKey::Hs256("s3cret".into()))).unwrap();
        let (claims, kid) = decode(
            &token,
            Algorithm::HS256,
            &DecodingKey::from_secret(b"s3cret"),
        );
        check(&claims, &kid);

        let token = mint(&spec(SigningKey::Pem(Alg::Rs256, RS256_PRIVATE.into()))).unwrap();
        let public = DecodingKey::from_rsa_pem(RS256_PUBLIC.as_bytes()).unwrap();
        let (claims, kid) = decode(&token, Algorithm::RS256, &public);
        check(&claims, &kid);

        let ec = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let token = mint(&spec(SigningKey::Pem(
            Alg::Es256,
            ec.serialize_pem().into(),
        )))
        .unwrap();
        let public = DecodingKey::from_ec_pem(ec.public_key_pem().as_bytes()).unwrap();
        let (claims, kid) = decode(&token, Algorithm::ES256, &public);
        check(&claims, &kid);

        let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let token = mint(&spec(SigningKey::Pem(
            Alg::EdDsa,
            ed.serialize_pem().into(),
        )))
        .unwrap();
        let public = DecodingKey::from_ed_pem(ed.public_key_pem().as_bytes()).unwrap();
        let (claims, kid) = decode(&token, Algorithm::EdDSA, &public);
        check(&claims, &kid);

        // The wrong kind of key is named, not signed with.
        let e = mint(&spec(SigningKey::Pem(Alg::Es256, RS256_PRIVATE.into()))).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--key is not a PEM private key for ES256"),
            "{e}"
        );
    }

    #[test]
    fn the_command_line_parses_claims_and_refuses_what_cannot_sign() {
        use clap::Parser as _;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            token: TokenArgs,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["token"].iter().chain(args))
                .map(|c| TokenSpec::from_args(&c.token))
        };
        let spec = parse(&[
            "--sub",
            "bob",
            "--secret",
            "x",
            "--no-exp",
            "--jti",
            "j9",
            "--claim",
            "n=1",
            "--claim",
            "admin=true",
            "--claim",
            "roles=[\"a\",\"b\"]",
            "--claim",
            "name=Bob Smith",
            "--claim",
            "eq=a=b",
            "--claim",
            "empty=",
        ])
        .unwrap()
        .unwrap();
        let token = mint(&spec).unwrap();
        let (claims, _) = decode(&token, Algorithm::HS256, &DecodingKey::from_secret(b"x"));
        assert_eq!(claims["sub"], "bob");
        assert!(!claims.contains_key("exp"), "--no-exp: {claims:?}");
        assert_eq!(claims["jti"], "j9");
        assert_eq!(claims["n"], json!(1));
        assert_eq!(claims["admin"], json!(true));
        assert_eq!(claims["roles"], json!(["a", "b"]));
        assert_eq!(claims["name"], json!("Bob Smith"));
        assert_eq!(claims["eq"], json!("a=b"));
        assert_eq!(claims["empty"], json!(""));

        let spec = parse(&["--sub", "b", "--alg", "es256", "--secret", "x"]).unwrap();
        assert!(
            matches!(spec, Err(TokenError::MissingKey(Alg::Es256))),
            "{spec:?}"
        );
        let spec = parse(&["--sub", "b", "--key", "/k.pem", "--secret", "x"]).unwrap();
        assert!(matches!(spec, Err(TokenError::KeyWithHs256)), "{spec:?}");
        let spec = parse(&["--sub", "b", "--alg", "EdDSA", "--key", "/nonexistent.pem"]).unwrap();
        assert!(matches!(spec, Err(TokenError::ReadKey { .. })), "{spec:?}");
        assert!(parse(&["--sub", "b", "--claim", "novalue"]).is_err());
        assert!(parse(&["--sub", "b", "--claim", "=1"]).is_err());
        assert!(parse(&["--sub", "b", "--no-exp", "--ttl", "5m"]).is_err());
    }

    #[test]
    fn a_route_gets_the_token_it_accepts_or_the_command_that_mints_one() {
        let mut route = RouteConfig::default();
        route.auth.hs256_secret = Some("s3cret".into());
        route.auth.user_claim = "preferred_username".into();
        route.auth.audience = vec!["chat".into()];
        route.auth.issuer = Some("https://idp".into());
        route.namespace.claim = Some("tenant".into());
        route.namespace.default = "acme".into();
        let Ok(RouteToken::Minted(token)) = for_route(&route, "alice", Duration::from_secs(60))
        else {
            panic!("an HS256 route gets a minted token");
        };
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&["chat"]);
        v.set_issuer(&["https://idp"]);
        let claims = jsonwebtoken::decode::<Map<String, Value>>(
            &token,
            &DecodingKey::from_secret(b"s3cret"),
            &v,
        )
        .unwrap()
        .claims;
        assert_eq!(claims["preferred_username"], "alice");
        assert_eq!(claims["tenant"], "acme");
        let (iat, exp) = (
            claims["iat"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
        );
        assert_eq!(exp - iat, 60);

        // Only a public key here: the command, with every claim the route checks.
        route.auth.hs256_secret = None;
        route.auth.es256_public_key_file = Some("/k.pem".into());
        route.auth.audience = vec!["my app".into()];
        assert_eq!(
            for_route(&route, "alice", Duration::from_secs(3600)).unwrap(),
            RouteToken::Command(
                "switchboard token --alg ES256 --key PRIVATE_KEY.pem --sub alice \
                 --user-claim preferred_username --claim 'aud=my app' \
                 --claim iss=https://idp --claim tenant=acme"
                    .into()
            )
        );
        route.anonymous = true;
        assert_eq!(
            for_route(&route, "alice", Duration::from_secs(1)).unwrap(),
            RouteToken::None
        );
    }

    #[test]
    fn api_keys_are_prefixed_random_and_url_safe() {
        let (a, b) = (api_key().unwrap(), api_key().unwrap());
        assert_ne!(a, b);
        let body = a.strip_prefix(API_KEY_PREFIX).unwrap();
        assert_eq!(body.len(), 43, "{a}");
        assert!(
            body.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{a}"
        );
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .unwrap();
        assert_eq!(bytes.len(), API_KEY_BYTES);
    }
}
