//! The security suite: the trust boundary tried as an attacker would, against the real binary.
#![allow(clippy::unwrap_used)]
mod edge;
mod grpc;
#[path = "../common/cluster.rs"]
mod harness;
mod nats;
mod tls;
mod tokens;
