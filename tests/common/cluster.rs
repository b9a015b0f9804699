//! Cluster harness: a real `nats-server` on a free port (`bus::testkit::TestNats`),
//! coordinators and edges run as the real `switchboard` binary (so that they can be
//! SIGKILLed), and what clients, backends and operators use to drive them: WebSocket clients
//! on any edge and any path (with request headers), gRPC clients, `/readyz` and `/metrics`,
//! the NATS server's own monitoring (`/connz`), and NATS clients playing backends.
//!
//! Every process gets the same config file (`--config FILE`) and the environment the test
//! gives (e.g. `SWITCHBOARD_JWT_SECRET`); listeners are bound to port 0 (`--listen
//! 127.0.0.1:0` overrides what the file says) and found through the banner each process
//! prints. Every wait is a bounded poll or a bounded wait for a frame, a line or a message;
//! every child process is killed when its guard drops, also when an assertion fails (the tail
//! of its output is then printed with the failure). `nats-server` must be on `PATH`:
//! `scripts/test` installs it; without it the tests fail, they never skip.
//!
//! Included by several test crates (`#[path = "common/cluster.rs"] mod harness;`), each of
//! which uses only part of it.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

#[path = "tools.rs"]
mod tools;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
// For the tests that include this harness; not every one uses them.
#[allow(unused_imports)]
pub use tools::{
    Authed, MISSING_GRPCURL, TEST_API_KEY, TEST_CLUSTER_SECRET, authed, grpcurl, grpcurl_output,
    with_test_key,
};

use bus::testkit::TestNats;
use bus::{Bus as _, NatsBus, NatsOptions, Outgoing, Subscription};
use futures::{SinkExt as _, StreamExt as _};
use proto::v1::messaging_client::MessagingClient;
use proto::v1::placement_client::PlacementClient;
use proto::v1::resources_client::ResourcesClient;
use proto::v1::{
    BroadcastRequest, Connection, DeliveryReport, ListConnectionsRequest, ListNodesRequest,
    ListNodesResponse, LocateRequest, PublishRequest, SendRequest,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
/// The bound on any single wait: a process start, a frame, an RPC, a readiness poll.
pub const STEP: Duration = Duration::from_secs(10);
/// Pause between the attempts of a bounded poll.
pub const POLL: Duration = Duration::from_millis(25);
/// Lines of each process's output printed when a test fails.
const TAIL: usize = 80;
/// Lines of each process's output kept.
const KEEP: usize = 2_000;

/// The config of [`Cluster::start`]: one anonymous `/connect` route where `?user=` names the
/// user and clients may publish.
const ANONYMOUS_YAML: &str = "edge:\n  routes:\n    - path: /connect\n      anonymous: true\n      publish: true\n      allowed_origins: [\"*\"]\n";

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------------------------------
// Bounded polling.

/// Polls `f` every [`POLL`] until it yields `Some` or `limit` passes (`None`).
pub async fn poll_for<T>(limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
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
pub async fn eventually<T>(what: &str, limit: Duration, f: impl AsyncFnMut() -> Option<T>) -> T {
    poll_for(limit, f)
        .await
        .unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// Awaits `fut` for at most [`STEP`].
pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

// ---------------------------------------------------------------------------------------
// Child processes.

/// A running `switchboard` process; SIGKILLed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd` and waits for the stdout line for which `banner` returns `Some`.
    pub async fn start<T>(
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
    pub async fn kill(&mut self) {
        bounded(&format!("SIGKILL of {}", self.name), self.child.kill())
            .await
            .unwrap_or_else(|e| panic!("kill {}: {e}", self.name));
    }

    /// Everything the process printed so far (stdout and stderr; the last 2000 lines).
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// The process id, e.g. to send it a signal.
    pub fn pid(&self) -> u32 {
        self.child
            .id()
            .expect("the process has not been waited for")
    }

    pub fn tail(&self) -> String {
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
pub fn switchboard() -> Command {
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
pub struct Opts {
    /// `coordinator.edge_grace`.
    pub edge_grace: Duration,
    /// `coordinator.member_timeout` and `edge.member_timeout`.
    pub member_timeout: Duration,
    /// `coordinator.announce_interval`.
    pub announce_interval: Duration,
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

fn yaml_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Opts {
    /// The timings as `SWITCHBOARD_<BLOCK>__<KEY>` overrides, so that they apply on top of
    /// any config file (and to every process: each mode reads only its own block).
    fn env(&self) -> Vec<(String, String)> {
        [
            ("SWITCHBOARD_COORDINATOR__EDGE_GRACE", self.edge_grace),
            (
                "SWITCHBOARD_COORDINATOR__MEMBER_TIMEOUT",
                self.member_timeout,
            ),
            (
                "SWITCHBOARD_COORDINATOR__ANNOUNCE_INTERVAL",
                self.announce_interval,
            ),
            (
                "SWITCHBOARD_COORDINATOR__REQUEST_TIMEOUT",
                Duration::from_secs(2),
            ),
            ("SWITCHBOARD_EDGE__MEMBER_TIMEOUT", self.member_timeout),
            ("SWITCHBOARD_EDGE__DRAIN_WINDOW", Duration::from_millis(100)),
        ]
        .into_iter()
        .map(|(k, d)| (k.to_owned(), yaml_duration(d)))
        .collect()
    }
}

/// What to start: how many edges and coordinators, with which config file and environment.
#[derive(Debug, Clone)]
pub struct Spec {
    pub edges: usize,
    pub coordinators: usize,
    pub opts: Opts,
    config: Config,
    env: Vec<(String, String)>,
    /// Whether every process gets the test API key and cluster secret.
    credentials: bool,
    /// Whether a monitoring tap listens on `>` (see [`Cluster`]).
    tap: bool,
    /// Variables of the coordinators only, then of the edges only.
    role_env: [Vec<(String, String)>; 2],
    nats_config: Option<PathBuf>,
}

/// The test API key (scope admin) and cluster secret, as config overrides and the variables
/// they name.
pub fn test_credentials() -> Vec<(String, String)> {
    [
        (
            "SWITCHBOARD_COORDINATOR__API__KEYS",
            "[{name: test, secret_env: SB_TEST_API_KEY, scopes: [admin]}]",
        ),
        ("SB_TEST_API_KEY", TEST_API_KEY),
        ("SWITCHBOARD_CLUSTER__SECRET_ENV", "SB_TEST_CLUSTER_SECRET"),
        ("SB_TEST_CLUSTER_SECRET", TEST_CLUSTER_SECRET),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

#[derive(Debug, Clone)]
enum Config {
    File(PathBuf),
    Yaml(String),
}

impl Spec {
    /// `edges` edges and `coordinators` coordinators on the anonymous `/connect` config.
    pub fn new(edges: usize, coordinators: usize) -> Self {
        Self {
            edges,
            coordinators,
            opts: Opts::default(),
            config: Config::Yaml(ANONYMOUS_YAML.to_owned()),
            env: Vec::new(),
            credentials: true,
            tap: true,
            role_env: [Vec::new(), Vec::new()],
            nats_config: None,
        }
    }

    /// No monitoring tap: for the few tests of "no responders", which NATS can report only
    /// when nobody at all listens on a subject.
    pub fn without_tap(mut self) -> Self {
        self.tap = false;
        self
    }

    /// No test API key or cluster secret: the test configures its own.
    pub fn without_test_credentials(mut self) -> Self {
        self.credentials = false;
        self
    }

    pub fn opts(mut self, opts: Opts) -> Self {
        self.opts = opts;
        self
    }

    /// Every process gets `--config path`.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config = Config::File(path.into());
        self
    }

    /// Every process gets `--config` of a file in the cluster's directory holding `yaml`.
    pub fn config_yaml(mut self, yaml: impl Into<String>) -> Self {
        self.config = Config::Yaml(yaml.into());
        self
    }

    /// An environment variable of every process.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// An environment variable of the coordinators only (e.g. their NATS user).
    pub fn coordinator_env(mut self, name: &str, value: &str) -> Self {
        self.role_env[0].push((name.to_owned(), value.to_owned()));
        self
    }

    /// An environment variable of the edges only.
    pub fn edge_env(mut self, name: &str, value: &str) -> Self {
        self.role_env[1].push((name.to_owned(), value.to_owned()));
        self
    }

    /// nats-server also reads this config file (users, permissions, TLS).
    pub fn nats_config(mut self, path: impl Into<PathBuf>) -> Self {
        self.nats_config = Some(path.into());
        self
    }
}

#[derive(Debug)]
pub struct Coord {
    pub id: String,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub proc: Proc,
}

#[derive(Debug)]
pub struct EdgeNode {
    pub id: String,
    pub ws: SocketAddr,
    pub proc: Proc,
}

/// NATS, coordinators `c1…` and edges `e1…`. Dropping it kills every process (edges first,
/// then coordinators, then NATS) and removes the config files.
#[derive(Debug)]
pub struct Cluster {
    pub edges: Vec<EdgeNode>,
    pub coords: Vec<Coord>,
    pub nats: TestNats,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// A monitoring tap: another NATS client subscribed to `>` for the cluster's whole life
    /// (when the server takes anonymous clients), as operators and audit services attach one.
    /// It must change nothing: no process may depend on nobody else hearing a subject.
    tap: Option<(NatsBus, Subscription)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- nats-server log ----\n{}", self.nats.recent_log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    /// Starts NATS, `coordinators` coordinators and `edges` edges on the anonymous `/connect`
    /// config, and waits until every process is ready (see [`Cluster::launch`]).
    pub async fn start(edges: usize, coordinators: usize, opts: Opts) -> Self {
        Self::launch(Spec::new(edges, coordinators).opts(opts)).await
    }

    /// Starts NATS, the coordinators and the edges of `spec` (each edge seeded with every
    /// coordinator; every process given the same config file and environment), and waits
    /// until every process is ready and every edge reports to every coordinator.
    pub async fn launch(spec: Spec) -> Self {
        let nats = match &spec.nats_config {
            Some(path) => TestNats::start_with_config(path).await,
            None => TestNats::start().await,
        };
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("cluster-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = match &spec.config {
            Config::File(path) => {
                assert!(path.is_file(), "config file {} is missing", path.display());
                path.clone()
            }
            Config::Yaml(yaml) => {
                let path = dir.join("config.yaml");
                std::fs::write(&path, yaml).unwrap();
                path
            }
        };
        let mut env = spec.opts.env();
        if spec.credentials {
            env.extend(test_credentials());
        }
        env.extend(spec.env.iter().cloned());
        let mut cluster = Self {
            edges: Vec::new(),
            coords: Vec::new(),
            nats,
            dir,
            config,
            tap: None,
        };
        if spec.tap && spec.nats_config.is_none() {
            let tap = cluster.observer().await;
            let everything = bounded("tap subscribe", tap.subscribe(">".into(), None))
                .await
                .expect("the tap subscribes to >");
            cluster.tap = Some((tap, everything));
        }
        for i in 1..=spec.coordinators {
            let id = format!("c{i}");
            let mut cmd = switchboard();
            cmd.arg("coordinator")
                .arg("--config")
                .arg(&cluster.config)
                .args(["--nats", &cluster.nats.url()])
                .args(["--grpc-listen", "127.0.0.1:0"])
                .args(["--http-listen", "127.0.0.1:0"])
                .args(["--node-id", &id])
                .envs(env.iter().chain(&spec.role_env[0]).map(|(k, v)| (k, v)));
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
        for i in 1..=spec.edges {
            let id = format!("e{i}");
            let mut cmd = switchboard();
            cmd.arg("edge")
                .arg("--config")
                .arg(&cluster.config)
                .args(["--nats", &cluster.nats.url()])
                .args(["--coordinator", &seeds])
                .args(["--listen", "127.0.0.1:0"])
                .args(["--node-id", &id])
                .envs(env.iter().chain(&spec.role_env[1]).map(|(k, v)| (k, v)));
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
    pub async fn wait_ready(&self) {
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

    /// The WebSocket (and HTTP) address of edge `edge` (0-based).
    pub fn ws(&self, edge: usize) -> SocketAddr {
        self.edges[edge].ws
    }

    /// A WebSocket client of `user` in `namespace` on edge `edge` (0-based), on the anonymous
    /// `/connect` route.
    pub async fn client(&self, edge: usize, user: &str, namespace: &str) -> Client {
        let path = format!("/connect?user={user}&namespace={namespace}");
        let name = format!("{user}@{}/{namespace}", self.edges[edge].id);
        self.connect_as(edge, &path, &[], &name).await
    }

    /// A WebSocket client on edge `edge` at `path_and_query` with extra request headers;
    /// fails the test when the upgrade is refused.
    pub async fn connect(
        &self,
        edge: usize,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Client {
        let name = format!("{}{path_and_query}", self.edges[edge].id);
        self.connect_as(edge, path_and_query, headers, &name).await
    }

    /// [`Cluster::connect`] with a name for failure messages.
    pub async fn connect_as(
        &self,
        edge: usize,
        path_and_query: &str,
        headers: &[(&str, &str)],
        name: &str,
    ) -> Client {
        Client::connect(self.ws(edge), path_and_query, headers, name).await
    }

    /// The upgrade of `path_and_query` on edge `edge`: a client, or the refusal.
    pub async fn try_connect(
        &self,
        edge: usize,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, Refusal> {
        let name = format!("{}{path_and_query}", self.edges[edge].id);
        Client::try_connect(self.ws(edge), path_and_query, headers, &name).await
    }

    /// The gRPC address of coordinator `coord` (0-based).
    pub fn grpc(&self, coord: usize) -> SocketAddr {
        self.coords[coord].grpc
    }

    /// Waits until `Locate` on coordinator `coord` shows exactly `n` connections of `user`
    /// in `namespace` (every namespace when empty); returns them.
    pub async fn wait_located(
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

    /// Waits until `ListConnections` on coordinator `coord` lists the connection of `client`
    /// (matched by its local address, which the edge sees as the remote address); returns it.
    pub async fn connection_of(&self, coord: usize, client: &Client) -> Connection {
        let addr = self.grpc(coord);
        let remote = client.local_addr.to_string();
        let mut last = Vec::new();
        let found = poll_for(STEP, async || {
            last = try_list_connections(addr, ListConnectionsRequest::default())
                .await
                .ok()?;
            last.iter().find(|c| c.remote_addr == remote).cloned()
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "ListConnections on {} never listed {} (from {remote}); last: {last:?}",
                self.coords[coord].id, client.name
            )
        })
    }

    /// A plain NATS client of its own, as a backend or an operator would use.
    pub async fn observer(&self) -> NatsBus {
        let opts = NatsOptions {
            url: self.nats.url(),
            name: "cluster-test-observer".into(),
            ..NatsOptions::default()
        };
        bounded("observer connect", NatsBus::connect(opts))
            .await
            .expect("observer connects to NATS")
    }

    /// A backend: a NATS client of its own.
    pub async fn backend(&self) -> Backend {
        Backend {
            bus: self.observer().await,
        }
    }

    /// The NATS server's `/connz` with every connection's subscriptions and their counts.
    pub async fn connz(&self) -> Value {
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
    pub async fn edge_metric(&self, edge: usize, name: &str) -> u64 {
        let e = &self.edges[edge];
        let (status, text) = http_get(e.ws, "/metrics")
            .await
            .unwrap_or_else(|err| panic!("GET /metrics of {}: {err}", e.id));
        assert_eq!(status, 200);
        metric(&text, name).unwrap_or_else(|| panic!("{} has no metric {name}:\n{text}", e.id))
    }
}

// ---------------------------------------------------------------------------------------
// Backends: NATS clients in the test.

/// A backend on the bus: subscribes to hook and event subjects, replies, publishes.
/// Cloning gives another handle to the same NATS connection.
#[derive(Debug, Clone)]
pub struct Backend {
    pub bus: NatsBus,
}

impl Backend {
    /// Subscribes to `subject` and waits until the server has registered the subscription.
    pub async fn subscribe(&self, subject: &str) -> Subscription {
        let sub = bounded(
            &format!("subscribe to {subject}"),
            self.bus.subscribe(subject.to_owned(), None),
        )
        .await
        .unwrap_or_else(|e| panic!("subscribe to {subject}: {e}"));
        self.sync().await;
        sub
    }

    /// Subscribes to every subject (`>`) and waits until the subscription hears a probe this
    /// client publishes. Use a backend of its own for it: a connection with a `>`
    /// subscription cannot [`sync`](Self::sync) any more.
    pub async fn subscribe_everything(&self) -> Subscription {
        let mut sub = bounded("subscribe to >", self.bus.subscribe(">".to_owned(), None))
            .await
            .unwrap_or_else(|e| panic!("subscribe to >: {e}"));
        let probe = format!("probe.{}", ulid::Ulid::new());
        self.publish(&probe, &Value::Null).await;
        subjects_until(&mut sub, &probe).await;
        sub
    }

    /// Returns once the server has processed everything this client sent before (its own
    /// message comes back only after that).
    pub async fn sync(&self) {
        // Our own message to an inbox only we hear: it depends on nobody else (a request
        // answered by "no responders" would wait whenever a tap hears the inbox).
        let inbox = self.bus.new_inbox();
        let mut echo = bounded("sync subscribe", self.bus.subscribe(inbox.clone(), None))
            .await
            .expect("sync subscribes to its inbox");
        bounded(
            "sync publish",
            self.bus.publish(Outgoing::new(inbox, Vec::new())),
        )
        .await
        .expect("sync publishes to its inbox");
        bounded("sync round trip with the NATS server", echo.next())
            .await
            .expect("the echo comes back");
    }

    /// Publishes `body` (JSON) on `subject`.
    pub async fn publish(&self, subject: &str, body: &Value) {
        bounded(
            &format!("publish on {subject}"),
            self.bus
                .publish(Outgoing::new(subject.to_owned(), body.to_string())),
        )
        .await
        .unwrap_or_else(|e| panic!("publish on {subject}: {e}"));
    }

    /// A request with a JSON body; the reply as JSON.
    pub async fn request(&self, subject: &str, body: &Value) -> Value {
        let msg = Outgoing::new(subject.to_owned(), body.to_string());
        let reply = self
            .bus
            .request(msg, STEP)
            .await
            .unwrap_or_else(|e| panic!("request on {subject}: {e}"));
        serde_json::from_slice(&reply.payload).unwrap_or_else(|e| {
            panic!(
                "reply on {subject} is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&reply.payload)
            )
        })
    }

    /// Answers the request `to` with `body` (JSON).
    pub async fn reply(&self, to: &bus::Message, body: &Value) {
        let reply = to
            .reply
            .clone()
            .unwrap_or_else(|| panic!("the message on {} is not a request", to.subject));
        bounded(
            "reply",
            self.bus.publish(Outgoing::new(reply, body.to_string())),
        )
        .await
        .unwrap_or_else(|e| panic!("reply to {}: {e}", to.subject));
    }

    /// A JetStream context on this backend's connection (for key-value buckets).
    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.bus.client().clone())
    }
}

/// The next message of `sub` (within [`STEP`]) and its body as JSON.
pub async fn next_json(sub: &mut Subscription) -> (bus::Message, Value) {
    let msg = bounded("a message for the backend", sub.next())
        .await
        .expect("subscription ended");
    let body = serde_json::from_slice(&msg.payload).unwrap_or_else(|e| {
        panic!(
            "message on {} is not JSON ({e}): {:?}",
            msg.subject,
            String::from_utf8_lossy(&msg.payload)
        )
    });
    (msg, body)
}

/// Reads `sub` until a message on `marker` arrives; returns the subjects seen before it.
pub async fn subjects_until(sub: &mut Subscription, marker: &str) -> Vec<String> {
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
// gRPC.

pub async fn placement(addr: SocketAddr) -> Result<PlacementClient<Authed>, String> {
    channel(addr)
        .await
        .map(|ch| PlacementClient::new(authed(ch)))
}

pub async fn messaging(addr: SocketAddr) -> MessagingClient<Authed> {
    let ch = channel(addr).await.unwrap_or_else(|e| panic!("gRPC {e}"));
    MessagingClient::new(authed(ch))
}

pub async fn resources(addr: SocketAddr) -> ResourcesClient<Authed> {
    let ch = channel(addr).await.unwrap_or_else(|e| panic!("gRPC {e}"));
    ResourcesClient::new(authed(ch))
}

/// A plaintext gRPC channel to `addr`, connected within [`STEP`].
pub async fn channel(addr: SocketAddr) -> Result<Channel, String> {
    let endpoint = Channel::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
    match timeout(STEP, endpoint.connect()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connect to {addr}: {e}")),
        Err(_) => Err(format!("connect to {addr} timed out")),
    }
}

pub async fn try_locate(
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

/// Every connection `ListConnections` answers for `req` (all pages).
pub async fn try_list_connections(
    addr: SocketAddr,
    mut req: ListConnectionsRequest,
) -> Result<Vec<Connection>, String> {
    let mut client = placement(addr).await?;
    let mut out = Vec::new();
    loop {
        let page = match timeout(STEP, client.list_connections(req.clone())).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return Err(format!("ListConnections: {status}")),
            Err(_) => return Err("ListConnections timed out".into()),
        };
        out.extend(page.connections);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        req.page_token = page.next_page_token;
    }
}

pub async fn list_connections(addr: SocketAddr, req: ListConnectionsRequest) -> Vec<Connection> {
    try_list_connections(addr, req)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub async fn list_nodes(addr: SocketAddr) -> Result<ListNodesResponse, String> {
    let mut client = placement(addr).await?;
    match timeout(STEP, client.list_nodes(ListNodesRequest {})).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(format!("ListNodes: {status}")),
        Err(_) => Err("ListNodes timed out".into()),
    }
}

pub async fn send(
    addr: SocketAddr,
    namespace: &str,
    user: &str,
    ty: &str,
    json: &str,
) -> DeliveryReport {
    send_request(
        addr,
        SendRequest {
            namespace: namespace.into(),
            user: user.into(),
            r#type: ty.into(),
            payload_json: json.into(),
            ..SendRequest::default()
        },
    )
    .await
}

pub async fn send_request(addr: SocketAddr, req: SendRequest) -> DeliveryReport {
    let what = format!("Send to {:?}/{:?}", req.user, req.conn_id);
    let mut client = messaging(addr).await;
    bounded(&what, client.send(req))
        .await
        .unwrap_or_else(|s| panic!("{what}: {s}"))
        .into_inner()
}

pub async fn broadcast(addr: SocketAddr, req: BroadcastRequest) -> DeliveryReport {
    let mut client = messaging(addr).await;
    bounded("Broadcast", client.broadcast(req))
        .await
        .unwrap_or_else(|s| panic!("Broadcast: {s}"))
        .into_inner()
}

pub async fn publish(addr: SocketAddr, namespace: &str, topic: &str, json: &str) -> DeliveryReport {
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

pub fn node_ids(conns: &[Connection]) -> std::collections::BTreeSet<String> {
    conns.iter().map(|c| c.node_id.clone()).collect()
}

// ---------------------------------------------------------------------------------------
// WebSocket clients.

/// An upgrade the edge refused: its HTTP status, and what of the body came with the head
/// (often nothing: [`refused_upgrade`] reads the whole body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub body: String,
}

/// A WebSocket client over a real TCP socket.
#[derive(Debug)]
pub struct Client {
    ws: Ws,
    pub name: String,
    /// The client's end of the TCP connection (the edge's `remote_addr` of it).
    pub local_addr: SocketAddr,
}

impl Client {
    /// Opens a socket to `addr` at `path_and_query` with extra request headers; fails the
    /// test when the upgrade is refused.
    pub async fn connect(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
        name: &str,
    ) -> Self {
        Self::try_connect(addr, path_and_query, headers, name)
            .await
            .unwrap_or_else(|r| {
                panic!("{name}: upgrade refused with HTTP {}: {}", r.status, r.body)
            })
    }

    /// Opens a socket, or returns the refusal.
    pub async fn try_connect(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
        name: &str,
    ) -> Result<Self, Refusal> {
        let tcp = bounded("TCP connect", TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("{name}: TCP connect to {addr}: {e}"));
        Self::handshake(tcp, addr, path_and_query, headers, name).await
    }

    /// Opens a socket whose kernel receive buffer is about `rcvbuf` bytes: a client that
    /// stops reading fills up quickly.
    pub async fn connect_small_rcvbuf(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
        name: &str,
        rcvbuf: u32,
    ) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(rcvbuf).unwrap();
        let tcp = bounded("TCP connect", socket.connect(addr))
            .await
            .unwrap_or_else(|e| panic!("{name}: TCP connect to {addr}: {e}"));
        Self::handshake(tcp, addr, path_and_query, headers, name)
            .await
            .unwrap_or_else(|r| {
                panic!("{name}: upgrade refused with HTTP {}: {}", r.status, r.body)
            })
    }

    async fn handshake(
        tcp: TcpStream,
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
        name: &str,
    ) -> Result<Self, Refusal> {
        let local_addr = tcp.local_addr().unwrap();
        let url = format!("ws://{addr}{path_and_query}");
        let mut req = url
            .as_str()
            .into_client_request()
            .unwrap_or_else(|e| panic!("{name}: bad request {url}: {e}"));
        for (k, v) in headers {
            req.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let upgrade = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp));
        match bounded(&format!("{name}: upgrade of {url}"), upgrade).await {
            Ok((ws, _)) => Ok(Self {
                ws,
                name: name.to_owned(),
                local_addr,
            }),
            Err(WsError::Http(resp)) => Err(Refusal {
                status: resp.status().as_u16(),
                body: resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Err(e) => panic!("{name}: upgrade of {url} failed: {e}"),
        }
    }

    /// Sends `frame` as a JSON text frame.
    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// Sends a text frame exactly as given.
    pub async fn send_text(&mut self, text: &str) {
        self.send_message(WsMessage::text(text)).await;
    }

    pub async fn send_message(&mut self, m: WsMessage) {
        bounded("WebSocket send", self.ws.send(m))
            .await
            .unwrap_or_else(|e| panic!("{}: send: {e}", self.name));
    }

    /// The next text frame as JSON (control frames skipped), within [`STEP`].
    pub async fn recv(&mut self) -> Value {
        self.recv_within(STEP).await
    }

    /// The next text frame as JSON (control frames skipped), within `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Value {
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
        timeout(limit, next)
            .await
            .unwrap_or_else(|_| panic!("{}: no frame within {limit:?}", self.name))
    }

    /// The next message of any kind (pings and pongs included) within `limit`; `None` when
    /// nothing came. Fails the test when the connection fails or ends.
    pub async fn next_message_within(&mut self, limit: Duration) -> Option<WsMessage> {
        match timeout(limit, self.ws.next()).await {
            Err(_) => None,
            Ok(Some(Ok(m))) => Some(m),
            Ok(other) => panic!("{}: expected a message, got {other:?}", self.name),
        }
    }

    /// Sends a ping and expects its pong as the very next frame: the socket is open and
    /// served, and nothing was pending for it (in particular no message meant for others).
    /// Only on dialects with the `ping` verb (native, hyperexpress).
    pub async fn roundtrip(&mut self) {
        let id = ulid::Ulid::new().to_string();
        self.send(serde_json::json!({"type": "ping", "id": id}))
            .await;
        let v = self.recv().await;
        assert_eq!(
            v,
            serde_json::json!({"type": "pong", "id": id}),
            "{}: expected only the pong, got another frame first",
            self.name
        );
    }

    /// Waits for the server's close frame and returns (code, reason).
    pub async fn close_frame(&mut self) -> (u16, String) {
        let ((code, reason), texts) = self.close_frame_after_texts().await;
        assert!(
            texts.is_empty(),
            "{}: frames before the close: {texts:?}",
            self.name
        );
        (code, reason)
    }

    /// Waits for the server's close frame; returns (code, reason) and the text frames that
    /// came before it.
    pub async fn close_frame_after_texts(&mut self) -> ((u16, String), Vec<Value>) {
        let name = self.name.clone();
        let mut texts = Vec::new();
        let read = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Close(Some(f)))) => {
                        return (u16::from(f.code), f.reason.to_string());
                    }
                    Some(Ok(WsMessage::Text(t))) => texts.push(
                        serde_json::from_str(&t).unwrap_or_else(|_| Value::String(t.to_string())),
                    ),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                    other => {
                        panic!("{name}: expected a close frame, got {other:?}; frames: {texts:?}")
                    }
                }
            }
        };
        let close = timeout(STEP, read)
            .await
            .unwrap_or_else(|_| panic!("{}: no close frame within {STEP:?}", self.name));
        (close, texts)
    }

    /// Reads the raw socket until the TCP connection ends, without writing anything (a
    /// WebSocket client would answer pings, and writing to a closed socket resets it and
    /// loses what is still unread). Fails if a close frame arrives. Returns the opcodes of
    /// the frames read. Use it on a client with no partly read frames.
    pub async fn expect_dropped(self) -> Vec<u8> {
        let MaybeTlsStream::Plain(tcp) = self.ws.into_inner() else {
            unreachable!("plain TCP only")
        };
        tools::expect_dropped(tcp, STEP, &self.name).await
    }

    /// Closes from the client side with `code` and waits (bounded) for the server's answer.
    pub async fn close(mut self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        let _ = timeout(STEP, self.ws.close(Some(frame))).await;
        let drain = async { while let Some(Ok(_)) = self.ws.next().await {} };
        let _ = timeout(STEP, drain).await;
    }
}

// ---------------------------------------------------------------------------------------
// HTTP, metrics, /connz, tokens, config files.

/// A plain HTTP/1.0 GET: (status, body). `Err` when the connection fails.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_exchange(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
    .await
}

/// Writes `request` as it is and reads the response until the server closes (or
/// [`STEP`]): (status, everything after the head). `Err` when the connection fails.
pub async fn http_exchange(addr: SocketAddr, request: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        tcp.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&raw).into_owned())
    };
    let text = timeout(STEP, exchange)
        .await
        .map_err(|_| format!("request to {addr} timed out"))??;
    parse_response(&text)
}

/// The text of a WebSocket upgrade request for `path_and_query` on `addr` with extra
/// headers, as a browser or curl sends it.
pub fn upgrade_request(addr: SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> String {
    let mut text = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    text
}

/// An upgrade request the edge refuses: (status, body), read until the edge closes.
pub async fn refused_upgrade(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let request = upgrade_request(addr, path_and_query, headers);
    http_exchange(addr, &request)
        .await
        .unwrap_or_else(|e| panic!("upgrade of {path_and_query}: {e}"))
}

/// Writes `request` as it is and reads only the response head (the connection may stay
/// open, as after a `101`): (status, the head).
pub async fn http_head(addr: SocketAddr, request: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        tcp.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 1024];
        while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut chunk).await.map_err(|e| e.to_string())? {
                0 => break,
                n => raw.extend_from_slice(&chunk[..n]),
            }
        }
        Ok::<_, String>(String::from_utf8_lossy(&raw).into_owned())
    };
    let text = timeout(STEP, exchange)
        .await
        .map_err(|_| format!("request to {addr} timed out"))??;
    let (status, _) = parse_response(&text)?;
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_owned();
    Ok((status, head))
}

fn parse_response(text: &str) -> Result<(u16, String), String> {
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
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `/connz` entry of the NATS connection named `name`.
pub fn connection<'a>(connz: &'a Value, name: &str) -> &'a Value {
    connz["connections"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no NATS connection named {name:?} in /connz: {connz}"))
}

/// Subject → messages delivered, for every subscription of a `/connz` connection.
pub fn sub_counts(conn: &Value) -> BTreeMap<String, u64> {
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

/// An HS256 JWT of `claims` signed with `secret`.
pub fn hs256(claims: &Value, secret: &str) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Seconds since the Unix epoch, for `exp` claims.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `deploy/examples/<name>`.
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/examples")
        .join(name)
}

/// `tests/fixtures/seeds/<name>`.
pub fn seed_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/seeds")
        .join(name)
}

/// The text of example `name` with each `(from, to)` replaced once; fails when `from` is
/// not in it (the variant would silently be the example).
pub fn example_variant(name: &str, edits: &[(&str, &str)]) -> String {
    let path = example(name);
    let mut text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "{} no longer contains {from:?}: update the test's variant",
            path.display()
        );
        text = text.replacen(from, to, 1);
    }
    text
}

// ---------------------------------------------------------------------------------------
// Markers.

/// Proves that nothing else is pending for `client`: a Send of a fresh marker to its
/// connection (found in placement by its address) through coordinator 0 must be the very
/// next frame it reads, as `{<key>: "marker", "payload": <id>}` (`key` is the routing field
/// of the route's dialect).
pub async fn expect_only_marker(c: &Cluster, client: &mut Client, key: &str) {
    let conn_id = c.connection_of(0, client).await.conn_id;
    let id = ulid::Ulid::new().to_string();
    let payload = Value::String(id).to_string();
    let r = send_request(
        c.grpc(0),
        SendRequest {
            conn_id,
            r#type: "marker".into(),
            payload_json: payload.clone(),
            ..SendRequest::default()
        },
    )
    .await;
    assert_eq!(r.delivered, 1, "marker Send to {}: {r:?}", client.name);
    let got = client.recv().await;
    let want: Value =
        serde_json::from_str(&format!(r#"{{"{key}":"marker","payload":{payload}}}"#)).unwrap();
    assert_eq!(
        got, want,
        "{}: expected nothing before the marker, got another frame first",
        client.name
    );
}
