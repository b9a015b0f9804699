//! The resource store: key-value buckets with watch, for resources that clients `query`,
//! `get` and `watch` (docs/PROTOCOL.md §4.3 Resources).
//!
//! | implementation | what |
//! | --- | --- |
//! | `local_store::LocalStore` | in-process, for the embedded mode and unit tests |
//! | `nats_store::NatsStore` | NATS JetStream key-value buckets, for cluster mode: a backend writing the bucket with any NATS client is seen by every watcher |
//!
//! Keys are arbitrary non-empty strings of at most [`MAX_KEY_LEN`] bytes (item ids);
//! implementations encode them into whatever their backend accepts and decode them back, so
//! callers never see the encoding. Values are opaque bytes (JSON items, in practice). Buckets
//! are created on first use.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use futures::future::BoxFuture;

/// A shared handle to whichever store this process uses.
pub type SharedStore = Arc<dyn ResourceStore>;

/// Key-value buckets with watch.
pub trait ResourceStore: Send + Sync + fmt::Debug + 'static {
    /// Sets `key` to `value`.
    fn put(&self, bucket: &str, key: &str, value: Bytes) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Removes `key` (no error if it is absent).
    fn delete(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The value of `key`, if any.
    fn get(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<Option<Bytes>, StoreError>>;

    /// Every key with its value, in key order.
    fn list(&self, bucket: &str) -> BoxFuture<'_, Result<Vec<(String, Bytes)>, StoreError>>;

    /// Changes made after this call returns, in order. To show current state and then
    /// changes without a gap, watch first, then list (a change may then be seen twice,
    /// never missed). A change that a later change to the same key supersedes before the
    /// watcher received it may be skipped (the NATS store keeps one revision per key); the
    /// latest change to every key always arrives.
    fn watch(&self, bucket: &str) -> BoxFuture<'_, Result<StoreWatch, StoreError>>;
}

/// One change in a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put {
        key: String,
        value: Bytes,
    },
    Delete {
        key: String,
    },
    /// The watcher fell behind and lost changes: list again.
    Resync,
}

/// A stream of [`Change`]s; dropping it stops the watch.
pub struct StoreWatch {
    inner: Pin<Box<dyn Stream<Item = Change> + Send>>,
}

impl StoreWatch {
    pub fn new(inner: Pin<Box<dyn Stream<Item = Change> + Send>>) -> Self {
        Self { inner }
    }
}

impl fmt::Debug for StoreWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreWatch").finish_non_exhaustive()
    }
}

impl Stream for StoreWatch {
    type Item = Change;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Change>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid bucket name {0:?} (letters, digits, - and _ only)")]
    InvalidBucket(String),
    /// Empty, or longer than [`MAX_KEY_LEN`] bytes.
    #[error("invalid key {0:?}")]
    InvalidKey(String),
    /// The value is larger than the store accepts.
    #[error("value of {size} bytes is larger than the limit of {max} bytes")]
    ValueTooLarge { size: usize, max: usize },
    #[error("store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The longest key, in bytes of UTF-8. Keeps every NATS protocol line that carries an
/// encoded key (up to 3 bytes per key byte) well under the server's 4 KiB control-line limit.
pub const MAX_KEY_LEN: usize = 512;

/// Whether `key` is a valid key: non-empty and at most [`MAX_KEY_LEN`] bytes.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN
}

/// Whether `name` is a valid bucket name.
pub fn is_valid_bucket(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
