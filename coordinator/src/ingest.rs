//! Backends that only speak NATS: the send and broadcast subjects (the bodhi `send.subscribe`
//! and `broadcast.subscribe` topics), consumed by the coordinators as one queue group so each
//! message is handled once. A message with a reply subject gets `{"delivered","refused",
//! "nodes","unconfirmed"}` or `{"error"}` back.

use bus::{Message, Outgoing, Subscription};
use futures::StreamExt;
use proto::subject;
use proto::v1::messaging_server::Messaging;
use proto::v1::{BroadcastRequest, DeliveryReport, SendRequest};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use crate::api::MessagingService;
use crate::messaging::Coordinator;

/// Consumes `send_subject` and `broadcast_subject` until `shutdown`.
pub async fn run(
    c: Coordinator,
    send_subject: String,
    broadcast_subject: String,
    shutdown: CancellationToken,
) {
    let bus = c.bus();
    let queue = Some(subject::COORDINATOR_QUEUE.to_owned());
    let subs: Result<(Subscription, Subscription), bus::BusError> = async {
        Ok((
            bus.subscribe(send_subject.clone(), queue.clone()).await?,
            bus.subscribe(broadcast_subject.clone(), queue).await?,
        ))
    }
    .await;
    let (mut sends, mut broadcasts) = match subs {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot subscribe to the send and broadcast subjects");
            return;
        }
    };
    let svc = MessagingService(c.clone());
    loop {
        let (msg, is_send) = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(m) = sends.next() => (m, true),
            Some(m) = broadcasts.next() => (m, false),
        };
        // Each message is handled in its own task: one slow edge must not hold the queue.
        let svc = svc.clone();
        let bus = bus.clone();
        let name = if is_send { "bus.send" } else { "bus.broadcast" };
        let span = tracing::info_span!("ingest", otel.name = name, subject = %msg.subject);
        bus::trace::follow(&span, &msg.headers);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let reply = msg.reply.clone();
                let result = if is_send {
                    send(&svc, &msg).await
                } else {
                    broadcast(&svc, &msg).await
                };
                let body = match result {
                    Ok(r) => {
                        json!({"delivered": r.delivered, "refused": r.refused, "nodes": r.nodes, "unconfirmed": r.unconfirmed})
                    }
                    Err(status) => {
                        tracing::debug!(subject = %msg.subject, message = status.message(), "bus message refused");
                        json!({"error": status.message()})
                    }
                };
                if let Some(reply) = reply
                    && let Err(error) = bus.publish(Outgoing::new(reply, body.to_string())).await
                {
                    tracing::debug!(%error, "delivery report not sent");
                }
            },
            span,
        ));
    }
}

fn parse(msg: &Message) -> Result<serde_json::Map<String, Value>, Status> {
    match serde_json::from_slice::<Value>(&msg.payload) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Status::invalid_argument("body must be a JSON object")),
    }
}

fn text(m: &serde_json::Map<String, Value>, key: &str) -> String {
    m.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// `"compress": false` keeps the message uncompressed for every client.
fn uncompressed(m: &serde_json::Map<String, Value>) -> bool {
    m.get("compress") == Some(&Value::Bool(false))
}

fn payload_json(m: &serde_json::Map<String, Value>) -> String {
    m.get("payload").unwrap_or(&Value::Null).to_string()
}

/// `{username, namespace?, type, payload, message_id?}` (or `conn_id` instead of `username`).
async fn send(svc: &MessagingService, msg: &Message) -> Result<DeliveryReport, Status> {
    let m = parse(msg)?;
    let req = SendRequest {
        namespace: text(&m, "namespace"),
        user: text(&m, "username"),
        conn_id: text(&m, "conn_id"),
        r#type: text(&m, "type"),
        payload: None,
        payload_json: payload_json(&m),
        message_id: text(&m, "message_id"),
        payload_binary: None,
        uncompressed: uncompressed(&m),
    };
    Ok(svc.send(Request::new(req)).await?.into_inner())
}

/// `{type, payload, namespace?, skip?, message_id?}`; `skip` is a conn id, a user, or a list of them.
async fn broadcast(svc: &MessagingService, msg: &Message) -> Result<DeliveryReport, Status> {
    let m = parse(msg)?;
    let skip: Vec<String> = match m.get("skip") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    let req = BroadcastRequest {
        namespace: text(&m, "namespace"),
        r#type: text(&m, "type"),
        payload: None,
        payload_json: payload_json(&m),
        skip_conn_ids: skip.clone(),
        skip_users: skip,
        message_id: text(&m, "message_id"),
        payload_binary: None,
        uncompressed: uncompressed(&m),
    };
    Ok(svc.broadcast(Request::new(req)).await?.into_inner())
}
