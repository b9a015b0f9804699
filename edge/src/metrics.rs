//! The edge's Prometheus metrics, rendered as text on `/metrics`.
//!
//! **Invariant:** no label carries a per-connection, per-user or per-topic value.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::registry::Tally;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counts by a label drawn from a small fixed set (refusal reasons, close codes).
#[derive(Debug, Default)]
pub struct LabeledCounter(Mutex<BTreeMap<String, u64>>);

impl LabeledCounter {
    pub fn inc(&self, label: &str) {
        let mut m = self.0.lock().expect("metric poisoned");
        *m.entry(label.to_owned()).or_default() += 1;
    }

    pub fn get(&self, label: &str) -> u64 {
        self.0
            .lock()
            .expect("metric poisoned")
            .get(label)
            .copied()
            .unwrap_or(0)
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub upgrades: Counter,
    pub upgrades_refused: LabeledCounter,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub messages_delivered: Counter,
    pub messages_dropped: Counter,
    pub closes: LabeledCounter,
    pub events_ignored: Counter,
}

/// Live gauges sampled at render time.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    pub connections: usize,
    pub topics: usize,
    pub buffered_bytes: u64,
    pub bus_connected: bool,
    pub bus_reconnects: u64,
    pub draining: bool,
}

impl Metrics {
    pub(crate) fn record_fanout(&self, t: Tally) {
        self.messages_delivered.add(t.delivered);
        if t.refused > 0 {
            self.messages_dropped.add(t.refused);
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::with_capacity(2048);
        gauge(
            &mut out,
            "edge_connections",
            "Open client WebSocket connections.",
            g.connections as u64,
        );
        gauge(
            &mut out,
            "edge_topics_active",
            "Topic filters with at least one local subscriber.",
            g.topics as u64,
        );
        gauge(
            &mut out,
            "edge_outbound_buffered_bytes",
            "Bytes queued for clients, not yet written.",
            g.buffered_bytes,
        );
        gauge(
            &mut out,
            "edge_bus_connected",
            "1 when the bus connection is up.",
            u64::from(g.bus_connected),
        );
        gauge(
            &mut out,
            "edge_draining",
            "1 while the edge drains for shutdown.",
            u64::from(g.draining),
        );
        counter(
            &mut out,
            "edge_bus_reconnects_total",
            "Bus reconnections since start.",
            g.bus_reconnects,
        );
        counter(
            &mut out,
            "edge_upgrades_total",
            "WebSocket upgrades accepted.",
            self.upgrades.get(),
        );
        labeled(
            &mut out,
            "edge_upgrades_refused_total",
            "Upgrade requests refused, by reason.",
            "reason",
            &self.upgrades_refused,
        );
        counter(
            &mut out,
            "edge_frames_in_total",
            "Text frames received from clients.",
            self.frames_in.get(),
        );
        counter(
            &mut out,
            "edge_frames_out_total",
            "Frames written to clients.",
            self.frames_out.get(),
        );
        counter(
            &mut out,
            "edge_messages_delivered_total",
            "Messages queued to clients by fan-out.",
            self.messages_delivered.get(),
        );
        counter(
            &mut out,
            "edge_messages_dropped_total",
            "Messages refused because a client's outbound queue was full.",
            self.messages_dropped.get(),
        );
        counter(
            &mut out,
            "edge_events_ignored_total",
            "Client frames ignored by the dialect.",
            self.events_ignored.get(),
        );
        labeled(
            &mut out,
            "edge_closes_total",
            "Connections closed, by close code (1006: without a close frame).",
            "code",
            &self.closes,
        );
        out
    }
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = write!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
    );
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = write!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
    );
}

fn labeled(out: &mut String, name: &str, help: &str, label: &str, c: &LabeledCounter) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n");
    for (k, v) in c.0.lock().expect("metric poisoned").iter() {
        let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {v}");
    }
}
