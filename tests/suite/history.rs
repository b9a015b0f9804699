//! Topic history and recovery (docs/PROTOCOL.md §4.5, §4.6): positions on publications,
//! `subscribe` with `since`, the `history` verb and `Messaging.History`, resume tokens, live
//! gaps repaired from storage, epochs. In one process over the in-process history, and in a
//! cluster over JetStream (with the harness's tap on `>`).

use std::time::Duration;

use proto::v1::{HistoryRequest, PublishRequest};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::harness::*;

/// A route where clients publish, keeping 5 publications of each `chat/…` topic for a
/// minute (readable with `history`) and 3 of each `news/…` topic (not readable).
fn history_route() -> edge::config::RouteConfig {
    let mut r = dev_route("/connect");
    r.publish = true;
    r.history = vec![
        edge::config::HistoryRule {
            topics: "chat/#".into(),
            size: 5,
            ttl: Duration::from_secs(60),
            read: true,
        },
        edge::config::HistoryRule {
            topics: "news/#".into(),
            size: 3,
            ttl: Duration::from_secs(60),
            read: false,
        },
    ];
    r
}

/// Publishes `n` numbered messages `{"n": …}` on `topic` as client `p`; returns their
/// offsets (each `published` answer's).
async fn publish_numbered(p: &mut Client, topic: &str, from: u64, n: u64) -> Vec<u64> {
    let mut offsets = Vec::new();
    for i in from..from + n {
        p.send(json!({"type": "publish", "topic": topic, "payload": {"n": i}, "id": i}))
            .await;
        let a = p.recv_type("published").await;
        assert_eq!(a["id"], i, "{a}");
        offsets.push(
            a["offset"]
                .as_u64()
                .unwrap_or_else(|| panic!("no offset in {a}")),
        );
    }
    offsets
}

/// The next `n` frames of `c`, each a `message` on `topic`: their numbers and offsets.
async fn numbered(c: &mut Client, topic: &str, n: usize) -> Vec<(u64, u64)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let m = c.recv_type("message").await;
        assert_eq!(m["topic"], topic, "{m}");
        got.push((
            m["payload"]["n"].as_u64().unwrap(),
            m["offset"]
                .as_u64()
                .unwrap_or_else(|| panic!("no offset in {m}")),
        ));
    }
    got
}

fn since(offset: u64, epoch: &Value) -> Value {
    json!({"offset": offset, "epoch": epoch})
}

#[tokio::test]
async fn a_client_recovers_what_it_missed_exactly_once_and_in_order() {
    let node = TestNode::start(config_with(vec![history_route()])).await;
    let mut p = node.connect("/connect?user=pub").await;
    let mut a = node.connect("/connect?user=alice").await;
    a.send(json!({"type": "subscribe", "topic": "chat/a", "id": 1}))
        .await;
    let s = a.recv_type("subscribed").await;
    let epoch = s["epoch"].clone();
    assert!(
        epoch.is_string() && s["offset"].is_u64() && s.get("recovered").is_none(),
        "{s}"
    );

    let first = publish_numbered(&mut p, "chat/a", 1, 2).await;
    assert!(first[0] < first[1], "offsets increase: {first:?}");
    assert_eq!(
        numbered(&mut a, "chat/a", 2).await,
        [(1, first[0]), (2, first[1])]
    );
    a.close().await;

    // Three published while away; then back with the last offset seen.
    let missed = publish_numbered(&mut p, "chat/a", 3, 3).await;
    let mut a = node.connect("/connect?user=alice").await;
    a.send(
        json!({"type": "subscribe", "topic": "chat/a", "id": 2, "since": since(first[1], &epoch)}),
    )
    .await;
    let s = a.recv_type("subscribed").await;
    assert_eq!(
        (&s["recovered"], &s["epoch"]),
        (&json!(true), &epoch),
        "{s}"
    );
    assert_eq!(s["offset"], missed[2], "{s}");
    let got = numbered(&mut a, "chat/a", 3).await;
    assert_eq!(got, [(3, missed[0]), (4, missed[1]), (5, missed[2])]);
    let live = publish_numbered(&mut p, "chat/a", 6, 1).await;
    assert_eq!(numbered(&mut a, "chat/a", 1).await, [(6, live[0])]);
    a.roundtrip().await;

    // Further behind than the rule keeps (5, and one more): live only, and told so.
    publish_numbered(&mut p, "chat/a", 7, 7).await;
    let mut b = node.connect("/connect?user=bob").await;
    b.send(json!({"type": "subscribe", "topic": "chat/a", "since": since(live[0], &epoch)}))
        .await;
    let s = b.recv_type("subscribed").await;
    assert_eq!(s["recovered"], false, "{s}");
    let live = publish_numbered(&mut p, "chat/a", 14, 1).await;
    assert_eq!(numbered(&mut b, "chat/a", 1).await, [(14, live[0])]);

    // Another epoch, a wildcard, a topic without history: live only, told so.
    for (topic, pos) in [
        ("chat/a", since(1, &json!("another-epoch"))),
        ("chat/+", since(1, &epoch)),
        ("plain/x", since(1, &epoch)),
    ] {
        let mut c = node.connect("/connect?user=carol").await;
        c.send(json!({"type": "subscribe", "topic": topic, "since": pos}))
            .await;
        let s = c.recv_type("subscribed").await;
        assert_eq!(s["recovered"], false, "{topic}: {s}");
        c.roundtrip().await;
    }
    node.stop().await;
}

/// A binary publication in a `history` page is as it is live: in base64 with `binary: true`
/// on a route that takes binary payloads, left out on one that does not.
#[tokio::test]
async fn history_pages_carry_binary_publications_only_where_the_route_takes_them() {
    let mut bin = history_route();
    bin.path = "/bin".into();
    bin.binary = true;
    let node = TestNode::start(config_with(vec![history_route(), bin])).await;
    publish(node.grpc_addr, "default", "chat/b", r#"{"n":1}"#).await;
    let mut m = node.messaging().await;
    let stored = m
        .publish(PublishRequest {
            namespace: "default".into(),
            topic: "chat/b".into(),
            payload_binary: Some(vec![0, 1, 2, 255]),
            ..PublishRequest::default()
        })
        .await
        .expect("binary Publish")
        .into_inner();
    publish(node.grpc_addr, "default", "chat/b", r#"{"n":3}"#).await;
    let page = async |path: &str| {
        let mut c = node.connect(path).await;
        c.send(json!({"type": "history", "topic": "chat/b", "id": 1}))
            .await;
        c.recv_type("history").await["messages"].clone()
    };
    let on_bin = page("/bin?user=b").await;
    assert_eq!(on_bin[0]["payload"], json!({"n": 1}), "{on_bin}");
    assert_eq!(
        on_bin[1],
        json!({"offset": stored.offset, "payload": "AAEC/w==", "binary": true}),
        "{on_bin}"
    );
    assert_eq!(on_bin[2]["payload"], json!({"n": 3}), "{on_bin}");
    let on_text = page("/connect?user=t").await;
    let payloads: Vec<_> = on_text
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].clone())
        .collect();
    assert_eq!(payloads, [json!({"n": 1}), json!({"n": 3})], "{on_text}");
    // Messaging.History gives backends the bytes.
    let read = m
        .history(HistoryRequest {
            namespace: "default".into(),
            topic: "chat/b".into(),
            ..HistoryRequest::default()
        })
        .await
        .expect("History")
        .into_inner();
    let entry = &read.messages[1];
    assert_eq!(
        (
            entry.offset,
            entry.payload_json.as_str(),
            entry.payload_binary.as_deref()
        ),
        (stored.offset, "", Some(&[0u8, 1, 2, 255][..])),
        "{read:?}"
    );
    assert_eq!(read.messages[0].payload_binary, None);
}

#[tokio::test]
async fn history_reads_page_through_a_topic_and_are_refused_where_the_rule_says() {
    let node = TestNode::start(config_with(vec![history_route()])).await;
    let mut p = node.connect("/connect?user=pub").await;
    let offsets = publish_numbered(&mut p, "chat/h", 1, 4).await;
    p.send(json!({"type": "history", "topic": "chat/h", "limit": 2, "id": "h1"}))
        .await;
    let h = p.recv_type("history").await;
    let ns: Vec<_> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"]["n"].clone())
        .collect();
    assert_eq!(ns, [json!(3), json!(4)], "the last two: {h}");
    assert_eq!(
        (&h["offset"], &h["complete"]),
        (&json!(offsets[3]), &json!(false))
    );
    let epoch = h["epoch"].clone();
    p.send(json!({"type": "history", "topic": "chat/h", "limit": 3, "since": since(offsets[0], &epoch), "id": "h2"}))
        .await;
    let h = p.recv_type("history").await;
    let got: Vec<_> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].clone())
        .collect();
    assert_eq!(
        got,
        [json!(offsets[1]), json!(offsets[2]), json!(offsets[3])],
        "{h}"
    );
    assert_eq!(
        (&h["complete"], &h["more"]),
        (&json!(true), &json!(false)),
        "{h}"
    );

    p.send(json!({"type": "history", "topic": "news/x", "id": "h3"}))
        .await;
    p.recv_error("forbidden").await;
    p.send(json!({"type": "history", "topic": "plain/x", "id": "h4"}))
        .await;
    p.recv_error("not_supported").await;
    p.send(json!({"type": "history", "topic": "chat/h", "limit": 6, "id": "h5"}))
        .await;
    p.recv_error("invalid_frame").await;

    // Backends: Publish answers the position, History reads it.
    let report = publish(node.grpc_addr, "default", "chat/h", r#"{"n":5}"#).await;
    assert!(
        report.offset > offsets[3] && report.epoch == epoch.as_str().unwrap(),
        "{report:?}"
    );
    let mut m = node.messaging().await;
    let page = m
        .history(HistoryRequest {
            namespace: "default".into(),
            topic: "chat/h".into(),
            since_offset: offsets[3],
            since_epoch: report.epoch.clone(),
            limit: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.messages.len(), 1, "{page:?}");
    assert_eq!(
        (page.messages[0].offset, page.complete),
        (report.offset, true)
    );
    assert_eq!(page.messages[0].payload_json, r#"{"n":5}"#);
    let status = m
        .history(HistoryRequest {
            namespace: "default".into(),
            topic: "plain/x".into(),
            ..HistoryRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
    node.stop().await;
}

#[tokio::test]
async fn a_resume_token_brings_the_subscriptions_back_with_what_was_missed() {
    let node = TestNode::start(config_with(vec![history_route()])).await;
    let mut p = node.connect("/connect?user=pub").await;
    let mut a = node.connect("/connect?user=alice").await;
    a.send(json!({"type": "init"})).await;
    assert!(a.recv_type("session").await["resume"].is_string());
    a.send(json!({"type": "subscribe", "topic": "chat/r"}))
        .await;
    let s = a.recv_type("subscribed").await;
    a.send(json!({"type": "subscribe", "topic": "plain/#"}))
        .await;
    let token = a.recv_type("subscribed").await["resume"]
        .as_str()
        .unwrap()
        .to_owned();
    let epoch = s["epoch"].clone();
    let seen = publish_numbered(&mut p, "chat/r", 1, 1).await;
    numbered(&mut a, "chat/r", 1).await;
    a.close().await;
    let missed = publish_numbered(&mut p, "chat/r", 2, 2).await;

    // Another user cannot use it; the same user gets everything back.
    let mut m = node.connect("/connect?user=mallory").await;
    m.send(json!({"type": "init", "resume": token})).await;
    let f = m.recv_type("session").await;
    assert_eq!(f["resumed"], false, "{f}");
    m.roundtrip().await;
    let mut a = node
        .connect(&format!("/connect?user=alice&resume={token}"))
        .await;
    a.send(
        json!({"type": "init", "resume": token, "positions": {"chat/r": since(seen[0], &epoch)}}),
    )
    .await;
    let f = a.recv_type("session").await;
    assert_eq!(f["resumed"], true, "{f}");
    // Each restored subscription's `subscribed` comes before its recovered messages (the
    // frames of several subscriptions may interleave).
    let mut subscribed = Vec::new();
    let mut messages = Vec::new();
    for _ in 0..4 {
        let f = a.recv().await;
        match f["type"].as_str() {
            Some("subscribed") => subscribed.push(f),
            Some("message") => {
                assert!(
                    subscribed.iter().any(|s| s["topic"] == "chat/r"),
                    "a message before its subscribed: {f}"
                );
                messages.push((
                    f["payload"]["n"].as_u64().unwrap(),
                    f["offset"].as_u64().unwrap(),
                ));
            }
            _ => panic!("unexpected {f}"),
        }
    }
    assert_eq!(messages, [(2, missed[0]), (3, missed[1])]);
    let mut restored: Vec<_> = subscribed
        .iter()
        .map(|s| s["topic"].as_str().unwrap())
        .collect();
    restored.sort_unstable();
    assert_eq!(restored, ["chat/r", "plain/#"]);
    let chat = subscribed.iter().find(|s| s["topic"] == "chat/r").unwrap();
    assert_eq!(chat["recovered"], true, "{chat}");
    a.roundtrip().await;
    let conn = node.conn_of(&a).await;
    assert!(
        conn.params.iter().all(|(k, _)| k != "resume"),
        "the resume token stays out of placement: {:?}",
        conn.params
    );
    node.stop().await;
}

/// A cluster config: the anonymous route, with `chat/#` keeping 50 publications a minute.
const CLUSTER_YAML: &str = "edge:\n  routes:\n    - path: /connect\n      anonymous: true\n      publish: true\n      allowed_origins: [\"*\"]\n      history:\n        - topics: \"chat/#\"\n          size: 50\n          ttl: 1m\n          read: true\n";

/// The cluster, once its coordinator knows the rule (it learns it from the streams).
async fn history_cluster(edges: usize) -> Cluster {
    let c = Cluster::launch(Spec::new(edges, 1).config_yaml(CLUSTER_YAML)).await;
    wait_history_rule(c.grpc(0), "acme", "chat/any").await;
    c
}

/// Reads `message` frames of `topic` from `c` into `got` (number, offset) until the number
/// `last` arrived; fails on any other frame.
async fn read_until(c: &mut Client, topic: &str, last: u64, got: &mut Vec<(u64, u64)>) {
    while got.last().map(|(n, _)| *n) != Some(last) {
        let m = c.recv().await;
        assert_eq!(
            (&m["type"], &m["topic"]),
            (&json!("message"), &json!(topic)),
            "{m}"
        );
        got.push((
            m["payload"]["n"].as_u64().unwrap(),
            m["offset"].as_u64().unwrap(),
        ));
    }
}

/// Every number from 1 to `n` exactly once, in order, with increasing offsets.
fn assert_exactly_once_in_order(got: &[(u64, u64)], n: u64) {
    let numbers: Vec<u64> = got.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers,
        (1..=n).collect::<Vec<_>>(),
        "every message once, in order"
    );
    assert!(
        got.windows(2).all(|w| w[0].1 < w[1].1),
        "offsets increase: {got:?}"
    );
}

#[tokio::test]
async fn a_client_resumes_on_another_edge_while_the_backend_keeps_publishing() {
    let c = history_cluster(2).await;
    let grpc = c.grpc(0);
    let mut a = c.client(0, "alice", "acme").await;
    a.send(json!({"type": "init"})).await;
    a.recv_type("session").await;
    a.send(json!({"type": "subscribe", "topic": "chat/live"}))
        .await;
    let s = a.recv_type("subscribed").await;
    let (epoch, token) = (s["epoch"].clone(), s["resume"].as_str().unwrap().to_owned());

    // A backend publishes 200 numbered messages, one after the other, the whole time.
    const N: u64 = 200;
    let publisher = tokio::spawn(async move {
        let mut reports = Vec::new();
        for n in 1..=N {
            reports.push(publish(grpc, "acme", "chat/live", &json!({"n": n}).to_string()).await);
        }
        reports
    });
    let mut got = Vec::new();
    read_until(&mut a, "chat/live", 20, &mut got).await;
    a.close().await;

    let mut b = c.client(1, "alice", "acme").await;
    let last = got.last().unwrap().1;
    b.send(
        json!({"type": "init", "resume": token, "positions": {"chat/live": since(last, &epoch)}}),
    )
    .await;
    assert_eq!(b.recv_type("session").await["resumed"], true);
    let s = b.recv_type("subscribed").await;
    assert_eq!(
        (&s["recovered"], &s["epoch"]),
        (&json!(true), &epoch),
        "{s}"
    );
    read_until(&mut b, "chat/live", N, &mut got).await;
    assert_exactly_once_in_order(&got, N);
    let reports = publisher.await.unwrap();
    let offsets: Vec<u64> = reports.iter().map(|r| r.offset).collect();
    assert!(
        reports.iter().all(|r| r.epoch == epoch.as_str().unwrap()),
        "every Publish names the epoch"
    );
    assert_eq!(
        offsets,
        got.iter().map(|(_, o)| *o).collect::<Vec<_>>(),
        "Publish answers each offset"
    );
    b.roundtrip().await;
}

#[tokio::test]
async fn a_gap_in_an_edges_live_feed_is_filled_from_storage_without_a_reconnect() {
    let mut c = history_cluster(1).await;
    let nats = format!("127.0.0.1:{}", c.nats.port()).parse().unwrap();
    let proxy = TcpProxy::start(nats).await;
    let e = c
        .add_edge("e-proxied", &format!("nats://{}", proxy.addr))
        .await;
    let mut a = c.client(e, "alice", "acme").await;
    a.send(json!({"type": "subscribe", "topic": "chat/gap"}))
        .await;
    a.recv_type("subscribed").await;
    let mut got = Vec::new();
    let grpc = c.grpc(0);
    publish(grpc, "acme", "chat/gap", r#"{"n":1}"#).await;
    read_until(&mut a, "chat/gap", 1, &mut got).await;

    // The edge loses NATS for a moment: what is published meanwhile is stored, not delivered.
    let reconnects = c.edge_metric(e, "edge_bus_reconnects_total").await;
    proxy.cut();
    for n in 2..=4 {
        publish(grpc, "acme", "chat/gap", &json!({"n": n}).to_string()).await;
    }
    proxy.restore();
    eventually("the edge to reconnect to NATS", STEP, async || {
        (c.edge_metric(e, "edge_bus_reconnects_total").await > reconnects).then_some(())
    })
    .await;
    // The next publications reveal the hole; the edge fills it before going on.
    let mut n = 5;
    loop {
        publish(grpc, "acme", "chat/gap", &json!({"n": n}).to_string()).await;
        if let Some(m) = a.next_message_within(Duration::from_millis(500)).await {
            let WsMessage::Text(t) = m else { continue };
            let m: Value = serde_json::from_str(&t).unwrap();
            assert_eq!(
                m["type"], "message",
                "no gap frame, nothing but messages: {m}"
            );
            got.push((
                m["payload"]["n"].as_u64().unwrap(),
                m["offset"].as_u64().unwrap(),
            ));
            break;
        }
        n += 1;
    }
    read_until(&mut a, "chat/gap", n, &mut got).await;
    assert_exactly_once_in_order(&got, n);
    assert!(c.edge_metric(e, "edge_history_gap_filled_total").await >= 3);
    a.roundtrip().await;
}

#[tokio::test]
async fn storage_made_anew_is_a_new_epoch_and_subscribers_are_told() {
    let c = history_cluster(1).await;
    let grpc = c.grpc(0);
    let mut a = c.client(0, "alice", "acme").await;
    a.send(json!({"type": "subscribe", "topic": "chat/epoch"}))
        .await;
    let old = a.recv_type("subscribed").await["epoch"].clone();
    let first = publish(grpc, "acme", "chat/epoch", r#"{"n":1}"#).await;
    a.recv_type("message").await;

    // An operator deletes the stream; the next publication makes it anew.
    let js = c.backend().await.jetstream();
    js.delete_stream(proto::subject::history_stream("chat/#"))
        .await
        .unwrap();
    let mut m = messaging(grpc).await;
    let req = proto::v1::PublishRequest {
        namespace: "acme".into(),
        topic: "chat/epoch".into(),
        payload_json: r#"{"n":2}"#.into(),
        ..Default::default()
    };
    let report = bounded("Publish", m.publish(req))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.coords[0].proc.tail()))
        .into_inner();
    assert_ne!(report.epoch, first.epoch, "a new stream, a new epoch");
    let g = a.recv_type("gap").await;
    assert_eq!(
        (&g["epoch"], &g["offset"]),
        (&json!(report.epoch), &json!(report.offset)),
        "{g}"
    );
    let m = a.recv_type("message").await;
    assert_eq!(
        (&m["payload"]["n"], &m["offset"]),
        (&json!(2), &json!(report.offset))
    );

    // A client holding a position of the old epoch is told it did not recover.
    let mut b = c.client(0, "bob", "acme").await;
    b.send(json!({"type": "subscribe", "topic": "chat/epoch", "since": since(first.offset, &old)}))
        .await;
    let s = b.recv_type("subscribed").await;
    assert_eq!(
        (&s["recovered"], &s["epoch"]),
        (&json!(false), &json!(report.epoch)),
        "{s}"
    );
}

#[tokio::test]
async fn positions_on_a_plain_topic_publication_are_ignored() {
    // A backend publishes on the topic subject with JetStream's headers forged: delivered
    // as a plain message, and the feed is not moved (the next stored one arrives).
    let node = TestNode::start(config_with(vec![history_route()])).await;
    let mut a = node.connect("/connect?user=alice").await;
    a.send(json!({"type": "subscribe", "topic": "chat/f"}))
        .await;
    a.recv_type("subscribed").await;
    let forged = bus::Outgoing::new(
        proto::subject::topic("default", ["chat", "f"]),
        r#"{"n":0}"#,
    )
    .with_header(proto::subject::HEADER_OFFSET, "999999999")
    .with_header(proto::subject::HEADER_PREVIOUS, "0")
    .with_header(proto::subject::HEADER_REPORT_TO, "sb.event.default.x");
    node.bus.publish(forged).await.unwrap();
    let m = a.recv_type("message").await;
    assert!(
        m.get("offset").is_none(),
        "no position on a plain publication: {m}"
    );
    let mut p = node.connect("/connect?user=pub").await;
    let stored = publish_numbered(&mut p, "chat/f", 1, 1).await;
    assert_eq!(numbered(&mut a, "chat/f", 1).await, [(1, stored[0])]);
    node.stop().await;
}

#[tokio::test]
async fn a_recovery_larger_than_the_outbound_queue_says_it_did_not_recover() {
    let mut route = history_route();
    route.outbound.queue = 4;
    let node = TestNode::start(config_with(vec![route])).await;
    let mut p = node.connect("/connect?user=pub").await;
    let mut a = node.connect("/connect?user=alice").await;
    a.send(json!({"type": "subscribe", "topic": "chat/big"}))
        .await;
    let s = a.recv_type("subscribed").await;
    a.close().await;
    publish_numbered(&mut p, "chat/big", 1, 5).await;
    let mut a = node.connect("/connect?user=alice").await;
    let pos = since(s["offset"].as_u64().unwrap(), &s["epoch"]);
    a.send(json!({"type": "subscribe", "topic": "chat/big", "since": pos}))
        .await;
    let s = a.recv_type("subscribed").await;
    assert_eq!(s["recovered"], false, "five missed do not fit in four: {s}");
    let live = publish_numbered(&mut p, "chat/big", 6, 1).await;
    assert_eq!(
        numbered(&mut a, "chat/big", 1).await,
        [(6, live[0])],
        "live only"
    );
    node.stop().await;
}
