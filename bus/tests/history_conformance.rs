//! One suite, two histories: every check in `conformance!` runs against `LocalHistory` (on a
//! `LocalBus`) and against `NatsHistory` on a real `nats-server` (`bus::testkit::TestNats`,
//! with an observer connection subscribed to `>` attached all along); the checks after it
//! are what only one of them can show (a too large publication, a backend's bare JetStream
//! publish, the stream as configured).
//!
//! Where the two answer differently by design, the fixture says which answer is right
//! (`exact`: the local history knows exactly what it removed, JetStream's proof is
//! conservative).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bus::history::{HistoryError, Read, Rule, Stored};
use bus::testkit::TestNats;
use bus::{
    Bus, Headers, HistoryStore, LocalBus, LocalHistory, Message, NatsBus, NatsHistory,
    NatsHistoryOptions, NatsOptions, SharedBus, SharedHistory, Subscription,
};
use bytes::Bytes;
use futures::StreamExt;
use proto::subject;

/// Per-subscription queue capacity of the live subscriptions in this suite.
const CAPACITY: usize = 1024;
/// Bound on waiting for something that should happen.
const WAIT: Duration = Duration::from_secs(10);
/// The long-lived rule most checks use.
const CHAT: &str = "chat/#";

/// A history under test, the bus it delivers live on, and what keeps them alive.
struct Fixture {
    history: SharedHistory,
    bus: SharedBus,
    backend: Backend,
}

enum Backend {
    Local,
    Nats(Box<NatsBackend>),
}

struct NatsBackend {
    /// Stopped when the fixture is dropped.
    _server: TestNats,
    js: jetstream::Context,
    /// Drains a subscription to `>` on its own connection.
    observer: tokio::task::JoinHandle<()>,
}

impl Drop for NatsBackend {
    fn drop(&mut self) {
        self.observer.abort();
    }
}

fn local() -> Fixture {
    let bus: SharedBus = Arc::new(LocalBus::new(CAPACITY));
    Fixture {
        history: Arc::new(LocalHistory::new(bus.clone())),
        bus,
        backend: Backend::Local,
    }
}

async fn nats() -> Fixture {
    let server = TestNats::start().await;
    let observer_bus = connect(&server, "observer").await;
    let mut everything = observer_bus.subscribe(">".into(), None).await.unwrap();
    let observer = tokio::spawn(async move {
        let _bus = observer_bus;
        while everything.next().await.is_some() {}
    });
    let history = NatsHistory::new(
        connect(&server, "history").await.client().clone(),
        NatsHistoryOptions::default(),
    );
    let bus = connect(&server, "live").await;
    let js = jetstream::new(bus.client().clone());
    Fixture {
        history: Arc::new(history),
        bus: Arc::new(bus),
        backend: Backend::Nats(Box::new(NatsBackend {
            _server: server,
            js,
            observer,
        })),
    }
}

async fn connect(server: &TestNats, name: &str) -> NatsBus {
    NatsBus::connect(NatsOptions {
        url: server.url(),
        name: name.into(),
        subscription_capacity: CAPACITY,
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        ..NatsOptions::default()
    })
    .await
    .expect("connect to test server")
}

impl Fixture {
    /// Whether `complete` is exact (true whenever nothing was removed) rather than proven.
    fn exact(&self) -> bool {
        matches!(self.backend, Backend::Local)
    }

    fn js(&self) -> &jetstream::Context {
        match &self.backend {
            Backend::Nats(nats) => &nats.js,
            Backend::Local => panic!("not a NATS fixture"),
        }
    }

    /// Deletes the storage of `rules` and makes it again: the local history is replaced by a
    /// new one (a restart), the NATS streams are deleted.
    async fn recreate(&mut self, rules: &[Rule]) {
        match &self.backend {
            Backend::Local => self.history = Arc::new(LocalHistory::new(self.bus.clone())),
            Backend::Nats(nats) => {
                for rule in rules {
                    nats.js
                        .delete_stream(subject::history_stream(&rule.pattern))
                        .await
                        .expect("delete stream");
                }
            }
        }
        self.history.ensure(rules).await.expect("ensure");
    }

    /// Lets `d` pass: on the paused clock for the local history, by waiting for NATS (the
    /// caller then polls for the effect).
    async fn age(&self, d: Duration) {
        match self.backend {
            Backend::Local => tokio::time::advance(d).await,
            Backend::Nats(_) => {}
        }
    }

    async fn live(&self, subject: &str) -> Subscription {
        let sub = self.bus.subscribe(subject.into(), None).await.unwrap();
        self.bus.flush().await.unwrap();
        sub
    }

    async fn append(&self, rule: &Rule, ns: &str, topic: &str, payload: &str) -> u64 {
        self.append_with(rule, ns, topic, Headers::default(), payload)
            .await
    }

    async fn append_with(
        &self,
        rule: &Rule,
        ns: &str,
        topic: &str,
        headers: Headers,
        payload: &str,
    ) -> u64 {
        let appended = self
            .history
            .append(rule, ns, topic, headers, Bytes::from(payload.to_owned()))
            .await
            .unwrap_or_else(|e| panic!("append to {ns}/{topic}: {e}"));
        let state = self.history.state(rule).await.unwrap();
        assert_eq!(appended.epoch, state.epoch, "append names the rule's epoch");
        appended.offset
    }

    async fn read(&self, rule: &Rule, ns: &str, topic: &str, after: u64) -> Read {
        self.history
            .read(rule, ns, topic, after)
            .await
            .unwrap_or_else(|e| panic!("read {ns}/{topic} after {after}: {e}"))
    }
}

/// Generates `local::<check>` and `nats::<check>` tests for each check.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(super::local()).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(super::nats().await).await;
                }
            )*
        }
    };
}

conformance!(
    offsets_increase_and_arrive_live,
    previous_chains_per_topic,
    read_after_and_count_limit,
    age_limit,
    headers_kept,
    epoch_stable_until_storage_made_anew,
    rules_round_trip,
    namespaces_apart,
    odd_levels_round_trip,
    missing_storage_is_unavailable,
);

// ---------------------------------------------------------------- helpers

fn rule(pattern: &str, size: u64, ttl: Duration) -> Rule {
    Rule {
        pattern: pattern.into(),
        size,
        ttl,
    }
}

fn chat(size: u64) -> Rule {
    rule(CHAT, size, Duration::from_secs(300))
}

async fn ensure(fx: &Fixture, rules: &[Rule]) {
    fx.history.ensure(rules).await.expect("ensure");
}

async fn next(sub: &mut Subscription) -> Message {
    bounded("the next live message", sub.next())
        .await
        .expect("subscription open")
}

/// The offset and previous offset a live message carries.
fn position(m: &Message) -> (u64, u64) {
    let get = |name: &str| -> u64 {
        m.headers
            .get(name)
            .unwrap_or_else(|| panic!("live message without {name}: {m:?}"))
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not a number: {m:?}"))
    };
    (get(subject::HEADER_OFFSET), get(subject::HEADER_PREVIOUS))
}

/// Header pairs in name order (NATS keeps no order between names).
fn sorted(headers: &Headers) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    pairs.sort();
    pairs
}

fn offsets(messages: &[Stored]) -> Vec<u64> {
    messages.iter().map(|m| m.offset).collect()
}

fn payloads(messages: &[Stored]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect()
}

/// Fails if `f` takes longer than the wait bound.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {WAIT:?}"))
}

// ---------------------------------------------------------------- checks

async fn offsets_increase_and_arrive_live(fx: Fixture) {
    let chat = chat(10);
    ensure(&fx, std::slice::from_ref(&chat)).await;
    let mut live = fx.live("sb.live.>").await;
    let mut last = 0;
    for (i, topic) in ["chat/a", "chat/b", "chat/a", "chat", "chat/a/deep"]
        .into_iter()
        .enumerate()
    {
        let offset = fx.append(&chat, "ns", topic, &format!("m{i}")).await;
        assert!(offset > last, "offset {offset} after {last}");
        last = offset;
        let m = next(&mut live).await;
        assert_eq!(m.subject, subject::live("ns", topic.split('/')));
        assert_eq!(position(&m).0, offset);
        assert_eq!(m.payload, format!("m{i}"));
    }
    let state = fx.history.state(&chat).await.unwrap();
    assert_eq!(state.last, last);
}

async fn previous_chains_per_topic(fx: Fixture) {
    let chat = chat(10);
    ensure(&fx, std::slice::from_ref(&chat)).await;
    let mut live = fx.live("sb.live.>").await;
    let a1 = fx.append(&chat, "ns", "chat/a", "a1").await;
    let b1 = fx.append(&chat, "ns", "chat/b", "b1").await;
    let a2 = fx.append(&chat, "ns", "chat/a", "a2").await;
    let b2 = fx.append(&chat, "ns", "chat/b", "b2").await;
    let a3 = fx.append(&chat, "ns", "chat/a", "a3").await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(position(&next(&mut live).await));
    }
    assert_eq!(got, [(a1, 0), (b1, 0), (a2, a1), (b2, b1), (a3, a2)]);
}

async fn read_after_and_count_limit(fx: Fixture) {
    let size = 3;
    let chat = chat(size);
    ensure(&fx, std::slice::from_ref(&chat)).await;
    let seen = fx.append(&chat, "ns", "chat/a", "seen").await;
    let mut offsets_after = Vec::new();
    for i in 0..size {
        fx.append(&chat, "ns", "chat/other", "noise").await;
        offsets_after.push(fx.append(&chat, "ns", "chat/a", &format!("m{i}")).await);
    }
    // Exactly `size` behind: everything, provably.
    let read = fx.read(&chat, "ns", "chat/a", seen).await;
    assert_eq!(offsets(&read.messages), offsets_after);
    assert_eq!(payloads(&read.messages), ["m0", "m1", "m2"]);
    assert!(read.complete, "a reader `size` behind is complete");
    assert_eq!(read.last, fx.history.state(&chat).await.unwrap().last);
    // Reading from any later position: the rest, complete.
    let read = fx.read(&chat, "ns", "chat/a", offsets_after[0]).await;
    assert_eq!(offsets(&read.messages), offsets_after[1..]);
    assert!(read.complete);
    let read = fx
        .read(&chat, "ns", "chat/a", *offsets_after.last().unwrap())
        .await;
    assert!(read.messages.is_empty() && read.complete);

    // `size + 1` behind: still all stored (size + 1 are kept), but only the local history
    // knows that nothing was removed.
    offsets_after.push(fx.append(&chat, "ns", "chat/a", "m3").await);
    let read = fx.read(&chat, "ns", "chat/a", seen).await;
    assert_eq!(offsets(&read.messages), offsets_after);
    assert_eq!(read.complete, fx.exact(), "size + 1 behind");

    // `size + 2` behind: the oldest after `seen` is gone.
    offsets_after.push(fx.append(&chat, "ns", "chat/a", "m4").await);
    let read = fx.read(&chat, "ns", "chat/a", seen).await;
    assert_eq!(offsets(&read.messages), offsets_after[1..]);
    assert!(!read.complete, "a removed message makes a read incomplete");
    let read = fx.read(&chat, "ns", "chat/a", 0).await;
    assert_eq!(read.messages.len(), usize::try_from(size + 1).unwrap());
    assert!(!read.complete);
    // The other topic lost nothing to chat/a's limit. Read from before the stream's first
    // stored message, only the local history can know that.
    let read = fx.read(&chat, "ns", "chat/other", seen).await;
    assert_eq!(read.messages.len(), 3);
    assert!(read.complete);
    let read = fx.read(&chat, "ns", "chat/other", 0).await;
    assert_eq!(read.messages.len(), 3);
    assert_eq!(
        read.complete,
        fx.exact(),
        "read from before the first stored message"
    );
    // A topic never written: nothing (complete, where that is known).
    let read = fx.read(&chat, "ns", "chat/never", 0).await;
    assert!(read.messages.is_empty());
    assert_eq!(read.complete, fx.exact());
}

async fn age_limit(fx: Fixture) {
    if fx.exact() {
        tokio::time::pause();
    }
    let ttl = Duration::from_secs(1);
    let short = rule("short/#", 10, ttl);
    ensure(&fx, std::slice::from_ref(&short)).await;
    let first = fx.append(&short, "ns", "short/a", "old").await;
    let read = fx.read(&short, "ns", "short/a", 0).await;
    assert_eq!(offsets(&read.messages), [first]);
    assert!(read.complete);

    fx.age(ttl).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let read = loop {
        let read = fx.read(&short, "ns", "short/a", 0).await;
        if read.messages.is_empty() {
            break read;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not removed by age within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        !read.complete,
        "a reader before the removed message is told"
    );
    let read = fx.read(&short, "ns", "short/a", first).await;
    assert!(read.messages.is_empty() && read.complete);
    let mut live = fx.live("sb.live.>").await;
    let later = fx.append(&short, "ns", "short/a", "new").await;
    assert_eq!(
        position(&next(&mut live).await),
        (later, 0),
        "previous names a stored publication only"
    );
    let read = fx.read(&short, "ns", "short/a", first).await;
    assert_eq!(offsets(&read.messages), [later]);
    assert!(read.complete, "nothing after {first} was removed");
}

async fn headers_kept(fx: Fixture) {
    let chat = chat(10);
    ensure(&fx, std::slice::from_ref(&chat)).await;
    let mut live = fx.live(&subject::live("ns", ["chat", "h"])).await;
    let mut headers = Headers::default();
    headers.insert(subject::HEADER_MESSAGE_ID, "id-1");
    headers.insert(subject::HEADER_ORIGIN, "conn-7");
    headers.insert(
        subject::HEADER_TRACEPARENT,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    let offset = fx
        .append_with(&chat, "ns", "chat/h", headers.clone(), "with headers")
        .await;
    let read = fx.read(&chat, "ns", "chat/h", 0).await;
    assert_eq!(read.messages.len(), 1);
    assert_eq!(
        sorted(&read.messages[0].headers),
        sorted(&headers),
        "exactly the appended headers"
    );
    assert_eq!(read.messages[0].offset, offset);
    let m = next(&mut live).await;
    for (name, value) in headers.iter() {
        assert_eq!(m.headers.get(name), Some(value), "live {name}");
    }
}

async fn epoch_stable_until_storage_made_anew(mut fx: Fixture) {
    let chat = chat(10);
    ensure(&fx, std::slice::from_ref(&chat)).await;
    let before = fx.history.state(&chat).await.unwrap();
    assert_eq!(before.last, 0);
    fx.append(&chat, "ns", "chat/a", "x").await;
    ensure(&fx, std::slice::from_ref(&chat)).await;
    ensure(&fx, &[rule(CHAT, 20, chat.ttl)]).await;
    let after = fx.history.state(&chat).await.unwrap();
    assert_eq!(after.epoch, before.epoch, "ensure keeps the storage");
    assert_eq!(after.last, 1);
    let read = fx.read(&chat, "ns", "chat/a", 0).await;
    assert_eq!(read.epoch, before.epoch);
    assert_eq!(read.messages.len(), 1);

    fx.recreate(std::slice::from_ref(&chat)).await;
    let anew = fx.history.state(&chat).await.unwrap();
    assert_ne!(anew.epoch, before.epoch, "new storage, new epoch");
    assert_eq!(anew.last, 0);
    let read = fx.read(&chat, "ns", "chat/a", 0).await;
    assert_eq!(read.epoch, anew.epoch);
    assert!(read.messages.is_empty());
}

async fn rules_round_trip(fx: Fixture) {
    assert_eq!(fx.history.rules().await.unwrap(), []);
    let rules = [
        rule("a/+/b", 1, Duration::from_secs(60)),
        rule(CHAT, 100, Duration::from_secs(300)),
        rule("scores/#", 10_000, Duration::from_secs(3600)),
    ];
    ensure(&fx, &rules).await;
    assert_eq!(fx.history.rules().await.unwrap(), rules);
    let changed = rule(CHAT, 5, Duration::from_secs(30));
    ensure(&fx, std::slice::from_ref(&changed)).await;
    assert_eq!(
        fx.history.rules().await.unwrap(),
        [rules[0].clone(), changed, rules[2].clone()]
    );
    // Every rule's storage works side by side (one republish mapping per stream).
    let mut live = fx.live("sb.live.>").await;
    for (rule, topic) in rules.iter().zip(["a/x/b", "chat/1", "scores/x"]) {
        let offset = fx.append(rule, "ns", topic, topic).await;
        let m = next(&mut live).await;
        assert_eq!(m.subject, subject::live("ns", topic.split('/')));
        assert_eq!(position(&m), (offset, 0));
    }
}

async fn namespaces_apart(fx: Fixture) {
    let chat = chat(10);
    ensure(&fx, std::slice::from_ref(&chat)).await;
    let mut live_a = fx.live(&subject::live("a", ["chat", "t"])).await;
    let mut live_b = fx.live(&subject::live("b", ["chat", "t"])).await;
    let a1 = fx.append(&chat, "a", "chat/t", "a1").await;
    let b1 = fx.append(&chat, "b", "chat/t", "b1").await;
    let a2 = fx.append(&chat, "a", "chat/t", "a2").await;
    let read = fx.read(&chat, "a", "chat/t", 0).await;
    assert_eq!(offsets(&read.messages), [a1, a2]);
    assert_eq!(payloads(&read.messages), ["a1", "a2"]);
    let read = fx.read(&chat, "b", "chat/t", 0).await;
    assert_eq!(offsets(&read.messages), [b1]);
    // Namespaces that a subject token would confuse.
    let read = fx.read(&chat, "a.b", "chat/t", 0).await;
    assert!(read.messages.is_empty());
    assert_eq!(position(&next(&mut live_a).await), (a1, 0));
    assert_eq!(position(&next(&mut live_b).await), (b1, 0));
    assert_eq!(position(&next(&mut live_a).await), (a2, a1));
}

async fn odd_levels_round_trip(fx: Fixture) {
    let chat = chat(10);
    ensure(&fx, std::slice::from_ref(&chat)).await;
    let topics = [
        "chat/x.y",
        "chat/*",
        "chat/a b",
        "chat/>",
        "chat//",
        "chat/é/🦀",
        "chat/~2E",
    ];
    let mut live = fx.live("sb.live.>").await;
    let mut written = Vec::new();
    for topic in topics {
        written.push(fx.append(&chat, "n s.*", topic, topic).await);
    }
    for (topic, offset) in topics.iter().zip(&written) {
        let read = fx.read(&chat, "n s.*", topic, 0).await;
        assert_eq!(offsets(&read.messages), [*offset], "{topic:?}");
        assert_eq!(payloads(&read.messages), [*topic]);
        let m = next(&mut live).await;
        assert_eq!(
            subject::parse_topic(&m.subject),
            Some(("n s.*".to_owned(), (*topic).to_owned()))
        );
        assert_eq!(position(&m), (*offset, 0));
    }
}

async fn missing_storage_is_unavailable(fx: Fixture) {
    let never = chat(3);
    let payload = Bytes::from_static(b"x");
    let append = fx
        .history
        .append(&never, "ns", "chat/a", Headers::default(), payload)
        .await;
    assert!(
        matches!(append, Err(HistoryError::Unavailable(_))),
        "{append:?}"
    );
    assert!(matches!(
        fx.history.state(&never).await,
        Err(HistoryError::Unavailable(_))
    ));
    assert!(matches!(
        fx.history.read(&never, "ns", "chat/a", 0).await,
        Err(HistoryError::Unavailable(_))
    ));
}

// ---------------------------------------------------------------- NATS only

mod nats_only {
    use super::*;

    #[tokio::test]
    async fn too_large_is_refused() {
        let fx = nats().await;
        let chat = chat(3);
        ensure(&fx, std::slice::from_ref(&chat)).await;
        let huge = Bytes::from(vec![b'x'; 2 * 1024 * 1024]);
        let got = fx
            .history
            .append(&chat, "ns", "chat/a", Headers::default(), huge)
            .await;
        assert!(
            matches!(got, Err(HistoryError::TooLarge { size, max }) if size > max),
            "{got:?}"
        );
    }

    /// A backend with a bare NATS client: a JetStream publish to `sb.hist.…` is stored and
    /// delivered live with its position, as the contract says.
    #[tokio::test]
    async fn bare_jetstream_publish_is_stored_and_delivered() {
        let fx = nats().await;
        let chat = chat(3);
        ensure(&fx, std::slice::from_ref(&chat)).await;
        let mut live = fx.live(&subject::live("ns", ["chat", "a"])).await;
        let ack = fx
            .js()
            .publish(
                subject::history("ns", ["chat", "a"]),
                Bytes::from_static(b"raw"),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.stream, subject::history_stream(CHAT));
        let m = next(&mut live).await;
        assert_eq!(position(&m), (ack.sequence, 0));
        let read = fx.read(&chat, "ns", "chat/a", 0).await;
        assert_eq!(offsets(&read.messages), [ack.sequence]);
        assert!(read.messages[0].headers.is_empty());
    }

    #[tokio::test]
    async fn stream_is_configured_as_the_contract_says() {
        let fx = nats().await;
        let chat = chat(100);
        ensure(&fx, std::slice::from_ref(&chat)).await;
        let info = fx
            .js()
            .get_stream(subject::history_stream(CHAT))
            .await
            .unwrap()
            .cached_info()
            .clone();
        let c = info.config;
        assert_eq!(c.subjects, subject::history_filter(CHAT));
        assert_eq!(c.max_messages_per_subject, 101);
        assert_eq!(c.max_age, Duration::from_secs(300));
        assert_eq!(c.storage, jetstream::stream::StorageType::File);
        assert_eq!(c.discard, jetstream::stream::DiscardPolicy::Old);
        assert!(c.allow_direct);
        let republish = c.republish.expect("republish");
        assert_eq!(
            (republish.source.as_str(), republish.destination.as_str()),
            ("sb.hist.>", "sb.live.>")
        );
        assert!(c.description.unwrap().ends_with(CHAT));
    }

    /// Edges (and coordinators) each have their own `NatsHistory`: making the streams at
    /// once works, they agree on the epoch, and one that deletes and remakes a stream is
    /// noticed by the others' appends.
    #[tokio::test]
    async fn processes_share_streams_and_notice_a_new_one() {
        let fx = nats().await;
        let chat = chat(3);
        let other = NatsHistory::new(fx.js().client(), NatsHistoryOptions::default());
        let rules = [chat.clone(), rule("b/#", 1, Duration::from_secs(60))];
        let (a, b) = tokio::join!(fx.history.ensure(&rules), other.ensure(&rules));
        a.unwrap();
        b.unwrap();
        assert_eq!(other.rules().await.unwrap().len(), 2);
        // Only appends here: `state` and `read` would refresh the cache.
        let mut epochs = Vec::new();
        for _ in 0..3 {
            let appended = fx
                .history
                .append(&chat, "ns", "chat/a", Headers::default(), Bytes::new())
                .await
                .unwrap();
            epochs.push(appended.epoch);
        }
        let epoch = other.state(&chat).await.unwrap().epoch;
        assert_eq!(epochs, [epoch.clone(), epoch.clone(), epoch.clone()]);

        fx.js()
            .delete_stream(subject::history_stream(CHAT))
            .await
            .unwrap();
        other.ensure(std::slice::from_ref(&chat)).await.unwrap();
        let remade = other.state(&chat).await.unwrap().epoch;
        assert_ne!(remade, epoch);
        let appended = fx
            .history
            .append(&chat, "ns", "chat/a", Headers::default(), Bytes::new())
            .await
            .unwrap();
        assert_eq!((appended.offset, appended.epoch), (1, remade));
    }
}
