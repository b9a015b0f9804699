//! A whole node in this process: an edge and a coordinator over the in-process bus
//! (`switchboard::run::DevNode`), on free loopback ports, stopped when dropped. For what one
//! node does; a claim about a cluster runs real processes over NATS ([`super::cluster`]).

use std::net::SocketAddr;
use std::time::Duration;

use bus::{Outgoing, SharedBus};
use edge::EdgeConfig;
use proto::v1::messaging_client::MessagingClient;
use proto::v1::placement_client::PlacementClient;
use proto::v1::{Connection, ListConnectionsRequest};
use serde_json::Value;
use switchboard::config::{Config, Resolved};
use switchboard::run::DevNode;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::grpc::{self, Authed, try_list_connections, try_locate};
use super::http::http_get;
use super::poll::{WAIT, eventually, poll_for};
use super::ws::Client;

/// How long a node may take to stop.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// An edge and a coordinator in this process, on `127.0.0.1:0`.
#[derive(Debug)]
pub struct TestNode {
    pub ws_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub bus: SharedBus,
    token: CancellationToken,
    _guard: DropGuard,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestNode {
    /// Starts a node serving `edge` (its `listen` is replaced by a free port). Routes that name
    /// an `rs256_public_key_file` get its content, as the binary does.
    pub async fn start(mut edge: EdgeConfig) -> Self {
        init_tracing();
        edge.listen = "127.0.0.1:0".parse().unwrap();
        edge.validate().expect("test edge config is invalid");
        let route_keys = edge
            .routes
            .iter()
            .map(|r| edge::RouteKeys {
                pem: r.auth.rs256_public_key_file.as_ref().map(|p| {
                    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
                }),
                resume: Some(proto::resume::key(b"the test node's resume secret")),
                ..edge::RouteKeys::default()
            })
            .collect();
        let mut config = Config {
            edge,
            ..Config::default()
        };
        config.coordinator.grpc_listen = "127.0.0.1:0".parse().unwrap();
        config.coordinator.request_timeout = Duration::from_secs(1);
        let resolved = Resolved {
            config,
            route_keys,
            ..Resolved::default()
        };
        let node = DevNode::bind(resolved).await.expect("node binds");
        let (ws_addr, grpc_addr, bus) = (node.ws_addr, node.grpc_addr, node.bus());
        let token = CancellationToken::new();
        let task = tokio::spawn(node.serve(token.clone()));
        Self {
            ws_addr,
            grpc_addr,
            bus,
            _guard: token.clone().drop_guard(),
            token,
            task,
        }
    }

    /// The token whose cancellation drains the node (what SIGTERM does).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Drains the node and waits for `serve` to return.
    pub async fn stop(self) {
        self.token.cancel();
        let res = tokio::time::timeout(STOP_TIMEOUT, self.task)
            .await
            .expect("node did not stop in time");
        res.expect("serve task panicked")
            .expect("serve returned an error");
    }

    /// Waits for `serve` to return after the token was cancelled elsewhere.
    pub async fn join(self, timeout: Duration) -> anyhow::Result<()> {
        tokio::time::timeout(timeout, self.task)
            .await
            .expect("serve did not return in time")
            .expect("serve task panicked")
    }

    /// Opens a socket on `path_and_query`; panics if the upgrade is refused.
    pub async fn connect(&self, path_and_query: &str) -> Client {
        self.ws(path_and_query, &[]).await
    }

    /// Opens a socket with extra request headers; panics if the upgrade is refused.
    pub async fn ws(&self, path_and_query: &str, headers: &[(&str, &str)]) -> Client {
        Client::connect(self.ws_addr, path_and_query, headers, path_and_query)
            .await
            .waiting(WAIT)
    }

    /// Opens a socket whose kernel receive buffer is about `rcvbuf` bytes.
    pub async fn connect_small_rcvbuf(&self, path_and_query: &str, rcvbuf: u32) -> Client {
        Client::connect_small_rcvbuf(self.ws_addr, path_and_query, &[], path_and_query, rcvbuf)
            .await
            .waiting(WAIT)
    }

    pub async fn messaging(&self) -> MessagingClient<Authed> {
        grpc::messaging(self.grpc_addr).await
    }

    pub async fn placement(&self) -> PlacementClient<Authed> {
        grpc::placement(self.grpc_addr)
            .await
            .unwrap_or_else(|e| panic!("gRPC {e}"))
    }

    /// `Locate(namespace, user)`.
    pub async fn locate(&self, namespace: &str, user: &str) -> Vec<Connection> {
        try_locate(self.grpc_addr, namespace, user)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until placement shows exactly `n` connections of `user` in `namespace` (every
    /// namespace when empty); returns them.
    pub async fn wait_located(&self, namespace: &str, user: &str, n: usize) -> Vec<Connection> {
        let mut last = Vec::new();
        let found = poll_for(WAIT, async || {
            last = self.locate(namespace, user).await;
            (last.len() == n).then(|| last.clone())
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "placement never showed {n} connection(s) of {user:?} in {namespace:?}; last: {last:?}"
            )
        })
    }

    /// Every connection placement lists for `req` (all pages).
    pub async fn list_all(&self, req: ListConnectionsRequest) -> Vec<Connection> {
        try_list_connections(self.grpc_addr, req)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until the connection `conn_id` lists exactly `topics` (in any order).
    pub async fn wait_topics(&self, conn_id: &str, topics: &[&str]) {
        let mut want: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        want.sort();
        let mut last = None;
        let ok = poll_for(WAIT, async || {
            let all = self.list_all(ListConnectionsRequest::default()).await;
            let mut got = all
                .into_iter()
                .find(|c| c.conn_id == conn_id)
                .map(|c| c.topics)
                .unwrap_or_default();
            got.sort();
            let same = got == want;
            last = Some(got);
            same.then_some(())
        })
        .await;
        assert!(
            ok.is_some(),
            "connection {conn_id} never listed topics {want:?}; last: {last:?}"
        );
    }

    /// Waits until placement lists the connection of `client` (matched by its local
    /// address, which the edge sees as the remote address); returns it.
    pub async fn conn_of(&self, client: &Client) -> Connection {
        let remote = client.local_addr.to_string();
        eventually(
            &format!("placement to list the connection from {remote}"),
            WAIT,
            async || {
                let all = self.list_all(ListConnectionsRequest::default()).await;
                all.into_iter().find(|c| c.remote_addr == remote)
            },
        )
        .await
    }

    /// Subscribes to `subject` on the node's bus, as a backend in this process.
    pub async fn subscribe(&self, subject: impl Into<String>) -> bus::Subscription {
        let subject = subject.into();
        self.bus
            .subscribe(subject.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("subscribe to {subject}: {e}"))
    }

    /// Answers the request `to` with `body` (JSON), as a backend in this process.
    pub async fn reply(&self, to: &bus::Message, body: Value) {
        let inbox = to
            .reply
            .clone()
            .unwrap_or_else(|| panic!("the message on {} is not a request", to.subject));
        self.bus
            .publish(Outgoing::new(inbox, body.to_string()))
            .await
            .unwrap_or_else(|e| panic!("reply to {}: {e}", to.subject));
    }

    /// A plain HTTP GET on the edge port: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.ws_addr, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

/// An anonymous route at `path` where `?user=` names the user and clients may publish.
pub fn dev_route(path: &str) -> edge::config::RouteConfig {
    let mut r = EdgeConfig::dev().routes.remove(0);
    r.path = path.into();
    r
}

/// The dev config (one anonymous `/connect` route) with a short drain window.
pub fn dev_config() -> EdgeConfig {
    EdgeConfig {
        drain_window: Duration::from_millis(50),
        request_timeout: Duration::from_secs(2),
        ..EdgeConfig::dev()
    }
}

/// A config with the given routes and a short drain window.
pub fn config_with(routes: Vec<edge::config::RouteConfig>) -> EdgeConfig {
    EdgeConfig {
        routes,
        ..dev_config()
    }
}

/// Logs of the in-process nodes go to the test's output when `RUST_LOG` asks for them.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
}
