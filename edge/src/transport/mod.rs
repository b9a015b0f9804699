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
//!
//! **Invariant:** the boundary costs the fan-out nothing per recipient: calls are statically
//! dispatched, a batch is framed once per transport kind (never per recipient), and no
//! recipient costs a lock, an allocation or a clone.
//!
//! **Invariant:** a message a transport refuses to write now is queued in order behind
//! everything queued before it, so a connection's messages keep their order whichever path
//! each one took.

use std::any::TypeId;

use tokio_tungstenite::tungstenite::Utf8Bytes;

pub(crate) mod outbox;
pub(crate) mod ws;

/// What the fan-out needs of one connection.
pub(crate) trait Outlet {
    /// Writes `batch` now, whole messages only, if the connection can take it without
    /// waiting and nothing is queued before it; says which messages are left to queue.
    fn try_write(&self, batch: &mut Batch) -> Direct;

    /// Queues one message for the connection's task, which frames it. Never awaits: one
    /// slow client must not slow anyone else.
    fn deliver(&self, message: &Utf8Bytes) -> Delivery;

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
    fn frame(message: &[u8], out: &mut Vec<u8>);
}

/// A batch of messages handed whole to every recipient. Each transport kind frames it once,
/// at its first recipient that can take it now; the others of that kind get the same bytes.
#[derive(Debug)]
pub(crate) struct Batch {
    messages: Vec<Utf8Bytes>,
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
    pub(crate) fn new(messages: Vec<Utf8Bytes>) -> Self {
        Self {
            messages,
            first: None,
            others: Vec::new(),
        }
    }

    /// The messages, unframed, for those who queue them.
    pub(crate) fn messages(&self) -> &[Utf8Bytes] {
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
            F::frame(m.as_bytes(), &mut bytes);
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
        fn frame(message: &[u8], out: &mut Vec<u8>) {
            out.push(b'[');
            out.extend_from_slice(message);
            out.push(b']');
        }
    }

    struct Lines;

    impl Framer for Lines {
        fn frame(message: &[u8], out: &mut Vec<u8>) {
            out.extend_from_slice(message);
            out.push(b'\n');
        }
    }

    #[test]
    fn a_batch_is_framed_once_per_kind() {
        let mut batch = Batch::new(vec!["ab".into(), "c".into()]);
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
