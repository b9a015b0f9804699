//! `switchboard-bench`: the load generator of Switchboard's benchmark (`scripts/bench`), also
//! pointed at peers (nats-server's WebSocket listener, a Node `ws` broadcast server) in the
//! same run. Every scenario is bounded in time and count, talks to loopback servers the
//! script started, and prints one JSON line per measurement.
//!
//! | module | what |
//! | --- | --- |
//! | [`ws`] | upgrade, server-frame parser, masked client frames |
//! | [`recv`] | receivers: one task per connection, one read buffer, one latency histogram |
//! | [`nats`] | the NATS protocol inside nats-server's WebSocket frames |
//! | [`publish`] | publishers (WebSocket, gRPC, NATS) and the paced loop |
//! | [`procstat`] | server CPU and RSS from `/proc` |
//! | [`idle`], [`fanout`], [`send`], [`connect`], [`recover`] | the scenarios |
//! | [`report`] | the README table from the JSON lines |
//!
//! Everything runs on one current-thread runtime: the script pins the process to the load
//! core, and a single thread keeps the per-delivery work free of synchronisation.

// A load generator, not a service: an impossible state may abort the run.
#![allow(clippy::unwrap_used)]

mod common;
mod connect;
mod fanout;
mod idle;
mod nats;
mod procstat;
mod publish;
mod recover;
mod recv;
mod report;
mod send;
mod ws;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "switchboard-bench", about = "Switchboard's load generator")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// N idle connections: server RSS per connection.
    Idle(idle::Args),
    /// One topic, N subscribers, paced publishing: delivered/s, loss, latency.
    Fanout(fanout::Args),
    /// `fanout` with subscribers spread over several edges.
    ClusterFanout(fanout::Args),
    /// Targeted sends to users on several edges through a coordinator: latency.
    Send(send::Args),
    /// JWT handshakes per second and time to `session`.
    Connect(connect::Args),
    /// N clients of a history topic come back at once, each M behind: time to recover.
    Recover(recover::Args),
    /// Turns the JSON lines of a run into the README's tables.
    Report(report::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Scenario::Report(a) = cli.scenario {
        return report::run(&a);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        match cli.scenario {
            Scenario::Idle(a) => idle::run(a).await,
            Scenario::Fanout(a) => fanout::run("fanout", a).await,
            Scenario::ClusterFanout(a) => fanout::run("cluster-fanout", a).await,
            Scenario::Send(a) => send::run(a).await,
            Scenario::Connect(a) => connect::run(a).await,
            Scenario::Recover(a) => recover::run(a).await,
            Scenario::Report(_) => unreachable!("handled above"),
        }
    })
}
