//! Bounded waiting: every wait of the suite is one of these, and fails the test with a
//! message that says what was awaited.

use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, timeout};

/// The bound on any single wait on a process of its own: a start, a frame, an RPC, a poll.
pub const STEP: Duration = Duration::from_secs(10);
/// The bound on any single expected event of an in-process node.
pub const WAIT: Duration = Duration::from_secs(3);
/// Pause between the attempts of a bounded poll.
pub const POLL: Duration = Duration::from_millis(25);

/// Polls `f` every [`POLL`] until it yields `Some` or `limit` passes (`None`).
pub async fn poll_for<T>(limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `f` until it yields `Some`; fails the test naming `what` after `limit`.
pub async fn eventually<T>(what: &str, limit: Duration, f: impl AsyncFnMut() -> Option<T>) -> T {
    poll_for(limit, f)
        .await
        .unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Awaits `fut` for at most [`STEP`]; fails the test naming `what` after that.
pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}
