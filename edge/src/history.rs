//! The shell of topic history on an edge: the store and its rules, and, for a topic pump on
//! a concrete history topic, the subscribers joining it. What the offsets mean (next,
//! repeat, gap; whether a client recovers) is decided in [`edge_core::history`]; this file
//! reads storage and queues frames.
//!
//! **Joining without a gap or a duplicate.** A subscriber of a history topic is *held*
//! (skipped by the pump) from the moment it enters the topic's list until the pump, between
//! two batches, serves its join: everything up to the pump's position went out before it
//! was served, everything after goes out after. Serving it queues the stored publications
//! between the client's position and the pump's, so the client gets the missed ones, then
//! the live ones, each once. The pump is the only writer of the topic, so nothing can pass
//! in between. The frames are queued behind the socket the connection's task holds while
//! it subscribes, so the `subscribed` answer it then writes comes first. A client whose
//! position is past what this edge's feed delivered (it came from an edge whose feed is
//! ahead) stays held until the feed catches up with it ([`AHEAD_LIMIT`] at most), or the
//! publications in flight here would reach it a second time.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bus::history::{Read, Rule, SharedHistory};
use edge_core::history::{Feed, Position, Standing, recovery};
use edge_core::session::Subscribed;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use ulid::Ulid;

use crate::handle::ConnHandle;

/// The history store and the rules it keeps (every route's: storage is shared).
#[derive(Debug, Clone)]
pub(crate) struct History {
    pub(crate) store: SharedHistory,
    pub(crate) rules: Vec<Rule>,
}

impl History {
    /// The rule of a concrete topic, if it keeps history.
    pub(crate) fn rule_for(&self, topic: &str) -> Option<&Rule> {
        bus::history::rule_for(&self.rules, topic)
    }
}

/// A concrete history topic's pump state that subscribers share: who is held, who waits to
/// be served.
#[derive(Debug)]
pub(crate) struct Joining {
    pub(crate) rule: Rule,
    pub(crate) namespace: String,
    /// The concrete topic.
    pub(crate) topic: String,
    /// Held connections, each with how many of its joins are unserved (a subscribe that
    /// timed out and its retry may both be).
    held: Mutex<HashMap<Ulid, u32>>,
    waiting: Mutex<Vec<Join>>,
    pub(crate) wake: Notify,
}

/// A subscriber waiting to join: where it stands, and where its outcome goes.
#[derive(Debug)]
pub(crate) struct Join {
    pub(crate) conn: ConnHandle,
    pub(crate) since: Option<Position>,
    pub(crate) done: oneshot::Sender<Subscribed>,
    /// When it was first found ahead of the feed ([`Standing::Ahead`]).
    pub(crate) ahead_since: Option<tokio::time::Instant>,
}

impl Joining {
    pub(crate) fn new(rule: Rule, namespace: &str, topic: &str) -> Self {
        Self {
            rule,
            namespace: namespace.to_owned(),
            topic: topic.to_owned(),
            held: Mutex::new(HashMap::new()),
            waiting: Mutex::new(Vec::new()),
            wake: Notify::new(),
        }
    }

    fn held(&self) -> MutexGuard<'_, HashMap<Ulid, u32>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds `conn` before it enters the topic's list (so the pump, which reads the list
    /// first and this set after, never sees it unheld before its join is served).
    pub(crate) fn hold(&self, conn: Ulid) {
        *self.held().entry(conn).or_insert(0) += 1;
    }

    /// One join of `conn` was served (or never queued).
    pub(crate) fn release(&self, conn: Ulid) {
        let mut held = self.held();
        if let Some(n) = held.get_mut(&conn) {
            *n -= 1;
            if *n == 0 {
                held.remove(&conn);
            }
        }
    }

    /// The held subscribers now (empty almost always: no allocation then).
    pub(crate) fn held_now(&self) -> HashSet<Ulid> {
        let held = self.held();
        if held.is_empty() {
            HashSet::new()
        } else {
            held.keys().copied().collect()
        }
    }

    /// Whether joins wait (the pump serves them again after each batch).
    pub(crate) fn waits(&self) -> bool {
        !self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }

    /// Puts joins back to wait for the feed, without waking the pump (which serves them
    /// again after its next batch, or a tick).
    fn defer(&self, joins: Vec<Join>) {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(joins);
    }

    /// Queues a join for the pump and wakes it.
    pub(crate) fn push(&self, join: Join) {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(join);
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<Join> {
        std::mem::take(
            &mut *self
                .waiting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// The longest storage read a topic's pump waits for (its subscribers wait with it): below
/// the subscribe timeout, so that a join is answered before its subscriber gives up.
pub(crate) const READ_LIMIT: Duration = Duration::from_secs(3);

/// How long a joiner ahead of this edge's feed waits for it to catch up (publications in
/// flight here that another edge delivered already): below the subscribe timeout.
pub(crate) const AHEAD_LIMIT: Duration = Duration::from_secs(2);

/// How often a pump with deferred joins looks at them when no batch comes.
pub(crate) const AHEAD_TICK: Duration = Duration::from_millis(50);

/// What serving the joins found of storage.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Served {
    /// Storage was made anew: the feed now follows this epoch, and subscribers must be told.
    pub(crate) new_epoch: bool,
}

/// Serves every waiting join of a topic whose feed stands at `feed`: one read of storage
/// from the earliest position asked for, then each subscriber its part. `queue` queues the
/// stored publications for one subscriber, all or none (false: they did not fit in its
/// outbound queue, and it is told it did not recover). A join whose subscriber gave up
/// (its subscribe timed out) is dropped.
pub(crate) async fn serve_joins(
    store: &SharedHistory,
    joining: &Joining,
    feed: &mut Feed,
    stop: &CancellationToken,
    queue: impl Fn(&ConnHandle, &[&bus::history::Stored]) -> bool,
) -> Served {
    let mut served = Served::default();
    let joins: Vec<Join> = joining
        .take()
        .into_iter()
        .filter(|j| {
            let live = !j.done.is_closed();
            if !live {
                joining.release(j.conn.id());
            }
            live
        })
        .collect();
    // A joiner ahead of this edge's feed waits (held) until the feed catches up with it, for
    // at most AHEAD_LIMIT: then it is served as current, as if the rest were not coming.
    let now = tokio::time::Instant::now();
    let (ahead, joins): (Vec<Join>, Vec<Join>) = joins.into_iter().partition(|j| {
        j.since
            .as_ref()
            .is_some_and(|p| feed.join(p) == Standing::Ahead)
            && j.ahead_since.is_none_or(|t| now - t < AHEAD_LIMIT)
    });
    joining.defer(
        ahead
            .into_iter()
            .map(|j| Join {
                ahead_since: j.ahead_since.or(Some(now)),
                ..j
            })
            .collect(),
    );
    if joins.is_empty() {
        return served;
    }
    let behind = |p: &Position, feed: &Feed| feed.join(p) == Standing::Behind;
    let from = joins
        .iter()
        .filter_map(|j| {
            j.since
                .as_ref()
                .filter(|p| behind(p, feed))
                .map(|p| p.offset)
        })
        .min();
    let read: Option<Read> = match from {
        Some(after) => {
            let read = store.read(&joining.rule, &joining.namespace, &joining.topic, after);
            tokio::select! {
                r = tokio::time::timeout(READ_LIMIT, read) => match r {
                    Ok(Ok(read)) => Some(read),
                    Ok(Err(error)) => {
                        tracing::warn!(%error, topic = %joining.topic, "history read for recovery failed");
                        None
                    }
                    Err(_) => {
                        tracing::warn!(topic = %joining.topic, "history read for recovery took over {READ_LIMIT:?}");
                        None
                    }
                },
                () = stop.cancelled() => return served,
            }
        }
        None => None,
    };
    if let Some(read) = &read
        && read.epoch != feed.epoch
    {
        // Storage was made anew: the feed follows it from its present position.
        feed.restart(read.epoch.clone(), read.last);
        served.new_epoch = true;
    }
    let delivered = feed.delivered();
    let position = Position {
        offset: delivered,
        epoch: feed.epoch.clone(),
    };
    for join in joins {
        let recovered = join.since.as_ref().map(|since| {
            match feed.join(since) {
                // Ahead past AHEAD_LIMIT: what lies between never came.
                Standing::Current | Standing::Ahead => return true,
                Standing::OtherEpoch => return false,
                Standing::Behind => {}
            }
            let Some(read) = read.as_ref().filter(|r| r.epoch == feed.epoch) else {
                return false;
            };
            // The read was made from the earliest joiner's position; a later position is
            // whole also when the topic's oldest stored publication is at most one past it
            // (storage removes a topic's publications oldest first).
            let complete = read.complete
                || read
                    .messages
                    .first()
                    .is_some_and(|m| m.offset <= since.offset.saturating_add(1));
            if !recovery(since, &read.epoch, complete, delivered) {
                return false;
            }
            let missed: Vec<&bus::history::Stored> = read
                .messages
                .iter()
                .filter(|m| m.offset > since.offset && m.offset <= delivered)
                .collect();
            queue(&join.conn, &missed)
        });
        joining.release(join.conn.id());
        let _ = join.done.send(Subscribed::Live {
            position: Some(position.clone()),
            recovered,
        });
    }
    served
}
