//! MonoRail / RackHD (docs/PROTOCOL.md §9): its
//! `handler`-keyed messages, exactly as the design writes them (`{handler: init}`, `{handler:
//! query, type: resource, params: Object}`, …), sent to `ws://host:port/<channel>` on a
//! cluster (a real `nats-server`, one coordinator and two edges run as the `switchboard`
//! binary) configured with `deploy/examples/monorail.yaml`. The backend side — the database
//! and the message bus of the design — is played by this test: `Resources.Put`/`Delete` on a
//! coordinator, direct writes to the JetStream key-value bucket, and NATS publications on a
//! topic resource's subject. Watchers sit on the other edge than the one a query runs on.
//!
//! Every wait is bounded; every process is killed when the test ends, also on failure.

use crate::harness::*;
use bytes::Bytes;
use proto::v1::{BroadcastRequest, DeleteRequest, PutRequest};
use serde_json::{Value, json};

/// MonoRail's routing field.
const KEY: &str = "handler";

/// Two edges and a coordinator on `deploy/examples/monorail.yaml` as it is.
async fn example_cluster() -> Cluster {
    Cluster::launch(Spec::example("monorail.yaml")).await
}

/// `user`'s socket on edge `edge`, on channel `channel` (`ws://host:port/<channel>`).
async fn client(c: &Cluster, edge: usize, channel: &str, user: &str) -> Client {
    let path = format!("/{channel}?user={user}");
    let name = format!("{user}@{}/{channel}", c.edges[edge].id);
    c.connect_as(edge, &path, &[], &name).await
}

/// `Resources.Put` through coordinator 0.
async fn put(c: &Cluster, resource: &str, item: &Value) {
    let mut client = resources(c.grpc(0)).await;
    let req = PutRequest {
        resource: resource.into(),
        item_json: item.to_string(),
        ..PutRequest::default()
    };
    bounded("Resources.Put", client.put(req))
        .await
        .unwrap_or_else(|s| panic!("Resources.Put {resource} {item}: {s}"));
}

/// `Resources.Delete` through coordinator 0.
async fn delete(c: &Cluster, resource: &str, id: &str) {
    let mut client = resources(c.grpc(0)).await;
    let req = DeleteRequest {
        resource: resource.into(),
        id: id.into(),
    };
    bounded("Resources.Delete", client.delete(req))
        .await
        .unwrap_or_else(|s| panic!("Resources.Delete {resource} {id}: {s}"));
}

/// A `list` frame with its items in id order (the design leaves the order open).
fn sorted(mut list: Value) -> Value {
    if let Some(items) = list["items"].as_array_mut() {
        items.sort_by(|a, b| a["id"].to_string().cmp(&b["id"].to_string()));
    }
    list
}

/// The session id `{handler: init}` gives this socket.
async fn init(client: &mut Client) -> String {
    client.send_text(r#"{"handler":"init"}"#).await;
    let v = client.recv().await;
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["handler", "id"], "{v}");
    assert_eq!(v["handler"], "session", "{v}");
    let id = v["id"].as_str().unwrap_or_else(|| panic!("{v}")).to_owned();
    assert!(!id.is_empty(), "{v}");
    id
}

fn node(id: &str, ty: &str, name: &str) -> Value {
    json!({"id": id, "type": ty, "name": name})
}

// ---------------------------------------------------------------------------------------

/// `init` → `session`; `query` → `list` of the items whose fields equal the params; `all`
/// → `list`; `get` → `item`, or `remove` for an id that is not there.
#[tokio::test]
async fn init_query_all_and_get_as_the_design_writes_them() {
    let c = example_cluster().await;
    put(&c, "nodes", &node("node-1", "compute", "alpha")).await;
    put(&c, "nodes", &node("node-2", "switch", "beta")).await;
    put(&c, "nodes", &node("node-3", "compute", "gamma")).await;
    let mut rack = client(&c, 1, "rackhd", "operator").await;

    let session = init(&mut rack).await;
    assert_eq!(init(&mut rack).await, session, "one id per connection");

    rack.send_text(r#"{"handler":"query","type":"nodes","params":{"type":"compute"}}"#)
        .await;
    assert_eq!(
        sorted(rack.recv().await),
        json!({"handler": "list", "type": "nodes", "items": [
            node("node-1", "compute", "alpha"), node("node-3", "compute", "gamma"),
        ]})
    );
    rack.send_text(
        r#"{"handler":"query","type":"nodes","params":{"type":"compute","name":"gamma"}}"#,
    )
    .await;
    assert_eq!(
        rack.recv().await,
        json!({"handler": "list", "type": "nodes", "items": [node("node-3", "compute", "gamma")]})
    );
    rack.send_text(r#"{"handler":"query","type":"nodes","params":{"type":"router"}}"#)
        .await;
    assert_eq!(
        rack.recv().await,
        json!({"handler": "list", "type": "nodes", "items": []})
    );

    rack.send_text(r#"{"handler":"all","type":"nodes"}"#).await;
    assert_eq!(
        sorted(rack.recv().await),
        json!({"handler": "list", "type": "nodes", "items": [
            node("node-1", "compute", "alpha"),
            node("node-2", "switch", "beta"),
            node("node-3", "compute", "gamma"),
        ]})
    );
    // A configured type nobody wrote yet: an empty list.
    rack.send_text(r#"{"handler":"all","type":"skus"}"#).await;
    assert_eq!(
        rack.recv().await,
        json!({"handler": "list", "type": "skus", "items": []})
    );

    rack.send_text(r#"{"handler":"get","type":"nodes","params":{"id":"node-2"}}"#)
        .await;
    assert_eq!(
        rack.recv().await,
        json!({"handler": "item", "type": "nodes", "data": node("node-2", "switch", "beta")})
    );
    rack.send_text(r#"{"handler":"get","type":"nodes","params":{"id":"node-9"}}"#)
        .await;
    assert_eq!(
        rack.recv().await,
        json!({"handler": "remove", "type": "nodes", "params": {"id": "node-9"}})
    );
    expect_only_marker(&c, &mut rack, KEY).await;
}

/// `watch` → `list`, then `item`/`remove` as a backend on the other side writes (through a
/// coordinator's `Resources`, or straight into the NATS key-value bucket), until `stop`.
#[tokio::test]
async fn watch_follows_every_backend_write_until_stop() {
    let c = example_cluster().await;
    put(&c, "nodes", &node("node-1", "compute", "alpha")).await;
    put(&c, "catalogs", &json!({"id": "cat-1", "node": "node-1"})).await;
    let backend = c.backend().await;
    // The buckets exist now (made by the product); a backend writes them directly.
    let js = backend.jetstream();
    let nodes_kv = bounded("get the nodes bucket", js.get_key_value("nodes"))
        .await
        .unwrap();

    let mut all = client(&c, 0, "rackhd", "all").await;
    let mut compute = client(&c, 1, "rackhd", "compute").await;
    all.send_text(r#"{"handler":"watch","type":"nodes","params":{}}"#)
        .await;
    assert_eq!(
        all.recv().await,
        json!({"handler": "list", "type": "nodes", "items": [node("node-1", "compute", "alpha")]})
    );
    all.send_text(r#"{"handler":"watch","type":"catalogs","params":{}}"#)
        .await;
    assert_eq!(
        all.recv().await,
        json!({"handler": "list", "type": "catalogs", "items": [{"id": "cat-1", "node": "node-1"}]})
    );
    compute
        .send_text(r#"{"handler":"watch","type":"nodes","params":{"type":"compute"}}"#)
        .await;
    assert_eq!(
        compute.recv().await,
        json!({"handler": "list", "type": "nodes", "items": [node("node-1", "compute", "alpha")]})
    );

    let item = |data: Value| json!({"handler": "item", "type": "nodes", "data": data});
    let remove = |id: &str| json!({"handler": "remove", "type": "nodes", "params": {"id": id}});

    // Through the coordinator: a switch (not for the compute watcher).
    put(&c, "nodes", &node("node-2", "switch", "beta")).await;
    assert_eq!(all.recv().await, item(node("node-2", "switch", "beta")));
    // Straight into the bucket: a compute node (for both).
    let n3 = node("node-3", "compute", "gamma");
    bounded(
        "KV put",
        nodes_kv.put("node-3", Bytes::from(n3.to_string())),
    )
    .await
    .unwrap();
    assert_eq!(all.recv().await, item(n3.clone()));
    assert_eq!(
        compute.recv().await,
        item(n3),
        "the compute watcher's next change is node-3: node-2 did not match its params"
    );
    // node-1 stops matching the compute watcher: an item for one, a remove for the other.
    put(&c, "nodes", &node("node-1", "switch", "alpha")).await;
    assert_eq!(all.recv().await, item(node("node-1", "switch", "alpha")));
    assert_eq!(compute.recv().await, remove("node-1"));
    // Deletes: through the coordinator, and straight in the bucket.
    delete(&c, "nodes", "node-2").await;
    assert_eq!(all.recv().await, remove("node-2"));
    bounded("KV delete", nodes_kv.delete("node-3"))
        .await
        .unwrap();
    assert_eq!(all.recv().await, remove("node-3"));
    assert_eq!(
        compute.recv().await,
        remove("node-3"),
        "the compute watcher heard nothing of node-2's delete"
    );

    // `stop`: no answer, and no more node changes — while the catalogs watch goes on.
    all.send_text(r#"{"handler":"stop","type":"nodes","params":{}}"#)
        .await;
    // The socket has read the stop once it answers the next frame.
    init(&mut all).await;
    put(&c, "nodes", &node("node-4", "compute", "delta")).await;
    assert_eq!(
        compute.recv().await,
        item(node("node-4", "compute", "delta"))
    );
    put(&c, "catalogs", &json!({"id": "cat-2", "node": "node-4"})).await;
    assert_eq!(
        all.recv().await,
        json!({"handler": "item", "type": "catalogs", "data": {"id": "cat-2", "node": "node-4"}}),
        "after stop, the node change must not reach the socket; the catalog change must"
    );
    // `stop` of something not watched: no answer either.
    all.send_text(r#"{"handler":"stop","type":"skus","params":{}}"#)
        .await;
    expect_only_marker(&c, &mut all, KEY).await;
    expect_only_marker(&c, &mut compute, KEY).await;
}

/// A resource type pointing to a bus topic (the design's RabbitMQ workflow logs): `watch`
/// → an empty `list`, then an `item` per message; `query`, `all` and `get` are not for it
/// and answer an `error` frame that says so.
#[tokio::test]
async fn topic_resources_are_watched_not_queried() {
    let c = example_cluster().await;
    let backend = c.backend().await;
    let mut all = client(&c, 0, "logs", "all").await;
    let mut w2 = client(&c, 1, "logs", "w2").await;
    all.send_text(r#"{"handler":"watch","type":"workflow-logs","params":{}}"#)
        .await;
    assert_eq!(
        all.recv().await,
        json!({"handler": "list", "type": "workflow-logs", "items": []})
    );
    all.send_text(r#"{"handler":"watch","type":"workflow-state","params":{}}"#)
        .await;
    assert_eq!(
        all.recv().await,
        json!({"handler": "list", "type": "workflow-state", "items": []})
    );
    w2.send_text(r#"{"handler":"watch","type":"workflow-logs","params":{"workflow":"w2"}}"#)
        .await;
    assert_eq!(
        w2.recv().await,
        json!({"handler": "list", "type": "workflow-logs", "items": []})
    );

    let line = |workflow: &str, text: &str| json!({"workflow": workflow, "line": text});
    let item = |data: Value| json!({"handler": "item", "type": "workflow-logs", "data": data});
    backend
        .publish("sb.resource.workflow-logs", &line("w1", "started"))
        .await;
    backend
        .publish("sb.resource.workflow-logs", &line("w2", "started"))
        .await;
    assert_eq!(all.recv().await, item(line("w1", "started")));
    assert_eq!(all.recv().await, item(line("w2", "started")));
    assert_eq!(
        w2.recv().await,
        item(line("w2", "started")),
        "only w2's lines reach the watcher with params {{workflow: w2}}"
    );

    for verb in [
        r#"{"handler":"query","type":"workflow-logs","params":{"workflow":"w1"}}"#,
        r#"{"handler":"all","type":"workflow-logs"}"#,
        r#"{"handler":"get","type":"workflow-logs","params":{"id":"1"}}"#,
    ] {
        w2.send_text(verb).await;
        let v = w2.recv().await;
        assert_eq!(v["handler"], "error", "{verb}: {v}");
        assert_eq!(v["code"], "not_supported", "{verb}: {v}");
        assert_eq!(v["type"], "workflow-logs", "{verb}: {v}");
        let sent: Value = serde_json::from_str(verb).unwrap();
        assert_eq!(
            v["params"],
            sent.get("params").cloned().unwrap_or(json!({})),
            "{verb}: {v}"
        );
        assert!(v["message"].is_string(), "{verb}: {v}");
    }

    // `stop` on the logs: the state topic still comes through, the logs no more.
    all.send_text(r#"{"handler":"stop","type":"workflow-logs","params":{}}"#)
        .await;
    init(&mut all).await;
    backend
        .publish("sb.resource.workflow-logs", &line("w2", "done"))
        .await;
    backend
        .publish(
            "sb.resource.workflow-state",
            &json!({"workflow": "w2", "state": "done"}),
        )
        .await;
    assert_eq!(w2.recv().await, item(line("w2", "done")));
    assert_eq!(
        all.recv().await,
        json!({"handler": "item", "type": "workflow-state", "data": {"workflow": "w2", "state": "done"}}),
        "after stop, the log line must not reach the socket; the state change must"
    );
    expect_only_marker(&c, &mut all, KEY).await;
    expect_only_marker(&c, &mut w2, KEY).await;
}

/// Wrong input: an unknown handler, a resource type that is not configured, a `get`
/// without params, bad params, a frame without a handler, text that is not JSON. Each gets
/// an `error` frame with its code, and the connection keeps working.
#[tokio::test]
async fn wrong_input_gets_the_documented_error_and_the_socket_keeps_working() {
    let c = example_cluster().await;
    put(&c, "nodes", &node("node-1", "compute", "alpha")).await;
    let mut rack = client(&c, 0, "rackhd", "operator").await;
    let mut other = client(&c, 1, "rackhd", "other").await;
    let session = init(&mut rack).await;
    let cases = [
        (r#"{"handler":"bogus"}"#, "unknown_verb", None),
        (r#"{"handler":"list","type":"nodes"}"#, "unknown_verb", None),
        (
            r#"{"handler":"query","type":"pods","params":{}}"#,
            "unknown_resource",
            Some(("pods", json!({}))),
        ),
        (
            r#"{"handler":"watch","type":"pods","params":{"id":"1"}}"#,
            "unknown_resource",
            Some(("pods", json!({"id": "1"}))),
        ),
        (
            r#"{"handler":"get","type":"nodes"}"#,
            "invalid_frame",
            Some(("nodes", json!({}))),
        ),
        (
            r#"{"handler":"get","type":"nodes","params":{}}"#,
            "invalid_frame",
            Some(("nodes", json!({}))),
        ),
        (
            r#"{"handler":"query","type":"nodes","params":"compute"}"#,
            "invalid_frame",
            Some(("nodes", json!("compute"))),
        ),
        (r#"{"type":"nodes"}"#, "missing_type", None),
        (r#"{"handler":7}"#, "missing_type", None),
        ("not json", "invalid_json", None),
    ];
    for (text, code, resource) in cases {
        rack.send_text(text).await;
        let v = rack.recv().await;
        assert_eq!(v["handler"], "error", "{text}: {v}");
        assert_eq!(v["code"], code, "{text}: {v}");
        assert!(v["message"].is_string(), "{text}: {v}");
        if let Some((ty, params)) = resource {
            assert_eq!(
                (&v["type"], &v["params"]),
                (&json!(ty), &params),
                "{text}: {v}"
            );
        }
        // The same connection, still served.
        assert_eq!(init(&mut rack).await, session, "after {text}");
    }
    rack.send_text(r#"{"handler":"get","type":"nodes","params":{"id":"node-1"}}"#)
        .await;
    assert_eq!(
        rack.recv().await,
        json!({"handler": "item", "type": "nodes", "data": node("node-1", "compute", "alpha")})
    );
    expect_only_marker(&c, &mut rack, KEY).await;
    expect_only_marker(&c, &mut other, KEY).await;
}

/// The design's error frame is `{handler: error, type: resource, params: Object}`: an unknown
/// handler naming a resource type and params gets them back, like every other error.
#[tokio::test]
async fn unknown_handler_error_carries_the_type_and_params_it_was_sent() {
    let c = example_cluster().await;
    let mut rack = client(&c, 0, "rackhd", "operator").await;
    rack.send_text(r#"{"handler":"bogus","type":"nodes","params":{"id":"node-1"}}"#)
        .await;
    let v = rack.recv().await;
    assert_eq!(v["handler"], "error", "{v}");
    assert_eq!(v["code"], "unknown_verb", "{v}");
    assert_eq!(
        (&v["type"], &v["params"]),
        (&json!("nodes"), &json!({"id": "node-1"})),
        "the error frame of an unknown handler lacks the design's `type` and `params` \
         (edge/src/protocol.rs answers it with frame::error, without them): {v}"
    );
    init(&mut rack).await;
}

/// `broadcast(data, skip)`: `Messaging.Broadcast` with a skip list (and the broadcast subject
/// with `skip`) reaches every other connection, on both edges.
#[tokio::test]
async fn broadcast_with_a_skip_list_reaches_the_others() {
    let c = example_cluster().await;
    let mut a = client(&c, 0, "rackhd", "a").await;
    let mut b = client(&c, 0, "rackhd", "b").await;
    let mut d = client(&c, 1, "rackhd", "d").await;
    let b_conn = c.connection_of(0, &b).await.conn_id;
    let a_conn = c.connection_of(0, &a).await.conn_id;
    c.connection_of(0, &d).await;

    let r = broadcast(
        c.grpc(0),
        BroadcastRequest {
            r#type: "node-event".into(),
            payload_json: r#"{"node":"node-1","state":"up"}"#.into(),
            skip_conn_ids: vec![b_conn.clone()],
            ..BroadcastRequest::default()
        },
    )
    .await;
    assert_eq!((r.delivered, r.refused, r.nodes), (2, 0, 2), "{r:?}");
    let want = json!({"handler": "node-event", "payload": {"node": "node-1", "state": "up"}});
    assert_eq!(a.recv().await, want);
    assert_eq!(d.recv().await, want);
    expect_only_marker(&c, &mut b, KEY).await;

    // A backend on the bus: the broadcast subject, skipping a connection.
    let backend = c.backend().await;
    let report = backend
        .request(
            "sb.broadcast",
            &json!({"type": "node-event", "payload": 2, "skip": [a_conn]}),
        )
        .await;
    assert_eq!(
        report,
        json!({"delivered": 2, "refused": 0, "nodes": 2, "unconfirmed": []})
    );
    let want = json!({"handler": "node-event", "payload": 2});
    assert_eq!(b.recv().await, want);
    assert_eq!(d.recv().await, want);
    for client in [&mut a, &mut b, &mut d] {
        expect_only_marker(&c, client, KEY).await;
    }
}
