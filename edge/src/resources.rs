//! Resource verbs (docs/PROTOCOL.md §4.3; the MonoRail dialect, §9): `query`, `all`, `get`
//! and `watch` on the resource types a route configures, once the session has checked the
//! frame (and handled `stop`). A key-value resource lives in the
//! resource store (NATS JetStream KV in cluster mode), so a backend writing the bucket
//! directly is seen by every watcher; a topic resource is a bus subject whose messages are
//! items, which can only be watched.
//!
//! A watch runs in its own task and pushes `list`, then `item`/`remove` frames through the
//! connection's outbound queue (so its frames obey the same backpressure rules as any other).

use std::collections::HashSet;
use std::sync::Arc;

use edge_core::Verb;
use edge_core::session::ResourceCall;
use futures::StreamExt;
use proto::frame::{ErrorCode, FrameBuilder, Key};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::config::{ResourceConfig, ResourceKind};
use crate::env::Env;
use crate::handle::ConnHandle;
use crate::route::Route;

/// Answers a `query`, `all` or `get` the session has checked, from the store; `None` for
/// other verbs.
pub(crate) async fn answer(
    store: Option<&bus::SharedStore>,
    route: &Route,
    call: &ResourceCall,
    res: &ResourceConfig,
) -> Option<String> {
    let (key, field) = (route.key, route.cfg.dialect.row().resource_field);
    let id = call.id.as_ref();
    let Some(store) = store else {
        let msg = "no resource store on this node";
        return Some(error(key, field, call, ErrorCode::Unavailable, msg));
    };
    let bucket = res.bucket_name(&call.name);
    Some(match call.verb {
        Verb::Query | Verb::All => {
            let filter = if call.verb == Verb::Query {
                call.params.clone()
            } else {
                Map::new()
            };
            match store.list(&bucket).await {
                Ok(entries) => {
                    let items: Vec<Value> = entries
                        .iter()
                        .filter_map(|(_, v)| item(v))
                        .filter(|i| matches(i, &filter))
                        .collect();
                    list_frame(key, field, &call.name, id, &items)
                }
                Err(e) => error(key, field, call, ErrorCode::Unavailable, &e.to_string()),
            }
        }
        Verb::Get => {
            let Some(item_id) = call.params.get(&call.id_field).and_then(id_string) else {
                let msg = format!("get needs params.{}", call.id_field);
                return Some(error(key, field, call, ErrorCode::InvalidFrame, &msg));
            };
            match store.get(&bucket, &item_id).await {
                Ok(Some(v)) => match item(&v) {
                    Some(data) => item_frame(key, field, &call.name, id, &data),
                    None => remove_frame(key, field, &call.name, id, &call.params),
                },
                Ok(None) => remove_frame(key, field, &call.name, id, &call.params),
                Err(e) => error(key, field, call, ErrorCode::Unavailable, &e.to_string()),
            }
        }
        _ => return None,
    })
}

/// Starts a watch for `handle` (its frames go through the connection's queue); cancel the
/// token to stop it.
pub(crate) fn watch(
    env: &Env,
    handle: &ConnHandle,
    call: ResourceCall,
    res: &ResourceConfig,
) -> CancellationToken {
    let stop = CancellationToken::new();
    let w = Watch {
        bus: Arc::clone(&env.bus),
        handle: handle.clone(),
        name: call.name,
        res: res.clone(),
        params: call.params,
        id: call.id,
        stop: stop.clone(),
    };
    match (res.kind, env.store.clone()) {
        (ResourceKind::Kv, Some(store)) => {
            env.tracker.spawn(w.run_kv(store));
        }
        (ResourceKind::Kv, None) => w.fail("no resource store on this node"),
        (ResourceKind::Topic, _) => {
            env.tracker.spawn(w.run_topic());
        }
    }
    stop
}

/// One running watch.
struct Watch {
    bus: bus::SharedBus,
    handle: ConnHandle,
    name: String,
    res: ResourceConfig,
    params: Map<String, Value>,
    id: Option<Value>,
    stop: CancellationToken,
}

impl Watch {
    fn key(&self) -> Key {
        self.handle.route().key
    }

    fn field(&self) -> &'static str {
        self.handle.route().cfg.dialect.row().resource_field
    }

    fn push(&self, frame: String) {
        self.handle.push(frame);
    }

    fn fail(&self, message: &str) {
        let f = FrameBuilder::new(self.key(), "error")
            .id(self.id.as_ref())
            .str("code", ErrorCode::Unavailable.as_str())
            .str("message", message)
            .str(self.field(), &self.name)
            .value("params", &Value::Object(self.params.clone()))
            .finish();
        self.push(f);
    }

    /// `list` of the matching items, then `item`/`remove` as they change.
    async fn run_kv(self, store: bus::SharedStore) {
        let bucket = self.res.bucket_name(&self.name);
        let mut changes = match store.watch(&bucket).await {
            Ok(w) => w,
            Err(e) => return self.fail(&e.to_string()),
        };
        let Some(mut seen) = self.relist(&*store, &bucket).await else {
            return;
        };
        loop {
            let change = tokio::select! {
                () = self.stop.cancelled() => return,
                c = changes.next() => match c { Some(c) => c, None => return },
            };
            match change {
                bus::Change::Put { key, value } => match item(&value) {
                    Some(data) if matches(&data, &self.params) => {
                        seen.insert(key);
                        self.push(item_frame(
                            self.key(),
                            self.field(),
                            &self.name,
                            None,
                            &data,
                        ));
                    }
                    _ => {
                        if seen.remove(&key) {
                            self.push(self.removed(&key));
                        }
                    }
                },
                bus::Change::Delete { key } => {
                    if seen.remove(&key) {
                        self.push(self.removed(&key));
                    }
                }
                bus::Change::Resync => match self.relist(&*store, &bucket).await {
                    Some(s) => seen = s,
                    None => return,
                },
            }
        }
    }

    async fn relist(
        &self,
        store: &dyn bus::ResourceStore,
        bucket: &str,
    ) -> Option<HashSet<String>> {
        match store.list(bucket).await {
            Ok(entries) => {
                let mut seen = HashSet::new();
                let mut items = Vec::new();
                for (k, v) in &entries {
                    if let Some(i) = item(v).filter(|i| matches(i, &self.params)) {
                        seen.insert(k.clone());
                        items.push(i);
                    }
                }
                self.push(list_frame(
                    self.key(),
                    self.field(),
                    &self.name,
                    self.id.as_ref(),
                    &items,
                ));
                Some(seen)
            }
            Err(e) => {
                self.fail(&e.to_string());
                None
            }
        }
    }

    /// An empty `list`, then each message on the subject that matches as an `item`.
    async fn run_topic(self) {
        let subject = self.res.subject_name(&self.name);
        let mut sub = match self.bus.subscribe(subject, None).await {
            Ok(s) => s,
            Err(e) => return self.fail(&e.to_string()),
        };
        let _ = self.bus.flush().await;
        self.push(list_frame(
            self.key(),
            self.field(),
            &self.name,
            self.id.as_ref(),
            &[],
        ));
        loop {
            let msg = tokio::select! {
                () = self.stop.cancelled() => return,
                m = sub.next() => match m { Some(m) => m, None => return },
            };
            let data = item(&msg.payload).unwrap_or_else(|| {
                Value::String(String::from_utf8_lossy(&msg.payload).into_owned())
            });
            if matches(&data, &self.params) {
                self.push(item_frame(
                    self.key(),
                    self.field(),
                    &self.name,
                    None,
                    &data,
                ));
            }
        }
    }

    fn removed(&self, id: &str) -> String {
        let mut params = Map::new();
        params.insert(self.res.id_field.clone(), Value::String(id.to_owned()));
        remove_frame(self.key(), self.field(), &self.name, None, &params)
    }
}

fn item(bytes: &[u8]) -> Option<Value> {
    serde_json::from_slice(bytes).ok()
}

/// Whether every param equals the item's field of that name.
fn matches(item: &Value, params: &Map<String, Value>) -> bool {
    params.iter().all(|(k, v)| item.get(k) == Some(v))
}

fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn list_frame(key: Key, field: &str, name: &str, id: Option<&Value>, items: &[Value]) -> String {
    FrameBuilder::new(key, "list")
        .id(id)
        .str(field, name)
        .value("items", &Value::Array(items.to_vec()))
        .finish()
}

fn item_frame(key: Key, field: &str, name: &str, id: Option<&Value>, data: &Value) -> String {
    FrameBuilder::new(key, "item")
        .id(id)
        .str(field, name)
        .value("data", data)
        .finish()
}

fn remove_frame(
    key: Key,
    field: &str,
    name: &str,
    id: Option<&Value>,
    params: &Map<String, Value>,
) -> String {
    FrameBuilder::new(key, "remove")
        .id(id)
        .str(field, name)
        .value("params", &Value::Object(params.clone()))
        .finish()
}

/// An error about a resource: the usual code and message, plus the resource and params (as
/// MonoRail's `{handler: error, type, params}`).
fn error(key: Key, field: &str, call: &ResourceCall, code: ErrorCode, message: &str) -> String {
    FrameBuilder::new(key, "error")
        .id(call.id.as_ref())
        .str("code", code.as_str())
        .str("message", message)
        .str(field, &call.name)
        .value("params", &Value::Object(call.params.clone()))
        .finish()
}
