//! The connection driver: one task serves each socket ([`Conn`]). It reads frames into the
//! connection's [`Session`] (the pure protocol), carries out the actions the session asks
//! for, in order, and writes what is queued; everyone else holds the connection's
//! [`ConnHandle`]. What a connection may use of the node is its [`Env`], handed down
//! explicitly.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use edge_core::session::{Action, Close, Failure, RequestId, Session, Subscribed};

use crate::env::Env;
use crate::handle::{CloseRequest, ConnHandle, TOKEN_EXPIRED, unix_ms};
use crate::route::Route;
use crate::transport::deflate::OverBudget;
use crate::transport::{Out, msgpack, ws};
use crate::{protocol, resources};

/// How long a closing handshake may take before the TCP connection is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// After the edge closed a connection, how long and how much of what the client still sends
/// is read and dropped (lingering close, as nginx does): a socket closed with unread input
/// answers with a reset, which discards the close frame still queued for a slow reader.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

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
    #[error("client sent a frame that is not MessagePack")]
    NotMessagePack,
    #[error("compressed message past the route's compression memory budget")]
    CompressionBusy,
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

impl ConnError {
    /// The close frame to send, or `None` to drop the TCP connection without one.
    pub fn close_frame(&self) -> Option<(u16, String)> {
        let (code, reason) = match self {
            Self::ClientClosed(_) | Self::Transport(_) | Self::HeartbeatTimeout(_) => return None,
            Self::TooBig(_) => (1009, "message too big"),
            Self::InvalidUtf8 => (1007, "invalid utf-8"),
            Self::Binary => (1003, "binary frames not accepted"),
            Self::NotMessagePack => (1007, "invalid messagepack"),
            Self::CompressionBusy => (1013, "compression busy, try again later"),
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
        !matches!(self, Self::Requested(_) | Self::CompressionBusy)
    }
}

/// A backend request in flight, and which of the session's it answers.
pub(crate) type Inflight = BoxFuture<'static, (RequestId, Result<bus::Message, bus::BusError>)>;

/// The task state of one connection: the socket, and the [`Session`] it drives.
pub(crate) struct Conn<S> {
    pub(crate) ws: WebSocketStream<S>,
    pub(crate) handle: ConnHandle,
    pub(crate) env: Arc<Env>,
    /// The protocol: what to answer, subscribe, ask backends, and when to close.
    pub(crate) session: Session,
    /// Running resource watches, by the session's watch key.
    pub(crate) watches: BTreeMap<String, CancellationToken>,
    pub(crate) inflight: FuturesUnordered<Inflight>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// `resume`: the token the client sent on the upgrade, if any.
    pub(crate) fn new(
        ws: WebSocketStream<S>,
        handle: ConnHandle,
        env: Arc<Env>,
        resume: Option<&str>,
    ) -> Self {
        let route = &handle.info().route;
        let info = handle.info();
        let exp = crate::auth::expiry(&info.claims);
        let (now, now_ms) = (Instant::now().into_std(), unix_ms());
        let session = Session::new(
            Arc::clone(&route.rules),
            handle.id().to_string(),
            now,
            now_ms,
            exp,
        )
        .resumable(&info.user, &info.namespace, now, now_ms)
        .resuming(resume, now);
        Self {
            ws,
            handle,
            env,
            session,
            watches: BTreeMap::new(),
            inflight: FuturesUnordered::new(),
        }
    }

    pub(crate) fn route(&self) -> &Arc<Route> {
        self.handle.route()
    }

    /// Runs until the connection ends; sends the close frame; returns why it ended.
    pub(crate) async fn run(&mut self) -> ConnError {
        let end = self.serve().await;
        self.end(end).await
    }

    /// Ends a connection that never ran (refused after the upgrade).
    pub(crate) async fn close_now(&mut self, end: ConnError) -> ConnError {
        self.end(end).await
    }

    /// Sends the close frame `end` calls for, if any, and closes the socket: only its write
    /// side when the edge closed first, see [`Self::linger`].
    async fn end(&mut self, end: ConnError) -> ConnError {
        let Some((code, reason)) = end.close_frame() else {
            self.handle.line().close();
            return end;
        };
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.close(Some(frame))).await;
        if Self::lingers(&end) {
            self.handle.line().close_write();
        } else {
            self.handle.line().close();
        }
        end
    }

    /// Whether the edge closed first with a close frame: the client may still be sending.
    fn lingers(end: &ConnError) -> bool {
        end.close_frame().is_some() && !matches!(end, ConnError::ClientClosed(_))
    }

    /// After the edge closed first, drains what the client still sends for a while (bounded
    /// in time and bytes), so that the close frame queued for a slow reader reaches it
    /// rather than a reset. Call it once the connection is accounted for as closed.
    pub(crate) async fn linger(&mut self, end: &ConnError) {
        if Self::lingers(end) {
            drain(self.ws.get_mut()).await;
        }
    }

    async fn serve(&mut self) -> ConnError {
        if self.route().cfg.dialect.row().echo {
            return Box::pin(self.echo()).await;
        }
        let handle = self.handle.clone();
        let max_payload = self.route().cfg.max_payload;
        // The cancellation future and one timer live across iterations: a wake-up registers
        // nothing new. The timer is armed for the session's earliest deadline and moved only
        // when that comes earlier (activity moves the idle deadline later: the timer then
        // fires early, finds nothing due, and is re-armed).
        let killed = handle.killed();
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
        if let Err(e) = self.drive_if_due().await {
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
                frame = handle.outbox().recv() => {
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
                            self.env.metrics.frames_in.inc();
                            self.env.metrics.bytes_in.add(text.len() as u64);
                            // Nothing a pump writes may overtake this frame's answer.
                            handle.line().hold().await;
                            self.session.on_text(&text, Instant::now().into_std());
                        }
                        Message::Binary(bytes) if handle.agreed().msgpack => {
                            let Some(text) = msgpack::to_json(&bytes) else {
                                return ConnError::NotMessagePack;
                            };
                            // JSON can be longer than its MessagePack (escapes): the bound
                            // holds for what the session reads.
                            if text.len() > max_payload {
                                return ConnError::TooBig(max_payload);
                            }
                            self.env.metrics.frames_in.inc();
                            self.env.metrics.bytes_in.add(bytes.len() as u64);
                            handle.line().hold().await;
                            self.session.on_text(&text, Instant::now().into_std());
                        }
                        Message::Binary(bytes) if self.route().cfg.binary => {
                            self.env.metrics.frames_in.inc();
                            self.env.metrics.bytes_in.add(bytes.len() as u64);
                            if self.session.on_binary(Instant::now().into_std())
                                && !crate::protocol::binary_event(&self.env, &handle, bytes).await
                            {
                                // As for a text event the bus refused: the client is told.
                                self.session.emit_failed();
                            }
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
            if let Err(e) = self.drive_if_due().await {
                return e;
            }
            let next = deadline(&self.session);
            if next < armed {
                armed = next;
                timer.as_mut().reset(armed);
            }
        }
    }

    /// [`Conn::drive`] when the session asks for something. Its future is boxed, and
    /// allocated only then: an idle connection holds none, and makes none on a wake-up.
    async fn drive_if_due(&mut self) -> Result<(), ConnError> {
        if !self.session.has_actions() {
            return Ok(());
        }
        Box::pin(self.drive()).await
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
                action => self.perform(action).await,
            }
        }
        Ok(())
    }

    /// Carries out an action that needs more than the socket: the bus, the registry, the
    /// store; its outcome goes back to the session.
    async fn perform(&mut self, action: Action) {
        let env = Arc::clone(&self.env);
        match action {
            Action::Subscribe { filter, id, since } => {
                let result = env.registry.subscribe(&self.handle, &filter, since).await;
                let how = result.unwrap_or_else(|error| {
                    tracing::warn!(conn = %self.handle.id(), %error, "subscribe failed");
                    Subscribed::Failed
                });
                let now = Instant::now().into_std();
                self.session.subscribed(filter, id.as_ref(), how, now);
            }
            Action::History(call) => {
                let page = protocol::history(&env, &self.handle, &call).await;
                self.session.history_read(&call, page);
            }
            Action::Unsubscribe { filter } => env.registry.unsubscribe(&self.handle, &filter),
            Action::Publish {
                topic,
                payload,
                echo,
                id,
            } => {
                let published = protocol::publish(&env, &self.handle, &topic, payload, echo).await;
                self.session.published(&topic, id.as_ref(), published);
            }
            Action::Request { request, to, body } => {
                let fut = protocol::request(&env, &self.handle, to, body);
                self.inflight.push(fut.map(move |r| (request, r)).boxed());
            }
            Action::Emit { subject, body } => {
                if !protocol::emit(&env, &self.handle, subject, body).await {
                    self.session.emit_failed();
                }
            }
            Action::Resource(call) => {
                let route = Arc::clone(self.route());
                let Some(res) = route.cfg.resources.get(&call.name) else {
                    return;
                };
                match call.watch_key.clone() {
                    Some(key) => {
                        let stop = resources::watch(&env, &self.handle, call, res);
                        self.watches.insert(key, stop);
                    }
                    None => {
                        let answer = resources::answer(env.store.as_ref(), &route, &call, res);
                        if let Some(frame) = answer.await {
                            self.session.answer(frame);
                        }
                    }
                }
            }
            Action::StopWatch(key) => {
                if let Some(watch) = self.watches.remove(&key) {
                    watch.cancel();
                }
            }
            Action::CheckToken { token, id } => {
                // Boxed: the key set's refetch makes this future large, and refreshes rare.
                let checked =
                    Box::pin(protocol::check_token(&self.handle, &env.revoked, &token)).await;
                let now = Instant::now().into_std();
                self.session
                    .token_checked(id.as_ref(), checked, now, unix_ms());
            }
            Action::Ignored => env.metrics.events_ignored.inc(),
            Action::Send(_) | Action::Ping | Action::FlushPong | Action::Close(_) => {
                unreachable!("drive carries out socket actions itself")
            }
        }
    }

    /// Writes `first` and whatever else is queued, then flushes once.
    async fn write_batch(&mut self, first: Out) -> Result<(), ConnError> {
        let wrote = ws::write_queued(&mut self.ws, self.handle.outbox(), first)
            .await
            .map_err(ConnError::Transport)?;
        self.env.metrics.frames_out.add(wrote.frames);
        self.env.metrics.bytes_out.add(wrote.bytes as u64);
        Ok(())
    }

    /// Sends one frame built by this connection (a reply or an error), bypassing the queue.
    pub(crate) async fn push(&mut self, frame: String) -> Result<(), ConnError> {
        self.env.metrics.frames_out.inc();
        let out = Out::from(frame).encoded(self.handle.wire(), true);
        ws::send(&mut self.ws, out)
            .await
            .map_err(ConnError::Transport)
    }

    /// `dialect: echo` (conformance testing): every data frame goes back as it came, the
    /// session sees none. Pings are answered by tungstenite; the socket is the task's alone.
    async fn echo(&mut self) -> ConnError {
        let handle = self.handle.clone();
        let killed = handle.killed();
        tokio::pin!(killed);
        handle.line().hold().await;
        let max_payload = self.route().cfg.max_payload;
        let wire = self.handle.wire();
        let mut client_close = None;
        loop {
            let msg = tokio::select! {
                biased;
                () = &mut killed => {
                    let req = handle.take_close();
                    return ConnError::Requested(req.unwrap_or_else(|| CloseRequest::new(1000, "")));
                }
                msg = self.ws.next() => msg,
            };
            let out = match msg {
                None => return ConnError::ClientClosed(client_close),
                Some(Err(e)) => {
                    return match read_error(e, max_payload) {
                        ConnError::ClientClosed(None) => ConnError::ClientClosed(client_close),
                        other => other,
                    };
                }
                Some(Ok(Message::Text(text))) => Out::text(text),
                Some(Ok(Message::Binary(bytes))) => Out::binary(bytes),
                Some(Ok(Message::Close(frame))) => {
                    client_close = Some(frame.map_or(1005, |f| u16::from(f.code)));
                    if let Err(e) = self.ws.flush().await {
                        return ConnError::Transport(e);
                    }
                    continue;
                }
                Some(Ok(_)) => {
                    // A ping: tungstenite queued its pong.
                    if let Err(e) = self.ws.flush().await {
                        return read_error(e, max_payload);
                    }
                    continue;
                }
            };
            let out = match wire.deflate_from {
                Some(min) if out.len() >= min => out.deflated(wire.deflate_window),
                _ => out,
            };
            if let Err(e) = self.ws.send(ws::frame(&out)).await {
                return ConnError::Transport(e);
            }
        }
    }
}

/// Reads and drops what the peer sends until it closes, [`LINGER_BYTES`] were read or
/// [`LINGER_TIME`] passed.
async fn drain<S: AsyncRead + Unpin>(socket: &mut S) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = vec![0u8; 16 * 1024];
    let mut left = LINGER_BYTES;
    let read = async {
        while left > 0 {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, read).await;
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
        tungstenite::Error::Io(e) if e.get_ref().is_some_and(|e| e.is::<OverBudget>()) => {
            ConnError::CompressionBusy
        }
        other => ConnError::Transport(other),
    }
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
