//! The placement deltas an edge owes the coordinators: attach, detach, subscribe,
//! unsubscribe and node-level topic activations, in the order they happened, taken in
//! batches. The log is bounded: when the reader falls [`MAX_PENDING`] deltas behind, the
//! log is dropped and the next batch is the edge's whole state instead.
//!
//! The log does not know the state it reports; [`Log::next`] asks its owner for a full
//! report through a closure and switches back to deltas in the same call. The owner
//! ([`crate::index::Index`]) holds both, so a full report and the switch are one step
//! under `&mut`: every change is either in the full report or logged after it.

use std::collections::VecDeque;

use proto::v1::{Delta, ReportBatch, delta};

/// Deltas held at most before falling back to a full report.
pub const MAX_PENDING: usize = 100_000;
/// Deltas in one batch at most (a full report is one batch, whatever its size).
pub const MAX_BATCH: usize = 1_000;

/// The ordered log of changes not yet reported.
#[derive(Debug)]
pub struct Log {
    deltas: VecDeque<Delta>,
    /// The next batch must be the whole state.
    full: bool,
    max_pending: usize,
    max_batch: usize,
}

/// What [`Log::next`] hands out.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The deltas are the whole state: the reader forgets what it had.
    pub full: bool,
    pub deltas: Vec<Delta>,
    /// More deltas wait: the reader takes the next batch without waiting for a change.
    pub more: bool,
}

impl Batch {
    /// The batch on the wire, from node `node_id` whose clients connect at `address`.
    pub fn into_report(self, node_id: &str, address: &str) -> ReportBatch {
        ReportBatch {
            node_id: node_id.to_owned(),
            address: address.to_owned(),
            full: self.full,
            deltas: self.deltas,
            ..ReportBatch::default()
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Self::with_limits(MAX_PENDING, MAX_BATCH)
    }
}

impl Log {
    /// A log that starts with a full report (a reader knows nothing yet).
    pub fn with_limits(max_pending: usize, max_batch: usize) -> Self {
        Self {
            deltas: VecDeque::new(),
            full: true,
            max_pending,
            max_batch: max_batch.max(1),
        }
    }

    /// Appends a change. Nothing is kept while a full report is due: it will say it all.
    pub fn push(&mut self, kind: delta::Kind) {
        self.push_with(|| kind);
    }

    /// Appends the change `make` builds, building it only if it is to be kept.
    pub fn push_with(&mut self, make: impl FnOnce() -> delta::Kind) {
        if self.full {
            return;
        }
        if self.deltas.len() >= self.max_pending {
            self.resync();
            return;
        }
        self.deltas.push_back(Delta { kind: Some(make()) });
    }

    /// Makes the next batch a full report (a new coordinator stream starts with one).
    pub fn resync(&mut self) {
        self.full = true;
        self.deltas = VecDeque::new();
    }

    /// Whether the next batch is a full report.
    pub fn wants_full(&self) -> bool {
        self.full
    }

    /// Deltas waiting.
    pub fn pending(&self) -> usize {
        self.deltas.len()
    }

    /// The next batch, or `None` when there is nothing to report. When a full report is
    /// due, `whole_state` builds it and the log restarts empty, in deltas mode.
    pub fn next(&mut self, whole_state: impl FnOnce() -> Vec<Delta>) -> Option<Batch> {
        if self.full {
            self.full = false;
            self.deltas.clear();
            return Some(Batch {
                full: true,
                deltas: whole_state(),
                more: false,
            });
        }
        if self.deltas.is_empty() {
            return None;
        }
        let n = self.deltas.len().min(self.max_batch);
        let deltas = self.deltas.drain(..n).collect();
        Some(Batch {
            full: false,
            deltas,
            more: !self.deltas.is_empty(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::ConnRef;

    fn detach(id: &str) -> delta::Kind {
        delta::Kind::Detach(ConnRef {
            conn_id: id.to_owned(),
            ..ConnRef::default()
        })
    }

    fn ids(b: &Batch) -> Vec<String> {
        b.deltas
            .iter()
            .map(|d| match &d.kind {
                Some(delta::Kind::Detach(r)) => r.conn_id.clone(),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn state() -> Vec<Delta> {
        vec![Delta {
            kind: Some(detach("state")),
        }]
    }

    #[test]
    fn starts_with_a_full_report_then_deltas_in_order() {
        let mut log = Log::default();
        log.push(detach("before"));
        let first = log.next(state).unwrap();
        assert!(first.full);
        assert_eq!(ids(&first), ["state"]);
        assert!(log.next(|| panic!("no full report due")).is_none());
        log.push(detach("a"));
        log.push(detach("b"));
        let b = log.next(|| panic!("no full report due")).unwrap();
        assert!(!b.full && !b.more);
        assert_eq!(ids(&b), ["a", "b"]);
        assert!(log.next(|| panic!("no full report due")).is_none());
    }

    #[test]
    fn batches_are_bounded_and_say_when_more_wait() {
        let mut log = Log::with_limits(100, 2);
        log.next(Vec::new).unwrap();
        for id in ["a", "b", "c", "d", "e"] {
            log.push(detach(id));
        }
        let mut seen = Vec::new();
        let mut mores = Vec::new();
        while let Some(b) = log.next(|| panic!("no full report due")) {
            assert!(b.deltas.len() <= 2);
            mores.push(b.more);
            seen.extend(ids(&b));
        }
        assert_eq!(seen, ["a", "b", "c", "d", "e"]);
        assert_eq!(mores, [true, true, false]);
    }

    #[test]
    fn overflow_and_resync_fall_back_to_a_full_report() {
        let mut log = Log::with_limits(3, 10);
        log.next(Vec::new).unwrap();
        for id in ["a", "b", "c"] {
            log.push(detach(id));
        }
        assert!(!log.wants_full());
        log.push(detach("d"));
        assert!(log.wants_full());
        assert_eq!(log.pending(), 0);
        log.push(detach("ignored"));
        let b = log.next(state).unwrap();
        assert!(b.full);
        assert_eq!(ids(&b), ["state"]);

        log.push(detach("x"));
        log.resync();
        let b = log.next(state).unwrap();
        assert!(b.full);
        assert_eq!(ids(&b), ["state"]);
    }

    #[test]
    fn a_batch_goes_on_the_wire_with_the_node() {
        let b = Batch {
            full: true,
            deltas: state(),
            more: false,
        };
        let wire = b.into_report("edge-1", "10.0.0.1:8080");
        assert_eq!(wire.node_id, "edge-1");
        assert_eq!(wire.address, "10.0.0.1:8080");
        assert!(wire.full && !wire.draining && !wire.leaving);
        assert_eq!(wire.deltas.len(), 1);
    }
}
