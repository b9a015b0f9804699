//! A cluster of real processes: a `nats-server` on a free port (`bus::testkit::TestNats`),
//! coordinators and edges run as the real `switchboard` binary (so that they can be
//! SIGKILLed), and what clients, backends and operators use to drive them.
//!
//! Every process gets the same config file (`--config FILE`) and the environment the test
//! gives (e.g. `SWITCHBOARD_JWT_SECRET`); listeners are bound to port 0 (`--listen
//! 127.0.0.1:0` overrides what the file says) and found through the banner each process
//! prints. Every child process is killed when its guard drops, also when an assertion fails
//! (the tail of its output is then printed with the failure). `nats-server` must be on
//! `PATH`: `scripts/test` installs it; without it the tests fail, they never skip.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bus::testkit::TestNats;
use bus::{Bus as _, NatsBus, NatsOptions, Subscription};
use proto::v1::{Connection, ListConnectionsRequest, SendRequest};
use serde_json::{Value, json};

use super::files::{example, scratch_dir};
use super::grpc::{
    TEST_API_KEY, TEST_CLUSTER_SECRET, publish, send_request, try_list_connections, try_locate,
};
use super::http::{http_get, metric, wait_http_status};
use super::nats::Backend;
use super::poll::{STEP, bounded, eventually, poll_for};
use super::process::{Proc, coordinator_banner, edge_banner, node_command};
use super::ws::{Client, Refusal, upgrade_status};

/// The config of [`Cluster::start`]: one anonymous `/connect` route where `?user=` names the
/// user and clients may publish.
const ANONYMOUS_YAML: &str = "edge:\n  routes:\n    - path: /connect\n      anonymous: true\n      publish: true\n      allowed_origins: [\"*\"]\n";

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

    /// Two edges and a coordinator on `deploy/examples/<name>` as it is.
    pub fn example(name: &str) -> Self {
        Self::new(2, 1).config_file(example(name))
    }

    /// `SWITCHBOARD_JWT_SECRET` of every process (the examples' routes name it).
    pub fn jwt_secret(self, secret: &str) -> Self {
        self.env("SWITCHBOARD_JWT_SECRET", secret)
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
    /// The environment coordinators were started with, for [`Cluster::add_coordinator`].
    coordinator_env: Vec<(String, String)>,
    /// The environment edges were started with, for [`Cluster::add_edge`].
    edge_env: Vec<(String, String)>,
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
        let dir = scratch_dir("cluster");
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
            coordinator_env: env.iter().chain(&spec.role_env[0]).cloned().collect(),
            edge_env: env.iter().chain(&spec.role_env[1]).cloned().collect(),
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
            let mut cmd = node_command("coordinator", &cluster.config, &cluster.nats.url(), &id);
            cmd.envs(env.iter().chain(&spec.role_env[0]).map(|(k, v)| (k, v)));
            let (proc, (grpc, http)) = Proc::start(&id, cmd, coordinator_banner).await;
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
            let mut cmd = node_command("edge", &cluster.config, &cluster.nats.url(), &id);
            cmd.args(["--coordinator", &seeds])
                .envs(env.iter().chain(&spec.role_env[1]).map(|(k, v)| (k, v)));
            let (proc, ws) = Proc::start(&id, cmd, |line| edge_banner(line, "ws")).await;
            cluster.edges.push(EdgeNode { id, ws, proc });
        }
        cluster.wait_ready().await;
        cluster
    }

    /// Starts one more coordinator `id`, as the others were started; returns its index once
    /// it printed its banner (it answers calls from then on; edges find it afterwards).
    pub async fn add_coordinator(&mut self, id: &str) -> usize {
        let mut cmd = node_command("coordinator", &self.config, &self.nats.url(), id);
        cmd.envs(self.coordinator_env.iter().map(|(k, v)| (k, v)));
        let (proc, (grpc, http)) = Proc::start(id, cmd, coordinator_banner).await;
        self.coords.push(Coord {
            id: id.to_owned(),
            grpc,
            http,
            proc,
        });
        self.coords.len() - 1
    }

    /// Starts one more edge `id`, as the others were started but reaching NATS at
    /// `nats_url` (through a [`super::TcpProxy`], say); returns its index once it is ready
    /// and reports to every coordinator.
    pub async fn add_edge(&mut self, id: &str, nats_url: &str) -> usize {
        let seeds: Vec<String> = self.coords.iter().map(|c| c.grpc.to_string()).collect();
        let mut cmd = node_command("edge", &self.config, nats_url, id);
        cmd.args(["--coordinator", &seeds.join(",")])
            .envs(self.edge_env.iter().map(|(k, v)| (k, v)));
        let (proc, ws) = Proc::start(id, cmd, |line| edge_banner(line, "ws")).await;
        self.edges.push(EdgeNode {
            id: id.to_owned(),
            ws,
            proc,
        });
        self.wait_ready().await;
        self.edges.len() - 1
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
            wait_http_status(&e.id, e.ws, "/readyz", 200, STEP).await;
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

    /// The HTTP status of an upgrade of `path_and_query` on edge `edge` (101 when admitted).
    pub async fn upgrade_status(&self, edge: usize, path_and_query: &str) -> u16 {
        upgrade_status(self.ws(edge), path_and_query, &[]).await
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

/// Publishes probes on `topic` (namespace `default`) through coordinator `coord` until one
/// reports `n` deliveries: placement learns about watchers asynchronously. Then reads, on each
/// of `watchers`, the probes that arrived, up to that one (earlier probes from the same
/// coordinator arrive before it, if at all).
pub async fn settle_topic(
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
