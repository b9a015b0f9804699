//! The edge's configuration: listener, limits and routes. Read from the `edge:` block of the
//! YAML file by the binary; this crate never reads files or the environment.

use std::net::SocketAddr;
use std::time::Duration;

use std::collections::BTreeMap;

use edge_core::Dialect;
use proto::frame::Key;
use serde::{Deserialize, Serialize};

/// Everything an edge needs to know.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// WebSocket and HTTP listener. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Connections held at once; more are refused with HTTP 503. Default 100 000.
    pub max_connections: usize,
    /// Time to read an HTTP request head before the socket is dropped. Default 10 s.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// On shutdown, clients are closed (1001) spread over this window. Default 10 s.
    #[serde(with = "duration")]
    pub drain_window: Duration,
    /// How long a hook request (upgrade, onconnect, onmessage, monument data-style) may take.
    /// Default 5 s.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// The WebSocket routes. Default: one `/connect` route that requires a JWT.
    pub routes: Vec<RouteConfig>,
    /// The address operators see for this edge in `ListNodes`; default: `listen` as bound
    /// (in Kubernetes: the pod IP and port).
    pub advertise: Option<String>,
    /// Cluster mode: coordinator gRPC addresses (`host:port` or `http://host:port`) for first
    /// contact; the rest of the ring is learned from their announcements on the bus.
    pub coordinators: Vec<String>,
    /// Cluster mode: a coordinator not heard from for this long leaves this edge's ring.
    /// Default 3 s.
    #[serde(with = "duration")]
    pub member_timeout: Duration,
    /// The key-value bucket of revoked tokens this edge watches (`Admin.Revoke` writes it).
    /// Default `sb_revoked`.
    pub revocation_bucket: String,
    /// TLS on the listener (`wss://`, and HTTPS for `/healthz`, `/readyz`, `/metrics`).
    /// Default: none (plain `ws://`).
    pub tls: Option<TlsFiles>,
}

pub use bus::tls::TlsFiles;

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 100_000,
            handshake_timeout: Duration::from_secs(10),
            drain_window: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            routes: vec![RouteConfig::default()],
            advertise: None,
            coordinators: Vec::new(),
            member_timeout: Duration::from_secs(3),
            tls: None,
            revocation_bucket: proto::revoke::BUCKET.into(),
        }
    }
}

/// One WebSocket path and how its clients are treated.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// The path, e.g. `/connect`; a `{name}` segment captures a path parameter.
    pub path: String,
    /// `native`, `monument`, `hyperexpress`, `monorail` or `bodhi` (docs/PROTOCOL.md §9
    /// Dialects): field names and built-in verbs. Default `native`.
    pub dialect: Dialect,
    /// The routing field of client frames (`type`, `event`, `handler`); default: the
    /// dialect's.
    pub key: Option<Key>,
    /// monument routes: `false` (no WebSocket here: 404), `true` (data and passthrough),
    /// `data`, `passthrough`; any other value means `true`. Default `false`.
    pub monument: MonumentMode,
    /// Resource types clients may query, get and watch: a key-value bucket or a topic.
    pub resources: BTreeMap<String, ResourceConfig>,
    /// No token needed; the user comes from the `user_query` parameter (or is empty).
    pub anonymous: bool,
    /// On anonymous routes, the query parameter naming the user. Default `user`.
    pub user_query: String,
    pub namespace: NamespaceConfig,
    pub auth: AuthConfig,
    /// Origins allowed to open a socket (`*` = any). Empty: requests with an `Origin`
    /// header must be same-origin: the listener's scheme (`http`, or `https` with TLS), the
    /// `Host` header's host and port — or one of `public_origins`.
    pub allowed_origins: Vec<String>,
    /// The origins (`https://ws.example.com`) clients reach this route under, when a proxy in
    /// front changes the scheme or port; they replace the listener's own for the same-origin
    /// check. Default empty.
    pub public_origins: Vec<String>,
    /// `Host` header values (`host` or `host:port`) this route answers; any other gets 403
    /// (`host`), which guards against DNS rebinding. Empty: any Host. Default empty.
    pub allowed_hosts: Vec<String>,
    /// Close (1000) after this long without a frame from the client; 0 = never. Heartbeat
    /// pongs do not count as activity. Default 0.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Largest client message in bytes; larger closes with 1009. Default 64 KiB. Also
    /// accepted as `max_payload_length` (HyperExpress).
    #[serde(alias = "max_payload_length")]
    pub max_payload: usize,
    pub heartbeat: HeartbeatConfig,
    pub outbound: OutboundConfig,
    pub rate_limit: RateLimitConfig,
    /// Sockets one user may hold in one namespace on this edge and route; more close with
    /// 1008. 0 = no limit. Default 100.
    pub max_connections_per_user: usize,
    /// Topic filters one connection may hold. Default 256.
    pub max_topics: usize,
    /// Client events awaiting a backend reply at once, per connection. Default 32.
    pub max_inflight: usize,
    /// Whether clients may `publish` to topics. Default false.
    pub publish: bool,
    pub hooks: HooksConfig,
    /// Topics whose publications are kept, so clients recover what they missed
    /// (docs/PROTOCOL.md §4.5). Default none.
    pub history: Vec<HistoryRule>,
    /// Resume tokens: what a client presents to restore its subscriptions on any edge.
    pub resume: ResumeConfig,
    /// Whether clients may send binary frames, and receive binary payloads (docs/PROTOCOL.md
    /// §3.1). Off: a binary frame closes the connection with 1003. Default false.
    pub binary: bool,
    /// The event a client's binary frame is published as, on `sb.event.<namespace>.<event>`
    /// (raw bytes, header `Sb-Binary: 1`). Default `binary`.
    pub binary_event: String,
    /// permessage-deflate on this route (docs/PROTOCOL.md §3.2). Default off.
    pub compression: CompressionConfig,
}

/// permessage-deflate (RFC 7692) on a route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionConfig {
    /// Offer the extension to clients that ask for it. Default false.
    pub enabled: bool,
    /// Messages shorter than this many bytes go uncompressed. Default 256.
    pub min_size: usize,
    /// Must be true (the default): every message is compressed without the previous ones'
    /// window, once for all its recipients, and no connection keeps a compressor.
    pub server_no_context_takeover: bool,
    /// Bytes of compression state (inflaters and messages being inflated) the route's
    /// connections may hold; past it, new connections are not offered compression.
    /// Default 64 MiB.
    pub memory_budget: usize,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            min_size: 256,
            server_no_context_takeover: true,
            memory_budget: 64 << 20,
        }
    }
}

/// One history rule: the topics it covers, in every namespace, and how much is kept.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRule {
    /// An MQTT topic filter, e.g. `chat/#`.
    pub topics: String,
    /// Publications kept per topic (1 to 10 000).
    pub size: u64,
    /// How long a publication is kept (more than 0).
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// Whether clients may read it with the `history` verb. Default false.
    #[serde(default)]
    pub read: bool,
}

/// The largest `history[].size`.
pub const MAX_HISTORY_SIZE: u64 = 10_000;

impl HistoryRule {
    /// What storage keeps of it.
    pub fn storage(&self) -> bus::history::Rule {
        bus::history::Rule {
            pattern: self.topics.clone(),
            size: self.size,
            ttl: self.ttl,
        }
    }
}

/// What a resume token does on a route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResumeConfig {
    /// How long a resume token is good for; 0: no resume tokens. Default 5 min.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// What a valid `?resume=` token on the upgrade does to the onconnect hook: `skip` it
    /// (the token proves it accepted this user here before), `run` it, or send the backend
    /// a `resumed` event instead (`event`). Default `skip`.
    pub onconnect: OnResume,
}

impl Default for ResumeConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(300),
            onconnect: OnResume::default(),
        }
    }
}

pub use edge_core::session::OnResume;

impl Default for RouteConfig {
    fn default() -> Self {
        Self {
            path: "/connect".into(),
            dialect: Dialect::default(),
            key: None,
            monument: MonumentMode::Off,
            resources: BTreeMap::new(),
            anonymous: false,
            user_query: "user".into(),
            namespace: NamespaceConfig::default(),
            auth: AuthConfig::default(),
            allowed_origins: Vec::new(),
            public_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            idle_timeout: Duration::ZERO,
            max_payload: 64 * 1024,
            heartbeat: HeartbeatConfig::default(),
            outbound: OutboundConfig::default(),
            rate_limit: RateLimitConfig::default(),
            max_connections_per_user: 100,
            max_topics: 256,
            max_inflight: 32,
            publish: false,
            hooks: HooksConfig::default(),
            history: Vec::new(),
            resume: ResumeConfig::default(),
            binary: false,
            binary_event: "binary".into(),
            compression: CompressionConfig::default(),
        }
    }
}

/// Where a connection's namespace comes from. A claim (when set and in the token) is
/// authoritative: a query parameter naming another namespace is refused (403); then the
/// query parameter; then the default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    /// The query parameter naming the namespace. Default `namespace`.
    pub query: Option<String>,
    /// The token claim naming the namespace (not on anonymous routes). Default none.
    pub claim: Option<String>,
    /// Default `default`.
    pub default: String,
    /// The order in effect, as `check-config` prints it (e.g. `claim:tenant > query:namespace
    /// > default:default`); computed from the keys above. A value in the file must match it.
    pub precedence: Option<String>,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self {
            query: Some("namespace".into()),
            claim: None,
            default: "default".into(),
            precedence: None,
        }
    }
}

impl NamespaceConfig {
    /// The sources in the order they are tried, as `check-config` states them. A claim,
    /// when configured, is the only source: a token without it is refused, so that no query
    /// parameter can pick a tenant.
    pub fn order(&self) -> String {
        if let Some(c) = &self.claim {
            return format!("claim:{c} (required)");
        }
        let mut parts = Vec::new();
        if let Some(q) = &self.query {
            parts.push(format!("query:{q}"));
        }
        parts.push(format!("default:{}", self.default));
        parts.join(" > ")
    }
}

/// JWT verification for a route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 shared secret.
    pub hs256_secret: Option<String>,
    /// Name of an environment variable holding the HS256 secret (read by the binary at
    /// start), e.g. `SWITCHBOARD_JWT_SECRET`.
    pub hs256_secret_env: Option<String>,
    /// PEM file with an RS256 public key.
    pub rs256_public_key_file: Option<std::path::PathBuf>,
    /// PEM file with an ES256 (P-256) public key.
    pub es256_public_key_file: Option<std::path::PathBuf>,
    /// PEM file with an EdDSA (Ed25519) public key.
    pub eddsa_public_key_file: Option<std::path::PathBuf>,
    /// A JWKS document (read by the binary at start): keys chosen by the token's `kid`.
    pub jwks_file: Option<std::path::PathBuf>,
    /// An `https://` URL of a JWKS document, fetched by the edge (`http://` only for a
    /// loopback host).
    pub jwks_url: Option<String>,
    /// PEM bundle of the CAs that sign the `jwks_url` server's certificate; default: the
    /// system's roots.
    pub jwks_ca_file: Option<std::path::PathBuf>,
    /// Periodic refetch of `jwks_url`. Default 5 min.
    #[serde(with = "duration")]
    pub jwks_refresh: Duration,
    /// A token with an unknown `kid` refetches `jwks_url` at most this often. Default 30 s.
    #[serde(with = "duration")]
    pub jwks_refresh_min: Duration,
    /// Refuse tokens without `exp` (401). Default true.
    pub require_exp: bool,
    /// While connected, `refresh_required` is sent this long before `exp`; 0 = no notice,
    /// only the close at expiry. Default 30 s.
    #[serde(with = "duration")]
    pub refresh_lead: Duration,
    /// The claim naming the user. Default `sub`.
    pub user_claim: String,
    /// The claim listing the namespaces a token may open; absent claim = any. Default
    /// `namespaces`.
    pub namespaces_claim: String,
    /// Read `Authorization: Bearer <token>`. Default true.
    pub header: bool,
    /// Query parameter carrying the token. Default `token`.
    pub query: Option<String>,
    /// Cookie carrying the token. Default `ID_TOKEN`.
    pub cookie: Option<String>,
    /// Clock skew allowed on `exp`/`nbf`. Default 0 s.
    #[serde(with = "duration")]
    pub leeway: Duration,
    /// Accept only tokens whose `aud` names one of these (an identity provider shared with
    /// other applications signs their tokens with the same keys). Empty: `aud` is not
    /// checked.
    pub audience: Vec<String>,
    /// Accept only tokens whose `iss` is this. Default: not checked.
    pub issuer: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            hs256_secret_env: None,
            rs256_public_key_file: None,
            es256_public_key_file: None,
            eddsa_public_key_file: None,
            jwks_file: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_refresh: Duration::from_secs(300),
            jwks_refresh_min: Duration::from_secs(30),
            require_exp: true,
            refresh_lead: Duration::from_secs(30),
            user_claim: "sub".into(),
            namespaces_claim: "namespaces".into(),
            header: true,
            query: Some("token".into()),
            cookie: Some("ID_TOKEN".into()),
            leeway: Duration::ZERO,
            audience: Vec::new(),
            issuer: None,
        }
    }
}

/// The key sources of [`AuthConfig`], by config key: exactly one per JWT route.
pub const KEY_SOURCES: [&str; 7] = [
    "hs256_secret",
    "hs256_secret_env",
    "rs256_public_key_file",
    "es256_public_key_file",
    "eddsa_public_key_file",
    "jwks_file",
    "jwks_url",
];

/// `refresh_lead` must be below this: a longer notice is a token lifetime in disguise.
pub const MAX_REFRESH_LEAD: Duration = Duration::from_secs(3600);

impl AuthConfig {
    /// The key sources that are set (names from [`KEY_SOURCES`]).
    pub fn key_sources(&self) -> Vec<&'static str> {
        let set = [
            self.hs256_secret.is_some(),
            self.hs256_secret_env.is_some(),
            self.rs256_public_key_file.is_some(),
            self.es256_public_key_file.is_some(),
            self.eddsa_public_key_file.is_some(),
            self.jwks_file.is_some(),
            self.jwks_url.is_some(),
        ];
        KEY_SOURCES
            .iter()
            .zip(set)
            .filter_map(|(k, on)| on.then_some(*k))
            .collect()
    }

    /// Exactly one key source on a JWT route, and sane lifecycle settings; the error is
    /// (key under `auth`, message).
    fn validate_keys(&self, anonymous: bool) -> Result<(), (String, String)> {
        let sources = self.key_sources();
        if anonymous && !sources.is_empty() {
            let msg = "an anonymous route takes no token: remove anonymous or the auth key";
            return Err(("anonymous".into(), msg.into()));
        }
        if !anonymous && sources.is_empty() {
            let msg = format!("set one of {}, or anonymous: true", KEY_SOURCES.join(", "));
            return Err(("auth".into(), msg));
        }
        if sources.len() > 1 {
            let msg = format!("set only one key source, not {}", sources.join(" and "));
            return Err(("auth".into(), msg));
        }
        if let Some(url) = &self.jwks_url
            && let Err(e) = crate::jwks::check_url(url)
        {
            return Err(("auth.jwks_url".into(), e.to_string()));
        }
        if self.jwks_ca_file.is_some() && self.jwks_url.is_none() {
            let msg = "applies only with jwks_url".to_owned();
            return Err(("auth.jwks_ca_file".into(), msg));
        }
        if self.jwks_url.is_some() && self.jwks_refresh_min.is_zero() {
            let msg = "must be more than 0 (it bounds refetches a client can cause)".to_owned();
            return Err(("auth.jwks_refresh_min".into(), msg));
        }
        if self.jwks_url.is_some() && self.jwks_refresh < self.jwks_refresh_min {
            let msg = "must be at least jwks_refresh_min".to_owned();
            return Err(("auth.jwks_refresh".into(), msg));
        }
        if self.refresh_lead >= MAX_REFRESH_LEAD {
            let msg = format!("must be less than {}s", MAX_REFRESH_LEAD.as_secs());
            return Err(("auth.refresh_lead".into(), msg));
        }
        Ok(())
    }
}

/// WebSocket pings from the edge; a missing pong ends the connection (TCP closed).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Ping every this long; 0 = no heartbeat. Default 25 s.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// How long to wait for the pong. Default 10 s.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(25),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The bounded queue of frames waiting to be written to one client.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// Frames queued at most. Default 1024.
    pub queue: usize,
    /// Bytes queued at most. Default 4 MiB.
    pub max_bytes: usize,
    /// What happens when a frame does not fit: `close` (1013, slow consumer) or `drop`
    /// (the frame is refused and counted). Default `close`.
    pub on_full: OnFull,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            queue: 1024,
            max_bytes: 4 * 1024 * 1024,
            on_full: OnFull::Close,
        }
    }
}

/// Slow-consumer policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    Close,
    Drop,
}

/// Token bucket on client frames.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Frames per second refilled; 0 = no limit. Default 100.
    pub per_second: u32,
    /// Bucket size. Default 200.
    pub burst: u32,
    /// Refused frames in a row after which the socket closes with 1008. Default 20.
    pub close_after: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_second: 100,
            burst: 200,
            close_after: 20,
        }
    }
}

impl RouteConfig {
    /// The routing field in effect.
    pub fn key(&self) -> Key {
        self.key.unwrap_or_else(|| self.dialect.key())
    }

    /// Refuses namespace sources the precedence cannot explain: (key under the route,
    /// message).
    /// Each history rule is a valid filter, bounded by count and age, and overlaps no
    /// other rule of the route (a topic belongs to one history).
    fn validate_history(&self) -> Result<(), (String, String)> {
        for (j, h) in self.history.iter().enumerate() {
            let k = |f: &str| format!("history[{j}].{f}");
            if let Err(e) = proto::topic::validate_filter(&h.topics) {
                return Err((k("topics"), e.to_string()));
            }
            if h.size == 0 || h.size > MAX_HISTORY_SIZE {
                return Err((k("size"), format!("must be 1 to {MAX_HISTORY_SIZE}")));
            }
            if h.ttl.is_zero() {
                return Err((
                    k("ttl"),
                    "must be more than 0 (history is bounded by age)".into(),
                ));
            }
            if let Some(o) = self.history[..j]
                .iter()
                .position(|o| proto::topic::overlaps(&o.topics, &h.topics))
            {
                return Err((
                    k("topics"),
                    format!("overlaps history[{o}]: a topic belongs to one rule"),
                ));
            }
        }
        if self.resume.ttl > Duration::from_secs(86_400) {
            return Err(("resume.ttl".into(), "must be at most 24h".into()));
        }
        Ok(())
    }

    fn validate_namespace(&self) -> Result<(), (&'static str, &'static str)> {
        let ns = &self.namespace;
        if ns.claim.is_some() && self.anonymous {
            return Err((
                "namespace.claim",
                "an anonymous route has no token to take a claim from",
            ));
        }
        if ns.claim.as_deref() == Some("") {
            return Err(("namespace.claim", "must not be empty (omit it for none)"));
        }
        if ns.query.as_deref() == Some("") {
            return Err(("namespace.query", "must not be empty (null for none)"));
        }
        if ns.default.is_empty() || ns.default.len() > 256 {
            return Err(("namespace.default", "must be 1 to 256 bytes"));
        }
        if !self.anonymous && ns.query.is_some() && ns.query == self.auth.query {
            return Err((
                "namespace.query",
                "is the parameter carrying the token (auth.query)",
            ));
        }
        if self.anonymous && ns.query.as_deref() == Some(self.user_query.as_str()) {
            return Err((
                "namespace.query",
                "is the parameter naming the user (user_query)",
            ));
        }
        if ns.precedence.as_ref().is_some_and(|p| *p != ns.order()) {
            return Err((
                "namespace.precedence",
                "is computed from claim, query and default; remove it or copy check-config's",
            ));
        }
        Ok(())
    }
}

/// What a monument route does with events (the seed's `config.webSocket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MonumentMode {
    /// No WebSocket on the route.
    #[default]
    Off,
    /// Data-style and passthrough events.
    Both,
    Data,
    Passthrough,
}

impl MonumentMode {
    pub fn data(self) -> bool {
        matches!(self, Self::Both | Self::Data)
    }

    pub fn passthrough(self) -> bool {
        matches!(self, Self::Both | Self::Passthrough)
    }
}

impl<'de> Deserialize<'de> for MonumentMode {
    /// `false` → off, `"data"`, `"passthrough"`, anything else → both (as monument does).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_yaml_ng::Value::deserialize(d)?;
        Ok(match v {
            serde_yaml_ng::Value::Bool(false) => Self::Off,
            serde_yaml_ng::Value::String(s) if s == "data" => Self::Data,
            serde_yaml_ng::Value::String(s) if s == "passthrough" => Self::Passthrough,
            _ => Self::Both,
        })
    }
}

impl Serialize for MonumentMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Off => s.serialize_bool(false),
            Self::Both => s.serialize_bool(true),
            Self::Data => s.serialize_str("data"),
            Self::Passthrough => s.serialize_str("passthrough"),
        }
    }
}

/// A resource type on a route.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// `kv`: a key-value bucket (query, all, get, watch); `topic`: a bus subject whose
    /// messages are items (watch only).
    pub kind: ResourceKind,
    /// kv: the bucket; default: the resource type's name.
    #[serde(default)]
    pub bucket: Option<String>,
    /// topic: the subject; default `sb.resource.<type>`.
    #[serde(default)]
    pub subject: Option<String>,
    /// The item field that is its key. Default `id`.
    #[serde(default = "default_id_field")]
    pub id_field: String,
}

fn default_id_field() -> String {
    "id".into()
}

/// `kv` or `topic` (the session decides which verbs each takes).
pub use edge_core::session::ResourceKind;

impl ResourceConfig {
    /// The bucket of a kv resource named `name`.
    pub fn bucket_name(&self, name: &str) -> String {
        self.bucket.clone().unwrap_or_else(|| name.to_owned())
    }

    /// The subject of a topic resource named `name`.
    pub fn subject_name(&self, name: &str) -> String {
        self.subject
            .clone()
            .unwrap_or_else(|| proto::subject::resource(name))
    }
}

/// Bus subjects for connection lifecycle and client events (the bodhi shape).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// A request before the upgrade (HyperExpress's upgrade interception): the reply
    /// `{"context":{…}}` admits the connection and becomes part of its context; `{"error":…,
    /// "status":4xx}` refuses it with that HTTP status (default 403). No answer → 503. The
    /// request it sees has no credential: the token parameter, `Authorization` and the token
    /// cookie are removed once auth has read them.
    pub upgrade: Option<Hook>,
    /// A request on connect: a reply is pushed as `onconnect`; an `{"error":…}` answer (or,
    /// when `required`, no answer) is pushed as an error and closes (1008).
    pub onconnect: Option<Hook>,
    pub onmessage: Option<MessageHooks>,
    /// Published (fire and forget) when a connection closes.
    pub onclose: Option<Hook>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub publish: String,
    /// onconnect only: refuse the connection (1008) when no backend answers. Default false.
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessageHooks {
    /// Subject that hears every client event, those matched by `types` too (each subject's
    /// reply reaches the client).
    pub publish: Option<String>,
    pub types: Vec<TypeHook>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TypeHook {
    #[serde(rename = "type")]
    pub event_type: String,
    pub publish: String,
}

/// A configuration mistake, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl HooksConfig {
    /// Every subject the hooks name, with its config key.
    pub fn subjects(&self) -> Vec<(&'static str, &String)> {
        let mut out = Vec::new();
        let single = [
            ("hooks.upgrade.publish", &self.upgrade),
            ("hooks.onconnect.publish", &self.onconnect),
            ("hooks.onclose.publish", &self.onclose),
        ];
        for (k, h) in single {
            if let Some(h) = h {
                out.push((k, &h.publish));
            }
        }
        if let Some(m) = &self.onmessage {
            out.extend(m.publish.iter().map(|p| ("hooks.onmessage.publish", p)));
            out.extend(
                m.types
                    .iter()
                    .map(|t| ("hooks.onmessage.types.publish", &t.publish)),
            );
        }
        out
    }
}

impl EdgeConfig {
    /// The embedded mode's defaults: one anonymous `/connect` route where the user comes from
    /// `?user=` and clients may publish, with a `notes` key-value resource type (the demo page
    /// watches it).
    pub fn dev() -> Self {
        // `notes`: a key-value resource type for the demo page's watch (src/demo.rs).
        let notes = ResourceConfig {
            kind: ResourceKind::Kv,
            bucket: None,
            subject: None,
            id_field: default_id_field(),
        };
        let route = RouteConfig {
            anonymous: true,
            publish: true,
            allowed_origins: vec!["*".into()],
            resources: [("notes".to_owned(), notes)].into_iter().collect(),
            ..RouteConfig::default()
        };
        Self {
            routes: vec![route],
            ..Self::default()
        }
    }

    /// Checks what serde cannot: contradictions and values out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: String, message: &str| ConfigError {
            key,
            message: message.into(),
        };
        if self.max_connections == 0 {
            return Err(err("edge.max_connections".into(), "must be at least 1"));
        }
        if self.routes.is_empty() {
            return Err(err("edge.routes".into(), "at least one route is needed"));
        }
        if !bus::store::is_valid_bucket(&self.revocation_bucket) {
            return Err(err(
                "edge.revocation_bucket".into(),
                "bucket names use letters, digits, - and _ only",
            ));
        }
        let mut paths = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let key = |k: &str| format!("edge.routes[{i}].{k}");
            if !r.path.starts_with('/') {
                return Err(err(key("path"), "must start with /"));
            }
            if matches!(r.path.as_str(), "/healthz" | "/readyz" | "/metrics") {
                return Err(err(key("path"), "is reserved for health and metrics"));
            }
            if !paths.insert(r.path.clone()) {
                return Err(err(key("path"), "is used by another route"));
            }
            let a = &r.auth;
            if let Err((k, message)) = a.validate_keys(r.anonymous) {
                return Err(ConfigError {
                    key: key(&k),
                    message,
                });
            }
            if !r.anonymous && !a.header && a.query.is_none() && a.cookie.is_none() {
                return Err(err(
                    key("auth"),
                    "no token source: enable header, query or cookie",
                ));
            }
            if r.max_payload == 0 {
                return Err(err(key("max_payload"), "must be at least 1"));
            }
            if r.outbound.queue == 0 || r.outbound.max_bytes == 0 {
                return Err(err(
                    key("outbound"),
                    "queue and max_bytes must be at least 1",
                ));
            }
            if r.rate_limit.per_second > 0 && r.rate_limit.burst < r.rate_limit.per_second {
                return Err(err(
                    key("rate_limit.burst"),
                    "must be at least per_second (the bucket holds a second's worth)",
                ));
            }
            if r.rate_limit.close_after == 0 {
                return Err(err(
                    key("rate_limit.close_after"),
                    "must be at least 1 (refused frames in a row before closing)",
                ));
            }
            if r.monument != MonumentMode::Off && !r.dialect.row().monument_modes {
                return Err(err(
                    key("monument"),
                    "applies to routes with dialect: monument",
                ));
            }
            if !r.resources.is_empty() && !r.dialect.has_resources() {
                return Err(err(key("resources"), "this dialect has no resource verbs"));
            }
            for (name, res) in &r.resources {
                let k = |f: &str| key(&format!("resources.{name}.{f}"));
                match res.kind {
                    ResourceKind::Kv if !bus::store::is_valid_bucket(&res.bucket_name(name)) => {
                        return Err(err(
                            k("bucket"),
                            "bucket names use letters, digits, - and _ only",
                        ));
                    }
                    ResourceKind::Topic
                        if !bus::is_valid_publish_subject(&res.subject_name(name)) =>
                    {
                        return Err(err(k("subject"), "is not a valid subject"));
                    }
                    _ => {}
                }
            }
            if r.max_inflight == 0 {
                return Err(err(key("max_inflight"), "must be at least 1"));
            }
            if !r.heartbeat.interval.is_zero() && r.heartbeat.timeout.is_zero() {
                return Err(err(
                    key("heartbeat.timeout"),
                    "must be more than 0 when interval is set",
                ));
            }
            if !r.heartbeat.interval.is_zero() && r.heartbeat.timeout > r.heartbeat.interval {
                return Err(err(
                    key("heartbeat.timeout"),
                    "must not be longer than heartbeat.interval",
                ));
            }
            r.validate_namespace().map_err(|(k, m)| err(key(k), m))?;
            if !r.compression.server_no_context_takeover {
                return Err(err(
                    key("compression.server_no_context_takeover"),
                    "must be true: a message is compressed once for all its recipients",
                ));
            }
            if r.binary_event.is_empty() || r.binary_event.len() > 256 {
                return Err(err(key("binary_event"), "must be 1 to 256 bytes"));
            }
            for (k, list) in [
                ("public_origins", &r.public_origins),
                ("allowed_hosts", &r.allowed_hosts),
            ] {
                if list
                    .iter()
                    .any(|v| v.is_empty() || v.contains(char::is_whitespace))
                {
                    return Err(err(key(k), "entries must be non-empty, without spaces"));
                }
            }
            if r.public_origins.iter().any(|o| !o.contains("://")) {
                return Err(err(
                    key("public_origins"),
                    "entries are scheme://host[:port], e.g. https://ws.example.com",
                ));
            }
            r.validate_history().map_err(|(k, m)| err(key(&k), &m))?;
            let subjects = r.hooks.subjects();
            for (k, subject) in subjects {
                if !bus::is_valid_publish_subject(subject) {
                    return Err(err(
                        key(k),
                        "is not a valid subject (no spaces, wildcards or empty tokens)",
                    ));
                }
            }
        }
        self.validate_history_across_routes()
    }

    /// The history rules of every route, each once: storage keeps one history per pattern,
    /// shared by the routes that declare it.
    pub fn history_rules(&self) -> Vec<bus::history::Rule> {
        let mut rules: Vec<bus::history::Rule> = Vec::new();
        for r in self.routes.iter().flat_map(|r| &r.history) {
            if !rules.iter().any(|k| k.pattern == r.topics) {
                rules.push(r.storage());
            }
        }
        rules
    }

    /// A pattern declared on several routes is declared alike, and patterns of different
    /// routes do not overlap: a topic's history is one thing, whichever route reads it.
    fn validate_history_across_routes(&self) -> Result<(), ConfigError> {
        let all: Vec<(usize, usize, &HistoryRule)> = self
            .routes
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.history.iter().enumerate().map(move |(j, h)| (i, j, h)))
            .collect();
        for (n, (i, j, a)) in all.iter().enumerate() {
            for (k, l, b) in &all[..n] {
                if k == i {
                    continue;
                }
                let clash = if a.topics == b.topics {
                    (a.size, a.ttl) != (b.size, b.ttl)
                } else {
                    proto::topic::overlaps(&a.topics, &b.topics)
                };
                if clash {
                    return Err(ConfigError {
                        key: format!("edge.routes[{i}].history[{j}].topics"),
                        message: format!(
                            "{:?} clashes with edge.routes[{k}].history[{l}] ({:?}): a pattern \
                             declared on several routes must have the same size and ttl, and \
                             patterns must not overlap",
                            a.topics, b.topics
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Durations as `250ms`, `30s`, `2m` (humantime), or a plain number of seconds (as
/// HyperExpress writes `idle_timeout: 60`).
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Seconds(n) if n.is_finite() && n >= 0.0 => Ok(Duration::from_secs_f64(n)),
            Raw::Seconds(n) => Err(serde::de::Error::custom(format!("{n} is not a duration"))),
            Raw::Text(t) => humantime_serde::re::humantime::parse_duration(&t)
                .map_err(|e| serde::de::Error::custom(format!("{t:?} is not a duration: {e}"))),
        }
    }
}
