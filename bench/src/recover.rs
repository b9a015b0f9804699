//! `recover`: N clients subscribed to one history topic go away, M publications are made,
//! and all N come back at once, each subscribing with its position: how long until each has
//! recovered all M (from the first reconnect's start), as a distribution.

use std::time::Duration;

use anyhow::{Context as _, bail};
use memchr::memmem;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

use crate::common::emit;
use crate::procstat::{self, Watch};
use crate::recv::{self, Flavor, new_histogram};
use crate::ws::{self, WsUrl};

/// The history topic the scenario uses (the server's config keeps its history).
const TOPIC: &str = "bench/history/recover";
/// Handshakes in flight while the clients first subscribe.
const SETUP_PARALLEL: usize = 128;
/// How long one client may take to recover.
const RECOVER_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The route clients connect to (ws://host:port/path), on a node whose config keeps the
    /// history of `bench/history/#`.
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Publications made while the clients are away.
    #[arg(long, default_value_t = 100)]
    behind: usize,
    /// Server processes to watch (CPU, RSS).
    #[arg(long)]
    server_pid: Vec<String>,
    #[arg(long, default_value = "")]
    tag: String,
    /// The name of the server in the output.
    #[arg(long, default_value = "switchboard")]
    label: String,
}

/// A client's position: `(epoch, offset)` from its `subscribed` answer.
type Position = (String, u64);

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let url = WsUrl::parse(&a.url)?;
    let positions = recv::open_many(a.clients, SETUP_PARALLEL, |i| {
        let url = recv::client_url(&url, Flavor::Switchboard, &format!("r{i}"));
        async move { subscribed(&url).await }
    })
    .await?;
    publish(
        &recv::client_url(&url, Flavor::Switchboard, "publisher"),
        a.behind,
    )
    .await?;

    let clock = tokio::time::Instant::now();
    let watch = Watch::start(&a.server_pid);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, pos) in positions.into_iter().enumerate() {
        let url = recv::client_url(&url, Flavor::Switchboard, &format!("r{i}"));
        let behind = a.behind;
        tasks.spawn_local(async move { recover(&url, pos, behind, clock).await });
    }
    let mut hist = new_histogram();
    let (mut recovered, mut failed, mut errors) = (0u64, 0u64, Vec::new());
    while let Some(r) = tasks.join_next().await {
        match r? {
            Ok(took) => {
                recovered += 1;
                hist.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX))?;
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 3 {
                    errors.push(format!("{e:#}"));
                }
            }
        }
    }
    let all = clock.elapsed();
    let ms = |us: u64| us as f64 / 1000.0;
    emit(&json!({
        "scenario": "recover",
        "tag": a.tag,
        "target": a.label,
        "clients": a.clients,
        "behind": a.behind,
        "recovered": recovered,
        "failed": failed,
        "errors": errors,
        "all_recovered_ms": procstat::round1(all.as_secs_f64() * 1000.0),
        "recover_ms": {
            "p50": ms(hist.value_at_quantile(0.5)),
            "p90": ms(hist.value_at_quantile(0.9)),
            "p99": ms(hist.value_at_quantile(0.99)),
            "max": ms(hist.max()),
        },
        "usage": watch.finish(),
    }));
    Ok(())
}

/// Subscribes to the topic and returns the position the `subscribed` answer gives; the
/// connection then closes.
async fn subscribed(url: &WsUrl) -> anyhow::Result<Position> {
    let mut c = recv::open(url, Flavor::Switchboard).await?;
    let sub = json!({"type": "subscribe", "topic": TOPIC}).to_string();
    c.stream.write_all(&ws::text(&sub)).await?;
    let mut answer = None;
    ws::read_until(&mut c.stream, c.pending, recv::SETUP_TIMEOUT, |p| {
        let done = memmem::find(p, b"\"subscribed\"").is_some();
        if done {
            answer = serde_json::from_slice::<Value>(p).ok();
        }
        done || memmem::find(p, b"\"error\"").is_some()
    })
    .await?;
    let a = answer.context("subscribe refused")?;
    let epoch = a["epoch"]
        .as_str()
        .context("no epoch: does the topic keep history?")?;
    Ok((epoch.to_owned(), a["offset"].as_u64().unwrap_or(0)))
}

/// Publishes `n` messages on the topic, each confirmed before the next.
async fn publish(url: &WsUrl, n: usize) -> anyhow::Result<()> {
    let mut c = recv::open(url, Flavor::Switchboard).await?;
    let mut pending = std::mem::take(&mut c.pending);
    for i in 0..n {
        let f = json!({"type": "publish", "topic": TOPIC, "payload": {"i": i}, "id": i});
        c.stream.write_all(&ws::text(&f.to_string())).await?;
        let mut refused = None;
        pending = ws::read_until(&mut c.stream, pending, recv::SETUP_TIMEOUT, |p| {
            if memmem::find(p, b"\"error\"").is_some() {
                refused = Some(String::from_utf8_lossy(p).into_owned());
            }
            memmem::find(p, b"\"published\"").is_some() || refused.is_some()
        })
        .await?;
        if let Some(e) = refused {
            bail!("publish refused: {e}");
        }
    }
    Ok(())
}

/// Reconnects, subscribes from `pos` and waits for `behind` recovered messages; the time
/// from `clock` until the last arrived.
async fn recover(
    url: &WsUrl,
    pos: Position,
    behind: usize,
    clock: tokio::time::Instant,
) -> anyhow::Result<Duration> {
    let mut c = recv::open(url, Flavor::Switchboard).await?;
    let since = json!({"offset": pos.1, "epoch": pos.0});
    let sub = json!({"type": "subscribe", "topic": TOPIC, "since": since}).to_string();
    c.stream.write_all(&ws::text(&sub)).await?;
    let (mut got, mut recovered) = (0usize, None);
    ws::read_until(&mut c.stream, c.pending, RECOVER_LIMIT, |p| {
        if memmem::find(p, b"\"subscribed\"").is_some() {
            recovered = Some(memmem::find(p, b"\"recovered\":true").is_some());
        } else if memmem::find(p, b"\"message\"").is_some() {
            got += 1;
        }
        got == behind || recovered == Some(false)
    })
    .await?;
    if recovered != Some(true) {
        bail!("not recovered");
    }
    Ok(clock.elapsed())
}
