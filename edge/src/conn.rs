//! One task serves each socket ([`Conn`]): it reads, answers and writes what is queued;
//! everyone else holds a [`ConnHandle`], the connection's [`Outlet`] for the fan-out. Pumps
//! may also write pre-framed bytes to an idle plain socket directly, under the rules of
//! [`crate::transport::ws`] (never to a TLS one).
//!
//! **Invariant:** nothing awaits a client. [`ConnHandle::deliver`] never blocks: it queues
//! the frame, or refuses it when the bounded outbound queue is full (and, by policy, closes
//! the slow consumer with 1013).

use std::collections::{HashMap, HashSet};
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

use crate::config::OnFull;
use crate::protocol::{self, Reply};
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

/// The task state of one connection.
pub(crate) struct Conn<S> {
    pub(crate) ws: WebSocketStream<S>,
    pub(crate) handle: ConnHandle,
    pub(crate) shared: Arc<Shared>,
    /// Topic filters this connection holds.
    pub(crate) topics: HashSet<String>,
    /// Running resource watches, by resource and params.
    pub(crate) watches: HashMap<String, CancellationToken>,
    pub(crate) inflight: FuturesUnordered<BoxFuture<'static, Reply>>,
    rate: TokenBucket,
    refused_in_a_row: u32,
    /// When the token in force calls for `refresh_required` and for the close; none on
    /// anonymous routes and tokens without `exp`.
    pub(crate) token_clock: Option<TokenClock>,
    /// Set when a refresh replaced `token_clock`: the timer is re-armed.
    pub(crate) clock_changed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    pub(crate) fn new(ws: WebSocketStream<S>, handle: ConnHandle, shared: Arc<Shared>) -> Self {
        let rl = &handle.info().route.cfg.rate_limit;
        let rate = TokenBucket::new(rl.per_second, rl.burst);
        let route = &handle.info().route;
        let token_clock = if route.verifier.anonymous() {
            None
        } else {
            crate::auth::expiry(&handle.info().claims).map(|exp| TokenClock::for_route(route, exp))
        };
        Self {
            ws,
            handle,
            shared,
            topics: HashSet::new(),
            watches: HashMap::new(),
            inflight: FuturesUnordered::new(),
            rate,
            refused_in_a_row: 0,
            token_clock,
            clock_changed: false,
        }
    }

    /// A refresh was accepted: the new token's claims and `exp` are in force.
    pub(crate) fn refreshed(&mut self, claims: &Map<String, Value>, exp: Option<i64>) {
        self.handle.set_token_ids(TokenIds::of(claims));
        let route = Arc::clone(self.route());
        self.token_clock = exp.map(|exp| TokenClock::for_route(&route, exp));
        self.clock_changed = true;
    }

    pub(crate) fn route(&self) -> &Arc<Route> {
        &self.handle.0.info.route
    }

    /// Runs until the connection ends; sends the close frame; returns why it ended.
    pub(crate) async fn run(&mut self, onconnect: Option<BoxFuture<'static, Reply>>) -> ConnError {
        let end = self.serve(onconnect).await;
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

    async fn serve(&mut self, onconnect: Option<BoxFuture<'static, Reply>>) -> ConnError {
        // The route is shared: borrow its config through our own Arc, not a copy per connection.
        let route = Arc::clone(self.route());
        let cfg = &route.cfg;
        let handle = self.handle.clone();
        // The cancellation future and one timer live across iterations: a wake-up registers
        // nothing new. The timer serves three deadlines (idle, next ping, pong due); activity
        // moves the idle one lazily, when the timer fires.
        let killed = handle.0.kill.cancelled();
        tokio::pin!(killed);
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let (idle_after, beat) = (cfg.idle_timeout, cfg.heartbeat.interval);
        let mut active_at = Instant::now();
        let mut ping_at = if beat.is_zero() {
            far
        } else {
            active_at + beat
        };
        let mut pong_by: Option<Instant> = None;
        // The token's deadlines (refresh notice, expiry) share the timer.
        let next_deadline = |active_at: Instant,
                             ping_at: Instant,
                             pong_by: Option<Instant>,
                             token: Option<&TokenClock>| {
            let idle_at = if idle_after.is_zero() {
                far
            } else {
                active_at + idle_after
            };
            let token_at = token.map_or(far, TokenClock::next);
            idle_at
                .min(ping_at)
                .min(pong_by.unwrap_or(far))
                .min(token_at)
        };
        let timer = sleep_until(next_deadline(
            active_at,
            ping_at,
            pong_by,
            self.token_clock.as_ref(),
        ));
        tokio::pin!(timer);
        let mut onconnect = onconnect;
        let mut client_close: Option<u16> = None;
        let requested = || {
            let req = handle.take_close();
            ConnError::Requested(req.unwrap_or_else(|| CloseRequest::new(1000, "")))
        };

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
            let gate_reads = onconnect.is_some();
            tokio::select! {
                biased;
                () = &mut killed => return requested(),
                reply = async {
                    match onconnect.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if onconnect.is_some() => {
                    onconnect = None;
                    let refused = reply.refuse;
                    if let Err(e) = Box::pin(self.push_reply(reply)).await { return e; }
                    if refused { return ConnError::Refused; }
                }
                Some(reply) = self.inflight.next(), if !self.inflight.is_empty() => {
                    if let Err(e) = Box::pin(self.push_reply(reply)).await { return e; }
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
                msg = self.ws.next(), if !gate_reads => {
                    let msg = match msg {
                        None => return ConnError::ClientClosed(client_close),
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            return match read_error(e, cfg.max_payload) {
                                ConnError::ClientClosed(None) => ConnError::ClientClosed(client_close),
                                other => other,
                            };
                        }
                    };
                    pong_by = None;
                    match msg {
                        Message::Text(text) => {
                            active_at = Instant::now();
                            self.shared.metrics.frames_in.inc();
                            self.shared.metrics.bytes_in.add(text.len() as u64);
                            // Nothing a pump writes may overtake this frame's answer.
                            handle.line().hold().await;
                            if let Err(e) = Box::pin(self.on_text(&text)).await { return e; }
                            if std::mem::take(&mut self.clock_changed) {
                                timer.as_mut().reset(next_deadline(
                                    active_at, ping_at, pong_by, self.token_clock.as_ref(),
                                ));
                            }
                        }
                        Message::Binary(_) => return ConnError::Binary,
                        Message::Ping(_) => {
                            active_at = Instant::now();
                            // Pings count toward the rate limit like frames. tungstenite
                            // queued the pong: send it now, or, when refused, leave it to go
                            // with the next write (a newer ping replaces it). No error frame:
                            // that would answer a flood with a flood.
                            match self.rate_check() {
                                Err(e) => return e,
                                Ok(false) => {}
                                Ok(true) => {
                                    if let Err(e) = self.ws.flush().await {
                                        return ConnError::Transport(e);
                                    }
                                }
                            }
                        }
                        Message::Pong(_) | Message::Frame(_) => {}
                        Message::Close(frame) => {
                            // tungstenite answers the close; the next read ends the stream.
                            handle.line().hold().await;
                            client_close = Some(frame.map_or(1005, |f| u16::from(f.code)));
                        }
                    }
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if pong_by.is_some_and(|t| t <= now) {
                        return ConnError::HeartbeatTimeout(cfg.heartbeat.timeout);
                    }
                    if !idle_after.is_zero() && active_at + idle_after <= now {
                        return ConnError::Idle(idle_after);
                    }
                    match self.token_clock.as_mut().and_then(|c| c.on_timer(now)) {
                        Some(TokenEvent::Expired) => return ConnError::TokenExpired,
                        Some(TokenEvent::Notify { exp }) => {
                            let f = proto::frame::FrameBuilder::new(route.key, "refresh_required")
                                .value("exp", &Value::from(exp))
                                .finish();
                            if let Err(e) = self.push(f).await { return e; }
                        }
                        None => {}
                    }
                    // While the onconnect hook is pending nothing is read, so no pong could
                    // be seen: no ping then (the hook's wait is bounded by request_timeout).
                    if ping_at <= now {
                        ping_at = now + beat;
                        if !gate_reads {
                            pong_by.get_or_insert(now + cfg.heartbeat.timeout);
                            if let Err(e) = self.ws.send(Message::Ping(Default::default())).await {
                                return ConnError::Transport(e);
                            }
                        }
                    }
                    timer.as_mut().reset(next_deadline(
                        active_at, ping_at, pong_by, self.token_clock.as_ref(),
                    ));
                }
            }
        }
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

    async fn push_reply(&mut self, reply: Reply) -> Result<(), ConnError> {
        match reply.frame {
            Some(frame) => self.push(frame).await,
            None => Ok(()),
        }
    }

    /// Takes a token for one client frame (text or ping): `Ok(false)` when refused, the
    /// error when refused `close_after` times in a row.
    fn rate_check(&mut self) -> Result<bool, ConnError> {
        if self.rate.take(Instant::now()) {
            self.refused_in_a_row = 0;
            return Ok(true);
        }
        self.refused_in_a_row += 1;
        if self.refused_in_a_row >= self.route().cfg.rate_limit.close_after {
            return Err(ConnError::RateLimited);
        }
        Ok(false)
    }

    async fn on_text(&mut self, text: &str) -> Result<(), ConnError> {
        if !self.rate_check()? {
            let key = self.route().cfg.key();
            let f = proto::frame::error(
                key,
                None,
                proto::frame::ErrorCode::RateLimited,
                "too many frames; slow down",
            );
            return self.push(f).await;
        }
        protocol::on_text(self, text).await
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

/// A connection's token deadlines: `refresh_required` at `notify_at` (dialects with the
/// `refresh` verb), the close with 4001 at `expire_at` (`exp` plus the route's leeway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokenClock {
    exp: i64,
    notify_at: Option<Instant>,
    expire_at: Instant,
}

/// What a [`TokenClock`] calls for when the timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenEvent {
    Notify { exp: i64 },
    Expired,
}

impl TokenClock {
    fn for_route(route: &crate::server::Route, exp: i64) -> Self {
        let auth = &route.cfg.auth;
        let notify = route.cfg.dialect.refreshes() && !auth.refresh_lead.is_zero();
        Self::new(
            exp,
            unix_ms(),
            Instant::now(),
            auth.leeway,
            notify.then_some(auth.refresh_lead),
        )
    }

    /// Deadlines for a token expiring at `exp` (Unix seconds), seen at `now_ms` (Unix
    /// milliseconds) = `now`.
    pub(crate) fn new(
        exp: i64,
        now_ms: i64,
        now: Instant,
        leeway: Duration,
        lead: Option<Duration>,
    ) -> Self {
        // A far `exp` is as good as ten years: no connection lives that long, and the
        // timer's arithmetic cannot overflow.
        let left = exp
            .saturating_mul(1000)
            .saturating_sub(now_ms)
            .clamp(0, TEN_YEARS_MS);
        let exp_at = now + Duration::from_millis(left as u64);
        Self {
            exp,
            notify_at: lead.map(|l| exp_at.checked_sub(l).unwrap_or(now).max(now)),
            expire_at: exp_at
                .checked_add(leeway)
                .unwrap_or(exp_at + Duration::from_millis(TEN_YEARS_MS as u64)),
        }
    }

    /// The next deadline.
    pub(crate) fn next(&self) -> Instant {
        self.notify_at
            .map_or(self.expire_at, |n| n.min(self.expire_at))
    }

    /// What is due at `now`; a notice is given once.
    pub(crate) fn on_timer(&mut self, now: Instant) -> Option<TokenEvent> {
        if self.expire_at <= now {
            return Some(TokenEvent::Expired);
        }
        if self.notify_at.is_some_and(|n| n <= now) {
            self.notify_at = None;
            return Some(TokenEvent::Notify { exp: self.exp });
        }
        None
    }
}

const TEN_YEARS_MS: i64 = 10 * 365 * 86_400 * 1000;

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A token bucket refilled continuously.
#[derive(Debug)]
struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst);
        Self {
            per_second: f64::from(per_second),
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if self.per_second == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_clock_notifies_once_then_expires() {
        let now = Instant::now();
        let s = Duration::from_secs;
        // exp 10 s away, seen at t = 1000 s; 3 s notice, 1 s leeway.
        let mut c = TokenClock::new(1010, 1_000_000, now, s(1), Some(s(3)));
        assert_eq!(c.next(), now + s(7));
        assert_eq!(c.on_timer(now + s(6)), None);
        assert_eq!(
            c.on_timer(now + s(7)),
            Some(TokenEvent::Notify { exp: 1010 })
        );
        assert_eq!(
            c.next(),
            now + s(11),
            "after the notice only the expiry is left"
        );
        assert_eq!(c.on_timer(now + s(10)), None);
        assert_eq!(c.on_timer(now + s(11)), Some(TokenEvent::Expired));
        // A lead longer than the token's life: the notice is due at once.
        let c = TokenClock::new(1002, 1_000_000, now, Duration::ZERO, Some(s(30)));
        assert_eq!(c.next(), now);
        // Already expired: due at once; no notice on dialects without `refresh`.
        let mut c = TokenClock::new(990, 1_000_000, now, Duration::ZERO, None);
        assert_eq!(c.on_timer(now), Some(TokenEvent::Expired));
        // Absurd values neither overflow nor expire early.
        let c = TokenClock::new(i64::MAX, 0, now, s(u64::from(u32::MAX)), Some(s(30)));
        assert!(c.next() > now + s(86_400 * 365));
        let c = TokenClock::new(i64::MIN, i64::MAX, now, Duration::ZERO, Some(s(30)));
        assert_eq!(c.next(), now);
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_refills_at_its_rate() {
        let mut b = TokenBucket::new(10, 2);
        let t0 = Instant::now();
        assert!(b.take(t0));
        assert!(b.take(t0));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert!(!b.take(t0 + Duration::from_millis(100)));
    }
}
