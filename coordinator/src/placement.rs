//! The placement directory: which connection of which user in which namespace is on which
//! edge, and which edges watch which topic filters. Fed by edge report batches.
//!
//! In a cluster each coordinator holds the connections whose `namespace/user` key it owns on
//! the ring, and every edge's active topic filters.
//!
//! An edge is *suspect* while its report stream is broken or silent (no heartbeat): its
//! connections are kept for the grace period in case it returns, but left out of every read
//! (locate, presence, listings, counts), which then say they are incomplete. Its share here is
//! also incomplete while the ring its last full batch was computed with is not this
//! coordinator's ring (a ring change both sides have not caught up with), and while it has not
//! sent a full batch at all: an edge seen on the bus (a census) that does not report here yet
//! is *joining*, and is not "nobody".
//!
//! **Invariant:** sans-io. No sockets, no clock reads: time comes in as a parameter (time since
//! an epoch of the caller's choosing). Applying a delta twice is harmless (attach replaces,
//! detach and unsubscribe of something absent do nothing), so an edge may re-send its whole
//! state at any time.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use proto::topic;
use proto::v1::{Connection, ReportBatch, delta};

/// An edge as placement knows it.
#[derive(Debug, Clone, Default)]
pub struct Node {
    pub node_id: String,
    pub address: String,
    /// When the last batch arrived.
    pub last_seen: Duration,
    pub draining: bool,
    /// Since when its report stream is broken or silent, if it is.
    pub suspect_since: Option<Duration>,
    /// The coordinator ring its last full batch was computed with.
    ring: Vec<String>,
    /// A batch came over a report stream (else the edge is only known from a census).
    reported: bool,
    /// A full batch was applied since this entry was made: without one, the entry holds
    /// only what deltas said, and the edge is asked to resend everything.
    whole: bool,
    /// When a census last found it on the bus.
    census_seen: Duration,
    conns: BTreeSet<String>,
    /// Active (namespace, filter) pairs on the edge.
    topics: HashSet<(String, String)>,
}

impl Node {
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn is_suspect(&self) -> bool {
        self.suspect_since.is_some()
    }

    /// Whether this directory holds its whole share of the edge under `ring`.
    pub fn is_current(&self, ring: &[String]) -> bool {
        !self.is_suspect() && self.whole && self.ring == ring
    }

    /// Whether the edge must send its whole state (this entry was made without it).
    pub fn needs_full(&self) -> bool {
        self.reported && !self.whole
    }

    pub fn state(&self) -> &'static str {
        if self.suspect_since.is_some() {
            "suspect"
        } else if !self.reported {
            "joining"
        } else if self.draining {
            "draining"
        } else {
            "ready"
        }
    }
}

/// What a ListConnections call asks for.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: String,
    pub user: String,
    pub node_id: String,
    pub topic: String,
}

/// A change worth telling `Placement.Watch` about.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Attached(Connection),
    Detached(Connection),
    NodeUp(String),
    NodeDown(String),
}

#[derive(Debug, Default)]
pub struct Directory {
    conns: BTreeMap<String, Connection>,
    users: BTreeMap<String, BTreeSet<String>>,
    nodes: BTreeMap<String, Node>,
    /// The latest report stream generation per edge.
    streams: BTreeMap<String, u64>,
}

impl Directory {
    /// Applies one report batch from an edge. A full batch replaces everything this directory
    /// had from that edge. Returns what changed.
    pub fn apply(&mut self, batch: ReportBatch, now: Duration) -> Vec<Change> {
        let node_id = batch.node_id;
        let leaving = batch.leaving;
        let mut changes = Vec::new();
        let known = self.nodes.get(&node_id).is_some_and(|n| n.reported);
        let mut stale: BTreeSet<String> = BTreeSet::new();
        {
            let node = self.nodes.entry(node_id.clone()).or_default();
            node.node_id.clone_from(&node_id);
            if !batch.address.is_empty() {
                node.address = batch.address;
            }
            node.last_seen = now;
            node.draining = batch.draining;
            node.suspect_since = None;
            node.reported = true;
            if batch.full {
                stale = std::mem::take(&mut node.conns);
                node.topics.clear();
                node.ring = batch.ring;
                node.whole = true;
            }
        }
        if !known {
            changes.push(Change::NodeUp(node_id.clone()));
        }
        for d in batch.deltas {
            match d.kind {
                Some(delta::Kind::Attach(mut c)) => {
                    c.node_id.clone_from(&node_id);
                    let fresh = !stale.remove(&c.conn_id) && !self.conns.contains_key(&c.conn_id);
                    self.attach(c.clone());
                    if fresh {
                        changes.push(Change::Attached(c));
                    }
                }
                Some(delta::Kind::Detach(r)) => {
                    stale.remove(&r.conn_id);
                    if let Some(c) = self.detach(&r.conn_id) {
                        changes.push(Change::Detached(c));
                    }
                }
                Some(delta::Kind::Subscribe(t)) => self.set_topic(&t.conn_id, &t.topic, true),
                Some(delta::Kind::Unsubscribe(t)) => self.set_topic(&t.conn_id, &t.topic, false),
                Some(delta::Kind::NodeTopic(t)) => {
                    if let Some(node) = self.nodes.get_mut(&node_id) {
                        if t.active {
                            node.topics.insert((t.namespace, t.topic));
                        } else {
                            node.topics.remove(&(t.namespace, t.topic));
                        }
                    }
                }
                None => {}
            }
        }
        for id in stale {
            if let Some(c) = self.detach(&id) {
                changes.push(Change::Detached(c));
            }
        }
        if leaving {
            changes.extend(self.forget_node(&node_id));
        }
        changes
    }

    /// A report stream from `node_id` opened; returns its generation.
    pub fn open_stream(&mut self, node_id: &str) -> u64 {
        if let Some(n) = self.nodes.get_mut(node_id) {
            n.suspect_since = None;
        }
        let g = self.streams.entry(node_id.to_owned()).or_default();
        *g += 1;
        *g
    }

    /// Whether the edge must send its whole state: it was forgotten while it could not
    /// report, and its last batches were deltas to state this directory no longer has. Asked
    /// on every batch until a full one comes, so a lost request is asked again.
    pub fn needs_full(&self, node_id: &str) -> bool {
        self.nodes.get(node_id).is_some_and(Node::needs_full)
    }

    /// A census found these edges on the bus: those not known here become *joining* (not
    /// current, so answers say they are unknown rather than absent).
    pub fn seen_on_bus(&mut self, node_ids: impl IntoIterator<Item = String>, now: Duration) {
        for id in node_ids {
            let node = self.nodes.entry(id.clone()).or_default();
            node.node_id = id;
            node.census_seen = now;
            if !node.reported {
                node.last_seen = now;
            }
        }
    }

    /// Marks suspect the edges that sent nothing (not even a heartbeat) for `limit`. Returns
    /// them.
    pub fn silence(&mut self, now: Duration, limit: Duration) -> Vec<String> {
        let mut silent = Vec::new();
        for n in self.nodes.values_mut() {
            // A joining edge has no stream here to fall silent on.
            if n.reported && n.suspect_since.is_none() && now.saturating_sub(n.last_seen) >= limit {
                n.suspect_since = Some(now);
                silent.push(n.node_id.clone());
            }
        }
        silent
    }

    /// Counts every edge as just heard from: after this process itself stalled, the silence
    /// was its own.
    pub fn touch_all(&mut self, now: Duration) {
        for n in self.nodes.values_mut() {
            n.last_seen = n.last_seen.max(now);
        }
    }

    /// Whether every answer from this directory is whole under `ring`: no edge suspect, every
    /// edge's share reported for this ring.
    pub fn is_complete(&self, ring: &[String]) -> bool {
        self.nodes.values().all(|n| n.is_current(ring))
    }

    /// The edges whose share here may be missing connections under `ring`: joining, rebuilt
    /// from deltas, or last reported for another ring (suspect or not).
    pub fn behind(&self, ring: &[String]) -> BTreeSet<String> {
        self.nodes
            .values()
            .filter(|n| !n.whole || n.ring != ring)
            .map(|n| n.node_id.clone())
            .collect()
    }

    /// The edges known only from a census: their topic filters are unknown here.
    pub fn joining(&self) -> impl Iterator<Item = &str> {
        self.nodes
            .values()
            .filter(|n| !n.reported)
            .map(|n| n.node_id.as_str())
    }

    /// The edge's report stream of generation `stream` broke: keep its entries until the
    /// grace period passes, unless a newer stream from it is open.
    pub fn suspect(&mut self, node_id: &str, stream: u64, now: Duration) {
        if self.streams.get(node_id).is_some_and(|g| *g != stream) {
            return;
        }
        if let Some(n) = self.nodes.get_mut(node_id) {
            n.suspect_since.get_or_insert(now);
        }
    }

    /// Drops the edges suspect for longer than `grace`, and the joining ones no census has
    /// seen for `unseen`. Returns what changed.
    pub fn expire(&mut self, now: Duration, grace: Duration, unseen: Duration) -> Vec<Change> {
        let gone: Vec<String> = self
            .nodes
            .values()
            .filter(|n| {
                let suspect_too_long = n
                    .suspect_since
                    .is_some_and(|s| now.saturating_sub(s) >= grace);
                let vanished = !n.reported && now.saturating_sub(n.census_seen) >= unseen;
                suspect_too_long || vanished
            })
            .map(|n| n.node_id.clone())
            .collect();
        gone.iter().flat_map(|id| self.forget_node(id)).collect()
    }

    /// Drops everything an edge reported (it left or vanished).
    pub fn forget_node(&mut self, node_id: &str) -> Vec<Change> {
        let Some(node) = self.nodes.remove(node_id) else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        for id in &node.conns {
            if let Some(c) = self.conns.remove(id) {
                self.unindex_user(&c);
                changes.push(Change::Detached(c));
            }
        }
        changes.push(Change::NodeDown(node_id.to_owned()));
        changes
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn node(&self, node_id: &str) -> Option<&Node> {
        self.nodes.get(node_id)
    }

    /// The connections on edges that are not suspect.
    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.conns.values().filter(|c| self.is_live(c))
    }

    pub fn connection_count(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| !n.is_suspect())
            .map(Node::connection_count)
            .sum()
    }

    fn is_live(&self, c: &Connection) -> bool {
        self.nodes.get(&c.node_id).is_none_or(|n| !n.is_suspect())
    }

    /// The connections of `user` in `namespace` (every namespace when empty) on edges that
    /// are not suspect.
    pub fn locate(&self, namespace: &str, user: &str) -> Vec<Connection> {
        self.placed(namespace, user)
            .filter(|c| self.is_live(c))
            .cloned()
            .collect()
    }

    /// The connections of `user` in `namespace` (every namespace when empty), suspect edges
    /// included: where delivery must be tried (or reported unconfirmed).
    pub fn placed<'a>(
        &'a self,
        namespace: &'a str,
        user: &str,
    ) -> impl Iterator<Item = &'a Connection> + 'a {
        let ids = self.users.get(user).into_iter().flatten();
        ids.filter_map(|id| self.conns.get(id))
            .filter(move |c| namespace.is_empty() || c.namespace == namespace)
    }

    /// The edge holding a connection (suspect or not).
    pub fn node_of(&self, conn_id: &str) -> Option<&str> {
        self.conns.get(conn_id).map(|c| c.node_id.as_str())
    }

    /// Per edge (suspect ones included), how many of its active filters match `topic` in
    /// `namespace`: each answers a publication once.
    pub fn matching_filters(&self, namespace: &str, concrete: &str) -> BTreeMap<String, usize> {
        self.nodes
            .values()
            .map(|n| {
                let count = n.topics.iter();
                let count = count
                    .filter(|(ns, f)| ns == namespace && topic::matches(f, concrete))
                    .count();
                (n.node_id.clone(), count)
            })
            .filter(|(_, count)| *count > 0)
            .collect()
    }

    /// Users online in `namespace`, optionally only those subscribed to exactly `filter`.
    pub fn presence(&self, namespace: &str, filter: &str) -> BTreeSet<String> {
        self.connections()
            .filter(|c| c.namespace == namespace && !c.user.is_empty())
            .filter(|c| filter.is_empty() || c.topics.iter().any(|t| t == filter))
            .map(|c| c.user.clone())
            .collect()
    }

    /// One page of the connections matching `filter`, in conn id order, after `after`.
    pub fn list(
        &self,
        filter: &Filter,
        after: &str,
        limit: usize,
    ) -> (Vec<Connection>, Option<String>) {
        use std::ops::Bound::{Excluded, Unbounded};
        let start = if after.is_empty() {
            Unbounded
        } else {
            Excluded(after.to_owned())
        };
        let mut out: Vec<Connection> = Vec::new();
        for c in self
            .conns
            .range::<String, _>((start, Unbounded))
            .map(|(_, c)| c)
        {
            let keep = self.is_live(c)
                && (filter.namespace.is_empty() || c.namespace == filter.namespace)
                && (filter.user.is_empty() || c.user == filter.user)
                && (filter.node_id.is_empty() || c.node_id == filter.node_id)
                && (filter.topic.is_empty() || c.topics.contains(&filter.topic));
            if !keep {
                continue;
            }
            if out.len() == limit {
                return (out.clone(), out.last().map(|c| c.conn_id.clone()));
            }
            out.push(c.clone());
        }
        (out, None)
    }

    fn attach(&mut self, c: Connection) {
        if self.conns.contains_key(&c.conn_id) {
            self.detach(&c.conn_id);
        }
        self.nodes
            .entry(c.node_id.clone())
            .or_default()
            .conns
            .insert(c.conn_id.clone());
        self.users
            .entry(c.user.clone())
            .or_default()
            .insert(c.conn_id.clone());
        self.conns.insert(c.conn_id.clone(), c);
    }

    fn detach(&mut self, conn_id: &str) -> Option<Connection> {
        let c = self.conns.remove(conn_id)?;
        if let Some(node) = self.nodes.get_mut(&c.node_id) {
            node.conns.remove(conn_id);
        }
        self.unindex_user(&c);
        Some(c)
    }

    fn set_topic(&mut self, conn_id: &str, filter: &str, on: bool) {
        let Some(c) = self.conns.get_mut(conn_id) else {
            return;
        };
        let has = c.topics.iter().any(|t| t == filter);
        if on && !has {
            c.topics.push(filter.to_owned());
        } else if !on && has {
            c.topics.retain(|t| t != filter);
        }
    }

    fn unindex_user(&mut self, c: &Connection) {
        if let Some(set) = self.users.get_mut(&c.user) {
            set.remove(&c.conn_id);
            if set.is_empty() {
                self.users.remove(&c.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::{ConnRef, Delta, NodeTopic};

    fn conn(id: &str, ns: &str, user: &str) -> Delta {
        Delta {
            kind: Some(delta::Kind::Attach(Connection {
                conn_id: id.into(),
                namespace: ns.into(),
                user: user.into(),
                ..Connection::default()
            })),
        }
    }

    fn node_topic(ns: &str, t: &str, active: bool) -> Delta {
        let t = NodeTopic {
            namespace: ns.into(),
            topic: t.into(),
            active,
        };
        Delta {
            kind: Some(delta::Kind::NodeTopic(t)),
        }
    }

    fn batch(node: &str, full: bool, deltas: Vec<Delta>) -> ReportBatch {
        ReportBatch {
            node_id: node.into(),
            full,
            deltas,
            ..ReportBatch::default()
        }
    }

    const T: Duration = Duration::ZERO;

    #[test]
    fn locate_and_topics_follow_deltas() {
        let mut d = Directory::default();
        let deltas = vec![
            conn("c1", "a", "alice"),
            conn("c2", "b", "alice"),
            node_topic("a", "x/+", true),
        ];
        let changes = d.apply(batch("e1", true, deltas), T);
        assert_eq!(changes.len(), 3, "node up and two attaches: {changes:?}");
        d.apply(batch("e2", true, vec![conn("c3", "a", "alice")]), T);
        assert_eq!(d.locate("a", "alice").len(), 2);
        assert_eq!(d.locate("", "alice").len(), 3);
        assert_eq!(
            d.matching_filters("a", "x/1"),
            BTreeMap::from([("e1".to_owned(), 1)])
        );
        assert!(d.matching_filters("b", "x/1").is_empty());
        d.apply(batch("e1", false, vec![node_topic("a", "x/+", false)]), T);
        assert!(d.matching_filters("a", "x/1").is_empty());
        let detach = ConnRef {
            conn_id: "c1".into(),
            ..ConnRef::default()
        };
        let changes = d.apply(
            batch(
                "e1",
                false,
                vec![Delta {
                    kind: Some(delta::Kind::Detach(detach)),
                }],
            ),
            T,
        );
        assert!(matches!(&changes[..], [Change::Detached(c)] if c.conn_id == "c1"));
        // A full batch replaces the node's state: c3 is gone, and that is reported.
        let changes = d.apply(batch("e2", true, vec![]), T);
        assert!(matches!(&changes[..], [Change::Detached(c)] if c.conn_id == "c3"));
        assert_eq!(d.locate("", "alice").len(), 1);
    }

    #[test]
    fn full_batch_repeating_state_changes_nothing() {
        let mut d = Directory::default();
        d.apply(batch("e1", true, vec![conn("c1", "a", "u")]), T);
        let changes = d.apply(batch("e1", true, vec![conn("c1", "a", "u")]), T);
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn suspect_nodes_expire_after_grace() {
        let s = Duration::from_secs(1);
        let mut d = Directory::default();
        d.apply(batch("e1", true, vec![conn("c1", "a", "u")]), T);
        let g = d.open_stream("e1");
        d.suspect("e1", g, s);
        assert!(d.expire(2 * s, 5 * s, 60 * s).is_empty());
        assert_eq!(d.node("e1").map(Node::state), Some("suspect"));
        let changes = d.expire(6 * s, 5 * s, 60 * s);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(d.locate("a", "u").is_empty());
        // A node that comes back before the grace period is no longer suspect.
        d.apply(batch("e2", true, vec![conn("c2", "a", "u")]), T);
        let g = d.open_stream("e2");
        d.suspect("e2", g, s);
        // A newer stream makes the old one's end irrelevant.
        let newer = d.open_stream("e2");
        d.suspect("e2", g, s);
        assert_eq!(d.node("e2").map(Node::state), Some("ready"));
        d.suspect("e2", newer, s);

        d.apply(batch("e2", true, vec![conn("c2", "a", "u")]), 2 * s);
        assert!(d.expire(10 * s, 5 * s, 60 * s).is_empty());
    }

    #[test]
    fn a_suspect_edge_is_left_out_of_every_read_but_kept_for_delivery() {
        let s = Duration::from_secs(1);
        let ring = vec!["c1".to_owned()];
        let mut d = Directory::default();
        let full = |node: &str, deltas| ReportBatch {
            ring: ring.clone(),
            ..batch(node, true, deltas)
        };
        d.apply(
            full("e1", vec![conn("c1", "a", "u"), node_topic("a", "t", true)]),
            T,
        );
        d.apply(full("e2", vec![conn("c2", "a", "u")]), T);
        assert!(d.is_complete(&ring));
        // e2 goes on sending heartbeats (empty batches); e1 falls silent.
        d.apply(batch("e2", false, vec![]), 2 * s);
        assert!(
            d.silence(2 * s, 3 * s).is_empty(),
            "not yet silent for long enough"
        );
        assert_eq!(d.silence(3 * s, 3 * s), ["e1"]);
        assert!(!d.is_complete(&ring));
        assert_eq!(d.locate("a", "u").len(), 1);
        assert_eq!(d.connection_count(), 1);
        assert_eq!(d.connections().count(), 1);
        assert_eq!(d.list(&Filter::default(), "", 10).0.len(), 1);
        assert_eq!(d.presence("a", "").len(), 1);
        d.detach("c2");
        assert!(d.presence("a", "").is_empty());
        // Delivery still knows where the user is, and that the edge watches the topic.
        assert_eq!(d.placed("a", "u").count(), 1);
        assert_eq!(d.matching_filters("a", "t").len(), 1);
        // A heartbeat makes it whole again.
        d.apply(batch("e1", false, vec![]), 4 * s);
        assert!(d.is_complete(&ring));
        assert_eq!(d.locate("a", "u").len(), 1);
    }

    #[test]
    fn after_its_own_stall_the_directory_suspects_nobody() {
        let s = Duration::from_secs(1);
        let mut d = Directory::default();
        d.apply(batch("e1", true, vec![]), T);
        d.touch_all(10 * s);
        assert!(d.silence(11 * s, 3 * s).is_empty());
        assert_eq!(d.silence(13 * s, 3 * s), ["e1"]);
    }

    #[test]
    fn a_share_is_behind_until_a_full_batch_for_the_current_ring() {
        let old = vec!["c1".to_owned()];
        let new = vec!["c1".to_owned(), "c2".to_owned()];
        let mut d = Directory::default();
        let full = |ring: &Vec<String>| ReportBatch {
            ring: ring.clone(),
            ..batch("e1", true, vec![])
        };
        d.apply(full(&old), T);
        assert!(d.is_complete(&old));
        assert!(!d.is_complete(&new));
        assert_eq!(d.behind(&new), BTreeSet::from(["e1".to_owned()]));
        // Deltas do not change the ring a share was built for.
        d.apply(batch("e1", false, vec![conn("c1", "a", "u")]), T);
        assert_eq!(d.behind(&new), BTreeSet::from(["e1".to_owned()]));
        d.apply(full(&new), T);
        assert!(d.is_complete(&new));
        assert!(d.behind(&new).is_empty());
    }

    #[test]
    fn an_edge_forgotten_then_heard_again_is_asked_for_everything_until_it_sends_it() {
        let s = Duration::from_secs(1);
        let ring = vec!["c1".to_owned()];
        let mut d = Directory::default();
        d.apply(batch("e1", true, vec![conn("c1", "a", "u")]), T);
        assert!(!d.needs_full("e1"));
        d.silence(3 * s, 3 * s);
        d.expire(20 * s, 10 * s, 60 * s);
        // A heartbeat from the forgotten edge: known again, but only from deltas.
        d.apply(batch("e1", false, vec![]), 21 * s);
        assert!(d.needs_full("e1"));
        assert!(d.needs_full("e1"), "asked again until it comes");
        assert!(!d.is_complete(&ring));
        assert_eq!(d.behind(&ring), BTreeSet::from(["e1".to_owned()]));
        d.apply(
            ReportBatch {
                ring: ring.clone(),
                ..batch("e1", true, vec![conn("c1", "a", "u")])
            },
            22 * s,
        );
        assert!(!d.needs_full("e1"));
        assert!(d.is_complete(&ring));
    }

    #[test]
    fn an_edge_seen_on_the_bus_is_joining_until_it_reports() {
        let s = Duration::from_secs(1);
        let ring = vec!["c1".to_owned()];
        let mut d = Directory::default();
        d.seen_on_bus(["e1".to_owned()], T);
        assert_eq!(d.node("e1").map(Node::state), Some("joining"));
        assert!(!d.is_complete(&ring));
        assert_eq!(d.behind(&ring), BTreeSet::from(["e1".to_owned()]));
        assert_eq!(d.joining().collect::<Vec<_>>(), ["e1"]);
        // It has no stream here to fall silent on.
        assert!(d.silence(10 * s, 3 * s).is_empty());
        // Its first batch makes it whole, and announces it.
        let changes = d.apply(
            ReportBatch {
                ring: ring.clone(),
                ..batch("e1", true, vec![])
            },
            s,
        );
        assert_eq!(changes, [Change::NodeUp("e1".into())]);
        assert!(d.is_complete(&ring));
        assert_eq!(d.joining().count(), 0);
        // A joining edge that no census sees any more is dropped.
        d.seen_on_bus(["e2".to_owned()], T);
        assert!(d.expire(5 * s, 60 * s, 10 * s).is_empty());
        d.expire(10 * s, 60 * s, 10 * s);
        assert!(d.node("e2").is_none());
        assert!(d.node("e1").is_some());
    }

    #[test]
    fn a_suspect_edge_behind_the_ring_is_still_behind() {
        let s = Duration::from_secs(1);
        let old = vec!["c1".to_owned()];
        let new = vec!["c1".to_owned(), "c2".to_owned()];
        let mut d = Directory::default();
        d.apply(
            ReportBatch {
                ring: old,
                ..batch("e1", true, vec![])
            },
            T,
        );
        d.silence(3 * s, 3 * s);
        assert_eq!(d.behind(&new), BTreeSet::from(["e1".to_owned()]));
    }

    #[test]
    fn list_pages_in_id_order() {
        let mut d = Directory::default();
        let deltas = (0..5).map(|i| conn(&format!("c{i}"), "a", "u")).collect();
        d.apply(batch("e1", true, deltas), T);
        let f = Filter::default();
        let (page, next) = d.list(&f, "", 2);
        assert_eq!(
            page.iter().map(|c| c.conn_id.as_str()).collect::<Vec<_>>(),
            ["c0", "c1"]
        );
        let (page, next2) = d.list(&f, next.as_deref().unwrap(), 2);
        assert_eq!(page[0].conn_id, "c2");
        let (page, last) = d.list(&f, next2.as_deref().unwrap(), 2);
        assert_eq!(page.len(), 1);
        assert_eq!(last, None);
    }
}
