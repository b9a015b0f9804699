//! Topic history: publications on history topics kept per topic, bounded by count and age,
//! each with its position, so that a client that was away recovers what it missed
//! (docs/PROTOCOL.md §4.5 History and recovery).
//!
//! | implementation | what |
//! | --- | --- |
//! | `local_history::LocalHistory` | in-process rings, for the embedded mode and unit tests |
//! | `nats_history::NatsHistory` | one JetStream stream per rule, for cluster mode |
//!
//! **Positions.** Every stored publication has an `offset`, strictly increasing per topic
//! (not contiguous: offsets are shared by every topic of a rule), and the rule's storage has
//! an `epoch`, which changes whenever its history may have lost data (the storage was made
//! anew). A stored publication is delivered live on its topic subject
//! ([`proto::subject::topic`]) with the headers [`proto::subject::HEADER_OFFSET`] and
//! [`proto::subject::HEADER_PREVIOUS`] (the offset of the topic's publication before it, 0 for
//! none), so a receiver sees a gap in its live feed and can fill it with [`HistoryStore::read`].
//!
//! **Rules.** A rule is an MQTT filter applying in every namespace; rules never overlap
//! (configuration refuses it), so a topic belongs to at most one.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::Headers;

/// A shared handle to whichever history this process uses.
pub type SharedHistory = Arc<dyn HistoryStore>;

/// One history rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// An MQTT topic filter (`chat/#`), namespace-agnostic.
    pub pattern: String,
    /// Publications kept per topic (at least 1).
    pub size: u64,
    /// How long a publication is kept (non-zero).
    pub ttl: Duration,
}

/// What [`HistoryStore::append`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub offset: u64,
    pub epoch: String,
}

/// The state of a rule's storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub epoch: String,
    /// The highest offset given so far, over every topic of the rule (0: none yet).
    pub last: u64,
}

/// One stored publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub offset: u64,
    /// The headers it was appended with (message id, origin, trace context…).
    pub headers: Headers,
    pub payload: Bytes,
}

/// What [`HistoryStore::read`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub epoch: String,
    /// The rule's highest offset when read ([`State::last`]).
    pub last: u64,
    /// The topic's publications with an offset above the one asked for, oldest first.
    pub messages: Vec<Stored>,
    /// Nothing of the topic with an offset above the one asked for was removed (by the count
    /// or age limit): `messages` is everything published on it since. When unsure: false.
    pub complete: bool,
}

impl Read {
    /// The page a reader gets of this read, made after its position (`since_epoch`: the
    /// epoch it holds) or from the start (`None`): after a position, the first `limit`
    /// publications (the reader pages on from the last one); from the start, the last
    /// `limit`. `complete` then says the reader has everything from its position (or from
    /// the topic's first publication) up to the page's last; the flag, that the page was
    /// cut at `limit` after a position.
    pub fn page(mut self, since_epoch: Option<&str>, limit: usize) -> (Self, bool) {
        let n = self.messages.len();
        let cut = n > limit;
        match since_epoch {
            Some(epoch) => {
                self.complete &= epoch == self.epoch;
                self.messages.truncate(limit);
            }
            None => {
                self.complete &= !cut;
                self.messages.drain(..n - limit.min(n));
            }
        }
        (self, cut && since_epoch.is_some())
    }
}

/// Per-topic publication history with positions.
pub trait HistoryStore: Send + Sync + fmt::Debug + 'static {
    /// Makes sure each rule's storage exists with its limits (changing the limits of one
    /// made before with others). Edges call it at start.
    fn ensure(&self, rules: &[Rule]) -> BoxFuture<'_, Result<(), HistoryError>>;

    /// The rules whose storage exists (coordinators learn them here, not from routes).
    fn rules(&self) -> BoxFuture<'_, Result<Vec<Rule>, HistoryError>>;

    /// Stores a publication on `topic` (concrete, in `rule`) in `namespace` and delivers it
    /// live with its position headers. `headers` go with it, live and in storage.
    fn append(
        &self,
        rule: &Rule,
        namespace: &str,
        topic: &str,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<Appended, HistoryError>>;

    /// The rule's epoch and highest offset.
    fn state(&self, rule: &Rule) -> BoxFuture<'_, Result<State, HistoryError>>;

    /// The publications of `topic` in `namespace` with an offset above `after`, oldest
    /// first (at most `rule.size + 1` are ever stored per topic).
    fn read(
        &self,
        rule: &Rule,
        namespace: &str,
        topic: &str,
        after: u64,
    ) -> BoxFuture<'_, Result<Read, HistoryError>>;
}

/// What can go wrong in history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The publication is larger than storage accepts.
    #[error("publication of {size} bytes is larger than the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("history unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The rule `topic` (concrete) belongs to, if any.
pub fn rule_for<'r>(rules: &'r [Rule], topic: &str) -> Option<&'r Rule> {
    rules
        .iter()
        .find(|r| proto::topic::matches(&r.pattern, topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(offsets: &[u64]) -> Read {
        Read {
            epoch: "e".into(),
            last: 99,
            complete: true,
            messages: offsets
                .iter()
                .map(|o| Stored {
                    offset: *o,
                    headers: Headers::default(),
                    payload: Bytes::new(),
                })
                .collect(),
        }
    }

    fn offsets(r: &Read) -> Vec<u64> {
        r.messages.iter().map(|m| m.offset).collect()
    }

    #[test]
    fn pages_run_forward_after_a_position_and_backward_from_the_start() {
        let (p, more) = read(&[1, 2, 3]).page(None, 2);
        assert_eq!(offsets(&p), [2, 3]);
        assert!(
            !p.complete && !more,
            "the last two of three: not from the start"
        );
        let (p, more) = read(&[1, 2, 3]).page(None, 5);
        assert!(p.complete && !more && offsets(&p) == [1, 2, 3]);
        let (p, more) = read(&[2, 3]).page(Some("e"), 1);
        assert_eq!(offsets(&p), [2]);
        assert!(p.complete && more);
        assert!(!read(&[2]).page(Some("old"), 5).0.complete, "another epoch");
    }
}
