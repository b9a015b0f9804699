//! Topic history as the edge decides it, pure: where a client stands in a topic
//! ([`Position`]), what a topic pump knows of the live feed ([`Feed`]: which offset it has
//! delivered up to, whether a publication fills, repeats or skips), and whether a stored
//! read lets a client recover ([`recovery`]). The shell (`edge/src/registry.rs`) reads
//! storage and writes sockets; this module says what to do with what it read.
//!
//! **Offsets** are strictly increasing per topic but not contiguous (a rule's topics share
//! one sequence), so a gap shows in the live feed's *previous* header, which names the
//! offset of the topic's publication before this one: if the pump did not deliver that
//! one, it missed it.

use serde_json::Value;

/// A client's position in a topic: it has every publication up to `offset` in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub epoch: String,
}

/// The longest epoch a client may send (ours are decimal nanoseconds or 32 hex digits).
const MAX_EPOCH_LEN: usize = 64;

impl Position {
    /// A client's `since` field: `{"offset": <u64>, "epoch": "<text>"}`.
    pub fn from_json(v: &Value) -> Result<Self, &'static str> {
        let offset = v.get("offset").and_then(Value::as_u64);
        let epoch = v.get("epoch").and_then(Value::as_str);
        match (offset, epoch) {
            (Some(offset), Some(epoch)) if !epoch.is_empty() && epoch.len() <= MAX_EPOCH_LEN => {
                Ok(Self {
                    offset,
                    epoch: epoch.to_owned(),
                })
            }
            _ => Err("since must be {\"offset\": <non-negative integer>, \"epoch\": \"<text>\"}"),
        }
    }
}

/// A history rule as sessions see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// An MQTT filter, in every namespace.
    pub pattern: String,
    pub size: u64,
    /// Clients may use the `history` verb.
    pub read: bool,
}

/// The rule concrete `topic` belongs to (rules never overlap).
pub fn rule_for<'r>(rules: &'r [Rule], topic: &str) -> Option<&'r Rule> {
    rules
        .iter()
        .find(|r| proto::topic::matches(&r.pattern, topic))
}

/// What a live publication is to a pump that knows [`Feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// Deliver it: it follows what was delivered.
    Next,
    /// Delivered already (it was read from storage first): drop it.
    Repeat,
    /// Publications after `after` and before this one were missed: read them from storage
    /// and deliver them first.
    Gap { after: u64 },
}

/// A topic pump's position in its topic's live feed: every publication with an offset up to
/// `delivered` has been delivered to the pump's subscribers (or predates them all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feed {
    pub epoch: String,
    delivered: u64,
}

impl Feed {
    /// A feed whose subscription was up when storage's highest offset was `last`: whatever
    /// comes after arrives live.
    pub fn new(epoch: String, last: u64) -> Self {
        Self {
            epoch,
            delivered: last,
        }
    }

    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// What to do with a live publication at `offset` whose topic's previous one is
    /// `previous`.
    pub fn classify(&self, offset: u64, previous: u64) -> Live {
        if offset <= self.delivered {
            Live::Repeat
        } else if previous > self.delivered {
            Live::Gap {
                after: self.delivered,
            }
        } else {
            Live::Next
        }
    }

    /// Publications up to `offset` are delivered.
    pub fn advance(&mut self, offset: u64) {
        self.delivered = self.delivered.max(offset);
    }

    /// Where a client joining at `since` stands against this feed.
    pub fn join(&self, since: &Position) -> Standing {
        if since.epoch != self.epoch {
            Standing::OtherEpoch
        } else if since.offset > self.delivered {
            // Another edge's feed delivered more than this one so far: what lies between is
            // still on its way here, and the client has it.
            Standing::Ahead
        } else if since.offset == self.delivered {
            // Nothing of the topic lies between: what comes after the feed arrives live.
            Standing::Current
        } else {
            Standing::Behind
        }
    }

    /// Storage was made anew (its epoch changed): positions start over.
    pub fn restart(&mut self, epoch: String, last: u64) {
        self.epoch = epoch;
        self.delivered = last;
    }
}

/// Where a joining client stands against a feed ([`Feed::join`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It has everything the feed delivered: recovered, nothing to send.
    Current,
    /// It has more than the feed delivered so far (from another edge, whose feed is ahead):
    /// it must wait until this feed has delivered up to its position, or it would get those
    /// publications again.
    Ahead,
    /// It missed what the feed delivered after its position: read storage from there.
    Behind,
    /// Its position is in another epoch: not recovered.
    OtherEpoch,
}

/// Whether a client at `since` recovers from a read of storage made after it (`epoch` and
/// `complete` as read), given that the feed has delivered up to `delivered`: the client
/// then gets the stored publications with offsets in `(since.offset, delivered]`.
pub fn recovery(since: &Position, epoch: &str, complete: bool, delivered: u64) -> bool {
    since.epoch == epoch && complete && since.offset <= delivered
}

/// A page of a topic's history, for the `history` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub epoch: String,
    /// The rule's highest offset when read.
    pub last: u64,
    /// The client has everything from its position (or the topic's start) to the last one.
    pub complete: bool,
    /// The page was cut at the limit: ask again from its last offset.
    pub more: bool,
    /// Oldest first.
    pub messages: Vec<Entry>,
}

/// One stored publication in a [`Page`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    /// The payload as JSON text; for a binary publication, a JSON string of its bytes in
    /// base64 (a page is one JSON frame).
    pub payload: String,
    pub binary: bool,
}

/// A `history` verb to run: read `topic` after `since` (or its last `limit`).
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryCall {
    pub topic: String,
    pub since: Option<Position>,
    pub limit: u64,
    pub id: Option<Value>,
}

impl HistoryCall {
    /// The offset storage is read after (0: from the start).
    pub fn after(&self) -> u64 {
        self.since.as_ref().map_or(0, |p| p.offset)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn since_must_name_an_offset_and_an_epoch() {
        let p = Position::from_json(&json!({"offset": 41, "epoch": "e"})).unwrap();
        assert_eq!(p.offset, 41);
        for bad in [
            json!(null),
            json!(41),
            json!({"offset": -1, "epoch": "e"}),
            json!({"offset": 1.5, "epoch": "e"}),
            json!({"offset": 1}),
            json!({"offset": 1, "epoch": ""}),
            json!({"offset": 1, "epoch": "x".repeat(65)}),
        ] {
            assert!(Position::from_json(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_feed_tells_next_repeat_and_gap_apart() {
        let mut f = Feed::new("e".into(), 10);
        assert_eq!(
            f.classify(12, 3),
            Live::Next,
            "previous before the feed began"
        );
        assert_eq!(f.classify(12, 10), Live::Next);
        assert_eq!(f.classify(9, 3), Live::Repeat);
        assert_eq!(f.classify(10, 3), Live::Repeat);
        assert_eq!(f.classify(15, 12), Live::Gap { after: 10 });
        f.advance(15);
        assert_eq!(f.delivered(), 15);
        f.advance(13);
        assert_eq!(f.delivered(), 15, "never backwards");
        assert_eq!(f.classify(14, 12), Live::Repeat);
        f.restart("e2".into(), 0);
        assert_eq!(f.classify(1, 0), Live::Next);
    }

    #[test]
    fn a_joiner_is_current_ahead_behind_or_in_another_epoch() {
        let f = Feed::new("e".into(), 10);
        let at = |o, e: &str| Position {
            offset: o,
            epoch: e.into(),
        };
        assert_eq!(f.join(&at(10, "e")), Standing::Current);
        assert_eq!(
            f.join(&at(12, "e")),
            Standing::Ahead,
            "ahead of this edge's feed"
        );
        assert_eq!(f.join(&at(3, "e")), Standing::Behind);
        assert_eq!(f.join(&at(10, "f")), Standing::OtherEpoch);
    }

    #[test]
    fn recovery_needs_the_same_epoch_and_a_complete_read() {
        let at = |o| Position {
            offset: o,
            epoch: "e".into(),
        };
        assert!(recovery(&at(5), "e", true, 9));
        assert!(recovery(&at(9), "e", true, 9), "nothing missed");
        assert!(!recovery(&at(5), "e", false, 9), "removed since");
        assert!(!recovery(&at(5), "f", true, 9), "storage made anew");
        assert!(
            !recovery(&at(12), "e", true, 9),
            "a position from the future"
        );
    }
}
