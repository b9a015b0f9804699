//! The client protocol (PROTOCOL.md §1): built-in verbs, and events forwarded to backends
//! through the route's hooks (§3).

use std::sync::Arc;
use std::time::Duration;

use bus::{BusError, Outgoing, SharedBus};
use futures::FutureExt;
use proto::frame::{self, ClientFrame, ErrorCode, FrameBuilder, FrameError, Key};
use proto::{subject, topic};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::conn::{Conn, ConnError, ConnHandle};

/// What a backend's answer turned into: a frame for the client, and whether the connection
/// is refused (onconnect only).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) frame: Option<String>,
    pub(crate) refuse: bool,
}

pub(crate) async fn on_text<S>(conn: &mut Conn<S>, text: &str) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let route = Arc::clone(conn.route());
    let key = route.cfg.key;
    let frame = match ClientFrame::parse(text, key) {
        Ok(f) => f,
        Err(FrameError::InvalidJson(_)) => {
            let f = frame::error(
                key,
                None,
                ErrorCode::InvalidJson,
                "frame is not a JSON object",
            );
            return conn.push(f).await;
        }
        Err(FrameError::MissingKey(k)) => {
            let msg = format!("frame has no string \"{k}\" field");
            return conn
                .push(frame::error(key, None, ErrorCode::MissingType, &msg))
                .await;
        }
    };
    let id = frame.id.as_ref();
    let answer = match frame.verb.as_str() {
        "init" => {
            let session = frame
                .str("session")
                .filter(|s| !s.is_empty() && s.len() <= 128)
                .map_or_else(|| conn.handle.id().to_string(), str::to_owned);
            FrameBuilder::new(key, "session")
                .id(id)
                .str("id", &session)
                .finish()
        }
        "ping" => FrameBuilder::new(key, "pong").id(id).finish(),
        "subscribe" => subscribe(conn, &frame).await,
        "unsubscribe" => unsubscribe(conn, &frame),
        "publish" => publish(conn, &frame).await,
        "watch" | "stop" | "query" | "all" | "get" => {
            let resource = frame.str("resource").unwrap_or("");
            let msg = format!("no resource type {resource:?} on this route");
            frame::error(key, id, ErrorCode::UnknownResource, &msg)
        }
        _ => return forward_event(conn, frame).await,
    };
    conn.push(answer).await
}

async fn subscribe<S>(conn: &mut Conn<S>, f: &ClientFrame) -> String
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let key = conn.route().cfg.key;
    let id = f.id.as_ref();
    let Some(filter) = f.str("topic") else {
        return frame::error(
            key,
            id,
            ErrorCode::InvalidFrame,
            "subscribe needs a string \"topic\"",
        );
    };
    if let Err(e) = topic::validate_filter(filter) {
        return frame::error(key, id, ErrorCode::InvalidTopic, &e.to_string());
    }
    if !conn.topics.contains(filter) {
        if conn.topics.len() >= conn.route().cfg.max_topics {
            return frame::error(
                key,
                id,
                ErrorCode::Forbidden,
                "too many topics on this connection",
            );
        }
        let shared = Arc::clone(&conn.shared);
        if let Err(e) = shared
            .registry
            .subscribe(&shared, &conn.handle, filter)
            .await
        {
            tracing::warn!(conn = %conn.handle.id(), error = %e, "subscribe failed");
            return frame::error(
                key,
                id,
                ErrorCode::Unavailable,
                "subscription failed; try again",
            );
        }
        conn.topics.insert(filter.to_owned());
    }
    FrameBuilder::new(key, "subscribed")
        .id(id)
        .str("topic", filter)
        .finish()
}

fn unsubscribe<S>(conn: &mut Conn<S>, f: &ClientFrame) -> String
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let key = conn.route().cfg.key;
    let id = f.id.as_ref();
    let Some(filter) = f.str("topic") else {
        return frame::error(
            key,
            id,
            ErrorCode::InvalidFrame,
            "unsubscribe needs a string \"topic\"",
        );
    };
    if conn.topics.remove(filter) {
        conn.shared
            .registry
            .unsubscribe(&conn.shared, &conn.handle, filter);
    }
    FrameBuilder::new(key, "unsubscribed")
        .id(id)
        .str("topic", filter)
        .finish()
}

async fn publish<S>(conn: &mut Conn<S>, f: &ClientFrame) -> String
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let route = Arc::clone(conn.route());
    let key = route.cfg.key;
    let id = f.id.as_ref();
    if !route.cfg.publish {
        return frame::error(
            key,
            id,
            ErrorCode::Forbidden,
            "clients may not publish on this route",
        );
    }
    let Some(t) = f.str("topic") else {
        return frame::error(
            key,
            id,
            ErrorCode::InvalidFrame,
            "publish needs a string \"topic\"",
        );
    };
    if let Err(e) = topic::validate_topic(t) {
        return frame::error(key, id, ErrorCode::InvalidTopic, &e.to_string());
    }
    let payload = f.body.get("payload").unwrap_or(&Value::Null).to_string();
    let info = conn.handle.info();
    let mut msg = Outgoing::new(subject::topic(&info.namespace, t.split('/')), payload)
        .with_header(subject::HEADER_ORIGIN, info.id.to_string());
    if f.flag("echo") {
        msg = msg.with_header(subject::HEADER_ECHO, "1");
    }
    if let Err(e) = conn.shared.bus.publish(msg).await {
        tracing::warn!(conn = %info.id, error = %e, "publish failed");
        return frame::error(key, id, ErrorCode::Unavailable, "publish failed; try again");
    }
    FrameBuilder::new(key, "published")
        .id(id)
        .str("topic", t)
        .finish()
}

/// Any frame not handled by a built-in verb: a request to the backend on the subject the
/// route's hooks map it to; the reply goes back to this socket only.
async fn forward_event<S>(conn: &mut Conn<S>, f: ClientFrame) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let route = Arc::clone(conn.route());
    let key = route.cfg.key;
    if conn.inflight.len() >= route.cfg.max_inflight {
        let msg = "too many events awaiting a reply";
        return conn
            .push(frame::error(
                key,
                f.id.as_ref(),
                ErrorCode::TooManyRequests,
                msg,
            ))
            .await;
    }
    let info = conn.handle.info();
    let hooks = route.cfg.hooks.onmessage.as_ref();
    let mapped = hooks.and_then(|h| {
        h.types
            .iter()
            .find(|t| t.event_type == f.verb)
            .map(|t| &t.publish)
            .or(h.publish.as_ref())
    });
    let (subject, reply_type) = match mapped {
        Some(s) => (s.clone(), s.clone()),
        None => (subject::event(&info.namespace, &f.verb), f.verb.clone()),
    };
    let id = f.id.clone();
    let body = context(
        &conn.handle,
        &conn.shared.node_id,
        Some(Value::Object(f.body)),
    );
    let fut = request(
        conn.shared.bus.clone(),
        subject,
        body,
        conn.shared.request_timeout,
    )
    .map(move |result| event_reply(key, &reply_type, id.as_ref(), result));
    conn.inflight.push(fut.boxed());
    Ok(())
}

/// The onconnect hook's request, if the route has one.
pub(crate) fn onconnect(
    handle: &ConnHandle,
    node_id: &str,
    bus: &SharedBus,
    timeout: Duration,
) -> Option<futures::future::BoxFuture<'static, Reply>> {
    let route = &handle.info().route;
    let hook = route.cfg.hooks.onconnect.as_ref()?;
    let key = route.cfg.key;
    let required = hook.required;
    let body = context(handle, node_id, None);
    let fut =
        request(bus.clone(), hook.publish.clone(), body, timeout).map(move |result| match result {
            Ok(msg) => match parse_answer(&msg.payload) {
                Answer::Payload(p) => Reply {
                    frame: Some(hook_frame(key, "onconnect", None, &p)),
                    refuse: false,
                },
                Answer::Error(e) => Reply {
                    frame: Some(hook_frame(key, "error", None, &e)),
                    refuse: true,
                },
            },
            Err(e) if required => Reply {
                frame: Some(frame::error(
                    key,
                    None,
                    bus_code(&e),
                    "connect hook did not answer",
                )),
                refuse: true,
            },
            Err(_) => Reply {
                frame: None,
                refuse: false,
            },
        });
    Some(fut.boxed())
}

/// Publishes the close event (fire and forget).
pub(crate) async fn onclose(
    handle: &ConnHandle,
    node_id: &str,
    bus: &SharedBus,
    code: u16,
    reason: &str,
) {
    let Some(hook) = handle.info().route.cfg.hooks.onclose.as_ref() else {
        return;
    };
    let mut body = context(handle, node_id, None);
    if let Value::Object(m) = &mut body {
        m.insert("code".into(), json!(code));
        m.insert("reason".into(), json!(reason));
    }
    let msg = Outgoing::new(hook.publish.clone(), body.to_string());
    if let Err(error) = bus.publish(msg).await {
        tracing::debug!(conn = %handle.id(), %error, "close event not published");
    }
}

/// The connection context every bus message about a connection carries (PROTOCOL.md §3).
pub(crate) fn context(handle: &ConnHandle, node_id: &str, event: Option<Value>) -> Value {
    let info = handle.info();
    let params: Map<String, Value> = info
        .params
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let claims = Value::Object(info.claims.clone());
    json!({
        "conn_id": info.id.to_string(),
        "node_id": node_id,
        "namespace": info.namespace,
        "username": info.user,
        "route": info.route.cfg.path,
        "remote_addr": info.remote.to_string(),
        "params": params,
        "claims": claims,
        "context": { "headers": { "jwt": claims }, "params": params },
        "event": event.unwrap_or(Value::Null),
    })
}

async fn request(
    bus: SharedBus,
    subject: String,
    body: Value,
    timeout: Duration,
) -> Result<bus::Message, BusError> {
    bus.request(Outgoing::new(subject, body.to_string()), timeout)
        .await
}

enum Answer {
    Payload(String),
    Error(String),
}

/// A backend answers `{"payload":…}` or `{"error":…}`; anything else is the payload.
fn parse_answer(body: &[u8]) -> Answer {
    if let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(body) {
        if let Some(e) = m.remove("error") {
            return Answer::Error(e.to_string());
        }
        if let Some(p) = m.remove("payload") {
            return Answer::Payload(p.to_string());
        }
        return Answer::Payload(Value::Object(m).to_string());
    }
    Answer::Payload(frame::json_or_string(body))
}

fn event_reply(
    key: Key,
    reply_type: &str,
    id: Option<&Value>,
    result: Result<bus::Message, BusError>,
) -> Reply {
    let frame = match result {
        Ok(msg) => {
            let reply_type = serde_json::from_slice::<Value>(&msg.payload)
                .ok()
                .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| reply_type.to_owned());
            match parse_answer(&msg.payload) {
                Answer::Payload(p) => hook_frame(key, &reply_type, id, &p),
                Answer::Error(e) => hook_frame(key, "error", id, &e),
            }
        }
        Err(e) => {
            let message = match &e {
                BusError::NoResponders { .. } => {
                    "no backend is listening for this event".to_owned()
                }
                BusError::Timeout { timeout, .. } => format!("no reply within {timeout:?}"),
                other => other.to_string(),
            };
            frame::error(key, id, bus_code(&e), &message)
        }
    };
    Reply {
        frame: Some(frame),
        refuse: false,
    }
}

fn hook_frame(key: Key, verb: &str, id: Option<&Value>, payload: &str) -> String {
    FrameBuilder::new(key, verb)
        .id(id)
        .raw("payload", payload)
        .finish()
}

fn bus_code(e: &BusError) -> ErrorCode {
    match e {
        BusError::NoResponders { .. } => ErrorCode::NoResponders,
        BusError::Timeout { .. } => ErrorCode::Timeout,
        _ => ErrorCode::Unavailable,
    }
}
