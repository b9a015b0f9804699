//! `fanout` and `cluster-fanout`: N subscribers of one topic (spread over the given URLs),
//! one publisher at a paced rate; for each offered rate, delivered/s, loss and latency.

use std::rc::Rc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Common, Window, emit};
use crate::procstat::{self, Watch};
use crate::publish::{Mode, Publisher};
use crate::recv::{self, Sink};
use crate::ws::WsUrl;

/// Handshakes in flight while connecting subscribers.
const CONNECT_PARALLEL: usize = 128;
/// How long a step waits for the servers to finish the previous step's backlog.
const SETTLE_MAX: Duration = Duration::from_secs(15);

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Subscriber URLs; subscribers are spread over them round robin.
    #[arg(long = "url", required = true)]
    pub(crate) urls: Vec<String>,
    /// Where to publish (ws://, grpc:// or nats://).
    #[arg(long)]
    pub(crate) publish: String,
    #[arg(long, default_value_t = 2000)]
    pub(crate) subscribers: usize,
    /// Offered deliveries per second (messages/s × subscribers); a list runs one step each,
    /// in order, on the same connections.
    #[arg(long, value_delimiter = ',', default_value = "1000000")]
    pub(crate) rates: Vec<u64>,
    /// Stop at the first step that does not sustain its rate.
    #[arg(long)]
    pub(crate) stop_on_fail: bool,
    /// A step sustains its rate when nothing is lost, nobody is closed, at least this
    /// fraction of the offered rate is delivered (received over the span from the first to
    /// the last delivery, so latency jitter costs a little) and p99 stays under --max-p99-ms
    /// (a backlog that grows through a step shows up as a p99 of seconds).
    #[arg(long, default_value_t = 0.95)]
    pub(crate) min_fraction: f64,
    #[arg(long, default_value_t = 1000.0)]
    pub(crate) max_p99_ms: f64,
}

pub(crate) async fn run(scenario: &str, a: Args) -> anyhow::Result<()> {
    let c = &a.common;
    c.apply();
    let clock = recv::Clock::new();
    let sink = Rc::new(Sink::new(clock));
    let urls: Vec<WsUrl> = a
        .urls
        .iter()
        .map(|u| WsUrl::parse(u))
        .collect::<anyhow::Result<_>>()?;
    let t0 = tokio::time::Instant::now();
    let conns = recv::open_many(a.subscribers, CONNECT_PARALLEL, |i| {
        let url = recv::client_url(&urls[i % urls.len()], c.flavor, &format!("s{i}"));
        let flavor = c.flavor;
        async move { recv::subscribe(&url, flavor).await }
    })
    .await?;
    let setup_s = t0.elapsed().as_secs_f64();
    for conn in conns {
        tokio::task::spawn_local(recv::receive(conn, c.flavor, Rc::clone(&sink)));
    }
    let mut publisher = Publisher::connect(&a.publish, c.flavor, Mode::Topic, c.payload).await?;
    for &rate in &a.rates {
        let settled = procstat::settle(&c.server_pid, SETTLE_MAX).await;
        let msg_rate = rate as f64 / a.subscribers as f64;
        let w = Window::next(clock, c);
        sink.window(w.from, w.until);
        let watch_at = clock.at(w.from);
        let pids = c.server_pid.clone();
        let watch = tokio::task::spawn_local(async move {
            tokio::time::sleep_until(watch_at).await;
            Watch::start(&pids)
        });
        let published = publisher
            .paced(clock, msg_rate, w.from, w.until, |_| String::new())
            .await?;
        let usage = watch.await?.finish();
        let expected = published.measured * a.subscribers as u64;
        w.drain(&sink, expected, c.drain()).await;
        let t = sink.tally();
        let lost = expected.saturating_sub(t.received);
        let delivered_s = w.rate(&t);
        let p99_ms = t.hist.value_at_quantile(0.99) as f64 / 1000.0;
        let closed: u64 = t.closes.values().sum();
        let wire_per_delivery = t.wire_bytes as f64 / t.received.max(1) as f64;
        let sustained = lost == 0
            && closed == 0
            && publisher.errors() == 0
            && delivered_s >= a.min_fraction * rate as f64
            && p99_ms <= a.max_p99_ms;
        let line = json!({
            "scenario": scenario,
            "tag": c.tag,
            "target": c.target(),
            "subscribers": a.subscribers,
            "endpoints": urls.len(),
            "payload_bytes": c.payload,
            "json_body": c.json_body,
            "compress": c.compress,
            "binary": c.binary,
            "wire_bytes_per_delivery": wire_per_delivery.round(),
            "offered_per_s": rate,
            "publish_via": publisher.via(),
            "published": published.measured,
            "expected": expected,
            "received": t.received,
            "lost": lost,
            "outside_window": t.outside,
            "other_frames": t.other,
            "delivered_per_s": delivered_s.round(),
            "sustained": sustained,
            "latency_ms": latency(&t.hist),
            "closed": closes(&t.closes),
            "publish_errors": publisher.errors(),
            "setup_s": procstat::round1(setup_s),
            "server_idle_before": settled,
            "duration_s": c.duration,
            "usage": usage,
        });
        emit(&line);
        if a.stop_on_fail && !sustained {
            break;
        }
    }
    Ok(())
}

/// p50, p99, p99.9 and max in milliseconds.
pub(crate) fn latency(h: &hdrhistogram::Histogram<u64>) -> Value {
    let ms = |us: u64| (us as f64) / 1000.0;
    json!({
        "count": h.len(),
        "p50": ms(h.value_at_quantile(0.5)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

pub(crate) fn closes(c: &std::collections::BTreeMap<u16, u64>) -> Value {
    Value::Object(
        c.iter()
            .map(|(code, n)| (code.to_string(), json!(n)))
            .collect(),
    )
}
