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
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            request_timeout: Duration::from_secs(2),
        }
    }
}
