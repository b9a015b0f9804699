//! The coordinator's configuration (the `coordinator:` block of the config file).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// gRPC listener. Default `127.0.0.1:50051`.
    pub grpc_listen: SocketAddr,
    /// HTTP listener for `/healthz`, `/readyz`, `/metrics` (cluster mode). Default
    /// `127.0.0.1:9090`.
    pub http_listen: SocketAddr,
    /// How long to wait for edges to answer a delivery. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The gRPC address peers and edges dial; default: `grpc_listen` as bound.
    pub advertise: Option<String>,
    /// How often this coordinator announces itself. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub announce_interval: Duration,
    /// A coordinator silent for this long leaves the ring. Default 3 s.
    #[serde(with = "humantime_serde")]
    pub member_timeout: Duration,
    /// How long a vanished edge's connections stay in placement. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub edge_grace: Duration,
    /// Resource types whose bucket or id field differ from the defaults (a bucket of the
    /// type's name, keyed by `id`), for `Resources`; the edge routes' resource types in the
    /// same file count too.
    pub resources: std::collections::BTreeMap<String, ResourceSpecConfig>,
    /// Backends publish `{username, namespace?, type, payload}` here to send. Default `sb.send`.
    pub send_subject: String,
    /// Backends publish `{type, payload, namespace?, skip?}` here to broadcast. Default
    /// `sb.broadcast`.
    pub broadcast_subject: String,
    /// Who may call the gRPC API: keys and their scopes.
    pub api: crate::access::ApiConfig,
    /// The key-value bucket `Admin.Revoke` writes revoked tokens to (the edges' `edge.
    /// revocation_bucket`). Default `sb_revoked`.
    pub revocation_bucket: String,
    /// TLS on the gRPC listener. Default: none (plaintext HTTP/2).
    pub tls: Option<TlsFiles>,
}

pub use bus::tls::TlsFiles;

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            request_timeout: Duration::from_secs(2),
            advertise: None,
            announce_interval: Duration::from_secs(1),
            member_timeout: Duration::from_secs(3),
            edge_grace: Duration::from_secs(10),
            resources: std::collections::BTreeMap::new(),
            send_subject: proto::subject::DEFAULT_SEND.into(),
            broadcast_subject: proto::subject::DEFAULT_BROADCAST.into(),
            api: crate::access::ApiConfig::default(),
            tls: None,
            revocation_bucket: proto::revoke::BUCKET.into(),
        }
    }
}

/// Where a resource type's items live.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpecConfig {
    pub bucket: Option<String>,
    pub id_field: Option<String>,
}
