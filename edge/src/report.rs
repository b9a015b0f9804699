//! The wake-up of the report log. The log itself, ordered and bounded with its full-report
//! fallback, is pure ([`edge_core::report`]) and lives inside the index
//! ([`edge_core::index`]), which appends a delta for every change and builds a full report
//! in the same step that switches the log back to deltas. This file only lets a reader (the
//! uplink, or the embedded coordinator) wait for the next batch.

use proto::v1::ReportBatch;
use tokio::sync::Notify;

use crate::registry::Registry;

/// Wakes the reader of the report log when the index changed.
#[derive(Debug, Default)]
pub(crate) struct Reporter {
    notify: Notify,
}

impl Reporter {
    /// Something may have been logged (or a full report is due): the reader looks.
    pub(crate) fn wake(&self) {
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
            if let Some(batch) = registry.next_report() {
                if batch.more {
                    self.notify.notify_one();
                }
                return batch.into_report(node_id, address);
            }
            notified.await;
        }
    }
}
