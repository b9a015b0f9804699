//! The client protocol (PROTOCOL.md §1, §3, §4): one engine for every dialect. A route's
//! dialect names the routing field and picks the built-in verbs; everything else is an event
//! forwarded to backends through the route's hooks (or, on monument routes, a data-style
//! request or a passthrough publication).

use std::sync::Arc;
use std::time::Duration;

use bus::{BusError, Outgoing, SharedBus};
use edge_core::Verb;
use edge_core::dialect::{Other, Unreadable};
use futures::FutureExt;
use proto::frame::{self, ClientFrame, ErrorCode, FrameBuilder, FrameError, Key};
use proto::{subject, topic};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use crate::conn::{Conn, ConnError, ConnHandle};
use crate::resources;

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
    let (dialect, key) = (route.cfg.dialect, route.key);
    let frame = match ClientFrame::parse(text, key) {
        Ok(f) => f,
        // monument ignores what it cannot route (counted, no error frame).
        Err(_) if dialect.row().unreadable == Unreadable::Ignore => {
            conn.shared.metrics.events_ignored.inc();
            return Ok(());
        }
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
    let Some(verb) = dialect.verb(&frame.verb) else {
        return match dialect.row().other {
            Other::SubjectEvent => monument_event(conn, frame).await,
            Other::ForwardOrUnknownHandler if route.cfg.hooks.onmessage.is_none() => {
                // MonoRail's error names the resource and params it was sent.
                let msg = format!("unknown handler {:?}", frame.verb);
                let resource = frame
                    .str(dialect.row().resource_field)
                    .unwrap_or_default()
                    .to_owned();
                let f = resources::error(conn, &frame, &resource, ErrorCode::UnknownVerb, &msg);
                conn.push(f).await
            }
            Other::Forward | Other::ForwardOrUnknownHandler => forward_event(conn, frame).await,
        };
    };
    let answer = match verb {
        // The session id is the answer's `id`.
        Verb::Init => {
            let session = frame
                .str("session")
                .filter(|s| !s.is_empty() && s.len() <= 128)
                .map_or_else(|| conn.handle.id().to_string(), str::to_owned);
            Some(
                FrameBuilder::new(key, "session")
                    .str("id", &session)
                    .finish(),
            )
        }
        Verb::Ping => Some(FrameBuilder::new(key, "pong").id(id).finish()),
        Verb::Subscribe => Some(subscribe(conn, &frame).await),
        Verb::Unsubscribe => Some(unsubscribe(conn, &frame)),
        Verb::Publish => Some(publish(conn, &frame).await),
        Verb::Refresh => Some(refresh(conn, &frame).await),
        Verb::Watch | Verb::Stop | Verb::Query | Verb::All | Verb::Get => {
            resources::verb(conn, verb, &frame).await
        }
    };
    match answer {
        Some(a) => conn.push(a).await,
        None => Ok(()),
    }
}

/// `{"type":"refresh","token":…}`: a new token for an open connection, checked as the
/// upgrade's was (signature, `exp`, same user, the connection's namespace still granted,
/// not revoked). Answered `refreshed` with the new `exp`, or an `invalid_token` error; the
/// old token's deadline stays in force after a refusal.
async fn refresh<S>(conn: &mut Conn<S>, f: &ClientFrame) -> String
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let route = Arc::clone(conn.route());
    let key = route.key;
    let id = f.id.as_ref();
    let Some(token) = f.str("token").filter(|t| !t.is_empty()) else {
        return frame::error(
            key,
            id,
            ErrorCode::InvalidFrame,
            "refresh needs a string \"token\"",
        );
    };
    if route.verifier.anonymous() {
        return frame::error(
            key,
            id,
            ErrorCode::NotSupported,
            "this route takes no token",
        );
    }
    let info = conn.handle.info();
    let check = || {
        route
            .verifier
            .refresh(&route.cfg, token, &info.user, &info.namespace)
    };
    let mut checked = check();
    // A rotated key: refetch the URL's key set (rate-limited) and check again.
    if matches!(checked, Err(crate::auth::AuthError::UnknownKey))
        && let Some(fetcher) = &route.verifier.fetcher
    {
        fetcher.refetch_for_unknown_kid().await;
        checked = check();
    }
    let checked = checked.and_then(|claims| {
        let ids = crate::conn::TokenIds::of(&claims);
        if conn.shared.revoked.revokes(&ids, &info.namespace) {
            return Err(crate::auth::AuthError::Revoked);
        }
        Ok(claims)
    });
    match checked {
        Ok(claims) => {
            let exp = crate::auth::expiry(&claims);
            conn.refreshed(&claims, exp);
            // A revocation recorded since the check, whose scan saw the old token's ids.
            let info = conn.handle.info();
            if conn
                .shared
                .revoked
                .revokes(&conn.handle.token_ids(), &info.namespace)
            {
                let (code, reason) = crate::conn::TOKEN_REVOKED;
                conn.handle
                    .close(crate::conn::CloseRequest::new(code, reason));
            }
            FrameBuilder::new(key, "refreshed")
                .id(id)
                .value("exp", &exp.map_or(Value::Null, Value::from))
                .finish()
        }
        Err(e) => {
            tracing::debug!(conn = %conn.handle.id(), error = %e, "refresh refused");
            frame::error(key, id, ErrorCode::InvalidToken, refusal_message(&e))
        }
    }
}

/// What a client is told about a refused refresh: the reason, never the library's details.
fn refusal_message(e: &crate::auth::AuthError) -> &'static str {
    use crate::auth::AuthError as A;
    match e {
        A::OtherUser => "token is for another user",
        A::NamespaceNotGranted(_) => "token does not grant this connection's namespace",
        A::Revoked => "token has been revoked",
        A::UnknownKey => "no key for the token's kid",
        A::MissingUser(_) => "token names no user",
        _ => "token rejected",
    }
}

async fn subscribe<S>(conn: &mut Conn<S>, f: &ClientFrame) -> String
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let key = conn.route().key;
    let id = f.id.as_ref();
    let filter = match topic_field(key, f) {
        Ok(t) => t,
        Err(e) => return e,
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
    let key = conn.route().key;
    let id = f.id.as_ref();
    let filter = match topic_field(key, f) {
        Ok(t) => t,
        Err(e) => return e,
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
    let key = route.key;
    let id = f.id.as_ref();
    if !route.cfg.publish {
        return frame::error(
            key,
            id,
            ErrorCode::Forbidden,
            "clients may not publish on this route",
        );
    }
    let t = match topic_field(key, f) {
        Ok(t) => t,
        Err(e) => return e,
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

/// The `topic` field of a topic verb, or the error frame saying it is missing.
fn topic_field(key: Key, f: &ClientFrame) -> Result<&str, String> {
    f.str("topic").ok_or_else(|| {
        let msg = format!("{} needs a string \"topic\"", f.verb);
        frame::error(key, f.id.as_ref(), ErrorCode::InvalidFrame, &msg)
    })
}

/// Any frame not handled by a built-in verb: a request to backends on the subjects the
/// route's hooks map it to (the type's own subject, and the general one, which hears every
/// event); each reply goes back to this socket only.
async fn forward_event<S>(conn: &mut Conn<S>, f: ClientFrame) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let route = Arc::clone(conn.route());
    let key = route.key;
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
    let typed = hooks.and_then(|h| {
        h.types
            .iter()
            .find(|t| t.event_type == f.verb)
            .map(|t| &t.publish)
    });
    let general = hooks.and_then(|h| h.publish.as_ref());
    let subjects: Vec<(String, bool)> = match (typed, general) {
        (None, None) => vec![(subject::event(&info.namespace, &f.verb), false)],
        (Some(t), None) => vec![(t.clone(), false)],
        (None, Some(g)) => vec![(g.clone(), false)],
        // Both hear it; only the type's own subject reports that nobody listens.
        (Some(t), Some(g)) => vec![(t.clone(), false), (g.clone(), true)],
    };
    let body = context(
        &conn.handle,
        &conn.shared.node_id,
        Some(Value::Object(f.body.clone())),
    )
    .to_string();
    for (subject, quiet) in subjects {
        let reply_type = if typed.is_some() || general.is_some() {
            subject.clone()
        } else {
            f.verb.clone()
        };
        let id = f.id.clone();
        // One span per request, its context carried to the backend in the headers.
        let span = tracing::info_span!("edge.event", event = %f.verb, subject = %subject);
        let mut msg = event_message(&conn.handle, subject, body.clone());
        bus::trace::inject(&span, &mut msg.headers);
        let fut = request(&conn.shared.bus, msg, conn.shared.request_timeout)
            .instrument(span)
            .map(move |result| event_reply(key, &reply_type, id.as_ref(), result, quiet));
        conn.inflight.push(fut.boxed());
    }
    Ok(())
}

/// monument (PROTOCOL.md §4): data-style events (`…:get:…`) are requests whose reply comes
/// back as the matching `…:set:…` event; others are published on the subject the event names
/// with `{message, socket}`, and the backend answers with a `Send` to the connection.
async fn monument_event<S>(conn: &mut Conn<S>, f: ClientFrame) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let route = Arc::clone(conn.route());
    let (key, mode) = (route.key, route.cfg.monument);
    let event = f.verb.clone();
    if !is_client_subject(&event) {
        let msg = "event names a reserved or invalid subject";
        return conn
            .push(frame::error(
                key,
                f.id.as_ref(),
                ErrorCode::InvalidEvent,
                msg,
            ))
            .await;
    }
    let data_style = event.contains(":get:");
    let frame_value = Value::Object(f.body);
    let socket = context(&conn.handle, &conn.shared.node_id, None);
    let body = json!({ "message": frame_value, "socket": socket }).to_string();
    if data_style && mode.data() {
        if conn.inflight.len() >= route.cfg.max_inflight {
            let msg = "too many events awaiting a reply";
            return conn
                .push(frame::error(key, None, ErrorCode::TooManyRequests, msg))
                .await;
        }
        let set = event.replacen(":get:", ":set:", 1);
        let msg = event_message(&conn.handle, event, body);
        let fut = request(&conn.shared.bus, msg, conn.shared.request_timeout)
            .map(move |result| monument_reply(key, &set, result));
        conn.inflight.push(fut.boxed());
        return Ok(());
    }
    if !mode.passthrough() {
        conn.shared.metrics.events_ignored.inc();
        return Ok(());
    }
    let msg = event_message(&conn.handle, event, body);
    if let Err(error) = conn.shared.bus.publish(msg).await {
        tracing::warn!(conn = %conn.handle.id(), %error, "passthrough event not published");
        return conn
            .push(frame::error(
                key,
                None,
                ErrorCode::Unavailable,
                "event not delivered; try again",
            ))
            .await;
    }
    Ok(())
}

/// A subject a client may name: valid for publishing, and outside what Switchboard and NATS
/// reserve for themselves.
fn is_client_subject(s: &str) -> bool {
    bus::is_valid_publish_subject(s)
        && s.len() <= 256
        && !s.starts_with("sb.")
        && !s.starts_with("_INBOX")
        && !s.starts_with('$')
}

fn monument_reply(key: Key, set: &str, result: Result<bus::Message, BusError>) -> Reply {
    let frame = match result {
        Ok(msg) => match serde_json::from_slice::<Value>(&msg.payload) {
            Ok(Value::Object(mut m)) => {
                if let Some(e) = m.remove("error") {
                    FrameBuilder::new(key, "error")
                        .raw("payload", &e.to_string())
                        .finish()
                } else {
                    m.remove(key.as_str());
                    let mut b = FrameBuilder::new(key, set);
                    for (k, v) in &m {
                        b = b.value(k, v);
                    }
                    b.finish()
                }
            }
            _ => FrameBuilder::new(key, set)
                .raw("payload", &frame::json_or_string(&msg.payload))
                .finish(),
        },
        Err(e) => frame::error(key, None, bus_code(&e), &bus_message(&e)),
    };
    Reply {
        frame: Some(frame),
        refuse: false,
    }
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
    let key = route.key;
    let required = hook.required;
    let body = context(handle, node_id, None).to_string();
    let msg = event_message(handle, hook.publish.clone(), body);
    let fut = request(bus, msg, timeout);
    let fut = async move {
        match fut.await {
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
        }
    };
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
    let msg = event_message(handle, hook.publish.clone(), body.to_string());
    if let Err(error) = bus.publish(msg).await {
        tracing::debug!(conn = %handle.id(), %error, "close event not published");
    }
}

/// A request that owns its handle on the bus, so it can outlive the caller's borrow.
fn request(
    bus: &SharedBus,
    msg: Outgoing,
    timeout: Duration,
) -> impl Future<Output = Result<bus::Message, BusError>> + Send + 'static {
    let bus = Arc::clone(bus);
    async move { bus.request(msg, timeout).await }
}

/// A bus message about a connection: its context in headers too, so backends can route on
/// them without parsing the body.
fn event_message(handle: &ConnHandle, subject: String, body: String) -> Outgoing {
    let info = handle.info();
    Outgoing::new(subject, body)
        .with_header(subject::HEADER_CONN_ID, info.id.to_string())
        .with_header(subject::HEADER_NAMESPACE, info.namespace.clone())
        .with_header(subject::HEADER_USER, info.user.clone())
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
    quiet_no_responders: bool,
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
        Err(BusError::NoResponders { .. }) if quiet_no_responders => {
            return Reply {
                frame: None,
                refuse: false,
            };
        }
        Err(e) => frame::error(key, id, bus_code(&e), &bus_message(&e)),
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

pub(crate) fn bus_code(e: &BusError) -> ErrorCode {
    match e {
        BusError::NoResponders { .. } => ErrorCode::NoResponders,
        BusError::Timeout { .. } => ErrorCode::Timeout,
        _ => ErrorCode::Unavailable,
    }
}

fn bus_message(e: &BusError) -> String {
    match e {
        BusError::NoResponders { .. } => "no backend is listening for this event".to_owned(),
        BusError::Timeout { timeout, .. } => format!("no reply within {timeout:?}"),
        other => other.to_string(),
    }
}
