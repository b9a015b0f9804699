//! What a session's actions do over the bus (docs/PROTOCOL.md §4, §5, §10): topic
//! subscriptions and client publications, requests to backends (the connect hook, client
//! events, monument data-style events) and their replies, monument passthrough, resource
//! verbs, and the check of a refreshed token. The session ([`edge_core::session`]) decides
//! every answer; this module only carries out the I/O and reports the outcome back.

use std::sync::Arc;

use bus::{Outgoing, SharedBus};
use edge_core::session::{Action, Body, To};
use futures::FutureExt;
use proto::subject;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::Instrument;

use crate::conn::{Conn, ConnHandle, unix_ms};
use crate::resources;

/// Carries out one action of the session (those that need more than the socket).
pub(crate) async fn perform<S>(conn: &mut Conn<S>, action: Action)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    match action {
        Action::Subscribe { filter, id } => {
            let shared = Arc::clone(&conn.shared);
            let result = shared
                .registry
                .subscribe(&shared, &conn.handle, &filter)
                .await;
            if let Err(error) = &result {
                tracing::warn!(conn = %conn.handle.id(), %error, "subscribe failed");
            }
            conn.session.subscribed(filter, id.as_ref(), result.is_ok());
        }
        Action::Unsubscribe { filter } => {
            let shared = &conn.shared;
            shared.registry.unsubscribe(shared, &conn.handle, &filter);
        }
        Action::Publish {
            topic,
            payload,
            echo,
            id,
        } => {
            let info = conn.handle.info();
            let mut msg = Outgoing::new(subject::topic(&info.namespace, topic.split('/')), payload)
                .with_header(subject::HEADER_ORIGIN, info.id.to_string());
            if echo {
                msg = msg.with_header(subject::HEADER_ECHO, "1");
            }
            let result = conn.shared.bus.publish(msg).await;
            if let Err(error) = &result {
                tracing::warn!(conn = %info.id, %error, "publish failed");
            }
            conn.session.published(&topic, id.as_ref(), result.is_ok());
        }
        Action::Request { request, to, body } => {
            let subject = match to {
                To::Subject(s) => s,
                To::OwnEvent(event) => subject::event(&conn.handle.info().namespace, &event),
            };
            // A client event gets a span, its context carried to the backend in the headers.
            let span = match &body {
                Body::Event(frame) => {
                    let key = conn.handle.info().route.key;
                    let event = frame.get(key.as_str()).and_then(Value::as_str);
                    let event = event.unwrap_or_default();
                    Some(tracing::info_span!("edge.event", event = %event, subject = %subject))
                }
                _ => None,
            };
            let mut msg = event_message(&conn.handle, subject, backend_body(conn, body));
            let bus = Arc::clone(&conn.shared.bus);
            let timeout = conn.shared.request_timeout;
            let fut = match span {
                Some(span) => {
                    bus::trace::inject(&span, &mut msg.headers);
                    async move { bus.request(msg, timeout).await }
                        .instrument(span)
                        .boxed()
                }
                None => async move { bus.request(msg, timeout).await }.boxed(),
            };
            conn.inflight.push(fut.map(move |r| (request, r)).boxed());
        }
        Action::Emit { subject, body } => {
            let msg = event_message(&conn.handle, subject, backend_body(conn, body));
            if let Err(error) = conn.shared.bus.publish(msg).await {
                tracing::warn!(conn = %conn.handle.id(), %error, "passthrough event not published");
                conn.session.emit_failed();
            }
        }
        Action::Resource(call) => resources::run(conn, call).await,
        Action::StopWatch(key) => {
            if let Some(watch) = conn.watches.remove(&key) {
                watch.cancel();
            }
        }
        Action::CheckToken { token, id } => {
            let checked = check_token(conn, &token).await;
            let now = Instant::now().into_std();
            conn.session
                .token_checked(id.as_ref(), checked, now, unix_ms());
        }
        Action::Ignored => conn.shared.metrics.events_ignored.inc(),
        Action::Send(_) | Action::Ping | Action::FlushPong | Action::Close(_) => {
            unreachable!("the connection's task carries out socket actions")
        }
    }
}

/// What backends receive: the connection's context, with the client's frame where the
/// action carries one.
fn backend_body<S>(conn: &Conn<S>, body: Body) -> String {
    let node = &conn.shared.node_id;
    match body {
        Body::Context => context(&conn.handle, node, None).to_string(),
        Body::Event(frame) => context(&conn.handle, node, Some(Value::Object(frame))).to_string(),
        Body::Socket(frame) => {
            let socket = context(&conn.handle, node, None);
            json!({ "message": Value::Object(frame), "socket": socket }).to_string()
        }
    }
}

/// A new token for an open connection, checked as the upgrade's was (signature, `exp`, same
/// user, the connection's namespace still granted, not revoked): its `exp`, or what the
/// client is told. The old token's deadline stays in force after a refusal.
async fn check_token<S>(conn: &mut Conn<S>, token: &str) -> Result<Option<i64>, &'static str>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let route = Arc::clone(conn.route());
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
            conn.refreshed(&claims);
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
            Ok(crate::auth::expiry(&claims))
        }
        Err(e) => {
            tracing::debug!(conn = %conn.handle.id(), error = %e, "refresh refused");
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
