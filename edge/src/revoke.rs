//! Revoked tokens: the edge's copy of the revocation bucket, and the watch that keeps it
//! current and closes the connections a new entry names (4003 "token revoked").
//!
//! The watch starts before the first listing, so no entry falls between them; after a
//! `Resync` (the store lost changes, e.g. across a NATS reconnect) or the end of the watch,
//! the bucket is listed again and every open connection is checked against the whole set.
//! Entries whose `until` has passed are ignored (the bucket's max age removes them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::{Change, SharedStore};
use futures::StreamExt as _;
use proto::revoke::Revocation;
use tokio_util::sync::CancellationToken;

use crate::conn::{CloseRequest, TOKEN_REVOKED, TokenIds};
use crate::server::Shared;

/// Pause before watching again after the store failed.
const RETRY: Duration = Duration::from_secs(1);

/// The live entries of the bucket, by key.
#[derive(Debug, Default)]
pub(crate) struct Revocations(Mutex<HashMap<String, Revocation>>);

impl Revocations {
    /// Whether a token with `ids`, used in `namespace`, is revoked now.
    pub(crate) fn revokes(&self, ids: &TokenIds, namespace: &str) -> bool {
        let now = unix_now();
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.values()
            .any(|r| r.live(now) && r.matches(ids.jti.as_deref(), ids.sub.as_deref(), namespace))
    }

    fn put(&self, key: String, r: Revocation) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, r);
    }

    fn remove(&self, key: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }

    fn replace(&self, all: HashMap<String, Revocation>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = all;
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Keeps `shared.revoked` in step with `bucket` until `shutdown`.
pub(crate) async fn watch(
    shared: Arc<Shared>,
    store: SharedStore,
    bucket: String,
    shutdown: CancellationToken,
) {
    loop {
        let changes = tokio::select! {
            () = shutdown.cancelled() => return,
            w = store.watch(&bucket) => w,
        };
        let mut changes = match changes {
            Ok(w) => w,
            Err(error) => {
                tracing::warn!(%bucket, %error, "revocation watch failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        if !relist(&shared, &*store, &bucket).await {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY) => continue,
            }
        }
        loop {
            let change = tokio::select! {
                () = shutdown.cancelled() => return,
                c = changes.next() => c,
            };
            match change {
                // The watch ended: watch again.
                None => break,
                Some(Change::Put { key, value }) => match parse(&value) {
                    Some(r) => {
                        close_matching(&shared, std::slice::from_ref(&r));
                        shared.revoked.put(key, r);
                    }
                    None => tracing::warn!(%bucket, "ignoring a revocation that is not valid JSON"),
                },
                Some(Change::Delete { key }) => shared.revoked.remove(&key),
                Some(Change::Resync) => {
                    if !relist(&shared, &*store, &bucket).await {
                        break;
                    }
                }
            }
        }
    }
}

/// Lists the bucket into `shared.revoked` and closes every connection it names.
async fn relist(shared: &Shared, store: &dyn bus::ResourceStore, bucket: &str) -> bool {
    let entries = match store.list(bucket).await {
        Ok(e) => e,
        Err(error) => {
            tracing::warn!(%bucket, %error, "revocations not listed; retrying");
            return false;
        }
    };
    let all: HashMap<String, Revocation> = entries
        .into_iter()
        .filter_map(|(k, v)| Some((k, parse(&v)?)))
        .collect();
    let live: Vec<Revocation> = all.values().cloned().collect();
    shared.revoked.replace(all);
    close_matching(shared, &live);
    tracing::debug!(%bucket, entries = shared.revoked.len(), "revocations listed");
    true
}

/// Closes the open connections whose token one of `entries` revokes.
fn close_matching(shared: &Shared, entries: &[Revocation]) {
    let now = unix_now();
    let live: Vec<&Revocation> = entries.iter().filter(|r| r.live(now)).collect();
    if live.is_empty() {
        return;
    }
    let mut closed = 0u64;
    for h in shared.registry.all() {
        let ids = h.token_ids();
        let ns = &h.info().namespace;
        if live
            .iter()
            .any(|r| r.matches(ids.jti.as_deref(), ids.sub.as_deref(), ns))
        {
            h.close(CloseRequest::new(TOKEN_REVOKED.0, TOKEN_REVOKED.1));
            closed += 1;
        }
    }
    if closed > 0 {
        tracing::info!(closed, "connections closed: token revoked");
    }
}

fn parse(value: &[u8]) -> Option<Revocation> {
    serde_json::from_slice(value).ok()
}

fn unix_now() -> i64 {
    crate::conn::unix_ms() / 1000
}
