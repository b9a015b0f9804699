//! One suite, two resource stores: every check in `conformance!` runs against `LocalStore`
//! and against `NatsStore` on a real `nats-server` (`bus::testkit::TestNats`); the checks
//! after it are what only one of them can show (direct writers and restarts for NATS, lag
//! for the in-process store).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv::Operation;
use bus::local_store::LocalStore;
use bus::nats_store::{NatsStore, NatsStoreOptions};
use bus::store::MAX_KEY_LEN;
use bus::testkit::TestNats;
use bus::{Change, NatsBus, NatsOptions, SharedStore, StoreError, StoreWatch};
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Changes a local watcher may fall behind before it resyncs.
const CAPACITY: usize = 16;
/// Bound on waiting for something that should happen.
const WAIT: Duration = Duration::from_secs(10);
const BUCKET: &str = "items";

/// Item ids that JetStream KV keys cannot carry as they are.
const ODD_KEYS: [&str; 13] = [
    "a b",
    "x.y",
    ".lead",
    "trail.",
    "é",
    "=",
    "=41",
    "/",
    "*",
    ">",
    "🦀",
    "tab\there",
    "node-1",
];

/// A store under test; keeps the server (if any) alive as long as the store.
struct Fixture {
    store: SharedStore,
    backend: Backend,
}

enum Backend {
    Local(LocalStore),
    Nats(Box<TestNats>),
}

fn local() -> Fixture {
    let store = LocalStore::new(CAPACITY);
    Fixture {
        store: Arc::new(store.clone()),
        backend: Backend::Local(store),
    }
}

async fn nats() -> Fixture {
    let server = TestNats::start().await;
    let store = nats_store(&server, "store-conformance").await;
    Fixture {
        store: Arc::new(store),
        backend: Backend::Nats(Box::new(server)),
    }
}

/// A store on its own connection, as another process would have.
async fn nats_store(server: &TestNats, name: &str) -> NatsStore {
    NatsStore::new(connect(server, name).await, NatsStoreOptions::default())
}

async fn connect(server: &TestNats, name: &str) -> async_nats::Client {
    let bus = NatsBus::connect(NatsOptions {
        url: server.url(),
        name: name.into(),
        subscription_capacity: 1024,
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        ..NatsOptions::default()
    })
    .await
    .expect("connect to test server");
    bus.client().clone()
}

impl Fixture {
    fn server(&self) -> &TestNats {
        match &self.backend {
            Backend::Nats(server) => server,
            Backend::Local(_) => panic!("not a NATS fixture"),
        }
    }

    /// Live watches of `bucket`: the local store counts them; for NATS, the subscriptions of
    /// every client connection (one per watch; the server's `/connz`).
    async fn watches(&self, bucket: &str) -> usize {
        match &self.backend {
            Backend::Local(store) => store.watchers(bucket),
            Backend::Nats(server) => client_subscriptions(server).await,
        }
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
    put_get_list_delete,
    overwrite_keeps_one_item,
    buckets_are_separate,
    odd_keys_round_trip,
    watch_sees_later_changes_in_order,
    burst_on_one_key_converges,
    watchers_see_the_same_changes,
    dropping_a_watch_stops_it,
    invalid_names_rejected,
);

// ---------------------------------------------------------------- helpers

async fn put(store: &SharedStore, key: &str, value: &str) {
    store
        .put(BUCKET, key, Bytes::from(value.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("put {key:?}: {e}"));
}

async fn delete(store: &SharedStore, key: &str) {
    store
        .delete(BUCKET, key)
        .await
        .unwrap_or_else(|e| panic!("delete {key:?}: {e}"));
}

async fn get(store: &SharedStore, key: &str) -> Option<String> {
    store
        .get(BUCKET, key)
        .await
        .unwrap_or_else(|e| panic!("get {key:?}: {e}"))
        .map(|v| text(&v))
}

async fn list(store: &SharedStore) -> Vec<(String, String)> {
    store
        .list(BUCKET)
        .await
        .expect("list")
        .into_iter()
        .map(|(k, v)| (k, text(&v)))
        .collect()
}

async fn watch(store: &SharedStore) -> StoreWatch {
    store.watch(BUCKET).await.expect("watch")
}

fn text(value: &Bytes) -> String {
    String::from_utf8(value.to_vec()).expect("utf-8 value")
}

fn items(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn put_change(key: &str, value: &str) -> Change {
    Change::Put {
        key: key.to_owned(),
        value: Bytes::from(value.to_owned()),
    }
}

fn delete_change(key: &str) -> Change {
    Change::Delete {
        key: key.to_owned(),
    }
}

async fn next(watch: &mut StoreWatch) -> Change {
    bounded("the next change", watch.next())
        .await
        .expect("watch still open")
}

/// Proves that `watch` got nothing else before: puts `marker` and requires it to be the next
/// change, as changes arrive in order.
async fn assert_nothing_before(store: &SharedStore, watch: &mut StoreWatch, marker: &str) {
    put(store, marker, "marker").await;
    assert_eq!(
        next(watch).await,
        put_change(marker, "marker"),
        "unexpected change before the marker"
    );
}

/// Fails if `f` takes longer than the wait bound.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {WAIT:?}"))
}

/// Polls `probe` every 20 ms until it returns `want`; panics after the wait bound.
async fn eventually<F, Fut>(what: &str, want: usize, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = usize>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        let got = probe().await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {got}, not {want}, after {WAIT:?}"
        );
    }
}

/// The sum of `subscriptions` over the client connections in the server's `/connz`.
async fn client_subscriptions(server: &TestNats) -> usize {
    let addr = server
        .monitor_url()
        .trim_start_matches("http://")
        .to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect to the monitoring port");
    tcp.write_all(b"GET /connz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .expect("send request");
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.expect("read response");
    let response = String::from_utf8(response).expect("utf-8 response");
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let connz: serde_json::Value = serde_json::from_str(body).expect("connz JSON");
    connz["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| usize::try_from(c["subscriptions"].as_u64().expect("subscriptions")).unwrap())
        .sum()
}

// ---------------------------------------------------------------- checks

async fn put_get_list_delete(fx: Fixture) {
    let s = &fx.store;
    assert_eq!(list(s).await, items(&[]), "a new bucket is empty");
    assert_eq!(get(s, "a").await, None);
    put(s, "c", "3").await;
    put(s, "a", "1").await;
    put(s, "b", "2").await;
    assert_eq!(list(s).await, items(&[("a", "1"), ("b", "2"), ("c", "3")]));
    assert_eq!(get(s, "b").await.as_deref(), Some("2"));

    delete(s, "b").await;
    assert_eq!(get(s, "b").await, None);
    assert_eq!(list(s).await, items(&[("a", "1"), ("c", "3")]));
    delete(s, "b").await;
    delete(s, "never-there").await;
    assert_eq!(list(s).await, items(&[("a", "1"), ("c", "3")]));

    put(s, "b", "again").await;
    assert_eq!(get(s, "b").await.as_deref(), Some("again"));
    assert_eq!(
        list(s).await,
        items(&[("a", "1"), ("b", "again"), ("c", "3")])
    );
}

async fn overwrite_keeps_one_item(fx: Fixture) {
    let s = &fx.store;
    put(s, "k", "v1").await;
    put(s, "k", "v2").await;
    assert_eq!(get(s, "k").await.as_deref(), Some("v2"));
    assert_eq!(list(s).await, items(&[("k", "v2")]));
    // An empty value is a value, not a delete.
    put(s, "k", "").await;
    assert_eq!(get(s, "k").await.as_deref(), Some(""));
    assert_eq!(list(s).await, items(&[("k", "")]));
}

async fn buckets_are_separate(fx: Fixture) {
    let s = &fx.store;
    s.put("one", "k", Bytes::from_static(b"1")).await.unwrap();
    assert!(s.list("two").await.unwrap().is_empty());
    assert_eq!(s.get("two", "k").await.unwrap(), None);
    let mut two = s.watch("two").await.unwrap();
    s.put("one", "k", Bytes::from_static(b"2")).await.unwrap();
    s.delete("one", "k").await.unwrap();
    s.put("two", "marker", Bytes::from_static(b"m"))
        .await
        .unwrap();
    assert_eq!(next(&mut two).await, put_change("marker", "m"));
    assert_eq!(s.list("one").await.unwrap(), []);
}

async fn odd_keys_round_trip(fx: Fixture) {
    let s = &fx.store;
    let long = "é".repeat(MAX_KEY_LEN / 2);
    let mut keys: Vec<&str> = ODD_KEYS.to_vec();
    keys.push(&long);
    let mut w = watch(s).await;
    for key in &keys {
        put(s, key, key).await;
    }
    for key in &keys {
        assert_eq!(next(&mut w).await, put_change(key, key));
        assert_eq!(get(s, key).await.as_deref(), Some(*key), "get {key:?}");
    }
    let mut want: Vec<(String, String)> = keys
        .iter()
        .map(|k| ((*k).to_owned(), (*k).to_owned()))
        .collect();
    want.sort();
    assert_eq!(list(s).await, want, "list is in key order");

    for key in &keys {
        delete(s, key).await;
        assert_eq!(next(&mut w).await, delete_change(key));
    }
    assert_eq!(list(s).await, items(&[]));
}

async fn watch_sees_later_changes_in_order(fx: Fixture) {
    let s = &fx.store;
    put(s, "before", "0").await;
    put(s, "gone", "0").await;
    delete(s, "gone").await;
    let mut w = watch(s).await;
    // Made right after `watch` returns: seen. Different keys, so none supersedes another.
    put(s, "b", "1").await;
    put(s, "a", "2").await;
    delete(s, "b").await;
    delete(s, "b").await; // absent: no change
    delete(s, "absent").await;
    put(s, "before", "3").await;
    assert_eq!(next(&mut w).await, put_change("b", "1"));
    assert_eq!(next(&mut w).await, put_change("a", "2"));
    assert_eq!(next(&mut w).await, delete_change("b"));
    assert_eq!(next(&mut w).await, put_change("before", "3"));
    assert_nothing_before(s, &mut w, "marker").await;
    // Each change to one key, when the watcher keeps up.
    for (i, value) in ["4", "5", "6"].into_iter().enumerate() {
        put(s, "a", value).await;
        assert_eq!(next(&mut w).await, put_change("a", value), "change {i}");
    }
    delete(s, "a").await;
    assert_eq!(next(&mut w).await, delete_change("a"));
    assert_nothing_before(s, &mut w, "marker").await;
}

/// A burst of changes to one key: the watcher may skip superseded ones (NATS keeps one
/// revision per key) but sees the rest in order, and always the last.
async fn burst_on_one_key_converges(fx: Fixture) {
    let s = &fx.store;
    let mut w = watch(s).await;
    // Within the local watch capacity (the puts and the delete).
    for i in 0..CAPACITY - 1 {
        put(s, "k", &i.to_string()).await;
    }
    delete(s, "k").await;
    let mut last = None;
    loop {
        match next(&mut w).await {
            Change::Put { key, value } => {
                assert_eq!(key, "k");
                let i: usize = text(&value).parse().unwrap();
                assert!(last.is_none_or(|l| i > l), "{i} after {last:?}");
                last = Some(i);
            }
            Change::Delete { key } => {
                assert_eq!(key, "k");
                break;
            }
            Change::Resync => panic!("resync within the watch capacity"),
        }
    }
    assert_nothing_before(s, &mut w, "marker").await;
    assert_eq!(get(s, "k").await, None);
}

async fn watchers_see_the_same_changes(fx: Fixture) {
    let s = &fx.store;
    let mut first = watch(s).await;
    let mut second = watch(s).await;
    put(s, "k", "1").await;
    delete(s, "k").await;
    for w in [&mut first, &mut second] {
        assert_eq!(next(w).await, put_change("k", "1"));
        assert_eq!(next(w).await, delete_change("k"));
    }
    // A third, later watcher starts from there.
    let mut third = watch(s).await;
    put(s, "k", "2").await;
    for w in [&mut first, &mut second, &mut third] {
        assert_eq!(next(w).await, put_change("k", "2"));
    }
}

async fn dropping_a_watch_stops_it(fx: Fixture) {
    let s = &fx.store;
    put(s, "k", "0").await; // creates the bucket
    let before = fx.watches(BUCKET).await;
    let mut kept = watch(s).await;
    let dropped = watch(s).await;
    // The server's monitoring can list a subscription of a watch's setup a moment longer than
    // it lives (seen in 2 runs of 6): wait for the count to settle.
    eventually("watches after two watches", before + 2, || {
        fx.watches(BUCKET)
    })
    .await;
    drop(dropped);
    eventually("watches after a drop", before + 1, || fx.watches(BUCKET)).await;
    put(s, "k", "1").await;
    assert_eq!(next(&mut kept).await, put_change("k", "1"));
    drop(kept);
    eventually("watches after both drops", before, || fx.watches(BUCKET)).await;
    put(s, "k", "2").await;
    assert_eq!(get(s, "k").await.as_deref(), Some("2"));
}

async fn invalid_names_rejected(fx: Fixture) {
    let s = &fx.store;
    let too_long = "b".repeat(65);
    for bucket in ["", "a.b", "a b", "*", ">", "é", "a/b", too_long.as_str()] {
        let bad = |r: Result<(), StoreError>, op: &str| {
            assert!(
                matches!(&r, Err(StoreError::InvalidBucket(b)) if b == bucket),
                "{op} on bucket {bucket:?}: {r:?}"
            );
        };
        bad(s.put(bucket, "k", Bytes::new()).await, "put");
        bad(s.delete(bucket, "k").await, "delete");
        bad(s.get(bucket, "k").await.map(drop), "get");
        bad(s.list(bucket).await.map(drop), "list");
        bad(s.watch(bucket).await.map(drop), "watch");
    }
    let ok = "a".repeat(64);
    s.put(&ok, "k", Bytes::new()).await.expect("64 characters");

    let long_key = "k".repeat(MAX_KEY_LEN + 1);
    for key in ["", long_key.as_str()] {
        let bad = |r: Result<(), StoreError>, op: &str| {
            assert!(
                matches!(&r, Err(StoreError::InvalidKey(k)) if k == key),
                "{op} with key {key:?}: {r:?}"
            );
        };
        bad(s.put(BUCKET, key, Bytes::new()).await, "put");
        bad(s.delete(BUCKET, key).await, "delete");
        bad(s.get(BUCKET, key).await.map(drop), "get");
    }
    assert!(list(s).await.is_empty());
}

// ---------------------------------------------------------------- local only

#[tokio::test]
async fn local_lagging_watcher_gets_one_resync() {
    let fx = local();
    let s = &fx.store;
    let mut slow = watch(s).await;
    let mut fast = watch(s).await;
    for i in 0..CAPACITY * 3 {
        // Writers never wait for the slow watcher.
        bounded("a put", put(s, &format!("k{i:02}"), "v")).await;
        assert_eq!(next(&mut fast).await, put_change(&format!("k{i:02}"), "v"));
    }
    assert_eq!(next(&mut slow).await, Change::Resync);
    // It continues with what happens next, not with the stale queued changes...
    put(s, "after", "1").await;
    assert_eq!(next(&mut slow).await, put_change("after", "1"));
    // ...and a list then shows it everything.
    assert_eq!(list(s).await.len(), CAPACITY * 3 + 1);
    assert_nothing_before(s, &mut slow, "marker").await;
    assert_eq!(next(&mut fast).await, put_change("after", "1"));
}

// ---------------------------------------------------------------- NATS only

/// A backend writing the bucket with its own NATS client and plain keys is seen as it wrote
/// them; keys not in the store's encoding are skipped; our writes are plain to it, too.
#[tokio::test]
async fn nats_direct_writers_are_seen() {
    let fx = nats().await;
    let s = &fx.store;
    let mut w = watch(s).await; // creates the bucket
    let backend = connect(fx.server(), "backend").await;
    let kv = jetstream::new(backend.clone())
        .get_key_value(BUCKET)
        .await
        .expect("the store created the bucket");

    kv.put("node-1", "up".into()).await.unwrap();
    assert_eq!(next(&mut w).await, put_change("node-1", "up"));
    assert_eq!(list(s).await, items(&[("node-1", "up")]));
    assert_eq!(get(s, "node-1").await.as_deref(), Some("up"));

    // Not in the store's encoding: skipped by watch and list.
    kv.put("a.b", "x".into()).await.unwrap();
    kv.put("=41", "x".into()).await.unwrap();
    kv.put("=e2", "x".into()).await.unwrap();
    // A direct delete (a `DEL` marker) and purge (`PURGE`) are both deletes.
    kv.put("node-2", "up".into()).await.unwrap();
    kv.delete("node-1").await.unwrap();
    kv.purge("node-2").await.unwrap();
    assert_eq!(next(&mut w).await, put_change("node-2", "up"));
    assert_eq!(next(&mut w).await, delete_change("node-1"));
    assert_eq!(next(&mut w).await, delete_change("node-2"));
    assert_eq!(list(s).await, items(&[]));
    assert_eq!(get(s, "node-1").await, None);

    // What we write, the backend reads plainly (or encoded, for odd ids).
    let mut direct = kv.watch_all().await.unwrap();
    backend.flush().await.unwrap();
    put(s, "node-3", "up").await;
    put(s, "x.y", "1").await;
    delete(s, "node-3").await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = bounded("a direct watch entry", direct.next())
            .await
            .unwrap()
            .unwrap();
        seen.push((e.key, e.operation));
    }
    assert_eq!(
        seen,
        [
            ("node-3".to_owned(), Operation::Put),
            ("x=2Ey".to_owned(), Operation::Put),
            ("node-3".to_owned(), Operation::Purge),
        ]
    );
    assert_eq!(kv.get("x=2Ey").await.unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(next(&mut w).await, put_change("node-3", "up"));
    assert_eq!(next(&mut w).await, put_change("x.y", "1"));
    assert_eq!(next(&mut w).await, delete_change("node-3"));
    assert_nothing_before(s, &mut w, "marker").await;
}

/// Two processes (two connections, two stores) creating the same bucket at once, and a third
/// one later, all share it.
#[tokio::test]
async fn nats_bucket_creation_is_idempotent() {
    let server = TestNats::start().await;
    let one: SharedStore = Arc::new(nats_store(&server, "one").await);
    let two: SharedStore = Arc::new(nats_store(&server, "two").await);
    let (a, b) = tokio::join!(
        one.put(BUCKET, "from-one", Bytes::from_static(b"1")),
        two.put(BUCKET, "from-two", Bytes::from_static(b"2")),
    );
    a.expect("first creator");
    b.expect("second creator");
    let mut w = watch(&two).await;
    let three: SharedStore = Arc::new(nats_store(&server, "three").await);
    assert_eq!(
        list(&three).await,
        items(&[("from-one", "1"), ("from-two", "2")])
    );
    put(&one, "later", "3").await;
    assert_eq!(next(&mut w).await, put_change("later", "3"));
    // A bucket made by someone else with other options is used as it is.
    let backend = connect(&server, "backend").await;
    // (`create_key_value` cannot talk to servers before 2.10: make the stream as it would.)
    jetstream::new(backend)
        .create_stream(jetstream::stream::Config {
            name: "KV_theirs".into(),
            subjects: vec!["$KV.theirs.>".into()],
            max_messages_per_subject: 5,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap();
    one.put("theirs", "k", Bytes::from_static(b"v"))
        .await
        .unwrap();
    assert_eq!(
        three.get("theirs", "k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

/// A watch made before a server restart delivers what is written after it, and nothing
/// from before the watch (async-nats recreates an idle consumer with "deliver all"). The
/// server forgets the watch's ephemeral consumer and async-nats misses the quick
/// disconnect/reconnect, so this takes the two missed idle heartbeats (10 s) to notice.
#[tokio::test]
async fn nats_watch_resumes_after_restart() {
    let mut fx = nats().await;
    let s = fx.store.clone();
    put(&s, "before", "0").await;
    // Polled all along, as the edge's pump polls it.
    let mut w = watch(&s).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let pump = tokio::spawn(async move {
        while let Some(change) = w.next().await {
            if tx.send(change).await.is_err() {
                break;
            }
        }
    });
    match &mut fx.backend {
        Backend::Nats(server) => server.restart().await,
        Backend::Local(_) => unreachable!(),
    }
    // The client reconnects in the background; retry until the put goes through.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        match s.put(BUCKET, "after", Bytes::from_static(b"1")).await {
            Ok(()) => break,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "put: {e}"),
        }
    }
    let change = tokio::time::timeout(WAIT * 3, async {
        loop {
            match rx.recv().await.expect("watch still open") {
                Change::Resync => continue,
                other => break other,
            }
        }
    })
    .await
    .expect("a change after the restart");
    assert_eq!(change, put_change("after", "1"));
    pump.abort();
}

#[tokio::test]
async fn nats_value_size_is_bounded() {
    let fx = nats().await;
    let s = &fx.store;
    let max = usize::try_from(NatsStoreOptions::default().max_value_size).unwrap();
    s.put(BUCKET, "big", Bytes::from(vec![b'x'; max]))
        .await
        .expect("a value of the maximum size");
    let err = s
        .put(BUCKET, "bigger", Bytes::from(vec![b'x'; max + 1]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::ValueTooLarge { size, max: m } if size == max + 1 && m == max),
        "{err:?}"
    );
    assert_eq!(s.get(BUCKET, "bigger").await.unwrap(), None);
}
