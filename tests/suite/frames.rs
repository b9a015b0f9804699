//! Binary frames, permessage-deflate, the MessagePack subprotocol and the echo route
//! (docs/PROTOCOL.md §3.1–§3.4), against an in-process node with real clients: tungstenite
//! for binary and MessagePack, a frame-by-frame client for compression ([`DeflateClient`]).

use bus::Outgoing;
use futures::StreamExt as _;
use proto::v1::{PublishRequest, SendRequest};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::harness::*;

/// What the edge answers an acceptable offer.
const AGREED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A route with compression from `min_size` bytes on.
fn compressed_route(path: &str, min_size: usize) -> edge::config::RouteConfig {
    let mut r = dev_route(path);
    r.compression.enabled = true;
    r.compression.min_size = min_size;
    r.publish = true;
    r
}

/// A JSON payload of about 1 KiB that compresses well.
fn kib_payload() -> Value {
    let items: Vec<Value> = (0..20)
        .map(|i| json!({"id": i, "name": format!("item-{i}"), "status": "active", "tags": ["a", "b"]}))
        .collect();
    json!({ "items": items })
}

async fn publish_req(node: &TestNode, req: PublishRequest) -> proto::v1::DeliveryReport {
    bounded("Publish", node.messaging().await.publish(req))
        .await
        .unwrap()
        .into_inner()
}

async fn deflate_subscribe(c: &mut DeflateClient, topic: &str, compress: bool) {
    let frame = json!({"type": "subscribe", "topic": topic, "id": 1}).to_string();
    c.send_text(&frame, compress).await;
    assert_eq!(
        c.recv().await.json(),
        json!({"type": "subscribed", "topic": topic, "id": 1})
    );
}

/// The extension is agreed on only where the route has it and the offer is acceptable; a
/// publication for N compressed subscribers is compressed once (the same bytes reach each),
/// short ones and those sent with `uncompressed` go as they are, and a plain client on
/// another route gets text.
#[tokio::test]
async fn fan_out_is_compressed_once_for_clients_that_agreed() {
    let node = TestNode::start(config_with(vec![
        compressed_route("/z", 200),
        dev_route("/plain"),
    ]))
    .await;
    let offer = "permessage-deflate; client_max_window_bits";
    let mut a = DeflateClient::connect(node.ws_addr, "/z?user=a", offer).await;
    let mut b = DeflateClient::connect(node.ws_addr, "/z?user=b", offer).await;
    let mut plain = DeflateClient::connect(node.ws_addr, "/plain?user=p", offer).await;
    assert_eq!(a.extensions, AGREED);
    assert_eq!(plain.extensions, "", "the route has no compression");
    let small_window = "permessage-deflate; server_max_window_bits=9";
    let mut small = DeflateClient::connect(node.ws_addr, "/z?user=s", small_window).await;
    assert_eq!(
        small.extensions,
        format!("{AGREED}; server_max_window_bits=9"),
        "a window limit is accepted and repeated"
    );
    let too_small = "permessage-deflate; server_max_window_bits=7";
    let declined = DeflateClient::connect(node.ws_addr, "/z?user=d", too_small).await;
    assert_eq!(
        declined.extensions, "",
        "RFC 7692 allows no window under 2^8"
    );
    let both = "permessage-deflate; server_max_window_bits=7, permessage-deflate";
    let second = DeflateClient::connect(node.ws_addr, "/z?user=e", both).await;
    assert_eq!(second.extensions, AGREED, "the second offer is acceptable");

    deflate_subscribe(&mut a, "news", true).await;
    deflate_subscribe(&mut b, "news", false).await;
    deflate_subscribe(&mut plain, "news", false).await;
    deflate_subscribe(&mut small, "news", true).await;

    let payload = kib_payload();
    let json = payload.to_string();
    assert!(json.len() > 1000, "{}", json.len());
    let report = publish(node.grpc_addr, "default", "news", &json).await;
    assert_eq!(report.delivered, 4, "{report:?}");
    let expected = json!({"type": "message", "topic": "news", "payload": payload});
    let (got_a, got_b) = (a.recv().await, b.recv().await);
    for got in [&got_a, &got_b] {
        assert!(got.compressed, "{got:?}");
        assert_eq!(got.json(), expected);
        assert!(
            got.wire_len * 3 < got.payload.len(),
            "{} of {}",
            got.wire_len,
            got.payload.len()
        );
    }
    assert_eq!(got_a.wire_len, got_b.wire_len);
    let text = plain.recv().await;
    assert!(!text.compressed);
    assert_eq!(text.json(), expected);
    // Its own compressed form, within a 512-byte window: less compact than the others'.
    let within = small.recv().await;
    assert!(within.compressed, "{within:?}");
    assert_eq!(within.json(), expected);
    assert!(
        within.wire_len > got_a.wire_len && within.wire_len < within.payload.len(),
        "{} with a 512-byte window, {} with 32 KiB, of {}",
        within.wire_len,
        got_a.wire_len,
        within.payload.len()
    );

    // Under min_size: as it is.
    publish(node.grpc_addr, "default", "news", r#"{"short":true}"#).await;
    let short = a.recv().await;
    assert!(!short.compressed, "{short:?}");
    assert_eq!(short.json()["payload"], json!({"short": true}));
    b.recv().await;
    plain.recv().await;
    small.recv().await;

    // `uncompressed` (HyperExpress's compress = false): as it is, however large.
    let r = publish_req(
        &node,
        PublishRequest {
            namespace: "default".into(),
            topic: "news".into(),
            payload_json: json.clone(),
            uncompressed: true,
            ..PublishRequest::default()
        },
    )
    .await;
    assert_eq!(r.delivered, 4);
    let big = a.recv().await;
    assert!(!big.compressed);
    assert_eq!(big.json(), expected);

    // A send to one client: compressed for it, from its route's min_size.
    let conn = node.wait_located("default", "b", 1).await.remove(0);
    let mut m = node.messaging().await;
    m.send(SendRequest {
        conn_id: conn.conn_id,
        r#type: "hello".into(),
        payload_json: json.clone(),
        ..SendRequest::default()
    })
    .await
    .unwrap();
    let _ = b.recv().await; // the uncompressed publication before it
    let sent = b.recv().await;
    assert!(sent.compressed);
    assert_eq!(sent.json(), json!({"type": "hello", "payload": payload}));
}

/// Compressed client messages, whole or in fragments with a ping between, are inflated
/// for the session; one that inflates past `max_payload` closes with 1009 (no zip bombs).
#[tokio::test]
async fn client_messages_are_inflated_within_max_payload() {
    let mut route = compressed_route("/z", 100);
    route.max_payload = 64 * 1024;
    let node = TestNode::start(config_with(vec![route])).await;
    let mut c = DeflateClient::connect(node.ws_addr, "/z?user=a", "permessage-deflate").await;
    assert_eq!(c.extensions, AGREED);
    let ping = json!({"type": "ping", "id": "p1", "pad": "ab".repeat(20_000)}).to_string();
    c.send(1, ping.as_bytes(), true, 0).await;
    assert_eq!(c.recv().await.json(), json!({"type": "pong", "id": "p1"}));
    // Fragmented, with a ping between the fragments.
    let data = deflate(
        json!({"type": "ping", "id": "p2", "pad": "xy".repeat(10_000)})
            .to_string()
            .as_bytes(),
    );
    let (head, tail) = data.split_at(data.len() / 2);
    c.write_frame(0x41, head).await;
    c.write_frame(0x89, b"mid").await;
    c.write_frame(0x80, tail).await;
    assert_eq!(c.recv().await.json(), json!({"type": "pong", "id": "p2"}));
    // 10 MiB of zeros in a few KiB.
    let bomb = deflate(&vec![b' '; 10 << 20]);
    assert!(bomb.len() < 64 * 1024);
    c.write_frame(0xc1, &bomb).await;
    assert_eq!(c.close_code().await, 1009);
}

/// An unmasked client frame on a compressed connection (which only a broken client sends)
/// fails that connection and nothing else: it leaves placement, and the node serves on.
#[tokio::test]
async fn an_unmasked_frame_fails_only_its_connection() {
    let node = TestNode::start(config_with(vec![compressed_route("/z", 100)])).await;
    for (user, frame) in [
        ("a", &[0x81, 0x00][..]),
        ("b", &[0x89, 0x00][..]),
        ("c", &[0xc1, 0x03, b'a', b'b', b'c'][..]),
        ("d", &[0x82, 0x7e, 0x00, 0x01, 0xff][..]),
    ] {
        let mut c = DeflateClient::connect(
            node.ws_addr,
            &format!("/z?user={user}"),
            "permessage-deflate",
        )
        .await;
        assert_eq!(c.extensions, AGREED);
        node.wait_located("default", user, 1).await;
        c.write_raw(frame).await;
        // A protocol error: dropped without a close frame (docs/PROTOCOL.md §3.2), or 1002.
        let ended = c.ended().await;
        assert!(
            matches!(ended, None | Some(1002)),
            "{user}: {frame:02x?}: {ended:?}"
        );
        node.wait_located("default", user, 0).await;
    }
    let mut e = DeflateClient::connect(node.ws_addr, "/z?user=e", "permessage-deflate").await;
    e.send_text(&json!({"type": "ping", "id": 1}).to_string(), true)
        .await;
    assert_eq!(e.recv().await.json(), json!({"type": "pong", "id": 1}));
}

/// Past the route's memory budget (a compressed message in progress holds an inflater),
/// new connections are not offered compression, and a connection that begins a compressed
/// message is closed with 1013; once the budget is free, compression is offered again.
#[tokio::test]
async fn past_the_memory_budget_new_connections_are_not_offered_compression() {
    let mut route = compressed_route("/z", 100);
    route.compression.memory_budget = 32 * 1024;
    let node = TestNode::start(config_with(vec![route])).await;
    let offer = "permessage-deflate";
    let mut a = DeflateClient::connect(node.ws_addr, "/z?user=a", offer).await;
    assert_eq!(a.extensions, AGREED);
    let mut early = DeflateClient::connect(node.ws_addr, "/z?user=early", offer).await;
    assert_eq!(early.extensions, AGREED);
    let data = deflate(json!({"type": "ping", "id": 1}).to_string().as_bytes());
    let (head, tail) = data.split_at(data.len() / 2);
    a.write_frame(0x41, head).await;
    eventually("a connection not offered compression", STEP, async || {
        let c = DeflateClient::connect(node.ws_addr, "/z?user=b", offer).await;
        c.extensions.is_empty().then_some(())
    })
    .await;
    // One agreed on earlier that begins a compressed message now is told to come back later
    // (no inflater past the budget); uncompressed, it would have been served.
    early.write_frame(0xc1, &data).await;
    assert_eq!(early.ended().await, Some(1013));
    a.write_frame(0x80, tail).await;
    assert_eq!(a.recv().await.json(), json!({"type": "pong", "id": 1}));
    let c = DeflateClient::connect(node.ws_addr, "/z?user=c", offer).await;
    assert_eq!(c.extensions, AGREED, "the budget is free again");
}

/// `binary: true`: a client's binary frame reaches backends as bytes on the route's binary
/// event; sends and publications with a binary payload reach the client as binary frames;
/// a connection of a text route is not sent them; compressed clients get them compressed.
#[tokio::test]
async fn binary_frames_both_ways_on_binary_routes() {
    let mut bin = compressed_route("/bin", 64);
    bin.binary = true;
    let node = TestNode::start(config_with(vec![bin, dev_route("/text")])).await;
    let mut events = node
        .bus
        .subscribe(proto::subject::event("default", "binary"), None)
        .await
        .unwrap();
    let mut c = node.connect("/bin?user=ann").await;
    let mut text = node.connect("/text?user=tom").await;
    let mut z = DeflateClient::connect(node.ws_addr, "/bin?user=zed", "permessage-deflate").await;
    for client in [&mut c, &mut text] {
        client
            .send(json!({"type": "subscribe", "topic": "raw", "id": 1}))
            .await;
        assert_eq!(client.recv().await["type"], "subscribed");
    }
    deflate_subscribe(&mut z, "raw", false).await;

    let bytes: Vec<u8> = (0..=255u8).chain([0, 0xff, 0xfe]).collect();
    c.send_binary(bytes.clone()).await;
    let event = bounded("the binary event", events.next()).await.unwrap();
    assert_eq!(&event.payload[..], &bytes[..]);
    assert_eq!(event.headers.get(proto::subject::HEADER_BINARY), Some("1"));
    let conn_id = event
        .headers
        .get(proto::subject::HEADER_CONN_ID)
        .unwrap()
        .to_owned();

    // A send back to it, as bytes.
    let reply = vec![0u8, 1, 2, 250, 251];
    let r = bounded(
        "Send",
        node.messaging().await.send(SendRequest {
            conn_id,
            r#type: "ignored-for-binary".into(),
            payload_binary: Some(reply.clone()),
            ..SendRequest::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.delivered, 1, "{r:?}");
    assert_eq!(c.recv_binary().await, reply);

    // A binary publication: to the binary route's clients only.
    let blob: Vec<u8> = b"\x00\x01binary blob ".repeat(40);
    let r = publish_req(
        &node,
        PublishRequest {
            namespace: "default".into(),
            topic: "raw".into(),
            payload_binary: Some(blob.clone()),
            ..PublishRequest::default()
        },
    )
    .await;
    assert_eq!(r.delivered, 2, "{r:?}");
    assert_eq!(c.recv_binary().await, blob);
    let got = z.recv().await;
    assert_eq!((got.opcode, got.compressed), (2, true));
    assert_eq!(got.payload, blob);
    // Straight on the bus with the header, too.
    let mut out = Outgoing::new(proto::subject::topic("default", ["raw"]), vec![7u8, 8, 9]);
    out.headers.insert(proto::subject::HEADER_BINARY, "1");
    node.bus.publish(out).await.unwrap();
    assert_eq!(c.recv_binary().await, vec![7u8, 8, 9]);
    // The text route's client got neither, and still gets text.
    publish(node.grpc_addr, "default", "raw", "\"after\"").await;
    assert_eq!(text.recv().await["payload"], "after");
    assert_eq!(c.recv().await["payload"], "after");
    // A binary frame on the text route still closes with 1003.
    text.send_binary(vec![1, 2, 3]).await;
    assert_eq!(text.expect_close().await.0, 1003);
}

/// `Sec-WebSocket-Protocol: switchboard.v1.msgpack`: the same verbs, MessagePack in binary
/// frames both ways; clients that do not ask get JSON.
#[tokio::test]
async fn the_msgpack_subprotocol_speaks_the_same_verbs() {
    let mut route = dev_route("/connect");
    route.publish = true;
    route.binary = true;
    let node = TestNode::start(config_with(vec![route])).await;
    let proto_header = [("sec-websocket-protocol", "switchboard.v1.msgpack")];
    let mut m = node.ws("/connect?user=mp", &proto_header).await;
    let mut j = node.connect("/connect?user=js").await;
    let pack = |v: Value| rmp_serde::to_vec_named(&v).unwrap();
    let unpack = |b: Vec<u8>| rmp_serde::from_slice::<Value>(&b).unwrap();

    m.send_binary(pack(json!({"type": "ping", "id": 5}))).await;
    assert_eq!(
        unpack(m.recv_binary().await),
        json!({"type": "pong", "id": 5})
    );
    m.send_binary(pack(json!({"type": "subscribe", "topic": "t", "id": 1})))
        .await;
    assert_eq!(
        unpack(m.recv_binary().await),
        json!({"type": "subscribed", "topic": "t", "id": 1})
    );
    j.send(json!({"type": "publish", "topic": "t", "payload": {"n": 1.5}}))
        .await;
    assert_eq!(j.recv().await["type"], "published");
    assert_eq!(
        unpack(m.recv_binary().await),
        json!({"type": "message", "topic": "t", "payload": {"n": 1.5}})
    );
    // A binary payload rides in the envelope as `bin`.
    publish_req(
        &node,
        PublishRequest {
            namespace: "default".into(),
            topic: "t".into(),
            payload_binary: Some(vec![1, 2, 3]),
            ..PublishRequest::default()
        },
    )
    .await;
    let raw = m.recv_binary().await;
    let mut expected = Vec::new();
    rmp::encode::write_map_len(&mut expected, 3).unwrap();
    for s in ["type", "message", "topic", "t", "payload"] {
        rmp::encode::write_str(&mut expected, s).unwrap();
    }
    rmp::encode::write_bin(&mut expected, &[1, 2, 3]).unwrap();
    assert_eq!(raw, expected);
    // Not MessagePack: 1007.
    m.send_binary(vec![0xc1]).await;
    assert_eq!(m.expect_close().await.0, 1007);
    // Nested deeper than JSON may be: 1007 too, and the node serves on.
    let mut deep = node.ws("/connect?user=deep", &proto_header).await;
    let mut nested = vec![0x91; 10_000];
    nested.push(0xc0);
    deep.send_binary(nested).await;
    assert_eq!(deep.expect_close().await.0, 1007);
    // Within max_payload as MessagePack, past it as JSON (control characters become
    // `\u00XX`): 1009, as for a frame past it.
    let mut big = node.ws("/connect?user=big", &proto_header).await;
    let max = dev_route("/x").max_payload;
    let controls = "\u{1}".repeat(max / 2);
    big.send_binary(pack(json!({"type": "ping", "pad": controls})))
        .await;
    assert_eq!(big.expect_close().await.0, 1009);
    let mut after = node.ws("/connect?user=after", &proto_header).await;
    after
        .send_binary(pack(json!({"type": "ping", "id": 6})))
        .await;
    assert_eq!(
        unpack(after.recv_binary().await),
        json!({"type": "pong", "id": 6})
    );
}

/// `dialect: echo`: every frame comes back as it was sent, text and binary, compressed or
/// not.
#[tokio::test]
async fn the_echo_route_echoes_every_frame() {
    let mut route = compressed_route("/echo", 16);
    route.dialect = edge_core::Dialect::named("echo").unwrap();
    route.binary = true;
    // The dev route's resource types (the demo page's) are not for an echo route.
    route.resources.clear();
    let node = TestNode::start(config_with(vec![route])).await;
    let mut c = node.connect("/echo").await;
    c.send_text("not even json").await;
    match c.next_message_within(STEP).await {
        Some(WsMessage::Text(t)) => assert_eq!(t.as_str(), "not even json"),
        other => panic!("{other:?}"),
    }
    c.send_binary(vec![0, 1, 2]).await;
    assert_eq!(c.recv_binary().await, vec![0, 1, 2]);
    let mut z = DeflateClient::connect(node.ws_addr, "/echo", "permessage-deflate").await;
    let text = "echo ".repeat(100);
    z.send(1, text.as_bytes(), true, 50).await;
    let back = z.recv().await;
    assert!(back.compressed);
    assert_eq!(back.payload, text.as_bytes());
    z.send(2, b"tiny", false, 0).await;
    let back = z.recv().await;
    assert_eq!(
        (back.opcode, back.compressed, back.payload),
        (2, false, b"tiny".to_vec())
    );
}
