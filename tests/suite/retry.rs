//! Safe retries: a backend's `message_id` on `Send`, `Broadcast`, `Publish` (gRPC) and on
//! `sb.send` (NATS) reaches each connection at most once within the edges' window, and a
//! retry's report counts a connection that had the message as delivered
//! (docs/PROTOCOL.md §6 and §10). A real `nats-server`, two edges and a coordinator as the
//! real binary, real WebSocket and gRPC clients.
//!
//! That a client got nothing twice is proven with a marker: a fresh Send to its connection
//! must be the very next frame it reads (`expect_only_marker`).

use bus::{Bus as _, Outgoing};
use proto::v1::{BroadcastRequest, PublishRequest, SendRequest};
use serde_json::{Value, json};
use tonic::Code;

use crate::harness::*;

/// Native clients on `/connect`; `/hx` is the same protocol in the hyperexpress dialect,
/// whose frames stay exactly as they were (no `message_id`).
const ROUTES: &str = r#"edge:
  routes:
    - path: /connect
      anonymous: true
      publish: true
      allowed_origins: ["*"]
    - path: /hx
      dialect: hyperexpress
      anonymous: true
      allowed_origins: ["*"]
"#;

async fn cluster() -> Cluster {
    Cluster::launch(Spec::new(2, 1).config_yaml(ROUTES)).await
}

fn send_req(user: &str, n: u64, message_id: &str) -> SendRequest {
    SendRequest {
        namespace: "default".into(),
        user: user.into(),
        r#type: "note".into(),
        payload_json: json!({"n": n}).to_string(),
        message_id: message_id.into(),
        ..SendRequest::default()
    }
}

fn broadcast_req(n: u64, message_id: &str) -> BroadcastRequest {
    BroadcastRequest {
        namespace: "default".into(),
        r#type: "news".into(),
        payload_json: json!({"n": n}).to_string(),
        message_id: message_id.into(),
        ..BroadcastRequest::default()
    }
}

fn publish_req(topic: &str, n: u64, message_id: &str) -> PublishRequest {
    PublishRequest {
        namespace: "default".into(),
        topic: topic.into(),
        payload_json: json!({"n": n}).to_string(),
        message_id: message_id.into(),
        ..PublishRequest::default()
    }
}

async fn publish_request(c: &Cluster, req: PublishRequest) -> proto::v1::DeliveryReport {
    let mut client = messaging(c.grpc(0)).await;
    bounded("Publish", client.publish(req))
        .await
        .unwrap_or_else(|s| panic!("Publish: {s}"))
        .into_inner()
}

/// A native client's frame of a send or broadcast with a message id.
fn typed(ty: &str, n: u64, message_id: &str) -> Value {
    json!({"type": ty, "message_id": message_id, "payload": {"n": n}})
}

#[tokio::test]
async fn a_retried_send_reaches_each_connection_once() {
    let c = cluster().await;
    let mut a1 = c.client(0, "alice", "default").await;
    c.wait_located(0, "default", "alice", 1).await;

    let r = send_request(c.grpc(0), send_req("alice", 1, "m-1")).await;
    assert_eq!((r.delivered, r.refused), (1, 0), "first attempt: {r:?}");
    // The native frame carries the id under its own name ("id" answers client requests).
    let frame = a1.recv().await;
    assert_eq!(frame, typed("note", 1, "m-1"));
    assert!(frame.get("id").is_none(), "{frame}");

    // The retry: a1 has it, so it is not sent again, and counts as delivered.
    let r = send_request(c.grpc(0), send_req("alice", 1, "m-1")).await;
    assert_eq!((r.delivered, r.refused), (1, 0), "retry: {r:?}");
    expect_only_marker(&c, &mut a1, "type").await;
    assert_eq!(c.edge_metric(0, "edge_messages_duplicate_total").await, 1);

    // Another connection of alice's, made between two attempts, gets the retry: at most once
    // per connection. It is on the hyperexpress route, whose frames have no message_id.
    let mut a2 = c
        .connect_as(1, "/hx?user=alice&namespace=default", &[], "alice-hx@e2")
        .await;
    c.wait_located(0, "default", "alice", 2).await;
    let r = send_request(c.grpc(0), send_req("alice", 1, "m-1")).await;
    assert_eq!((r.delivered, r.nodes), (2, 2), "retry after a2 came: {r:?}");
    assert_eq!(
        a2.recv().await,
        json!({"type": "note", "payload": {"n": 1}})
    );
    expect_only_marker(&c, &mut a1, "type").await;
    let r = send_request(c.grpc(0), send_req("alice", 1, "m-1")).await;
    assert_eq!(r.delivered, 2, "both have it: {r:?}");
    expect_only_marker(&c, &mut a1, "type").await;
    expect_only_marker(&c, &mut a2, "type").await;

    // Another id is another message; no id is no deduplication.
    let r = send_request(c.grpc(0), send_req("alice", 2, "m-2")).await;
    assert_eq!(r.delivered, 2, "{r:?}");
    assert_eq!(a1.recv().await, typed("note", 2, "m-2"));
    assert_eq!(
        a2.recv().await,
        json!({"type": "note", "payload": {"n": 2}})
    );
    for _ in 0..2 {
        let r = send_request(c.grpc(0), send_req("alice", 3, "")).await;
        assert_eq!(r.delivered, 2, "{r:?}");
        assert_eq!(
            a1.recv().await,
            json!({"type": "note", "payload": {"n": 3}})
        );
        assert_eq!(
            a2.recv().await,
            json!({"type": "note", "payload": {"n": 3}})
        );
    }

    // The NATS send subject takes the same id under "message_id".
    let backend = c.backend().await;
    let body = json!({"username": "alice", "namespace": "default", "type": "note",
                      "payload": {"n": 4}, "message_id": "m-4"});
    for attempt in 0..2 {
        let reply = backend.request("sb.send", &body).await;
        assert_eq!(reply["delivered"], 2, "sb.send attempt {attempt}: {reply}");
    }
    assert_eq!(a1.recv().await, typed("note", 4, "m-4"));
    assert_eq!(
        a2.recv().await,
        json!({"type": "note", "payload": {"n": 4}})
    );
    expect_only_marker(&c, &mut a1, "type").await;
    expect_only_marker(&c, &mut a2, "type").await;

    // An id that could not travel as a header or a JSON string unescaped is refused.
    let long = "x".repeat(proto::frame::MAX_MESSAGE_ID + 1);
    for bad in ["with space", "quote\"d", "back\\slash", "é", long.as_str()] {
        let mut client = messaging(c.grpc(0)).await;
        let status = bounded("Send", client.send(send_req("alice", 5, bad)))
            .await
            .expect_err("a bad message_id is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status}");
        let status = bounded("Broadcast", client.broadcast(broadcast_req(5, bad)))
            .await
            .expect_err("a bad message_id is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status}");
        let status = bounded("Publish", client.publish(publish_req("news/1", 5, bad)))
            .await
            .expect_err("a bad message_id is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status}");
        let reply = backend
            .request(
                "sb.send",
                &json!({"username": "alice", "type": "note",
                                        "payload": 5, "message_id": bad}),
            )
            .await;
        assert!(reply["error"].is_string(), "sb.send with {bad:?}: {reply}");
    }
    // The longest allowed id is fine.
    let longest = "y".repeat(proto::frame::MAX_MESSAGE_ID);
    let r = send_request(c.grpc(0), send_req("alice", 6, &longest)).await;
    assert_eq!(r.delivered, 2, "{r:?}");
    assert_eq!(a1.recv().await, typed("note", 6, &longest));
    assert_eq!(
        a2.recv().await,
        json!({"type": "note", "payload": {"n": 6}})
    );
    expect_only_marker(&c, &mut a1, "type").await;
    expect_only_marker(&c, &mut a2, "type").await;
}

#[tokio::test]
async fn a_retried_broadcast_reaches_each_connection_once() {
    let c = cluster().await;
    let mut a = c.client(0, "alice", "default").await;
    let mut b = c.client(1, "bob", "default").await;
    c.wait_located(0, "default", "alice", 1).await;
    c.wait_located(0, "default", "bob", 1).await;

    let r = broadcast(c.grpc(0), broadcast_req(1, "b-1")).await;
    assert_eq!((r.delivered, r.refused, r.nodes), (2, 0, 2), "{r:?}");
    assert_eq!(a.recv().await, typed("news", 1, "b-1"));
    assert_eq!(b.recv().await, typed("news", 1, "b-1"));

    // Carol connects between the attempts: the retry reaches her, and only her.
    let mut carol = c.client(0, "carol", "default").await;
    c.wait_located(0, "default", "carol", 1).await;
    let r = broadcast(c.grpc(0), broadcast_req(1, "b-1")).await;
    assert_eq!((r.delivered, r.refused), (3, 0), "{r:?}");
    assert_eq!(carol.recv().await, typed("news", 1, "b-1"));
    for client in [&mut a, &mut b, &mut carol] {
        expect_only_marker(&c, client, "type").await;
    }
    let r = broadcast(c.grpc(0), broadcast_req(2, "b-2")).await;
    assert_eq!(r.delivered, 3, "{r:?}");
    for client in [&mut a, &mut b, &mut carol] {
        assert_eq!(client.recv().await, typed("news", 2, "b-2"));
    }

    // The NATS broadcast subject too.
    let backend = c.backend().await;
    let body = json!({"type": "news", "payload": {"n": 3}, "message_id": "b-3"});
    for attempt in 0..2 {
        let reply = backend.request("sb.broadcast", &body).await;
        assert_eq!(reply["delivered"], 3, "attempt {attempt}: {reply}");
    }
    for client in [&mut a, &mut b, &mut carol] {
        assert_eq!(client.recv().await, typed("news", 3, "b-3"));
        expect_only_marker(&c, client, "type").await;
    }
}

#[tokio::test]
async fn a_retried_publication_reaches_each_subscriber_once() {
    let c = cluster().await;
    let mut w1 = c.client(0, "w1", "default").await;
    w1.send(json!({"type": "subscribe", "topic": "news/+"}))
        .await;
    assert_eq!(
        w1.recv().await,
        json!({"type": "subscribed", "topic": "news/+"})
    );
    settle_topic(&c, 0, "news/probe", 1, &mut [&mut w1]).await;

    let message = |n: u64, id: &str| json!({"type": "message", "topic": "news/1", "message_id": id, "payload": {"n": n}});
    let r = publish_request(&c, publish_req("news/1", 1, "p-1")).await;
    assert_eq!((r.delivered, r.refused), (1, 0), "{r:?}");
    assert_eq!(w1.recv().await, message(1, "p-1"));
    let r = publish_request(&c, publish_req("news/1", 1, "p-1")).await;
    assert_eq!((r.delivered, r.refused), (1, 0), "retry: {r:?}");
    expect_only_marker(&c, &mut w1, "type").await;

    // A subscriber on the other edge that came between the attempts gets the retry.
    let mut w2 = c.client(1, "w2", "default").await;
    w2.send(json!({"type": "subscribe", "topic": "news/#"}))
        .await;
    assert_eq!(
        w2.recv().await,
        json!({"type": "subscribed", "topic": "news/#"})
    );
    settle_topic(&c, 0, "news/probe", 2, &mut [&mut w1, &mut w2]).await;
    let r = publish_request(&c, publish_req("news/1", 1, "p-1")).await;
    assert_eq!((r.delivered, r.nodes), (2, 2), "retry after w2 came: {r:?}");
    assert_eq!(w2.recv().await, message(1, "p-1"));
    expect_only_marker(&c, &mut w1, "type").await;
    expect_only_marker(&c, &mut w2, "type").await;

    // A backend publishing on the topic's subject itself sets the header: the same id is
    // the same message, another id another.
    let backend = c.backend().await;
    for (id, n) in [("p-1", 1), ("p-2", 2), ("p-2", 2)] {
        let mut out = Outgoing::new("sb.topic.default.news.1", json!({"n": n}).to_string());
        out.headers.insert(proto::subject::HEADER_MESSAGE_ID, id);
        bounded("publish", backend.bus.publish(out)).await.unwrap();
    }
    assert_eq!(w1.recv().await, message(2, "p-2"));
    assert_eq!(w2.recv().await, message(2, "p-2"));
    expect_only_marker(&c, &mut w1, "type").await;
    expect_only_marker(&c, &mut w2, "type").await;
    assert_eq!(c.edge_metric(0, "edge_messages_duplicate_total").await, 4);
    assert_eq!(c.edge_metric(1, "edge_messages_duplicate_total").await, 2);
}
