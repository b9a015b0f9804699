//! The edge: terminates client WebSockets, authenticates them, speaks the client protocol,
//! and delivers what the bus brings to the right sockets.
//!
//! | module | what |
//! | --- | --- |
//! | [`config`] | routes, limits, auth, hooks (the `edge:` block of the config file) |
//! | `server` | accept loop, health/metrics endpoints, upgrade, drain ([`Edge`]) |
//! | `http` | request head parsing and plain responses |
//! | `auth` | JWT verification, token sources, namespaces, origins |
//! | `jwks` | JSON Web Key Sets: parsing, `kid` selection, the `jwks_url` fetcher |
//! | `revoke` | revoked tokens: the bucket's copy and its watch |
//! | `conn` | the task that serves one socket, and its clonable [`ConnHandle`] |
//! | `transport` | what the fan-out needs of a connection (`Outlet`); the outbox; the WebSocket line |
//! | `tls` | TLS on the listener: handshake, and a sealed line for the task alone |
//! | `protocol` | built-in verbs and events forwarded through route hooks |
//! | `registry` | the local index ([`edge_core::index`]) under its lock; bus subscriptions and topic pumps |
//! | `command` | what coordinators ask of this edge over the bus |
//! | `report` | the wake-up of the report log ([`edge_core::report`]): readers wait for the next batch |
//! | [`uplink`] | cluster mode: a report stream per coordinator, routed by [`edge_core::router`] |
//! | `metrics` | Prometheus text |

pub mod config;
pub mod metrics;

mod auth;
mod command;
mod conn;
mod http;
mod jwks;
mod protocol;
mod registry;
mod report;
mod resources;
mod revoke;
mod server;
mod tls;
mod transport;
pub mod uplink;

pub use auth::{AuthError, Identity, RouteKeys};
pub use config::EdgeConfig;
pub use conn::{
    CloseRequest, ConnError, ConnHandle, ConnInfo, Delivery, TOKEN_EXPIRED, TOKEN_REVOKED,
};
pub use server::{Edge, EdgeError, Route};
