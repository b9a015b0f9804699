//! The placement deltas this edge reports to coordinators: attach, detach, subscribe,
//! unsubscribe, in order, batched. The log is bounded: when a consumer falls too far behind,
//! the log is dropped and the next batch is the edge's whole state instead.

use std::sync::Mutex;

use proto::v1::{ConnRef, Connection, Delta, ReportBatch, TopicChange, delta};
use tokio::sync::Notify;

use crate::conn::ConnHandle;
use crate::registry::Registry;

/// Deltas held at most before falling back to a full report.
const MAX_PENDING: usize = 100_000;
/// Deltas sent in one batch at most.
const MAX_BATCH: usize = 1_000;

/// The ordered log of placement changes not yet reported.
#[derive(Debug)]
pub struct Reporter {
    log: Mutex<Log>,
    notify: Notify,
}

#[derive(Debug)]
struct Log {
    deltas: Vec<Delta>,
    /// The next batch must be the whole state.
    full: bool,
}

impl Default for Reporter {
    fn default() -> Self {
        Self {
            log: Mutex::new(Log {
                deltas: Vec::new(),
                full: true,
            }),
            notify: Notify::new(),
        }
    }
}

impl Reporter {
    pub(crate) fn push(&self, kind: delta::Kind) {
        let mut log = self.log.lock().expect("report log poisoned");
        if !log.full {
            if log.deltas.len() >= MAX_PENDING {
                log.deltas = Vec::new();
                log.full = true;
            } else {
                log.deltas.push(Delta { kind: Some(kind) });
            }
        }
        drop(log);
        self.notify.notify_one();
    }

    /// Makes the next batch a full report (a new coordinator stream starts with one).
    pub fn resync(&self) {
        let mut log = self.log.lock().expect("report log poisoned");
        log.full = true;
        log.deltas = Vec::new();
        drop(log);
        self.notify.notify_one();
    }

    /// Waits for changes and returns the next batch.
    pub(crate) async fn next_batch(
        &self,
        registry: &Registry,
        node_id: &str,
        address: &str,
    ) -> ReportBatch {
        loop {
            let notified = self.notify.notified();
            if let Some(batch) = self.take(registry, node_id, address) {
                return batch;
            }
            notified.await;
        }
    }

    fn take(&self, registry: &Registry, node_id: &str, address: &str) -> Option<ReportBatch> {
        let full = self.log.lock().expect("report log poisoned").full;
        let batch = |deltas, full| ReportBatch {
            node_id: node_id.to_owned(),
            address: address.to_owned(),
            full,
            deltas,
            ..ReportBatch::default()
        };

        if full {
            // The snapshot and the switch back to deltas happen under the registry lock, so
            // every change is either in the snapshot or logged after it.
            let snap = registry.snapshot(|| {
                let mut log = self.log.lock().expect("report log poisoned");
                log.full = false;
                log.deltas.clear();
            });
            let attach = snap.conns.iter().map(|h| {
                let t = snap.by_conn.get(&h.id()).map_or(&[][..], Vec::as_slice);
                delta::Kind::Attach(connection(h, node_id, t))
            });
            let topics = snap.active.into_iter().map(|(namespace, topic)| {
                delta::Kind::NodeTopic(proto::v1::NodeTopic {
                    namespace,
                    topic,
                    active: true,
                })
            });
            let deltas = attach
                .chain(topics)
                .map(|k| Delta { kind: Some(k) })
                .collect();
            return Some(batch(deltas, true));
        }
        let mut log = self.log.lock().expect("report log poisoned");
        if log.deltas.is_empty() {
            return None;
        }
        let n = log.deltas.len().min(MAX_BATCH);
        let deltas: Vec<Delta> = log.deltas.drain(..n).collect();
        let more = !log.deltas.is_empty();
        drop(log);
        if more {
            self.notify.notify_one();
        }
        Some(batch(deltas, false))
    }
}

pub(crate) fn connection(h: &ConnHandle, node_id: &str, topics: &[String]) -> Connection {
    let info = h.info();
    Connection {
        conn_id: info.id.to_string(),
        node_id: node_id.to_owned(),
        namespace: info.namespace.clone(),
        user: info.user.clone(),
        remote_addr: info.remote.to_string(),
        connected_at_ms: info.connected_at_ms,
        route: info.route.cfg.path.clone(),
        context: Some(proto::json::to_struct(&info.claims)),
        topics: topics.to_vec(),
        buffered_bytes: 0,
        params: info.params.iter().cloned().collect(),
    }
}

pub(crate) fn conn_ref(h: &ConnHandle) -> ConnRef {
    let info = h.info();
    ConnRef {
        conn_id: info.id.to_string(),
        namespace: info.namespace.clone(),
        user: info.user.clone(),
    }
}

pub(crate) fn topic_change(h: &ConnHandle, topic: &str) -> TopicChange {
    let info = h.info();
    TopicChange {
        conn_id: info.id.to_string(),
        namespace: info.namespace.clone(),
        user: info.user.clone(),
        topic: topic.to_owned(),
    }
}
