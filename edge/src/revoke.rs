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
use proto::revoke::{Kind, Revocation};
use tokio_util::sync::CancellationToken;

use crate::handle::{CloseRequest, TOKEN_REVOKED, TokenIds};
use crate::registry::Registry;

/// Pause before watching again after the store failed, doubled on each failure in a row
/// up to [`RETRY_MAX`] (a server without JetStream is retried, not hammered).
const RETRY: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The bucket's entries, indexed by what they match.
#[derive(Debug, Default)]
pub(crate) struct Revocations(Mutex<Entries>);

#[derive(Debug, Default)]
struct Entries {
    /// By bucket key.
    by_key: HashMap<String, Revocation>,
    /// [`Revocation::key`] (kind, namespace, value) → the bucket keys holding such entries,
    /// so a check is a few lookups however many entries there are.
    index: HashMap<String, Vec<String>>,
}

impl Entries {
    fn put(&mut self, key: String, r: Revocation) {
        self.remove(&key);
        self.index.entry(r.key()).or_default().push(key.clone());
        self.by_key.insert(key, r);
    }

    fn remove(&mut self, key: &str) {
        let Some(old) = self.by_key.remove(key) else {
            return;
        };
        let match_key = old.key();
        if let Some(keys) = self.index.get_mut(&match_key) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.index.remove(&match_key);
            }
        }
    }
}

impl Revocations {
    /// Whether a token with `ids`, used in `namespace`, is revoked now.
    pub(crate) fn revokes(&self, ids: &TokenIds, namespace: &str) -> bool {
        let now = unix_now();
        let entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let claims = [(Kind::Jti, &ids.jti), (Kind::Sub, &ids.sub)];
        claims
            .into_iter()
            .filter_map(|(kind, value)| Some((kind, value.as_ref()?)))
            .flat_map(|(kind, value)| {
                [None, Some(namespace.to_owned())].map(|namespace| {
                    Revocation {
                        kind,
                        value: value.clone(),
                        namespace,
                        until: 0,
                        reason: String::new(),
                    }
                    .key()
                })
            })
            .filter_map(|k| entries.index.get(&k))
            .flatten()
            .filter_map(|k| entries.by_key.get(k))
            .any(|r| r.live(now) && r.matches(ids.jti.as_deref(), ids.sub.as_deref(), namespace))
    }

    fn put(&self, key: String, r: Revocation) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).put(key, r);
    }

    fn remove(&self, key: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }

    fn replace(&self, all: Vec<(String, Revocation)>) {
        let mut fresh = Entries::default();
        for (k, r) in all {
            fresh.put(k, r);
        }
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
    }

    fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .len()
    }
}

/// Keeps `revoked` in step with `bucket` until `shutdown`, closing the connections of
/// `registry` that a new entry names.
pub(crate) async fn watch(
    registry: Arc<Registry>,
    revoked: Arc<Revocations>,
    store: SharedStore,
    bucket: String,
    shutdown: CancellationToken,
) {
    let mut retry = RETRY;
    loop {
        let changes = tokio::select! {
            () = shutdown.cancelled() => return,
            w = store.watch(&bucket) => w,
        };
        let watched = match changes {
            Ok(w) => relist(&registry, &revoked, &*store, &bucket)
                .await
                .then_some(w),
            Err(error) => {
                tracing::warn!(%bucket, %error, ?retry, "revocation watch failed; retrying");
                None
            }
        };
        let Some(mut changes) = watched else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(RETRY_MAX);
            continue;
        };
        retry = RETRY;
        loop {
            let change = tokio::select! {
                () = shutdown.cancelled() => return,
                c = changes.next() => c,
            };
            match change {
                // The watch ended: watch again.
                None => break,
                Some(Change::Put { key, value }) => match parse(&value) {
                    // Recorded before the scan: a connection attached after the scan sees
                    // the entry when it checks itself (`server::run_conn`).
                    Some(r) => {
                        revoked.put(key, r.clone());
                        close_matching(&registry, std::slice::from_ref(&r));
                    }
                    None => tracing::warn!(%bucket, "ignoring a revocation that is not valid JSON"),
                },
                Some(Change::Delete { key }) => revoked.remove(&key),
                Some(Change::Resync) => {
                    if !relist(&registry, &revoked, &*store, &bucket).await {
                        break;
                    }
                }
            }
        }
    }
}

/// Lists the bucket into `revoked` and closes every connection it names.
async fn relist(
    registry: &Registry,
    revoked: &Revocations,
    store: &dyn bus::ResourceStore,
    bucket: &str,
) -> bool {
    let entries = match store.list(bucket).await {
        Ok(e) => e,
        Err(error) => {
            tracing::warn!(%bucket, %error, "revocations not listed");
            return false;
        }
    };
    let all: Vec<(String, Revocation)> = entries
        .into_iter()
        .filter_map(|(k, v)| Some((k, parse(&v)?)))
        .collect();
    let live: Vec<Revocation> = all.iter().map(|(_, r)| r.clone()).collect();
    revoked.replace(all);
    close_matching(registry, &live);
    tracing::debug!(%bucket, entries = revoked.len(), "revocations listed");
    true
}

/// Closes the open connections whose token one of `entries` revokes.
fn close_matching(registry: &Registry, entries: &[Revocation]) {
    let now = unix_now();
    let live: Vec<&Revocation> = entries.iter().filter(|r| r.live(now)).collect();
    if live.is_empty() {
        return;
    }
    let mut closed = 0u64;
    for h in registry.all() {
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
    crate::handle::unix_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: Kind, value: &str, namespace: Option<&str>, until: i64) -> Revocation {
        Revocation {
            kind,
            value: value.into(),
            namespace: namespace.map(str::to_owned),
            until,
            reason: String::new(),
        }
    }

    fn ids(jti: Option<&str>, sub: Option<&str>) -> TokenIds {
        TokenIds {
            jti: jti.map(str::to_owned),
            sub: sub.map(str::to_owned),
        }
    }

    #[test]
    fn lookups_follow_puts_deletes_and_expiry() {
        let later = unix_now() + 600;
        let r = Revocations::default();
        r.put("a".into(), entry(Kind::Jti, "t1", None, later));
        r.put("b".into(), entry(Kind::Sub, "bob", Some("acme"), later));
        r.put("c".into(), entry(Kind::Sub, "old", None, unix_now() - 1));
        assert!(r.revokes(&ids(Some("t1"), Some("x")), "any"));
        assert!(!r.revokes(&ids(Some("t2"), Some("x")), "any"));
        assert!(r.revokes(&ids(None, Some("bob")), "acme"));
        assert!(!r.revokes(&ids(None, Some("bob")), "globex"));
        assert!(
            !r.revokes(&ids(None, Some("old")), "any"),
            "past until: ignored"
        );
        r.remove("a");
        assert!(!r.revokes(&ids(Some("t1"), None), "any"));
        // Overwriting a bucket key with another entry drops the first from the index.
        r.put("b".into(), entry(Kind::Jti, "t3", None, later));
        assert!(!r.revokes(&ids(None, Some("bob")), "acme"));
        assert!(r.revokes(&ids(Some("t3"), None), "acme"));
        r.replace(vec![("z".into(), entry(Kind::Sub, "zed", None, later))]);
        assert_eq!(r.len(), 1);
        assert!(r.revokes(&ids(None, Some("zed")), "n") && !r.revokes(&ids(Some("t3"), None), "n"));
    }
}
