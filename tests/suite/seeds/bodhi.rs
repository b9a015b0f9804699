//! The bodhi gateway (docs/PROTOCOL.md §9 and §10): its
//! `conf/socket.yaml`, as written, is `deploy/examples/bodhi.yaml`, given to every process of
//! a cluster (a real `nats-server`, coordinators and two edges run as the `switchboard`
//! binary). Clients connect as the document's do — `…/connect?namespace=alex` with the
//! JWT in the `ID_TOKEN` cookie, the user in `preferred_username` — and the container's
//! handlers are NATS clients in this test: `socket:connection`, `socket:generalMessage`,
//! `socket:type_one`, `socket:close` answer with `msg.reply(…)` (`{"payload":…}`) or
//! `msg.fail(…)` (`{"error":…}`), and `producer.send('socket:send', …)` /
//! `'socket:broadcast'` are NATS publications of the documented JSON.
//!
//! Every wait is bounded; every process is killed when the test ends, also on failure.

use crate::harness::*;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const SECRET: &str = "seed-bodhi-hs256-secret";
/// bodhi's routing field.
const KEY: &str = "type";

fn id_token(user: &str) -> String {
    hs256(
        &json!({"preferred_username": user, "exp": unix_now() + 600}),
        SECRET,
    )
}

fn cookie(user: &str) -> String {
    format!("ID_TOKEN={}", id_token(user))
}

/// Two edges and `coordinators` coordinators on `deploy/examples/bodhi.yaml` as it is.
async fn example_cluster(coordinators: usize) -> Cluster {
    let spec = Spec::new(2, coordinators).config_file(example("bodhi.yaml"));
    Cluster::launch(spec.jwt_secret(SECRET)).await
}

/// `new WebSocket('wss://…/connect?namespace=<namespace>')` of `user` (cookie `ID_TOKEN`)
/// on edge `edge`; no namespace parameter when `None`.
async fn client(c: &Cluster, edge: usize, user: &str, namespace: Option<&str>) -> Client {
    let path = match namespace {
        Some(ns) => format!("/connect?namespace={ns}"),
        None => "/connect".to_owned(),
    };
    let name = format!("{user}@{}/{}", c.edges[edge].id, namespace.unwrap_or("-"));
    let cookie = cookie(user);
    c.connect_as(edge, &path, &[("cookie", &cookie)], &name)
        .await
}

/// Next frames of `client`, `n` of them, sorted by their JSON text (for frames whose order
/// the document leaves open).
async fn frames(client: &mut Client, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(client.recv().await);
    }
    out.sort_by_key(Value::to_string);
    out
}

// ---------------------------------------------------------------------------------------

/// Handling connections: the `socket:connection` handler reads
/// `context.headers.jwt.preferred_username` and `context.params.namespace`, and
/// `msg.reply({data: […]})` reaches the client as `{type: 'onconnect', payload: {data:
/// […]}}`; `msg.fail` "will send an error and close the socket".
#[tokio::test]
async fn onconnect_reply_and_failure_reach_the_client() {
    let c = example_cluster(1).await;
    let backend = c.backend().await;
    let mut connections = backend.subscribe("socket:connection").await;
    let (seen_tx, mut seen) = tokio::sync::mpsc::channel::<Value>(16);
    let handler = {
        let backend = backend.clone();
        tokio::spawn(async move {
            while let Some(msg) = connections.next().await {
                let body: Value = serde_json::from_slice(&msg.payload).unwrap();
                // The document's handler.
                let username = body["context"]["headers"]["jwt"]["preferred_username"].clone();
                let namespace = body["context"]["params"]["namespace"].clone();
                let answer = if username == "mallory" {
                    json!({"error": {"message": "not allowed"}})
                } else {
                    json!({"payload": {"data": [username, namespace]}})
                };
                backend.reply(&msg, &answer).await;
                let _ = seen_tx.send(body).await;
            }
        })
    };

    let mut alex = client(&c, 0, "alex", Some("alex")).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "onconnect", "payload": {"data": ["alex", "alex"]}})
    );
    let body = bounded("the connection event", seen.recv()).await.unwrap();
    assert_eq!(body["username"], "alex", "{body}");
    assert_eq!(body["namespace"], "alex", "{body}");
    assert_eq!(body["node_id"], "e1", "{body}");
    assert!(
        body["conn_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{body}"
    );

    let mut elsewhere = client(&c, 1, "alex", Some("other")).await;
    assert_eq!(
        elsewhere.recv().await,
        json!({"type": "onconnect", "payload": {"data": ["alex", "other"]}})
    );
    bounded("the connection event", seen.recv()).await.unwrap();

    // `msg.fail`: the error, then the socket closes (1008).
    let mut mallory = client(&c, 1, "mallory", Some("alex")).await;
    let ((code, _), texts) = mallory.close_frame_after_texts().await;
    assert_eq!(
        texts,
        [json!({"type": "error", "payload": {"message": "not allowed"}})]
    );
    assert_eq!(code, 1008);
    bounded("the connection event", seen.recv()).await.unwrap();
    eventually("mallory to leave placement", STEP, async || {
        try_locate(c.grpc(0), "", "mallory")
            .await
            .ok()?
            .is_empty()
            .then_some(())
    })
    .await;

    // The document's curl handshake, header for header (its Host and Origin are this edge).
    let addr = c.ws(0);
    let origin = format!("http://{addr}");
    let good = cookie("alex");
    let curl = |cookie: &str| {
        upgrade_request(
            addr,
            "/connect?namespace=alex",
            &[("Origin", &origin), ("Cookie", cookie)],
        )
    };
    let (status, head) = http_head(addr, &curl(&good)).await.unwrap();
    assert_eq!(status, 101, "{head}");
    bounded("the connection event", seen.recv()).await.unwrap();
    let (status, head) = http_head(addr, &curl("ID_TOKEN=validAuthToken"))
        .await
        .unwrap();
    assert_eq!(status, 401, "the document's placeholder is no JWT: {head}");

    expect_only_marker(&c, &mut alex, KEY).await;
    expect_only_marker(&c, &mut elsewhere, KEY).await;
    handler.abort();
}

/// Handling messages: every message is published on `onmessage.publish`, messages of a
/// listed type also on that type's subject; `msg.reply` comes back typed with the `publish`
/// subject that was answered, `msg.fail` as `{type: 'error', payload: someErrorObject}`
/// without closing the socket. Closing: `socket:close` hears the client leave.
#[tokio::test]
async fn onmessage_and_onclose_reach_their_subjects() {
    let c = example_cluster(1).await;
    let backend = c.backend().await;
    let mut general = backend.subscribe("socket:generalMessage").await;
    let mut type_one = backend.subscribe("socket:type_one").await;
    let mut type_two = backend.subscribe("socket:type_two").await;
    let mut closes = backend.subscribe("socket:close").await;
    let mut alex = client(&c, 0, "alex", Some("alex")).await;

    // A message of type one: both subjects, two replies.
    let one = json!({"type": "message_type_one", "payload": {"x": 1}});
    alex.send(one.clone()).await;
    let (msg, body) = next_json(&mut general).await;
    assert_eq!(body["event"], one, "{body}");
    assert_eq!(
        body["context"]["headers"]["jwt"]["preferred_username"], "alex",
        "{body}"
    );
    assert_eq!(body["context"]["params"]["namespace"], "alex", "{body}");
    backend
        .reply(&msg, &json!({"payload": {"seen": "general"}}))
        .await;
    let (msg, body) = next_json(&mut type_one).await;
    assert_eq!(body["event"], one, "{body}");
    backend
        .reply(&msg, &json!({"payload": {"seen": "one"}}))
        .await;
    assert_eq!(
        frames(&mut alex, 2).await,
        [
            json!({"type": "socket:generalMessage", "payload": {"seen": "general"}}),
            json!({"type": "socket:type_one", "payload": {"seen": "one"}}),
        ]
    );

    // Any other type: the general subject only.
    let other = json!({"type": "something_else", "payload": [1, 2]});
    alex.send(other.clone()).await;
    let (msg, body) = next_json(&mut general).await;
    assert_eq!(body["event"], other, "{body}");
    backend.reply(&msg, &json!({"payload": {}})).await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "socket:generalMessage", "payload": {}})
    );

    // `msg.fail`: an error frame, and the socket stays open.
    alex.send(json!({"type": "something_else", "payload": "bad"}))
        .await;
    let (msg, _) = next_json(&mut general).await;
    backend
        .reply(
            &msg,
            &json!({"error": {"code": 42, "message": "bad input"}}),
        )
        .await;
    assert_eq!(
        alex.recv().await,
        json!({"type": "error", "payload": {"code": 42, "message": "bad input"}})
    );
    let two = json!({"type": "message_type_two", "payload": null});
    alex.send(two.clone()).await;
    let (msg, _) = next_json(&mut general).await;
    backend.reply(&msg, &json!({"payload": "general"})).await;
    let (msg, body) = next_json(&mut type_two).await;
    assert_eq!(body["event"], two, "{body}");
    backend.reply(&msg, &json!({"payload": "two"})).await;
    assert_eq!(
        frames(&mut alex, 2).await,
        [
            json!({"type": "socket:generalMessage", "payload": "general"}),
            json!({"type": "socket:type_two", "payload": "two"}),
        ]
    );
    // The typed subjects heard only their own type: type one's next message is the next one.
    alex.send(one.clone()).await;
    let (msg, _) = next_json(&mut general).await;
    backend.reply(&msg, &json!({"payload": 1})).await;
    let (msg, body) = next_json(&mut type_one).await;
    assert_eq!(body["event"], one, "{body}");
    backend.reply(&msg, &json!({"payload": 2})).await;
    frames(&mut alex, 2).await;
    expect_only_marker(&c, &mut alex, KEY).await;

    // Closing: `socket:close` hears it (fire and forget), with the connection's context.
    let conn_id = c.connection_of(0, &alex).await.conn_id;
    alex.close_code(1000).await;
    let (msg, body) = next_json(&mut closes).await;
    assert_eq!(msg.reply, None, "the close event is not a request");
    assert_eq!(body["conn_id"], conn_id, "{body}");
    assert_eq!(body["username"], "alex", "{body}");
    assert_eq!(body["namespace"], "alex", "{body}");
    assert_eq!(body["context"]["params"]["namespace"], "alex", "{body}");
    assert_eq!(body["code"], 1000, "{body}");
}

/// Alex "opened four connections to the service across two namespaces" (two edges); bob
/// shares one of the namespaces.
struct Sockets {
    alex_in_alex: [Client; 2],
    alex_in_other: [Client; 2],
    bob: Client,
}

async fn four_sockets_of_alex(c: &Cluster) -> Sockets {
    let s = Sockets {
        alex_in_alex: [
            client(c, 0, "alex", Some("alex")).await,
            client(c, 1, "alex", Some("alex")).await,
        ],
        alex_in_other: [
            client(c, 0, "alex", Some("other")).await,
            client(c, 1, "alex", Some("other")).await,
        ],
        bob: client(c, 1, "bob", Some("alex")).await,
    };
    for coord in 0..c.coords.len() {
        c.wait_located(coord, "alex", "alex", 2).await;
        c.wait_located(coord, "other", "alex", 2).await;
        c.wait_located(coord, "alex", "bob", 1).await;
    }
    s
}

/// Sending: `producer.send('socket:send', { username, namespace, type: 'message_type',
/// payload: { someData: relevantData } })` reaches that user's sockets in that namespace
/// and none in another; without a namespace, all of that user's sockets.
#[tokio::test]
async fn send_reaches_the_users_sockets_in_that_namespace_only() {
    let c = example_cluster(2).await;
    let mut s = four_sockets_of_alex(&c).await;
    let backend = c.backend().await;

    backend
        .publish(
            "socket:send",
            &json!({
                "username": "alex",
                "namespace": "alex",
                "type": "message_type",
                "payload": {"someData": "for alex in alex"},
            }),
        )
        .await;
    let want = json!({"type": "message_type", "payload": {"someData": "for alex in alex"}});
    for client in &mut s.alex_in_alex {
        assert_eq!(client.recv().await, want, "{}", client.name);
    }

    // No namespace: every socket of alex (the report says so when asked for one).
    let report = backend
        .request(
            "socket:send",
            &json!({"username": "alex", "type": "message_type", "payload": {"someData": "for every alex"}}),
        )
        .await;
    let want = json!({"type": "message_type", "payload": {"someData": "for every alex"}});
    for client in s.alex_in_alex.iter_mut().chain(&mut s.alex_in_other) {
        // For the sockets in `other`, the first frame: the first send did not leak there.
        assert_eq!(client.recv().await, want, "{}", client.name);
    }
    // Another user in the same namespace got neither; each of alex's sockets got each send
    // once.
    expect_only_marker(&c, &mut s.bob, KEY).await;
    for client in s.alex_in_alex.iter_mut().chain(&mut s.alex_in_other) {
        expect_only_marker(&c, client, KEY).await;
    }
    assert_eq!(
        report,
        json!({"delivered": 4, "refused": 0, "nodes": 2, "unconfirmed": []}),
        "the report of a send to alex's four sockets on two edges"
    );
}

/// Broadcasting: a message on the `broadcast.subscribe` topic reaches every connected
/// client (the document's example publishes to `socket:send` and names `send.broadcast`: a
/// known typo, the intent is `socket:broadcast`); with a namespace, that namespace's.
#[tokio::test]
async fn broadcast_reaches_everyone() {
    let c = example_cluster(2).await;
    let mut s = four_sockets_of_alex(&c).await;
    let backend = c.backend().await;

    let doc = json!({"type": "message_type", "payload": {"someData": "for everyone"}});
    backend.publish("socket:broadcast", &doc).await;
    let mut all: Vec<&mut Client> = s
        .alex_in_alex
        .iter_mut()
        .chain(&mut s.alex_in_other)
        .collect();
    all.push(&mut s.bob);
    for client in &mut all {
        assert_eq!(client.recv().await, doc, "{}", client.name);
    }

    // One namespace only (docs/PROTOCOL.md §10: `{type, payload, namespace?, skip?}`).
    let report = backend
        .request(
            "socket:broadcast",
            &json!({"type": "message_type", "payload": 2, "namespace": "other"}),
        )
        .await;
    assert_eq!(
        report,
        json!({"delivered": 2, "refused": 0, "nodes": 2, "unconfirmed": []})
    );
    for client in &mut s.alex_in_other {
        assert_eq!(
            client.recv().await,
            json!({"type": "message_type", "payload": 2})
        );
    }

    // The typo as written — a broadcast body on the send topic — names nobody: refused, and
    // nothing reaches anyone.
    let report = backend.request("socket:send", &doc).await;
    assert!(report["error"].is_string(), "{report}");
    let mut all: Vec<&mut Client> = s
        .alex_in_alex
        .iter_mut()
        .chain(&mut s.alex_in_other)
        .collect();
    all.push(&mut s.bob);
    for client in all {
        expect_only_marker(&c, client, KEY).await;
    }
}

/// "The container monitors client connections via WebSocket's heartbeat protocol. This will
/// keep idle connections alive … it will close sockets … when a client goes dead": with a
/// short heartbeat (the `route` block replaces the default route, so it repeats bodhi's
/// identity), an idle client that answers pings stays, one that does not is dropped (TCP
/// closed, no close frame) and `socket:close` hears it.
#[tokio::test]
async fn heartbeat_keeps_idle_sockets_and_drops_dead_ones() {
    let yaml = example_variant(
        "bodhi.yaml",
        &[(
            "    broadcast:\n      subscribe: \"socket:broadcast\"\n",
            "    broadcast:\n      subscribe: \"socket:broadcast\"\n    route:\n      auth:\n        \
             hs256_secret_env: SWITCHBOARD_JWT_SECRET\n        user_claim: preferred_username\n      \
             heartbeat: { interval: 300ms, timeout: 300ms }\n",
        )],
    );
    let c = Cluster::launch(Spec::new(2, 1).config_yaml(yaml).jwt_secret(SECRET)).await;
    let backend = c.backend().await;
    let mut closes = backend.subscribe("socket:close").await;
    // Never read until the end: it never answers a ping.
    let dead = client(&c, 0, "dead", Some("alex")).await;
    let mut idle = client(&c, 1, "idle", Some("alex")).await;
    c.wait_located(0, "alex", "dead", 1).await;

    // The idle client only reads (and so answers pings) and sends nothing.
    let mut pings = 0;
    bounded("five heartbeat pings", async {
        while pings < 5 {
            match idle.next_message_within(STEP).await {
                Some(WsMessage::Ping(_)) => pings += 1,
                other => panic!("idle client: expected pings only, got {other:?}"),
            }
        }
    })
    .await;
    // Meanwhile the dead one was dropped, and the close event names it.
    let (msg, body) = next_json(&mut closes).await;
    assert_eq!(msg.subject, "socket:close");
    assert_eq!(body["username"], "dead", "{body}");
    let opcodes = dead.expect_dropped().await;
    assert!(
        opcodes.contains(&0x9),
        "no ping before the drop: {opcodes:x?}"
    );
    eventually("the dead client to leave placement", STEP, async || {
        try_locate(c.grpc(0), "", "dead")
            .await
            .ok()?
            .is_empty()
            .then_some(())
    })
    .await;

    // The idle one is still there, well past interval + timeout.
    backend
        .publish(
            "socket:send",
            &json!({"username": "idle", "namespace": "alex", "type": "still", "payload": pings}),
        )
        .await;
    assert_eq!(idle.recv().await, json!({"type": "still", "payload": 5}));
}

/// "Socket clients are mapped to usernames" from the `ID_TOKEN` cookie: a cookie with a bad
/// token (or none, or one without `preferred_username`) gets HTTP 401; nothing else breaks.
#[tokio::test]
async fn bad_id_token_cookie_gets_401() {
    let c = example_cluster(1).await;
    let mut alex = client(&c, 0, "alex", Some("alex")).await;
    let expired = hs256(
        &json!({"preferred_username": "eve", "exp": unix_now() - 600}),
        SECRET,
    );
    let other_secret = hs256(
        &json!({"preferred_username": "eve", "exp": unix_now() + 600}),
        "not-the-secret",
    );
    let no_username = hs256(&json!({"sub": "eve", "exp": unix_now() + 600}), SECRET);
    let cases = [
        ("garbage", Some("ID_TOKEN=garbage".to_owned())),
        (
            "signed with another secret",
            Some(format!("ID_TOKEN={other_secret}")),
        ),
        ("expired", Some(format!("ID_TOKEN={expired}"))),
        (
            "without preferred_username",
            Some(format!("ID_TOKEN={no_username}")),
        ),
        (
            "in another cookie",
            Some(format!("OTHER={}", id_token("eve"))),
        ),
        ("no cookie", None),
    ];
    for edge in [0, 1] {
        for (what, cookie) in &cases {
            let headers: Vec<(&str, &str)> = cookie
                .as_deref()
                .map(|c| vec![("cookie", c)])
                .unwrap_or_default();
            let refused = c
                .try_connect(edge, "/connect?namespace=alex", &headers)
                .await
                .err()
                .unwrap_or_else(|| panic!("a token {what} opened a socket"));
            assert_eq!(refused.status, 401, "a token {what}: {refused:?}");
        }
    }
    assert!(try_locate(c.grpc(0), "", "eve").await.unwrap().is_empty());
    // The good cookie among others still works, on either edge.
    let mixed = format!("theme=dark; {}; lang=en", cookie("bob"));
    let mut bob = c
        .connect_as(
            1,
            "/connect?namespace=alex",
            &[("cookie", &mixed)],
            "bob@e2",
        )
        .await;
    expect_only_marker(&c, &mut bob, KEY).await;
    expect_only_marker(&c, &mut alex, KEY).await;
}
