//! Prometheus text exposition primitives shared by the edge and the coordinator: a counter,
//! a counter by one label from a small fixed set, and a histogram with fixed buckets. Each is
//! a few atomics; rendering writes the text format `promtool check metrics` accepts.
//!
//! **Invariant:** no label value comes from a client (no per-connection, per-user or
//! per-topic labels).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Counts by one label drawn from a small fixed set (refusal reasons, close codes).
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

    fn snapshot(&self) -> Vec<(String, u64)> {
        self.0
            .lock()
            .expect("metric poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// A histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths of the unit, so it fits an integer atomic.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let micros = (v.max(0.0) * 1e6) as u64;
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// Writes metrics in the text format.
#[derive(Debug, Default)]
pub struct Text(String);

impl Text {
    pub fn gauge(&mut self, name: &str, help: &str, v: u64) -> &mut Self {
        self.head(name, help, "gauge");
        let _ = writeln!(self.0, "{name} {v}");
        self
    }

    /// A gauge by one label.
    pub fn gauges(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        values: &[(String, u64)],
    ) -> &mut Self {
        self.head(name, help, "gauge");
        for (k, v) in values {
            let _ = writeln!(self.0, "{name}{{{label}=\"{}\"}} {v}", escape(k));
        }
        self
    }

    pub fn counter(&mut self, name: &str, help: &str, v: u64) -> &mut Self {
        self.head(name, help, "counter");
        let _ = writeln!(self.0, "{name} {v}");
        self
    }

    pub fn labeled(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        c: &LabeledCounter,
    ) -> &mut Self {
        self.head(name, help, "counter");
        for (k, v) in c.snapshot() {
            let _ = writeln!(self.0, "{name}{{{label}=\"{}\"}} {v}", escape(&k));
        }
        self
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) -> &mut Self {
        self.head(name, help, "histogram");
        let mut cumulative = 0;
        for (b, n) in h.bounds.iter().zip(&h.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = h.count.load(Ordering::Relaxed);
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {count}");
        #[allow(clippy::cast_precision_loss)]
        let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(self.0, "{name}_sum {sum}\n{name}_count {count}");
        self
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.0)
    }

    fn head(&mut self, name: &str, help: &str, kind: &str) {
        let _ = write!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        static B: [f64; 3] = [1.0, 10.0, 100.0];
        let h = Histogram::new(&B);
        for v in [0.5, 5.0, 5.0, 500.0] {
            h.observe(v);
        }
        let text = Text::default().histogram("x", "help", &h).finish();
        assert!(text.contains("x_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(text.contains("x_bucket{le=\"10\"} 3\n"), "{text}");
        assert!(text.contains("x_bucket{le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("x_count 4\n"), "{text}");
    }
}
