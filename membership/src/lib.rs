//! Coordinator membership and the consistent hash ring that shards placement.
//!
//! Coordinators announce themselves periodically over the bus; every process (coordinators
//! and edges) feeds the announcements it hears into a [`Membership`] and builds the same
//! [`Ring`] from it, so all agree on which coordinator owns which `namespace/user` key.
//!
//! **Invariant:** sans-io. No sockets, no clock: `now` is a parameter (time since an
//! arbitrary epoch of the caller's choosing).

use std::collections::BTreeMap;
use std::time::Duration;

/// Virtual nodes per coordinator: enough for an even spread over a handful of members.
const VNODES: usize = 64;

/// A live coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node_id: String,
    /// Its gRPC address, `host:port`.
    pub address: String,
    pub last_seen: Duration,
}

/// The coordinators heard from recently.
#[derive(Debug, Clone)]
pub struct Membership {
    members: BTreeMap<String, Member>,
    timeout: Duration,
}

impl Membership {
    /// `timeout`: a member silent for longer leaves.
    pub fn new(timeout: Duration) -> Self {
        Self {
            members: BTreeMap::new(),
            timeout,
        }
    }

    /// Records an announcement. Returns true when the set of members changed (the ring
    /// must be rebuilt); an address change of a known member also counts.
    pub fn observe(&mut self, node_id: &str, address: &str, leaving: bool, now: Duration) -> bool {
        if leaving {
            return self.members.remove(node_id).is_some();
        }
        match self.members.get_mut(node_id) {
            Some(m) => {
                m.last_seen = m.last_seen.max(now);
                if m.address != address {
                    m.address = address.to_owned();
                    return true;
                }
                false
            }
            None => {
                let m = Member {
                    node_id: node_id.to_owned(),
                    address: address.to_owned(),
                    last_seen: now,
                };
                self.members.insert(node_id.to_owned(), m);
                true
            }
        }
    }

    /// Drops members silent for longer than the timeout. Returns true if any left.
    pub fn expire(&mut self, now: Duration) -> bool {
        let before = self.members.len();
        let timeout = self.timeout;
        self.members
            .retain(|_, m| now.saturating_sub(m.last_seen) <= timeout);
        self.members.len() != before
    }

    /// Counts every member as just heard from: after this process's own bus outage, the
    /// missing announcements say nothing about the members.
    pub fn touch_all(&mut self, now: Duration) {
        for m in self.members.values_mut() {
            m.last_seen = m.last_seen.max(now);
        }
    }

    /// Removes a member known to be gone (e.g. its connection was refused).
    pub fn remove(&mut self, node_id: &str) -> bool {
        self.members.remove(node_id).is_some()
    }

    pub fn get(&self, node_id: &str) -> Option<&Member> {
        self.members.get(node_id)
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The ring over the current members.
    pub fn ring(&self) -> Ring {
        Ring::new(self.members.keys().cloned())
    }
}

/// Which coordinator owns which key.
#[derive(Clone)]
pub struct Ring {
    inner: consistent_hash_ring::Ring<String>,
    members: Vec<String>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("members", &self.members)
            .finish()
    }
}

impl PartialEq for Ring {
    fn eq(&self, other: &Self) -> bool {
        self.members == other.members
    }
}

impl Ring {
    pub fn new(members: impl IntoIterator<Item = String>) -> Self {
        let mut members: Vec<String> = members.into_iter().collect();
        members.sort();
        members.dedup();
        let inner = consistent_hash_ring::RingBuilder::default()
            .vnodes(VNODES)
            .nodes_iter(members.iter().cloned())
            .build();
        Self { inner, members }
    }

    /// The member owning `namespace/user`, or `None` on an empty ring.
    pub fn owner(&self, namespace: &str, user: &str) -> Option<&str> {
        self.owner_of(&key(namespace, user))
    }

    /// The member owning an arbitrary key.
    pub fn owner_of(&self, key: &str) -> Option<&str> {
        self.inner.try_get(key).map(String::as_str)
    }

    pub fn members(&self) -> &[String] {
        &self.members
    }

    pub fn contains(&self, node_id: &str) -> bool {
        self.members
            .binary_search_by(|m| m.as_str().cmp(node_id))
            .is_ok()
    }
}

/// The placement key of a user in a namespace.
pub fn key(namespace: &str, user: &str) -> String {
    format!("{namespace}/{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn members_join_expire_and_leave() {
        let mut m = Membership::new(3 * S);
        assert!(m.observe("c1", "a:1", false, S));
        assert!(!m.observe("c1", "a:1", false, 2 * S));
        assert!(m.observe("c2", "a:2", false, 2 * S));
        assert!(!m.observe("c2", "a:2", false, 4 * S));
        assert!(!m.expire(5 * S));
        assert!(m.expire(6 * S)); // c1 last seen at 2 s, timeout 3 s
        assert_eq!(
            m.members().map(|x| x.node_id.as_str()).collect::<Vec<_>>(),
            ["c2"]
        );
        assert!(m.observe("c2", "a:2", true, 6 * S));
        assert!(m.is_empty());
    }

    #[test]
    fn rings_agree_regardless_of_order_and_move_few_keys() {
        let a = Ring::new(["c1".to_owned(), "c2".to_owned(), "c3".to_owned()]);
        let b = Ring::new(["c3".to_owned(), "c1".to_owned(), "c2".to_owned()]);
        let keys: Vec<String> = (0..1000).map(|i| format!("ns/user{i}")).collect();
        for k in &keys {
            assert_eq!(a.owner_of(k), b.owner_of(k));
        }
        let two = Ring::new(["c1".to_owned(), "c2".to_owned()]);
        let moved = keys
            .iter()
            .filter(|k| a.owner_of(k) != two.owner_of(k))
            .count();
        let owned_by_c3 = keys.iter().filter(|k| a.owner_of(k) == Some("c3")).count();
        assert_eq!(moved, owned_by_c3, "only c3's keys move when c3 leaves");
        assert!(
            owned_by_c3 > 150 && owned_by_c3 < 500,
            "spread: {owned_by_c3}"
        );
        assert_eq!(Ring::new(Vec::new()).owner("a", "b"), None);
    }
}
