//! HyperExpress (docs/PROTOCOL.md §9): what its websocket
//! routes promise — `Router.ws('/connect', { idle_timeout: 60, max_payload_length: 32 * 1024
//! })`, upgrade interception with a context, MQTT-syntax topics, `ip`/`context`/`buffered`/
//! `topics` of each socket, a backpressure-aware `send`, `close(code, message)` versus
//! `destroy()`, ping/pong — checked against a cluster (a real `nats-server`, one coordinator
//! and two edges run as the `switchboard` binary) configured with
//! `deploy/examples/hyperexpress.yaml` or a variant of it. Backends are NATS and gRPC clients
//! in this test.
//!
//! Every wait is bounded; every process is killed when the test ends, also on failure.

use std::time::Duration;

use crate::harness::*;
use futures::StreamExt as _;
use proto::v1::{DisconnectRequest, ListConnectionsRequest, PublishRequest, SendRequest};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const SECRET: &str = "seed-hyperexpress-hs256-secret";
/// `max_payload_length: 32 * 1024`.
const MAX_PAYLOAD: usize = 32 * 1024;

fn token(user: &str) -> String {
    user_token(user, SECRET)
}

/// Two edges and a coordinator on `deploy/examples/hyperexpress.yaml` as it is.
async fn example_cluster() -> Cluster {
    Cluster::launch(Spec::example("hyperexpress.yaml").jwt_secret(SECRET)).await
}

/// Two edges and a coordinator on the example with `edits`.
async fn variant_cluster(edits: &[(&str, &str)]) -> Cluster {
    let yaml = example_variant("hyperexpress.yaml", edits);
    Cluster::launch(Spec::new(2, 1).config_yaml(yaml).jwt_secret(SECRET)).await
}

/// `user`'s socket on edge `edge` (`/connect`, token in the Authorization header).
async fn client(c: &Cluster, edge: usize, user: &str) -> Client {
    let auth = bearer(&token(user));
    let name = format!("{user}@{}", c.edges[edge].id);
    c.connect_as(edge, "/connect", &[("authorization", &auth)], &name)
        .await
}

/// A string of JSON text exactly `len` bytes long: a `ping` padded with `pad`.
fn ping_of_len(id: &str, len: usize) -> String {
    let empty = json!({"type": "ping", "id": id, "pad": ""}).to_string();
    let pad = "x".repeat(len - empty.len());
    let text = json!({"type": "ping", "id": id, "pad": pad}).to_string();
    assert_eq!(text.len(), len);
    text
}

// ---------------------------------------------------------------------------------------

/// `Router.upgrade('/connect', …, (request, response) => response.upgrade({ session:
/// request.query_parameters['session'] }))`: the backend sees every upgrade request first and
/// admits it with a context (visible as `ws.context`: in `ListConnections` and in the body
/// of every later event) or refuses it. The route's token was consumed by its auth: the
/// backend never sees it.
#[tokio::test]
async fn upgrade_interception_admits_with_a_context_or_refuses() {
    let c = variant_cluster(&[(
        "      # hooks:\n      #   upgrade: { publish: \"app.upgrade\" }",
        "      hooks:\n        upgrade: { publish: \"app.upgrade\" }",
    )])
    .await;
    let backend = c.backend().await;
    let mut upgrades = backend.subscribe("app.upgrade").await;
    let mut chats = backend.subscribe("sb.event.default.chat").await;
    // The upgrade handler, as the document's: the context is a query parameter.
    let (seen_tx, mut seen) = tokio::sync::mpsc::channel::<Value>(16);
    let handler = {
        let backend = backend.clone();
        tokio::spawn(async move {
            while let Some(msg) = upgrades.next().await {
                let request: Value = serde_json::from_slice(&msg.payload).unwrap();
                let answer = if request["query"]["deny"].is_string() {
                    json!({"error": "nope", "status": 401})
                } else {
                    json!({"context": {"session": request["query"]["session"]}})
                };
                backend.reply(&msg, &answer).await;
                let _ = seen_tx.send(request).await;
            }
        })
    };

    // Admitted, with the session from the query (the token beside it is the route's JWT).
    let ann_token = token("ann");
    let path = format!("/connect?token={ann_token}&session=s-ann");
    let mut ann = c.connect_as(0, &path, &[], "ann@e1").await;
    let request = bounded("the upgrade request", seen.recv()).await.unwrap();
    assert_eq!(request["path"], "/connect", "{request}");
    assert_eq!(request["route"], "/connect", "{request}");
    assert_eq!(request["username"], "ann", "{request}");
    assert_eq!(request["query"]["session"], "s-ann", "{request}");
    assert!(!request.to_string().contains(&ann_token), "{request}");
    assert_eq!(
        request["remote_addr"],
        ann.local_addr.to_string(),
        "{request}"
    );
    assert!(
        request["headers"].to_string().contains("websocket"),
        "the backend sees the request's headers: {request}"
    );

    // `ws.context` for operators …
    let conn = c.connection_of(0, &ann).await;
    let context = proto::json::from_struct(conn.context.as_ref().expect("a context"));
    assert_eq!(context.get("session"), Some(&json!("s-ann")), "{context:?}");
    assert_eq!(context.get("sub"), Some(&json!("ann")), "{context:?}");
    // … and in every later event.
    ann.send(json!({"type": "chat", "id": 1, "text": "hi"}))
        .await;
    let (msg, body) = next_json(&mut chats).await;
    assert_eq!(body["claims"]["session"], "s-ann", "{body}");
    assert_eq!(body["event"]["text"], "hi", "{body}");
    backend.reply(&msg, &json!({"payload": "ok"})).await;
    assert_eq!(
        ann.recv().await,
        json!({"type": "chat", "id": 1, "payload": "ok"})
    );

    // Refused by the backend: its status, no socket.
    let path = format!("/connect?token={}&deny=1", token("mallory"));
    let refused = c.try_connect(1, &path, &[]).await.expect_err("refused");
    assert_eq!(refused.status, 401, "{refused:?}");
    let request = bounded("the upgrade request", seen.recv()).await.unwrap();
    assert_eq!(request["username"], "mallory", "{request}");
    // The status and the backend's text, as a plain HTTP client sees them.
    let (status, body) = refused_upgrade(c.ws(1), &path, &[]).await;
    assert_eq!((status, body.trim()), (401, "nope"));
    let request = bounded("the upgrade request", seen.recv()).await.unwrap();
    assert_eq!(request["username"], "mallory", "{request}");
    assert!(
        try_locate(c.grpc(0), "", "mallory")
            .await
            .unwrap()
            .is_empty()
    );
    // A bad token never reaches the upgrade handler: the route's auth comes first.
    let refused = c
        .try_connect(1, "/connect?token=not-a-jwt", &[])
        .await
        .expect_err("refused");
    assert_eq!(refused.status, 401, "{refused:?}");

    // The next request the handler sees is the next client's: nothing else was asked.
    let mut ben = c
        .connect_as(
            1,
            &format!("/connect?token={}", token("ben")),
            &[],
            "ben@e2",
        )
        .await;
    let request = bounded("the upgrade request", seen.recv()).await.unwrap();
    assert_eq!(request["username"], "ben", "{request}");
    ben.roundtrip().await;
    ann.roundtrip().await;
    handler.abort();
}

/// `ws.send(message, is_binary = true)` and the `message` event's `is_binary`, unchanged on
/// the example route (`binary: true`): a client's Buffer reaches the backend as the same
/// bytes (NATS header `Sb-Binary`, the connection in `Sb-Conn-Id`); the backend's answer with
/// `payload_binary` and a binary publication (gRPC, or NATS with the header) reach clients on
/// either edge as binary frames of exactly those bytes; text still works beside them.
#[tokio::test]
async fn binary_messages_both_ways() {
    let c = example_cluster().await;
    let backend = c.backend().await;
    let mut events = backend.subscribe("sb.event.default.binary").await;
    let mut ann = client(&c, 0, "ann").await;
    let mut ben = client(&c, 1, "ben").await;
    ben.send(json!({"type": "subscribe", "topic": "blobs"}))
        .await;
    assert_eq!(
        ben.recv().await,
        json!({"type": "subscribed", "topic": "blobs"})
    );

    let buffer: Vec<u8> = (0..=255u8).rev().chain([0, 0, 0]).collect();
    ann.send_binary(buffer.clone()).await;
    let (msg, _) = bounded("the binary event", async {
        let m = events.next().await.expect("the event");
        (m, ())
    })
    .await;
    assert_eq!(&msg.payload[..], &buffer[..], "the same bytes");
    assert_eq!(msg.headers.get(proto::subject::HEADER_BINARY), Some("1"));
    assert_eq!(msg.headers.get(proto::subject::HEADER_USER), Some("ann"));
    let conn_id = msg
        .headers
        .get(proto::subject::HEADER_CONN_ID)
        .expect("Sb-Conn-Id")
        .to_owned();

    // ws.send(buffer, true): the backend answers that socket with bytes.
    let answer = vec![0xde, 0xad, 0xbe, 0xef, 0];
    let r = send_request(
        c.grpc(0),
        SendRequest {
            conn_id,
            r#type: "unused".into(),
            payload_binary: Some(answer.clone()),
            ..SendRequest::default()
        },
    )
    .await;
    assert_eq!(r.delivered, 1, "{r:?}");
    assert_eq!(ann.recv_binary().await, answer);

    // ws.publish('blobs', buffer, true) from a backend: over gRPC, and over NATS.
    let mut messaging = messaging(c.grpc(0)).await;
    let r = bounded(
        "Publish",
        messaging.publish(PublishRequest {
            namespace: "default".into(),
            topic: "blobs".into(),
            payload_binary: Some(buffer.clone()),
            ..PublishRequest::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.delivered, 1, "{r:?}");
    assert_eq!(ben.recv_binary().await, buffer);
    let mut out = bus::Outgoing::new(proto::subject::topic("default", ["blobs"]), vec![1u8, 2]);
    out.headers.insert(proto::subject::HEADER_BINARY, "1");
    bounded("NATS publish", bus::Bus::publish(&backend.bus, out))
        .await
        .unwrap();
    assert_eq!(ben.recv_binary().await, vec![1u8, 2]);
    // Text beside it.
    ann.roundtrip().await;
    ben.roundtrip().await;
}

/// `max_payload_length: 32 * 1024`: a message of exactly that size is served, a larger one
/// closes the socket with 1009. And ping/pong: the `ping` frame for clients that cannot see
/// control frames, and a WebSocket ping control frame.
#[tokio::test]
async fn max_payload_length_and_ping_pong() {
    let c = example_cluster().await;
    let mut ann = client(&c, 0, "ann").await;
    let mut ben = client(&c, 1, "ben").await;

    ann.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(ann.recv().await, json!({"type": "pong"}));
    ann.send_text(r#"{"type":"ping","id":7}"#).await;
    assert_eq!(ann.recv().await, json!({"type": "pong", "id": 7}));
    ann.send_message(WsMessage::Ping("are you there".into()))
        .await;
    let pong = bounded("the pong", async {
        loop {
            match ann.next_message_within(STEP).await {
                Some(WsMessage::Pong(p)) => return p,
                Some(WsMessage::Ping(_)) => {}
                other => panic!("expected a pong, got {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(&pong[..], b"are you there");

    ann.send_text(&ping_of_len("at-limit", MAX_PAYLOAD)).await;
    assert_eq!(ann.recv().await, json!({"type": "pong", "id": "at-limit"}));
    ann.send_text(&ping_of_len("over", MAX_PAYLOAD + 1)).await;
    let (code, _) = ann.close_frame().await;
    assert_eq!(code, 1009);
    // Only that socket.
    ben.roundtrip().await;
}

/// `idle_timeout` (seconds, as HyperExpress writes it): a silent socket is closed with 1000
/// saying so; a socket that talks stays.
#[tokio::test]
async fn idle_timeout_closes_a_silent_socket_with_1000() {
    let c = variant_cluster(&[("idle_timeout: 60 ", "idle_timeout: 1  ")]).await;
    let mut silent = client(&c, 0, "silent").await;
    let mut talker = client(&c, 1, "talker").await;
    let start = Instant::now();
    let talk = async {
        let mut pace = tokio::time::interval(Duration::from_millis(200));
        for _ in 0..8 {
            pace.tick().await;
            talker.roundtrip().await;
        }
    };
    let ((code, reason), ()) = tokio::join!(silent.close_frame(), talk);
    let idle_for = start.elapsed();
    assert_eq!(code, 1000, "{reason}");
    assert!(reason.contains("idle"), "close reason {reason:?}");
    assert!(
        idle_for >= Duration::from_millis(900),
        "closed after {idle_for:?}"
    );
    assert!(start.elapsed() >= Duration::from_millis(1400));
    talker.roundtrip().await;
}

/// `subscribe`/`unsubscribe`/`publish` with MQTT syntax, across edges, and what an operator
/// sees of each socket: `ip`, `context`, `buffered`, `topics` (`is_subscribed`).
#[tokio::test]
async fn mqtt_topics_across_edges_and_the_sockets_properties() {
    let c = example_cluster().await;
    let mut sub = client(&c, 0, "ann").await;
    let mut publisher = client(&c, 1, "ben").await;
    for topic in ["scores/+/eu", "alerts/#"] {
        sub.send(json!({"type": "subscribe", "topic": topic})).await;
        assert_eq!(
            sub.recv().await,
            json!({"type": "subscribed", "topic": topic})
        );
    }

    publisher
        .send(json!({"type": "publish", "topic": "scores/42/eu", "payload": {"home": 1}}))
        .await;
    assert_eq!(
        publisher.recv().await,
        json!({"type": "published", "topic": "scores/42/eu"})
    );
    assert_eq!(
        sub.recv().await,
        json!({"type": "message", "topic": "scores/42/eu", "payload": {"home": 1}})
    );
    // Not matching, then matching `#`: only the second arrives.
    for topic in ["scores/42/us", "alerts/fire/now"] {
        publisher
            .send(json!({"type": "publish", "topic": topic, "payload": topic}))
            .await;
        assert_eq!(
            publisher.recv().await,
            json!({"type": "published", "topic": topic})
        );
    }
    assert_eq!(
        sub.recv().await,
        json!({"type": "message", "topic": "alerts/fire/now", "payload": "alerts/fire/now"})
    );

    // The socket's properties, as placement lists them.
    let ann_conn = eventually("ann's topics in ListConnections", STEP, async || {
        let conn = c.connection_of(0, &sub).await;
        let mut topics = conn.topics.clone();
        topics.sort();
        (topics == ["alerts/#", "scores/+/eu"]).then_some(conn)
    })
    .await;
    assert_eq!(ann_conn.remote_addr, sub.local_addr.to_string(), "ip");
    assert_eq!(ann_conn.node_id, "e1");
    assert_eq!(ann_conn.user, "ann");
    assert_eq!(
        ann_conn.buffered_bytes, 0,
        "nothing is buffered for a reader"
    );
    let context = proto::json::from_struct(ann_conn.context.as_ref().expect("a context"));
    assert_eq!(context.get("sub"), Some(&json!("ann")), "{context:?}");
    let subscribed = list_connections(
        c.grpc(0),
        ListConnectionsRequest {
            topic: "scores/+/eu".into(),
            ..ListConnectionsRequest::default()
        },
    )
    .await;
    let users: Vec<&str> = subscribed.iter().map(|c| c.user.as_str()).collect();
    assert_eq!(users, ["ann"], "is_subscribed('scores/+/eu')");
    let ben_conn = c.connection_of(0, &publisher).await;
    assert!(ben_conn.topics.is_empty(), "{ben_conn:?}");

    // Unsubscribe: gone from the list, and no more messages on it.
    sub.send(json!({"type": "unsubscribe", "topic": "scores/+/eu"}))
        .await;
    assert_eq!(
        sub.recv().await,
        json!({"type": "unsubscribed", "topic": "scores/+/eu"})
    );
    eventually("ann's topics to be only alerts/#", STEP, async || {
        let conn = c.connection_of(0, &sub).await;
        (conn.topics == ["alerts/#"]).then_some(())
    })
    .await;
    for topic in ["scores/42/eu", "alerts/done"] {
        publisher
            .send(json!({"type": "publish", "topic": topic, "payload": 2}))
            .await;
        publisher.recv().await;
    }
    assert_eq!(
        sub.recv().await,
        json!({"type": "message", "topic": "alerts/done", "payload": 2})
    );
    sub.roundtrip().await;
    publisher.roundtrip().await;
}

/// `send()` "returns false if message could not be sent due to built up backpressure":
/// `Messaging.Send` reports it as `refused`. With `outbound: { queue: 4, on_full: drop }`, a
/// client that stops reading fills up and later sends are refused (it stays connected), while
/// a healthy client on another edge gets every message.
#[tokio::test]
async fn send_reports_backpressure_and_a_healthy_client_gets_everything() {
    let c = variant_cluster(&[(
        "      publish: true ",
        "      outbound: { queue: 4, on_full: drop }\n      publish: true ",
    )])
    .await;
    let auth = bearer(&token("slow"));
    let mut slow = Client::connect_small_rcvbuf(
        c.ws(0),
        "/connect",
        &[("authorization", &auth)],
        "slow@e1",
        4096,
    )
    .await;
    let mut healthy = client(&c, 1, "healthy").await;
    c.wait_located(0, "default", "slow", 1).await;
    c.wait_located(0, "default", "healthy", 1).await;

    let reader = tokio::spawn(async move {
        let mut next = 0u64;
        loop {
            let m = healthy.recv().await;
            assert_eq!(m["type"], "feed", "{m}");
            if m["payload"]["end"] == true {
                return (healthy, next);
            }
            assert_eq!(
                m["payload"]["seq"], next,
                "the healthy client lost a message"
            );
            next += 1;
        }
    });

    let pad = "x".repeat(32 * 1024);
    let grpc = c.grpc(0);
    let started = Instant::now();
    let mut seq = 0u64;
    let refused = loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "Send to the stalled client never reported a refusal after {seq} messages"
        );
        let body = json!({"seq": seq, "pad": pad}).to_string();
        let to_slow = send(grpc, "default", "slow", "feed", &body).await;
        let to_healthy = send(grpc, "default", "healthy", "feed", &body).await;
        assert_eq!(
            (to_healthy.delivered, to_healthy.refused),
            (1, 0),
            "Send to the healthy client #{seq}"
        );
        seq += 1;
        assert_eq!(to_slow.delivered + to_slow.refused, 1, "{to_slow:?}");
        if to_slow.refused > 0 {
            break to_slow;
        }
    };
    assert_eq!((refused.delivered, refused.nodes), (0, 1), "{refused:?}");
    // `buffered`: what is waiting for the stalled socket.
    let conn = c.connection_of(0, &slow).await;
    assert!(
        conn.buffered_bytes > 0,
        "ListConnections shows nothing buffered for the stalled client: {conn:?}"
    );
    let end = send(grpc, "default", "healthy", "feed", r#"{"end":true}"#).await;
    assert_eq!(end.delivered, 1);
    let (mut healthy, got) = reader.await.unwrap();
    assert_eq!(got, seq, "the healthy client did not get every message");
    healthy.roundtrip().await;

    // The stalled client reads again: what was queued arrives in order, the refused ones
    // never do, and the socket is still open (on_full: drop does not close it).
    let catch_up = tokio::spawn(async move {
        let mut seqs: Vec<u64> = Vec::new();
        loop {
            let m = slow.recv().await;
            if m["type"] == "caught-up" {
                return (slow, seqs);
            }
            assert_eq!(m["type"], "feed", "{m}");
            seqs.push(m["payload"]["seq"].as_u64().unwrap());
        }
    });
    // Refused while the queue is still full; delivered (once) when it has room again.
    eventually(
        "a Send to the stalled client to be delivered once it reads again",
        STEP,
        async || {
            let r = send(grpc, "default", "slow", "caught-up", "null").await;
            (r.delivered == 1).then_some(())
        },
    )
    .await;
    let (mut slow, seqs) = catch_up.await.unwrap();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "the stalled client got its messages out of order: {seqs:?}"
    );
    assert!(
        (seqs.len() as u64) < seq,
        "the stalled client got all {seq} messages although the last was refused"
    );
    assert!(
        !seqs.contains(&(seq - 1)),
        "the refused message arrived: {seqs:?}"
    );
    slow.roundtrip().await;
}

/// `close(code, message)` versus `destroy()`: `Messaging.Disconnect` gracefully (the client
/// sees the code and message) or hard (TCP dropped, no close frame); the socket is gone.
#[tokio::test]
async fn disconnect_gracefully_or_hard() {
    let c = example_cluster().await;
    let mut graceful = client(&c, 0, "grace").await;
    let hard = client(&c, 1, "hardy").await;
    let mut bystander = client(&c, 1, "bystander").await;
    let conn = c.connection_of(0, &graceful).await;
    c.wait_located(0, "default", "hardy", 1).await;

    let mut messaging = messaging(c.grpc(0)).await;
    let r = bounded(
        "Disconnect",
        messaging.disconnect(DisconnectRequest {
            conn_id: conn.conn_id.clone(),
            code: 4001,
            reason: "bye".into(),
            ..DisconnectRequest::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!((r.delivered, r.nodes), (1, 1), "{r:?}");
    assert_eq!(graceful.close_frame().await, (4001, "bye".to_owned()));

    let r = bounded(
        "Disconnect",
        messaging.disconnect(DisconnectRequest {
            namespace: "default".into(),
            user: "hardy".into(),
            hard: true,
            ..DisconnectRequest::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!((r.delivered, r.nodes), (1, 1), "{r:?}");
    hard.expect_dropped().await;

    // `closed`: placement forgets both.
    eventually(
        "both disconnected sockets to leave placement",
        STEP,
        async || {
            let grace = try_locate(c.grpc(0), "", "grace").await.ok()?;
            let hardy = try_locate(c.grpc(0), "", "hardy").await.ok()?;
            (grace.is_empty() && hardy.is_empty()).then_some(())
        },
    )
    .await;
    let r = send_request(
        c.grpc(0),
        SendRequest {
            conn_id: conn.conn_id,
            r#type: "late".into(),
            payload_json: "1".into(),
            ..SendRequest::default()
        },
    )
    .await;
    assert_eq!(r.delivered, 0, "{r:?}");
    bystander.roundtrip().await;
}

/// Wrong input gets an error frame naming what was wrong, and the socket works on; a bad
/// token gets HTTP 401.
#[tokio::test]
async fn wrong_input_gets_error_frames_and_nothing_else_breaks() {
    // "no_responders" is true only when nobody at all listens: no monitoring tap here.
    let spec = Spec::example("hyperexpress.yaml").without_tap();
    let c = Cluster::launch(spec.jwt_secret(SECRET)).await;
    let mut ann = client(&c, 0, "ann").await;
    let mut ben = client(&c, 1, "ben").await;
    let cases: [(&str, &str); 7] = [
        ("not json", "invalid_json"),
        (r#"{"topic":"a"}"#, "missing_type"),
        (r#"{"type":"subscribe","topic":"a/#/b"}"#, "invalid_topic"),
        (r#"{"type":"subscribe"}"#, "invalid_frame"),
        (
            r#"{"type":"publish","topic":"a/+","payload":1}"#,
            "invalid_topic",
        ),
        (
            r#"{"type":"get","resource":"nodes","params":{"id":"1"}}"#,
            "unknown_resource",
        ),
        (r#"{"type":"nobody-listens"}"#, "no_responders"),
    ];
    for (text, code) in cases {
        ann.send_text(text).await;
        let v = ann.recv().await;
        assert_eq!(v["type"], "error", "{text}: {v}");
        assert_eq!(v["code"], code, "{text}: {v}");
        assert!(v["message"].is_string(), "{text}: {v}");
        ann.roundtrip().await;
    }
    for (name, headers) in [
        ("no token", vec![]),
        (
            "not a JWT",
            vec![("authorization", "Bearer abcd".to_owned())],
        ),
        (
            "another secret",
            vec![(
                "authorization",
                format!(
                    "Bearer {}",
                    hs256(&json!({"sub": "eve", "exp": unix_now() + 600}), "other")
                ),
            )],
        ),
        (
            "expired",
            vec![(
                "authorization",
                format!(
                    "Bearer {}",
                    hs256(&json!({"sub": "eve", "exp": unix_now() - 600}), SECRET)
                ),
            )],
        ),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let refused = c
            .try_connect(1, "/connect", &headers)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: a socket was opened"));
        assert_eq!(refused.status, 401, "{name}: {refused:?}");
    }
    ben.roundtrip().await;
    ann.roundtrip().await;
}
