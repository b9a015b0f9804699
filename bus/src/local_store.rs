//! In-process [`ResourceStore`].
//!
//! Each bucket is a `BTreeMap` (so `list` is in key order) plus a bounded broadcast channel
//! of its changes, both behind one `std` mutex that is never held across an `.await`.
//! Writers mutate and send under the lock, so every watcher sees changes in the order they
//! were made. A watcher that falls more than `watch_capacity` changes behind gets one
//! [`Change::Resync`] and continues with the changes made after it noticed; writers never wait
//! for watchers.

use std::collections::{BTreeMap, HashMap};
use std::future::ready;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::store::{Change, ResourceStore, StoreError, StoreWatch, is_valid_bucket, is_valid_key};

/// The in-memory store. Cloning gives another handle to the same buckets.
#[derive(Debug, Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

impl LocalStore {
    /// A store whose watchers may fall `watch_capacity` changes behind (at least 1) before
    /// they get a [`Change::Resync`].
    pub fn new(watch_capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                capacity: watch_capacity.max(1),
                buckets: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// How many watches of `bucket` are alive (for metrics and tests).
    pub fn watchers(&self, bucket: &str) -> usize {
        self.inner
            .lock()
            .get(bucket)
            .map_or(0, |b| b.changes.receiver_count())
    }
}

#[derive(Debug)]
struct Inner {
    capacity: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    items: BTreeMap<String, Bytes>,
    changes: broadcast::Sender<Change>,
}

impl Inner {
    /// The lock stays usable after a panic elsewhere: every update is a single map operation
    /// followed by a send, so the state is never half-written.
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Bucket>> {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn put(&self, bucket: &str, key: &str, value: Bytes) -> Result<(), StoreError> {
        check(bucket, Some(key))?;
        let mut buckets = self.lock();
        let b = self.bucket(&mut buckets, bucket);
        b.items.insert(key.to_owned(), value.clone());
        // No receivers is not an error: nobody watches.
        let _ = b.changes.send(Change::Put {
            key: key.to_owned(),
            value,
        });
        Ok(())
    }

    fn delete(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        check(bucket, Some(key))?;
        let mut buckets = self.lock();
        let Some(b) = buckets.get_mut(bucket) else {
            return Ok(());
        };
        if b.items.remove(key).is_some() {
            let _ = b.changes.send(Change::Delete {
                key: key.to_owned(),
            });
        }
        Ok(())
    }

    fn get(&self, bucket: &str, key: &str) -> Result<Option<Bytes>, StoreError> {
        check(bucket, Some(key))?;
        Ok(self
            .lock()
            .get(bucket)
            .and_then(|b| b.items.get(key).cloned()))
    }

    fn list(&self, bucket: &str) -> Result<Vec<(String, Bytes)>, StoreError> {
        check(bucket, None)?;
        Ok(self.lock().get(bucket).map_or_else(Vec::new, |b| {
            b.items
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }))
    }

    fn watch(&self, bucket: &str) -> Result<StoreWatch, StoreError> {
        check(bucket, None)?;
        let rx = self.bucket(&mut self.lock(), bucket).changes.subscribe();
        Ok(StoreWatch::new(Box::pin(changes(rx))))
    }

    fn bucket<'a>(&self, buckets: &'a mut HashMap<String, Bucket>, name: &str) -> &'a mut Bucket {
        buckets.entry(name.to_owned()).or_insert_with(|| Bucket {
            items: BTreeMap::new(),
            changes: broadcast::channel(self.capacity).0,
        })
    }
}

impl ResourceStore for LocalStore {
    fn put(&self, bucket: &str, key: &str, value: Bytes) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(ready(self.inner.put(bucket, key, value)))
    }

    fn delete(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(ready(self.inner.delete(bucket, key)))
    }

    fn get(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<Option<Bytes>, StoreError>> {
        Box::pin(ready(self.inner.get(bucket, key)))
    }

    fn list(&self, bucket: &str) -> BoxFuture<'_, Result<Vec<(String, Bytes)>, StoreError>> {
        Box::pin(ready(self.inner.list(bucket)))
    }

    fn watch(&self, bucket: &str) -> BoxFuture<'_, Result<StoreWatch, StoreError>> {
        Box::pin(ready(self.inner.watch(bucket)))
    }
}

fn check(bucket: &str, key: Option<&str>) -> Result<(), StoreError> {
    if !is_valid_bucket(bucket) {
        return Err(StoreError::InvalidBucket(bucket.to_owned()));
    }
    match key {
        Some(key) if !is_valid_key(key) => Err(StoreError::InvalidKey(key.to_owned())),
        _ => Ok(()),
    }
}

/// The changes `rx` receives. On lag: one [`Change::Resync`], then the changes made after
/// the lag was noticed (the stale ones still queued are skipped, as the watcher lists anew).
fn changes(rx: broadcast::Receiver<Change>) -> impl futures::Stream<Item = Change> + Send {
    futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(change) => Some((change, rx)),
            Err(RecvError::Lagged(_)) => Some((Change::Resync, rx.resubscribe())),
            Err(RecvError::Closed) => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn lag_skips_stale_changes() {
        let store = LocalStore::new(2);
        let mut watch = store.watch("b").await.expect("watch");
        for i in 0..5 {
            store
                .put("b", &format!("k{i}"), Bytes::new())
                .await
                .expect("put");
        }
        assert_eq!(watch.next().await, Some(Change::Resync));
        store.put("b", "new", Bytes::new()).await.expect("put");
        assert_eq!(
            watch.next().await,
            Some(Change::Put {
                key: "new".into(),
                value: Bytes::new()
            })
        );
        assert_eq!(store.watchers("b"), 1);
    }
}
