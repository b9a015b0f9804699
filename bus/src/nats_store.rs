//! [`ResourceStore`] over NATS JetStream key-value buckets.
//!
//! Each bucket is a JetStream KV bucket of the same name (stream `KV_<bucket>`), created on
//! first use with [`NatsStoreOptions`]; a bucket that already exists (made by another process,
//! possibly with other options) is used as it is. Works with nats-server 2.9 and later.
//! Backends may write the buckets with any NATS client; what they write is seen by every
//! watcher.
//!
//! **Keys.** JetStream KV keys allow only `[-/_=.a-zA-Z0-9]`, so item ids are encoded: ASCII
//! letters, digits, `-` and `_` stand for themselves and every other byte of the UTF-8 is
//! `=XX` (upper-case hex). A plain id such as `node-1` is therefore the same key for us and
//! for any other client. A key in the bucket that is not in this encoding (e.g. `a.b`, written
//! directly) is skipped by `list` and `watch` with a warning.
//!
//! **Deletes** purge the key (one `PURGE` marker remains for good, older revisions go);
//! deleting a key that is absent writes nothing. Watchers report both `DEL` and `PURGE`
//! markers (from other clients, too) as [`Change::Delete`].
//!
//! **Watches** are async-nats ordered push consumers starting at the stream's next sequence
//! number: on a gap, a slow consumer or a reconnect they are recreated from the last
//! delivered revision, so writers never wait and the latest change to every key arrives
//! (a revision that a later one of the same key replaced in the stream before delivery is
//! skipped). Entries older than the watch are dropped (async-nats recreates a consumer that
//! has delivered nothing yet with "deliver all"). Any error from the watch (e.g. missed
//! heartbeats while the server is down) is reported as one [`Change::Resync`]. After a
//! server restart, a watch resumes within two idle heartbeats (10 s). A dropped watch
//! unsubscribes at once; the server deletes its consumer after 30 s of inactivity.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::jetstream;
use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt, TryStreamExt};
use tracing::{debug, warn};

use crate::store::{Change, ResourceStore, StoreError, StoreWatch, is_valid_bucket, is_valid_key};

/// How many `get`s one `list` runs at a time.
const LIST_CONCURRENCY: usize = 16;
/// Retries of an operation that found no stream listening, and the backoff step between them.
const STREAM_MISSING_RETRIES: u32 = 3;
const STREAM_MISSING_BACKOFF: Duration = Duration::from_millis(50);
/// Bound on the round trip that confirms a watch subscription is registered.
const REGISTRATION_LIMIT: Duration = Duration::from_secs(5);

/// How new buckets are created (existing buckets are used as they are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsStoreOptions {
    /// Copies of each bucket in a JetStream cluster (1 for a single server).
    pub replicas: usize,
    /// Revisions kept per key (1..=64).
    pub history: i64,
    /// The largest value, in bytes; `put` refuses larger ones ([`StoreError::ValueTooLarge`]).
    /// `-1`: no limit of our own (the server's `max_payload` still applies).
    pub max_value_size: i32,
    /// Entries older than this are removed by the server; zero: kept until deleted.
    pub max_age: Duration,
}

impl Default for NatsStoreOptions {
    fn default() -> Self {
        Self {
            replicas: 1,
            history: 1,
            max_value_size: 1024 * 1024,
            max_age: Duration::ZERO,
        }
    }
}

/// The store over JetStream KV. Cloning gives another handle to the same connection and
/// bucket cache.
#[derive(Debug, Clone)]
pub struct NatsStore {
    inner: Arc<Inner>,
}

impl NatsStore {
    /// A store on `client` (which must be connected to a server with JetStream enabled).
    pub fn new(client: async_nats::Client, opts: NatsStoreOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                js: jetstream::new(client.clone()),
                client,
                opts,
                buckets: Mutex::new(HashMap::new()),
            }),
        }
    }
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    opts: NatsStoreOptions,
    /// Bucket handles by name; never locked across an `.await`.
    buckets: Mutex<HashMap<String, kv::Store>>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsStore")
            .field("opts", &self.opts)
            .field("buckets", &self.buckets.try_lock().map(|b| b.len()).ok())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, kv::Store>> {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The handle of `name`, creating the bucket if needed.
    async fn bucket(&self, name: &str) -> Result<kv::Store, StoreError> {
        if !is_valid_bucket(name) {
            return Err(StoreError::InvalidBucket(name.to_owned()));
        }
        if let Some(store) = self.lock().get(name).cloned() {
            return Ok(store);
        }
        let store = match self.js.get_key_value(name).await {
            Ok(store) => store,
            Err(missing) => {
                debug!(bucket = name, error = %missing, "creating bucket");
                // Not `create_key_value`: it first asks for the account info, which async-nats
                // 0.51 cannot parse from servers before 2.10. Creating a stream with the same
                // config is idempotent; if another process created the bucket with other
                // options meanwhile, that bucket is used as it is.
                let created = self.js.create_stream(self.stream_config(name)).await;
                match self.js.get_key_value(name).await {
                    Ok(store) => store,
                    Err(get) => {
                        return Err(match created {
                            Err(create) => unavailable(create),
                            Ok(_) => unavailable(get),
                        });
                    }
                }
            }
        };
        self.lock().insert(name.to_owned(), store.clone());
        Ok(store)
    }

    /// The stream behind a new bucket, as `async_nats` `create_key_value` makes it.
    fn stream_config(&self, bucket: &str) -> jetstream::stream::Config {
        jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(String::new()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: self.opts.history.clamp(1, 64),
            max_message_size: self.opts.max_value_size,
            storage: jetstream::stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            deny_purge: false,
            allow_direct: true,
            num_replicas: self.opts.replicas.max(1),
            discard: jetstream::stream::DiscardPolicy::New,
            max_age: self.opts.max_age,
            ..Default::default()
        }
    }

    /// Drops the cached handle after a failure, so the next use looks the bucket up again
    /// (and recreates it if it was deleted).
    fn forget(&self, bucket: &str, error: StoreError) -> StoreError {
        if matches!(error, StoreError::Unavailable(_)) {
            self.lock().remove(bucket);
        }
        error
    }

    /// Waits until the subscription to a new watch consumer's deliveries is registered, so
    /// that nothing put after `watch` returns is missed (`flush` only writes the socket).
    async fn registered(&self) {
        crate::nats::caught_up(&self.client, REGISTRATION_LIMIT).await;
    }

    /// Runs `op` on the handle of `bucket`. When JetStream answers that no stream listens
    /// (another process's creation of the same bucket racing ours, seen on 2.9 servers, or
    /// a bucket deleted by an operator), looks the bucket up again, recreating it if needed,
    /// and retries a bounded number of times.
    async fn on_bucket<T, E, F, Fut>(&self, bucket: &str, op: F) -> Result<T, StoreError>
    where
        F: Fn(kv::Store) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut retries = 0;
        loop {
            let store = self.bucket(bucket).await?;
            match op(store).await {
                Ok(value) => return Ok(value),
                Err(error) if retries < STREAM_MISSING_RETRIES && stream_missing(&error) => {
                    retries += 1;
                    debug!(bucket, %error, retries, "bucket stream not listening; retrying");
                    self.lock().remove(bucket);
                    tokio::time::sleep(STREAM_MISSING_BACKOFF * retries).await;
                }
                Err(error) => return Err(self.forget(bucket, unavailable(error))),
            }
        }
    }

    async fn put(&self, bucket: &str, key: &str, value: Bytes) -> Result<(), StoreError> {
        let key = encode_checked(key)?;
        if let Ok(max) = usize::try_from(self.opts.max_value_size)
            && value.len() > max
        {
            return Err(StoreError::ValueTooLarge {
                size: value.len(),
                max,
            });
        }
        self.on_bucket(bucket, |store| {
            let (key, value) = (key.clone(), value.clone());
            async move { store.put(key, value).await.map(drop) }
        })
        .await
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        let key = encode_checked(key)?;
        // Only a live key gets a marker: deleting absent ids must not grow the stream.
        let live = self
            .on_bucket(bucket, |store| {
                let key = key.clone();
                async move { store.entry(key).await }
            })
            .await?
            .is_some_and(|entry| entry.operation == Operation::Put);
        if !live {
            return Ok(());
        }
        self.on_bucket(bucket, |store| {
            let key = key.clone();
            async move { store.purge(key).await }
        })
        .await
    }

    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Bytes>, StoreError> {
        let key = encode_checked(key)?;
        self.on_bucket(bucket, |store| {
            let key = key.clone();
            async move { store.get(key).await }
        })
        .await
    }

    async fn list(&self, bucket: &str) -> Result<Vec<(String, Bytes)>, StoreError> {
        let store = self.bucket(bucket).await?;
        let keys: Vec<String> = store
            .keys()
            .await
            .map_err(|e| self.forget(bucket, unavailable(e)))?
            .try_collect()
            .await
            .map_err(|e| self.forget(bucket, unavailable(e)))?;
        let gets = keys.into_iter().filter_map(|raw| {
            let key = decode_or_warn(bucket, &raw)?;
            Some(get_item(&store, raw, key))
        });
        let mut items: Vec<(String, Bytes)> = futures::stream::iter(gets)
            .buffer_unordered(LIST_CONCURRENCY)
            // Gone between `keys` and `get`: deleted meanwhile.
            .try_filter_map(|item| async move { Ok(item) })
            .try_collect()
            .await
            .map_err(|e| self.forget(bucket, unavailable(e)))?;
        items.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(items)
    }

    async fn watch(&self, bucket: &str) -> Result<StoreWatch, StoreError> {
        let store = self.bucket(bucket).await?;
        let info = store
            .stream
            .get_info()
            .await
            .map_err(|e| self.forget(bucket, unavailable(e)))?;
        let start = info.state.last_sequence + 1;
        let entries = store
            .watch_all_from_revision(start)
            .await
            .map_err(|e| self.forget(bucket, unavailable(e)))?;
        self.registered().await;
        Ok(StoreWatch::new(Box::pin(NatsWatch {
            entries,
            start,
            bucket: bucket.to_owned(),
            resynced: false,
        })))
    }
}

impl ResourceStore for NatsStore {
    fn put(&self, bucket: &str, key: &str, value: Bytes) -> BoxFuture<'_, Result<(), StoreError>> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        Box::pin(async move { self.inner.put(&bucket, &key, value).await })
    }

    fn delete(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        Box::pin(async move { self.inner.delete(&bucket, &key).await })
    }

    fn get(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<Option<Bytes>, StoreError>> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        Box::pin(async move { self.inner.get(&bucket, &key).await })
    }

    fn list(&self, bucket: &str) -> BoxFuture<'_, Result<Vec<(String, Bytes)>, StoreError>> {
        let bucket = bucket.to_owned();
        Box::pin(async move { self.inner.list(&bucket).await })
    }

    fn watch(&self, bucket: &str) -> BoxFuture<'_, Result<StoreWatch, StoreError>> {
        let bucket = bucket.to_owned();
        Box::pin(async move { self.inner.watch(&bucket).await })
    }
}

/// A KV watch as a stream of [`Change`]s.
struct NatsWatch {
    entries: kv::Watch,
    /// The first revision made after the watch began.
    start: u64,
    bucket: String,
    /// Whether the last item we yielded was a `Resync` (errors come in bursts).
    resynced: bool,
}

impl Stream for NatsWatch {
    type Item = Change;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Change>> {
        loop {
            let entry = match self.entries.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Ok(entry))) => entry,
                Poll::Ready(Some(Err(error))) => {
                    warn!(bucket = %self.bucket, %error, "store watch interrupted; resyncing");
                    if self.resynced {
                        continue;
                    }
                    self.resynced = true;
                    return Poll::Ready(Some(Change::Resync));
                }
            };
            if entry.revision < self.start {
                continue;
            }
            let Some(key) = decode_or_warn(&self.bucket, &entry.key) else {
                continue;
            };
            self.resynced = false;
            return Poll::Ready(Some(match entry.operation {
                Operation::Put => Change::Put {
                    key,
                    value: entry.value,
                },
                Operation::Delete | Operation::Purge => Change::Delete { key },
            }));
        }
    }
}

/// `key`'s value under its encoded name `raw`, if it still has one.
async fn get_item(
    store: &kv::Store,
    raw: String,
    key: String,
) -> Result<Option<(String, Bytes)>, kv::EntryError> {
    Ok(store.get(raw).await?.map(|value| (key, value)))
}

/// Whether `error` says that no stream listens on the subject (JetStream's 503).
fn stream_missing(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<jetstream::context::PublishError>()
            && e.kind() == jetstream::context::PublishErrorKind::StreamNotFound
        {
            return true;
        }
        if let Some(e) = e.downcast_ref::<async_nats::RequestError>()
            && e.kind() == RequestErrorKind::NoResponders
        {
            return true;
        }
        cause = e.source();
    }
    false
}

fn unavailable(error: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(error))
}

fn encode_checked(key: &str) -> Result<String, StoreError> {
    if !is_valid_key(key) {
        return Err(StoreError::InvalidKey(key.to_owned()));
    }
    Ok(encode_key(key))
}

fn decode_or_warn(bucket: &str, raw: &str) -> Option<String> {
    let key = decode_key(raw);
    if key.is_none() {
        warn!(bucket, key = raw, "skipping a key not written by a store");
    }
    key
}

/// Bytes that stand for themselves in an encoded key.
fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// An item id as a JetStream KV key: plain bytes as themselves, others as `=XX`.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if is_plain(b) {
            out.push(char::from(b));
        } else {
            out.push('=');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    out
}

/// The item id that [`encode_key`] made `raw` from; `None` for anything it cannot have made
/// (other characters, lower-case or escaped plain bytes, invalid UTF-8), so that decoding and
/// encoding again always gives `raw` back.
fn decode_key(raw: &str) -> Option<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        if is_plain(b) {
            out.push(b);
            continue;
        }
        if b != b'=' {
            return None;
        }
        let hi = hex_digit(bytes.next()?)?;
        let lo = hex_digit(bytes.next()?)?;
        let byte = hi << 4 | lo;
        if is_plain(byte) {
            return None;
        }
        out.push(byte);
    }
    if out.is_empty() {
        return None;
    }
    String::from_utf8(out).ok()
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_stay_valid() {
        for key in [
            "node-1", "a b", "x.y", ".lead", "trail.", "é", "=", "=41", "/", "*", ">", "A_z-9",
            "🦀", "a\nb",
        ] {
            let enc = encode_key(key);
            assert!(
                !enc.is_empty()
                    && !enc.starts_with('.')
                    && !enc.ends_with('.')
                    && enc
                        .bytes()
                        .all(|b| is_plain(b) || b == b'=' || b == b'/' || b == b'.'),
                "{key:?} -> {enc:?} is not a valid KV key"
            );
            assert_eq!(decode_key(&enc).as_deref(), Some(key), "{key:?} -> {enc:?}");
        }
        assert_eq!(encode_key("node-1"), "node-1");
        assert_eq!(encode_key("x.y"), "x=2Ey");
        assert_eq!(encode_key("="), "=3D");
        assert_eq!(encode_key("é"), "=C3=A9");
    }

    #[test]
    fn recognises_a_missing_stream() {
        use jetstream::context::{PublishError, PublishErrorKind};
        use jetstream::kv::{PutError, PutErrorKind};
        let put = PutError::with_source(
            PutErrorKind::Ack,
            PublishError::new(PublishErrorKind::StreamNotFound),
        );
        assert!(stream_missing(&put));
        let timeout = PutError::with_source(
            PutErrorKind::Ack,
            PublishError::new(PublishErrorKind::TimedOut),
        );
        assert!(!stream_missing(&timeout));
        let request = async_nats::RequestError::new(RequestErrorKind::NoResponders);
        assert!(stream_missing(&request));
    }

    #[test]
    fn foreign_keys_do_not_decode() {
        for raw in [
            "", "a.b", "a/b", "=", "=4", "=2e", "=41", "=ZZ", "=C3", "=FF", "a=2", "=3D=",
        ] {
            assert_eq!(decode_key(raw), None, "{raw:?}");
        }
    }
}
