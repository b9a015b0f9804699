//! What a session's actions send to backends (docs/PROTOCOL.md §4, §5, §10): client
//! publications, requests (the connect hook, client events, monument data-style events),
//! monument passthrough, the close event, and the check of a refreshed token. The session
//! ([`edge_core::session`]) decides every answer; these functions carry out the I/O and
//! return the outcome for the driver ([`crate::conn`]) to report back.

use std::sync::Arc;

use bus::{BusError, Message, Outgoing, SharedBus};
use edge_core::history::{Entry, HistoryCall, Page, Position};
use edge_core::session::{Body, Published, To};
use futures::FutureExt;
use futures::future::BoxFuture;
use proto::subject;
use serde_json::{Map, Value, json};
use tracing::Instrument;

use crate::env::Env;
use crate::handle::{CloseRequest, ConnHandle, TOKEN_REVOKED, TokenIds};
use crate::revoke::Revocations;

/// Publishes a client's topic message: into history when its topic keeps any (the
/// answer is its position), else on the bus. `None` when it was not taken.
pub(crate) async fn publish(
    env: &Env,
    handle: &ConnHandle,
    topic: &str,
    payload: String,
    echo: bool,
) -> Option<Published> {
    let info = handle.info();
    let mut headers = bus::Headers::default();
    headers.insert(subject::HEADER_ORIGIN, info.id.to_string());
    if echo {
        headers.insert(subject::HEADER_ECHO, "1");
    }
    let history = env.registry.history();
    if let Some((h, rule)) = history.and_then(|h| Some((h, h.rule_for(topic)?))) {
        return match h
            .store
            .append(rule, &info.namespace, topic, headers, payload.into())
            .await
        {
            Ok(a) => Some(Published {
                position: Some(Position {
                    offset: a.offset,
                    epoch: a.epoch,
                }),
            }),
            Err(error) => {
                tracing::warn!(conn = %info.id, %error, "history publish failed");
                None
            }
        };
    }
    let msg = Outgoing {
        subject: subject::topic(&info.namespace, topic.split('/')),
        reply: None,
        headers,
        payload: payload.into(),
    };
    match env.bus.publish(msg).await {
        Ok(()) => Some(Published { position: None }),
        Err(error) => {
            tracing::warn!(conn = %info.id, %error, "publish failed");
            None
        }
    }
}

/// A `history` verb's read: the page, or `None` when storage failed (the session's topic
/// has a rule: it checked).
pub(crate) async fn history(env: &Env, handle: &ConnHandle, call: &HistoryCall) -> Option<Page> {
    let h = env.registry.history()?;
    let rule = h.rule_for(&call.topic)?;
    let read = h
        .store
        .read(rule, &handle.info().namespace, &call.topic, call.after())
        .await;
    let limit = usize::try_from(call.limit).unwrap_or(usize::MAX);
    let since_epoch = call.since.as_ref().map(|p| p.epoch.as_str());
    // Binary publications as live: left out where the route takes no binary payloads, in
    // base64 where it does.
    let takes_binary = handle.info().route.cfg.binary;
    match read.map(|r| r.page(since_epoch, limit)) {
        Ok((read, more)) => Some(Page {
            epoch: read.epoch,
            last: read.last,
            complete: read.complete,
            more,
            messages: read
                .messages
                .into_iter()
                .filter_map(|m| {
                    let binary = m.headers.get(subject::HEADER_BINARY).is_some();
                    let payload = match binary {
                        false => proto::frame::json_or_string(&m.payload),
                        true if takes_binary => {
                            use base64::Engine as _;
                            let bytes =
                                base64::engine::general_purpose::STANDARD.encode(&m.payload);
                            Value::String(bytes).to_string()
                        }
                        true => return None,
                    };
                    Some(Entry {
                        offset: m.offset,
                        payload,
                        binary,
                    })
                })
                .collect(),
        }),
        Err(error) => {
            tracing::warn!(conn = %handle.id(), %error, "history read failed");
            None
        }
    }
}

/// A request to backends that owns what it needs, so it can run beside the connection's
/// task; a client event gets a span, its context carried to the backend in the headers.
pub(crate) fn request(
    env: &Env,
    handle: &ConnHandle,
    to: To,
    body: Body,
) -> BoxFuture<'static, Result<Message, BusError>> {
    let subject = match to {
        To::Subject(s) => s,
        To::OwnEvent(event) => subject::event(&handle.info().namespace, &event),
    };
    let span = match &body {
        Body::Event(frame) => {
            let key = handle.route().key;
            let event = frame.get(key.as_str()).and_then(Value::as_str);
            let event = event.unwrap_or_default();
            Some(tracing::info_span!("edge.event", event = %event, subject = %subject))
        }
        _ => None,
    };
    let node_id = env.registry.node_id();
    let mut msg = event_message(handle, subject, backend_body(handle, node_id, body));
    if let Some(span) = &span {
        bus::trace::inject(span, &mut msg.headers);
    }
    let bus = Arc::clone(&env.bus);
    let timeout = env.request_timeout;
    async move { bus.request(msg, timeout).await }
        .instrument(span.unwrap_or_else(tracing::Span::none))
        .boxed()
}

/// A client's binary frame (routes with `binary: true`): published as it is on the route's
/// binary event subject, with the connection in the headers and `Sb-Binary: 1`; backends
/// answer, if they like, with a send to `Sb-Conn-Id`. Whether the bus took it.
pub(crate) async fn binary_event(env: &Env, handle: &ConnHandle, bytes: bytes::Bytes) -> bool {
    let info = handle.info();
    let subject = subject::event(&info.namespace, &info.route.cfg.binary_event);
    let mut msg = event_message(handle, subject, String::new());
    msg.payload = bytes;
    let msg = msg.with_header(subject::HEADER_BINARY, "1");
    match env.bus.publish(msg).await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(conn = %handle.id(), %error, "binary event not published");
            false
        }
    }
}

/// A message to backends that nobody answers (monument passthrough); whether the bus took it.
pub(crate) async fn emit(env: &Env, handle: &ConnHandle, subject: String, body: Body) -> bool {
    let node_id = env.registry.node_id();
    let msg = event_message(handle, subject, backend_body(handle, node_id, body));
    match env.bus.publish(msg).await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(conn = %handle.id(), %error, "passthrough event not published");
            false
        }
    }
}

/// What backends receive: the connection's context, with the client's frame where the
/// action carries one.
fn backend_body(handle: &ConnHandle, node_id: &str, body: Body) -> String {
    match body {
        Body::Context => context(handle, node_id, None).to_string(),
        Body::Event(frame) => context(handle, node_id, Some(Value::Object(frame))).to_string(),
        Body::Socket(frame) => {
            let socket = context(handle, node_id, None);
            json!({ "message": Value::Object(frame), "socket": socket }).to_string()
        }
    }
}

/// A new token for an open connection, checked as the upgrade's was (signature, `exp`, same
/// user, the connection's namespace still granted, not revoked): its `exp`, or what the
/// client is told. On success its claims are the ones revocations match from now on.
pub(crate) async fn check_token(
    handle: &ConnHandle,
    revoked: &Revocations,
    token: &str,
) -> Result<Option<i64>, &'static str> {
    let route = Arc::clone(handle.route());
    let info = handle.info();
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
        if revoked.revokes(&TokenIds::of(&claims), &info.namespace) {
            return Err(crate::auth::AuthError::Revoked);
        }
        Ok(claims)
    });
    match checked {
        Ok(claims) => {
            handle.set_token_ids(TokenIds::of(&claims));
            // A revocation recorded since the check, whose scan saw the old token's ids.
            if revoked.revokes(&handle.token_ids(), &info.namespace) {
                let (code, reason) = TOKEN_REVOKED;
                handle.close(CloseRequest::new(code, reason));
            }
            Ok(crate::auth::expiry(&claims))
        }
        Err(e) => {
            tracing::debug!(conn = %handle.id(), error = %e, "refresh refused");
            Err(refusal_message(&e))
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

/// A bus message about a connection: its context in headers too, so backends can route on
/// them without parsing the body.
fn event_message(handle: &ConnHandle, subject: String, body: String) -> Outgoing {
    let info = handle.info();
    Outgoing::new(subject, body)
        .with_header(subject::HEADER_CONN_ID, info.id.to_string())
        .with_header(subject::HEADER_NAMESPACE, info.namespace.clone())
        .with_header(subject::HEADER_USER, info.user.clone())
}

/// The connection context every bus message about a connection carries (docs/PROTOCOL.md §10).
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
