//! Test harness: a whole node (edge + coordinator over the in-process bus) on free loopback
//! ports, WebSocket clients, gRPC clients, and bounded polling.
//!
//! Every wait here is bounded and fails the test with a message that says what was awaited.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

#[path = "tools.rs"]
mod tools;

use std::net::SocketAddr;
use std::time::Duration;

use bus::SharedBus;
use edge::EdgeConfig;
use futures::{SinkExt, StreamExt};
use proto::v1::messaging_client::MessagingClient;
use proto::v1::placement_client::PlacementClient;
use proto::v1::{Connection, ListConnectionsRequest, LocateRequest};
use serde_json::Value;
use switchboard::config::{Config, Resolved};
use switchboard::run::DevNode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, Request};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Channel;

/// How long any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(3);
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

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{path_and_query}", self.ws_addr)
    }

    /// Opens a socket on `path_and_query`; panics if the upgrade is refused.
    pub async fn connect(&self, path_and_query: &str) -> WsClient {
        WsClient::connect(self.ws_addr, path_and_query, &[]).await
    }

    /// Opens a socket with extra request headers; panics if the upgrade is refused.
    pub async fn ws(&self, path_and_query: &str, headers: &[(&str, &str)]) -> WsClient {
        WsClient::connect(self.ws_addr, path_and_query, headers).await
    }

    pub async fn messaging(&self) -> MessagingClient<Channel> {
        MessagingClient::new(self.channel().await)
    }

    pub async fn placement(&self) -> PlacementClient<Channel> {
        PlacementClient::new(self.channel().await)
    }

    /// A plaintext gRPC channel to the coordinator (`proto` has no `connect(url)`: it holds
    /// no transport).
    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .expect("a valid URI")
            .connect()
            .await
            .expect("grpc connect")
    }

    /// `Locate(namespace, user)`.
    pub async fn locate(&self, namespace: &str, user: &str) -> Vec<Connection> {
        let req = LocateRequest {
            namespace: namespace.into(),
            user: user.into(),
        };
        self.placement()
            .await
            .locate(req)
            .await
            .expect("locate")
            .into_inner()
            .connections
    }

    /// Waits until placement shows exactly `n` connections of `user` in `namespace` (every
    /// namespace when empty); returns them.
    pub async fn wait_located(&self, namespace: &str, user: &str, n: usize) -> Vec<Connection> {
        let mut last = Vec::new();
        let found = eventually(WAIT, async || {
            last = self.locate(namespace, user).await;
            last.len() == n
        })
        .await;
        assert!(
            found,
            "placement never showed {n} connection(s) of {user:?} in {namespace:?}; last: {last:?}"
        );
        last
    }

    /// Every connection placement lists for `req` (all pages).
    pub async fn list_all(&self, mut req: ListConnectionsRequest) -> Vec<Connection> {
        let mut client = self.placement().await;
        let mut out = Vec::new();
        loop {
            let page = client
                .list_connections(req.clone())
                .await
                .expect("list connections")
                .into_inner();
            out.extend(page.connections);
            if page.next_page_token.is_empty() {
                return out;
            }
            req.page_token = page.next_page_token;
        }
    }

    /// Waits until the connection `conn_id` lists exactly `topics` (in any order).
    pub async fn wait_topics(&self, conn_id: &str, topics: &[&str]) {
        let mut want: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        want.sort();
        let mut last = None;
        let ok = eventually(WAIT, async || {
            let all = self.list_all(ListConnectionsRequest::default()).await;
            let mut got = all
                .into_iter()
                .find(|c| c.conn_id == conn_id)
                .map(|c| c.topics)
                .unwrap_or_default();
            got.sort();
            let same = got == want;
            last = Some(got);
            same
        })
        .await;
        assert!(
            ok,
            "connection {conn_id} never listed topics {want:?}; last: {last:?}"
        );
    }

    /// Waits until placement lists the connection of `client` (matched by its local
    /// address, which the edge sees as the remote address); returns it.
    pub async fn conn_of(&self, client: &WsClient) -> Connection {
        let remote = client.local_addr.to_string();
        poll_for(WAIT, async || {
            let all = self.list_all(ListConnectionsRequest::default()).await;
            all.into_iter().find(|c| c.remote_addr == remote)
        })
        .await
        .unwrap_or_else(|| panic!("placement never listed the connection from {remote}"))
    }

    /// A plain HTTP GET on the edge port: (status, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.ws_addr, path).await
    }
}

/// A WebSocket client over a real TCP socket.
#[derive(Debug)]
pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub local_addr: SocketAddr,
}

impl WsClient {
    /// Opens a socket; panics (with the HTTP status) if the upgrade is refused.
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Self {
        match Self::try_connect(addr, path, headers).await {
            Ok(c) => c,
            Err(status) => panic!("upgrade of {path} refused with HTTP {status}"),
        }
    }

    /// Opens a socket, or returns the HTTP status of the refusal.
    pub async fn try_connect(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, u16> {
        let tcp = TcpStream::connect(addr).await.expect("tcp connect");
        Self::handshake(tcp, addr, path, headers).await
    }

    /// Opens a socket whose kernel receive buffer is about `rcvbuf` bytes: a client that
    /// stops reading fills up quickly.
    pub async fn connect_small_rcvbuf(addr: SocketAddr, path: &str, rcvbuf: u32) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(rcvbuf).unwrap();
        let tcp = socket.connect(addr).await.expect("tcp connect");
        match Self::handshake(tcp, addr, path, &[]).await {
            Ok(c) => c,
            Err(status) => panic!("upgrade of {path} refused with HTTP {status}"),
        }
    }

    async fn handshake(
        tcp: TcpStream,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, u16> {
        let local_addr = tcp.local_addr().unwrap();
        let req = request(addr, path, headers);
        let fut = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp));
        match tokio::time::timeout(WAIT, fut)
            .await
            .expect("upgrade timed out")
        {
            Ok((ws, _)) => Ok(Self { ws, local_addr }),
            Err(WsError::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("upgrade of {path} failed: {e}"),
        }
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send(Message::text(text)).await;
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.send(Message::binary(data)).await;
    }

    /// Sends a text frame with any payload bytes, UTF-8 or not (a raw frame, masked as a
    /// client's must be).
    pub async fn send_raw_text(&mut self, payload: Vec<u8>) {
        let frame = Frame::message(payload, OpCode::Data(Data::Text), true);
        self.send(Message::Frame(frame)).await;
    }

    pub async fn send(&mut self, m: Message) {
        tokio::time::timeout(WAIT, self.ws.send(m))
            .await
            .expect("send timed out")
            .expect("send failed");
    }

    /// The next JSON text frame (control frames skipped); fails the test on timeout, close or
    /// anything that is not JSON.
    pub async fn recv_json(&mut self) -> Value {
        self.recv_json_within(WAIT).await
    }

    pub async fn recv_json_within(&mut self, limit: Duration) -> Value {
        let next = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        return serde_json::from_str::<Value>(&t)
                            .unwrap_or_else(|e| panic!("server sent invalid JSON {t:?}: {e}"));
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(f))) => {
                        panic!("expected a frame, got a close: {f:?}")
                    }
                    Some(Ok(other)) => panic!("expected a text frame, got {other:?}"),
                    Some(Err(e)) => panic!("expected a frame, the socket failed: {e}"),
                    None => panic!("expected a frame, the socket ended"),
                }
            }
        };
        match tokio::time::timeout(limit, next).await {
            Ok(v) => v,
            Err(_) => panic!("no frame within {limit:?}"),
        }
    }

    /// The next frame, which must have `"type": ty`.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let v = self.recv_json().await;
        assert_eq!(v["type"], ty, "expected a {ty:?} frame, got {v}");
        v
    }

    /// The next frame, which must be an error frame with `code`.
    pub async fn recv_error(&mut self, code: &str) -> Value {
        let v = self.recv_json().await;
        assert_eq!(v["type"], "error", "expected an error frame, got {v}");
        assert_eq!(v["code"], code, "expected error code {code:?}, got {v}");
        assert!(
            v["message"].is_string(),
            "error frame without a message: {v}"
        );
        v
    }

    /// Sends `{"type":"ping","id":…}` and expects the matching pong: the socket is alive and
    /// every answer to an earlier frame of this client has been received.
    pub async fn roundtrip(&mut self) {
        let id = format!("rt-{}", ulid::Ulid::new());
        self.send_json(&serde_json::json!({"type": "ping", "id": id}))
            .await;
        let v = self.recv_json().await;
        assert_eq!(v, serde_json::json!({"type": "pong", "id": id}));
    }

    /// Reads until a close frame: its (code, reason). Text frames before it are returned too.
    /// Fails if the connection ends without a close frame.
    pub async fn expect_close(&mut self) -> (u16, String) {
        self.expect_close_within(WAIT).await.0
    }

    pub async fn expect_close_within(&mut self, limit: Duration) -> ((u16, String), Vec<Value>) {
        let mut texts = Vec::new();
        let read = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(Some(f)))) => {
                        return (u16::from(f.code), f.reason.to_string());
                    }
                    Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
                    Some(Ok(Message::Text(t))) => {
                        texts
                            .push(serde_json::from_str(&t).unwrap_or(Value::String(t.to_string())));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        panic!("connection ended without a close frame ({e}); frames: {texts:?}")
                    }
                    None => panic!("connection ended without a close frame; frames: {texts:?}"),
                }
            }
        };
        let close = tokio::time::timeout(limit, read)
            .await
            .unwrap_or_else(|_| panic!("no close frame within {limit:?}"));
        (close, texts)
    }

    /// Reads the raw socket until the TCP connection ends, without writing anything (a
    /// WebSocket client would answer pings, and writing to a closed socket resets it and
    /// loses what is still unread). Fails if a close frame arrives. Returns the opcodes of
    /// the frames read. Use it on a client with no partly read frames.
    pub async fn expect_dropped(self) -> Vec<u8> {
        self.expect_dropped_within(WAIT).await
    }

    pub async fn expect_dropped_within(self, limit: Duration) -> Vec<u8> {
        let MaybeTlsStream::Plain(tcp) = self.ws.into_inner() else {
            unreachable!("plain TCP only")
        };
        tools::expect_dropped(tcp, limit, "client").await
    }

    /// Closes from the client side and waits for the server's answer.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let drain = async { while let Some(Ok(_)) = self.ws.next().await {} };
        let _ = tokio::time::timeout(WAIT, drain).await;
    }
}

fn request(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    req
}

/// The HTTP status of an upgrade request to `path` (101 when it was accepted).
pub async fn try_upgrade(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> u16 {
    match WsClient::try_connect(addr, path, headers).await {
        Ok(c) => {
            c.close().await;
            101
        }
        Err(status) => status,
    }
}

/// A plain HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.expect("tcp connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf))
        .await
        .expect("http response timed out")
        .expect("http read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Polls `cond` every 15 ms until it holds (true) or `timeout` passes (false).
pub async fn eventually(timeout: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    poll_for(timeout, async || cond().await.then_some(()))
        .await
        .is_some()
}

/// Polls `f` every 15 ms until it returns `Some` or `timeout` passes (`None`).
pub async fn poll_for<T>(timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
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

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
}
