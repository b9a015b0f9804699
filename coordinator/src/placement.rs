//! The placement directory: which connection of which user in which namespace is on which
//! edge, and which edges watch which topic filters. Fed by edge report batches.
//!
//! **Invariant:** sans-io. No sockets, no clock reads: time comes in as a parameter. Applying
//! a delta twice is harmless (attach replaces, detach and unsubscribe of something absent do
//! nothing), so an edge may re-send its whole state at any time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use proto::topic;
use proto::v1::{Connection, ReportBatch, delta};

/// An edge as placement knows it.
#[derive(Debug, Clone, Default)]
pub struct Node {
    pub node_id: String,
    pub address: String,
    /// When the last batch arrived, as time since an arbitrary epoch chosen by the caller.
    pub last_seen: Duration,
    conns: BTreeSet<String>,
    /// (namespace, filter) → local subscriber count.
    topics: HashMap<(String, String), u32>,
}

impl Node {
    pub fn connection_count(&self) -> usize {
        self.conns.len()
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

#[derive(Debug, Default)]
pub struct Directory {
    conns: BTreeMap<String, Connection>,
    users: HashMap<String, BTreeSet<String>>,
    nodes: BTreeMap<String, Node>,
}

impl Directory {
    /// Applies one report batch from an edge. A full batch replaces everything that edge had.
    pub fn apply(&mut self, batch: ReportBatch, now: Duration) {
        let node_id = batch.node_id.clone();
        if batch.full {
            self.forget_node(&node_id);
        }
        let node = self.nodes.entry(node_id.clone()).or_default();
        node.node_id.clone_from(&node_id);
        if !batch.address.is_empty() {
            node.address = batch.address;
        }
        node.last_seen = now;
        for d in batch.deltas {
            match d.kind {
                Some(delta::Kind::Attach(mut c)) => {
                    c.node_id.clone_from(&node_id);
                    self.attach(c);
                }
                Some(delta::Kind::Detach(r)) => self.detach(&r.conn_id),
                Some(delta::Kind::Subscribe(t)) => {
                    self.subscribe(&node_id, &t.conn_id, &t.namespace, &t.topic)
                }
                Some(delta::Kind::Unsubscribe(t)) => {
                    self.unsubscribe(&t.conn_id, &t.namespace, &t.topic)
                }
                None => {}
            }
        }
    }

    /// Drops everything an edge reported (it left or vanished).
    pub fn forget_node(&mut self, node_id: &str) {
        let Some(node) = self.nodes.remove(node_id) else {
            return;
        };
        for id in node.conns {
            if let Some(c) = self.conns.remove(&id) {
                self.unindex_user(&c);
            }
        }
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The connections of `user` in `namespace` (every namespace when empty).
    pub fn locate(&self, namespace: &str, user: &str) -> Vec<Connection> {
        let Some(ids) = self.users.get(user) else {
            return Vec::new();
        };
        ids.iter()
            .filter_map(|id| self.conns.get(id))
            .filter(|c| namespace.is_empty() || c.namespace == namespace)
            .cloned()
            .collect()
    }

    /// The edge holding a connection.
    pub fn node_of(&self, conn_id: &str) -> Option<&str> {
        self.conns.get(conn_id).map(|c| c.node_id.as_str())
    }

    /// The edges holding `user` (in `namespace`, or any when empty).
    pub fn nodes_of_user(&self, namespace: &str, user: &str) -> BTreeSet<String> {
        self.locate(namespace, user)
            .into_iter()
            .map(|c| c.node_id)
            .collect()
    }

    /// The edges with a local watcher of a filter matching `topic` in `namespace`.
    pub fn nodes_watching(&self, namespace: &str, concrete: &str) -> BTreeSet<String> {
        self.nodes
            .values()
            .filter(|n| {
                n.topics
                    .keys()
                    .any(|(ns, f)| ns == namespace && topic::matches(f, concrete))
            })
            .map(|n| n.node_id.clone())
            .collect()
    }

    /// How many (edge, filter) pairs match `topic` in `namespace`: each answers a publication
    /// once.
    pub fn matching_filters(&self, namespace: &str, concrete: &str) -> usize {
        self.nodes
            .values()
            .map(|n| {
                n.topics
                    .keys()
                    .filter(|(ns, f)| ns == namespace && topic::matches(f, concrete))
                    .count()
            })
            .sum()
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
        let mut out = Vec::new();
        let mut next = None;
        for (id, c) in self.conns.range((start, Unbounded)) {
            let keep = (filter.namespace.is_empty() || c.namespace == filter.namespace)
                && (filter.user.is_empty() || c.user == filter.user)
                && (filter.node_id.is_empty() || c.node_id == filter.node_id)
                && (filter.topic.is_empty() || c.topics.contains(&filter.topic));
            if !keep {
                continue;
            }
            if out.len() == limit {
                next = out.last().map(|c: &Connection| c.conn_id.clone());
                break;
            }
            out.push(c.clone());
            let _ = id;
        }
        (out, next)
    }

    fn attach(&mut self, c: Connection) {
        if self.conns.contains_key(&c.conn_id) {
            self.detach(&c.conn_id);
        }
        let node = self.nodes.entry(c.node_id.clone()).or_default();
        node.conns.insert(c.conn_id.clone());
        for t in &c.topics {
            *node
                .topics
                .entry((c.namespace.clone(), t.clone()))
                .or_default() += 1;
        }
        self.users
            .entry(c.user.clone())
            .or_default()
            .insert(c.conn_id.clone());
        self.conns.insert(c.conn_id.clone(), c);
    }

    fn detach(&mut self, conn_id: &str) {
        let Some(c) = self.conns.remove(conn_id) else {
            return;
        };
        if let Some(node) = self.nodes.get_mut(&c.node_id) {
            node.conns.remove(conn_id);
            for t in &c.topics {
                decrement(&mut node.topics, &(c.namespace.clone(), t.clone()));
            }
        }
        self.unindex_user(&c);
    }

    fn subscribe(&mut self, node_id: &str, conn_id: &str, namespace: &str, filter: &str) {
        let Some(c) = self.conns.get_mut(conn_id) else {
            return;
        };
        if c.topics.iter().any(|t| t == filter) {
            return;
        }
        c.topics.push(filter.to_owned());
        let node = self.nodes.entry(node_id.to_owned()).or_default();
        *node
            .topics
            .entry((namespace.to_owned(), filter.to_owned()))
            .or_default() += 1;
    }

    fn unsubscribe(&mut self, conn_id: &str, namespace: &str, filter: &str) {
        let Some(c) = self.conns.get_mut(conn_id) else {
            return;
        };
        let before = c.topics.len();
        c.topics.retain(|t| t != filter);
        if c.topics.len() == before {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&c.node_id) {
            decrement(&mut node.topics, &(namespace.to_owned(), filter.to_owned()));
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

fn decrement(map: &mut HashMap<(String, String), u32>, key: &(String, String)) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::{ConnRef, Delta, TopicChange};

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

    fn batch(node: &str, full: bool, deltas: Vec<Delta>) -> ReportBatch {
        ReportBatch {
            node_id: node.into(),
            address: String::new(),
            full,
            deltas,
        }
    }

    #[test]
    fn locate_and_topics_follow_deltas() {
        let mut d = Directory::default();
        let sub = |id: &str, t: &str| Delta {
            kind: Some(delta::Kind::Subscribe(TopicChange {
                conn_id: id.into(),
                namespace: "a".into(),
                user: String::new(),
                topic: t.into(),
            })),
        };
        d.apply(
            batch(
                "e1",
                true,
                vec![
                    conn("c1", "a", "alice"),
                    conn("c2", "b", "alice"),
                    sub("c1", "x/+"),
                ],
            ),
            Duration::ZERO,
        );
        d.apply(
            batch("e2", true, vec![conn("c3", "a", "alice")]),
            Duration::ZERO,
        );
        assert_eq!(d.locate("a", "alice").len(), 2);
        assert_eq!(d.locate("", "alice").len(), 3);
        assert_eq!(
            d.nodes_watching("a", "x/1"),
            BTreeSet::from(["e1".to_owned()])
        );
        assert!(d.nodes_watching("b", "x/1").is_empty());
        // Idempotent: the same subscribe twice counts once; detach removes the watcher.
        d.apply(batch("e1", false, vec![sub("c1", "x/+")]), Duration::ZERO);
        let detach = Delta {
            kind: Some(delta::Kind::Detach(ConnRef {
                conn_id: "c1".into(),
                ..ConnRef::default()
            })),
        };
        d.apply(batch("e1", false, vec![detach]), Duration::ZERO);
        assert!(d.nodes_watching("a", "x/1").is_empty());
        // A full batch replaces the node's state.
        d.apply(batch("e2", true, vec![]), Duration::ZERO);
        assert_eq!(d.locate("", "alice").len(), 1);
    }

    #[test]
    fn list_pages_in_id_order() {
        let mut d = Directory::default();
        let deltas = (0..5).map(|i| conn(&format!("c{i}"), "a", "u")).collect();
        d.apply(batch("e1", true, deltas), Duration::ZERO);
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
