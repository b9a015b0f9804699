//! The integration suite of the `switchboard` package: one test binary (`cargo test --test
//! suite`), one harness ([`harness`]), one module per area. The tests use only what clients,
//! backends and operators use: real WebSocket and gRPC clients, real `nats-server`, the real
//! binary; every wait is bounded, nothing sleeps to synchronise, nothing skips.
//!
//! | module | what it tries | against |
//! | --- | --- | --- |
//! | [`auth`] | upgrade-time admission: JWTs, user claim, namespaces, origins | in-process node |
//! | [`binary`] | the binary as a user runs it: banner, grpcurl, SIGTERM, check-config | process |
//! | [`cluster`] | delivery, placement and failures across edges and coordinators | cluster |
//! | [`frames`] | binary frames, permessage-deflate, the MessagePack subprotocol, the echo route | in-process node |
//! | [`faults`] | what a backend is told, and what arrives, while a process fails under load | cluster, haproxy |
//! | [`history`] | topic history, recovery on subscribe, resume tokens, live gaps repaired, epochs | in-process node, cluster |
//! | [`dev_nats`] | the embedded mode over a real NATS server: hooks and sends from a plain NATS backend | process |
//! | [`limits`] | frame limits, timeouts, rate limits, slow consumers, drain | in-process node |
//! | [`observe`] | metrics (promtool) and logs | cluster |
//! | [`protocol`] | the native client protocol and the gRPC services | in-process node |
//! | [`resume`] | 300 clients resume elsewhere with their tokens after an edge is killed, then drained; nothing lost | cluster, haproxy |
//! | [`retry`] | safe retries: a backend's `message_id` reaches each connection at most once | cluster |
//! | [`seeds`] | each seed system's documented gateway, on its example config | cluster |
//! | [`security`] | the trust boundary as an attacker tries it (edge, gRPC, NATS, TLS, tokens) | cluster |
//! | [`tracing`] | one trace across backend, coordinator and edge | cluster |
//!
//! Run one area with a filter on its module path: `cargo test --test suite security::`,
//! `cargo test --test suite seeds::bodhi::`.
//!
//! ## Adding an area
//!
//! Put the tests in `tests/suite/<area>.rs` (or `tests/suite/<area>/mod.rs` with
//! submodules), add one line `mod <area>;` below and a row to the table above, and take what
//! the tests need from the harness: `use crate::harness::*;` (or the items by name). A helper
//! that a second area needs moves into the harness, so that no helper exists twice; check
//! with `duplicates --repo tests`. Do not add a `tests/<area>.rs` file: each file there
//! would be a test binary of its own, with its own link and its own copy of the harness.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod harness;

mod auth;
mod binary;
mod cluster;
mod dev_nats;
mod faults;
mod frames;
mod history;
mod limits;
mod liveness;
mod observe;
mod protocol;
mod resume;
mod retry;
mod security;
mod seeds;
mod tracing;
