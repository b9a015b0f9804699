//! The wire contracts of Switchboard and nothing else: every byte that leaves a process is
//! defined here.
//!
//! | module | what |
//! | --- | --- |
//! | [`v1`] | gRPC services and messages generated from `switchboard/v1/*.proto` |
//! | [`subject`] | NATS subjects and header names: the only place a subject is spelled |
//! | [`topic`] | MQTT topic syntax: validation, matching, encoding into subject tokens |
//! | [`frame`] | client ↔ edge JSON frames: routing fields, error codes, the frame writer (docs/PROTOCOL.md) |
//! | [`json`] | JSON ↔ `google.protobuf.Struct` for the gRPC fields that carry free-form JSON |
//! | [`revoke`] | entries of the revoked-token bucket |
//! | [`credential`] | the per-node credentials edges and coordinators present to coordinators |
//! | [`resume`] | resume tokens: a client's subscriptions and positions, signed under the cluster secret |
//!
//! **Invariant:** this crate pulls in no tokio runtime and no telemetry.

pub mod credential;
pub mod frame;
pub mod json;
pub mod resume;
pub mod revoke;
pub mod subject;
pub mod topic;

/// How often an edge sends something on each report stream, an empty batch when it has
/// nothing to report.
pub const REPORT_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a coordinator hears nothing on a report stream before the edge is suspect: three
/// heartbeats.
pub const REPORT_SILENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// Generated from `switchboard/v1/*.proto`.
#[allow(
    clippy::all,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms,
    clippy::unwrap_used
)]
pub mod v1 {
    // The clients and servers in it are behind the `grpc` feature (see build.rs).
    include!(concat!(env!("OUT_DIR"), "/switchboard.v1.rs"));
}

/// The encoded `FileDescriptorSet` of every `.proto` here (with imports), for server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchboard_descriptor.bin"));
