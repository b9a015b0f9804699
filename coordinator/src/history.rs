//! Topic history as coordinators see it: which topics keep history (the rules, learned
//! from storage, where edges made them: coordinators read no routes), and the `History`
//! call's reads.

use std::sync::{Mutex, PoisonError};

use bus::history::{Read, Rule, SharedHistory};
use proto::v1::{HistoryEntry, HistoryResponse};

/// The history store and the rules it keeps, refreshed from it.
#[derive(Debug)]
pub struct TopicHistory {
    pub(crate) store: SharedHistory,
    rules: Mutex<Vec<Rule>>,
}

impl TopicHistory {
    pub fn new(store: SharedHistory) -> Self {
        Self {
            store,
            rules: Mutex::new(Vec::new()),
        }
    }

    /// Learns the rules again from storage: a rule an edge made since then applies from now
    /// on. A rule learnt before stays (until this process restarts) when its storage is
    /// gone: an operator deleted the stream to reset that history, and the next publication
    /// makes it anew rather than going out unstored.
    pub async fn refresh(&self) {
        match self.store.rules().await {
            Ok(listed) => {
                let mut rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
                rules.retain(|r| !listed.iter().any(|l| l.pattern == r.pattern));
                rules.extend(listed);
            }
            Err(error) => tracing::debug!(%error, "history rules not refreshed"),
        }
    }

    /// The rule of concrete `topic`, if it keeps history.
    pub fn rule_for(&self, topic: &str) -> Option<Rule> {
        let rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        bus::history::rule_for(&rules, topic).cloned()
    }
}

/// The answer to a `History` call: a read made after the caller's position (with its
/// epoch) or from the start, cut to `limit`.
pub(crate) fn page(read: Read, since_epoch: Option<&str>, limit: usize) -> HistoryResponse {
    let (read, more) = read.page(since_epoch, limit);
    HistoryResponse {
        epoch: read.epoch,
        offset: read.last,
        complete: read.complete,
        more,
        messages: read
            .messages
            .into_iter()
            .map(|m| {
                let binary = m.headers.get(proto::subject::HEADER_BINARY).is_some();
                HistoryEntry {
                    offset: m.offset,
                    message_id: m
                        .headers
                        .get(proto::subject::HEADER_MESSAGE_ID)
                        .unwrap_or_default()
                        .to_owned(),
                    payload_json: match binary {
                        true => String::new(),
                        false => proto::frame::json_or_string(&m.payload),
                    },
                    payload_binary: binary.then(|| m.payload.to_vec()),
                }
            })
            .collect(),
    }
}
