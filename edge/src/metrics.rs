//! The edge's Prometheus metrics, rendered as text on `/metrics`.
//!
//! **Invariant:** no label carries a per-connection, per-user or per-topic value; routes are
//! the only label besides fixed reasons and close codes.

use bus::metrics::{Counter, Histogram, LabeledCounter, Text};

/// Upper bounds of the fan-out size histogram (recipients per message).
static FANOUT_BOUNDS: [f64; 9] = [
    1.0,
    2.0,
    5.0,
    10.0,
    100.0,
    1_000.0,
    10_000.0,
    100_000.0,
    1_000_000.0,
];

#[derive(Debug)]
pub struct Metrics {
    pub upgrades: Counter,
    pub upgrades_refused: LabeledCounter,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub messages_delivered: Counter,
    pub messages_dropped: Counter,
    /// Messages not sent to a connection that had their message id already.
    pub messages_duplicate: Counter,
    /// History publications read from storage to fill a hole in a live feed.
    pub history_gaps_filled: Counter,
    /// Holes in a live feed storage could not fill (subscribers were sent `gap`).
    pub history_gaps_unfilled: Counter,
    /// Publications sent to clients that recovered them on subscribing.
    pub history_recovered: Counter,
    pub fanout: Histogram,
    pub closes: LabeledCounter,
    pub slow_consumer_closes: Counter,
    pub events_ignored: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            upgrades: Counter::default(),
            upgrades_refused: LabeledCounter::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            messages_delivered: Counter::default(),
            messages_dropped: Counter::default(),
            messages_duplicate: Counter::default(),
            history_gaps_filled: Counter::default(),
            history_gaps_unfilled: Counter::default(),
            history_recovered: Counter::default(),
            fanout: Histogram::new(&FANOUT_BOUNDS),
            closes: LabeledCounter::default(),
            slow_consumer_closes: Counter::default(),
            events_ignored: Counter::default(),
        }
    }
}

/// Live gauges sampled at render time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Open connections per route.
    pub connections: Vec<(String, u64)>,
    /// Namespaces with at least one connection, per route.
    pub namespaces: Vec<(String, u64)>,
    pub topics: usize,
    pub buffered_bytes: u64,
    pub bus_connected: bool,
    pub bus_reconnects: u64,
    pub draining: bool,
}

/// The `edge_closes_total{code}` label of a code a client closed with: the codes of RFC 6455
/// and its registry (1000–1015) keep their own, any other (4xxx included: they are the
/// application's, and a client may send each of them) is `other`, so that clients cannot grow
/// the label set.
pub(crate) fn client_close_label(code: u16) -> &'static str {
    const KNOWN: [&str; 16] = [
        "1000", "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1009", "1010",
        "1011", "1012", "1013", "1014", "1015",
    ];
    code.checked_sub(1000)
        .and_then(|i| KNOWN.get(usize::from(i)))
        .copied()
        .unwrap_or("other")
}

impl Metrics {
    /// One message's fan-out: connections that took it, and those that refused it.
    pub(crate) fn record_fanout(&self, delivered: u64, refused: u64) {
        self.messages_delivered.add(delivered);
        if refused > 0 {
            self.messages_dropped.add(refused);
        }
        #[allow(clippy::cast_precision_loss)]
        self.fanout.observe((delivered + refused) as f64);
    }

    /// Prometheus text exposition format.
    pub fn render(&self, g: &Gauges) -> String {
        let mut t = Text::default();
        t.gauges(
            "edge_connections",
            "Open client WebSocket connections, by route.",
            "route",
            &g.connections,
        )
        .gauges(
            "edge_namespaces",
            "Namespaces with open connections, by route.",
            "route",
            &g.namespaces,
        )
        .gauge(
            "edge_topics_active",
            "Topic filters with at least one local subscriber.",
            g.topics as u64,
        )
        .gauge(
            "edge_outbound_buffered_bytes",
            "Bytes queued for clients, not yet written.",
            g.buffered_bytes,
        )
        .gauge(
            "edge_bus_connected",
            "1 when the bus connection is up.",
            u64::from(g.bus_connected),
        )
        .gauge(
            "edge_draining",
            "1 while the edge drains for shutdown.",
            u64::from(g.draining),
        )
        .counter(
            "edge_bus_reconnects_total",
            "Bus reconnections since start.",
            g.bus_reconnects,
        )
        .counter(
            "edge_upgrades_total",
            "WebSocket upgrades accepted.",
            self.upgrades.get(),
        )
        .labeled(
            "edge_upgrades_refused_total",
            "Upgrade requests refused, by reason.",
            "reason",
            &self.upgrades_refused,
        )
        .counter(
            "edge_frames_in_total",
            "Text frames received from clients.",
            self.frames_in.get(),
        )
        .counter(
            "edge_frames_out_total",
            "Frames written to clients.",
            self.frames_out.get(),
        )
        .counter(
            "edge_bytes_in_total",
            "Payload bytes received from clients.",
            self.bytes_in.get(),
        )
        .counter(
            "edge_bytes_out_total",
            "Payload bytes written to clients.",
            self.bytes_out.get(),
        )
        .counter(
            "edge_messages_delivered_total",
            "Messages queued to clients by fan-out.",
            self.messages_delivered.get(),
        )
        .counter(
            "edge_messages_dropped_total",
            "Messages refused because a client's outbound queue was full.",
            self.messages_dropped.get(),
        )
        .counter(
            "edge_messages_duplicate_total",
            "Messages not sent again to a connection that had their message_id already.",
            self.messages_duplicate.get(),
        )
        .counter(
            "edge_history_gap_filled_total",
            "History publications read from storage to fill a hole in a live feed.",
            self.history_gaps_filled.get(),
        )
        .counter(
            "edge_history_gap_unfilled_total",
            "Holes in a live history feed storage could not fill (subscribers were sent gap).",
            self.history_gaps_unfilled.get(),
        )
        .counter(
            "edge_history_recovered_total",
            "Stored publications sent to clients that recovered them on subscribing.",
            self.history_recovered.get(),
        )
        .histogram(
            "edge_fanout_size",
            "Connections one message was handed to on this edge.",
            &self.fanout,
        )
        .counter(
            "edge_slow_consumer_closes_total",
            "Connections closed as slow consumers (1013).",
            self.slow_consumer_closes.get(),
        )
        .labeled(
            "edge_closes_total",
            "Connections closed, by close code (1006: without a close frame).",
            "code",
            &self.closes,
        )
        .counter(
            "edge_events_ignored_total",
            "Client frames ignored by the dialect.",
            self.events_ignored.get(),
        )
        .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_close_codes_have_a_bounded_label_set() {
        for code in 1000..=1015 {
            assert_eq!(client_close_label(code), code.to_string());
        }
        for code in [0, 999, 1016, 2999, 3000, 4000, 4001, 4321, 4999, u16::MAX] {
            assert_eq!(client_close_label(code), "other", "{code}");
        }
    }
}
