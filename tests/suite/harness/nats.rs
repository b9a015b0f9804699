//! NATS as backends and operators use it: a client of its own that subscribes, publishes,
//! requests and replies, and what the server's monitoring (`/connz`) says.

use std::collections::BTreeMap;

use bus::{Bus as _, NatsBus, Outgoing, Subscription};
use futures::StreamExt as _;
use serde_json::Value;

use super::poll::{STEP, bounded};

/// A backend on the bus: subscribes to hook and event subjects, replies, publishes.
/// Cloning gives another handle to the same NATS connection.
#[derive(Debug, Clone)]
pub struct Backend {
    pub bus: NatsBus,
}

impl Backend {
    /// Subscribes to `subject` and waits until the server has registered the subscription.
    pub async fn subscribe(&self, subject: &str) -> Subscription {
        let sub = bounded(
            &format!("subscribe to {subject}"),
            self.bus.subscribe(subject.to_owned(), None),
        )
        .await
        .unwrap_or_else(|e| panic!("subscribe to {subject}: {e}"));
        self.sync().await;
        sub
    }

    /// Subscribes to every subject (`>`) and waits until the subscription hears a probe this
    /// client publishes. Use a backend of its own for it: a connection with a `>`
    /// subscription cannot [`sync`](Self::sync) any more.
    pub async fn subscribe_everything(&self) -> Subscription {
        let mut sub = bounded("subscribe to >", self.bus.subscribe(">".to_owned(), None))
            .await
            .unwrap_or_else(|e| panic!("subscribe to >: {e}"));
        let probe = format!("probe.{}", ulid::Ulid::new());
        self.publish(&probe, &Value::Null).await;
        subjects_until(&mut sub, &probe).await;
        sub
    }

    /// Returns once the server has processed everything this client sent before (its own
    /// message comes back only after that).
    pub async fn sync(&self) {
        // Our own message to an inbox only we hear: it depends on nobody else (a request
        // answered by "no responders" would wait whenever a tap hears the inbox).
        let inbox = self.bus.new_inbox();
        let mut echo = bounded("sync subscribe", self.bus.subscribe(inbox.clone(), None))
            .await
            .expect("sync subscribes to its inbox");
        bounded(
            "sync publish",
            self.bus.publish(Outgoing::new(inbox, Vec::new())),
        )
        .await
        .expect("sync publishes to its inbox");
        bounded("sync round trip with the NATS server", echo.next())
            .await
            .expect("the echo comes back");
    }

    /// Publishes `body` (JSON) on `subject`.
    pub async fn publish(&self, subject: &str, body: &Value) {
        bounded(
            &format!("publish on {subject}"),
            self.bus
                .publish(Outgoing::new(subject.to_owned(), body.to_string())),
        )
        .await
        .unwrap_or_else(|e| panic!("publish on {subject}: {e}"));
    }

    /// A request with a JSON body; the reply as JSON.
    pub async fn request(&self, subject: &str, body: &Value) -> Value {
        let msg = Outgoing::new(subject.to_owned(), body.to_string());
        let reply = self
            .bus
            .request(msg, STEP)
            .await
            .unwrap_or_else(|e| panic!("request on {subject}: {e}"));
        serde_json::from_slice(&reply.payload).unwrap_or_else(|e| {
            panic!(
                "reply on {subject} is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&reply.payload)
            )
        })
    }

    /// Answers the request `to` with `body` (JSON).
    pub async fn reply(&self, to: &bus::Message, body: &Value) {
        let reply = to
            .reply
            .clone()
            .unwrap_or_else(|| panic!("the message on {} is not a request", to.subject));
        bounded(
            "reply",
            self.bus.publish(Outgoing::new(reply, body.to_string())),
        )
        .await
        .unwrap_or_else(|e| panic!("reply to {}: {e}", to.subject));
    }

    /// A JetStream context on this backend's connection (for key-value buckets).
    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.bus.client().clone())
    }
}

/// The next message of `sub` (within [`STEP`]) and its body as JSON.
pub async fn next_json(sub: &mut Subscription) -> (bus::Message, Value) {
    let msg = bounded("a message for the backend", sub.next())
        .await
        .expect("subscription ended");
    let body = serde_json::from_slice(&msg.payload).unwrap_or_else(|e| {
        panic!(
            "message on {} is not JSON ({e}): {:?}",
            msg.subject,
            String::from_utf8_lossy(&msg.payload)
        )
    });
    (msg, body)
}

/// Reads `sub` until a message on `marker` arrives; returns the subjects seen before it.
pub async fn subjects_until(sub: &mut Subscription, marker: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let read = async {
        while let Some(m) = sub.next().await {
            if m.subject == marker {
                return;
            }
            seen.push(m.subject);
        }
        panic!("subscription ended before the marker");
    };
    bounded("the marker message", read).await;
    seen
}

/// The `/connz` entry of the NATS connection named `name`.
pub fn connection<'a>(connz: &'a Value, name: &str) -> &'a Value {
    connz["connections"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no NATS connection named {name:?} in /connz: {connz}"))
}

/// Subject → messages delivered, for every subscription of a `/connz` connection.
pub fn sub_counts(conn: &Value) -> BTreeMap<String, u64> {
    let subs = conn["subscriptions_list_detail"]
        .as_array()
        .unwrap_or_else(|| panic!("no subscriptions_list_detail in {conn}"));
    let mut out = BTreeMap::new();
    for s in subs {
        let subject = s["subject"].as_str().unwrap().to_owned();
        *out.entry(subject).or_default() += s["msgs"].as_u64().unwrap_or(0);
    }
    out
}
