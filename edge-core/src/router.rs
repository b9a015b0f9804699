//! The uplink's ring router, pure: which coordinator each report delta goes to.
//!
//! The edge builds the same ring the coordinators do, from their announcements
//! ([`membership`], time a parameter). Each connection's deltas go to the owner of its
//! `namespace/user` key; node-level topic activations go to every coordinator. A mirror of
//! what was reported lets the router hand each coordinator its whole share
//! ([`Router::full_for`]) when the ring changes or a stream reconnects; the shell (the
//! uplink in `edge/src/uplink.rs`) keeps the streams and decides when to send.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use membership::{Member, Membership, Ring};
use proto::v1::{Connection, Delta, NodeTopic, ReportBatch, delta};

/// What was reported, and to whom each delta goes.
#[derive(Debug)]
pub struct Router {
    node_id: String,
    address: String,
    membership: Membership,
    /// Always the ring over `membership`'s members.
    ring: Ring,
    draining: bool,
    conns: HashMap<String, Connection>,
    topics: BTreeSet<(String, String)>,
}

impl Router {
    /// The router of edge `node_id` (clients connect at `address`); a coordinator silent
    /// for `member_timeout` leaves the ring.
    pub fn new(node_id: String, address: String, member_timeout: Duration) -> Self {
        Self {
            node_id,
            address,
            membership: Membership::new(member_timeout),
            ring: Ring::new(Vec::new()),
            draining: false,
            conns: HashMap::new(),
            topics: BTreeSet::new(),
        }
    }

    /// Records a coordinator's announcement (or a `ListNodes` answer). True when the ring
    /// changed: every coordinator's share may have moved, so each needs a full one.
    pub fn observe(&mut self, node_id: &str, address: &str, leaving: bool, now: Duration) -> bool {
        let changed = self.membership.observe(node_id, address, leaving, now);
        self.rebuild_if(changed)
    }

    /// Drops coordinators silent for too long; true when the ring changed.
    pub fn expire(&mut self, now: Duration) -> bool {
        let changed = self.membership.expire(now);
        self.rebuild_if(changed)
    }

    /// Counts every coordinator as just heard from (after this edge's own bus outage).
    pub fn touch_all(&mut self, now: Duration) {
        self.membership.touch_all(now);
    }

    /// Takes out a coordinator known to be gone; true when the ring changed.
    pub fn remove(&mut self, node_id: &str) -> bool {
        let changed = self.membership.remove(node_id);
        self.rebuild_if(changed)
    }

    /// The coordinators in the ring.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.membership.members()
    }

    /// Whether no coordinator is known.
    pub fn is_alone(&self) -> bool {
        self.membership.is_empty()
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Marks the batches this router makes as from a draining edge; true when that changed
    /// (the coordinators learn it from a full share).
    pub fn set_draining(&mut self, draining: bool) -> bool {
        std::mem::replace(&mut self.draining, draining) != draining
    }

    /// Applies a batch from the edge to the mirror and splits it by coordinator. A full
    /// batch gives every coordinator its full share.
    pub fn on_batch(&mut self, batch: ReportBatch) -> Vec<(String, ReportBatch)> {
        if batch.full {
            self.conns.clear();
            self.topics.clear();
        }
        let mut out: HashMap<String, Vec<Delta>> = HashMap::new();
        let everyone = self.ring.members();
        for d in batch.deltas {
            let Some(kind) = &d.kind else { continue };
            let owner = match kind {
                delta::Kind::Attach(c) => {
                    self.conns.insert(c.conn_id.clone(), c.clone());
                    self.ring.owner(&c.namespace, &c.user)
                }
                delta::Kind::Detach(r) => {
                    self.conns.remove(&r.conn_id);
                    self.ring.owner(&r.namespace, &r.user)
                }
                delta::Kind::Subscribe(t) | delta::Kind::Unsubscribe(t) => {
                    let on = matches!(kind, delta::Kind::Subscribe(_));
                    if let Some(c) = self.conns.get_mut(&t.conn_id) {
                        c.topics.retain(|x| *x != t.topic);
                        if on {
                            c.topics.push(t.topic.clone());
                        }
                    }
                    self.ring.owner(&t.namespace, &t.user)
                }
                delta::Kind::NodeTopic(t) => {
                    let key = (t.namespace.clone(), t.topic.clone());
                    if t.active {
                        self.topics.insert(key);
                    } else {
                        self.topics.remove(&key);
                    }
                    for id in everyone {
                        out.entry(id.clone()).or_default().push(d.clone());
                    }
                    continue;
                }
            };
            if let Some(owner) = owner {
                out.entry(owner.to_owned()).or_default().push(d);
            }
        }
        if batch.full {
            // The edge's whole state changed under us: everyone gets a full share.
            return everyone
                .iter()
                .map(|id| (id.clone(), self.full_for(id)))
                .collect();
        }
        out.into_iter()
            .map(|(id, deltas)| (id, self.batch(deltas, false)))
            .collect()
    }

    /// Everything coordinator `id` owns, plus every active topic.
    pub fn full_for(&self, id: &str) -> ReportBatch {
        let attach = self
            .conns
            .values()
            .filter(|c| self.ring.owner(&c.namespace, &c.user) == Some(id))
            .map(|c| delta::Kind::Attach(c.clone()));
        let topics = self.topics.iter().map(|(namespace, topic)| {
            delta::Kind::NodeTopic(NodeTopic {
                namespace: namespace.clone(),
                topic: topic.clone(),
                active: true,
            })
        });
        let deltas = attach
            .chain(topics)
            .map(|k| Delta { kind: Some(k) })
            .collect();
        ReportBatch {
            ring: self.ring.members().to_vec(),
            ..self.batch(deltas, true)
        }
    }

    /// An empty batch: "still here" when there is nothing to report.
    pub fn heartbeat(&self) -> ReportBatch {
        self.batch(Vec::new(), false)
    }

    fn batch(&self, deltas: Vec<Delta>, full: bool) -> ReportBatch {
        ReportBatch {
            node_id: self.node_id.clone(),
            address: self.address.clone(),
            full,
            deltas,
            draining: self.draining,
            leaving: false,
            ring: Vec::new(),
        }
    }

    fn rebuild_if(&mut self, changed: bool) -> bool {
        if changed {
            self.ring = self.membership.ring();
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use proto::v1::{ConnRef, TopicChange};

    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn router(coordinators: &[&str]) -> Router {
        let mut r = Router::new("edge-1".into(), "10.0.0.1:8080".into(), 10 * S);
        for c in coordinators {
            assert!(r.observe(c, &format!("{c}:50051"), false, S));
        }
        r
    }

    fn attach(id: &str, ns: &str, user: &str) -> delta::Kind {
        delta::Kind::Attach(Connection {
            conn_id: id.into(),
            node_id: "edge-1".into(),
            namespace: ns.into(),
            user: user.into(),
            ..Connection::default()
        })
    }

    fn change(id: &str, ns: &str, user: &str, topic: &str) -> TopicChange {
        TopicChange {
            conn_id: id.into(),
            namespace: ns.into(),
            user: user.into(),
            topic: topic.into(),
        }
    }

    fn node_topic(topic: &str, active: bool) -> delta::Kind {
        delta::Kind::NodeTopic(NodeTopic {
            namespace: "ns".into(),
            topic: topic.into(),
            active,
        })
    }

    fn batch(full: bool, kinds: Vec<delta::Kind>) -> ReportBatch {
        ReportBatch {
            node_id: "edge-1".into(),
            address: "10.0.0.1:8080".into(),
            full,
            deltas: kinds.into_iter().map(|k| Delta { kind: Some(k) }).collect(),
            ..ReportBatch::default()
        }
    }

    /// Two users of one namespace that the two-member ring gives to different owners.
    fn users_apart(r: &Router) -> (String, String, String, String) {
        let owner = |u: &str| r.ring().owner("ns", u).unwrap().to_owned();
        let first = "u0".to_owned();
        let other = (1..1000)
            .map(|i| format!("u{i}"))
            .find(|u| owner(u) != owner(&first))
            .expect("two owners among 1000 users");
        (owner(&first), first, owner(&other), other)
    }

    fn attached_ids(b: &ReportBatch) -> Vec<String> {
        let mut ids: Vec<String> = b
            .deltas
            .iter()
            .filter_map(|d| match &d.kind {
                Some(delta::Kind::Attach(c)) => Some(c.conn_id.clone()),
                _ => None,
            })
            .collect();
        ids.sort();
        ids
    }

    fn by_owner(out: Vec<(String, ReportBatch)>) -> HashMap<String, ReportBatch> {
        let n = out.len();
        let map: HashMap<_, _> = out.into_iter().collect();
        assert_eq!(map.len(), n, "one batch per coordinator");
        map
    }

    #[test]
    fn the_ring_follows_the_members() {
        let mut r = router(&[]);
        assert!(r.is_alone());
        assert!(r.observe("c1", "c1:50051", false, S));
        assert!(
            !r.observe("c1", "c1:50051", false, 2 * S),
            "heard again: no change"
        );
        assert!(r.observe("c2", "c2:50051", false, 2 * S));
        assert_eq!(r.ring().members(), ["c1", "c2"]);
        assert!(r.observe("c2", "c2:50051", true, 3 * S), "leaving");
        assert_eq!(r.ring().members(), ["c1"]);
        assert!(!r.expire(5 * S));
        r.touch_all(20 * S);
        assert!(!r.expire(25 * S), "touched at 20 s: alive until 30 s");
        assert!(r.expire(31 * S));
        assert!(r.ring().members().is_empty() && r.is_alone());
        assert!(r.observe("c3", "c3:50051", false, 32 * S));
        assert!(r.remove("c3"));
        assert!(!r.remove("c3"));
        assert!(r.ring().members().is_empty());
    }

    #[test]
    fn each_connection_delta_goes_to_the_owner_of_its_user() {
        let mut r = router(&["c1", "c2"]);
        let (owner_a, a, owner_b, b) = users_apart(&r);
        let out = by_owner(r.on_batch(batch(
            false,
            vec![
                attach("1", "ns", &a),
                attach("2", "ns", &b),
                delta::Kind::Subscribe(change("1", "ns", &a, "x")),
                delta::Kind::Detach(ConnRef {
                    conn_id: "2".into(),
                    namespace: "ns".into(),
                    user: b.clone(),
                }),
            ],
        )));
        assert_eq!(out.len(), 2);
        let kinds = |o: &str| -> Vec<&'static str> {
            out[o]
                .deltas
                .iter()
                .map(|d| match d.kind.as_ref().unwrap() {
                    delta::Kind::Attach(_) => "attach",
                    delta::Kind::Detach(_) => "detach",
                    delta::Kind::Subscribe(_) => "subscribe",
                    delta::Kind::Unsubscribe(_) => "unsubscribe",
                    delta::Kind::NodeTopic(_) => "topic",
                })
                .collect()
        };
        assert_eq!(kinds(&owner_a), ["attach", "subscribe"]);
        assert_eq!(kinds(&owner_b), ["attach", "detach"]);
        assert!(out.values().all(|b| !b.full && b.node_id == "edge-1"));
    }

    #[test]
    fn topic_activations_go_to_every_coordinator() {
        let mut r = router(&["c1", "c2", "c3"]);
        let out = by_owner(r.on_batch(batch(false, vec![node_topic("x/#", true)])));
        assert_eq!(out.len(), 3);
        for b in out.values() {
            assert_eq!(b.deltas.len(), 1);
        }
        let out = by_owner(r.on_batch(batch(false, vec![node_topic("x/#", false)])));
        assert_eq!(out.len(), 3);
        assert!(
            r.full_for("c1").deltas.is_empty(),
            "inactive: not in a share"
        );
    }

    #[test]
    fn a_full_share_is_what_the_coordinator_owns_as_it_stands() {
        let mut r = router(&["c1", "c2"]);
        let (owner_a, a, owner_b, b) = users_apart(&r);
        r.on_batch(batch(
            false,
            vec![
                attach("1", "ns", &a),
                attach("2", "ns", &b),
                attach("3", "ns", &a),
                node_topic("t", true),
            ],
        ));
        r.on_batch(batch(
            false,
            vec![
                delta::Kind::Subscribe(change("1", "ns", &a, "t")),
                delta::Kind::Subscribe(change("1", "ns", &a, "u")),
                delta::Kind::Unsubscribe(change("1", "ns", &a, "u")),
                delta::Kind::Detach(ConnRef {
                    conn_id: "3".into(),
                    namespace: "ns".into(),
                    user: a.clone(),
                }),
            ],
        ));
        let share_a = r.full_for(&owner_a);
        assert!(share_a.full);
        assert_eq!(attached_ids(&share_a), ["1"]);
        let c1 = share_a
            .deltas
            .iter()
            .find_map(|d| match &d.kind {
                Some(delta::Kind::Attach(c)) => Some(c),
                _ => None,
            })
            .unwrap();
        assert_eq!(c1.topics, ["t"], "the mirror follows subscriptions");
        assert_eq!(attached_ids(&r.full_for(&owner_b)), ["2"]);
        for share in [&share_a, &r.full_for(&owner_b)] {
            let topics = share
                .deltas
                .iter()
                .filter(|d| matches!(d.kind, Some(delta::Kind::NodeTopic(_))))
                .count();
            assert_eq!(topics, 1, "every share has every active topic");
        }
        // The ring changes: the lone coordinator now owns everything.
        assert!(r.observe(&owner_b, "", true, 2 * S));
        assert_eq!(attached_ids(&r.full_for(&owner_a)), ["1", "2"]);
    }

    #[test]
    fn a_full_batch_replaces_the_mirror_and_gives_everyone_a_share() {
        let mut r = router(&["c1", "c2"]);
        r.on_batch(batch(
            false,
            vec![attach("old", "ns", "u0"), node_topic("t", true)],
        ));
        let out = by_owner(r.on_batch(batch(
            true,
            vec![attach("1", "ns", "u0"), attach("2", "ns", "u1")],
        )));
        assert_eq!(out.len(), 2);
        assert!(out.values().all(|b| b.full));
        let mut all: Vec<String> = out.values().flat_map(attached_ids).collect();
        all.sort();
        assert_eq!(
            all,
            ["1", "2"],
            "the old state is gone, each connection once"
        );
        assert!(
            out.values()
                .all(|b| b.deltas.len() == attached_ids(b).len()),
            "the old topic is gone"
        );
    }

    #[test]
    fn with_no_coordinator_deltas_go_nowhere_but_are_remembered() {
        let mut r = router(&[]);
        assert!(
            r.on_batch(batch(false, vec![attach("1", "ns", "u0")]))
                .is_empty()
        );
        assert!(r.observe("c1", "c1:50051", false, S));
        assert_eq!(attached_ids(&r.full_for("c1")), ["1"]);
    }

    #[test]
    fn batches_say_whether_the_edge_drains() {
        let mut r = router(&["c1"]);
        assert!(!r.draining());
        assert!(r.set_draining(true));
        assert!(!r.set_draining(true), "no change");
        assert!(r.full_for("c1").draining);
        let out = r.on_batch(batch(false, vec![attach("1", "ns", "u0")]));
        assert!(out[0].1.draining);
        assert_eq!(out[0].1.address, "10.0.0.1:8080");
    }
}
