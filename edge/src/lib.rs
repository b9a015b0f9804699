//! The edge: terminates client WebSockets, authenticates them, speaks the client protocol,
//! and delivers what the bus brings to the right sockets. It is the shell around the pure
//! core in `edge-core` ([`edge_core::session`], [`edge_core::index`], [`edge_core::router`]):
//! every module here does I/O for a decision made there.
//!
//! Layers, each using only those above it (checked by `scripts/check-layers`):
//!
//! | layer | module | what |
//! | --- | --- | --- |
//! | transport | `transport` | what the fan-out needs of a connection ([`transport::Outlet`]); the outbox; the WebSocket line and its framing |
//! | shell | [`config`] | routes, limits, auth, hooks (the `edge:` block of the config file) |
//! | | `http` | request head parsing and plain responses |
//! | | `jwks` | JSON Web Key Sets: parsing, `kid` selection, the `jwks_url` fetcher |
//! | | `auth` | JWT verification, token sources, namespaces, origins |
//! | | `route` | a configured route, compiled: verifier, session rules, WebSocket limits |
//! | | `handle` | a connection's front door ([`ConnHandle`]): deliver, write now, close |
//! | | `tls` | TLS on the listener: the handshake, and a sealed line for the task alone |
//! | | [`metrics`] | Prometheus text |
//! | | `registry` | the local index ([`edge_core::index`]) under its lock; bus subscriptions, topic pumps, report batches |
//! | | `command` | what coordinators ask of this edge over the bus |
//! | | `revoke` | revoked tokens: the bucket's copy and its watch |
//! | | `env` | what a connection may use of its node, handed down explicitly |
//! | | `protocol` | what the session's actions send to backends; the connection context |
//! | | `resources` | resource verbs against the store; watches |
//! | | `conn` | the connection driver: socket in, [`edge_core::Session`] actions out |
//! | server | `server` | accept loop, health/metrics endpoints, admission, upgrade, drain ([`Edge`]) |
//! | | [`uplink`] | cluster mode: a report stream per coordinator, routed by [`edge_core::router`] |

pub mod config;
pub mod metrics;

mod auth;
mod command;
mod conn;
mod env;
mod handle;
mod history;
mod http;
mod jwks;
mod protocol;
mod registry;
mod resources;
mod revoke;
mod route;
mod server;
mod tls;
mod transport;
pub mod uplink;

pub use auth::{AuthError, Identity, RouteKeys};
pub use config::EdgeConfig;
pub use conn::ConnError;
pub use handle::{
    Agreed, CloseRequest, ConnHandle, ConnInfo, Delivery, Out, TOKEN_EXPIRED, TOKEN_REVOKED, Wire,
};
pub use route::Route;
pub use server::{Edge, EdgeError, StaticPage, Stores};
pub use transport::deflate::Window;
