//! The coordinator: the placement directory fed by edge reports, and the gRPC services
//! backends and operators call.
//!
//! | module | what |
//! | --- | --- |
//! | [`placement`] | the directory (sans-io) |
//! | [`messaging`] | delivery across edges over the bus ([`Coordinator`]) |
//! | [`cluster`] | the other coordinators: membership from announcements, the ring, a channel per peer |
//! | [`report`] | `EdgeReport`: each edge's stream of placement deltas |
//! | [`ingest`] | the NATS send and broadcast subjects, for backends without gRPC |
//! | [`resources`] | `Resources`: items of key-value resource types |
//! | [`access`] | who may call which gRPC method (API keys, node credentials) |
//! | [`api`] | tonic services: proto ↔ domain, errors → `Status` |
//! | [`grpc`] | the gRPC server with health and reflection |
//! | [`admin`] | operator actions: token revocation |
//! | [`http`] | `/healthz`, `/readyz`, `/metrics` |
//! | [`config`] | the `coordinator:` block of the config file |
//! | [`tls`] | TLS on the gRPC listener |

pub mod access;
pub mod admin;
pub mod api;
pub mod cluster;

pub mod config;
pub mod grpc;
pub mod history;
pub mod http;
pub mod ingest;
pub mod messaging;
pub mod placement;
pub mod report;
pub mod resources;
pub mod tls;

pub use config::CoordinatorConfig;
pub use messaging::{Coordinator, DeliveryError};
pub use placement::Directory;
