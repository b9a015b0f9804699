//! In-process [`HistoryStore`], for the embedded mode and unit tests.
//!
//! Each rule has one offset counter, shared by its topics as a JetStream stream's sequence
//! is; each (namespace, topic) a ring of its last `size + 1` publications with the time they
//! were stored (tokio's clock, so tests can pause it). The age limit is applied lazily: to a
//! topic when it is appended to or read, and to every topic of a rule at most once per half
//! `ttl` (so topics nobody uses again are forgotten). Every rule shares the instance's epoch,
//! random per instance: a new process (or a new `LocalHistory`) has lost the history.
//!
//! `append` also delivers the publication live, as JetStream's republish does for
//! `NatsHistory`: on the [`SharedBus`] it was given, on [`subject::live`] with the appended
//! headers, [`subject::HEADER_OFFSET`] and [`subject::HEADER_PREVIOUS`] (the offset of the
//! topic's last publication still stored, 0 for none: what JetStream's `Nats-Last-Sequence`
//! says, too), so that edges cannot tell the two apart. Appends to one instance
//! are published in offset order (the state lock is held while publishing).
//!
//! `complete` is exact: each topic remembers the highest offset it lost to a limit, and a
//! forgotten topic is covered by the highest offset its rule forgot.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use proto::subject;
use tokio::sync::{Mutex, MutexGuard};
use tokio::time::Instant;

use crate::history::{Appended, HistoryError, HistoryStore, Read, Rule, State, Stored};
use crate::{Headers, Outgoing, SharedBus};

/// The in-memory history. Cloning gives another handle to the same storage.
#[derive(Debug, Clone)]
pub struct LocalHistory {
    inner: Arc<Inner>,
}

impl LocalHistory {
    /// History that delivers stored publications live on `bus`, with a fresh random epoch.
    pub fn new(bus: SharedBus) -> Self {
        Self {
            inner: Arc::new(Inner {
                bus,
                epoch: RandomState::new().hash_one(0u8).to_string(),
                rules: Mutex::new(HashMap::new()),
            }),
        }
    }
}

#[derive(Debug)]
struct Inner {
    bus: SharedBus,
    epoch: String,
    /// Storage by rule pattern. A tokio mutex: held while publishing, so that live delivery
    /// is in offset order.
    rules: Mutex<HashMap<String, Storage>>,
}

/// One rule's storage.
#[derive(Debug)]
struct Storage {
    rule: Rule,
    /// The highest offset given (0: none yet).
    last: u64,
    topics: HashMap<(String, String), Ring>,
    /// The highest offset of a topic dropped from `topics` after its ring emptied.
    forgotten: u64,
    /// When every topic is next checked for age.
    sweep_at: Instant,
}

/// One topic's publications, oldest first.
#[derive(Debug)]
struct Ring {
    entries: VecDeque<Entry>,
    /// The highest offset removed by a limit (0: none).
    removed: u64,
}

#[derive(Debug)]
struct Entry {
    stored: Stored,
    at: Instant,
}

impl Inner {
    async fn lock(&self) -> MutexGuard<'_, HashMap<String, Storage>> {
        self.rules.lock().await
    }

    async fn ensure(&self, rules: &[Rule]) {
        let now = Instant::now();
        let mut storages = self.lock().await;
        for rule in rules {
            match storages.get_mut(&rule.pattern) {
                Some(storage) => storage.rule = rule.clone(),
                None => {
                    storages.insert(
                        rule.pattern.clone(),
                        Storage {
                            rule: rule.clone(),
                            last: 0,
                            topics: HashMap::new(),
                            forgotten: 0,
                            sweep_at: now + half(rule.ttl),
                        },
                    );
                }
            }
        }
    }

    async fn rules(&self) -> Vec<Rule> {
        let mut rules: Vec<Rule> = self.lock().await.values().map(|s| s.rule.clone()).collect();
        rules.sort_by(|a, b| a.pattern.cmp(&b.pattern));
        rules
    }

    async fn append(
        &self,
        rule: &Rule,
        namespace: &str,
        topic: &str,
        headers: Headers,
        payload: Bytes,
    ) -> Result<Appended, HistoryError> {
        if !proto::topic::matches(&rule.pattern, topic) {
            return Err(HistoryError::Unavailable(
                format!("topic {topic:?} is not in history rule {:?}", rule.pattern).into(),
            ));
        }
        if let Some((name, _)) = headers.iter().find(|(n, v)| !crate::is_valid_header(n, v)) {
            return Err(HistoryError::Unavailable(
                crate::BusError::InvalidHeader(name.to_owned()).into(),
            ));
        }
        let now = Instant::now();
        let mut storages = self.lock().await;
        let storage = storage(&mut storages, rule)?;
        storage.sweep(now);
        storage.last += 1;
        let offset = storage.last;
        let forgotten = storage.forgotten;
        let ring = storage
            .topics
            .entry((namespace.to_owned(), topic.to_owned()))
            .or_insert_with(|| Ring {
                // Never reported as complete across what a forgotten topic lost.
                removed: forgotten,
                entries: VecDeque::new(),
            });
        // As JetStream's `Nats-Last-Sequence`: the topic's last message still stored.
        ring.prune(&storage.rule, now);
        let previous = ring.entries.back().map_or(0, |e| e.stored.offset);
        ring.entries.push_back(Entry {
            stored: Stored {
                offset,
                headers: headers.clone(),
                payload: payload.clone(),
            },
            at: now,
        });
        ring.prune(&storage.rule, now);

        let mut live = Outgoing {
            subject: subject::live(namespace, topic.split('/')),
            reply: None,
            headers,
            payload,
        };
        live.headers
            .insert(subject::HEADER_OFFSET, offset.to_string());
        live.headers
            .insert(subject::HEADER_PREVIOUS, previous.to_string());
        // Published under the lock: live delivery in offset order. The in-process bus does
        // its work before returning the future, so this holds the lock only briefly.
        self.bus
            .publish(live)
            .await
            .map_err(|e| HistoryError::Unavailable(Box::new(e)))?;
        Ok(Appended {
            offset,
            epoch: self.epoch.clone(),
        })
    }

    async fn state(&self, rule: &Rule) -> Result<State, HistoryError> {
        let mut storages = self.lock().await;
        let storage = storage(&mut storages, rule)?;
        Ok(State {
            epoch: self.epoch.clone(),
            last: storage.last,
        })
    }

    async fn read(
        &self,
        rule: &Rule,
        namespace: &str,
        topic: &str,
        after: u64,
    ) -> Result<Read, HistoryError> {
        let now = Instant::now();
        let mut storages = self.lock().await;
        let storage = storage(&mut storages, rule)?;
        storage.sweep(now);
        let key = (namespace.to_owned(), topic.to_owned());
        let (messages, removed) = match storage.topics.get_mut(&key) {
            Some(ring) => {
                ring.prune(&storage.rule, now);
                let messages = ring
                    .entries
                    .iter()
                    .filter(|e| e.stored.offset > after)
                    .map(|e| e.stored.clone())
                    .collect();
                (messages, ring.removed)
            }
            None => (Vec::new(), storage.forgotten),
        };
        Ok(Read {
            epoch: self.epoch.clone(),
            last: storage.last,
            messages,
            complete: removed <= after,
        })
    }
}

impl Storage {
    /// Applies the age limit to every topic when due, forgetting the topics left empty.
    fn sweep(&mut self, now: Instant) {
        if now < self.sweep_at {
            return;
        }
        self.sweep_at = now + half(self.rule.ttl);
        let rule = &self.rule;
        let mut forgotten = self.forgotten;
        self.topics.retain(|_, ring| {
            ring.prune(rule, now);
            if ring.entries.is_empty() {
                forgotten = forgotten.max(ring.removed);
                return false;
            }
            true
        });
        self.forgotten = forgotten;
    }
}

impl Ring {
    /// Removes what the count and age limits no longer keep.
    fn prune(&mut self, rule: &Rule, now: Instant) {
        let keep = usize::try_from(rule.size.saturating_add(1)).unwrap_or(usize::MAX);
        while let Some(first) = self.entries.front() {
            if self.entries.len() <= keep && now < first.at + rule.ttl {
                break;
            }
            self.removed = self.removed.max(first.stored.offset);
            self.entries.pop_front();
        }
    }
}

impl HistoryStore for LocalHistory {
    fn ensure(&self, rules: &[Rule]) -> BoxFuture<'_, Result<(), HistoryError>> {
        let rules = rules.to_vec();
        Box::pin(async move {
            self.inner.ensure(&rules).await;
            Ok(())
        })
    }

    fn rules(&self) -> BoxFuture<'_, Result<Vec<Rule>, HistoryError>> {
        Box::pin(async move { Ok(self.inner.rules().await) })
    }

    fn append(
        &self,
        rule: &Rule,
        namespace: &str,
        topic: &str,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<Appended, HistoryError>> {
        let (rule, namespace, topic) = (rule.clone(), namespace.to_owned(), topic.to_owned());
        Box::pin(async move {
            self.inner
                .append(&rule, &namespace, &topic, headers, payload)
                .await
        })
    }

    fn state(&self, rule: &Rule) -> BoxFuture<'_, Result<State, HistoryError>> {
        let rule = rule.clone();
        Box::pin(async move { self.inner.state(&rule).await })
    }

    fn read(
        &self,
        rule: &Rule,
        namespace: &str,
        topic: &str,
        after: u64,
    ) -> BoxFuture<'_, Result<Read, HistoryError>> {
        let (rule, namespace, topic) = (rule.clone(), namespace.to_owned(), topic.to_owned());
        Box::pin(async move { self.inner.read(&rule, &namespace, &topic, after).await })
    }
}

/// The storage of `rule`, made by [`HistoryStore::ensure`]; like a missing stream, none is
/// [`HistoryError::Unavailable`].
fn storage<'a>(
    storages: &'a mut HashMap<String, Storage>,
    rule: &Rule,
) -> Result<&'a mut Storage, HistoryError> {
    storages.get_mut(&rule.pattern).ok_or_else(|| {
        HistoryError::Unavailable(format!("no history storage for rule {:?}", rule.pattern).into())
    })
}

fn half(ttl: Duration) -> Duration {
    (ttl / 2).max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalBus;

    fn rule(size: u64, ttl: u64) -> Rule {
        Rule {
            pattern: "chat/#".into(),
            size,
            ttl: Duration::from_secs(ttl),
        }
    }

    async fn history(rule: &Rule) -> LocalHistory {
        let h = LocalHistory::new(Arc::new(LocalBus::new(16)));
        h.ensure(std::slice::from_ref(rule)).await.unwrap();
        h
    }

    async fn append(h: &LocalHistory, rule: &Rule, topic: &str) -> u64 {
        h.append(rule, "ns", topic, Headers::default(), Bytes::new())
            .await
            .unwrap()
            .offset
    }

    #[tokio::test(start_paused = true)]
    async fn forgotten_topics_stay_incomplete() {
        let rule = rule(5, 10);
        let h = history(&rule).await;
        let a = append(&h, &rule, "chat/a").await;
        tokio::time::advance(Duration::from_secs(11)).await;
        // The sweep forgets chat/a (aged out, nobody touched it).
        append(&h, &rule, "chat/b").await;
        assert_eq!(h.inner.lock().await["chat/#"].topics.len(), 1);
        let read = h.read(&rule, "ns", "chat/a", 0).await.unwrap();
        assert!(read.messages.is_empty() && !read.complete);
        let read = h.read(&rule, "ns", "chat/a", a).await.unwrap();
        assert!(read.messages.is_empty() && read.complete);
        // A topic made after: unsure from before what was forgotten.
        let c = append(&h, &rule, "chat/c").await;
        let read = h.read(&rule, "ns", "chat/c", 0).await.unwrap();
        assert_eq!(read.messages.len(), 1);
        assert!(!read.complete);
        assert!(h.read(&rule, "ns", "chat/c", a).await.unwrap().complete);
        assert!(c > a);
    }

    #[tokio::test]
    async fn ensure_with_a_smaller_size_keeps_the_newest() {
        let rule = rule(5, 300);
        let h = history(&rule).await;
        let mut offsets = Vec::new();
        for _ in 0..6 {
            offsets.push(append(&h, &rule, "chat/a").await);
        }
        let smaller = Rule { size: 2, ..rule };
        h.ensure(std::slice::from_ref(&smaller)).await.unwrap();
        let read = h.read(&smaller, "ns", "chat/a", 0).await.unwrap();
        let got: Vec<u64> = read.messages.iter().map(|m| m.offset).collect();
        assert_eq!(got, offsets[3..]);
        assert!(!read.complete);
        assert!(
            h.read(&smaller, "ns", "chat/a", offsets[2])
                .await
                .unwrap()
                .complete
        );
        assert_eq!(h.rules().await.unwrap(), [smaller]);
    }
}
