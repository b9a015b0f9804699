//! What every scenario shares: its flags, the measuring window, and the one JSON line it
//! prints.

use std::io::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::recv::{Clock, Flavor, Sink, Tally};

/// The environment variable holding the API key gRPC calls carry (`scripts/bench` sets it).
pub(crate) const API_KEY_ENV: &str = "SWITCHBOARD_API_KEY";

/// A gRPC channel whose calls carry the API key from [`API_KEY_ENV`], if set.
pub(crate) type Grpc =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ApiKey>;

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Debug, Clone)]
pub(crate) struct ApiKey(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for ApiKey {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// `channel` with the key from the environment on every call.
pub(crate) fn with_api_key(channel: tonic::transport::Channel) -> Grpc {
    let key = std::env::var(API_KEY_ENV)
        .ok()
        .and_then(|k| format!("Bearer {k}").parse().ok());
    tonic::service::interceptor::InterceptedService::new(channel, ApiKey(key))
}

/// Poll interval while waiting for the last deliveries of a window.
const DRAIN_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Common {
    /// The server the clients talk to.
    #[arg(long, value_enum, default_value = "switchboard")]
    pub(crate) flavor: Flavor,
    /// The name of the server in the output (default: the flavor's).
    #[arg(long)]
    pub(crate) label: Option<String>,
    /// Server processes to watch (CPU, RSS); repeat for a cluster.
    #[arg(long)]
    pub(crate) server_pid: Vec<String>,
    /// Seconds measured per step.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) warmup: f64,
    /// Seconds allowed after a step for its last deliveries; what has not arrived is lost.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) drain_s: f64,
    /// A free-form tag copied into the output (e.g. `ramp`, `bar`).
    #[arg(long, default_value = "")]
    pub(crate) tag: String,
    /// Payload bytes of each message.
    #[arg(long, default_value_t = 100)]
    pub(crate) payload: usize,
    /// Payloads are realistic JSON (an array of records: field names repeat, values vary)
    /// rather than a timestamp and padding.
    #[arg(long)]
    pub(crate) json_body: bool,
    /// Offer permessage-deflate on upgrade and inflate compressed deliveries.
    #[arg(long)]
    pub(crate) compress: bool,
    /// Publish payloads as bytes (gRPC `payload_binary`): deliveries are binary frames.
    #[arg(long)]
    pub(crate) binary: bool,
}

impl Common {
    /// Makes the process-wide choices of these flags (the load runtime is one thread).
    pub(crate) fn apply(&self) {
        crate::ws::COMPRESS.store(self.compress, std::sync::atomic::Ordering::Relaxed);
        crate::recv::JSON_BODY.store(self.json_body, std::sync::atomic::Ordering::Relaxed);
        crate::publish::BINARY.store(self.binary, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn target(&self) -> String {
        self.label
            .clone()
            .unwrap_or_else(|| self.flavor.name().to_owned())
    }

    pub(crate) fn drain(&self) -> Duration {
        Duration::from_secs_f64(self.drain_s)
    }
}

/// A measuring window on the bench clock: messages stamped in `[from, until)` count.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    pub(crate) clock: Clock,
    pub(crate) from: u64,
    pub(crate) until: u64,
}

impl Window {
    /// Starts after the warm-up, lasts the duration.
    pub(crate) fn next(clock: Clock, c: &Common) -> Self {
        let from = clock.now_ns() + (c.warmup * 1e9) as u64;
        Self {
            clock,
            from,
            until: from + (c.duration * 1e9) as u64,
        }
    }

    /// Waits (bounded by `max` after the window's end) until `expected` deliveries arrived.
    pub(crate) async fn drain(&self, sink: &Sink, expected: u64, max: Duration) {
        let deadline = self.clock.at(self.until) + max;
        while sink.received() < expected && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Deliveries per second: received over the time between the first and the last
    /// delivery (at least the window's length). A constant latency does not lower it; a
    /// backlog that builds up during the window does, as the last deliveries come late.
    pub(crate) fn rate(&self, t: &Tally) -> f64 {
        let span = t
            .last_ns
            .saturating_sub(t.first_ns)
            .max(self.until.saturating_sub(self.from));
        t.received as f64 / (span as f64 / 1e9).max(1e-9)
    }
}

/// Prints one JSON line and flushes, so a script sees each step as it ends. The machine's
/// load average at that moment goes with it.
pub(crate) fn emit(line: &Value) {
    let mut line = line.clone();
    if let (Value::Object(m), Ok(l)) = (&mut line, std::fs::read_to_string("/proc/loadavg")) {
        let avg: Vec<f64> = l
            .split(' ')
            .take(3)
            .filter_map(|x| x.parse().ok())
            .collect();
        m.insert("loadavg".into(), Value::from(avg));
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
