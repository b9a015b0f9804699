//! The message bus every Switchboard process talks over.
//!
//! One trait, [`Bus`], with NATS subject semantics (`.`-separated tokens, `*` matches one
//! token, `>` matches one or more trailing tokens, queue groups, headers, request/reply with
//! a timeout and "no responders"), and one for key-value buckets with watch,
//! [`ResourceStore`]; each with an in-process and a NATS implementation:
//!
//! | module | what |
//! | --- | --- |
//! | [`history`] | the [`HistoryStore`] trait: topic history with positions, for recovery |
//! | [`local_history`] | in-process history: rings per topic, delivered live on the local bus |
//! | [`nats_history`] | history over JetStream: one stream per rule, republished live by the server |
//! | [`local`] | in-process bus for the embedded mode and unit tests |
//! | [`nats`] | async-nats client for cluster mode |
//! | [`store`] | the [`ResourceStore`] trait: buckets of resource items and revocations |
//! | [`local_store`] | in-process store |
//! | [`nats_store`] | store over NATS JetStream key-value buckets |
//! | [`tls`] | the TLS configs the binary hands down; the [`tls::Dialer`] of the coordinators' gRPC listener |
//! | [`trace`] | W3C trace context in bus headers and gRPC metadata |
//! | [`metrics`] | Prometheus text primitives the edge and the coordinator share |
//! | `testkit` | a real `nats-server` for tests (feature `testkit`) |
//!
//! Both buses pass the same conformance suite (`bus/tests/conformance.rs`), both stores theirs
//! (`bus/tests/store_conformance.rs`), both histories theirs (`bus/tests/history_conformance.rs`).
//!
//! **Invariant:** every queue here is bounded; a subscriber that falls behind loses messages
//! (counted in [`Subscription::dropped`]) rather than stalling the publisher, as NATS does.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use futures::future::BoxFuture;

pub mod history;
pub mod local;
pub mod local_history;
pub mod local_store;
pub mod metrics;
pub mod nats;
pub mod nats_history;
pub mod nats_store;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tls;
pub mod trace;

pub use history::{HistoryError, HistoryStore, SharedHistory};
pub use local::LocalBus;
pub use local_history::LocalHistory;
pub use local_store::LocalStore;
pub use nats::{NatsAuth, NatsBus, NatsOptions, NatsTls};
pub use nats_history::{NatsHistory, NatsHistoryOptions};
pub use nats_store::{NatsStore, NatsStoreOptions};
pub use store::{Change, ResourceStore, SharedStore, StoreError, StoreWatch};

/// A shared handle to whichever bus this process runs on.
pub type SharedBus = Arc<dyn Bus>;

/// Publish/subscribe/request over subjects, with NATS semantics.
pub trait Bus: Send + Sync + fmt::Debug + 'static {
    /// Publishes one message. Returns once the message is handed to the bus (buffered), not
    /// when anyone received it.
    fn publish(&self, msg: Outgoing) -> BoxFuture<'_, Result<(), BusError>>;

    /// Subscribes to `subject` (wildcards allowed). With `queue`, each message goes to one
    /// member of the group. Dropping the [`Subscription`] unsubscribes.
    ///
    /// When this returns (and the bus is connected), the subscription is registered: a message
    /// published afterwards by anyone is delivered to it.
    fn subscribe(
        &self,
        subject: String,
        queue: Option<String>,
    ) -> BoxFuture<'_, Result<Subscription, BusError>>;

    /// Sends `msg` with a fresh reply inbox and waits for the first reply.
    /// [`BusError::NoResponders`] when nobody is subscribed to the subject,
    /// [`BusError::Timeout`] when nobody answered in time.
    fn request(&self, msg: Outgoing, timeout: Duration)
    -> BoxFuture<'_, Result<Message, BusError>>;

    /// A subject unique to this process that can be subscribed to for replies.
    fn new_inbox(&self) -> String;

    /// Waits until everything published so far has been handed to the server.
    fn flush(&self) -> BoxFuture<'_, Result<(), BusError>>;

    /// Whether the bus is connected now (for `/readyz`).
    fn is_connected(&self) -> bool;

    /// How many times the connection was re-established since start.
    fn reconnects(&self) -> u64;
}

/// A message to publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outgoing {
    pub subject: String,
    pub reply: Option<String>,
    pub headers: Headers,
    pub payload: Bytes,
}

impl Outgoing {
    pub fn new(subject: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            subject: subject.into(),
            payload: payload.into(),
            ..Self::default()
        }
    }

    pub fn with_reply(mut self, reply: impl Into<String>) -> Self {
        self.reply = Some(reply.into());
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name, value);
        self
    }
}

/// A received message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    pub reply: Option<String>,
    pub headers: Headers,
    pub payload: Bytes,
}

/// Message headers: an ordered list of name/value pairs; names compare case-sensitively,
/// as in NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// Sets `name` to `value`, replacing any earlier value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let (name, value) = (name.into(), value.into());
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

/// A live subscription: a stream of messages. Dropping it unsubscribes.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = Message> + Send>>,
    dropped: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl Subscription {
    pub fn new(
        inner: Pin<Box<dyn Stream<Item = Message> + Send>>,
        dropped: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Self {
        Self { inner, dropped }
    }

    /// Messages this subscription lost because its queue was full.
    pub fn dropped(&self) -> u64 {
        (self.dropped)()
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// What can go wrong on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("no responders on {subject}")]
    NoResponders { subject: String },
    #[error("no reply on {subject} within {timeout:?}")]
    Timeout { subject: String, timeout: Duration },
    #[error("invalid subject {0:?}")]
    InvalidSubject(String),
    /// A header name is empty, not printable ASCII or contains `:`, or a value contains CR/LF.
    #[error("invalid header {0:?}")]
    InvalidHeader(String),
    #[error("bus connection failed")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("bus operation failed")]
    Io(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("bus is closed")]
    Closed,
}

pub use proto::subject::{is_valid_publish_subject, is_valid_subject};

/// Whether `queue` is a valid queue group name: non-empty, no whitespace.
pub fn is_valid_queue_group(queue: &str) -> bool {
    !queue.is_empty() && !queue.chars().any(char::is_whitespace)
}

/// Whether `name: value` can travel as a NATS header: the name is non-empty printable ASCII
/// without `:`, the value has no CR or LF.
pub fn is_valid_header(name: &str, value: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        && !value.contains(['\r', '\n'])
}

/// Checks everything about `msg` that the server would reject, before it leaves the process.
pub(crate) fn validate_outgoing(msg: &Outgoing) -> Result<(), BusError> {
    if !is_valid_publish_subject(&msg.subject) {
        return Err(BusError::InvalidSubject(msg.subject.clone()));
    }
    if let Some(reply) = &msg.reply
        && !is_valid_publish_subject(reply)
    {
        return Err(BusError::InvalidSubject(reply.clone()));
    }
    if let Some((name, _)) = msg.headers.iter().find(|(n, v)| !is_valid_header(n, v)) {
        return Err(BusError::InvalidHeader(name.to_owned()));
    }
    Ok(())
}

/// Checks a subscription's subject and queue group.
pub(crate) fn validate_subscription(subject: &str, queue: Option<&str>) -> Result<(), BusError> {
    if !is_valid_subject(subject) {
        return Err(BusError::InvalidSubject(subject.to_owned()));
    }
    if let Some(queue) = queue
        && !is_valid_queue_group(queue)
    {
        return Err(BusError::InvalidSubject(queue.to_owned()));
    }
    Ok(())
}

/// Whether a subscription `pattern` matches a concrete `subject`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut pat = pattern.split('.');
    let mut sub = subject.split('.');
    loop {
        match (pat.next(), sub.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(s)) if p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_subjects() {
        for ok in [
            "a",
            "a.b.c",
            "a.*",
            "*",
            ">",
            "a.>",
            "*.b.>",
            "_INBOX.x1",
            "a-b_c.d",
        ] {
            assert!(is_valid_subject(ok), "{ok:?} should be valid");
        }
        for bad in [
            "", ".", "a.", ".a", "a..b", "a.>.b", ">.a", "a b", "a\tb", "a*", "*a.b", "a.>x",
        ] {
            assert!(!is_valid_subject(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn publish_subjects_have_no_wildcards() {
        assert!(is_valid_publish_subject("a.b"));
        assert!(!is_valid_publish_subject("a.*"));
        assert!(!is_valid_publish_subject("a.>"));
        assert!(!is_valid_publish_subject("*"));
        assert!(!is_valid_publish_subject(""));
    }

    #[test]
    fn matching() {
        let cases = [
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
            ("a.b", "a.b.c", false),
            ("a.b.c", "a.b", false),
            ("a.*", "a.b", true),
            ("a.*", "a", false),
            ("a.*", "a.b.c", false),
            ("*.b", "a.b", true),
            ("*.*", "a.b", true),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c.d", true),
            ("a.>", "a", false),
            (">", "a", true),
            (">", "a.b", true),
            ("a.*.>", "a.b", false),
            ("a.*.>", "a.b.c", true),
        ];
        for (pattern, subject, want) in cases {
            assert_eq!(
                subject_matches(pattern, subject),
                want,
                "{pattern} vs {subject}"
            );
        }
    }

    #[test]
    fn queue_names_and_headers() {
        assert!(is_valid_queue_group("workers"));
        assert!(!is_valid_queue_group(""));
        assert!(!is_valid_queue_group("two words"));
        assert!(is_valid_header("X-Trace", "any value: with colon"));
        assert!(!is_valid_header("", "v"));
        assert!(!is_valid_header("Bad:Name", "v"));
        assert!(!is_valid_header("Bad Name", "v"));
        assert!(!is_valid_header("Ünicode", "v"));
        assert!(!is_valid_header("X", "a\r\nb"));
    }

    #[test]
    fn headers_replace_and_keep_order() {
        let mut h = Headers::default();
        h.insert("b", "1");
        h.insert("a", "2");
        h.insert("b", "3");
        assert_eq!(h.iter().collect::<Vec<_>>(), [("b", "3"), ("a", "2")]);
        assert_eq!(h.get("B"), None, "names are case-sensitive");
    }

    #[test]
    fn outgoing_validation() {
        assert!(validate_outgoing(&Outgoing::new("a.b", "x").with_reply("r.1")).is_ok());
        assert!(matches!(
            validate_outgoing(&Outgoing::new("a.*", "x")),
            Err(BusError::InvalidSubject(s)) if s == "a.*"
        ));
        assert!(matches!(
            validate_outgoing(&Outgoing::new("a", "x").with_reply("r.>")),
            Err(BusError::InvalidSubject(s)) if s == "r.>"
        ));
        assert!(matches!(
            validate_outgoing(&Outgoing::new("a", "x").with_header("k:", "v")),
            Err(BusError::InvalidHeader(n)) if n == "k:"
        ));
        assert!(validate_subscription("a.>", Some("q")).is_ok());
        assert!(validate_subscription("a.>", Some("")).is_err());
    }
}
