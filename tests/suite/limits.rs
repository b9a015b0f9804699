//! Limits and close codes (docs/PROTOCOL.md §3, §8): oversize and malformed frames,
//! idle and heartbeat timeouts, rate limits, slow consumers, per-user connection limits,
//! and the drain on shutdown.

use std::time::Duration;

use bus::Outgoing;
use edge::config::{HeartbeatConfig, Hook, OnFull, OutboundConfig, RateLimitConfig};
use futures::StreamExt;
use proto::v1::messaging_client::MessagingClient;
use proto::v1::{PublishRequest, SendRequest};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

use crate::harness::{
    Authed, TestNode, WAIT, config_with, dev_config, dev_route, eventually, server_close_code,
    upgrade_status, wait_http_status,
};

#[tokio::test]
async fn oversize_frame_closes_1009() {
    let mut route = dev_route("/connect");
    route.max_payload = 1024;
    let node = TestNode::start(config_with(vec![route])).await;
    let mut c = node.connect("/connect?user=big").await;
    // Just under the limit is fine.
    let fits = json!({"type": "ping", "id": 1, "pad": "x".repeat(900)});
    c.send(fits).await;
    assert_eq!(c.recv().await, json!({"type": "pong", "id": 1}));
    c.send(json!({"type": "ping", "pad": "x".repeat(2000)}))
        .await;
    assert_eq!(c.expect_close().await.0, 1009);
}

#[tokio::test]
async fn invalid_utf8_text_closes_1007() {
    let node = TestNode::start(dev_config()).await;
    let mut c = node.connect("/connect?user=utf").await;
    c.send_raw_text(b"{\"type\":\"ping\",\"x\":\"\xff\xfe\"}".to_vec())
        .await;
    assert_eq!(c.expect_close().await.0, 1007);
}

#[tokio::test]
async fn binary_frame_closes_1003() {
    let node = TestNode::start(dev_config()).await;
    let mut c = node.connect("/connect?user=bin").await;
    c.send_binary(b"{\"type\":\"ping\"}".to_vec()).await;
    assert_eq!(c.expect_close().await.0, 1003);
}

#[tokio::test]
async fn idle_connection_closes_1000_saying_idle() {
    let mut route = dev_route("/connect");
    route.idle_timeout = Duration::from_millis(400);
    // Pongs to the edge's pings are not activity: this client answers them and still idles.
    route.heartbeat = HeartbeatConfig {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(100),
    };
    let node = TestNode::start(config_with(vec![route])).await;
    let start = Instant::now();
    let mut c = node.connect("/connect?user=idle").await;
    let (code, reason) = c.expect_close().await;
    assert_eq!(code, 1000);
    assert!(reason.contains("idle"), "close reason {reason:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "closed too early"
    );
}

#[tokio::test]
async fn heartbeat_drops_a_client_that_never_answers_pings() {
    let mut route = dev_route("/connect");
    // A timeout longer than the interval is refused by check-config (issue 10).
    route.heartbeat = HeartbeatConfig {
        interval: Duration::from_millis(250),
        timeout: Duration::from_millis(200),
    };
    report_closes(&mut route);
    let node = TestNode::start(config_with(vec![route])).await;
    let mut closes = close_events(&node).await;
    let start = Instant::now();
    // Never polled until the end: it never reads, so it never answers a ping.
    let dead = node.connect("/connect?user=dead").await;
    let mut live = node.connect("/connect?user=live").await;
    node.wait_located("", "dead", 1).await;
    node.wait_located("", "live", 1).await;

    // `live` reads (and so answers pings) while we wait for `dead` to be dropped.
    let watch = async {
        eventually(
            "the client that never answered pings to be disconnected",
            WAIT,
            async || node.locate("", "dead").await.is_empty().then_some(()),
        )
        .await;
        let elapsed = start.elapsed();
        let req = SendRequest {
            user: "live".into(),
            r#type: "still-here".into(),
            ..Default::default()
        };
        let r = node.messaging().await.send(req).await.unwrap().into_inner();
        assert_eq!(r.delivered, 1, "the live client was dropped too");
        elapsed
    };
    let (frame, elapsed) = tokio::join!(live.recv(), watch);
    assert_eq!(frame, json!({"type": "still-here", "payload": null}));
    assert!(
        elapsed >= Duration::from_millis(450),
        "dropped after {elapsed:?}, before interval + timeout"
    );
    // TCP closed, no close frame; pings were sent.
    let frames = dead.expect_dropped().await;
    assert!(
        frames.contains(&0x9),
        "no ping before the drop: {frames:x?}"
    );
    let body = next_close(&mut closes, WAIT, "no close event for the dropped client").await;
    assert_eq!(body["username"], "dead");
    live.roundtrip().await;
}

#[tokio::test]
async fn flooding_gets_rate_limited_then_closed_1008() {
    let mut route = dev_route("/connect");
    route.rate_limit = RateLimitConfig {
        per_second: 1,
        burst: 5,
        close_after: 3,
    };
    let node = TestNode::start(config_with(vec![route])).await;
    let mut c = node.connect("/connect?user=flood").await;
    let mut other = node.connect("/connect?user=calm").await;
    for i in 0..10 {
        c.send(json!({"type": "ping", "id": i})).await;
    }
    let ((code, _), frames) = c.close_frame_after_texts_within(WAIT).await;
    assert_eq!(code, 1008, "frames before the close: {frames:?}");
    let pongs = frames.iter().filter(|f| f["type"] == "pong").count();
    let limited: Vec<&Value> = frames.iter().filter(|f| f["type"] == "error").collect();
    assert!((5..=6).contains(&pongs), "{frames:?}");
    assert_eq!(limited.len(), 2, "{frames:?}");
    for e in limited {
        assert_eq!(e["code"], "rate_limited");
    }
    // Other connections have their own bucket.
    for _ in 0..5 {
        other.roundtrip().await;
    }
}

#[tokio::test]
async fn slow_consumer_is_closed_1013_without_stalling_others() {
    let mut slow_route = dev_route("/slow");
    slow_route.outbound = OutboundConfig {
        queue: 8,
        max_bytes: 64 * 1024,
        on_full: OnFull::Close,
    };
    report_closes(&mut slow_route);
    let fast_route = dev_route("/fast");
    let node = TestNode::start(config_with(vec![slow_route, fast_route])).await;
    let mut closes = close_events(&node).await;

    let mut slow = node.connect_small_rcvbuf("/slow?user=slow", 4096).await;
    let mut fast = node.connect("/fast?user=fast").await;
    for c in [&mut slow, &mut fast] {
        c.send(json!({"type": "subscribe", "topic": "feed"})).await;
        c.recv_type("subscribed").await;
    }
    let (slow_conn, fast_conn) = (node.conn_of(&slow).await, node.conn_of(&fast).await);
    node.wait_topics(&slow_conn.conn_id, &["feed"]).await;
    node.wait_topics(&fast_conn.conn_id, &["feed"]).await;

    // `fast` reads everything while `slow` reads nothing.
    let reader = tokio::spawn(async move {
        let mut next = 0u64;
        loop {
            let m = fast.recv_within(Duration::from_secs(10)).await;
            assert_eq!(m["topic"], "feed");
            assert_eq!(
                m["payload"]["seq"], next,
                "fast client lost or reordered a message"
            );
            if m["payload"]["end"] == true {
                return (fast, next);
            }
            next += 1;
        }
    });

    let pad = "x".repeat(32 * 1024);
    let mut msg = node.messaging().await;
    let mut seq = 0u64;
    let started = Instant::now();
    let refused = loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the slow consumer was never refused after {seq} messages"
        );
        let req = PublishRequest {
            namespace: "default".into(),
            topic: "feed".into(),
            payload_json: json!({"seq": seq, "pad": pad}).to_string(),
            ..Default::default()
        };
        let sent = Instant::now();
        let r = msg.publish(req).await.unwrap().into_inner();
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "a publish stalled behind the slow consumer"
        );
        seq += 1;
        if r.refused > 0 {
            break r;
        }
    };
    assert!(
        refused.delivered >= 1,
        "the fast client was refused: {refused:?}"
    );
    // Read the slow socket now: what was queued, then the close frame.
    let slow_read = tokio::spawn(async move { slow.close_frame_after_texts_within(WAIT).await.0 });
    let end = PublishRequest {
        namespace: "default".into(),
        topic: "feed".into(),
        payload_json: json!({"seq": seq, "end": true}).to_string(),
        ..Default::default()
    };
    msg.publish(end).await.unwrap();
    let (mut fast, last) = reader.await.unwrap();
    assert_eq!(last, seq, "the fast client did not get every message");
    fast.roundtrip().await;

    let body = next_close(&mut closes, WAIT, "no close event for the slow consumer").await;
    assert_eq!(body["username"], "slow");
    assert_eq!(body["code"], 1013, "{body}");
    let (code, _) = slow_read.await.unwrap();
    assert_eq!(code, 1013);
}

/// A route whose outbound queue holds everything these tests publish.
fn roomy_route(path: &str) -> edge::config::RouteConfig {
    let mut route = dev_route(path);
    route.outbound = OutboundConfig {
        queue: 8192,
        max_bytes: 32 * 1024 * 1024,
        on_full: OnFull::Close,
    };
    route
}

/// The padding of message `seq`: sizes vary so that frame boundaries fall anywhere in a
/// write, partial or not.
fn pad_len(seq: u64) -> usize {
    1000 + (seq as usize * 7919) % 30_000
}

/// Publishes `count` padded messages, numbered from 0, to `topic`; none may be refused.
async fn publish_padded(mut msg: MessagingClient<Authed>, topic: &'static str, count: u64) {
    for seq in 0..count {
        let req = PublishRequest {
            namespace: "default".into(),
            topic: topic.into(),
            payload_json: json!({"seq": seq, "pad": "x".repeat(pad_len(seq))}).to_string(),
            ..Default::default()
        };
        let r = msg.publish(req).await.unwrap().into_inner();
        assert_eq!(r.refused, 0, "{topic} {seq} was refused");
    }
}

/// The same padded messages straight onto the bus, without awaiting anything that is not
/// ready: on a one-thread runtime the topic's pump finds the whole burst waiting.
async fn publish_burst(node: &TestNode, topic: &str, count: u64) {
    let subject = proto::subject::topic("default", [topic]);
    for seq in 0..count {
        let payload = json!({"seq": seq, "pad": "x".repeat(pad_len(seq))}).to_string();
        node.bus
            .publish(Outgoing::new(subject.clone(), payload))
            .await
            .unwrap();
    }
}

/// Where the routes of these tests report closes (their `onclose` hook).
const CLOSES: &str = "test.closed";

fn report_closes(route: &mut edge::config::RouteConfig) {
    route.hooks.onclose = Some(Hook {
        publish: CLOSES.into(),
        required: false,
    });
}

async fn close_events(node: &TestNode) -> bus::Subscription {
    node.subscribe(CLOSES).await
}

/// The next close event's body, within `limit`.
async fn next_close(closes: &mut bus::Subscription, limit: Duration, missing: &str) -> Value {
    let closed = tokio::time::timeout(limit, closes.next())
        .await
        .expect(missing)
        .unwrap();
    serde_json::from_slice(&closed.payload).unwrap()
}

/// Checks one frame from [`publish_padded`]: a whole message, the expected number.
fn check_padded(m: &Value, seq: u64) {
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(
        m["payload"]["seq"], seq,
        "lost or reordered in {}",
        m["topic"]
    );
    let pad = m["payload"]["pad"].as_str().unwrap();
    assert_eq!(pad.len(), pad_len(seq), "message {seq} is cut");
    assert!(pad.bytes().all(|b| b == b'x'), "message {seq} is torn");
}

/// Fan-out writes straight to free sockets and queues for busy ones (edge/src/transport/ws.rs); a
/// reader that falls behind sees both, plus partial writes handed to its task. Every frame
/// must still arrive whole and in order, on a runtime where pumps and connection tasks run
/// on different threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_reader_gets_every_fanout_frame_whole_and_in_order() {
    let node = TestNode::start(config_with(vec![
        roomy_route("/late"),
        dev_route("/prompt"),
    ]))
    .await;
    let mut late = node.connect_small_rcvbuf("/late?user=late", 4096).await;
    let mut prompt = node.connect("/prompt?user=prompt").await;
    for c in [&mut late, &mut prompt] {
        c.send(json!({"type": "subscribe", "topic": "feed"})).await;
        c.recv_type("subscribed").await;
    }
    const COUNT: u64 = 300;
    // The prompt reader keeps reading while the late one reads nothing until the end.
    let prompt_reader = tokio::spawn(async move {
        for seq in 0..COUNT {
            check_padded(&prompt.recv_within(WAIT).await, seq);
        }
    });
    publish_padded(node.messaging().await, "feed", COUNT).await;
    prompt_reader.await.unwrap();
    for seq in 0..COUNT {
        check_padded(&late.recv_within(WAIT).await, seq);
    }
    late.roundtrip().await;
}

/// A burst reaches the pump as one batch, framed into one buffer; the late reader's socket
/// takes only part of it. The frame the kernel cut is finished by the connection's task and
/// the whole frames after it are queued: all arrive, in order.
#[tokio::test]
async fn a_batch_cut_short_by_the_kernel_arrives_whole_and_in_order() {
    let node = TestNode::start(config_with(vec![roomy_route("/late")])).await;
    let mut late = node.connect_small_rcvbuf("/late?user=late", 4096).await;
    late.send(json!({"type": "subscribe", "topic": "feed"}))
        .await;
    late.recv_type("subscribed").await;
    const COUNT: u64 = 200;
    publish_burst(&node, "feed", COUNT).await;
    for seq in 0..COUNT {
        check_padded(&late.recv_within(WAIT).await, seq);
    }
    late.roundtrip().await;
}

/// Two topics' pumps and the connection's task (writing what was queued) share one socket,
/// from different threads, while a reader with a small receive buffer drains it
/// concurrently: frames must never interleave, and each topic keeps its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pumps_share_one_socket_without_tearing_frames() {
    let node = TestNode::start(config_with(vec![roomy_route("/small")])).await;
    let mut sub = node.connect_small_rcvbuf("/small?user=sub", 4096).await;
    for topic in ["a", "b"] {
        sub.send(json!({"type": "subscribe", "topic": topic})).await;
        sub.recv_type("subscribed").await;
    }
    const COUNT: u64 = 300;
    let reader = tokio::spawn(async move {
        let mut next = [0u64, 0u64];
        while next != [COUNT, COUNT] {
            let m = sub.recv_within(WAIT).await;
            let i = usize::from(m["topic"] == "b");
            check_padded(&m, next[i]);
            next[i] += 1;
        }
        sub.roundtrip().await;
    });
    let pa = tokio::spawn(publish_padded(node.messaging().await, "a", COUNT));
    let pb = tokio::spawn(publish_padded(node.messaging().await, "b", COUNT));
    pa.await.unwrap();
    pb.await.unwrap();
    reader.await.unwrap();
}

/// A client that stops reading while it is sent a lot fills its socket; then neither pings
/// nor anything else can reach it. It is dropped (no close frame can get through) once its
/// socket has taken nothing for the heartbeat interval plus its timeout, even though its
/// queue still has room.
#[tokio::test]
async fn a_client_whose_socket_stays_full_is_dropped_after_the_heartbeat_bound() {
    let mut route = roomy_route("/stuck");
    // Long enough that the burst below fills the socket before the first ping is due.
    route.heartbeat = HeartbeatConfig {
        interval: Duration::from_millis(1000),
        timeout: Duration::from_millis(500),
    };
    report_closes(&mut route);
    let node = TestNode::start(config_with(vec![route])).await;
    let mut closes = close_events(&node).await;
    let mut stuck = node.connect_small_rcvbuf("/stuck?user=stuck", 4096).await;
    stuck
        .send(json!({"type": "subscribe", "topic": "feed"}))
        .await;
    stuck.recv_type("subscribed").await;
    // About 9 MiB at once, straight onto the bus: far more than the socket buffers hold, far
    // less than the queue's bound.
    let started = Instant::now();
    publish_burst(&node, "feed", 300).await;
    let body = next_close(
        &mut closes,
        Duration::from_secs(10),
        "the stuck client was never dropped",
    )
    .await;
    assert_eq!(body["username"], "stuck");
    assert_eq!(body["code"], 1006, "dropped without a close frame: {body}");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(1500),
        "dropped after {after:?}, before its socket had stalled for interval + timeout"
    );
}

#[tokio::test]
async fn too_many_connections_for_one_user_closes_1008() {
    let mut route = dev_route("/connect");
    route.max_connections_per_user = 2;
    let node = TestNode::start(config_with(vec![route])).await;
    let mut a = node.connect("/connect?user=greedy").await;
    let mut b = node.connect("/connect?user=greedy").await;
    let mut c = node.connect("/connect?user=greedy").await;
    assert_eq!(c.expect_close().await.0, 1008);
    a.roundtrip().await;
    b.roundtrip().await;
    let mut d = node.connect("/connect?user=modest").await;
    d.roundtrip().await;
    node.wait_located("default", "greedy", 2).await;
}

#[tokio::test]
async fn node_at_its_connection_limit_answers_503() {
    let cfg = edge::EdgeConfig {
        max_connections: 2,
        ..dev_config()
    };
    let node = TestNode::start(cfg).await;
    let mut a = node.connect("/connect?user=n1").await;
    let b = node.connect("/connect?user=n2").await;
    assert_eq!(
        upgrade_status(node.ws_addr, "/connect?user=n3", &[]).await,
        503
    );
    a.roundtrip().await;
    // A freed slot can be taken again.
    b.close().await;
    eventually(
        "the slot of the closed connection to be freed",
        WAIT,
        async || (upgrade_status(node.ws_addr, "/connect?user=n3", &[]).await == 101).then_some(()),
    )
    .await;
}

#[tokio::test]
async fn shutdown_drains_with_1001_and_refuses_new_sockets() {
    let cfg = edge::EdgeConfig {
        drain_window: Duration::from_millis(1200),
        ..dev_config()
    };
    let node = TestNode::start(cfg).await;
    let mut a = node.connect("/connect?user=d1").await;
    let mut b = node.connect("/connect?user=d2").await;
    a.roundtrip().await;
    b.roundtrip().await;
    assert_eq!(node.http_get("/readyz").await.0, 200);

    node.shutdown_token().cancel();
    wait_http_status("the draining node", node.ws_addr, "/readyz", 503, WAIT).await;
    assert_eq!(
        upgrade_status(node.ws_addr, "/connect?user=late", &[]).await,
        503
    );
    assert_eq!(node.http_get("/healthz").await.0, 200);
    let (ca, cb) = tokio::join!(a.expect_close(), b.expect_close());
    assert_eq!(ca.0, 1001, "{ca:?}");
    assert_eq!(cb.0, 1001, "{cb:?}");
    node.join(Duration::from_secs(5))
        .await
        .expect("serve returned an error");
}

/// Lingering close: a client that is still sending when the edge closes it, and that reads
/// its backlog only later, gets the close frame, not a reset. Without the lingering read the
/// edge's socket closes with unread input, the kernel answers with a reset, and the frames
/// still queued for the client (the close frame among them) are thrown away.
#[tokio::test]
async fn a_client_still_sending_gets_the_close_frame_not_a_reset() {
    let mut route = dev_route("/connect");
    route.max_payload = 1024;
    report_closes(&mut route);
    let node = TestNode::start(config_with(vec![route])).await;
    let mut closes = close_events(&node).await;
    let mut c = node.connect_small_rcvbuf("/connect?user=late", 4096).await;
    c.send(json!({"type": "subscribe", "topic": "feed"})).await;
    c.recv_type("subscribed").await;
    let conn = node.conn_of(&c).await;
    node.wait_topics(&conn.conn_id, &["feed"]).await;

    // The client reads nothing from now on: its receive window fills and frames queue up in
    // the edge's socket.
    let mut msg = node.messaging().await;
    let pad = "x".repeat(900);
    for seq in 0..32 {
        let req = PublishRequest {
            namespace: "default".into(),
            topic: "feed".into(),
            payload_json: json!({"seq": seq, "pad": pad}).to_string(),
            ..Default::default()
        };
        msg.publish(req).await.unwrap();
    }
    // Then it sends a frame far over the limit, and goes on sending it: the edge refuses it
    // at its header and closes with 1009.
    let (mut read, mut write) = c.into_tcp().into_split();
    let writer = tokio::spawn(async move {
        let len: u64 = 256 * 1024;
        let mut head = vec![0x81, 0x80 | 127];
        head.extend_from_slice(&len.to_be_bytes());
        head.extend_from_slice(&[0, 0, 0, 0]);
        let body = vec![b'x'; 16 * 1024];
        if write.write_all(&head).await.is_err() {
            return;
        }
        for _ in 0..16 {
            if write.write_all(&body).await.is_err() {
                return;
            }
        }
    });
    let closed = next_close(&mut closes, WAIT, "the edge never closed the connection").await;
    assert_eq!(closed["code"], 1009, "{closed}");

    // Now the client reads its backlog: every frame, then the close frame.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let read_all = async {
        loop {
            match read.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e),
            }
        }
    };
    let ended = tokio::time::timeout(WAIT, read_all)
        .await
        .expect("the connection never ended");
    writer.abort();
    assert!(
        ended.is_ok(),
        "the connection was reset after {} bytes: {ended:?}",
        buf.len()
    );
    assert_eq!(
        server_close_code(&buf),
        Some(1009),
        "{} bytes read",
        buf.len()
    );
}
