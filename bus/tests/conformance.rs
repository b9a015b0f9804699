//! One suite, two buses: every `check_*` runs against `LocalBus` and against `NatsBus` on a
//! real `nats-server` (`bus::testkit::TestNats`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bus::testkit::TestNats;
use bus::{
    Bus, BusError, LocalBus, Message, NatsBus, NatsOptions, Outgoing, SharedBus, Subscription,
};
use futures::{FutureExt, StreamExt};

/// Per-subscription queue capacity for both buses in this suite.
const CAPACITY: usize = 16;
/// Bound on waiting for something that should happen.
const WAIT: Duration = Duration::from_secs(10);

/// A bus under test; keeps the server (if any) alive as long as the bus.
struct Fixture {
    bus: SharedBus,
    nats: Option<TestNats>,
}

fn local() -> Fixture {
    Fixture {
        bus: Arc::new(LocalBus::new(CAPACITY)),
        nats: None,
    }
}

async fn nats() -> Fixture {
    let server = TestNats::start().await;
    let bus = NatsBus::connect(nats_options(&server))
        .await
        .expect("connect to test server");
    Fixture {
        bus: Arc::new(bus),
        nats: Some(server),
    }
}

fn nats_options(server: &TestNats) -> NatsOptions {
    NatsOptions {
        url: server.url(),
        name: "bus-conformance".into(),
        subscription_capacity: CAPACITY,
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        ..NatsOptions::default()
    }
}

/// Generates `local_<check>` and `nats_<check>` tests for each check.
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
    publish_subscribe_exact,
    star_wildcard,
    tail_wildcard,
    queue_group_delivers_once,
    headers_round_trip,
    request_reply,
    request_without_subscriber_is_no_responders,
    request_without_answer_times_out,
    drop_unsubscribes,
    invalid_subjects_rejected,
    slow_subscriber_does_not_block,
    per_subscription_fifo,
    status_reports_connected,
);

// ---------------------------------------------------------------- helpers

async fn sub(bus: &SharedBus, subject: &str) -> Subscription {
    bus.subscribe(subject.to_owned(), None)
        .await
        .expect("subscribe")
}

async fn qsub(bus: &SharedBus, subject: &str, queue: &str) -> Subscription {
    bus.subscribe(subject.to_owned(), Some(queue.to_owned()))
        .await
        .expect("queue subscribe")
}

async fn publish(bus: &SharedBus, subject: &str, payload: &str) {
    bus.publish(Outgoing::new(subject, payload.to_owned()))
        .await
        .expect("publish");
}

async fn next(sub: &mut Subscription) -> Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a message within the wait bound")
        .expect("subscription still open")
}

fn text(msg: &Message) -> &str {
    std::str::from_utf8(&msg.payload).expect("utf-8 payload")
}

/// Proves that `sub` got nothing before `marker`: publishes `marker` on `subject` (which
/// `sub` must match) and requires it to be the next message, as delivery is FIFO.
async fn assert_nothing_before(
    bus: &SharedBus,
    sub: &mut Subscription,
    subject: &str,
    marker: &str,
) {
    publish(bus, subject, marker).await;
    let msg = next(sub).await;
    assert_eq!(
        text(&msg),
        marker,
        "unexpected message {msg:?} before the marker"
    );
}

/// Polls `cond` every 20 ms until it holds; panics after `timeout`.
async fn eventually(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if cond() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {what} within {timeout:?}"
        );
    }
}

/// Runs `f` and fails if it takes longer than the wait bound (a blocked publisher).
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} blocked"))
}

// ---------------------------------------------------------------- checks

async fn publish_subscribe_exact(fx: Fixture) {
    let bus = &fx.bus;
    let mut s = sub(bus, "chat.room1").await;
    let mut other = sub(bus, "chat.room2").await;
    publish(bus, "chat.room1", "hello").await;
    let msg = next(&mut s).await;
    assert_eq!(msg.subject, "chat.room1");
    assert_eq!(text(&msg), "hello");
    assert_eq!(msg.reply, None);
    assert!(msg.headers.is_empty());
    // Not for room2 (and `chat.room1.x` is not `chat.room1`).
    publish(bus, "chat.room1.x", "deeper").await;
    assert_nothing_before(bus, &mut other, "chat.room2", "marker").await;
    assert_nothing_before(bus, &mut s, "chat.room1", "marker").await;
}

async fn star_wildcard(fx: Fixture) {
    let bus = &fx.bus;
    let mut s = sub(bus, "orders.*.created").await;
    publish(bus, "orders.eu.created", "1").await;
    publish(bus, "orders.eu.deleted", "no").await;
    publish(bus, "orders.eu.x.created", "no").await;
    publish(bus, "orders.created", "no").await;
    publish(bus, "orders.us.created", "2").await;
    let first = next(&mut s).await;
    assert_eq!(
        (first.subject.as_str(), text(&first)),
        ("orders.eu.created", "1")
    );
    let second = next(&mut s).await;
    assert_eq!(
        (second.subject.as_str(), text(&second)),
        ("orders.us.created", "2")
    );
    assert_nothing_before(bus, &mut s, "orders.marker.created", "marker").await;
}

async fn tail_wildcard(fx: Fixture) {
    let bus = &fx.bus;
    let mut s = sub(bus, "events.>").await;
    publish(bus, "events", "no: > needs at least one token").await;
    publish(bus, "other.a", "no").await;
    publish(bus, "events.a", "1").await;
    publish(bus, "events.a.b.c", "2").await;
    assert_eq!(next(&mut s).await.subject, "events.a");
    assert_eq!(next(&mut s).await.subject, "events.a.b.c");
    assert_nothing_before(bus, &mut s, "events.marker", "marker").await;
}

async fn queue_group_delivers_once(fx: Fixture) {
    const N: usize = 100;
    const END_MARKERS: usize = 64;
    let bus = &fx.bus;
    let mut members = [
        qsub(bus, "jobs.run", "workers").await,
        qsub(bus, "jobs.run", "workers").await,
    ];
    let mut plain = sub(bus, "jobs.run").await;
    // Batches below the queue capacity, each fully read before the next, so nothing drops.
    let mut seen: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
    let mut all = Vec::new();
    for batch in 0..N / 10 {
        for i in 0..10 {
            publish(bus, "jobs.run", &format!("job-{}", batch * 10 + i)).await;
        }
        for _ in 0..10 {
            all.push(text(&next(&mut plain).await).to_owned());
        }
        // Drain the group until it has handed out this batch.
        let [first, second] = &mut members;
        while seen[0].len() + seen[1].len() < (batch + 1) * 10 {
            tokio::select! {
                m = next(first) => seen[0].push(text(&m).to_owned()),
                m = next(second) => seen[1].push(text(&m).to_owned()),
            }
        }
    }
    let expected: Vec<String> = (0..N).map(|i| format!("job-{i}")).collect();
    assert_eq!(
        all, expected,
        "the plain subscriber gets every message, in order"
    );
    // End markers until each member got one: FIFO means nothing else was on its way.
    let mut ended = [false, false];
    for _ in 0..END_MARKERS {
        publish(bus, "jobs.run", "end").await;
        assert_eq!(text(&next(&mut plain).await), "end");
    }
    for (m, member) in members.iter_mut().enumerate() {
        while !ended[m] {
            let msg = next(member).await;
            match text(&msg) {
                "end" => ended[m] = true,
                other => seen[m].push(other.to_owned()),
            }
        }
    }
    let total = seen[0].len() + seen[1].len();
    let unique: HashSet<&String> = seen.iter().flatten().collect();
    assert_eq!(total, N, "each message went to exactly one member");
    assert_eq!(unique.len(), N);
    assert!(
        !seen[0].is_empty() && !seen[1].is_empty(),
        "both members got work: {seen:?}"
    );
}

async fn headers_round_trip(fx: Fixture) {
    let bus = &fx.bus;
    let mut s = sub(bus, "with.headers").await;
    let msg = Outgoing::new("with.headers", "body")
        .with_reply("reply.here")
        .with_header("X-Trace", "abc-123")
        .with_header("Content-Type", "application/json")
        .with_header("X-Trace", "replaced");
    bus.publish(msg).await.expect("publish");
    let got = next(&mut s).await;
    assert_eq!(got.reply.as_deref(), Some("reply.here"));
    assert_eq!(got.headers.get("X-Trace"), Some("replaced"));
    assert_eq!(got.headers.get("Content-Type"), Some("application/json"));
    assert_eq!(got.headers.iter().count(), 2);
    assert_eq!(text(&got), "body");

    let bad = Outgoing::new("with.headers", "x").with_header("Bad:Name", "v");
    assert!(matches!(
        bus.publish(bad).await,
        Err(BusError::InvalidHeader(_))
    ));
    let bad = Outgoing::new("with.headers", "x").with_header("X-Ok", "line\r\nbreak");
    assert!(matches!(
        bus.publish(bad).await,
        Err(BusError::InvalidHeader(_))
    ));
}

async fn request_reply(fx: Fixture) {
    let bus = &fx.bus;
    let mut service = sub(bus, "svc.echo").await;
    let responder = {
        let bus = Arc::clone(bus);
        tokio::spawn(async move {
            while let Some(req) = service.next().await {
                let reply = req.reply.clone().expect("a request has a reply subject");
                let mut payload = b"echo:".to_vec();
                payload.extend_from_slice(&req.payload);
                let out = Outgoing::new(reply, payload)
                    .with_header("X-Seen", req.headers.get("X-Req").unwrap_or("none"));
                bus.publish(out).await.expect("reply");
            }
        })
    };
    for i in 0..3 {
        let req = Outgoing::new("svc.echo", format!("ping{i}")).with_header("X-Req", "yes");
        let reply = bus.request(req, WAIT).await.expect("reply");
        assert_eq!(text(&reply), format!("echo:ping{i}"));
        assert_eq!(reply.headers.get("X-Seen"), Some("yes"));
    }
    let a = bus.new_inbox();
    let b = bus.new_inbox();
    assert!(a.starts_with("_INBOX.") && b.starts_with("_INBOX."));
    assert_ne!(a, b);
    responder.abort();
}

async fn request_without_subscriber_is_no_responders(fx: Fixture) {
    let bus = &fx.bus;
    // A long timeout: hitting it would surface as Timeout, not NoResponders.
    match bus.request(Outgoing::new("nobody.home", "?"), WAIT).await {
        Err(BusError::NoResponders { subject }) => assert_eq!(subject, "nobody.home"),
        other => panic!("expected NoResponders, got {other:?}"),
    }
}

async fn request_without_answer_times_out(fx: Fixture) {
    let bus = &fx.bus;
    let _silent = sub(bus, "svc.silent").await;
    let timeout = Duration::from_millis(200);
    match bus.request(Outgoing::new("svc.silent", "?"), timeout).await {
        Err(BusError::Timeout {
            subject,
            timeout: t,
        }) => {
            assert_eq!(subject, "svc.silent");
            assert_eq!(t, timeout);
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
}

async fn drop_unsubscribes(fx: Fixture) {
    let bus = &fx.bus;
    let gone = sub(bus, "drop.me").await;
    let gone_queue = qsub(bus, "drop.*", "q").await;
    let mut watcher = sub(bus, "drop.>").await;
    drop(gone);
    drop(gone_queue);
    // Nobody but the wildcard watcher is left on `drop.me`, and that does not answer:
    // drop the watcher too and the server (or table) has no interest left at all.
    publish(bus, "drop.me", "after").await;
    assert_eq!(text(&next(&mut watcher).await), "after");
    drop(watcher);
    match bus.request(Outgoing::new("drop.me", "?"), WAIT).await {
        Err(BusError::NoResponders { .. }) => {}
        other => panic!("expected NoResponders after unsubscribing, got {other:?}"),
    }
}

async fn invalid_subjects_rejected(fx: Fixture) {
    let bus = &fx.bus;
    for subject in ["", "a..b", ".a", "a.", "a b", "foo.*", "foo.>", "a\tb"] {
        let result = bus.publish(Outgoing::new(subject, "x")).await;
        assert!(
            matches!(result, Err(BusError::InvalidSubject(_))),
            "publish {subject:?}: {result:?}"
        );
        let result = bus.request(Outgoing::new(subject, "x"), WAIT).await;
        assert!(
            matches!(result, Err(BusError::InvalidSubject(_))),
            "request {subject:?}: {result:?}"
        );
    }
    for subject in ["", "a..b", "a.>.b", "a b", "a*.b", ">x"] {
        let result = bus.subscribe(subject.to_owned(), None).await;
        assert!(
            matches!(result, Err(BusError::InvalidSubject(_))),
            "subscribe {subject:?}: {result:?}"
        );
    }
    let result = bus
        .subscribe("ok.subject".into(), Some("bad queue".into()))
        .await;
    assert!(
        matches!(result, Err(BusError::InvalidSubject(_))),
        "queue: {result:?}"
    );
    let result = bus
        .publish(Outgoing::new("ok.subject", "x").with_reply("bad reply"))
        .await;
    assert!(
        matches!(result, Err(BusError::InvalidSubject(_))),
        "reply: {result:?}"
    );
}

async fn slow_subscriber_does_not_block(fx: Fixture) {
    const ROUNDS: usize = 3;
    const PER_ROUND: usize = 10; // below CAPACITY, so the reading subscriber keeps up
    let bus = &fx.bus;
    let mut slow = sub(bus, "firehose").await;
    let mut fast = sub(bus, "firehose").await;
    for round in 0..ROUNDS {
        bounded("publisher", async {
            for i in 0..PER_ROUND {
                publish(bus, "firehose", &format!("{}", round * PER_ROUND + i)).await;
            }
        })
        .await;
        for i in 0..PER_ROUND {
            assert_eq!(
                text(&next(&mut fast).await),
                format!("{}", round * PER_ROUND + i)
            );
        }
    }
    assert_eq!(fast.dropped(), 0);
    // The slow one kept the oldest CAPACITY messages and lost the rest, counted.
    let lost = (ROUNDS * PER_ROUND - CAPACITY) as u64;
    eventually("all drops counted", WAIT, || slow.dropped() == lost).await;
    for i in 0..CAPACITY {
        assert_eq!(text(&next(&mut slow).await), format!("{i}"));
    }
    // Caught up, it receives again.
    assert_nothing_before(bus, &mut slow, "firehose", "marker").await;
}

async fn per_subscription_fifo(fx: Fixture) {
    let bus = &fx.bus;
    let mut exact = sub(bus, "seq.x").await;
    let mut wild = sub(bus, "seq.*").await;
    for batch in 0..20 {
        for i in 0..8 {
            publish(bus, "seq.x", &format!("{}", batch * 8 + i)).await;
        }
        for i in 0..8 {
            let want = format!("{}", batch * 8 + i);
            assert_eq!(text(&next(&mut exact).await), want);
            assert_eq!(text(&next(&mut wild).await), want);
        }
    }
}

async fn status_reports_connected(fx: Fixture) {
    assert!(fx.bus.is_connected());
    assert_eq!(fx.bus.reconnects(), 0);
    fx.bus.flush().await.expect("flush");
    assert!(!format!("{:?}", fx.bus).is_empty());
}

// ---------------------------------------------------------------- local only

#[tokio::test]
async fn local_subscription_table_shrinks_on_drop() {
    let bus = LocalBus::new(CAPACITY);
    let shared: SharedBus = Arc::new(bus.clone());
    assert_eq!(bus.subscription_count(), 0);
    let subs = [
        sub(&shared, "a.b").await,
        sub(&shared, "a.b").await,
        sub(&shared, "a.*").await,
        qsub(&shared, "a.>", "q").await,
        qsub(&shared, "a.b", "q").await,
    ];
    assert_eq!(bus.subscription_count(), 5);
    drop(subs);
    assert_eq!(bus.subscription_count(), 0);
    // Requests clean up their inboxes, whatever the outcome.
    let _ = shared
        .request(Outgoing::new("a.b", "?"), Duration::from_millis(1))
        .await;
    let _silent = sub(&shared, "a.b").await;
    let _ = shared
        .request(Outgoing::new("a.b", "?"), Duration::from_millis(1))
        .await;
    assert_eq!(bus.subscription_count(), 1);
}

#[tokio::test]
async fn local_cross_pattern_queue_group_is_one_group() {
    let shared: SharedBus = Arc::new(LocalBus::new(256));
    let mut members = [
        qsub(&shared, "t.x", "q").await,
        qsub(&shared, "t.*", "q").await,
        qsub(&shared, "t.>", "q").await,
    ];
    for i in 0..90 {
        publish(&shared, "t.x", &i.to_string()).await;
    }
    let mut counts = [0; 3];
    let mut total = 0;
    for (m, member) in members.iter_mut().enumerate() {
        // LocalBus delivers during `publish`: everything is queued already.
        while let Some(Some(_)) = member.next().now_or_never() {
            counts[m] += 1;
            total += 1;
        }
    }
    assert_eq!(
        total, 90,
        "one delivery per message across the group: {counts:?}"
    );
    assert!(
        counts.iter().all(|&c| c > 0),
        "all members served: {counts:?}"
    );
}

// ---------------------------------------------------------------- NATS only

#[tokio::test]
async fn nats_initial_connect_failure_is_an_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let opts = NatsOptions {
        url: format!("nats://127.0.0.1:{port}"),
        connect_timeout: Duration::from_secs(2),
        ..NatsOptions::default()
    };
    match NatsBus::connect(opts).await {
        Err(BusError::Connect(_)) => {}
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[tokio::test]
async fn nats_reconnects_after_server_restart() {
    let mut server = TestNats::start().await;
    let bus = NatsBus::connect(nats_options(&server))
        .await
        .expect("connect");
    let shared: SharedBus = Arc::new(bus.clone());
    let mut before = sub(&shared, "survives.restart").await;
    let mut queued = qsub(&shared, "survives.restart", "q").await;
    assert!(bus.is_connected());
    assert_eq!(bus.reconnects(), 0);

    server.kill().await;
    eventually("disconnected", WAIT, || !bus.is_connected()).await;
    server.restart().await;
    eventually("reconnected", WAIT, || bus.is_connected()).await;
    assert_eq!(bus.reconnects(), 1);

    publish(&shared, "survives.restart", "after").await;
    assert_eq!(text(&next(&mut before).await), "after");
    assert_eq!(text(&next(&mut queued).await), "after");
    let reply = shared
        .request(
            Outgoing::new("survives.restart", "?"),
            Duration::from_millis(200),
        )
        .await;
    assert!(
        matches!(reply, Err(BusError::Timeout { .. })),
        "interest is back: {reply:?}"
    );
}

#[tokio::test]
async fn nats_restart_alone_is_survived() {
    let mut server = TestNats::start().await;
    let bus = NatsBus::connect(nats_options(&server))
        .await
        .expect("connect");
    let shared: SharedBus = Arc::new(bus.clone());
    let mut before = sub(&shared, "restart.only").await;
    server.restart().await;
    eventually("reconnected", WAIT, || {
        bus.reconnects() == 1 && bus.is_connected()
    })
    .await;
    publish(&shared, "restart.only", "after").await;
    assert_eq!(text(&next(&mut before).await), "after");
}

#[tokio::test]
async fn nats_restart_keeps_ports() {
    let mut server = TestNats::start().await;
    let (port, monitor) = (server.port(), server.monitor_url());
    assert!(server.monitor_url().starts_with("http://127.0.0.1:"));
    assert_ne!(port, 0);
    server.restart().await;
    assert_eq!(server.port(), port);
    assert_eq!(server.monitor_url(), monitor);
    assert!(server.is_running());
    assert!(server.store_dir().exists());
}

#[tokio::test]
async fn nats_subscription_is_registered_when_subscribe_returns() {
    // Two connections: the subscriber's registration must not race the other's publish.
    let server = TestNats::start().await;
    let subscriber: SharedBus = Arc::new(NatsBus::connect(nats_options(&server)).await.unwrap());
    let publisher: SharedBus = Arc::new(NatsBus::connect(nats_options(&server)).await.unwrap());
    for i in 0..20 {
        let subject = format!("cross.{i}");
        let mut s = sub(&subscriber, &subject).await;
        publish(&publisher, &subject, "hi").await;
        assert_eq!(text(&next(&mut s).await), "hi");
    }
}

#[tokio::test]
async fn nats_client_is_exposed() {
    let fx = nats().await;
    let server = fx.nats.as_ref().unwrap();
    let bus = NatsBus::connect(nats_options(server)).await.unwrap();
    assert!(
        bus.client().server_info().jetstream,
        "JetStream is enabled on the test server"
    );
}
