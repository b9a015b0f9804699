//! Resource verbs (PROTOCOL.md §1; the MonoRail dialect): `query`, `all`, `get`, `watch`,
//! `stop` on the resource types a route configures. A key-value resource lives in the
//! resource store (NATS JetStream KV in cluster mode), so a backend writing the bucket
//! directly is seen by every watcher; a topic resource is a bus subject whose messages are
//! items, which can only be watched.
//!
//! A watch runs in its own task and pushes `list`, then `item`/`remove` frames through the
//! connection's outbound queue (so its frames obey the same backpressure rules as any other).

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt;
use proto::frame::{self, ClientFrame, ErrorCode, FrameBuilder, Key};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use edge_core::Verb;

use crate::config::{ResourceConfig, ResourceKind};
use crate::conn::{Conn, ConnHandle};
use crate::server::Shared;

/// Handles a resource verb; returns the frame to answer with, if any.
pub(crate) async fn verb<S>(conn: &mut Conn<S>, verb: Verb, f: &ClientFrame) -> Option<String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let route = Arc::clone(conn.route());
    let (key, dialect) = (route.key, route.cfg.dialect);
    let field = dialect.row().resource_field;
    let name = f.str(field).unwrap_or_default().to_owned();
    let params = match f.body.get("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Some(error(
                conn,
                f,
                &name,
                ErrorCode::InvalidFrame,
                "params must be an object",
            ));
        }
    };
    if verb == Verb::Stop {
        let watch_key = watch_key(&name, &params);
        let stopped: Vec<String> = conn
            .watches
            .keys()
            .filter(|k| {
                **k == watch_key || (params.is_empty() && k.starts_with(&format!("{name}\u{0}")))
            })
            .cloned()
            .collect();
        for k in stopped {
            if let Some(t) = conn.watches.remove(&k) {
                t.cancel();
            }
        }
        if !dialect.row().answers_stop {
            return None;
        }
        let b = FrameBuilder::new(key, "stopped")
            .id(f.id.as_ref())
            .str(field, &name);
        return Some(b.value("params", &Value::Object(params)).finish());
    }
    let Some(res) = route.cfg.resources.get(&name) else {
        let msg = if name.is_empty() {
            format!("{} needs a \"{field}\" naming a resource", f.verb)
        } else {
            format!("no resource type {name:?} on this route")
        };
        return Some(error(conn, f, &name, ErrorCode::UnknownResource, &msg));
    };
    if res.kind == ResourceKind::Topic && verb != Verb::Watch {
        let msg = format!("{name} is a topic: it can be watched, not queried");
        return Some(error(conn, f, &name, ErrorCode::NotSupported, &msg));
    }
    if res.kind == ResourceKind::Topic {
        return start_watch(conn, f, &name, res, params, None);
    }
    let Some(store) = conn.shared.store.clone() else {
        return Some(error(
            conn,
            f,
            &name,
            ErrorCode::Unavailable,
            "no resource store on this node",
        ));
    };
    let bucket = res.bucket_name(&name);
    match verb {
        Verb::Query | Verb::All => {
            let filter = if verb == Verb::Query {
                params
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
                    Some(list_frame(key, field, &name, f.id.as_ref(), &items))
                }
                Err(e) => Some(error(
                    conn,
                    f,
                    &name,
                    ErrorCode::Unavailable,
                    &e.to_string(),
                )),
            }
        }
        Verb::Get => {
            let Some(id) = params.get(&res.id_field).and_then(id_string) else {
                let msg = format!("get needs params.{}", res.id_field);
                return Some(error(conn, f, &name, ErrorCode::InvalidFrame, &msg));
            };
            match store.get(&bucket, &id).await {
                Ok(Some(v)) => match item(&v) {
                    Some(data) => Some(item_frame(key, field, &name, f.id.as_ref(), &data)),
                    None => Some(remove_frame(key, field, &name, f.id.as_ref(), &params)),
                },
                Ok(None) => Some(remove_frame(key, field, &name, f.id.as_ref(), &params)),
                Err(e) => Some(error(
                    conn,
                    f,
                    &name,
                    ErrorCode::Unavailable,
                    &e.to_string(),
                )),
            }
        }
        Verb::Watch => start_watch(conn, f, &name, res, params, Some(store)),
        _ => Some(error(
            conn,
            f,
            &name,
            ErrorCode::UnknownVerb,
            "unknown resource verb",
        )),
    }
}

fn start_watch<S>(
    conn: &mut Conn<S>,
    f: &ClientFrame,
    name: &str,
    res: &ResourceConfig,
    params: Map<String, Value>,
    store: Option<bus::SharedStore>,
) -> Option<String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let k = watch_key(name, &params);
    if let Some(old) = conn.watches.remove(&k) {
        old.cancel();
    }
    let stop = CancellationToken::new();
    conn.watches.insert(k, stop.clone());
    let w = Watch {
        shared: Arc::clone(&conn.shared),
        handle: conn.handle.clone(),
        name: name.to_owned(),
        res: res.clone(),
        params,
        id: f.id.clone(),
        stop,
    };
    let tracker = conn.shared.tracker.clone();
    match (res.kind, store) {
        (ResourceKind::Kv, Some(store)) => {
            tracker.spawn(w.run_kv(store));
        }
        _ => {
            tracker.spawn(w.run_topic());
        }
    }
    None
}

/// One running watch.
struct Watch {
    shared: Arc<Shared>,
    handle: ConnHandle,
    name: String,
    res: ResourceConfig,
    params: Map<String, Value>,
    id: Option<Value>,
    stop: CancellationToken,
}

impl Watch {
    fn key(&self) -> Key {
        self.handle.info().route.key
    }

    fn field(&self) -> &'static str {
        self.handle.info().route.cfg.dialect.row().resource_field
    }

    fn push(&self, frame: String) {
        self.handle.deliver(&Utf8Bytes::from(frame));
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
        let mut sub = match self.shared.bus.subscribe(subject, None).await {
            Ok(s) => s,
            Err(e) => return self.fail(&e.to_string()),
        };
        let _ = self.shared.bus.flush().await;
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

/// The identity of a watch on a connection: resource and params.
fn watch_key(name: &str, params: &Map<String, Value>) -> String {
    format!("{name}\u{0}{}", Value::Object(params.clone()))
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
pub(crate) fn error<S>(
    conn: &Conn<S>,
    f: &ClientFrame,
    name: &str,
    code: ErrorCode,
    message: &str,
) -> String
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let route = conn.route();
    let params = f
        .body
        .get("params")
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    let b = frame::FrameBuilder::new(route.key, "error")
        .id(f.id.as_ref())
        .str("code", code.as_str())
        .str("message", message);
    b.str(route.cfg.dialect.row().resource_field, name)
        .value("params", &params)
        .finish()
}
