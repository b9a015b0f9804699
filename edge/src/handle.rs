//! A connection's front door ([`ConnHandle`]): what everyone but its own task holds. The
//! registry's pumps, coordinator commands, watches and revocations reach a connection only
//! through it: deliver a frame (never awaiting), write a batch straight to a free socket
//! ([`Outlet`]), or ask the task to close.
//!
//! **Invariant:** nothing awaits a client. [`ConnHandle::deliver`] never blocks: it queues
//! the frame, or refuses it when the bounded outbound queue is full (and, by policy, closes
//! the slow consumer with 1013).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use edge_core::recent::{MessageKey, Recent};
use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use ulid::Ulid;

use crate::config::OnFull;
use crate::route::Route;
use crate::transport::deflate::Window;
use crate::transport::outbox::Outbox;
use crate::transport::ws::Line;
use crate::transport::{Batch, Direct, Outlet};
pub use crate::transport::{CloseRequest, Delivery, Out, Wire};

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

/// What the upgrade agreed on with the client, besides the protocol itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Agreed {
    /// permessage-deflate, within this window: messages of the route's `min_size` and more
    /// go compressed.
    pub deflate: Option<Window>,
    /// The `switchboard.v1.msgpack` subprotocol: frames are MessagePack.
    pub msgpack: bool,
}

/// The clonable front door of a connection.
#[derive(Debug, Clone)]
pub struct ConnHandle(Arc<HandleInner>);

#[derive(Debug)]
struct HandleInner {
    info: ConnInfo,
    outbox: Outbox,
    on_full: OnFull,
    agreed: Agreed,
    kill: CancellationToken,
    close: Mutex<Option<CloseRequest>>,
    line: Line,
    /// What most connections never need, boxed and absent until needed, behind one lock:
    /// the handle is cache-line aligned (its outbox) and had 15 bytes left in its last
    /// line; a second lock would have cost a whole line (128 bytes) per connection.
    cold: Mutex<Cold>,
}

/// A connection's rarely used state (see [`HandleInner::cold`]).
#[derive(Debug, Default)]
struct Cold {
    /// What revocations match: the claims of the token in force (a refresh replaces them).
    /// Absent when the token names neither.
    token: Option<Box<TokenIds>>,
    /// The backend message ids it received lately; allocated when the first one arrives.
    recent: Option<Box<Recent>>,
}

/// The claims of a connection's current token that a revocation can name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TokenIds {
    pub(crate) jti: Option<String>,
    pub(crate) sub: Option<String>,
}

impl TokenIds {
    /// Boxed, or nothing when the token names neither claim.
    fn boxed(self) -> Option<Box<Self>> {
        (self != Self::default()).then(|| Box::new(self))
    }

    pub(crate) fn of(claims: &Map<String, Value>) -> Self {
        let get = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
        Self {
            jti: get("jti"),
            sub: get("sub"),
        }
    }
}

impl ConnHandle {
    pub(crate) fn new(info: ConnInfo, line: Line, agreed: Agreed) -> Self {
        let out = &info.route.cfg.outbound;
        let inner = HandleInner {
            outbox: Outbox::new(out.queue, out.max_bytes),
            on_full: out.on_full,
            agreed,
            kill: CancellationToken::new(),
            close: Mutex::new(None),
            line,
            cold: Mutex::new(Cold {
                token: TokenIds::of(&info.claims).boxed(),
                recent: None,
            }),
            info,
        };
        Self(Arc::new(inner))
    }

    pub fn info(&self) -> &ConnInfo {
        &self.0.info
    }

    pub fn route(&self) -> &Arc<Route> {
        &self.0.info.route
    }

    pub fn id(&self) -> Ulid {
        self.0.info.id
    }

    /// How this connection takes its messages (subprotocol, compression).
    pub fn wire(&self) -> Wire {
        let agreed = self.0.agreed;
        Wire {
            msgpack: agreed.msgpack,
            deflate_from: agreed
                .deflate
                .map(|_| self.0.info.route.cfg.compression.min_size),
            deflate_window: agreed.deflate.unwrap_or_default(),
        }
    }

    /// What the upgrade agreed on.
    pub fn agreed(&self) -> Agreed {
        self.0.agreed
    }

    /// Queues a frame this connection built (a watch's item): in its wire form.
    pub(crate) fn push(&self, frame: String) -> Delivery {
        self.deliver(&Out::from(frame).encoded(self.wire(), true))
    }

    /// Bytes queued and not yet written to the socket.
    pub fn buffered(&self) -> usize {
        self.0.outbox.buffered()
    }

    /// Queues a frame. Never awaits: one slow client must not slow anyone else.
    pub fn deliver(&self, frame: &Out) -> Delivery {
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

    /// Whether `frames` more frames of `bytes` in all fit in the outbound queue now.
    pub(crate) fn has_room(&self, frames: usize, bytes: usize) -> bool {
        self.0.outbox.has_room(frames, bytes)
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
        self.cold().token.as_deref().cloned().unwrap_or_default()
    }

    /// A refresh was accepted: the new token's claims are the ones revocations match.
    pub(crate) fn set_token_ids(&self, ids: TokenIds) {
        self.cold().token = ids.boxed();
    }

    /// Runs `f` on the connection's recent message ids (made at `now` if it had none), under
    /// the handle's lock: once per message, or once per batch of publications.
    pub(crate) fn with_recent<R>(&self, now: Instant, f: impl FnOnce(&mut Recent) -> R) -> R {
        let now = now.into_std();
        let mut cold = self.cold();
        f(cold
            .recent
            .get_or_insert_with(|| Box::new(Recent::new(now))))
    }

    /// Whether message `key` is new to this connection (then it is recorded as received).
    pub(crate) fn first(&self, key: MessageKey, now: Instant) -> bool {
        let std = now.into_std();
        self.with_recent(now, |r| r.first(key, std))
    }

    /// The message `key` was refused after [`ConnHandle::first`]: a retry may deliver it.
    pub(crate) fn forget(&self, key: MessageKey) {
        if let Some(recent) = self.cold().recent.as_mut() {
            recent.forget(key);
        }
    }

    fn cold(&self) -> MutexGuard<'_, Cold> {
        self.0.cold.lock().expect("handle's cold slot poisoned")
    }

    fn refuse(&self) -> Delivery {
        if self.0.on_full == OnFull::Close {
            self.close(CloseRequest::new(1013, "slow consumer"));
        }
        Delivery::Refused
    }

    /// Resolves when someone asked the task to close.
    pub(crate) fn killed(&self) -> WaitForCancellationFuture<'_> {
        self.0.kill.cancelled()
    }

    /// The outbound queue, which only the connection's task drains.
    pub(crate) fn outbox(&self) -> &Outbox {
        &self.0.outbox
    }

    /// The close asked for, if any (the first request wins).
    pub(crate) fn take_close(&self) -> Option<CloseRequest> {
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

    fn deliver(&self, message: &Out) -> Delivery {
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

/// Close code and reason when a token expires on an open connection.
pub const TOKEN_EXPIRED: (u16, &str) = (4001, "token expired");
/// Close code and reason when a connection's token is revoked.
pub const TOKEN_REVOKED: (u16, &str) = (4003, "token revoked");

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The idle memory per connection is a tracked figure (README "Performance"): message
    /// ids cost a connection one word here, inside the handle's last cache line, and
    /// nothing else until the first id reaches it.
    #[test]
    fn the_handle_stays_within_its_six_cache_lines() {
        assert_eq!(align_of::<HandleInner>(), 128);
        assert_eq!(size_of::<HandleInner>(), 768);
        assert_eq!(size_of::<Mutex<Cold>>(), 24);
    }
}
