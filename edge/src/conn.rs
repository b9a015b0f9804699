//! One task serves each socket ([`Conn`]): it reads, answers and writes what is queued;
//! everyone else holds a [`ConnHandle`], the connection's [`Outlet`] for the fan-out. Pumps
//! may also write pre-framed bytes to an idle plain socket directly, under the rules of
//! [`crate::transport::ws`] (never to a TLS one).
//!
//! **Invariant:** nothing awaits a client. [`ConnHandle::deliver`] never blocks: it queues
//! the frame, or refuses it when the bounded outbound queue is full (and, by policy, closes
//! the slow consumer with 1013).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use ulid::Ulid;

use edge_core::session::{Action, Close, Failure, RequestId, Session};

use crate::config::OnFull;
use crate::protocol;
use crate::server::{Route, Shared};
use crate::transport::outbox::Outbox;
use crate::transport::ws::{self, Line};
use crate::transport::{Batch, Direct, Outlet};
pub use crate::transport::{CloseRequest, Delivery};
/// How long a closing handshake may take before the TCP connection is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What is known about a connection, fixed at admission.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: Ulid,
    pub namespace: String,
    pub user: String,
    pub remote: SocketAddr,
    pub connected_at_ms: i64,
    pub claims: Map<String, Value>,
    /// Query and path parameters of the upgrade request (the token parameter removed).
    pub params: Vec<(String, String)>,
    pub route: Arc<Route>,
}

/// The clonable front door of a connection.
#[derive(Debug, Clone)]
pub struct ConnHandle(Arc<HandleInner>);

#[derive(Debug)]
struct HandleInner {
    info: ConnInfo,
    outbox: Outbox,
    on_full: OnFull,
    kill: CancellationToken,
    close: Mutex<Option<CloseRequest>>,
    line: Line,
    /// What revocations match: the claims of the token in force (a refresh replaces them).
    token: Mutex<TokenIds>,
}

/// The claims of a connection's current token that a revocation can name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TokenIds {
    pub(crate) jti: Option<String>,
    pub(crate) sub: Option<String>,
}

impl TokenIds {
    pub(crate) fn of(claims: &Map<String, Value>) -> Self {
        let get = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
        Self {
            jti: get("jti"),
            sub: get("sub"),
        }
    }
}

impl ConnHandle {
    pub(crate) fn new(info: ConnInfo, line: Line) -> Self {
        let out = &info.route.cfg.outbound;
        let inner = HandleInner {
            outbox: Outbox::new(out.queue, out.max_bytes),
            on_full: out.on_full,
            kill: CancellationToken::new(),
            close: Mutex::new(None),
            line,
            token: Mutex::new(TokenIds::of(&info.claims)),
            info,
        };
        Self(Arc::new(inner))
    }

    pub fn info(&self) -> &ConnInfo {
        &self.0.info
    }

    pub fn id(&self) -> Ulid {
        self.0.info.id
    }

    /// Bytes queued and not yet written to the socket.
    pub fn buffered(&self) -> usize {
        self.0.outbox.buffered()
    }

    /// Queues a frame. Never awaits: one slow client must not slow anyone else.
    pub fn deliver(&self, frame: &Utf8Bytes) -> Delivery {
        if self.0.line.is_closed() {
            return Delivery::Gone;
        }
        match self.0.outbox.push(frame) {
            Ok(()) => Delivery::Queued,
            Err(crate::transport::outbox::Full) => self.refuse(),
        }
    }

    pub(crate) fn line(&self) -> &Line {
        &self.0.line
    }

    /// Asks the task to close; the first request wins.
    pub fn close(&self, req: CloseRequest) {
        let mut slot = self.0.close.lock().expect("close slot poisoned");
        if slot.is_none() {
            *slot = Some(req);
        }
        drop(slot);
        self.0.kill.cancel();
    }

    /// The `jti` and `sub` of the token in force.
    pub(crate) fn token_ids(&self) -> TokenIds {
        self.0.token.lock().expect("token slot poisoned").clone()
    }

    fn set_token_ids(&self, ids: TokenIds) {
        *self.0.token.lock().expect("token slot poisoned") = ids;
    }

    fn refuse(&self) -> Delivery {
        if self.0.on_full == OnFull::Close {
            self.close(CloseRequest::new(1013, "slow consumer"));
        }
        Delivery::Refused
    }

    fn take_close(&self) -> Option<CloseRequest> {
        self.0.close.lock().expect("close slot poisoned").clone()
    }
}

/// The fan-out's view: a WebSocket connection writes a batch straight to its free plain
/// socket ([`ws::Line`]) and queues the rest in its outbox.
impl Outlet for ConnHandle {
    fn try_write(&self, batch: &mut Batch) -> Direct {
        self.0
            .line
            .try_write(batch, || self.0.outbox.buffered() != 0)
    }

    fn deliver(&self, message: &Utf8Bytes) -> Delivery {
        ConnHandle::deliver(self, message)
    }

    fn close(&self, req: CloseRequest) {
        ConnHandle::close(self, req);
    }
}

impl AsRef<Line> for ConnHandle {
    fn as_ref(&self) -> &Line {
        &self.0.line
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// With the code of the client's close frame, if it sent one.
    #[error("client closed the connection")]
    ClientClosed(Option<u16>),
    #[error("websocket transport failed")]
    Transport(#[source] tungstenite::Error),
    #[error("client message larger than {0} bytes")]
    TooBig(usize),
    #[error("client sent a text frame that is not UTF-8")]
    InvalidUtf8,
    #[error("client sent a binary frame on a text route")]
    Binary,
    #[error("no frame from the client for {0:?}")]
    Idle(Duration),
    #[error("no pong within {0:?}")]
    HeartbeatTimeout(Duration),
    #[error("client exceeded the rate limit repeatedly")]
    RateLimited,
    #[error("connect hook refused the connection")]
    Refused,
    #[error("too many connections for this user")]
    TooManyConnections,
    #[error("token expired without a refresh")]
    TokenExpired,
    #[error("closed on request: {} {}", .0.code, .0.reason)]
    Requested(CloseRequest),
}

/// Close code and reason when a token expires on an open connection.
pub const TOKEN_EXPIRED: (u16, &str) = (4001, "token expired");
/// Close code and reason when a connection's token is revoked.
pub const TOKEN_REVOKED: (u16, &str) = (4003, "token revoked");

impl ConnError {
    /// The close frame to send, or `None` to drop the TCP connection without one.
    pub fn close_frame(&self) -> Option<(u16, String)> {
        let (code, reason) = match self {
            Self::ClientClosed(_) | Self::Transport(_) | Self::HeartbeatTimeout(_) => return None,
            Self::TooBig(_) => (1009, "message too big"),
            Self::InvalidUtf8 => (1007, "invalid utf-8"),
            Self::Binary => (1003, "binary frames not accepted"),
            Self::Idle(_) => (1000, "idle timeout"),
            Self::RateLimited => (1008, "rate limit exceeded"),
            Self::Refused => (1008, "connection refused"),
            Self::TooManyConnections => (1008, "too many connections for this user"),
            Self::TokenExpired => TOKEN_EXPIRED,
            Self::Requested(r) if r.hard => return None,
            Self::Requested(r) => return Some((r.code, r.reason.clone())),
        };
        Some((code, reason.to_owned()))
    }

    /// The code reported for metrics and the close hook (1006: closed without a frame).
    pub fn code(&self) -> u16 {
        if let Self::ClientClosed(Some(c)) = self {
            return *c;
        }
        self.close_frame().map_or(1006, |(c, _)| c)
    }

    /// Whether the client is to blame (sets the log level).
    pub fn client_fault(&self) -> bool {
        !matches!(self, Self::Requested(_))
    }
}

/// A backend request in flight, and which of the session's it answers.
pub(crate) type Inflight = BoxFuture<'static, (RequestId, Result<bus::Message, bus::BusError>)>;

/// The task state of one connection: the socket, and the [`Session`] it drives.
pub(crate) struct Conn<S> {
    pub(crate) ws: WebSocketStream<S>,
    pub(crate) handle: ConnHandle,
    pub(crate) shared: Arc<Shared>,
    /// The protocol: what to answer, subscribe, ask backends, and when to close.
    pub(crate) session: Session,
    /// Running resource watches, by the session's watch key.
    pub(crate) watches: HashMap<String, CancellationToken>,
    pub(crate) inflight: FuturesUnordered<Inflight>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    pub(crate) fn new(ws: WebSocketStream<S>, handle: ConnHandle, shared: Arc<Shared>) -> Self {
        let route = &handle.info().route;
        let exp = crate::auth::expiry(&handle.info().claims);
        let session = Session::new(
            Arc::clone(&route.rules),
            handle.id().to_string(),
            Instant::now().into_std(),
            unix_ms(),
            exp,
        );
        Self {
            ws,
            handle,
            shared,
            session,
            watches: HashMap::new(),
            inflight: FuturesUnordered::new(),
        }
    }

    /// A refresh was accepted: the new token's claims are the ones revocations match.
    pub(crate) fn refreshed(&mut self, claims: &Map<String, Value>) {
        self.handle.set_token_ids(TokenIds::of(claims));
    }

    pub(crate) fn route(&self) -> &Arc<Route> {
        &self.handle.0.info.route
    }

    /// Runs until the connection ends; sends the close frame; returns why it ended.
    pub(crate) async fn run(&mut self) -> ConnError {
        let end = self.serve().await;
        self.end(end).await
    }

    /// Ends a connection that never ran (refused after the upgrade).
    pub(crate) async fn close_now(mut self, end: ConnError) -> ConnError {
        self.end(end).await
    }

    /// Sends the close frame `end` calls for, if any, and closes the socket.
    async fn end(&mut self, end: ConnError) -> ConnError {
        if let Some((code, reason)) = end.close_frame() {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.close(Some(frame))).await;
        }
        self.handle.line().close();
        end
    }

    async fn serve(&mut self) -> ConnError {
        let handle = self.handle.clone();
        let max_payload = self.route().cfg.max_payload;
        // The cancellation future and one timer live across iterations: a wake-up registers
        // nothing new. The timer is armed for the session's earliest deadline and moved only
        // when that comes earlier (activity moves the idle deadline later: the timer then
        // fires early, finds nothing due, and is re-armed).
        let killed = handle.0.kill.cancelled();
        tokio::pin!(killed);
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let deadline = |s: &Session| s.poll_timeout().map_or(far, Instant::from_std);
        let mut armed = deadline(&self.session);
        let timer = sleep_until(armed);
        tokio::pin!(timer);
        let mut client_close: Option<u16> = None;
        let requested = || {
            let req = handle.take_close();
            ConnError::Requested(req.unwrap_or_else(|| CloseRequest::new(1000, "")))
        };
        // The connect hook's request, if the route has one.
        if let Err(e) = Box::pin(self.drive()).await {
            return e;
        }

        loop {
            // Give the socket back to the pumps once tungstenite has written everything; after
            // the client's close, keep it: no data frame may follow the close reply.
            if handle.line().held_by_task() {
                let settle = pin!(ws::settle(
                    &mut self.ws,
                    handle.line(),
                    client_close.is_some()
                ));
                tokio::select! {
                    biased;
                    () = &mut killed => return requested(),
                    r = settle => if let Err(e) = r { return ConnError::Transport(e); },
                }
            }
            let reads_paused = self.session.reads_paused();
            tokio::select! {
                biased;
                () = &mut killed => return requested(),
                Some((request, result)) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.session.on_reply(request, result.as_ref().map(|m| &m.payload[..]).map_err(failure));
                }
                // A pump handed over the socket with a partial write: the loop's top ends it.
                () = ws::rest_handed_over(handle.line()) => {}
                frame = handle.0.outbox.recv() => {
                    let write = pin!(self.write_batch(frame));
                    tokio::select! {
                        r = write => if let Err(e) = r { return e; },
                        () = &mut killed => continue,
                    }
                }
                msg = self.ws.next(), if !reads_paused => {
                    let msg = match msg {
                        None => return ConnError::ClientClosed(client_close),
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            return match read_error(e, max_payload) {
                                ConnError::ClientClosed(None) => ConnError::ClientClosed(client_close),
                                other => other,
                            };
                        }
                    };
                    self.session.on_received();
                    match msg {
                        Message::Text(text) => {
                            self.shared.metrics.frames_in.inc();
                            self.shared.metrics.bytes_in.add(text.len() as u64);
                            // Nothing a pump writes may overtake this frame's answer.
                            handle.line().hold().await;
                            self.session.on_text(&text, Instant::now().into_std());
                        }
                        Message::Binary(_) => return ConnError::Binary,
                        // tungstenite queued the pong; the session says whether it goes now.
                        Message::Ping(_) => self.session.on_ping(Instant::now().into_std()),
                        Message::Pong(_) | Message::Frame(_) => {}
                        Message::Close(frame) => {
                            // tungstenite answers the close; the next read ends the stream.
                            handle.line().hold().await;
                            client_close = Some(frame.map_or(1005, |f| u16::from(f.code)));
                        }
                    }
                }
                () = &mut timer => {
                    self.session.handle_timeout(Instant::now().into_std());
                    armed = far;
                }
            }
            if let Err(e) = Box::pin(self.drive()).await {
                return e;
            }
            let next = deadline(&self.session);
            if next < armed {
                armed = next;
                timer.as_mut().reset(armed);
            }
        }
    }

    /// Carries out what the session asks, in order, until it asks nothing more.
    async fn drive(&mut self) -> Result<(), ConnError> {
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::Send(frame) => self.push(frame).await?,
                Action::Ping => self
                    .ws
                    .send(Message::Ping(Default::default()))
                    .await
                    .map_err(ConnError::Transport)?,
                Action::FlushPong => self.ws.flush().await.map_err(ConnError::Transport)?,
                Action::Close(why) => return Err(why.into()),
                action => protocol::perform(self, action).await,
            }
        }
        Ok(())
    }

    /// Writes `first` and whatever else is queued, then flushes once.
    async fn write_batch(&mut self, first: Utf8Bytes) -> Result<(), ConnError> {
        let wrote = ws::write_queued(&mut self.ws, &self.handle.0.outbox, first)
            .await
            .map_err(ConnError::Transport)?;
        self.shared.metrics.frames_out.add(wrote.frames);
        self.shared.metrics.bytes_out.add(wrote.bytes as u64);
        Ok(())
    }

    /// Sends one frame built by this connection (a reply or an error), bypassing the queue.
    pub(crate) async fn push(&mut self, frame: String) -> Result<(), ConnError> {
        self.shared.metrics.frames_out.inc();
        ws::send(&mut self.ws, frame.into())
            .await
            .map_err(ConnError::Transport)
    }
}

/// However the task ends (even by a panic), pumps stop writing, the peer sees the socket
/// close although handles live on, and the connection's watches stop.
impl<S> Drop for Conn<S> {
    fn drop(&mut self) {
        self.handle.line().close();
        for watch in self.watches.values() {
            watch.cancel();
        }
    }
}

fn read_error(e: tungstenite::Error, max: usize) -> ConnError {
    match e {
        tungstenite::Error::Capacity(_) => ConnError::TooBig(max),
        tungstenite::Error::Utf8(_) => ConnError::InvalidUtf8,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            ConnError::ClientClosed(None)
        }
        other => ConnError::Transport(other),
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What the session is told of a failed backend request (the bus's details stay here).
fn failure(e: &bus::BusError) -> Failure {
    match e {
        bus::BusError::NoResponders { .. } => Failure::NoResponders,
        bus::BusError::Timeout { timeout, .. } => Failure::Timeout(*timeout),
        other => Failure::Unavailable(other.to_string()),
    }
}

impl From<Close> for ConnError {
    fn from(why: Close) -> Self {
        match why {
            Close::Idle(after) => Self::Idle(after),
            Close::HeartbeatTimeout(after) => Self::HeartbeatTimeout(after),
            Close::RateLimited => Self::RateLimited,
            Close::Refused => Self::Refused,
            Close::TokenExpired => Self::TokenExpired,
        }
    }
}
