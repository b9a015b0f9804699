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
        self.batch(deltas, true)
    }

    fn batch(&self, deltas: Vec<Delta>, full: bool) -> ReportBatch {
        ReportBatch {
            node_id: self.node_id.clone(),
            address: self.address.clone(),
            full,
            deltas,
            draining: self.draining,
            leaving: false,
        }
    }

    fn rebuild_if(&mut self, changed: bool) -> bool {
        if changed {
            self.ring = self.membership.ring();
        }
        changed
    }
}
