//! The gRPC listener: API keys with scopes for backends and operators, node credentials for
//! edges and peer coordinators. Every refusal is checked by what the caller is told (the gRPC
//! status) and by what did not happen (the victim is still connected and still located).

use std::time::Duration;

use proto::credential::{self, Role};
use proto::v1::messaging_client::MessagingClient;
use proto::v1::placement_client::PlacementClient;
use proto::v1::resources_client::ResourcesClient;
use proto::v1::{DisconnectRequest, ListConnectionsRequest, PutRequest, SendRequest};
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::harness::*;

const READ_KEY: &str = "sb_test_reader_key_0123456789";
const SEND_KEY: &str = "sb_test_sender_key_0123456789";
const WRONG_KEY: &str = "sb_not_a_key_anyone_configured";

/// The test admin key plus a read-only and a messaging-only key.
fn keyed(edges: usize, coordinators: usize) -> Spec {
    Spec::new(edges, coordinators)
        .env(
            "SWITCHBOARD_COORDINATOR__API__KEYS",
            "[{name: test, secret_env: SB_TEST_API_KEY, scopes: [admin]}, \
              {name: reader, secret_env: SB_READER_KEY, scopes: [read]}, \
              {name: sender, secret_env: SB_SENDER_KEY, scopes: [messaging]}]",
        )
        .env("SB_READER_KEY", READ_KEY)
        .env("SB_SENDER_KEY", SEND_KEY)
}

/// Puts `authorization: Bearer <key>` on a request (nothing for `None`).
fn with_key<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(key) = key {
        let value = format!("Bearer {key}").parse().unwrap();
        r.metadata_mut().insert("authorization", value);
    }
    r
}

async fn plain(addr: std::net::SocketAddr) -> Channel {
    channel(addr).await.unwrap()
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_key_with_a_wrong_key_or_scope_are_refused() {
    let c = Cluster::launch(keyed(1, 2)).await;
    let mut alice = c.client(0, "alice", "default").await;
    c.wait_located(0, "default", "alice", 1).await;
    let grpc = c.grpc(0);
    let ch = plain(grpc).await;
    let disconnect = || DisconnectRequest {
        namespace: "default".into(),
        user: "alice".into(),
        code: 4000,
        reason: "x".into(),
        ..DisconnectRequest::default()
    };
    let mut messaging = MessagingClient::new(ch.clone());
    for (key, expected) in [
        (None, Code::Unauthenticated),
        (Some(WRONG_KEY), Code::Unauthenticated),
        (Some(READ_KEY), Code::PermissionDenied),
    ] {
        let r = messaging.disconnect(with_key(disconnect(), key)).await;
        assert_eq!(code(r), expected, "Disconnect with {key:?}");
    }
    let send = || SendRequest {
        namespace: "default".into(),
        user: "alice".into(),
        r#type: "note".into(),
        payload_json: "1".into(),
        ..SendRequest::default()
    };
    let r = messaging.send(with_key(send(), Some(READ_KEY))).await;
    assert_eq!(code(r), Code::PermissionDenied, "Send with the read key");
    // None of the refused calls reached alice: the first frame she gets is the allowed send.
    let report = messaging
        .send(with_key(send(), Some(SEND_KEY)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.delivered, 1, "{report:?}");
    assert_eq!(alice.recv().await, json!({"type": "note", "payload": 1}));
    alice.roundtrip().await;

    let mut placement = PlacementClient::new(ch.clone());
    let list = ListConnectionsRequest::default;
    assert_eq!(
        code(placement.list_connections(with_key(list(), None)).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            placement
                .list_connections(with_key(list(), Some(SEND_KEY)))
                .await
        ),
        Code::PermissionDenied
    );
    let listed = placement
        .list_connections(with_key(list(), Some(READ_KEY)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.connections.len(), 1, "{listed:?}");

    let mut resources = ResourcesClient::new(ch);
    let put = PutRequest {
        resource: "items".into(),
        item_json: r#"{"id":"1"}"#.into(),
        ..PutRequest::default()
    };
    assert_eq!(
        code(resources.put(with_key(put, Some(READ_KEY))).await),
        Code::PermissionDenied
    );

    // The finding's reproduction, as an attacker types it: refused, alice untouched.
    let addr = grpc.to_string();
    let body = r#"{"user":"alice","code":4000,"reason":"x"}"#;
    let out = grpcurl_output(&["-d", body, &addr, "switchboard.v1.Messaging/Disconnect"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "grpcurl Disconnect without a key passed"
    );
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    alice.roundtrip().await;
    // Health and reflection stay open: an operator lists and checks without a key.
    let out = grpcurl_output(&[&addr, "list"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("switchboard.v1.Messaging"));
    let out = grpcurl_output(&[&addr, "grpc.health.v1.Health/Check"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));

    // Refusals are counted by reason; no key appears in metrics or logs.
    let (status, metrics) = http_get(c.coords[0].http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let refused = |reason: &str| {
        metric(
            &metrics,
            &format!("coordinator_grpc_refused_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0)
    };
    assert!(refused("missing") >= 3, "{metrics}");
    assert!(refused("unknown") >= 1, "{metrics}");
    assert!(refused("scope") >= 4, "{metrics}");
    let logs: String = c.coords.iter().map(|p| p.proc.tail()).collect();
    for key in [
        TEST_API_KEY,
        READ_KEY,
        SEND_KEY,
        WRONG_KEY,
        TEST_CLUSTER_SECRET,
    ] {
        assert!(!metrics.contains(key), "a key in /metrics");
        assert!(!logs.contains(key), "a key in the coordinators' logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_report_takes_only_edges_each_only_as_itself() {
    let c = Cluster::launch(Spec::new(2, 1)).await;
    let mut alice = c.client(0, "alice", "default").await;
    c.wait_located(0, "default", "alice", 1).await;
    let addr = c.grpc(0).to_string();
    // The finding: an empty full report for a live edge would wipe its connections.
    let wipe = r#"{"nodeId":"e1","full":true,"deltas":[]}"#;
    let report = async |auth: Option<String>| {
        let header = auth.map(|a| format!("authorization: Bearer {a}"));
        let mut args = Vec::new();
        if let Some(h) = &header {
            args.extend(["-H", h.as_str()]);
        }
        args.extend(["-d", wipe, &addr, "switchboard.v1.EdgeReport/Report"]);
        let out = grpcurl_output(&args).await;
        assert!(!out.status.success(), "a forged report was taken: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e1 = credential::mint(TEST_CLUSTER_SECRET.as_bytes(), Role::Edge, "e1");
    let e9 = credential::mint(TEST_CLUSTER_SECRET.as_bytes(), Role::Edge, "e9");
    let guessed = credential::mint(b"a-guessed-secret-0123456789", Role::Edge, "e1");
    let peer = credential::mint(TEST_CLUSTER_SECRET.as_bytes(), Role::Coordinator, "c9");
    for (who, auth, expected) in [
        ("no credential", None, "Unauthenticated"),
        (
            "the admin API key",
            Some(TEST_API_KEY.to_owned()),
            "PermissionDenied",
        ),
        (
            "a credential under another secret",
            Some(guessed),
            "Unauthenticated",
        ),
        ("a coordinator's credential", Some(peer), "PermissionDenied"),
        // e9 may report, but only as e9.
        ("e9 reporting as e1", Some(e9), "PermissionDenied"),
        // e1 is live: a second stream is refused, not merged.
        ("a second e1 stream", Some(e1), "AlreadyExists"),
    ] {
        let stderr = report(auth).await;
        assert!(stderr.contains(expected), "{who}: {stderr}");
    }
    // Nothing was wiped: alice is still located and a send still reaches her.
    let located = try_locate(c.grpc(0), "default", "alice").await.unwrap();
    assert_eq!(located.len(), 1, "{located:?}");
    let r = send(c.grpc(0), "default", "alice", "still", "1").await;
    assert_eq!(r.delivered, 1, "{r:?}");
    assert_eq!(alice.recv().await, json!({"type": "still", "payload": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_peers_get_partial_answers() {
    // Placement is sharded over two coordinators; a key holder who sends the peer marker
    // still gets the whole answer, never one coordinator's share dressed as the whole.
    let c = Cluster::launch(Spec::new(1, 2)).await;
    let mut clients = Vec::new();
    for i in 0..12 {
        clients.push(c.client(0, &format!("u{i}"), "default").await);
    }
    for i in 0..12 {
        c.wait_located(0, "default", &format!("u{i}"), 1).await;
    }
    let mut placement = PlacementClient::new(authed(plain(c.grpc(0)).await));
    let mut req = Request::new(ListConnectionsRequest::default());
    req.metadata_mut().insert("sb-local", "1".parse().unwrap());
    let listed = placement.list_connections(req).await.unwrap().into_inner();
    assert_eq!(listed.connections.len(), 12, "{:?}", listed.connections);
}

#[tokio::test]
async fn production_processes_refuse_to_start_without_credentials() {
    let run = async |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = switchboard();
        cmd.args(args).envs(env.iter().copied());
        let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
            .await
            .expect("switchboard did not exit in time")
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let nats = ["--nats", "nats://127.0.0.1:1"];
    let coordinator = [&["coordinator"][..], &nats].concat();
    let edge = [&["edge"][..], &nats].concat();
    let secret = [
        ("SWITCHBOARD_CLUSTER__SECRET_ENV", "S"),
        ("S", TEST_CLUSTER_SECRET),
    ];
    let (status, stderr) = run(&coordinator, &secret).await;
    assert_eq!(status, Some(64), "{stderr}");
    assert!(stderr.contains("coordinator.api.keys"), "{stderr}");
    let keyed = [
        (
            "SWITCHBOARD_COORDINATOR__API__KEYS",
            "[{name: k, secret_env: K, scopes: [read]}]",
        ),
        ("K", TEST_API_KEY),
    ];
    let (status, stderr) = run(&coordinator, &keyed).await;
    assert_eq!(status, Some(64), "{stderr}");
    assert!(stderr.contains("cluster"), "{stderr}");
    let route = (
        "SWITCHBOARD_EDGE__ROUTES",
        "[{path: /connect, anonymous: true}]",
    );
    let (status, stderr) = run(&edge, &[route]).await;
    assert_eq!(status, Some(64), "{stderr}");
    assert!(stderr.contains("cluster"), "{stderr}");
    let short = [
        route,
        ("SWITCHBOARD_CLUSTER__SECRET_ENV", "S"),
        ("S", "short"),
    ];
    let (status, stderr) = run(&edge, &short).await;
    assert_eq!(status, Some(64), "{stderr}");
    assert!(stderr.contains("shorter than 16"), "{stderr}");
    assert!(!stderr.contains("short\n"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_cluster_is_explicit_and_says_so() {
    let spec = Spec::new(1, 1)
        .without_test_credentials()
        .env("SWITCHBOARD_COORDINATOR__API__INSECURE", "true")
        .env("SWITCHBOARD_CLUSTER__INSECURE", "true");
    let c = Cluster::launch(spec).await;
    let mut alice = c.client(0, "alice", "default").await;
    c.wait_located(0, "default", "alice", 1).await;
    let mut messaging = MessagingClient::new(plain(c.grpc(0)).await);
    let req = SendRequest {
        namespace: "default".into(),
        user: "alice".into(),
        r#type: "open".into(),
        payload_json: "1".into(),
        ..SendRequest::default()
    };
    let report = messaging
        .send(with_key(req, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.delivered, 1);
    assert_eq!(alice.recv().await, json!({"type": "open", "payload": 1}));
    assert!(
        c.coords[0].proc.tail().contains("without API keys"),
        "{}",
        c.coords[0].proc.tail()
    );
}
