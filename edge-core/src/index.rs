//! The edge's local index, pure: connections by id and by user, topic filters per
//! (namespace, filter) with their local subscribers, and the report log every change feeds.
//! The shell (`edge/src/registry.rs`) keeps it under one lock, opens a bus subscription and
//! a pump per topic, and lets the pumps read each topic's [`Subscribers`] without that lock.
//!
//! **Overlapping filters.** A connection whose filters overlap (`#`, `+/#` and `x/y`) hears
//! each publication once: every subscriber entry lists the connection's *older* filters that
//! overlap it (none for almost every entry), and a pump skips a publication one of them
//! matches ([`Subscriber::shadowed`]), since the oldest matching filter's pump delivers it.
//! A new filter never makes an older one skip anything, so subscribing loses nothing; when a
//! filter goes, the lists of the connection's younger ones lose it.
//!
//! **Subscribing takes two steps.** [`Index::subscribe`] puts the connection in the topic's
//! list (a new topic is reported active at once, so publications can flow as soon as the
//! shell's bus subscription is up); [`Index::confirm`] reports the subscription once the
//! shell has told the client. A subscription that fails before that is taken back with
//! [`Index::unsubscribe`] and was never reported.
//!
//! **Reports.** Every change appends its delta to the index's own [`Log`]; a full report is
//! built from the index in the same `&mut` call that switches the log back to deltas
//! ([`Index::next_batch`]), so every change is either in a full report or logged after it.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use proto::topic;
use proto::v1::{ConnRef, Connection, Delta, NodeTopic, Target, TopicChange, delta};

use crate::report::{Batch, Log};

/// What the index needs of a connection handle (the shell's `ConnHandle`; a plain struct
/// in tests). Cloning it must be cheap: the index keeps one clone by id, one by user and
/// one per topic the connection holds.
pub trait Handle: Clone {
    type Id: Copy + Eq + Hash + fmt::Debug + fmt::Display + FromStr;

    fn id(&self) -> Self::Id;
    fn namespace(&self) -> &str;
    /// Empty on anonymous routes.
    fn user(&self) -> &str;
    /// Connections its user may hold on its route in its namespace; 0: no limit.
    fn user_limit(&self) -> usize;
    /// Whether both came in through the same route (the per-user limit counts per route).
    fn same_route(&self, other: &Self) -> bool;
    /// Its report record. The index fills `conn_id`, `node_id`, `namespace`, `user` and
    /// `topics` itself.
    fn record(&self) -> Connection;
}

/// Why a connection was not attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("the user holds {limit} connections on this route already")]
    UserLimit { limit: usize },
    #[error("a connection with this id is attached already")]
    Duplicate,
}

/// Why a subscription was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("the connection is not attached")]
    NotAttached,
    #[error("the connection holds this filter already")]
    AlreadyHeld,
}

/// Identifies one life of a topic: a topic dropped and made again under the same
/// (namespace, filter) gets a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopicId(u64);

/// What [`Index::subscribe`] did.
#[derive(Debug)]
pub struct Joined<'a, T> {
    /// The topic is new: the shell opens its bus subscription and starts its pump.
    pub created: bool,
    pub topic: TopicId,
    /// The shell's state of the topic.
    pub state: &'a T,
}

/// A topic's local subscribers, shared between the index (which edits them) and the
/// topic's pump (which reads them once per batch of publications). A read takes one lock
/// and one reference count, whatever the number of subscribers; an edit copies the list
/// only while a pump still holds an older snapshot of it.
#[derive(Debug)]
pub struct Subscribers<C>(Arc<Mutex<Arc<Vec<Subscriber<C>>>>>);

/// A connection holding a topic filter.
#[derive(Debug, Clone)]
pub struct Subscriber<C> {
    pub conn: C,
    /// The connection's filters, subscribed before this one, that overlap it; `None` when
    /// there are none (the common case costs one branch per delivery).
    older: Option<Arc<[String]>>,
}

/// The local index: connections, users, topics, and the log of what changed.
#[derive(Debug)]
pub struct Index<C: Handle, T> {
    node_id: String,
    conns: HashMap<C::Id, Entry<C>>,
    users: HashMap<String, Vec<C>>,
    topics: HashMap<(String, String), Topic<C, T>>,
    topics_made: u64,
    log: Log,
}

#[derive(Debug)]
struct Entry<C> {
    conn: C,
    /// Its filters, oldest first.
    filters: Vec<Held>,
}

#[derive(Debug)]
struct Held {
    filter: String,
    /// Confirmed and reported (false while the subscription is being made).
    reported: bool,
}

#[derive(Debug)]
struct Topic<C, T> {
    id: TopicId,
    subscribers: Subscribers<C>,
    state: T,
}

impl<C> Clone for Subscribers<C> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<C> Default for Subscribers<C> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Arc::new(Vec::new()))))
    }
}

impl<C: Clone> Subscribers<C> {
    /// The subscribers now: one lock, one reference count.
    pub fn snapshot(&self) -> Arc<Vec<Subscriber<C>>> {
        Arc::clone(&self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Arc<Vec<Subscriber<C>>>> {
        self.0.lock().expect("topic subscribers poisoned")
    }

    /// Empties the list (without copying it, even while a pump holds a snapshot).
    fn take(&self) -> Arc<Vec<Subscriber<C>>> {
        std::mem::take(&mut *self.lock())
    }

    fn edit<R>(&self, f: impl FnOnce(&mut Vec<Subscriber<C>>) -> R) -> R {
        f(Arc::make_mut(&mut self.lock()))
    }
}

impl<C> Subscriber<C> {
    /// Whether an older filter of the connection matches `topic`: its pump delivers it.
    pub fn shadowed(&self, topic: &str) -> bool {
        self.older
            .as_ref()
            .is_some_and(|o| o.iter().any(|f| topic::matches(f, topic)))
    }

    /// The connection's older overlapping filters.
    pub fn older(&self) -> &[String] {
        self.older.as_deref().unwrap_or(&[])
    }

    fn forget(&mut self, gone: &str) {
        if let Some(older) = &self.older
            && older.iter().any(|f| f == gone)
        {
            let kept: Vec<String> = older.iter().filter(|f| *f != gone).cloned().collect();
            self.older = (!kept.is_empty()).then(|| kept.into());
        }
    }
}

impl<C: Handle, T> Index<C, T> {
    /// An empty index of node `node_id`; its first report batch is a full one.
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            conns: HashMap::new(),
            users: HashMap::new(),
            topics: HashMap::new(),
            topics_made: 0,
            log: Log::default(),
        }
    }

    /// Connections attached.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Active (namespace, filter) pairs.
    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    pub fn get(&self, id: &C::Id) -> Option<&C> {
        self.conns.get(id).map(|e| &e.conn)
    }

    /// Every connection, in no particular order.
    pub fn conns(&self) -> impl Iterator<Item = &C> {
        self.conns.values().map(|e| &e.conn)
    }

    /// A connection's filters, oldest first, each with whether it is confirmed.
    pub fn filters(&self, id: &C::Id) -> impl Iterator<Item = (&str, bool)> {
        self.conns
            .get(id)
            .into_iter()
            .flat_map(|e| e.filters.iter().map(|h| (h.filter.as_str(), h.reported)))
    }

    /// The current life of topic `filter` in `namespace`, if it is active.
    pub fn topic_id(&self, namespace: &str, filter: &str) -> Option<TopicId> {
        let key = (namespace.to_owned(), filter.to_owned());
        self.topics.get(&key).map(|t| t.id)
    }

    /// The shell's state of topic `filter` in `namespace`, if it is active.
    pub fn state(&self, namespace: &str, filter: &str) -> Option<&T> {
        let key = (namespace.to_owned(), filter.to_owned());
        self.topics.get(&key).map(|t| &t.state)
    }

    /// Every active topic: namespace, filter, subscribers.
    pub fn topics(&self) -> impl Iterator<Item = (&str, &str, &Subscribers<C>)> {
        self.topics
            .iter()
            .map(|((ns, f), t)| (ns.as_str(), f.as_str(), &t.subscribers))
    }

    /// The connections a command's target names: by id (unparsable ids name nobody), else
    /// by user; in the target's namespace if it names one.
    pub fn select(&self, target: &Target) -> Vec<C> {
        let in_ns = |c: &&C| target.namespace.is_empty() || c.namespace() == target.namespace;
        if !target.conn_ids.is_empty() {
            return target
                .conn_ids
                .iter()
                .filter_map(|id| id.parse::<C::Id>().ok())
                .filter_map(|id| self.get(&id))
                .filter(in_ns)
                .cloned()
                .collect();
        }
        self.users
            .get(&target.user)
            .map(|list| list.iter().filter(in_ns).cloned().collect())
            .unwrap_or_default()
    }

    /// Adds a connection; refused when its user holds its limit on this route already.
    pub fn attach(&mut self, conn: C) -> Result<(), AttachError> {
        let id = conn.id();
        if self.conns.contains_key(&id) {
            return Err(AttachError::Duplicate);
        }
        let limit = conn.user_limit();
        if limit > 0 && !conn.user().is_empty() {
            let held = self.users.get(conn.user()).map_or(0, |list| {
                list.iter()
                    .filter(|c| c.namespace() == conn.namespace() && c.same_route(&conn))
                    .count()
            });
            if held >= limit {
                return Err(AttachError::UserLimit { limit });
            }
        }
        let node_id = &self.node_id;
        self.log
            .push_with(|| delta::Kind::Attach(record(node_id, &conn, Vec::new())));
        self.users
            .entry(conn.user().to_owned())
            .or_default()
            .push(conn.clone());
        self.conns.insert(
            id,
            Entry {
                conn,
                filters: Vec::new(),
            },
        );
        Ok(())
    }

    /// Removes a connection and its subscriptions. Returns the states of the topics it was
    /// the last subscriber of (their pumps stop).
    pub fn detach(&mut self, id: C::Id) -> Vec<T> {
        let Some(entry) = self.conns.remove(&id) else {
            return Vec::new();
        };
        let conn = &entry.conn;
        if let Some(list) = self.users.get_mut(conn.user()) {
            list.retain(|c| c.id() != id);
            if list.is_empty() {
                self.users.remove(conn.user());
            }
        }
        let mut inactive = Vec::new();
        // The connection is going: no younger filter needs its list fixed.
        for held in &entry.filters {
            if held.reported {
                self.log
                    .push_with(|| delta::Kind::Unsubscribe(topic_change(conn, &held.filter)));
            }
            inactive.extend(self.remove_subscriber(conn.namespace(), &held.filter, id));
        }
        self.log.push_with(|| delta::Kind::Detach(conn_ref(conn)));
        inactive
    }

    /// Puts connection `id` in the subscribers of `filter` in its namespace, making the
    /// topic (with the state `new_topic` builds) if it had none. The subscription is
    /// reported by [`Index::confirm`].
    pub fn subscribe(
        &mut self,
        id: C::Id,
        filter: &str,
        new_topic: impl FnOnce(&Subscribers<C>) -> T,
    ) -> Result<Joined<'_, T>, JoinError> {
        let entry = self.conns.get_mut(&id).ok_or(JoinError::NotAttached)?;
        if entry.filters.iter().any(|h| h.filter == filter) {
            return Err(JoinError::AlreadyHeld);
        }
        let older: Vec<String> = entry
            .filters
            .iter()
            .filter(|h| topic::overlaps(&h.filter, filter))
            .map(|h| h.filter.clone())
            .collect();
        entry.filters.push(Held {
            filter: filter.to_owned(),
            reported: false,
        });
        let subscriber = Subscriber {
            conn: entry.conn.clone(),
            older: (!older.is_empty()).then(|| older.into()),
        };
        let namespace = entry.conn.namespace().to_owned();
        let mut created = false;
        let made = &mut self.topics_made;
        let topic = self
            .topics
            .entry((namespace.clone(), filter.to_owned()))
            .or_insert_with(|| {
                created = true;
                *made += 1;
                let subscribers = Subscribers::default();
                let state = new_topic(&subscribers);
                Topic {
                    id: TopicId(*made),
                    subscribers,
                    state,
                }
            });
        topic.subscribers.edit(|list| list.push(subscriber));
        if created {
            self.log.push_with(|| node_topic(&namespace, filter, true));
        }
        Ok(Joined {
            created,
            topic: topic.id,
            state: &topic.state,
        })
    }

    /// Reports a subscription [`Index::subscribe`] made. False when the connection no
    /// longer holds the filter (its topic was dropped or the connection detached).
    pub fn confirm(&mut self, id: C::Id, filter: &str) -> bool {
        let Some(entry) = self.conns.get_mut(&id) else {
            return false;
        };
        let Some(held) = entry.filters.iter_mut().find(|h| h.filter == filter) else {
            return false;
        };
        if !held.reported {
            held.reported = true;
            let conn = &entry.conn;
            self.log
                .push_with(|| delta::Kind::Subscribe(topic_change(conn, filter)));
        }
        true
    }

    /// Takes connection `id` out of the subscribers of `filter` (a confirmed subscription
    /// is reported gone; one still being made goes unreported). Returns the topic's state
    /// if it was the last subscriber (its pump stops).
    pub fn unsubscribe(&mut self, id: C::Id, filter: &str) -> Option<T> {
        let entry = self.conns.get_mut(&id)?;
        let pos = entry.filters.iter().position(|h| h.filter == filter)?;
        let held = entry.filters.remove(pos);
        let conn = &entry.conn;
        forget_older(&self.topics, conn, &entry.filters[pos..], filter);
        if held.reported {
            self.log
                .push_with(|| delta::Kind::Unsubscribe(topic_change(conn, filter)));
        }
        let ns = conn.namespace().to_owned();
        self.remove_subscriber(&ns, filter, id)
    }

    /// Drops topic `topic` (its bus subscription failed) with every subscriber it has;
    /// `None` if that life of the topic is over already.
    pub fn drop_topic(&mut self, namespace: &str, filter: &str, topic: TopicId) -> Option<T> {
        let key = (namespace.to_owned(), filter.to_owned());
        if self.topics.get(&key).map(|t| t.id) != Some(topic) {
            return None;
        }
        let topic = self.topics.remove(&key)?;
        let gone = topic.subscribers.take();
        for s in gone.iter() {
            let Some(entry) = self.conns.get_mut(&s.conn.id()) else {
                continue;
            };
            let Some(pos) = entry.filters.iter().position(|h| h.filter == filter) else {
                continue;
            };
            let held = entry.filters.remove(pos);
            let conn = &entry.conn;
            forget_older(&self.topics, conn, &entry.filters[pos..], filter);
            if held.reported {
                self.log
                    .push_with(|| delta::Kind::Unsubscribe(topic_change(conn, filter)));
            }
        }
        self.log.push_with(|| node_topic(namespace, filter, false));
        Some(topic.state)
    }

    /// Makes the next report batch a full one (a new reader starts with one).
    pub fn resync(&mut self) {
        self.log.resync();
    }

    /// The next report batch: the whole index when a full report is due (the log switches
    /// back to deltas in the same step), else the next deltas; `None` when nothing changed.
    pub fn next_batch(&mut self) -> Option<Batch> {
        let (node_id, conns, topics) = (&self.node_id, &self.conns, &self.topics);
        self.log.next(|| whole_state(node_id, conns, topics))
    }

    /// The whole index as report deltas: an attach per connection with its confirmed
    /// filters, then every active topic.
    pub fn full_report(&self) -> Vec<Delta> {
        whole_state(&self.node_id, &self.conns, &self.topics)
    }

    fn remove_subscriber(&mut self, namespace: &str, filter: &str, id: C::Id) -> Option<T> {
        let key = (namespace.to_owned(), filter.to_owned());
        let topic = self.topics.get(&key)?;
        let empty = topic.subscribers.edit(|list| {
            list.retain(|s| s.conn.id() != id);
            list.is_empty()
        });
        if !empty {
            return None;
        }
        let topic = self.topics.remove(&key)?;
        self.log.push_with(|| node_topic(namespace, filter, false));
        Some(topic.state)
    }
}

/// Takes `gone` out of the older-filter lists of `conn`'s `younger` filters that overlap it.
fn forget_older<C: Handle, T>(
    topics: &HashMap<(String, String), Topic<C, T>>,
    conn: &C,
    younger: &[Held],
    gone: &str,
) {
    let id = conn.id();
    for h in younger.iter().filter(|h| topic::overlaps(&h.filter, gone)) {
        let key = (conn.namespace().to_owned(), h.filter.clone());
        let Some(topic) = topics.get(&key) else {
            continue;
        };
        topic.subscribers.edit(|list| {
            if let Some(s) = list.iter_mut().find(|s| s.conn.id() == id) {
                s.forget(gone);
            }
        });
    }
}

fn whole_state<C: Handle, T>(
    node_id: &str,
    conns: &HashMap<C::Id, Entry<C>>,
    topics: &HashMap<(String, String), Topic<C, T>>,
) -> Vec<Delta> {
    let attach = conns.values().map(|e| {
        let confirmed = e
            .filters
            .iter()
            .filter(|h| h.reported)
            .map(|h| h.filter.clone())
            .collect();
        delta::Kind::Attach(record(node_id, &e.conn, confirmed))
    });
    let active = topics.keys().map(|(ns, f)| node_topic(ns, f, true));
    attach
        .chain(active)
        .map(|kind| Delta { kind: Some(kind) })
        .collect()
}

fn record<C: Handle>(node_id: &str, conn: &C, topics: Vec<String>) -> Connection {
    Connection {
        conn_id: conn.id().to_string(),
        node_id: node_id.to_owned(),
        namespace: conn.namespace().to_owned(),
        user: conn.user().to_owned(),
        topics,
        ..conn.record()
    }
}

fn conn_ref<C: Handle>(conn: &C) -> ConnRef {
    ConnRef {
        conn_id: conn.id().to_string(),
        namespace: conn.namespace().to_owned(),
        user: conn.user().to_owned(),
    }
}

fn topic_change<C: Handle>(conn: &C, filter: &str) -> TopicChange {
    TopicChange {
        conn_id: conn.id().to_string(),
        namespace: conn.namespace().to_owned(),
        user: conn.user().to_owned(),
        topic: filter.to_owned(),
    }
}

fn node_topic(namespace: &str, filter: &str, active: bool) -> delta::Kind {
    delta::Kind::NodeTopic(NodeTopic {
        namespace: namespace.to_owned(),
        topic: filter.to_owned(),
        active,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    /// A connection as the index sees it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Conn {
        id: u32,
        ns: &'static str,
        user: &'static str,
        route: u8,
        limit: usize,
    }

    impl Handle for Conn {
        type Id = u32;

        fn id(&self) -> u32 {
            self.id
        }
        fn namespace(&self) -> &str {
            self.ns
        }
        fn user(&self) -> &str {
            self.user
        }
        fn user_limit(&self) -> usize {
            self.limit
        }
        fn same_route(&self, other: &Self) -> bool {
            self.route == other.route
        }
        fn record(&self) -> Connection {
            Connection {
                remote_addr: "192.0.2.1:5000".to_owned(),
                route: format!("/r{}", self.route),
                ..Connection::default()
            }
        }
    }

    fn conn(id: u32, ns: &'static str, user: &'static str) -> Conn {
        Conn {
            id,
            ns,
            user,
            route: 0,
            limit: 0,
        }
    }

    /// What a coordinator knows after applying the batches it was sent, strictly: a
    /// delta that contradicts what came before fails the test.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Mirror {
        /// conn id → (namespace, user, node, filters)
        conns: BTreeMap<String, (String, String, String, BTreeSet<String>)>,
        topics: BTreeSet<(String, String)>,
    }

    impl Mirror {
        fn of(deltas: &[Delta]) -> Self {
            let mut m = Self::default();
            m.apply(&Batch {
                full: true,
                deltas: deltas.to_vec(),
                more: false,
            });
            m
        }

        fn apply(&mut self, b: &Batch) {
            if b.full {
                *self = Self::default();
            }
            for d in &b.deltas {
                match d.kind.as_ref().expect("delta without kind") {
                    delta::Kind::Attach(c) => {
                        let topics = c.topics.iter().cloned().collect();
                        let v = (
                            c.namespace.clone(),
                            c.user.clone(),
                            c.node_id.clone(),
                            topics,
                        );
                        let old = self.conns.insert(c.conn_id.clone(), v);
                        assert!(old.is_none(), "attach of attached {}", c.conn_id);
                    }
                    delta::Kind::Detach(r) => {
                        let old = self.conns.remove(&r.conn_id);
                        let (ns, user, ..) = old.expect("detach of unknown connection");
                        assert_eq!((ns, user), (r.namespace.clone(), r.user.clone()));
                    }
                    delta::Kind::Subscribe(t) => {
                        let c = self.conns.get_mut(&t.conn_id).expect("subscribe: unknown");
                        assert_eq!((&c.0, &c.1), (&t.namespace, &t.user));
                        assert!(c.3.insert(t.topic.clone()), "subscribed twice: {t:?}");
                    }
                    delta::Kind::Unsubscribe(t) => {
                        let c = self
                            .conns
                            .get_mut(&t.conn_id)
                            .expect("unsubscribe: unknown");
                        assert!(c.3.remove(&t.topic), "unsubscribed unheld: {t:?}");
                    }
                    delta::Kind::NodeTopic(t) => {
                        let key = (t.namespace.clone(), t.topic.clone());
                        if t.active {
                            assert!(self.topics.insert(key), "activated twice: {t:?}");
                        } else {
                            assert!(self.topics.remove(&key), "deactivated inactive: {t:?}");
                        }
                    }
                }
            }
        }
    }

    fn drain(index: &mut Index<Conn, &'static str>, mirror: &mut Mirror) {
        while let Some(b) = index.next_batch() {
            mirror.apply(&b);
        }
    }

    fn kinds(b: &Batch) -> Vec<String> {
        b.deltas
            .iter()
            .map(|d| match d.kind.as_ref().unwrap() {
                delta::Kind::Attach(c) => format!("attach {}", c.conn_id),
                delta::Kind::Detach(r) => format!("detach {}", r.conn_id),
                delta::Kind::Subscribe(t) => format!("sub {} {}", t.conn_id, t.topic),
                delta::Kind::Unsubscribe(t) => format!("unsub {} {}", t.conn_id, t.topic),
                delta::Kind::NodeTopic(t) if t.active => format!("on {} {}", t.namespace, t.topic),
                delta::Kind::NodeTopic(t) => format!("off {} {}", t.namespace, t.topic),
            })
            .collect()
    }

    fn new_index() -> Index<Conn, &'static str> {
        let mut index = Index::new("edge-1");
        let first = index.next_batch().unwrap();
        assert!(first.full && first.deltas.is_empty());
        index
    }

    /// How many times connection `id` hears a publication on `topic`: once per filter it
    /// holds that matches and is not shadowed by an older one.
    fn deliveries(index: &Index<Conn, &'static str>, id: u32, topic: &str) -> usize {
        let Some(c) = index.get(&id) else { return 0 };
        index
            .topics()
            .filter(|(ns, f, _)| *ns == c.ns && topic::matches(f, topic))
            .map(|(_, _, subs)| {
                subs.snapshot()
                    .iter()
                    .filter(|s| s.conn.id == id && !s.shadowed(topic))
                    .count()
            })
            .sum()
    }

    #[test]
    fn attach_and_detach_are_reported_with_the_connection() {
        let mut index = new_index();
        index.attach(conn(1, "ns", "alice")).unwrap();
        index.attach(conn(2, "ns", "bob")).unwrap();
        assert_eq!(index.len(), 2);
        assert!(index.detach(1).is_empty());
        assert!(index.detach(1).is_empty(), "second detach is a no-op");
        let b = index.next_batch().unwrap();
        assert!(!b.full);
        assert_eq!(kinds(&b), ["attach 1", "attach 2", "detach 1"]);
        let delta::Kind::Attach(c) = b.deltas[0].kind.clone().unwrap() else {
            panic!()
        };
        assert_eq!(
            (c.node_id.as_str(), c.namespace.as_str(), c.user.as_str()),
            ("edge-1", "ns", "alice")
        );
        assert_eq!(c.route, "/r0", "the handle's record fills the rest");
        assert_eq!(
            index.attach(conn(2, "ns", "bob")),
            Err(AttachError::Duplicate)
        );
    }

    #[test]
    fn the_user_limit_counts_per_route_and_namespace() {
        let mut index = new_index();
        let c = |id, ns, user, route| Conn {
            id,
            ns,
            user,
            route,
            limit: 2,
        };
        index.attach(c(1, "ns", "alice", 0)).unwrap();
        index.attach(c(2, "ns", "alice", 0)).unwrap();
        let refused = Err(AttachError::UserLimit { limit: 2 });
        assert_eq!(index.attach(c(3, "ns", "alice", 0)), refused);
        index.attach(c(4, "ns", "alice", 1)).unwrap();
        index.attach(c(5, "other", "alice", 0)).unwrap();
        index.attach(c(6, "ns", "bob", 0)).unwrap();
        for id in 7..10 {
            index.attach(c(id, "ns", "", 0)).unwrap();
        }
        index.detach(1);
        index.attach(c(3, "ns", "alice", 0)).unwrap();
        let b = index.next_batch().unwrap();
        let attached = ["1", "2", "4", "5", "6", "7", "8", "9"].map(|id| format!("attach {id}"));
        let mut want = attached.to_vec();
        want.extend(["detach 1".to_owned(), "attach 3".to_owned()]);
        assert_eq!(kinds(&b), want, "a refusal is not reported");
    }

    #[test]
    fn topics_activate_with_the_first_subscriber_and_stop_with_the_last() {
        let mut index = new_index();
        index.attach(conn(1, "ns", "alice")).unwrap();
        index.attach(conn(2, "ns", "bob")).unwrap();
        let j = index.subscribe(1, "a/+", |_| "pump").unwrap();
        assert!(j.created);
        assert_eq!(*j.state, "pump");
        assert!(index.confirm(1, "a/+"));
        let j = index
            .subscribe(2, "a/+", |_| panic!("the topic exists"))
            .unwrap();
        assert!(!j.created);
        assert!(index.confirm(2, "a/+"));
        assert_eq!(
            index.subscribe(2, "a/+", |_| "x").unwrap_err(),
            JoinError::AlreadyHeld
        );
        assert_eq!(
            index.subscribe(9, "a/+", |_| "x").unwrap_err(),
            JoinError::NotAttached
        );
        assert_eq!(index.topic_count(), 1);
        assert_eq!(index.unsubscribe(1, "a/+"), None);
        assert_eq!(index.unsubscribe(1, "a/+"), None, "not held any more");
        assert_eq!(index.unsubscribe(2, "a/+"), Some("pump"));
        assert_eq!(index.topic_count(), 0);
        let b = index.next_batch().unwrap();
        assert_eq!(
            kinds(&b),
            [
                "attach 1",
                "attach 2",
                "on ns a/+",
                "sub 1 a/+",
                "sub 2 a/+",
                "unsub 1 a/+",
                "unsub 2 a/+",
                "off ns a/+",
            ]
        );
    }

    #[test]
    fn namespaces_keep_their_own_topics() {
        let mut index = new_index();
        index.attach(conn(1, "ns1", "alice")).unwrap();
        index.attach(conn(2, "ns2", "alice")).unwrap();
        assert!(index.subscribe(1, "a", |_| "one").unwrap().created);
        assert!(index.subscribe(2, "a", |_| "two").unwrap().created);
        assert_eq!(index.topic_count(), 2);
        assert_eq!(deliveries(&index, 1, "a"), 1);
        assert_eq!(index.detach(1), ["one"]);
        assert_eq!(index.detach(2), ["two"]);
    }

    #[test]
    fn overlapping_filters_deliver_once_through_the_oldest() {
        let mut index = new_index();
        index.attach(conn(1, "ns", "alice")).unwrap();
        for f in ["#", "a/+", "b", "a/b"] {
            index.subscribe(1, f, |_| "").unwrap();
            index.confirm(1, f);
        }
        let older = |index: &Index<Conn, &str>, f: &str| -> Vec<String> {
            let (_, _, subs) = index.topics().find(|(_, x, _)| *x == f).unwrap();
            subs.snapshot()[0].older().to_vec()
        };
        assert_eq!(older(&index, "#"), Vec::<String>::new());
        assert_eq!(older(&index, "a/+"), ["#"]);
        assert_eq!(older(&index, "b"), ["#"]);
        assert_eq!(older(&index, "a/b"), ["#", "a/+"]);
        for t in ["a/b", "a/c", "b", "c/d/e"] {
            assert_eq!(deliveries(&index, 1, t), 1, "{t}");
        }
        index.unsubscribe(1, "#");
        assert_eq!(older(&index, "a/+"), Vec::<String>::new());
        assert_eq!(older(&index, "a/b"), ["a/+"]);
        assert_eq!(deliveries(&index, 1, "a/b"), 1);
        assert_eq!(deliveries(&index, 1, "c/d/e"), 0);
        index.unsubscribe(1, "a/+");
        assert_eq!(older(&index, "a/b"), Vec::<String>::new());
        assert_eq!(deliveries(&index, 1, "a/b"), 1);
        assert_eq!(deliveries(&index, 1, "a/c"), 0);
    }

    #[test]
    fn an_unconfirmed_subscription_goes_unreported() {
        let mut index = new_index();
        index.attach(conn(1, "ns", "alice")).unwrap();
        index.subscribe(1, "a", |_| "pump").unwrap();
        let full_before = index.full_report();
        let m = Mirror::of(&full_before);
        assert!(
            m.conns["1"].3.is_empty(),
            "not confirmed: not in a full report"
        );
        assert!(m.topics.contains(&("ns".to_owned(), "a".to_owned())));
        assert_eq!(index.unsubscribe(1, "a"), Some("pump"));
        assert!(!index.confirm(1, "a"));
        let b = index.next_batch().unwrap();
        assert_eq!(kinds(&b), ["attach 1", "on ns a", "off ns a"]);
    }

    #[test]
    fn a_failed_topic_is_dropped_with_its_waiting_subscribers() {
        let mut index = new_index();
        index.attach(conn(1, "ns", "alice")).unwrap();
        index.attach(conn(2, "ns", "bob")).unwrap();
        index.subscribe(2, "#", |_| "all").unwrap();
        index.confirm(2, "#");
        let first = index.subscribe(1, "a", |_| "first").unwrap().topic;
        index.subscribe(2, "a", |_| "x").unwrap();
        assert_eq!(index.drop_topic("ns", "a", first), Some("first"));
        assert_eq!(index.filters(&1).count(), 0);
        assert_eq!(index.filters(&2).collect::<Vec<_>>(), [("#", true)]);
        assert!(!index.confirm(2, "a"), "the waiter learns it is gone");
        // A new life of the topic is not dropped by the old one's failure.
        let second = index.subscribe(1, "a", |_| "second").unwrap().topic;
        assert_ne!(first, second);
        assert_eq!(index.drop_topic("ns", "a", first), None);
        assert_eq!(index.topic_id("ns", "a"), Some(second));
        let b = index.next_batch().unwrap();
        assert_eq!(
            kinds(&b),
            [
                "attach 1", "attach 2", "on ns #", "sub 2 #", "on ns a", "off ns a", "on ns a"
            ]
        );
    }

    #[test]
    fn detach_ends_pending_subscriptions_too() {
        let mut index = new_index();
        index.attach(conn(1, "ns", "alice")).unwrap();
        index.subscribe(1, "a", |_| "a").unwrap();
        index.confirm(1, "a");
        index.subscribe(1, "b", |_| "b").unwrap();
        let mut gone = index.detach(1);
        gone.sort_unstable();
        assert_eq!(gone, ["a", "b"]);
        assert_eq!(index.topic_count(), 0);
        let b = index.next_batch().unwrap();
        assert_eq!(
            kinds(&b),
            [
                "attach 1",
                "on ns a",
                "sub 1 a",
                "on ns b",
                "unsub 1 a",
                "off ns a",
                "off ns b",
                "detach 1"
            ]
        );
    }

    #[test]
    fn a_full_report_is_the_state_and_deltas_follow_it() {
        let mut index = new_index();
        index.attach(conn(1, "ns", "alice")).unwrap();
        index.subscribe(1, "a", |_| "").unwrap();
        index.confirm(1, "a");
        index.resync();
        let full = index.next_batch().unwrap();
        assert!(full.full);
        let mut m = Mirror::default();
        m.apply(&full);
        assert_eq!(m.conns["1"].3, BTreeSet::from(["a".to_owned()]));
        assert_eq!(m.conns["1"].2, "edge-1");
        assert!(index.next_batch().is_none(), "the log restarted empty");
        index.unsubscribe(1, "a");
        let b = index.next_batch().unwrap();
        assert_eq!(kinds(&b), ["unsub 1 a", "off ns a"]);
        m.apply(&b);
        assert_eq!(m, Mirror::of(&index.full_report()));
    }

    #[test]
    fn select_names_connections_by_id_or_user() {
        let mut index = new_index();
        index.attach(conn(1, "ns", "alice")).unwrap();
        index.attach(conn(2, "other", "alice")).unwrap();
        index.attach(conn(3, "ns", "bob")).unwrap();
        let ids = |t: Target| {
            let mut v: Vec<u32> = index.select(&t).iter().map(|c| c.id).collect();
            v.sort_unstable();
            v
        };
        let user = |ns: &str, user: &str| Target {
            namespace: ns.to_owned(),
            user: user.to_owned(),
            conn_ids: Vec::new(),
        };
        assert_eq!(ids(user("", "alice")), [1, 2]);
        assert_eq!(ids(user("ns", "alice")), [1]);
        assert_eq!(ids(user("", "carol")), Vec::<u32>::new());
        let by_id = Target {
            namespace: "ns".to_owned(),
            user: "ignored".to_owned(),
            conn_ids: vec!["1".into(), "2".into(), "3".into(), "x".into(), "9".into()],
        };
        assert_eq!(ids(by_id), [1, 3]);
    }

    #[test]
    fn a_snapshot_stays_as_it_was_taken() {
        let mut index: Index<Conn, Subscribers<Conn>> = Index::new("edge-1");
        index.attach(conn(1, "ns", "alice")).unwrap();
        index.attach(conn(2, "ns", "bob")).unwrap();
        let subs = index
            .subscribe(1, "a", Subscribers::clone)
            .unwrap()
            .state
            .clone();
        let before = subs.snapshot();
        index.subscribe(2, "a", |_| unreachable!()).unwrap();
        assert_eq!(before.len(), 1);
        assert_eq!(subs.snapshot().len(), 2);
        index.unsubscribe(1, "a");
        assert_eq!(
            subs.snapshot()
                .iter()
                .map(|s| s.conn.id)
                .collect::<Vec<_>>(),
            [2]
        );
    }

    // Properties. Topic matching first: the overlap rule rests on `proto::topic`.

    /// Levels of concrete topics: a tiny alphabet, so that random filters and topics meet.
    const LEVELS: [&str; 3] = ["a", "b", ""];

    /// MQTT matching by its definition: same length (or, with a trailing `#`, at least the
    /// prefix), and every filter level is `+` or equal.
    fn reference_matches(filter: &str, topic: &str) -> bool {
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        let (prefix, multi) = match f.split_last() {
            Some((&"#", rest)) => (rest, true),
            _ => (&f[..], false),
        };
        let long_enough = if multi {
            t.len() >= prefix.len()
        } else {
            t.len() == prefix.len()
        };
        long_enough && prefix.iter().zip(&t).all(|(p, l)| *p == "+" || p == l)
    }

    fn concrete() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(&LEVELS[..]), 1..5)
            .prop_map(|l| l.join("/"))
            .prop_filter("valid topic", |t| topic::validate_topic(t).is_ok())
    }

    fn filter() -> impl Strategy<Value = String> {
        let level = prop::sample::select(&["a", "b", "", "+"][..]);
        (prop::collection::vec(level, 0..4), any::<bool>())
            .prop_map(|(mut l, hash)| {
                if hash || l.is_empty() {
                    l.push("#");
                }
                l.join("/")
            })
            .prop_filter("valid filter", |f| topic::validate_filter(f).is_ok())
    }

    /// Every topic of up to `levels` levels over [`LEVELS`], valid or not: the one-level
    /// empty topic `""` is among them although `validate_topic` refuses it.
    fn every_topic(levels: usize) -> Vec<String> {
        let mut all = Vec::new();
        let mut layer: Vec<String> = LEVELS.iter().map(|l| (*l).to_owned()).collect();
        for _ in 0..levels {
            all.extend(layer.iter().cloned());
            layer = layer
                .iter()
                .flat_map(|p| LEVELS.iter().map(move |l| format!("{p}/{l}")))
                .collect();
        }
        all
    }

    proptest! {
        #[test]
        fn matches_agrees_with_the_definition(f in filter(), t in concrete()) {
            prop_assert_eq!(topic::matches(&f, &t), reference_matches(&f, &t), "{} ~ {}", f, t);
        }

        /// `overlaps` is exact if the empty topic counts: `/#` and `+` overlap through `""`
        /// alone. Publications cannot use it, so such a pair overlaps on no real topic; that
        /// only lengthens an older-filter list (it never shadows anything). The direction
        /// exactly-once delivery needs, no missed overlap, holds for valid topics as such.
        #[test]
        fn filters_overlap_iff_a_topic_matches_both(a in filter(), b in filter()) {
            // A witness needs no more levels than the longer filter.
            let depth = a.split('/').count().max(b.split('/').count());
            let both: Vec<String> = every_topic(depth)
                .into_iter()
                .filter(|t| topic::matches(&a, t) && topic::matches(&b, t))
                .collect();
            prop_assert_eq!(topic::overlaps(&a, &b), !both.is_empty(), "{} ~ {} via {:?}", a, b, both);
            prop_assert_eq!(topic::overlaps(&a, &b), topic::overlaps(&b, &a));
            let valid = both.iter().any(|t| topic::validate_topic(t).is_ok());
            prop_assert!(!valid || topic::overlaps(&a, &b));
        }
    }

    // The index: random sequences of changes.

    const FILTERS: [&str; 10] = [
        "#", "a/#", "a/b", "+/b", "a/+", "b", "a", "+/#", "a/b/c", "+",
    ];
    const TOPICS: [&str; 8] = ["a", "b", "a/b", "a/c", "b/b", "a/b/c", "c", "a/b/c/d"];
    const NAMESPACES: [&str; 2] = ["n0", "n1"];

    /// The connections the sequences use: three share a user, route and namespace (limit 2).
    fn cast() -> Vec<Conn> {
        let c = |id, ns, user, route| Conn {
            id,
            ns,
            user,
            route,
            limit: 2,
        };
        vec![
            c(0, "n0", "alice", 0),
            c(1, "n0", "alice", 0),
            c(2, "n0", "alice", 0),
            c(3, "n0", "alice", 1),
            c(4, "n1", "alice", 0),
            c(5, "n0", "", 0),
            c(6, "n1", "bob", 0),
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Attach(usize),
        Detach(usize),
        Subscribe {
            conn: usize,
            filter: usize,
            confirm: bool,
        },
        Confirm(usize, usize),
        Unsubscribe(usize, usize),
        /// The bus subscription of the topic (in its last known life) failed.
        DropTopic(usize, usize),
        /// The reader takes a batch.
        Take,
        /// A new reader: the next batch is a full report.
        Resync,
    }

    fn op() -> impl Strategy<Value = Op> {
        let conn = 0..cast().len();
        let filter = 0..FILTERS.len();
        prop_oneof![
            2 => conn.clone().prop_map(Op::Attach),
            1 => conn.clone().prop_map(Op::Detach),
            6 => (conn.clone(), filter.clone(), prop::bool::weighted(0.8))
                .prop_map(|(conn, filter, confirm)| Op::Subscribe { conn, filter, confirm }),
            1 => (conn.clone(), filter.clone()).prop_map(|(c, f)| Op::Confirm(c, f)),
            2 => (conn, filter.clone()).prop_map(|(c, f)| Op::Unsubscribe(c, f)),
            1 => (0..NAMESPACES.len(), filter).prop_map(|(n, f)| Op::DropTopic(n, f)),
            2 => Just(Op::Take),
            1 => Just(Op::Resync),
        ]
    }

    /// The index's structure agrees with what its connections hold, and every publication
    /// reaches every connection once per... once.
    fn check_structure(index: &Index<Conn, &'static str>) -> Result<(), TestCaseError> {
        let mut entries = 0;
        for (ns, f, subs) in index.topics() {
            let subs = subs.snapshot();
            prop_assert!(!subs.is_empty(), "empty topic {} {}", ns, f);
            entries += subs.len();
            for s in subs.iter() {
                prop_assert_eq!(s.conn.ns, ns);
                let held: Vec<&str> = index.filters(&s.conn.id).map(|(h, _)| h).collect();
                let pos = held.iter().position(|h| *h == f);
                prop_assert!(pos.is_some(), "{} in {} without holding it", s.conn.id, f);
                let want: Vec<&str> = held[..pos.unwrap()]
                    .iter()
                    .copied()
                    .filter(|o| topic::overlaps(o, f))
                    .collect();
                prop_assert_eq!(s.older(), &want[..], "older of {} {}", s.conn.id, f);
            }
        }
        let held: usize = index.conns().map(|c| index.filters(&c.id).count()).sum();
        prop_assert_eq!(entries, held, "one subscriber entry per filter held");
        for c in index.conns() {
            for t in TOPICS {
                let wanted = index.filters(&c.id).any(|(f, _)| topic::matches(f, t));
                prop_assert_eq!(
                    deliveries(index, c.id, t),
                    usize::from(wanted),
                    "{} hears {}",
                    c.id,
                    t
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn deltas_replay_to_the_full_report_and_each_publication_arrives_once(
            ops in prop::collection::vec(op(), 1..80)
        ) {
            let cast = cast();
            let mut index: Index<Conn, &'static str> = Index::new("edge-1");
            let mut mirror = Mirror::default();
            let mut lives: HashMap<(usize, usize), TopicId> = HashMap::new();
            for op in ops {
                match op {
                    Op::Attach(i) => {
                        let c = &cast[i];
                        let attached = index.get(&c.id).is_some();
                        let same = index
                            .conns()
                            .filter(|o| o.ns == c.ns && o.user == c.user && o.route == c.route)
                            .count();
                        let want = if attached {
                            Err(AttachError::Duplicate)
                        } else if !c.user.is_empty() && same >= c.limit {
                            Err(AttachError::UserLimit { limit: c.limit })
                        } else {
                            Ok(())
                        };
                        prop_assert_eq!(index.attach(c.clone()), want);
                    }
                    Op::Detach(i) => {
                        let held: BTreeSet<String> =
                            index.filters(&cast[i].id).map(|(f, _)| f.to_owned()).collect();
                        let others: BTreeSet<(&str, String)> = index
                            .conns()
                            .filter(|o| o.id != cast[i].id)
                            .flat_map(|o| index.filters(&o.id).map(|(f, _)| (o.ns, f.to_owned())))
                            .collect();
                        let gone = index.detach(cast[i].id);
                        let want = held
                            .iter()
                            .filter(|f| !others.contains(&(cast[i].ns, (*f).clone())))
                            .count();
                        prop_assert_eq!(gone.len(), want, "topics that stop");
                    }
                    Op::Subscribe { conn, filter, confirm } => {
                        let c = &cast[conn];
                        let f = FILTERS[filter];
                        let attached = index.get(&c.id).is_some();
                        let held = index.filters(&c.id).any(|(h, _)| h == f);
                        let active = index.topic_id(c.ns, f).is_some();
                        match index.subscribe(c.id, f, |_| f) {
                            Ok(j) => {
                                prop_assert!(attached && !held);
                                prop_assert_eq!(j.created, !active);
                                prop_assert_eq!(*j.state, f);
                                let ns = NAMESPACES.iter().position(|n| *n == c.ns).unwrap();
                                lives.insert((ns, filter), j.topic);
                            }
                            Err(JoinError::NotAttached) => prop_assert!(!attached),
                            Err(JoinError::AlreadyHeld) => prop_assert!(held),
                        }
                        if confirm {
                            prop_assert_eq!(index.confirm(c.id, f), attached || held);
                        }
                    }
                    Op::Confirm(c, f) => {
                        let held = index.filters(&cast[c].id).any(|(h, _)| h == FILTERS[f]);
                        prop_assert_eq!(index.confirm(cast[c].id, FILTERS[f]), held);
                    }
                    Op::Unsubscribe(c, f) => {
                        index.unsubscribe(cast[c].id, FILTERS[f]);
                        prop_assert!(!index.filters(&cast[c].id).any(|(h, _)| h == FILTERS[f]));
                    }
                    Op::DropTopic(n, f) => {
                        let (ns, filter) = (NAMESPACES[n], FILTERS[f]);
                        if let Some(&life) = lives.get(&(n, f)) {
                            let current = index.topic_id(ns, filter) == Some(life);
                            let dropped = index.drop_topic(ns, filter, life);
                            prop_assert_eq!(dropped.is_some(), current);
                            prop_assert!(!current || index.topic_id(ns, filter).is_none());
                        }
                    }
                    Op::Take => {
                        if let Some(b) = index.next_batch() {
                            mirror.apply(&b);
                        }
                    }
                    Op::Resync => index.resync(),
                }
                check_structure(&index)?;
            }
            drain(&mut index, &mut mirror);
            prop_assert_eq!(&mirror, &Mirror::of(&index.full_report()));
        }
    }
}
