//! The edge's configuration: listener, limits and routes. Read from the `edge:` block of the
//! YAML file by the binary; this crate never reads files or the environment.

use std::net::SocketAddr;
use std::time::Duration;

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
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// On shutdown, clients are closed (1001) spread over this window. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    /// How long a hook request (onconnect, onmessage) may take. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The WebSocket routes. Default: one `/connect` route that requires a JWT.
    pub routes: Vec<RouteConfig>,
    /// Cluster mode: coordinator gRPC addresses (`host:port` or `http://host:port`) for first
    /// contact; the rest of the ring is learned from their announcements on the bus.
    pub coordinators: Vec<String>,
    /// Cluster mode: a coordinator not heard from for this long leaves this edge's ring.
    /// Default 3 s.
    #[serde(with = "humantime_serde")]
    pub member_timeout: Duration,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 100_000,
            handshake_timeout: Duration::from_secs(10),
            drain_window: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            routes: vec![RouteConfig::default()],
            coordinators: Vec::new(),
            member_timeout: Duration::from_secs(3),
        }
    }
}

/// One WebSocket path and how its clients are treated.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// The path, e.g. `/connect`; a `{name}` segment captures a path parameter.
    pub path: String,
    /// The routing field of client frames: `type`, `event` or `handler`. Default `type`.
    pub key: Key,
    /// No token needed; the user comes from the `user_query` parameter (or is empty).
    pub anonymous: bool,
    /// On anonymous routes, the query parameter naming the user. Default `user`.
    pub user_query: String,
    pub namespace: NamespaceConfig,
    pub auth: AuthConfig,
    /// Origins allowed to open a socket (`*` = any). Empty: requests with an `Origin`
    /// header must come from the same host as the `Host` header.
    pub allowed_origins: Vec<String>,
    /// Close (1000) after this long without a frame from the client; 0 = never. Heartbeat
    /// pongs do not count as activity. Default 0.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest client message in bytes; larger closes with 1009. Default 64 KiB.
    pub max_payload: usize,
    pub heartbeat: HeartbeatConfig,
    pub outbound: OutboundConfig,
    pub rate_limit: RateLimitConfig,
    /// Sockets one user may hold on this edge and route; more close with 1008. 0 = no
    /// limit. Default 100.
    pub max_connections_per_user: usize,
    /// Topic filters one connection may hold. Default 256.
    pub max_topics: usize,
    /// Client events awaiting a backend reply at once, per connection. Default 32.
    pub max_inflight: usize,
    /// Whether clients may `publish` to topics. Default false.
    pub publish: bool,
    pub hooks: HooksConfig,
}

impl Default for RouteConfig {
    fn default() -> Self {
        Self {
            path: "/connect".into(),
            key: Key::Type,
            anonymous: false,
            user_query: "user".into(),
            namespace: NamespaceConfig::default(),
            auth: AuthConfig::default(),
            allowed_origins: Vec::new(),
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
        }
    }
}

/// Where a connection's namespace comes from: a query parameter, else a claim, else the
/// default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Default `namespace`.
    pub query: Option<String>,
    pub claim: Option<String>,
    /// Default `default`.
    pub default: String,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self {
            query: Some("namespace".into()),
            claim: None,
            default: "default".into(),
        }
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
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            hs256_secret_env: None,
            rs256_public_key_file: None,
            user_claim: "sub".into(),
            namespaces_claim: "namespaces".into(),
            header: true,
            query: Some("token".into()),
            cookie: Some("ID_TOKEN".into()),
            leeway: Duration::ZERO,
        }
    }
}

/// WebSocket pings from the edge; a missing pong ends the connection (TCP closed).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Ping every this long; 0 = no heartbeat. Default 25 s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long to wait for the pong. Default 10 s.
    #[serde(with = "humantime_serde")]
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

/// Bus subjects for connection lifecycle and client events (the bodhi shape).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// A request on connect: a reply is pushed as `onconnect`, a failure closes (1008).
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
    /// Subject for every client event not matched by `types`.
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

impl EdgeConfig {
    /// The embedded mode's defaults: one anonymous `/connect` route where the user comes from
    /// `?user=` and clients may publish.
    pub fn dev() -> Self {
        let route = RouteConfig {
            anonymous: true,
            publish: true,
            allowed_origins: vec!["*".into()],
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
            let sources = usize::from(a.hs256_secret.is_some())
                + usize::from(a.hs256_secret_env.is_some())
                + usize::from(a.rs256_public_key_file.is_some());
            if !r.anonymous && sources == 0 {
                return Err(err(
                    key("auth"),
                    "set hs256_secret, hs256_secret_env or rs256_public_key_file, or anonymous: true",
                ));
            }
            if sources > 1 {
                return Err(err(
                    key("auth"),
                    "set only one of hs256_secret, hs256_secret_env, rs256_public_key_file",
                ));
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
            if r.rate_limit.per_second > 0 && r.rate_limit.burst == 0 {
                return Err(err(
                    key("rate_limit.burst"),
                    "must be at least 1 when per_second is set",
                ));
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
            let subjects = r
                .hooks
                .onconnect
                .iter()
                .map(|h| ("hooks.onconnect.publish", &h.publish))
                .chain(
                    r.hooks
                        .onclose
                        .iter()
                        .map(|h| ("hooks.onclose.publish", &h.publish)),
                )
                .chain(
                    r.hooks
                        .onmessage
                        .iter()
                        .flat_map(|m| m.publish.iter().map(|p| ("hooks.onmessage.publish", p))),
                )
                .chain(r.hooks.onmessage.iter().flat_map(|m| {
                    m.types
                        .iter()
                        .map(|t| ("hooks.onmessage.types.publish", &t.publish))
                }));
            for (k, subject) in subjects {
                if !bus::is_valid_publish_subject(subject) {
                    return Err(err(
                        key(k),
                        "is not a valid subject (no spaces, wildcards or empty tokens)",
                    ));
                }
            }
        }
        Ok(())
    }
}
