//! The one harness of the suite. Every wait is bounded and fails the test with what was
//! awaited ([`poll`]); nothing sleeps to synchronise, nothing skips.
//!
//! | module | what |
//! | --- | --- |
//! | [`poll`] | `STEP`/`WAIT` bounds, `poll_for`, `eventually`, `bounded` |
//! | [`node`] | `TestNode`: edge + coordinator in this process over the in-process bus |
//! | [`process`] | `Proc`: the real `switchboard` binary (or haproxy) as a child process; signals |
//! | [`cluster`] | `Cluster`/`Spec`: nats-server, coordinators and edges as real processes |
//! | [`ws`] | `Client`: the WebSocket client of every test |
//! | [`deflate`] | `DeflateClient`: a frame-by-frame client with permessage-deflate |
//! | [`http`] | plain HTTP/1: readiness, metrics, raw upgrade requests |
//! | [`grpc`] | tonic clients with the test API key, the calls tests make, `grpcurl` |
//! | [`proxy`] | `TcpProxy`: a TCP forwarder a test cuts and restores (a network fault) |
//! | [`haproxy`] | haproxy on `deploy/local`'s config in front of a cluster's edges |
//! | [`nats`] | `Backend`: a NATS client playing a backend; `/connz` helpers |
//! | [`tokens`] | JWTs and `Authorization: Bearer` |
//! | [`certs`] | `TestCa`: a CA made in the test and the certificates it issues |
//! | [`files`] | fixtures, `deploy/examples`, scratch directories |
//!
//! Areas import what they use: `use crate::harness::*;` or named items.
#![allow(unreachable_pub)] // `pub` is what the areas may use; the crate is a test binary

mod certs;
mod cluster;
mod deflate;
mod files;
mod grpc;
mod haproxy;
mod http;
mod nats;
mod node;
mod poll;
mod process;
mod proxy;
mod tokens;
mod ws;

pub use certs::*;
pub use cluster::*;
pub use deflate::*;
pub use files::*;
pub use grpc::*;
pub use haproxy::*;
pub use http::*;
pub use nats::*;
pub use node::*;
pub use poll::*;
pub use process::*;
pub use proxy::*;
pub use tokens::*;
pub use ws::*;
