//! `send`: users spread over several edges, targeted sends through a coordinator (gRPC
//! `Messaging/Send`, or the NATS send subject) at a paced rate; publish→receive latency.

use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use proto::v1::LocateRequest;
use proto::v1::placement_client::PlacementClient;
use serde_json::json;

use crate::common::{Common, Window, emit};
use crate::fanout::{closes, latency};
use crate::procstat::Watch;
use crate::publish::{Mode, NAMESPACE, Publisher};
use crate::recv::{self, Flavor, Sink};
use crate::ws::WsUrl;

/// Handshakes in flight while connecting.
const CONNECT_PARALLEL: usize = 64;
/// How long the coordinators may take to learn where every user is.
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Edge URLs (anonymous route); users are spread over them round robin.
    #[arg(long = "url", required = true)]
    pub(crate) urls: Vec<String>,
    /// grpc://host:port (Messaging/Send) or nats://host:port (the send subject).
    #[arg(long)]
    pub(crate) publish: String,
    /// A coordinator (grpc://host:port), asked where users are before sending.
    #[arg(long)]
    pub(crate) grpc: String,
    #[arg(long, default_value_t = 300)]
    pub(crate) users: usize,
    /// Sends per second.
    #[arg(long, default_value_t = 1000)]
    pub(crate) rate: u64,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let c = &a.common;
    let clock = recv::Clock::new();
    let sink = Rc::new(Sink::new(clock));
    let urls: Vec<WsUrl> = a
        .urls
        .iter()
        .map(|u| WsUrl::parse(u))
        .collect::<anyhow::Result<_>>()?;
    let conns = recv::open_many(a.users, CONNECT_PARALLEL, |i| {
        let url = urls[i % urls.len()].with_param("user", &format!("u{i}"));
        async move { recv::open(&url, Flavor::Switchboard).await }
    })
    .await?;
    for conn in conns {
        tokio::task::spawn_local(recv::receive(conn, Flavor::Switchboard, Rc::clone(&sink)));
    }
    wait_placement(&a.grpc, a.users).await?;
    let mut publisher =
        Publisher::connect(&a.publish, Flavor::Switchboard, Mode::User, c.payload).await?;
    let w = Window::next(clock, c);
    sink.window(w.from, w.until);
    let (pids, at) = (c.server_pid.clone(), clock.at(w.from));
    let watch = tokio::task::spawn_local(async move {
        tokio::time::sleep_until(at).await;
        Watch::start(&pids)
    });
    let users = a.users as u64;
    let published = publisher
        .paced(clock, a.rate as f64, w.from, w.until, |i| {
            format!("u{}", i % users)
        })
        .await?;
    let usage = watch.await?.finish();
    w.drain(&sink, published.measured, c.drain()).await;
    let t = sink.tally();
    emit(&json!({
        "scenario": "send",
        "tag": c.tag,
        "target": c.target(),
        "users": a.users,
        "edges": urls.len(),
        "offered_per_s": a.rate,
        "publish_via": publisher.via(),
        "published": published.measured,
        "received": t.received,
        "lost": published.measured.saturating_sub(t.received),
        "delivered_per_s": w.rate(&t).round(),
        "latency_ms": latency(&t.hist),
        "closed": closes(&t.closes),
        "publish_errors": publisher.errors(),
        "duration_s": c.duration,
        "usage": usage,
    }));
    Ok(())
}

/// Waits until the coordinator locates every user (the edges report asynchronously).
async fn wait_placement(grpc: &str, users: usize) -> anyhow::Result<()> {
    let addr = grpc
        .strip_prefix("grpc://")
        .context("--grpc takes grpc://host:port")?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = PlacementClient::new(crate::common::with_api_key(channel));
    let deadline = tokio::time::Instant::now() + PLACEMENT_TIMEOUT;
    let mut next = 0;
    while next < users {
        let req = LocateRequest {
            namespace: NAMESPACE.into(),
            user: format!("u{next}"),
        };
        let found = client
            .locate(req)
            .await
            .map(|r| !r.into_inner().connections.is_empty())
            .unwrap_or(false);
        if found {
            next += 1;
            continue;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the coordinator does not locate user u{next} after {PLACEMENT_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
