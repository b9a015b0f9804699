//! The transport boundary: what the fan-out needs of a connection, whatever carries it.
//!
//! Topic pumps and coordinator commands hand messages to connections through one trait,
//! [`Outlet`]: write a batch now if the connection can take it without waiting, queue a
//! message otherwise, close. They never see a socket, a frame header or a line state. A
//! transport (today [`ws`], the WebSocket; an SSE or HTTP-streaming one later) is one
//! implementation: its [`Framer`] turns the batch's messages into its wire bytes, once per
//! batch for all its recipients, and its line decides whether those bytes may go out now.
//!
//! | module | what |
//! | --- | --- |
//! | [`outbox`] | a connection's bounded, lock-free queue of messages (any transport's task drains it) |
//! | [`ws`] | the WebSocket: the `Line` state machine, its framing, the task's write side |
//! | [`msgpack`] | the `switchboard.v1.msgpack` subprotocol: the same frames in MessagePack |
//! | [`deflate`] | permessage-deflate: negotiation, compression once per message, the inflating read filter |
//!
//! **Invariant:** the boundary costs the fan-out nothing per recipient: calls are statically
//! dispatched, a batch is framed once per transport kind (never per recipient), and no
//! recipient costs a lock, an allocation or a clone.
//!
//! **Invariant:** a message a transport refuses to write now is queued in order behind
//! everything queued before it, so a connection's messages keep their order whichever path
//! each one took.

use std::any::TypeId;

use bytes::Bytes;
use tokio_tungstenite::tungstenite::Utf8Bytes;

pub(crate) mod deflate;
pub(crate) mod msgpack;
pub(crate) mod outbox;
pub(crate) mod ws;

/// One message for a client as it goes on the wire: text or binary, its payload compressed
/// or not (permessage-deflate). Cloning it is a reference count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    bytes: Bytes,
    flags: u8,
}

const BINARY: u8 = 1;
const DEFLATED: u8 = 2;

impl Out {
    pub fn text(text: Utf8Bytes) -> Self {
        Self {
            bytes: text.into(),
            flags: 0,
        }
    }

    pub fn binary(bytes: Bytes) -> Self {
        Self {
            bytes,
            flags: BINARY,
        }
    }

    /// The same message, compressed (for connections with permessage-deflate) within the
    /// client's window.
    pub(crate) fn deflated(&self, window: deflate::Window) -> Self {
        Self {
            bytes: deflate::compress(&self.bytes, window).into(),
            flags: self.flags | DEFLATED,
        }
    }

    /// The payload's length on the wire.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn is_binary(&self) -> bool {
        self.flags & BINARY != 0
    }

    pub fn is_deflated(&self) -> bool {
        self.flags & DEFLATED != 0
    }

    /// The payload as it goes on the wire.
    pub fn payload(&self) -> &Bytes {
        &self.bytes
    }

    /// The first byte of its frame: FIN, RSV1 when compressed, text or binary.
    pub(crate) fn first_byte(&self) -> u8 {
        let opcode = if self.is_binary() { 0x02 } else { 0x01 };
        let rsv1 = if self.is_deflated() { 0x40 } else { 0 };
        0x80 | rsv1 | opcode
    }
}

/// How a connection takes its messages: MessagePack or JSON, compressed from a size on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Wire {
    pub msgpack: bool,
    /// permessage-deflate: messages of this many bytes and more are compressed.
    pub deflate_from: Option<usize>,
    /// The window compressed messages keep within (the client's `server_max_window_bits`).
    pub deflate_window: deflate::Window,
}

impl Out {
    /// This message as a connection with `wire` takes it: JSON text transcoded for a
    /// MessagePack client, compressed for a deflate client (unless `compress` is false or
    /// it is short).
    pub(crate) fn encoded(self, wire: Wire, compress: bool) -> Self {
        let m = match wire.msgpack && !self.is_binary() {
            true => msgpack::from_json(&self.bytes).map_or(self, |b| Self::binary(b.into())),
            false => self,
        };
        match wire.deflate_from {
            Some(min) if compress && m.len() >= min => m.deflated(wire.deflate_window),
            _ => m,
        }
    }
}

impl From<Utf8Bytes> for Out {
    fn from(text: Utf8Bytes) -> Self {
        Self::text(text)
    }
}

impl From<String> for Out {
    fn from(text: String) -> Self {
        Self::text(text.into())
    }
}

impl From<&str> for Out {
    fn from(text: &str) -> Self {
        Self::text(text.into())
    }
}

/// What the fan-out needs of one connection.
pub(crate) trait Outlet {
    /// Writes `batch` now, whole messages only, if the connection can take it without
    /// waiting and nothing is queued before it; says which messages are left to queue.
    fn try_write(&self, batch: &mut Batch) -> Direct;

    /// Queues one message for the connection's task, which frames it. Never awaits: one
    /// slow client must not slow anyone else.
    fn deliver(&self, message: &Out) -> Delivery;

    /// Asks the connection to close; the first request wins.
    fn close(&self, req: CloseRequest);
}

/// What [`Outlet::try_write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direct {
    /// Every message is written.
    Written,
    /// The connection took part: messages before `queue_from` are written (or, the one cut
    /// short, left to the connection's task to finish); the caller queues the messages from
    /// `queue_from` on.
    Partial { queue_from: usize },
    /// Nothing was written: queue every message.
    Busy,
}

/// The outcome of one [`Outlet::deliver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Queued,
    /// The outbound queue was full (backpressure).
    Refused,
    /// The connection is gone.
    Gone,
}

/// A request from outside the connection's task to close the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    /// The close code the client is told, where the transport has one.
    pub code: u16,
    pub reason: String,
    /// Drop the connection without telling the client why.
    pub hard: bool,
}

impl CloseRequest {
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            hard: false,
        }
    }
}

/// How a transport puts one message on its wire (a WebSocket frame, an SSE event).
pub(crate) trait Framer: 'static {
    /// Appends `message`, framed, to `out`.
    fn frame(message: &Out, out: &mut Vec<u8>);
}

/// A batch of messages handed whole to every recipient. Each transport kind frames it once,
/// at its first recipient that can take it now; the others of that kind get the same bytes.
#[derive(Debug)]
pub(crate) struct Batch {
    messages: Vec<Out>,
    /// Framed by the first transport kind (almost always the only one).
    first: Option<(TypeId, Framed)>,
    /// Framed by any other kinds.
    others: Vec<(TypeId, Framed)>,
}

/// A batch framed back to back by one transport, for one write per connection.
#[derive(Debug)]
pub(crate) struct Framed {
    pub(crate) bytes: Vec<u8>,
    /// Where each message's frame ends in `bytes`.
    pub(crate) ends: Vec<usize>,
}

impl Batch {
    pub(crate) fn new(messages: Vec<Out>) -> Self {
        Self {
            messages,
            first: None,
            others: Vec::new(),
        }
    }

    /// The messages, unframed, for those who queue them.
    pub(crate) fn messages(&self) -> &[Out] {
        &self.messages
    }

    /// The batch as framed by `F`, framed on the first call.
    pub(crate) fn framed<F: Framer>(&mut self) -> &Framed {
        let kind = TypeId::of::<F>();
        let Some((first, _)) = &self.first else {
            let framed = self.frame::<F>();
            return &self.first.insert((kind, framed)).1;
        };
        if *first == kind {
            return &self.first.as_ref().expect("framed above").1;
        }
        let at = match self.others.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                let framed = self.frame::<F>();
                self.others.push((kind, framed));
                self.others.len() - 1
            }
        };
        &self.others[at].1
    }

    fn frame<F: Framer>(&self) -> Framed {
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(self.messages.len());
        for m in &self.messages {
            F::frame(m, &mut bytes);
            ends.push(bytes.len());
        }
        Framed { bytes, ends }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Brackets;

    impl Framer for Brackets {
        fn frame(message: &Out, out: &mut Vec<u8>) {
            out.push(b'[');
            out.extend_from_slice(message.payload());
            out.push(b']');
        }
    }

    struct Lines;

    impl Framer for Lines {
        fn frame(message: &Out, out: &mut Vec<u8>) {
            out.extend_from_slice(message.payload());
            out.push(b'\n');
        }
    }

    #[test]
    fn a_batch_is_framed_once_per_kind() {
        let mut batch = Batch::new(vec![Out::from("ab"), Out::from("c")]);
        let first = batch.framed::<Brackets>();
        assert_eq!(first.bytes, b"[ab][c]");
        assert_eq!(first.ends, [4, 7]);
        let at = first.bytes.as_ptr();
        assert_eq!(batch.framed::<Lines>().bytes, b"ab\nc\n");
        assert_eq!(
            batch.framed::<Brackets>().bytes.as_ptr(),
            at,
            "the second recipient of a kind gets the same bytes"
        );
        assert_eq!(batch.others.len(), 1);
        assert_eq!(batch.messages().len(), 2);
    }
}
