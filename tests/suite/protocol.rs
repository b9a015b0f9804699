//! The native client protocol (docs/PROTOCOL.md §4 to §7) and the gRPC Messaging/Placement services,
//! driven with real clients over real sockets against an in-process node.

use std::time::Duration;

use edge::config::{Hook, HooksConfig, MessageHooks, TypeHook};
use proto::v1::{
    BroadcastRequest, DisconnectRequest, ListConnectionsRequest, PublishRequest, SendRequest,
};
use serde_json::{Value, json};

use crate::harness::{
    Client, TestNode, WAIT, config_with, dev_config, dev_route, eventually, next_json, send_req,
};

async fn dev_node() -> TestNode {
    TestNode::start(dev_config()).await
}

async fn subscribe(c: &mut Client, topic: &str) {
    c.send(json!({"type": "subscribe", "topic": topic, "id": topic}))
        .await;
    let v = c.recv().await;
    assert_eq!(
        v,
        json!({"type": "subscribed", "topic": topic, "id": topic}),
        "subscribe {topic:?}"
    );
}

async fn publish(c: &mut Client, topic: &str, payload: Value) {
    c.send(json!({"type": "publish", "topic": topic, "payload": payload, "id": "p"}))
        .await;
    let v = c.recv().await;
    assert_eq!(
        v,
        json!({"type": "published", "topic": topic, "id": "p"}),
        "publish to {topic:?}"
    );
}

fn message(topic: &str, payload: Value) -> Value {
    let mut m = json!({"type": "message", "topic": topic});
    m["payload"] = payload;
    m
}

#[tokio::test]
async fn init_answers_a_session_and_resumes_a_given_one() {
    let node = dev_node().await;
    let mut a = node.connect("/connect?user=sess").await;
    let mut b = node.connect("/connect?user=sess").await;
    a.send(json!({"type": "init"})).await;
    let sa = a.recv_type("session").await;
    b.send(json!({"type": "init"})).await;
    let sb = b.recv_type("session").await;
    let (ida, idb) = (sa["id"].as_str().unwrap(), sb["id"].as_str().unwrap());
    assert!(!ida.is_empty() && !idb.is_empty());
    assert_ne!(ida, idb, "two connections got the same new session");

    let mut c = node.connect("/connect?user=sess").await;
    c.send(json!({"type": "init", "session": ida})).await;
    let sc = c.recv_type("session").await;
    assert_eq!(sc["id"], ida, "{sc}");
    assert!(
        sc["resume"]
            .as_str()
            .is_some_and(|t| t.starts_with("sbr1.")),
        "a session carries a resume token: {sc}"
    );
}

#[tokio::test]
async fn publish_reaches_matching_mqtt_filters_only() {
    let node = dev_node().await;
    let mut p = node.connect("/connect?user=pub").await;
    let mut plus = node.connect("/connect?user=s-plus").await;
    let mut hash = node.connect("/connect?user=s-hash").await;
    let mut one = node.connect("/connect?user=s-one").await;
    let mut other = node.connect("/connect?user=s-other").await;
    subscribe(&mut plus, "scores/+/eu").await;
    subscribe(&mut hash, "scores/#").await;
    subscribe(&mut one, "scores/+").await;
    subscribe(&mut other, "other/#").await;

    p.send(json!({"type": "publish", "topic": "scores/42/eu", "payload": {"goal": 1}, "id": 7}))
        .await;
    assert_eq!(
        p.recv().await,
        json!({"type": "published", "topic": "scores/42/eu", "id": 7})
    );
    let m = message("scores/42/eu", json!({"goal": 1}));
    assert_eq!(plus.recv().await, m);
    assert_eq!(hash.recv().await, m);

    // `#` matches its parent level too; `+` needs exactly one level.
    publish(&mut p, "scores", json!("parent")).await;
    assert_eq!(hash.recv().await, message("scores", json!("parent")));
    publish(&mut p, "scores/7", json!("one-level")).await;
    // Each subscriber's first frame proves what did not reach it before.
    assert_eq!(one.recv().await, message("scores/7", json!("one-level")));
    assert_eq!(hash.recv().await, message("scores/7", json!("one-level")));
    publish(&mut p, "scores/1/eu", json!("again")).await;
    assert_eq!(plus.recv().await, message("scores/1/eu", json!("again")));
    publish(&mut p, "other/x", json!("marker")).await;
    assert_eq!(other.recv().await, message("other/x", json!("marker")));
}

#[tokio::test]
async fn publisher_gets_its_own_message_only_with_echo() {
    let node = dev_node().await;
    let mut p = node.connect("/connect?user=echo-pub").await;
    let mut s = node.connect("/connect?user=echo-sub").await;
    subscribe(&mut p, "room/#").await;
    subscribe(&mut s, "room/#").await;

    p.send(json!({"type": "publish", "topic": "room/1", "payload": 1, "id": "a"}))
        .await;
    p.send(json!({"type": "publish", "topic": "room/2", "payload": 2, "id": "b", "echo": true}))
        .await;
    let mut got = vec![p.recv().await, p.recv().await, p.recv().await];
    got.sort_by_key(Value::to_string);
    let mut want = vec![
        json!({"type": "published", "topic": "room/1", "id": "a"}),
        json!({"type": "published", "topic": "room/2", "id": "b"}),
        message("room/2", json!(2)),
    ];
    want.sort_by_key(Value::to_string);
    assert_eq!(got, want, "the publisher got its own non-echo message");
    assert_eq!(s.recv().await, message("room/1", json!(1)));
    assert_eq!(s.recv().await, message("room/2", json!(2)));
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let node = dev_node().await;
    let mut a = node.connect("/connect?user=unsub-a").await;
    let mut b = node.connect("/connect?user=unsub-b").await;
    subscribe(&mut a, "u/1").await;
    subscribe(&mut b, "u/1").await;
    let (ca, cb) = (node.conn_of(&a).await, node.conn_of(&b).await);
    node.wait_topics(&ca.conn_id, &["u/1"]).await;
    node.wait_topics(&cb.conn_id, &["u/1"]).await;
    let mut msg = node.messaging().await;
    let pub_req = |n: u32| PublishRequest {
        namespace: "default".into(),
        topic: "u/1".into(),
        payload_json: n.to_string(),
        ..Default::default()
    };
    let r = msg.publish(pub_req(1)).await.unwrap().into_inner();
    assert_eq!(r.delivered, 2);
    assert_eq!(a.recv().await, message("u/1", json!(1)));
    assert_eq!(b.recv().await, message("u/1", json!(1)));

    a.send(json!({"type": "unsubscribe", "topic": "u/1", "id": 3}))
        .await;
    assert_eq!(
        a.recv().await,
        json!({"type": "unsubscribed", "topic": "u/1", "id": 3})
    );
    node.wait_topics(&ca.conn_id, &[]).await;
    // Publish answers once every matching edge has queued it: after this, a leak to `a`
    // would already sit in its queue ahead of the marker.
    let r = msg.publish(pub_req(2)).await.unwrap().into_inner();
    assert_eq!(r.delivered, 1, "publish after unsubscribe: {r:?}");
    assert_eq!(b.recv().await, message("u/1", json!(2)));
    let marker = SendRequest {
        conn_id: ca.conn_id.clone(),
        r#type: "marker".into(),
        ..Default::default()
    };
    assert_eq!(msg.send(marker).await.unwrap().into_inner().delivered, 1);
    assert_eq!(a.recv().await, json!({"type": "marker", "payload": null}));
}

/// Publishes `probe` to `topic` and then a marker to a topic matching `filter`; the
/// subscriber of `filter` must see the probe first exactly when `expect` says so.
async fn check_leak(node: &TestNode, filter: &str, topic: &str, expect: bool) {
    let mut sub = node.connect("/connect?user=leak-sub").await;
    let mut p = node.connect("/connect?user=leak-pub").await;
    subscribe(&mut sub, filter).await;
    publish(&mut p, topic, json!("probe")).await;
    let marker_topic = filter
        .split('/')
        .map(|l| if l == "+" || l == "#" { "mk" } else { l })
        .collect::<Vec<_>>()
        .join("/");
    publish(&mut p, &marker_topic, json!("marker")).await;
    let first = sub.recv().await;
    if expect {
        assert_eq!(
            first,
            message(topic, json!("probe")),
            "filter {filter:?} should receive topic {topic:?}"
        );
        assert_eq!(sub.recv().await, message(&marker_topic, json!("marker")));
    } else {
        assert_eq!(
            first,
            message(&marker_topic, json!("marker")),
            "filter {filter:?} must not receive topic {topic:?}"
        );
    }
    sub.close().await;
    p.close().await;
}

#[tokio::test]
async fn topic_levels_cannot_inject_subject_syntax() {
    let node = dev_node().await;
    let cases: &[(&str, &str, bool)] = &[
        // `.` is part of a level, never a separator.
        ("a/+", "a.b", false),
        ("a/b", "a.b", false),
        ("a/+/c", "a/b.c", false),
        ("a/+", "a/b.c", true),
        // NATS wildcards are literal characters in MQTT topics.
        ("*", "x", false),
        ("*", "*", true),
        (">", "x/y", false),
        (">", ">", true),
        ("x/y", ">", false),
        ("x/+", "x/*", true),
        ("#", ">", true),
        // Spaces and empty levels.
        ("a b", "a b", true),
        ("a/+", "a/b c", true),
        ("a/b", "a/b c", false),
        ("a//b", "a//b", true),
        ("a/+/b", "a//b", true),
        ("a/b", "a//b", false),
        ("+/x", "/x", true),
        ("a/#", "a/", true),
        // The escape character of an encoding must not alias anything.
        ("a/~", "a/", false),
        ("a.b", "a~2Eb", false),
        ("a~2Eb", "a.b", false),
        ("a/+", "a/~", true),
    ];
    for (filter, topic, expect) in cases {
        check_leak(&node, filter, topic, *expect).await;
    }
}

#[tokio::test]
async fn topics_are_isolated_by_namespace() {
    let node = dev_node().await;
    let mut sa = node.connect("/connect?user=x&namespace=a").await;
    let mut sa_all = node.connect("/connect?user=y&namespace=a").await;
    let mut sb = node.connect("/connect?user=x&namespace=b").await;
    let mut pa = node.connect("/connect?user=p&namespace=a").await;
    let mut pb = node.connect("/connect?user=p&namespace=b").await;
    subscribe(&mut sa, "t/1").await;
    subscribe(&mut sa_all, "#").await;
    subscribe(&mut sb, "t/1").await;

    publish(&mut pa, "t/1", json!("A")).await;
    publish(&mut pb, "t/1", json!("B")).await;
    publish(&mut pa, "t/1", json!("A2")).await;
    publish(&mut pb, "t/1", json!("B2")).await;
    for c in [&mut sa, &mut sa_all] {
        assert_eq!(c.recv().await, message("t/1", json!("A")));
        assert_eq!(c.recv().await, message("t/1", json!("A2")));
    }
    assert_eq!(sb.recv().await, message("t/1", json!("B")));
    assert_eq!(sb.recv().await, message("t/1", json!("B2")));
}

#[tokio::test]
async fn namespace_with_dots_cannot_reach_another_namespace() {
    let node = dev_node().await;
    // Unencoded, namespace "a" + topic "b/t" and namespace "a.b" + topic "t" are one subject.
    let mut sub_a = node.connect("/connect?user=s&namespace=a").await;
    let mut sub_ab = node.connect("/connect?user=s&namespace=a.b").await;
    let mut pub_a = node.connect("/connect?user=p&namespace=a").await;
    let mut pub_ab = node.connect("/connect?user=p&namespace=a.b").await;
    subscribe(&mut sub_a, "b/t").await;
    subscribe(&mut sub_ab, "t").await;
    publish(&mut pub_ab, "t", json!("from a.b")).await;
    publish(&mut pub_a, "b/t", json!("from a")).await;
    assert_eq!(sub_a.recv().await, message("b/t", json!("from a")));
    assert_eq!(sub_ab.recv().await, message("t", json!("from a.b")));
    publish(&mut pub_ab, "t", json!("again")).await;
    assert_eq!(sub_ab.recv().await, message("t", json!("again")));

    // The same holds for events: a backend of namespace "a", type "b.c" must not hear
    // namespace "a.b", type "c".
    let _backend = node.subscribe(proto::subject::event("a", "b.c")).await;
    pub_ab.send(json!({"type": "c", "id": 1})).await;
    let e = pub_ab.recv_error("no_responders").await;
    assert_eq!(e["id"], 1);
}

#[tokio::test]
async fn invalid_topics_are_refused() {
    let node = dev_node().await;
    let mut c = node.connect("/connect?user=bad-topics").await;
    let long = "x".repeat(proto::topic::MAX_LEN + 1);
    let deep = vec!["l"; proto::topic::MAX_LEVELS + 1].join("/");
    for (verb, topic) in [
        ("subscribe", "a/#/b"),
        ("subscribe", "sc+ores"),
        ("subscribe", "a/b#"),
        ("subscribe", ""),
        ("subscribe", long.as_str()),
        ("subscribe", deep.as_str()),
        ("publish", "a/+"),
        ("publish", "a/#"),
        ("publish", "#"),
        ("publish", ""),
        ("publish", long.as_str()),
    ] {
        c.send(json!({"type": verb, "topic": topic, "payload": 1, "id": verb}))
            .await;
        let e = c.recv_error("invalid_topic").await;
        assert_eq!(e["id"], verb, "{verb} {topic:?}");
    }
    c.roundtrip().await;
}

#[tokio::test]
async fn publish_is_forbidden_where_the_route_says_so() {
    let mut route = dev_route("/ro");
    route.publish = false;
    let node = TestNode::start(config_with(vec![route])).await;
    let mut c = node.connect("/ro?user=ro").await;
    c.send(json!({"type": "publish", "topic": "a/b", "payload": 1, "id": "f"}))
        .await;
    let e = c.recv_error("forbidden").await;
    assert_eq!(e["id"], "f");
    subscribe(&mut c, "a/b").await;
}

#[tokio::test]
async fn ping_answers_pong_with_the_id() {
    let node = dev_node().await;
    let mut c = node.connect("/connect?user=pinger").await;
    c.send(json!({"type": "ping"})).await;
    assert_eq!(c.recv().await, json!({"type": "pong"}));
    c.send(json!({"type": "ping", "id": 42})).await;
    assert_eq!(c.recv().await, json!({"type": "pong", "id": 42}));
    c.send(json!({"type": "ping", "id": "s"})).await;
    assert_eq!(c.recv().await, json!({"type": "pong", "id": "s"}));
    node.stop().await;
}

#[tokio::test]
async fn malformed_frames_get_error_frames_and_the_socket_stays_usable() {
    let node = dev_node().await;
    let mut c = node.connect("/connect?user=garbage").await;
    for text in ["{not json", "[1,2]", "\"str\"", "", "null"] {
        c.send_text(text).await;
        c.recv_error("invalid_json").await;
    }
    for frame in [json!({"id": 3}), json!({"type": 7}), json!({"type": null})] {
        c.send(frame).await;
        c.recv_error("missing_type").await;
    }
    c.roundtrip().await;
}

#[tokio::test]
async fn resource_verbs_without_resources_answer_unknown_resource() {
    let node = dev_node().await;
    let mut c = node.connect("/connect?user=res").await;
    for verb in ["watch", "query", "all", "get"] {
        c.send(json!({"type": verb, "resource": "nodes", "params": {"id": 1}, "id": verb}))
            .await;
        let e = c.recv_error("unknown_resource").await;
        assert_eq!(e["id"], verb);
    }
    c.roundtrip().await;
}

#[tokio::test]
async fn event_without_backend_answers_no_responders() {
    let node = dev_node().await;
    let mut c = node.connect("/connect?user=lonely").await;
    c.send(json!({"type": "nobody_home", "id": "e1"})).await;
    let e = c.recv_error("no_responders").await;
    assert_eq!(e["id"], "e1");
    c.roundtrip().await;
}

#[tokio::test]
async fn event_reaches_backend_with_context_and_reply_goes_back() {
    let node = dev_node().await;
    let mut backend = node
        .subscribe(proto::subject::event("default", "greet"))
        .await;
    let mut c = node.connect("/connect?user=eve&room=42").await;
    let mut other = node.connect("/connect?user=eve").await;
    let conn = node.conn_of(&c).await;

    let event = json!({"type": "greet", "id": 9, "text": "hi"});
    c.send(event.clone()).await;
    let (req, body) = next_json(&mut backend).await;
    assert_eq!(body["conn_id"], conn.conn_id.as_str());
    assert_eq!(body["node_id"], conn.node_id.as_str());
    assert_eq!(body["namespace"], "default");
    assert_eq!(body["username"], "eve");
    assert_eq!(body["params"], json!({"user": "eve", "room": "42"}));
    assert_eq!(body["claims"], json!({}));
    assert_eq!(body["event"], event);
    node.reply(&req, json!({"payload": {"ok": true}})).await;
    assert_eq!(
        c.recv().await,
        json!({"type": "greet", "id": 9, "payload": {"ok": true}})
    );

    c.send(json!({"type": "greet", "id": "x2"})).await;
    let (req, _) = next_json(&mut backend).await;
    node.reply(&req, json!({"error": {"reason": "bad"}})).await;
    assert_eq!(
        c.recv().await,
        json!({"type": "error", "id": "x2", "payload": {"reason": "bad"}})
    );
    c.roundtrip().await;
    // The reply went to that socket only.
    other.roundtrip().await;
}

#[tokio::test]
async fn path_parameters_are_part_of_the_context() {
    let node = TestNode::start(config_with(vec![dev_route("/{channel}")])).await;
    let mut backend = node.subscribe(proto::subject::event("default", "hi")).await;
    let mut c = node.connect("/logs?user=chan").await;
    c.send(json!({"type": "hi"})).await;
    let (_, body) = next_json(&mut backend).await;
    assert_eq!(body["params"], json!({"channel": "logs", "user": "chan"}));
    let conn = node.conn_of(&c).await;
    assert_eq!(conn.params.get("channel").map(String::as_str), Some("logs"));
}

#[tokio::test]
async fn event_without_reply_times_out() {
    let mut cfg = dev_config();
    cfg.request_timeout = Duration::from_millis(300);
    let node = TestNode::start(cfg).await;
    let mut backend = node
        .subscribe(proto::subject::event("default", "slow"))
        .await;
    let mut c = node.connect("/connect?user=waiter").await;
    c.send(json!({"type": "slow", "id": 5})).await;
    let _ = next_json(&mut backend).await;
    let e = c.recv_error("timeout").await;
    assert_eq!(e["id"], 5);
    c.roundtrip().await;
}

#[tokio::test]
async fn onmessage_hooks_route_events_by_type() {
    let mut route = dev_route("/bodhi");
    route.hooks = HooksConfig {
        onmessage: Some(MessageHooks {
            publish: Some("socket:generalMessage".into()),
            types: vec![TypeHook {
                event_type: "message_type_one".into(),
                publish: "socket:type_one".into(),
            }],
        }),
        ..HooksConfig::default()
    };
    let node = TestNode::start(config_with(vec![route])).await;
    let mut general = node.subscribe("socket:generalMessage").await;
    let mut typed = node.subscribe("socket:type_one").await;
    let mut c = node.connect("/bodhi?user=hooked&namespace=n1").await;

    c.send(json!({"type": "message_type_one", "id": 1, "x": 1}))
        .await;
    let (req, body) = next_json(&mut typed).await;
    assert_eq!(
        body["event"],
        json!({"type": "message_type_one", "id": 1, "x": 1})
    );
    assert_eq!(body["namespace"], "n1");
    node.reply(&req, json!({"payload": "one"})).await;
    let r = c.recv().await;
    assert_eq!((&r["id"], &r["payload"]), (&json!(1), &json!("one")), "{r}");

    // The general subject hears every event, typed ones included (bodhi's `onmessage.publish`),
    // and its reply comes back too, typed after the general subject.
    let (req, body) = next_json(&mut general).await;
    assert_eq!(
        body["event"],
        json!({"type": "message_type_one", "id": 1, "x": 1})
    );
    node.reply(&req, json!({"payload": "all"})).await;
    assert_eq!(
        c.recv().await,
        json!({"type": "socket:generalMessage", "id": 1, "payload": "all"})
    );

    c.send(json!({"type": "anything", "id": 2})).await;
    let (req, body) = next_json(&mut general).await;
    assert_eq!(body["event"], json!({"type": "anything", "id": 2}));
    assert_eq!(body["username"], "hooked");
    node.reply(&req, json!({"payload": {"n": 2}})).await;
    assert_eq!(
        c.recv().await,
        json!({"type": "socket:generalMessage", "id": 2, "payload": {"n": 2}})
    );
}

fn hooked_route(onconnect: Option<Hook>, onclose: Option<Hook>) -> edge::config::RouteConfig {
    let mut route = dev_route("/connect");
    route.hooks = HooksConfig {
        onconnect,
        onclose,
        onmessage: None,
        upgrade: None,
    };
    route
}

fn hook(subject: &str, required: bool) -> Option<Hook> {
    Some(Hook {
        publish: subject.into(),
        required,
    })
}

#[tokio::test]
async fn onconnect_reply_is_the_first_frame() {
    let route = hooked_route(hook("socket:connection", false), None);
    let node = TestNode::start(config_with(vec![route])).await;
    let mut backend = node.subscribe("socket:connection").await;
    let mut c = node.connect("/connect?user=welcome&namespace=ns1").await;
    // Sent before the hook answers: must be answered after the onconnect frame.
    c.send(json!({"type": "ping", "id": "early"})).await;
    let (req, body) = next_json(&mut backend).await;
    assert_eq!(body["username"], "welcome");
    assert_eq!(body["namespace"], "ns1");
    assert!(body["conn_id"].is_string() && body["node_id"].is_string());
    assert_eq!(body["event"], Value::Null);
    node.reply(&req, json!({"payload": {"hello": "welcome"}}))
        .await;
    assert_eq!(
        c.recv().await,
        json!({"type": "onconnect", "payload": {"hello": "welcome"}})
    );
    assert_eq!(c.recv().await, json!({"type": "pong", "id": "early"}));
}

#[tokio::test]
async fn onconnect_failure_sends_error_then_closes_1008() {
    let route = hooked_route(hook("socket:connection", false), None);
    let node = TestNode::start(config_with(vec![route])).await;
    let mut backend = node.subscribe("socket:connection").await;
    let mut c = node.connect("/connect?user=unwelcome").await;
    let (req, _) = next_json(&mut backend).await;
    node.reply(&req, json!({"error": "not welcome"})).await;
    let ((code, _), frames) = c.close_frame_after_texts_within(WAIT).await;
    assert_eq!(code, 1008);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["type"], "error");
    assert_eq!(frames[0]["payload"], "not welcome");
}

#[tokio::test]
async fn required_onconnect_without_backend_closes_1008() {
    let route = hooked_route(hook("socket:connection", true), None);
    let node = TestNode::start(config_with(vec![route])).await;
    let mut c = node.connect("/connect?user=nobody").await;
    let ((code, _), frames) = c.close_frame_after_texts_within(WAIT).await;
    assert_eq!(code, 1008);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["type"], "error");
}

#[tokio::test]
async fn optional_onconnect_without_backend_lets_the_client_in() {
    let route = hooked_route(hook("socket:connection", false), None);
    let node = TestNode::start(config_with(vec![route])).await;
    let mut c = node.connect("/connect?user=optional").await;
    c.roundtrip().await;
}

#[tokio::test]
async fn onclose_hook_hears_every_disconnect() {
    let route = hooked_route(None, hook("socket:close", false));
    let node = TestNode::start(config_with(vec![route])).await;
    let mut closes = node.subscribe("socket:close").await;
    let c = node.connect("/connect?user=leaver&namespace=nsx&k=v").await;
    let conn = node.conn_of(&c).await;
    c.close().await;
    let (_, body) = next_json(&mut closes).await;
    assert_eq!(body["conn_id"], conn.conn_id.as_str());
    assert_eq!(body["username"], "leaver");
    assert_eq!(body["namespace"], "nsx");
    assert_eq!(body["params"]["k"], "v");

    // Closed by the server too.
    let mut d = node.connect("/connect?user=kicked").await;
    let conn = node.conn_of(&d).await;
    let req = DisconnectRequest {
        conn_id: conn.conn_id.clone(),
        code: 4000,
        reason: "out".into(),
        ..Default::default()
    };
    node.messaging().await.disconnect(req).await.unwrap();
    assert_eq!(d.expect_close().await, (4000, "out".into()));
    let (_, body) = next_json(&mut closes).await;
    assert_eq!(body["conn_id"], conn.conn_id.as_str());
    assert_eq!(body["username"], "kicked");
}

fn marker_to(conn_id: &str) -> SendRequest {
    SendRequest {
        conn_id: conn_id.into(),
        r#type: "marker".into(),
        ..Default::default()
    }
}

const MARKER: fn() -> Value = || json!({"type": "marker", "payload": null});

#[tokio::test]
async fn send_reaches_a_user_in_one_or_every_namespace_or_one_connection() {
    let node = dev_node().await;
    let mut a1 = node.connect("/connect?user=alice&namespace=a").await;
    let mut a2 = node.connect("/connect?user=alice&namespace=a").await;
    let mut ab = node.connect("/connect?user=alice&namespace=b").await;
    let mut bob = node.connect("/connect?user=bob&namespace=a").await;
    node.wait_located("", "alice", 3).await;
    node.wait_located("a", "bob", 1).await;
    let (c1, c2, cb) = (
        node.conn_of(&a1).await,
        node.conn_of(&a2).await,
        node.conn_of(&ab).await,
    );
    let cbob = node.conn_of(&bob).await;
    let mut msg = node.messaging().await;

    let r = msg
        .send(send_req("a", "alice", "note", r#"{"n":1}"#))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.delivered, r.refused), (2, 0), "{r:?}");
    for c in [&mut a1, &mut a2] {
        assert_eq!(c.recv().await, json!({"type": "note", "payload": {"n": 1}}));
    }

    let r = msg
        .send(send_req("", "alice", "note", "2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, 3, "{r:?}");
    for c in [&mut a1, &mut a2, &mut ab] {
        assert_eq!(c.recv().await, json!({"type": "note", "payload": 2}));
    }

    let direct = SendRequest {
        conn_id: c1.conn_id.clone(),
        r#type: "direct".into(),
        payload: Some(prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue("hi".into())),
        }),
        ..Default::default()
    };
    assert_eq!(msg.send(direct).await.unwrap().into_inner().delivered, 1);
    assert_eq!(a1.recv().await, json!({"type": "direct", "payload": "hi"}));

    // Nobody else got anything more: the marker is each one's next frame.
    for (c, conn) in [(&mut a2, &c2), (&mut ab, &cb), (&mut bob, &cbob)] {
        assert_eq!(
            msg.send(marker_to(&conn.conn_id))
                .await
                .unwrap()
                .into_inner()
                .delivered,
            1
        );
        assert_eq!(c.recv().await, MARKER());
    }

    let r = msg
        .send(send_req("", "nobody", "note", "1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, 0);
    let err = msg.send(send_req("a", "", "note", "1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn broadcast_honours_namespace_and_skip_lists() {
    let node = dev_node().await;
    let mut c1 = node.connect("/connect?user=p&namespace=a").await;
    let mut c2 = node.connect("/connect?user=q&namespace=a").await;
    let mut c3 = node.connect("/connect?user=r&namespace=a").await;
    let mut c4 = node.connect("/connect?user=p&namespace=b").await;
    node.wait_located("", "p", 2).await;
    node.wait_located("a", "q", 1).await;
    let conn3 = node.conn_of(&c3).await;
    let mut msg = node.messaging().await;
    let bc =
        |ns: &str, n: u32, skip_users: Vec<String>, skip_conn_ids: Vec<String>| BroadcastRequest {
            namespace: ns.into(),
            r#type: "bc".into(),
            payload_json: n.to_string(),
            skip_users,
            skip_conn_ids,
            ..Default::default()
        };
    let r = msg
        .broadcast(bc("a", 1, vec![], vec![]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, 3, "{r:?}");
    let r = msg
        .broadcast(bc("", 2, vec!["q".into()], vec![conn3.conn_id.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, 2, "{r:?}");
    let r = msg
        .broadcast(bc("", 3, vec![], vec![]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, 4, "{r:?}");
    let frame = |n: u32| json!({"type": "bc", "payload": n});
    for (c, want) in [
        (&mut c1, vec![1, 2, 3]),
        (&mut c2, vec![1, 3]),
        (&mut c3, vec![1, 3]),
        (&mut c4, vec![2, 3]),
    ] {
        for n in want {
            assert_eq!(c.recv().await, frame(n));
        }
    }
}

#[tokio::test]
async fn grpc_publish_reaches_topic_subscribers_and_counts_them() {
    let node = dev_node().await;
    let mut s1 = node.connect("/connect?user=s1&namespace=a").await;
    let mut s2 = node.connect("/connect?user=s2&namespace=a").await;
    let mut s3 = node.connect("/connect?user=s3&namespace=a").await;
    let mut s4 = node.connect("/connect?user=s4&namespace=b").await;
    let mut s5 = node.connect("/connect?user=s5&namespace=a").await;
    subscribe(&mut s1, "news/+").await;
    subscribe(&mut s2, "news/x").await;
    subscribe(&mut s3, "news/#").await;
    subscribe(&mut s4, "news/x").await;
    subscribe(&mut s5, "sports/#").await;
    for (c, t) in [
        (&s1, "news/+"),
        (&s2, "news/x"),
        (&s3, "news/#"),
        (&s4, "news/x"),
    ] {
        let conn = node.conn_of(c).await;
        node.wait_topics(&conn.conn_id, &[t]).await;
    }
    let mut msg = node.messaging().await;
    let pub_req = |ns: &str, topic: &str, json: &str| PublishRequest {
        namespace: ns.into(),
        topic: topic.into(),
        payload_json: json.into(),
        ..Default::default()
    };
    let r = msg
        .publish(pub_req("a", "news/x", r#"{"h":1}"#))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, 3, "{r:?}");
    for c in [&mut s1, &mut s2, &mut s3] {
        assert_eq!(c.recv().await, message("news/x", json!({"h": 1})));
    }
    msg.publish(pub_req("b", "news/x", r#""m""#)).await.unwrap();
    assert_eq!(s4.recv().await, message("news/x", json!("m")));
    msg.publish(pub_req("a", "sports/1", r#""m""#))
        .await
        .unwrap();
    assert_eq!(s5.recv().await, message("sports/1", json!("m")));

    let err = msg.publish(pub_req("a", "news/+", "1")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn disconnect_closes_gracefully_or_hard() {
    let node = dev_node().await;
    let mut soft = node.connect("/connect?user=soft").await;
    let hard = node.connect("/connect?user=hard").await;
    let mut plain = node.connect("/connect?user=plain").await;
    node.wait_located("", "soft", 1).await;
    node.wait_located("", "plain", 1).await;
    let hard_conn = node.conn_of(&hard).await;
    let mut msg = node.messaging().await;

    let r = msg
        .disconnect(DisconnectRequest {
            user: "soft".into(),
            code: 4001,
            reason: "bye now".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, 1);
    assert_eq!(soft.expect_close().await, (4001, "bye now".into()));

    let r = msg
        .disconnect(DisconnectRequest {
            conn_id: hard_conn.conn_id.clone(),
            hard: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, 1);
    hard.expect_dropped().await;

    let r = msg
        .disconnect(DisconnectRequest {
            namespace: "default".into(),
            user: "plain".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, 1);
    assert_eq!(plain.expect_close().await.0, 1000);

    eventually(
        "disconnected connections to leave placement",
        WAIT,
        async || {
            node.list_all(ListConnectionsRequest::default())
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let err = msg
        .disconnect(DisconnectRequest {
            user: "x".into(),
            code: 1005,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn placement_locates_and_lists_connections_with_paging() {
    let node = dev_node().await;
    let mut pager = Vec::new();
    for i in 0..5 {
        pager.push(
            node.connect(&format!("/connect?user=pager&namespace=pg&i={i}"))
                .await,
        );
    }
    let _elsewhere = node.connect("/connect?user=pager&namespace=other").await;
    let _someone = node.connect("/connect?user=someone&namespace=pg").await;
    subscribe(&mut pager[0], "t/+").await;
    let located = node.wait_located("pg", "pager", 5).await;
    node.wait_located("", "pager", 6).await;
    let first = node.conn_of(&pager[0]).await;
    node.wait_topics(&first.conn_id, &["t/+"]).await;

    // Every connection is the one its client opened.
    for (i, c) in pager.iter().enumerate() {
        let conn = located
            .iter()
            .find(|x| x.remote_addr == c.local_addr.to_string())
            .unwrap_or_else(|| panic!("client {i} not located: {located:?}"));
        assert_eq!(conn.namespace, "pg");
        assert_eq!(conn.user, "pager");
        assert_eq!(conn.route, "/connect");
        assert!(!conn.node_id.is_empty());
        assert_eq!(conn.params.get("i"), Some(&i.to_string()), "{conn:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((now - conn.connected_at_ms).abs() < 60_000, "{conn:?}");
    }

    let mut client = node.placement().await;
    let mut req = ListConnectionsRequest {
        namespace: "pg".into(),
        user: "pager".into(),
        page_size: 2,
        ..Default::default()
    };
    let mut sizes = Vec::new();
    let mut ids = Vec::new();
    loop {
        let page = client
            .list_connections(req.clone())
            .await
            .unwrap()
            .into_inner();
        sizes.push(page.connections.len());
        ids.extend(page.connections.into_iter().map(|c| c.conn_id));
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(sizes.len() < 10, "paging does not end");
        req.page_token = page.next_page_token;
    }
    assert_eq!(sizes, vec![2, 2, 1]);
    let mut want: Vec<String> = located.iter().map(|c| c.conn_id.clone()).collect();
    want.sort();
    ids.sort();
    assert_eq!(ids, want);

    let list = |f: ListConnectionsRequest| node.list_all(f);
    assert_eq!(
        list(ListConnectionsRequest {
            namespace: "pg".into(),
            ..Default::default()
        })
        .await
        .len(),
        6
    );
    assert_eq!(
        list(ListConnectionsRequest {
            user: "pager".into(),
            ..Default::default()
        })
        .await
        .len(),
        6
    );
    assert_eq!(
        list(ListConnectionsRequest {
            node_id: first.node_id.clone(),
            ..Default::default()
        })
        .await
        .len(),
        7
    );
    assert!(
        list(ListConnectionsRequest {
            node_id: "no-such-node".into(),
            ..Default::default()
        })
        .await
        .is_empty()
    );
    let by_topic = list(ListConnectionsRequest {
        topic: "t/+".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(by_topic.len(), 1);
    assert_eq!(by_topic[0].conn_id, first.conn_id);
    assert_eq!(by_topic[0].topics, vec!["t/+".to_owned()]);
    assert_eq!(by_topic[0].remote_addr, pager[0].local_addr.to_string());
    assert_eq!(by_topic[0].buffered_bytes, 0);
}
