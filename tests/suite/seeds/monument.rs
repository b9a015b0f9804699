//! monument (docs/PROTOCOL.md §9): its documented client
//! frames replayed, exactly as the document writes them, against a cluster (a real
//! `nats-server`, one coordinator and two edges run as the `switchboard` binary) configured
//! with `deploy/examples/monument.yaml` (or a variant of it for the other
//! `config.webSocket` settings). The backends are NATS clients in this test: a data-style
//! backend answers the request on the subject the event names, a passthrough backend hears
//! the publication and answers the socket with `Messaging.Send` or the send subject.
//!
//! Every wait is bounded; every process is killed when the test ends, also on failure.

use crate::harness::*;
use proto::v1::SendRequest;
use serde_json::{Value, json};

const SECRET: &str = "seed-monument-hs256-secret";
/// monument's routing field.
const KEY: &str = "event";

/// Two edges and a coordinator on `config`.
async fn cluster(config: Spec) -> Cluster {
    Cluster::launch(config.jwt_secret(SECRET)).await
}

/// Two edges and a coordinator on `deploy/examples/monument.yaml` as it is.
async fn example_cluster() -> Cluster {
    cluster(Spec::example("monument.yaml")).await
}

/// `user`'s socket on edge `edge` at `path`, with a token as the example's auth block wants.
async fn client(c: &Cluster, edge: usize, path: &str, user: &str) -> Client {
    let auth = bearer(&user_token(user, SECRET));
    let name = format!("{user}@{}{path}", c.edges[edge].id);
    c.connect_as(edge, path, &[("authorization", &auth)], &name)
        .await
}

/// The frame as the document writes it (a JS object literal), as JSON text.
fn frame(v: &Value) -> String {
    v.to_string()
}

// ---------------------------------------------------------------------------------------

/// "data style events follow a pattern of emitting an event like `data:get:this-item` and
/// listening to a response on `data:set:this-item` … any event with `:get:` in it".
#[tokio::test]
async fn data_style_get_is_answered_on_the_matching_set_event() {
    let c = example_cluster().await;
    let backend = c.backend().await;
    let mut this_item = backend.subscribe("data:get:this-item").await;
    let mut profiles = backend.subscribe("user:get:profile").await;
    let mut ann = client(&c, 0, "/connect", "ann").await;
    let mut ben = client(&c, 1, "/connect", "ben").await;

    // Both edges ask; each reply goes back to the socket that asked, on the `:set:` event.
    let doc = json!({"event": "data:get:this-item"});
    ann.send_text(&frame(&doc)).await;
    let (msg, body) = next_json(&mut this_item).await;
    assert!(msg.reply.is_some(), "a data-style event is a request");
    assert_eq!(body["message"], doc, "{body}");
    assert_eq!(body["socket"]["username"], "ann", "{body}");
    assert_eq!(body["socket"]["node_id"], "e1", "{body}");
    backend
        .reply(
            &msg,
            &json!({"id": "this-item", "title": "This item", "count": 3}),
        )
        .await;
    assert_eq!(
        ann.recv().await,
        json!({"event": "data:set:this-item", "id": "this-item", "title": "This item", "count": 3})
    );

    ben.send_text(&frame(&doc)).await;
    let (msg, body) = next_json(&mut this_item).await;
    assert_eq!(body["socket"]["username"], "ben", "{body}");
    assert_eq!(body["socket"]["node_id"], "e2", "{body}");
    backend.reply(&msg, &json!({"for": "ben"})).await;
    assert_eq!(
        ben.recv().await,
        json!({"event": "data:set:this-item", "for": "ben"})
    );

    // Any event with `:get:` in it, whatever comes before and after.
    ann.send_text(r#"{"event":"user:get:profile","id":7}"#)
        .await;
    let (msg, body) = next_json(&mut profiles).await;
    assert_eq!(
        body["message"],
        json!({"event": "user:get:profile", "id": 7})
    );
    // A reply that names an event itself still answers on the `:set:` event.
    backend
        .reply(&msg, &json!({"event": "ignored", "name": "Ann"}))
        .await;
    assert_eq!(
        ann.recv().await,
        json!({"event": "user:set:profile", "name": "Ann"})
    );

    // A backend failing the request: an error frame, and the socket goes on.
    ann.send_text(&frame(&doc)).await;
    let (msg, _) = next_json(&mut this_item).await;
    backend.reply(&msg, &json!({"error": "not found"})).await;
    let v = ann.recv().await;
    assert_eq!(v, json!({"event": "error", "payload": "not found"}));
    ann.send_text(&frame(&doc)).await;
    let (msg, _) = next_json(&mut this_item).await;
    backend.reply(&msg, &json!({"again": true})).await;
    assert_eq!(
        ann.recv().await,
        json!({"event": "data:set:this-item", "again": true})
    );

    // Nobody else heard any of it.
    expect_only_marker(&c, &mut ann, KEY).await;
    expect_only_marker(&c, &mut ben, KEY).await;
}

/// Passthrough: "The web socket server will then emit `authorize:user` passing it: {message:
/// {…}, socket: {}}", and the backend "would just respond to the socket".
#[tokio::test]
async fn passthrough_event_reaches_the_backend_with_its_socket_and_the_answer_goes_back() {
    let c = example_cluster().await;
    let backend = c.backend().await;
    let mut authorize = backend.subscribe("authorize:user").await;
    let mut some_event = backend.subscribe("some-event-name").await;
    let mut ann = client(&c, 0, "/connect", "ann").await;
    let mut ben = client(&c, 1, "/connect", "ben").await;
    c.wait_located(0, "default", "ann", 1).await;
    c.wait_located(0, "default", "ben", 1).await;

    // The message structure: `{ event: 'some-event-name' }`, nothing else required.
    ann.send_text(r#"{"event":"some-event-name"}"#).await;
    let (msg, body) = next_json(&mut some_event).await;
    assert_eq!(
        msg.reply, None,
        "a passthrough event is published, not a request"
    );
    assert_eq!(body["message"], json!({"event": "some-event-name"}));
    assert_eq!(body["socket"]["username"], "ann", "{body}");

    // The document's example, exactly.
    let doc = r#"{"event":"authorize:user","credentialsObj":{"token":"abcd"}}"#;
    ben.send_text(doc).await;
    let (msg, payload) = next_json(&mut authorize).await;
    assert_eq!(
        msg.reply, None,
        "a passthrough event is published, not a request"
    );
    let keys: Vec<&String> = payload.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["message", "socket"], "{payload}");
    assert_eq!(
        payload["message"],
        serde_json::from_str::<Value>(doc).unwrap(),
        "the message is the client's frame as it was sent"
    );
    let socket = &payload["socket"];
    assert_eq!(socket["username"], "ben", "{socket}");
    assert_eq!(socket["namespace"], "default", "{socket}");
    assert_eq!(socket["node_id"], "e2", "{socket}");
    assert_eq!(socket["route"], "/connect", "{socket}");
    assert_eq!(
        socket["remote_addr"],
        ben.local_addr.to_string(),
        "{socket}"
    );
    assert_eq!(socket["claims"]["sub"], "ben", "{socket}");
    let conn_id = socket["conn_id"].as_str().unwrap().to_owned();
    assert!(!conn_id.is_empty(), "{socket}");

    // The document's handler: `payload.socket ? payload.message.credentialsObj : payload`,
    // then it responds to the socket: here with Messaging.Send to the socket's conn_id …
    let credentials = if payload["socket"].is_object() {
        &payload["message"]["credentialsObj"]
    } else {
        &payload
    };
    let check = json!({"authorized": credentials["token"] == "abcd"});
    let r = send_request(
        c.grpc(0),
        SendRequest {
            conn_id: conn_id.clone(),
            r#type: "authorize:user".into(),
            payload_json: check.to_string(),
            ..SendRequest::default()
        },
    )
    .await;
    assert_eq!((r.delivered, r.refused, r.nodes), (1, 0, 1), "{r:?}");
    assert_eq!(
        ben.recv().await,
        json!({"event": "authorize:user", "payload": {"authorized": true}})
    );
    // … or through the send subject, with a delivery report.
    let report = backend
        .request(
            "sb.send",
            &json!({"conn_id": conn_id, "type": "authorize:user", "payload": {"authorized": "again"}}),
        )
        .await;
    assert_eq!(
        report,
        json!({"delivered": 1, "refused": 0, "nodes": 1, "unconfirmed": []}),
        "report of the send subject"
    );
    assert_eq!(
        ben.recv().await,
        json!({"event": "authorize:user", "payload": {"authorized": "again"}})
    );

    // Nothing went to the other socket, and nothing more to this one.
    expect_only_marker(&c, &mut ann, KEY).await;
    expect_only_marker(&c, &mut ben, KEY).await;
}

/// "If your web socket message does not contain an event … then it will be ignored and not
/// passed on": no error frame, counted in `edge_events_ignored_total`, the socket works on.
#[tokio::test]
async fn frames_without_an_event_are_ignored_counted_and_not_passed_on() {
    // "no_responders" is true only when nobody at all listens: no monitoring tap here.
    let spec = Spec::example("monument.yaml").without_tap();
    let c = cluster(spec).await;
    let backend = c.backend().await;
    let mut this_item = backend.subscribe("data:get:this-item").await;
    let mut ann = client(&c, 1, "/connect", "ann").await;

    // No backend for a data-style event: an error frame (not ignored), and the socket goes on.
    ann.send_text(r#"{"event":"nobody:get:this"}"#).await;
    let v = ann.recv().await;
    assert_eq!(
        (&v["event"], &v["code"]),
        (&json!("error"), &json!("no_responders")),
        "{v}"
    );

    // Everything published from here on (while this listens, a request to a subject without
    // a backend no longer fails fast: keep such requests out of this part).
    let spy = c.backend().await;
    let mut everything = spy.subscribe_everything().await;
    let before = c.edge_metric(1, "edge_events_ignored_total").await;

    let ignored = [
        r#"{"data":1}"#,
        r#"{}"#,
        r#"{"Event":"data:get:this-item"}"#,
        r#"{"event":5}"#,
        r#"{"event":null}"#,
        r#"["data:get:this-item"]"#,
        "not json",
    ];
    for text in ignored {
        ann.send_text(text).await;
    }
    // The next frame this socket gets is the answer to the next event: nothing came for the
    // ignored ones.
    ann.send_text(r#"{"event":"data:get:this-item"}"#).await;
    let (msg, _) = next_json(&mut this_item).await;
    backend.reply(&msg, &json!({"ok": true})).await;
    assert_eq!(
        ann.recv().await,
        json!({"event": "data:set:this-item", "ok": true})
    );
    let after = c.edge_metric(1, "edge_events_ignored_total").await;
    assert_eq!(
        after - before,
        ignored.len() as u64,
        "edge_events_ignored_total of e2"
    );
    assert_eq!(
        c.edge_metric(0, "edge_events_ignored_total").await,
        0,
        "e1 ignored nothing"
    );

    // Not passed on: the only application subject anything was published on is the event's.
    let marker = format!("marker.{}", ulid::Ulid::new());
    spy.publish(&marker, &json!(null)).await;
    let app: Vec<String> = subjects_until(&mut everything, &marker)
        .await
        .into_iter()
        .filter(|s| !s.starts_with("sb.") && !s.starts_with("_INBOX") && !s.starts_with('$'))
        .collect();
    assert_eq!(app, ["data:get:this-item"]);

    expect_only_marker(&c, &mut ann, KEY).await;
}

/// An event names a bus subject; a client may not name what Switchboard and NATS keep for
/// themselves (or a wildcard): an `error` frame with code `invalid_event`, nothing published.
#[tokio::test]
async fn events_naming_reserved_subjects_get_invalid_event() {
    let c = example_cluster().await;
    let mut ann = client(&c, 0, "/connect", "ann").await;
    let mut ben = client(&c, 1, "/connect", "ben").await;
    c.wait_located(0, "default", "ben", 1).await;
    let backend = c.backend().await;
    let mut this_item = backend.subscribe("data:get:this-item").await;
    let before = sub_counts(connection(&c.connz().await, "e2"));

    let reserved = [
        "sb.node.e2",
        "sb.edges",
        "sb.node.e2:get:x",
        "_INBOX.x",
        "_INBOX.x:get:y",
        "$JS.API.STREAM.LIST",
        "$SYS.REQ.SERVER.PING",
        "a.*",
        "data:get:>",
        "two words",
        "",
    ];
    for (i, event) in reserved.iter().enumerate() {
        ann.send(json!({"event": event, "id": i})).await;
        let v = ann.recv().await;
        assert_eq!(v["event"], "error", "{event:?}: {v}");
        assert_eq!(v["code"], "invalid_event", "{event:?}: {v}");
        assert_eq!(v["id"], i, "{event:?}: {v}");
        assert!(v["message"].is_string(), "{event:?}: {v}");
    }

    // Nothing reached e2's own subjects (its node subject hears commands only).
    let after = sub_counts(connection(&c.connz().await, "e2"));
    for subject in ["sb.node.e2", "sb.edges"] {
        assert_eq!(
            before.get(subject),
            after.get(subject),
            "e2 got a message on {subject} from a client's event"
        );
    }
    // The socket works on, and so does the other one.
    ann.send_text(r#"{"event":"data:get:this-item"}"#).await;
    let (msg, _) = next_json(&mut this_item).await;
    backend.reply(&msg, &json!({"ok": 1})).await;
    assert_eq!(
        ann.recv().await,
        json!({"event": "data:set:this-item", "ok": 1})
    );
    expect_only_marker(&c, &mut ben, KEY).await;
    expect_only_marker(&c, &mut ann, KEY).await;
}

/// "`false` which turns off the web socket server; `true` … `data` and `passthrough` …;
/// `data` … only for `data` style handling; `passthrough` … only for `passthrough` style
/// handling. Any other value … will be treated as `true` … The default setting is `false`."
#[tokio::test]
async fn each_websocket_setting_turns_on_what_the_document_says() {
    let c = cluster(Spec::new(2, 1).config_file(seed_fixture("monument-modes.yaml"))).await;
    let auth = bearer(&user_token("ann", SECRET));
    for edge in [0, 1] {
        for path in ["/off", "/unset"] {
            let refused = c
                .try_connect(edge, path, &[("authorization", &auth)])
                .await
                .err()
                .unwrap_or_else(|| panic!("{path} on e{} opened a socket", edge + 1));
            assert_eq!(refused.status, 404, "{path}: {refused:?}");
        }
    }
    // The monument example itself says `monument: true`; `false` in it turns it off.
    let off = example_variant("monument.yaml", &[("monument: true", "monument: false")]);
    let c_off = cluster(Spec::new(1, 1).config_yaml(off)).await;
    let refused = c_off
        .try_connect(0, "/connect", &[("authorization", &auth)])
        .await
        .expect_err("monument: false opened a socket");
    assert_eq!(refused.status, 404, "{refused:?}");
    drop(c_off);

    let backend = c.backend().await;
    let mut authorize = backend.subscribe("authorize:user").await;
    let mut this_item = backend.subscribe("data:get:this-item").await;
    let passthrough_frame = r#"{"event":"authorize:user","credentialsObj":{"token":"abcd"}}"#;
    let data_frame = r#"{"event":"data:get:this-item"}"#;

    // `data`: data-style works; a passthrough event is ignored (counted, not published).
    let mut data = client(&c, 0, "/data", "dana").await;
    let ignored_before = c.edge_metric(0, "edge_events_ignored_total").await;
    data.send_text(passthrough_frame).await;
    data.send_text(data_frame).await;
    let (msg, body) = next_json(&mut this_item).await;
    assert!(msg.reply.is_some());
    assert_eq!(body["socket"]["route"], "/data", "{body}");
    backend.reply(&msg, &json!({"mode": "data"})).await;
    assert_eq!(
        data.recv().await,
        json!({"event": "data:set:this-item", "mode": "data"})
    );
    assert_eq!(
        c.edge_metric(0, "edge_events_ignored_total").await - ignored_before,
        1,
        "the passthrough event on the data route is counted as ignored"
    );

    // `passthrough`: a passthrough event is published; a `:get:` event is published as a
    // passthrough event too (no request, no `:set:` answer).
    let mut pass = client(&c, 1, "/passthrough", "pat").await;
    pass.send_text(passthrough_frame).await;
    let (msg, body) = next_json(&mut authorize).await;
    assert_eq!(msg.reply, None);
    assert_eq!(
        body["socket"]["route"], "/passthrough",
        "the first passthrough event the backend hears is the passthrough route's: the data \
         route's was not passed on: {body}"
    );
    assert_eq!(
        body["message"],
        serde_json::from_str::<Value>(passthrough_frame).unwrap()
    );
    pass.send_text(data_frame).await;
    let (msg, body) = next_json(&mut this_item).await;
    assert_eq!(
        msg.reply, None,
        "on a passthrough route a :get: event is published, not requested"
    );
    assert_eq!(
        body["message"],
        serde_json::from_str::<Value>(data_frame).unwrap()
    );
    assert_eq!(body["socket"]["route"], "/passthrough", "{body}");
    assert_eq!(body["socket"]["username"], "pat", "{body}");
    expect_only_marker(&c, &mut pass, KEY).await;

    // `true` and any other value: both styles.
    for (edge, path, user) in [(0, "/both", "bo"), (1, "/other", "otto")] {
        let mut both = client(&c, edge, path, user).await;
        both.send_text(data_frame).await;
        let (msg, body) = next_json(&mut this_item).await;
        assert!(
            msg.reply.is_some(),
            "{path}: a data-style event is a request"
        );
        assert_eq!(body["socket"]["route"], path, "{body}");
        backend.reply(&msg, &json!({"route": path})).await;
        assert_eq!(
            both.recv().await,
            json!({"event": "data:set:this-item", "route": path})
        );
        both.send_text(passthrough_frame).await;
        let (msg, body) = next_json(&mut authorize).await;
        assert_eq!(msg.reply, None, "{path}");
        assert_eq!(body["socket"]["route"], path, "{body}");
        expect_only_marker(&c, &mut both, KEY).await;
    }
    expect_only_marker(&c, &mut data, KEY).await;
}
