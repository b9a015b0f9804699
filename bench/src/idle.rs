//! `idle`: N connections that do nothing; the server's RSS per connection.

use std::rc::Rc;
use std::time::Duration;

use serde_json::json;

use crate::common::{Common, emit};
use crate::fanout::closes;
use crate::procstat;
use crate::recv::{self, Sink};
use crate::ws::WsUrl;

/// Handshakes in flight while connecting.
const CONNECT_PARALLEL: usize = 128;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) common: Common,
    #[arg(long)]
    pub(crate) url: String,
    #[arg(long, default_value_t = 10_000)]
    pub(crate) conns: usize,
    /// Seconds to wait after the last handshake before reading RSS.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) settle_s: f64,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let c = &a.common;
    c.apply();
    let url = WsUrl::parse(&a.url)?;
    let rss = |pids: &[String]| -> u64 { pids.iter().filter_map(|p| procstat::rss_kib(p)).sum() };
    let before = rss(&c.server_pid);
    let t0 = tokio::time::Instant::now();
    let conns = recv::open_many(a.conns, CONNECT_PARALLEL, |i| {
        let url = recv::client_url(&url, c.flavor, &format!("i{i}"));
        let flavor = c.flavor;
        async move { recv::open(&url, flavor).await }
    })
    .await?;
    let connect_s = t0.elapsed().as_secs_f64();
    let sink = Rc::new(Sink::new(recv::Clock::new()));
    for conn in conns {
        tokio::task::spawn_local(recv::receive(conn, c.flavor, Rc::clone(&sink)));
    }
    tokio::time::sleep(Duration::from_secs_f64(a.settle_s)).await;
    let after = rss(&c.server_pid);
    let per_conn = after.saturating_sub(before) as f64 / a.conns as f64;
    emit(&json!({
        "scenario": "idle",
        "tag": c.tag,
        "target": c.target(),
        "connections": a.conns,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_per_conn_kib": (per_conn * 100.0).round() / 100.0,
        "connect_s": procstat::round1(connect_s),
        "closed": closes(&sink.tally().closes),
    }));
    Ok(())
}
