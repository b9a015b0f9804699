//! The accept loop: request head, health and metrics endpoints, route match, auth, upgrade,
//! the connection task, and the drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bus::tls::ServerTls;
use bus::{SharedBus, SharedStore};
use proto::subject;
use proto::v1::ReportBatch;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use ulid::Ulid;

use crate::auth::{AuthError, RouteKeys};
use crate::config::{EdgeConfig, MonumentMode};
use crate::conn::{Conn, ConnError};
use crate::env::Env;
use crate::handle::{ConnHandle, ConnInfo};
use crate::http::{self, RequestHead};
use crate::metrics::{Gauges, Metrics};
use crate::protocol;
use crate::registry::Registry;
use crate::route::Route;
use crate::tls::Wire;
use crate::transport::deflate::{self, Agreement, Inflate, Window};
use crate::transport::msgpack;

/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// TLS handshakes in progress at once (each costs CPU before any limit applies); further
/// connections wait in the listen backlog.
const MAX_TLS_HANDSHAKES: usize = 256;
/// Extra time after the drain window for connection tasks to finish.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// The server's state: the routes, the admission state, and the [`Env`] every connection
/// gets.
#[derive(Debug)]
struct Node {
    routes: Vec<Arc<Route>>,
    env: Arc<Env>,
    /// Where the revocation bucket lives (none: nothing is revoked).
    revocations: Option<SharedStore>,
    cfg: EdgeConfig,
    draining: AtomicBool,
    upstream_ready: AtomicBool,
    limit: Arc<Semaphore>,
    /// Whether the listener is TLS (`https`/`wss`): the same-origin check compares schemes.
    secure: bool,
    /// Fixed documents answered to plain GETs (the embedded mode's demo page); set once.
    pages: std::sync::OnceLock<&'static [StaticPage]>,
}

/// A fixed document the edge answers to a plain `GET` of `path` (not an upgrade), e.g. the
/// demo page `switchboard dev` serves at `/`.
#[derive(Debug, Clone, Copy)]
pub struct StaticPage {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// Why an edge could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("route {path}: {message}")]
    Route { path: String, message: String },
    #[error("bus subscription failed")]
    Bus(#[from] bus::BusError),
}

/// The stores an edge uses, each optional.
#[derive(Debug, Default)]
pub struct Stores {
    /// Where key-value resources live (none: kv resources answer `unavailable`).
    pub resources: Option<SharedStore>,
    /// The store holding `revocation_bucket`.
    pub revocations: Option<SharedStore>,
    /// Topic history (none: history rules are not kept, and history topics are plain).
    pub history: Option<bus::SharedHistory>,
}

/// An edge node: build with [`Edge::new`], run with [`Edge::serve`].
#[derive(Debug, Clone)]
pub struct Edge {
    node: Arc<Node>,
}

impl Edge {
    /// `keys[i]` is the key material of route `i` (read by the binary); `revocations` is
    /// the store holding `revocation_bucket`; `history` keeps the routes' history rules
    /// (which it must have made already: [`bus::HistoryStore::ensure`]).
    pub fn new(
        node_id: String,
        cfg: EdgeConfig,
        keys: &[RouteKeys],
        bus: SharedBus,
        stores: Stores,
    ) -> Result<Self, EdgeError> {
        let Stores {
            resources: store,
            revocations,
            history,
        } = stores;
        let rules = cfg.history_rules();
        let none = RouteKeys::default();
        let routes = cfg
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Route::new(r, keys.get(i).unwrap_or(&none), &rules)
                    .map(Arc::new)
                    .map_err(|message| EdgeError::Route {
                        path: r.path.clone(),
                        message,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metrics = Arc::new(Metrics::default());
        let tracker = TaskTracker::new();
        let registry = Arc::new(Registry::new(
            node_id,
            Arc::clone(&bus),
            Arc::clone(&metrics),
            tracker.clone(),
            history.map(|store| crate::history::History { store, rules }),
        ));
        let env = Env {
            registry,
            bus,
            store,
            metrics,
            revoked: Arc::new(crate::revoke::Revocations::default()),
            tracker,
            request_timeout: cfg.request_timeout,
        };
        let node = Node {
            routes,
            env: Arc::new(env),
            revocations,
            limit: Arc::new(Semaphore::new(cfg.max_connections)),
            draining: AtomicBool::new(false),
            upstream_ready: AtomicBool::new(true),
            // The binary serves TLS exactly when `edge.tls` is set.
            secure: cfg.tls.is_some(),
            pages: std::sync::OnceLock::new(),
            cfg,
        };
        Ok(Self {
            node: Arc::new(node),
        })
    }

    /// Answers plain `GET`s of these paths with fixed documents (before serving; once).
    pub fn set_pages(&self, pages: &'static [StaticPage]) {
        let _ = self.node.pages.set(pages);
    }

    pub fn node_id(&self) -> &str {
        self.node.env.registry.node_id()
    }

    /// Connected to the bus (and, when set, to the coordinators) and not draining.
    pub fn is_ready(&self) -> bool {
        self.node.is_ready()
    }

    /// Whether the edge is draining for shutdown.
    pub fn is_draining(&self) -> bool {
        self.node.draining.load(Ordering::SeqCst)
    }

    /// Readiness of whatever the edge reports to (the coordinator streams).
    pub fn set_upstream_ready(&self, ready: bool) {
        self.node.upstream_ready.store(ready, Ordering::Relaxed);
    }

    /// The next batch of placement deltas (the first one is a full report).
    pub async fn next_report(&self, address: &str) -> ReportBatch {
        self.node.env.registry.next_report(address).await
    }

    /// Makes the next report batch a full one.
    pub fn resync_reports(&self) {
        self.node.env.registry.resync_reports();
    }

    /// The metrics text `/metrics` serves.
    pub fn metrics_text(&self) -> String {
        self.node.metrics_text()
    }

    /// Serves `listener` until `shutdown` is cancelled, then drains: upgrades are refused
    /// (503), `/readyz` answers 503, clients are closed with 1001 spread over the drain
    /// window; returns when every connection is gone or the grace period is over.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), EdgeError> {
        self.serve_with(listener, None, shutdown).await
    }

    /// [`Edge::serve`] with TLS on every connection (`wss://`, and HTTPS for the health and
    /// metrics endpoints), with the server config `tls` holds at each handshake.
    pub async fn serve_tls(
        &self,
        listener: TcpListener,
        tls: ServerTls,
        shutdown: CancellationToken,
    ) -> Result<(), EdgeError> {
        self.serve_with(listener, Some(tls), shutdown).await
    }

    async fn serve_with(
        &self,
        listener: TcpListener,
        tls: Option<ServerTls>,
        shutdown: CancellationToken,
    ) -> Result<(), EdgeError> {
        let node = &self.node;
        let subs = vec![
            node.env
                .bus
                .subscribe(subject::node(node.env.registry.node_id()), None)
                .await?,
            node.env
                .bus
                .subscribe(subject::EDGES.to_owned(), None)
                .await?,
        ];
        node.env.bus.flush().await?;
        let stop_commands = CancellationToken::new();
        let pump = tokio::spawn(crate::command::pump(
            Arc::clone(&node.env.registry),
            subs,
            stop_commands.clone(),
        ));
        // Token lifecycle: the revocation watch and the JWKS fetchers stop with the commands.
        if let Some(store) = &node.revocations {
            node.env.tracker.spawn(crate::revoke::watch(
                Arc::clone(&node.env.registry),
                Arc::clone(&node.env.revoked),
                Arc::clone(store),
                node.cfg.revocation_bucket.clone(),
                stop_commands.clone(),
            ));
        }
        for fetcher in node
            .routes
            .iter()
            .filter_map(|r| r.verifier.fetcher.clone())
        {
            node.env.tracker.spawn(fetcher.run(stop_commands.clone()));
        }
        let conns = TaskTracker::new();
        let done = CancellationToken::new();
        let accept = tokio::spawn(accept_loop(
            Arc::clone(node),
            listener,
            tls,
            conns.clone(),
            done.clone(),
        ));

        shutdown.cancelled().await;
        node.draining.store(true, Ordering::SeqCst);

        tracing::info!(connections = node.env.registry.len(), window = ?node.cfg.drain_window, "draining");
        drain(node).await;
        conns.close();
        if tokio::time::timeout(DRAIN_GRACE, conns.wait())
            .await
            .is_err()
        {
            tracing::warn!(left = conns.len(), "drain grace over; dropping connections");
        }
        done.cancel();
        let _ = accept.await;
        stop_commands.cancel();
        let _ = pump.await;
        node.env.tracker.close();
        let _ = tokio::time::timeout(DRAIN_GRACE, node.env.tracker.wait()).await;
        Ok(())
    }
}

impl Node {
    fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
            && self.env.bus.is_connected()
            && self.upstream_ready.load(Ordering::Relaxed)
    }

    fn metrics_text(&self) -> String {
        let all = self.env.registry.all();
        let mut by_route: std::collections::BTreeMap<&str, (u64, std::collections::HashSet<&str>)> =
            self.routes
                .iter()
                .map(|r| (r.cfg.path.as_str(), (0, std::collections::HashSet::new())))
                .collect();
        for h in &all {
            let info = h.info();
            let slot = by_route.entry(info.route.cfg.path.as_str()).or_default();
            slot.0 += 1;
            slot.1.insert(info.namespace.as_str());
        }
        let gauges = Gauges {
            connections: by_route
                .iter()
                .map(|(r, (n, _))| ((*r).to_owned(), *n))
                .collect(),
            namespaces: by_route
                .iter()
                .map(|(r, (_, ns))| ((*r).to_owned(), ns.len() as u64))
                .collect(),
            topics: self.env.registry.topic_count(),
            buffered_bytes: all.iter().map(|h| h.buffered() as u64).sum(),
            bus_connected: self.env.bus.is_connected(),
            bus_reconnects: self.env.bus.reconnects(),
            draining: self.draining.load(Ordering::Relaxed),
        };
        self.env.metrics.render(&gauges)
    }
}

async fn accept_loop(
    node: Arc<Node>,
    listener: TcpListener,
    tls: Option<ServerTls>,
    conns: TaskTracker,
    done: CancellationToken,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_TLS_HANDSHAKES));
    loop {
        let permit = match &tls {
            None => None,
            Some(_) => tokio::select! {
                () = done.cancelled() => break,
                p = Arc::clone(&handshakes).acquire_owned() => p.ok(),
            },
        };
        let (tcp, peer) = tokio::select! {
            () = done.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let node = Arc::clone(&node);
        match &tls {
            None => conns.spawn(async move { handle_tcp(node, tcp, peer).await }),
            Some(tls) => {
                // The config current now serves this connection for its whole life.
                let config = Arc::clone(&tls.borrow());
                conns.spawn(async move { handle_tls(node, config, tcp, peer, permit).await })
            }
        };
    }
}

/// Closes every connection with 1001, spread evenly over the drain window.
async fn drain(node: &Node) {
    let all = node.env.registry.all();
    let n = all.len().max(1) as u32;
    let start = tokio::time::Instant::now();
    for (i, h) in all.iter().enumerate() {
        let at = start + node.cfg.drain_window * (i as u32) / n;
        tokio::time::sleep_until(at).await;
        h.close(crate::handle::CloseRequest::new(
            1001,
            "server shutting down",
        ));
    }
}

/// One plain TCP connection's task.
async fn handle_tcp(node: Arc<Node>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    handle(node, tcp, peer).await;
}

/// One TLS connection's task: the handshake (holding one of the handshake permits), then
/// as plain.
async fn handle_tls(
    node: Arc<Node>,
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
    handshake: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let _ = tcp.set_nodelay(true);
    let accepted = crate::tls::accept(config, tcp, node.cfg.handshake_timeout).await;
    drop(handshake);
    match accepted {
        Ok(tls) => handle(node, tls, peer).await,
        // A scanner or a plain-HTTP client on the TLS port: nothing to answer.
        Err(error) => tracing::debug!(%peer, %error, "tls handshake failed"),
    }
}

/// One connection's task. Its phases are boxed so that the task itself, which lives as
/// long as the connection, is a few pointers: nothing of the request head, the admission
/// or the hooks is kept while the connection runs.
async fn handle<W: Wire>(node: Arc<Node>, wire: W, peer: SocketAddr) {
    let Some(up) = Box::pin(answer_request(&node, wire, peer)).await else {
        return;
    };
    let span = tracing::info_span!("conn", conn = %up.handle.id(), %peer);
    Box::pin(run_conn(node, up).instrument(span)).await;
}

/// Reads the request head; answers health and metrics requests, or upgrades.
async fn answer_request<W: Wire>(
    node: &Arc<Node>,
    mut tcp: W,
    peer: SocketAddr,
) -> Option<Upgraded<W::Io>> {
    let (head, rest) = match http::read_head(&mut tcp, node.cfg.handshake_timeout).await {
        Ok(x) => x,
        Err(error) => {
            tracing::debug!(%peer, %error, "bad request head");
            let status = match error {
                http::HeadError::TooLarge => Some(431),
                http::HeadError::Malformed(_) => Some(400),
                _ => None,
            };
            if let Some(status) = status {
                let _ = http::respond(&mut tcp, status, "text/plain", "bad request\n").await;
            }
            return None;
        }
    };
    let result = match head.path.as_str() {
        "/healthz" => http::respond(&mut tcp, 200, "text/plain", "ok\n").await,
        "/readyz" => {
            let (status, body) = readiness(node);
            http::respond(&mut tcp, status, "text/plain", body).await
        }
        "/metrics" => {
            let body = node.metrics_text();
            http::respond(&mut tcp, 200, "text/plain; version=0.0.4", &body).await
        }
        path if head.method == "GET" && !head.is_upgrade() => {
            let pages = node.pages.get().copied().unwrap_or_default();
            match pages.iter().find(|p| p.path == path) {
                Some(page) => http::respond(&mut tcp, 200, page.content_type, page.body).await,
                None => return upgrade(node, tcp, peer, head, rest).await,
            }
        }
        _ => return upgrade(node, tcp, peer, head, rest).await,
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "response not written");
    }
    None
}

fn readiness(node: &Node) -> (u16, &'static str) {
    if node.draining.load(Ordering::Relaxed) {
        (503, "draining\n")
    } else if !node.env.bus.is_connected() {
        (503, "bus disconnected\n")
    } else if !node.upstream_ready.load(Ordering::Relaxed) {
        (503, "coordinator unreachable\n")
    } else {
        (200, "ready\n")
    }
}

async fn refuse<T, W: Wire>(
    node: &Node,
    tcp: &mut W,
    status: u16,
    reason: &str,
    body: &str,
) -> Option<T> {
    node.env.metrics.upgrades_refused.inc(reason);
    let _ = http::respond(tcp, status, "text/plain", &format!("{body}\n")).await;
    None
}

/// Route, checks, auth, the upgrade hook, and the 101; `None` when refused (answered).
async fn admit<W: Wire>(
    node: &Arc<Node>,
    tcp: &mut W,
    peer: SocketAddr,
    head: &mut RequestHead,
) -> Option<Admitted> {
    let matched = node.routes.iter().find_map(|r| {
        http::match_path(&r.cfg.path, &head.path).map(|params| (Arc::clone(r), params))
    });
    let Some((route, path_params)) = matched else {
        return refuse(node, tcp, 404, "no_route", "no route at this path").await;
    };
    if route.cfg.dialect.row().monument_modes && route.cfg.monument == MonumentMode::Off {
        return refuse(
            node,
            tcp,
            404,
            "no_route",
            "websockets are off on this route",
        )
        .await;
    }
    if head.method != "GET" {
        return refuse(node, tcp, 405, "method", "websocket upgrades use GET").await;
    }
    if head.version < 1 {
        return refuse(
            node,
            tcp,
            400,
            "bad_handshake",
            "websocket upgrades need HTTP/1.1",
        )
        .await;
    }
    if !head.is_upgrade() || head.header("sec-websocket-version") != Some("13") {
        return refuse(
            node,
            tcp,
            426,
            "not_websocket",
            "this path only speaks websocket version 13",
        )
        .await;
    }
    let Some(key) = head
        .header("sec-websocket-key")
        .filter(|k| http::is_valid_key(k))
        .map(str::to_owned)
    else {
        return refuse(
            node,
            tcp,
            400,
            "bad_handshake",
            "sec-websocket-key must be base64 of 16 bytes",
        )
        .await;
    };
    if node.draining.load(Ordering::Relaxed) {
        return refuse(node, tcp, 503, "draining", "node is draining").await;
    }
    let Ok(permit) = Arc::clone(&node.limit).try_acquire_owned() else {
        return refuse(
            node,
            tcp,
            503,
            "capacity",
            "node is at its connection limit",
        )
        .await;
    };
    let mut verdict = route.verifier.admit(&route.cfg, head, node.secure);
    // A key set from a URL may have gained the token's key: refetch (rate-limited; or wait
    // for the fetch under way), then check again.
    if matches!(verdict, Err(AuthError::UnknownKey))
        && let Some(fetcher) = &route.verifier.fetcher
    {
        fetcher.refetch_for_unknown_kid().await;
        verdict = route.verifier.admit(&route.cfg, head, node.secure);
    }
    // The token has been read: from here on, nothing of the request can carry it further.
    crate::auth::strip_credentials(&route.cfg, head);
    let verdict = verdict.and_then(|id| {
        let ids = crate::handle::TokenIds::of(&id.claims);
        if node.env.revoked.revokes(&ids, &id.namespace) {
            return Err(AuthError::Revoked);
        }
        Ok(id)
    });
    let mut identity = match verdict {
        Ok(id) => id,
        Err(e) => {
            // The details (jsonwebtoken's text, the namespace asked for) stay in the log.
            tracing::debug!(%peer, error = %e, "upgrade refused");
            return refuse(node, tcp, e.status(), e.reason(), e.reason()).await;
        }
    };
    if let Some(hook) = &route.cfg.hooks.upgrade {
        match intercept(node, &hook.publish, &route, head, peer, &identity).await {
            // The context adds to the claims, never replaces the token's own: expiry and
            // revocation (`exp`, `jti`, `sub`) must stay the token's.
            Ok(context) => {
                for (key, value) in context {
                    identity.claims.entry(key).or_insert(value);
                }
            }
            Err((status, reason, body)) => {
                return refuse(node, tcp, status, reason, &body).await;
            }
        }
    }
    // permessage-deflate when the route has it, the client offers it and the route's
    // compression state is within its budget; the MessagePack subprotocol when asked for.
    let echo = route.cfg.dialect.row().echo;
    let compression = &route.cfg.compression;
    let deflate = (compression.enabled && route.deflate_budget.admits())
        .then(|| deflate::negotiate(head.header("sec-websocket-extensions")))
        .flatten();
    let msgpack = !echo && msgpack::requested(head.header("sec-websocket-protocol"));
    let protocol = msgpack.then_some(msgpack::SUBPROTOCOL);
    if tcp
        .write_all(
            http::switching_protocols(&key, deflate.map(Agreement::response).as_deref(), protocol)
                .as_bytes(),
        )
        .await
        .is_err()
    {
        return None;
    }
    Some(Admitted {
        route,
        path_params,
        identity,
        permit,
        deflate: deflate.map(|a| a.window),
        msgpack,
    })
}

/// Detaches a connection from the registry however its task ends, a panic included: one
/// left attached would keep its subscriptions, its place in placement and its slot in the
/// user's connection limit.
struct Detach<'a> {
    registry: &'a crate::registry::Registry,
    handle: &'a ConnHandle,
}

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        self.registry.detach(self.handle);
    }
}

/// What an admitted upgrade request carries into the connection.
struct Admitted {
    route: Arc<Route>,
    path_params: Vec<(String, String)>,
    identity: crate::auth::Identity,
    permit: tokio::sync::OwnedSemaphorePermit,
    deflate: Option<Window>,
    msgpack: bool,
}

/// An admitted connection after the handshake, ready to run.
struct Upgraded<Io> {
    ws: WebSocketStream<Inflate<Io>>,
    handle: ConnHandle,
    permit: tokio::sync::OwnedSemaphorePermit,
    /// The `?resume=` token, if the client sent one.
    resume: Option<String>,
}

/// The query parameter a client passes its resume token in on the upgrade, so that the
/// route's onconnect hook can be skipped (docs/PROTOCOL.md §4.6).
const RESUME_QUERY: &str = "resume";

async fn upgrade<W: Wire>(
    node: &Arc<Node>,
    mut tcp: W,
    peer: SocketAddr,
    mut head: RequestHead,
    rest: Vec<u8>,
) -> Option<Upgraded<W::Io>> {
    let span = tracing::info_span!("edge.upgrade", path = %head.path, %peer);
    // A resume token is the session's to check, and goes nowhere else: not to the upgrade
    // hook, not to backends' context, not into placement.
    let resume = head.query.remove(RESUME_QUERY);
    let admitted = admit(node, &mut tcp, peer, &mut head)
        .instrument(span)
        .await?;
    let Admitted {
        route,
        path_params,
        identity,
        permit,
        deflate,
        msgpack,
    } = admitted;
    let ws_config = route.ws;
    let mut params: Vec<(String, String)> = head.query.into_iter().collect();
    params.extend(path_params);
    params.sort();
    let info = ConnInfo {
        id: Ulid::new(),
        namespace: identity.namespace,
        user: identity.user,
        remote: peer,
        connected_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
        claims: identity.claims,
        params,
        route,
    };
    // A client that takes none of our bytes for a heartbeat interval and its timeout is as
    // dead as one that does not answer a ping.
    let heartbeat = &info.route.cfg.heartbeat;
    let stall_limit =
        (!heartbeat.interval.is_zero()).then(|| heartbeat.interval + heartbeat.timeout);
    let budget = Arc::clone(&info.route.deflate_budget);
    let max_payload = info.route.cfg.max_payload;
    let agreed = crate::handle::Agreed { deflate, msgpack };
    let (handle, socket) = tcp.attach(info, agreed, stall_limit);
    // What the client sent after the head goes through the inflating filter too.
    let (socket, rest) = if deflate.is_some() {
        (
            Inflate::deflate(socket, max_payload, budget, &rest),
            Vec::new(),
        )
    } else {
        (Inflate::plain(socket), rest)
    };
    let ws =
        WebSocketStream::from_partially_read(socket, rest, Role::Server, Some(ws_config)).await;
    Some(Upgraded {
        ws,
        handle,
        permit,
        resume,
    })
}

/// The upgrade hook (HyperExpress's upgrade interception): a backend sees the request before
/// the upgrade and admits it with a context, or refuses it with an HTTP status.
async fn intercept(
    node: &Node,
    subject: &str,
    route: &Route,
    head: &RequestHead,
    peer: SocketAddr,
    identity: &crate::auth::Identity,
) -> Result<serde_json::Map<String, Value>, (u16, &'static str, String)> {
    let body = serde_json::json!({
        "route": route.cfg.path,
        "path": head.path,
        "remote_addr": peer.to_string(),
        "namespace": identity.namespace,
        "username": identity.user,
        "claims": identity.claims,
        "query": head.query,
        "headers": head.headers,
    });
    let msg = bus::Outgoing::new(subject.to_owned(), body.to_string());
    let reply = match node.env.bus.request(msg, node.env.request_timeout).await {
        Ok(m) => m,
        Err(error) => {
            tracing::warn!(%peer, %error, "upgrade hook did not answer");
            return Err((503, "upgrade_hook", "upgrade hook unavailable".into()));
        }
    };
    let Ok(Value::Object(mut answer)) = serde_json::from_slice::<Value>(&reply.payload) else {
        let body = "upgrade hook answered something else than a JSON object";
        return Err((502, "upgrade_hook", body.into()));
    };
    if let Some(error) = answer.remove("error") {
        let status = answer
            .get("status")
            .and_then(Value::as_u64)
            .and_then(|s| u16::try_from(s).ok())
            .filter(|s| (400..500).contains(s))
            .unwrap_or(403);
        let text = error
            .as_str()
            .map_or_else(|| error.to_string(), str::to_owned);
        return Err((status, "upgrade_hook", text));
    }
    Ok(match answer.remove("context") {
        Some(Value::Object(c)) => c,
        _ => serde_json::Map::new(),
    })
}

async fn run_conn<Io: AsyncRead + AsyncWrite + Unpin + Send>(node: Arc<Node>, up: Upgraded<Io>) {
    let Upgraded {
        ws,
        handle,
        permit,
        resume,
    } = up;
    let info = handle.info();
    let mut conn = Conn::new(ws, handle.clone(), Arc::clone(&node.env), resume.as_deref());
    node.env.metrics.upgrades.inc();
    let attached = node.env.registry.attach(&handle);
    // A drain snapshots the registry after setting the flag: a connection attached after the
    // snapshot sees the flag here and leaves on its own.
    if attached && node.draining.load(Ordering::SeqCst) {
        handle.close(crate::handle::CloseRequest::new(
            1001,
            "server shutting down",
        ));
    }
    // Likewise a revocation recorded after the upgrade's check but scanned before the attach.
    if attached
        && node
            .env
            .revoked
            .revokes(&handle.token_ids(), &info.namespace)
    {
        let (code, reason) = crate::handle::TOKEN_REVOKED;
        handle.close(crate::handle::CloseRequest::new(code, reason));
    }
    tracing::info!(ns = %info.namespace, user = %info.user, route = %info.route.cfg.path, "connection open");
    let end = if attached {
        let detach = Detach {
            registry: &node.env.registry,
            handle: &handle,
        };
        let end = Box::pin(conn.run()).await;
        for watch in std::mem::take(&mut conn.watches).into_values() {
            watch.cancel();
        }
        drop(detach);
        end
    } else {
        Box::pin(conn.close_now(ConnError::TooManyConnections)).await
    };
    let code = end.code();
    match end {
        // A client may send any code: those the protocol does not know share one label.
        ConnError::ClientClosed(Some(c)) => node
            .env
            .metrics
            .closes
            .inc(crate::metrics::client_close_label(c)),
        _ => node.env.metrics.closes.inc(&code.to_string()),
    }
    if code == 1013 {
        node.env.metrics.slow_consumer_closes.inc();
    }
    if end.client_fault() {
        tracing::info!(code, reason = %end, "connection closed");
    } else {
        tracing::info!(code, reason = %end, "connection closed by the server");
    }
    if attached {
        let reason = end.close_frame().map(|(_, r)| r).unwrap_or_default();
        Box::pin(protocol::onclose(
            &handle,
            node.env.registry.node_id(),
            &node.env.bus,
            code,
            &reason,
        ))
        .await;
    }
    // Boxed: its buffer lives only while lingering, not in every connection's task. The
    // slot is held meanwhile: a lingering socket is still an open descriptor.
    Box::pin(conn.linger(&end)).await;
    drop(permit);
}
