//! In-process bus with NATS semantics, for the embedded mode and unit tests.
//!
//! The subscription table keeps literal subjects in a `HashMap` (one lookup per publish) and
//! wildcard patterns in a `Vec` (scanned per publish). Publishing takes the table's read lock,
//! `try_send`s a clone of the message to every target and never waits: a full subscriber
//! queue loses the message and counts it.

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::{
    Bus, BusError, Message, Outgoing, Subscription, validate_outgoing, validate_subscription,
};

/// Process-wide counter behind [`LocalBus::new_inbox`].
static INBOX_SEQ: AtomicU64 = AtomicU64::new(0);

/// In-process bus. Cloning gives another handle to the same bus.
#[derive(Clone)]
pub struct LocalBus {
    inner: Arc<Inner>,
}

struct Inner {
    capacity: usize,
    table: RwLock<Table>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Table {
    /// Subscriptions without wildcards, by subject.
    exact: HashMap<String, Entry>,
    /// Subscriptions with `*` or `>`, by pattern.
    wildcard: Vec<(String, Entry)>,
    /// Number of live subscriptions.
    len: usize,
}

/// Every subscription on one subject or pattern.
#[derive(Default)]
struct Entry {
    plain: Vec<Slot>,
    groups: Vec<Group>,
}

struct Group {
    name: String,
    members: Vec<Slot>,
    /// Round-robin cursor.
    next: AtomicUsize,
}

/// One subscriber's queue.
struct Slot {
    id: u64,
    tx: mpsc::Sender<Message>,
    dropped: Arc<AtomicU64>,
}

impl LocalBus {
    /// A bus whose subscriptions each buffer up to `capacity_per_subscription` messages
    /// (at least 1).
    pub fn new(capacity_per_subscription: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                capacity: capacity_per_subscription.max(1),
                table: RwLock::new(Table::default()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// How many subscriptions are live (request inboxes included while a request waits).
    pub fn subscription_count(&self) -> usize {
        self.inner.read().len
    }

    /// Delivers `msg`; returns how many subscriptions it was offered to (delivered or
    /// dropped because full).
    fn publish_now(&self, msg: Outgoing) -> Result<usize, BusError> {
        validate_outgoing(&msg)?;
        let msg = Message {
            subject: msg.subject,
            reply: msg.reply,
            headers: msg.headers,
            payload: msg.payload,
        };
        let table = self.inner.read();
        let mut fanout = Fanout {
            pending: None,
            offered: 0,
        };
        // Whether more than one entry matches; only needed (and computed) for queue groups.
        let mut several: Option<bool> = None;
        for (i, entry) in table.matching(&msg.subject).enumerate() {
            for slot in &entry.plain {
                fanout.push(slot, &msg);
            }
            for group in &entry.groups {
                let several =
                    *several.get_or_insert_with(|| table.matching(&msg.subject).nth(1).is_some());
                if let Some(slot) = table.pick(&msg.subject, i, group, several) {
                    fanout.push(slot, &msg);
                }
            }
        }
        let offered = fanout.offered;
        fanout.finish(msg);
        Ok(offered)
    }

    fn subscribe_now(
        &self,
        subject: String,
        queue: Option<String>,
        capacity: usize,
    ) -> Result<Subscription, BusError> {
        validate_subscription(&subject, queue.as_deref())?;
        let (tx, rx) = mpsc::channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            id,
            tx,
            dropped: Arc::clone(&dropped),
        };
        {
            let mut table = self.inner.write();
            let entry = table.entry_mut(&subject);
            match &queue {
                None => entry.plain.push(slot),
                Some(name) => match entry.groups.iter_mut().find(|g| g.name == *name) {
                    Some(group) => group.members.push(slot),
                    None => entry.groups.push(Group {
                        name: name.clone(),
                        members: vec![slot],
                        next: AtomicUsize::new(0),
                    }),
                },
            }
            table.len += 1;
        }
        let stream = LocalStream {
            rx,
            _registration: Registration {
                bus: Arc::downgrade(&self.inner),
                pattern: subject,
                queue,
                id,
            },
        };
        Ok(Subscription::new(
            Box::pin(stream),
            Arc::new(move || dropped.load(Ordering::Relaxed)),
        ))
    }

    async fn request_now(&self, msg: Outgoing, timeout: Duration) -> Result<Message, BusError> {
        validate_outgoing(&msg)?;
        let subject = msg.subject.clone();
        let reply = self.new_inbox();
        let mut inbox = self.subscribe_now(reply.clone(), None, 1)?;
        let offered = self.publish_now(Outgoing {
            reply: Some(reply),
            ..msg
        })?;
        if offered == 0 {
            return Err(BusError::NoResponders { subject });
        }
        match tokio::time::timeout(timeout, inbox.next()).await {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err(BusError::Closed),
            Err(_) => Err(BusError::Timeout { subject, timeout }),
        }
    }
}

impl Inner {
    fn read(&self) -> RwLockReadGuard<'_, Table> {
        // The lock is never held across a panic point that leaves the table inconsistent.
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn remove(&self, pattern: &str, queue: Option<&str>, id: u64) {
        let mut table = self.write();
        let removed = match table.position(pattern) {
            Position::Exact => match table.exact.get_mut(pattern) {
                Some(entry) => {
                    let removed = entry.remove(queue, id);
                    if entry.is_empty() {
                        table.exact.remove(pattern);
                    }
                    removed
                }
                None => false,
            },
            Position::Wildcard(Some(i)) => {
                let entry = &mut table.wildcard[i].1;
                let removed = entry.remove(queue, id);
                if entry.is_empty() {
                    table.wildcard.swap_remove(i);
                }
                removed
            }
            Position::Wildcard(None) => false,
        };
        if removed {
            table.len -= 1;
        }
    }
}

enum Position {
    Exact,
    Wildcard(Option<usize>),
}

impl Table {
    fn position(&self, pattern: &str) -> Position {
        if is_literal(pattern) {
            Position::Exact
        } else {
            Position::Wildcard(self.wildcard.iter().position(|(p, _)| p == pattern))
        }
    }

    fn entry_mut(&mut self, pattern: &str) -> &mut Entry {
        match self.position(pattern) {
            Position::Exact => self.exact.entry(pattern.to_owned()).or_default(),
            Position::Wildcard(Some(i)) => &mut self.wildcard[i].1,
            Position::Wildcard(None) => {
                self.wildcard.push((pattern.to_owned(), Entry::default()));
                let last = self.wildcard.len() - 1;
                &mut self.wildcard[last].1
            }
        }
    }

    /// Every entry whose subject or pattern matches `subject`, exact entry first, in a
    /// stable order (the table is read-locked).
    fn matching<'t, 's>(
        &'t self,
        subject: &'s str,
    ) -> impl Iterator<Item = &'t Entry> + Clone + use<'t, 's> {
        self.exact.get(subject).into_iter().chain(
            self.wildcard
                .iter()
                .filter(move |(p, _)| crate::subject_matches(p, subject))
                .map(|(_, e)| e),
        )
    }

    /// Picks the member of the queue group `group` (in the `index`th matching entry) that
    /// gets the message. Members of a group with the same name in other matching entries
    /// (e.g. `a.b` and `a.*` in group `q`) form one group, as in NATS: the group is handled
    /// at its first matching entry and skipped at the others.
    /// `several` says whether more than one entry matches `subject`.
    fn pick<'t>(
        &'t self,
        subject: &str,
        index: usize,
        group: &'t Group,
        several: bool,
    ) -> Option<&'t Slot> {
        let turn = group.next.fetch_add(1, Ordering::Relaxed);
        if !several {
            // Fast path: the only matching entry, the common case.
            return group.members.get(turn % group.members.len().max(1));
        }
        let same_name = |e: &'t Entry| e.groups.iter().find(|g| g.name == group.name);
        let matching = self.matching(subject);
        if matching.clone().take(index).any(|e| same_name(e).is_some()) {
            return None; // handled at an earlier entry
        }
        let namesakes = matching.skip(index).filter_map(same_name);
        let total: usize = namesakes.clone().map(|g| g.members.len()).sum();
        let mut n = turn % total.max(1);
        for g in namesakes {
            if let Some(slot) = g.members.get(n) {
                return Some(slot);
            }
            n -= g.members.len();
        }
        None
    }
}

impl Entry {
    fn remove(&mut self, queue: Option<&str>, id: u64) -> bool {
        fn take(slots: &mut Vec<Slot>, id: u64) -> bool {
            match slots.iter().position(|s| s.id == id) {
                Some(i) => {
                    slots.swap_remove(i);
                    true
                }
                None => false,
            }
        }
        match queue {
            None => take(&mut self.plain, id),
            Some(name) => match self.groups.iter().position(|g| g.name == name) {
                Some(i) => {
                    let removed = take(&mut self.groups[i].members, id);
                    if self.groups[i].members.is_empty() {
                        self.groups.swap_remove(i);
                    }
                    removed
                }
                None => false,
            },
        }
    }

    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.groups.is_empty()
    }
}

impl Slot {
    fn offer(&self, msg: Message) {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The subscription is being dropped; its registration removes the slot.
            Err(TrySendError::Closed(_)) => {}
        }
    }
}

/// Hands a clone to every target but the last, which gets the original: a message with a
/// single subscriber is never cloned.
struct Fanout<'t> {
    pending: Option<&'t Slot>,
    offered: usize,
}

impl<'t> Fanout<'t> {
    fn push(&mut self, slot: &'t Slot, msg: &Message) {
        self.offered += 1;
        if let Some(previous) = self.pending.replace(slot) {
            previous.offer(msg.clone());
        }
    }

    fn finish(self, msg: Message) {
        if let Some(last) = self.pending {
            last.offer(msg);
        }
    }
}

fn is_literal(pattern: &str) -> bool {
    !pattern.split('.').any(|t| t == "*" || t == ">")
}

/// Removes a subscription from the table when dropped.
struct Registration {
    bus: Weak<Inner>,
    pattern: String,
    queue: Option<String>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(inner) = self.bus.upgrade() {
            inner.remove(&self.pattern, self.queue.as_deref(), self.id);
        }
    }
}

struct LocalStream {
    rx: mpsc::Receiver<Message>,
    _registration: Registration,
}

impl Stream for LocalStream {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

impl Bus for LocalBus {
    fn publish(&self, msg: Outgoing) -> BoxFuture<'_, Result<(), BusError>> {
        let result = self.publish_now(msg).map(drop);
        Box::pin(async move { result })
    }

    fn subscribe(
        &self,
        subject: String,
        queue: Option<String>,
    ) -> BoxFuture<'_, Result<Subscription, BusError>> {
        let result = self.subscribe_now(subject, queue, self.inner.capacity);
        Box::pin(async move { result })
    }

    fn request(
        &self,
        msg: Outgoing,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Message, BusError>> {
        Box::pin(self.request_now(msg, timeout))
    }

    fn new_inbox(&self) -> String {
        format!("_INBOX.{}", INBOX_SEQ.fetch_add(1, Ordering::Relaxed))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async { Ok(()) })
    }

    fn is_connected(&self) -> bool {
        true
    }

    fn reconnects(&self) -> u64 {
        0
    }
}

impl fmt::Debug for LocalBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBus")
            .field("capacity_per_subscription", &self.inner.capacity)
            .field("subscriptions", &self.subscription_count())
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn drain(sub: &mut Subscription) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(Some(msg)) = sub.next().now_or_never() {
            out.push(String::from_utf8_lossy(&msg.payload).into_owned());
        }
        out
    }

    fn shape(bus: &LocalBus) -> (usize, usize, usize) {
        let t = bus.inner.read();
        (t.exact.len(), t.wildcard.len(), t.len)
    }

    #[test]
    fn literal_and_wildcard_patterns() {
        assert!(is_literal("a.b.c"));
        assert!(is_literal("a*b"));
        assert!(!is_literal("a.*"));
        assert!(!is_literal(">"));
    }

    #[tokio::test]
    async fn table_keeps_literals_in_the_map_and_shrinks() {
        let bus = LocalBus::new(4);
        let a = bus.subscribe("a.b".into(), None).await.unwrap();
        let b = bus.subscribe("a.b".into(), Some("q".into())).await.unwrap();
        let c = bus.subscribe("a.*".into(), None).await.unwrap();
        let d = bus.subscribe("a.*".into(), Some("q".into())).await.unwrap();
        assert_eq!(shape(&bus), (1, 1, 4));
        drop(a);
        assert_eq!(shape(&bus), (1, 1, 3));
        drop(b);
        assert_eq!(shape(&bus), (0, 1, 2));
        drop((c, d));
        assert_eq!(shape(&bus), (0, 0, 0));
    }

    #[tokio::test]
    async fn queue_group_is_round_robin() {
        let bus = LocalBus::new(64);
        let mut m1 = bus.subscribe("job".into(), Some("w".into())).await.unwrap();
        let mut m2 = bus.subscribe("job".into(), Some("w".into())).await.unwrap();
        let mut other = bus
            .subscribe("job".into(), Some("other".into()))
            .await
            .unwrap();
        for i in 0..6 {
            bus.publish(Outgoing::new("job", i.to_string()))
                .await
                .unwrap();
        }
        assert_eq!(drain(&mut m1), ["0", "2", "4"]);
        assert_eq!(drain(&mut m2), ["1", "3", "5"]);
        assert_eq!(
            drain(&mut other).len(),
            6,
            "every group gets every message once"
        );
    }

    #[tokio::test]
    async fn full_queue_drops_newest_and_counts() {
        let bus = LocalBus::new(2);
        let mut sub = bus.subscribe("x".into(), None).await.unwrap();
        for i in 0..5 {
            bus.publish(Outgoing::new("x", i.to_string()))
                .await
                .unwrap();
        }
        assert_eq!(sub.dropped(), 3);
        assert_eq!(drain(&mut sub), ["0", "1"]);
    }

    #[tokio::test]
    async fn zero_capacity_means_one() {
        let bus = LocalBus::new(0);
        let mut sub = bus.subscribe("x".into(), None).await.unwrap();
        bus.publish(Outgoing::new("x", "1")).await.unwrap();
        assert_eq!(drain(&mut sub), ["1"]);
    }

    #[tokio::test]
    async fn publish_counts_interest() {
        let bus = LocalBus::new(1);
        assert_eq!(bus.publish_now(Outgoing::new("a.b", "x")).unwrap(), 0);
        let _s = bus.subscribe("a.>".into(), None).await.unwrap();
        let _q1 = bus.subscribe("a.b".into(), Some("q".into())).await.unwrap();
        let _q2 = bus.subscribe("a.*".into(), Some("q".into())).await.unwrap();
        // One plain subscriber plus one member of the (cross-pattern) group `q`.
        assert_eq!(bus.publish_now(Outgoing::new("a.b", "x")).unwrap(), 2);
    }

    #[tokio::test]
    async fn streams_end_when_the_bus_is_gone() {
        let bus = LocalBus::new(1);
        let mut sub = bus.subscribe("x".into(), None).await.unwrap();
        drop(bus);
        assert!(sub.next().await.is_none());
    }

    #[test]
    fn inboxes_are_unique() {
        let bus = LocalBus::new(1);
        let a = bus.new_inbox();
        let b = LocalBus::new(1).new_inbox();
        assert!(a.starts_with("_INBOX.") && crate::is_valid_publish_subject(&a));
        assert_ne!(a, b);
    }
}
