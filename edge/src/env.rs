//! What a connection's task may use of its node, handed down explicitly: the registry (which
//! also names the node), the bus and store, the metrics, the revocations, the task tracker and
//! the request timeout. The server builds one and shares it with every connection.

use std::sync::Arc;
use std::time::Duration;

use bus::{SharedBus, SharedStore};
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::revoke::Revocations;

/// What a connection's task uses of its node; one per edge, shared by every connection.
#[derive(Debug)]
pub(crate) struct Env {
    pub(crate) registry: Arc<Registry>,
    pub(crate) bus: SharedBus,
    /// Where key-value resources live (none: kv resources answer `unavailable`).
    pub(crate) store: Option<SharedStore>,
    pub(crate) metrics: Arc<Metrics>,
    /// Revoked tokens, kept current by [`crate::revoke::watch`].
    pub(crate) revoked: Arc<Revocations>,
    /// Where watches run.
    pub(crate) tracker: TaskTracker,
    /// How long a backend request may take.
    pub(crate) request_timeout: Duration,
}
