//! The WebSocket transport: a connection's TCP socket, written by its task and, in between,
//! by fan-out pumps; the framing of the pumps' batches; the task's write side.
//!
//! A topic message for N local subscribers is framed once; when a subscriber's socket is
//! free, the pump writes the framed bytes to it at once with one non-blocking `write`,
//! instead of queueing them and waking the connection's task. That saves a task wake-up,
//! a queue round trip and a copy per recipient, which is most of the fan-out's cost.
//!
//! **Invariant:** one writer at a time, only whole frames leave a writer, and nothing is
//! written once the line is `CLOSED`. The socket's [`Line`] is in one of seven states:
//! - `FREE`: nobody is writing; tungstenite's write buffer is empty.
//! - `PUMP`: a pump is inside one non-blocking `write` (never across an `.await`).
//! - `PUMP_TASK_WAITS`: the same, and the task waits to take the socket: the pump, leaving,
//!   hands the socket to the task (`TASK`) and wakes it.
//! - `TASK`: the connection's task owns the socket. It takes it before tungstenite writes a
//!   byte and gives it back ([`settle`]) only once tungstenite's buffer is flushed. A pump
//!   whose write was partial hands the socket to the task in this state, with the unwritten
//!   end in `rest`, which goes out before any other byte.
//! - `SEALED`: a TLS connection (`crate::tls`): the task owns the socket for good. Bytes
//!   on the wire are TLS records that only the task's TLS session can make, so pumps never
//!   write there; they find the socket taken and queue, as for a busy plain socket.
//! - `CLOSING`: the connection was closed while a pump was inside its write: that write may
//!   still land (before the shutdown, so the peer sees whole frames, then the end); the
//!   pump, leaving, finishes the close. Nobody waits for the pump, and nobody spins.
//! - `CLOSED`: the connection is over; nobody writes again.
//!
//! ```text
//! state            writer             moves on when
//! FREE             nobody             a pump enters → PUMP; the task takes → TASK; close → CLOSED
//! PUMP             that pump          it leaves → FREE (→ TASK with a rest); the task asks →
//!                                     PUMP_TASK_WAITS; close → CLOSING
//! PUMP_TASK_WAITS  that pump          it leaves → TASK, waking the task; close → CLOSING
//! TASK             the task           the task settles → FREE; close → CLOSED
//! SEALED           the task           close → CLOSED
//! CLOSING          that pump's write  it leaves → CLOSED, and shuts the socket
//! CLOSED           nobody             never
//! ```
//!
//! Pumps that find the socket taken, or messages already queued, queue instead, so a
//! connection's frames keep their order. The task's transitions and the pumps' are checked
//! by an exhaustive model of every interleaving (the tests below).
//!
//! The task reads and writes through [`Socket`], given to tungstenite: a plain connection's
//! task writes through it directly, a TLS connection's through its TLS stream over it.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::SinkExt as _;
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Sleep;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::{self, Message};

use super::outbox::Outbox;
use super::{Batch, Direct, Framed, Framer, Out};

const FREE: u8 = 0;
const PUMP: u8 = 1;
const PUMP_TASK_WAITS: u8 = 2;
const TASK: u8 = 3;
const SEALED: u8 = 4;
const CLOSING: u8 = 5;
const CLOSED: u8 = 6;

/// Messages written to the socket per flush at most, so that reading is not starved.
const WRITE_BATCH: usize = 256;

/// WebSocket framing: one unmasked server frame per message (text or binary, RSV1 when its
/// payload is compressed).
#[derive(Debug)]
pub(crate) struct Text;

impl Framer for Text {
    fn frame(message: &Out, out: &mut Vec<u8>) {
        out.push(message.first_byte());
        let message = message.payload();
        let n = message.len();
        if n < 126 {
            out.push(n as u8);
        } else if let Ok(n) = u16::try_from(n) {
            out.push(126);
            out.extend_from_slice(&n.to_be_bytes());
        } else {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
        out.extend_from_slice(message);
    }
}

/// What a line writes to: the TCP socket (the tests also use a scripted one).
pub(crate) trait Raw {
    /// One non-blocking write.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Ends the connection for the peer (`Write`: a FIN after what is queued), even while
    /// the socket lives on; `Both` also ends this side's reads.
    fn shutdown(&self, how: std::net::Shutdown);
}

impl Raw for TcpStream {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, buf)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }

    fn shutdown(&self, how: std::net::Shutdown) {
        let _ = socket2::SockRef::from(self).shutdown(how);
    }
}

/// The shared write side of one connection (lives in its handle).
#[derive(Debug)]
pub(crate) struct Line<T = TcpStream> {
    raw: T,
    state: AtomicU8,
    /// The unwritten end of a pump's partial write; the task writes it first.
    rest: Mutex<Option<bytes::Bytes>>,
    /// Wakes the task when a pump hands it a `rest`.
    rest_ready: Notify,
    /// The task waiting in `PUMP_TASK_WAITS` for a pump to leave.
    taker: AtomicWaker,
}

impl Line {
    pub(crate) fn new(tcp: TcpStream) -> Self {
        Self::with_state(tcp, FREE)
    }

    /// The line of a TLS connection: only its task ever writes.
    pub(crate) fn sealed(tcp: TcpStream) -> Self {
        Self::with_state(tcp, SEALED)
    }
}

impl<T: Raw> Line<T> {
    fn with_state(raw: T, state: u8) -> Self {
        Self {
            raw,
            state: AtomicU8::new(state),
            rest: Mutex::new(None),
            rest_ready: Notify::new(),
            taker: AtomicWaker::new(),
        }
    }

    /// One non-blocking write of a whole batch from a pump, if the socket is free.
    /// `queued` is checked once the socket is taken: messages already queued go first.
    pub(crate) fn try_write(&self, batch: &mut Batch, queued: impl FnOnce() -> bool) -> Direct {
        let framed = batch.framed::<Text>();
        if !self.enter_pump() {
            return Direct::Busy;
        }
        if queued() {
            self.leave_pump(FREE);
            return Direct::Busy;
        }
        let (direct, to) = self.write_in_pump(framed);
        self.leave_pump(to);
        direct
    }

    /// A pump takes the socket: `FREE` → `PUMP`.
    fn enter_pump(&self) -> bool {
        self.state
            .compare_exchange(FREE, PUMP, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// The pump's one write; returns what it did and the state to leave in.
    fn write_in_pump(&self, framed: &Framed) -> (Direct, u8) {
        let Framed { bytes, ends } = framed;
        match self.raw.try_write(bytes) {
            Ok(n) if n == bytes.len() => (Direct::Written, FREE),
            Ok(n) => {
                // Hand the socket and the end of the frame the kernel cut to the task: nobody
                // else may write before it. The whole frames after it are the caller's to
                // queue (shared, counted against the queue's bounds), not copied here.
                let cut = ends.partition_point(|&end| end <= n);
                let end = ends.get(cut).copied().unwrap_or(bytes.len());
                *self.rest.lock().expect("rest poisoned") =
                    Some(bytes::Bytes::copy_from_slice(&bytes[n..end]));
                (
                    Direct::Partial {
                        queue_from: cut + 1,
                    },
                    TASK,
                )
            }
            // WouldBlock (a slow reader) or a dead socket: the task finds out and decides.
            Err(_) => (Direct::Busy, FREE),
        }
    }

    /// The pump leaves to `to` (`FREE`, or `TASK` with a rest); a task that came to wait
    /// gets the socket, and a close that came meanwhile is finished here.
    fn leave_pump(&self, to: u8) {
        let Err(now) = self
            .state
            .compare_exchange(PUMP, to, Ordering::Release, Ordering::Acquire)
        else {
            if to == TASK {
                self.rest_ready.notify_one();
            }
            return;
        };
        if now == PUMP_TASK_WAITS
            && self
                .state
                .compare_exchange(PUMP_TASK_WAITS, TASK, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.taker.wake();
            if to == TASK {
                self.rest_ready.notify_one();
            }
            return;
        }
        // Only a close moves the state away from PUMP or PUMP_TASK_WAITS: to CLOSING.
        debug_assert_eq!(self.state.load(Ordering::Acquire), CLOSING);
        self.finish_close(std::net::Shutdown::Both);
    }

    /// Whether the connection is over (or closing).
    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) >= CLOSING
    }

    /// Whether the task holds the socket for now (and must flush before giving it back);
    /// false for a sealed line, which it never gives back.
    pub(crate) fn held_by_task(&self) -> bool {
        self.state.load(Ordering::Acquire) == TASK
    }

    /// The task takes the socket; a pump inside its write hands it over when it leaves.
    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self
                .state
                .compare_exchange(FREE, TASK, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) | Err(TASK | SEALED) => return Poll::Ready(Ok(())),
                Err(CLOSING | CLOSED) => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Err(_) => {
                    // A pump on another thread is inside one write(2): ask it to hand over.
                    self.taker.register(cx.waker());
                    match self.state.compare_exchange(
                        PUMP,
                        PUMP_TASK_WAITS,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) | Err(PUMP_TASK_WAITS) => return Poll::Pending,
                        // The pump left meanwhile: look again.
                        Err(_) => {}
                    }
                }
            }
        }
    }

    /// The task takes the socket before work that must not be overtaken by pumps (a reply
    /// to a subscribe is written before the topic's first message).
    pub(crate) async fn hold(&self) {
        let _ = std::future::poll_fn(|cx| self.poll_take(cx)).await;
    }

    /// Gives the socket back to the pumps. The caller has flushed tungstenite's buffer. A
    /// sealed line stays with the task.
    pub(crate) fn release(&self) {
        let _ = self
            .state
            .compare_exchange(TASK, FREE, Ordering::Release, Ordering::Relaxed);
    }

    /// Nobody writes again; the peer sees the connection end even while handles live on.
    /// A pump inside its write finishes the close when it leaves.
    pub(crate) fn close(&self) {
        self.close_with(std::net::Shutdown::Both);
    }

    /// As [`Self::close`], but reads go on: the task drains what the peer still sends
    /// (lingering close). A pump inside its write finishes the close, reads included.
    pub(crate) fn close_write(&self) {
        self.close_with(std::net::Shutdown::Write);
    }

    fn close_with(&self, how: std::net::Shutdown) {
        let mut now = self.state.load(Ordering::Acquire);
        loop {
            let to = match now {
                CLOSING | CLOSED => return,
                PUMP | PUMP_TASK_WAITS => CLOSING,
                _ => CLOSED,
            };
            match self
                .state
                .compare_exchange_weak(now, to, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) if to == CLOSED => return self.finish_close(how),
                Ok(_) => return,
                Err(actual) => now = actual,
            }
        }
    }

    fn finish_close(&self, how: std::net::Shutdown) {
        self.state.store(CLOSED, Ordering::Release);
        self.raw.shutdown(how);
        self.taker.wake();
    }

    /// Writes a pump's unwritten end, if there is one. The task owns the socket.
    fn poll_rest(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut slot = self.rest.lock().expect("rest poisoned");
        while let Some(rest) = slot.as_mut() {
            ready!(self.raw.poll_write_ready(cx))?;
            match self.raw.try_write(rest) {
                Ok(n) if n == rest.len() => *slot = None,
                Ok(n) => {
                    let _ = rest.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The task's write: take the line, finish a pump's rest, then write `buf`.
    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_take(cx))?;
        ready!(self.poll_rest(cx))?;
        loop {
            ready!(self.raw.poll_write_ready(cx))?;
            match self.raw.try_write(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// The task's flush: a pump's rest, if the task holds the socket.
    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.held_by_task() {
            return Poll::Ready(Ok(()));
        }
        self.poll_rest(cx)
    }
}

/// Waits until a pump hands the task a partial write's rest (see [`settle`]).
pub(crate) async fn rest_handed_over(line: &Line) {
    line.rest_ready.notified().await;
}

/// The connection task's view of its socket, given to tungstenite. Every write takes the
/// line for the task first. `H` is whatever holds the line (the connection's handle).
///
/// A client that takes none of our bytes for `stall_limit` is dropped: a write that cannot
/// progress that long fails with `TimedOut`, whichever of the task's writes it is (queued
/// frames, a reply, a ping, a pump's handed-over rest).
#[derive(Debug)]
pub(crate) struct Socket<H> {
    handle: H,
    stall_limit: Option<Duration>,
    /// Running while a write waits for the socket; allocated only then.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<H: AsRef<Line>> Socket<H> {
    pub(crate) fn new(handle: H, stall_limit: Option<Duration>) -> Self {
        Self {
            handle,
            stall_limit,
            stalled: None,
        }
    }

    /// Passes `r` on, timing how long writes have been waiting for the socket.
    fn watch<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let Some(limit) = self.stall_limit else {
            return r;
        };
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            let error = format!("the client took none of our bytes for {limit:?}");
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, error)));
        }
        r
    }
}

impl<H: AsRef<Line> + Unpin> AsyncRead for Socket<H> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let tcp = &self.handle.as_ref().raw;
        loop {
            ready!(tcp.poll_read_ready(cx))?;
            match tcp.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<H: AsRef<Line> + Unpin> AsyncWrite for Socket<H> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = self.handle.as_ref().poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = self.handle.as_ref().poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.handle.as_ref().close();
        Poll::Ready(Ok(()))
    }
}

/// What the task's [`write_queued`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wrote {
    pub(crate) frames: u64,
    pub(crate) bytes: usize,
}

/// The task writes `first` and whatever else is queued (up to a batch), then flushes once.
pub(crate) async fn write_queued<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    outbox: &Outbox,
    first: Out,
) -> Result<Wrote, tungstenite::Error> {
    let mut wrote = Wrote {
        frames: 1,
        bytes: first.len(),
    };
    ws.feed(frame(&first)).await?;
    while wrote.frames < WRITE_BATCH as u64 {
        let Some(next) = outbox.pop() else {
            break;
        };
        wrote.bytes += next.len();
        wrote.frames += 1;
        ws.feed(frame(&next)).await?;
    }
    ws.flush().await?;
    outbox.written(wrote.bytes);
    Ok(wrote)
}

/// The task sends one message of its own (a reply, an error, a notice), bypassing the queue.
pub(crate) async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    message: Out,
) -> Result<(), tungstenite::Error> {
    ws.send(frame(&message)).await
}

/// A message as tungstenite writes it: a frame we build (tungstenite knows no RSV1, and a
/// text payload built here needs no second UTF-8 check).
pub(crate) fn frame(message: &Out) -> Message {
    let opcode = if message.is_binary() {
        OpCode::Data(Data::Binary)
    } else {
        OpCode::Data(Data::Text)
    };
    let deflated = message.is_deflated();
    let mut frame = Frame::message(message.payload().clone(), opcode, true);
    frame.header_mut().rsv1 = deflated;
    Message::Frame(frame)
}

/// If the task holds the socket, flushes tungstenite's buffer (and a pump's rest) and, unless
/// `keep`, gives the socket back to the pumps. After the client's close the task keeps it:
/// no data frame may follow the close reply.
pub(crate) async fn settle<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    line: &Line,
    keep: bool,
) -> Result<(), tungstenite::Error> {
    if !line.held_by_task() {
        return Ok(());
    }
    ws.flush().await?;
    if !keep {
        line.release();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use tokio::io::AsyncReadExt as _;

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        for s in [&server, &client] {
            let s = socket2::SockRef::from(s);
            s.set_send_buffer_size(16 * 1024).expect("SO_SNDBUF");
            s.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
        }
        (server, client)
    }

    fn batch(messages: &[&str]) -> Batch {
        Batch::new(messages.iter().map(|&m| Out::from(m)).collect())
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Text::frame(
            &Out::text(message.to_vec().try_into().expect("utf-8")),
            &mut out,
        );
        out
    }

    #[tokio::test]
    async fn a_partial_write_hands_the_socket_and_the_rest_to_the_task() {
        let (server, mut client) = tcp_pair().await;
        let line = Arc::new(Line::new(server));
        let big: String = (0..1024 * 1024)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        // Eight messages of 128 KiB: the kernel takes far less than the first.
        let eighths: Vec<&str> = (0..8)
            .map(|i| &big[i * big.len() / 8..][..big.len() / 8])
            .collect();
        let mut big_batch = batch(&eighths);
        assert_eq!(
            line.try_write(&mut big_batch, || false),
            Direct::Partial { queue_from: 1 }
        );
        assert!(
            line.held_by_task(),
            "a partial write hands the socket to the task"
        );
        // The reader takes some: the kernel could take more bytes now, but no pump may write
        // them before the task has written the rest.
        let mut head = vec![0; 64 * 1024];
        let n = client.read(&mut head).await.expect("read");
        head.truncate(n);
        assert_eq!(line.try_write(&mut batch(&["zz"]), || false), Direct::Busy);
        let reader = tokio::spawn(async move {
            let mut all = head;
            client.read_to_end(&mut all).await.expect("read");
            all
        });
        std::future::poll_fn(|cx| line.poll_flush(cx))
            .await
            .expect("the task writes the rest");
        line.release();
        assert_eq!(
            line.try_write(&mut batch(&["zz"]), || true),
            Direct::Busy,
            "frames queued go first"
        );
        let free = async {
            // Busy while the reader has not made room yet (tokio's readiness can be stale).
            while line.try_write(&mut batch(&["zz"]), || false) == Direct::Busy {
                line.raw.writable().await.expect("writable");
            }
        };
        tokio::time::timeout(Duration::from_secs(10), free)
            .await
            .expect("a free line takes a pump's write");
        line.close();
        assert_eq!(
            line.try_write(&mut batch(&["zz"]), || false),
            Direct::Busy,
            "closed"
        );
        // The first frame (its cut end written by the task), then the pump's later write;
        // the other seven messages were the caller's to queue.
        let first = framed(eighths[0].as_bytes());
        let all = reader.await.expect("reader");
        assert_eq!(all.len(), first.len() + 4);
        assert!(
            all[..first.len()] == first[..],
            "the rest did not follow the partial write"
        );
        assert_eq!(&all[first.len()..], framed(b"zz"));
    }

    #[tokio::test]
    async fn a_sealed_line_stays_with_its_task() {
        let (server, mut client) = tcp_pair().await;
        let line = Line::sealed(server);
        assert_eq!(line.try_write(&mut batch(&["zz"]), || false), Direct::Busy);
        // The task takes it at once, and giving it back leaves it sealed.
        tokio::time::timeout(Duration::from_secs(10), line.hold())
            .await
            .expect("the task takes a sealed line at once");
        line.release();
        assert!(!line.held_by_task());
        assert_eq!(line.try_write(&mut batch(&["zz"]), || false), Direct::Busy);
        std::future::poll_fn(|cx| line.poll_write(cx, b"ok"))
            .await
            .expect("the task writes");
        line.close();
        assert!(line.is_closed());
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, b"ok", "only the task's bytes reach the wire");
    }

    #[test]
    fn text_frames_match_tungstenite() {
        for n in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let payload = vec![b'x'; n];
            let ours = framed(&payload);
            let mut theirs = Vec::new();
            Frame::message(payload, OpCode::Data(Data::Text), true)
                .format(&mut theirs)
                .expect("a frame formats into a Vec");
            assert_eq!(ours, theirs, "payload of {n} bytes");
        }
    }

    /// Splits `wire` into WebSocket text frames under 64 KiB: the whole frames, and the
    /// start of a cut one at the end, if any. `None` if the bytes are not frames.
    fn parse(wire: &[u8]) -> Option<(Vec<&[u8]>, bool)> {
        let mut frames = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            if wire[at] != 0x81 {
                return None;
            }
            let (len, start) = match wire.get(at + 1) {
                None => return Some((frames, true)),
                Some(&126) => match wire.get(at + 2..at + 4) {
                    None => return Some((frames, true)),
                    Some(n) => (usize::from(u16::from_be_bytes([n[0], n[1]])), at + 4),
                },
                Some(&n) if n < 126 => (usize::from(n), at + 2),
                Some(_) => return None,
            };
            let end = start + len;
            if end > wire.len() {
                return Some((frames, true));
            }
            frames.push(&wire[start..end]);
            at = end;
        }
        Some((frames, false))
    }

    /// Tasks on two threads hammer one line over loopback TCP: pumps write
    /// batches, the task writes its own frames and finishes handed-over rests, and the line
    /// is closed mid-way. The reader must see whole frames, each writer's in order, exactly
    /// those the writers were told went out, and the end of the stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_leave_whole_frames_in_order() {
        use std::sync::atomic::{AtomicBool, AtomicUsize};

        const PUMPS: usize = 3;
        const ROUNDS: usize = 400;
        let (server, mut client) = tcp_pair().await;
        let line = Arc::new(Line::new(server));
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = client.read(&mut buf).await.expect("read");
                if n == 0 {
                    return all;
                }
                all.extend_from_slice(&buf[..n]);
            }
        });
        let message = |who: usize, seq: usize| format!("{who}:{seq:07}:{}", "x".repeat(3000));
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicUsize::new(0));
        // The task: finishes handed-over rests and writes frames of its own.
        let task = tokio::spawn({
            let (line, stop) = (Arc::clone(&line), Arc::clone(&stop));
            async move {
                let mut sent = Vec::new();
                let mut seq = 0;
                for round in 0usize.. {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    tokio::select! {
                        () = rest_handed_over(&line) => {}
                        () = tokio::task::yield_now() => {}
                    }
                    // Mostly the pumps' turn: the task writes a frame of its own now and then.
                    if round % 16 != 0 && !line.held_by_task() {
                        continue;
                    }
                    line.hold().await;
                    if line.is_closed() {
                        break;
                    }
                    let own = framed(message(PUMPS, seq).as_bytes());
                    let mut at = 0;
                    while at < own.len() {
                        match std::future::poll_fn(|cx| line.poll_write(cx, &own[at..])).await {
                            Ok(n) => at += n,
                            Err(_) => break,
                        }
                    }
                    if at == own.len() {
                        sent.push(seq);
                        seq += 1;
                    }
                    if std::future::poll_fn(|cx| line.poll_flush(cx))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    line.release();
                }
                sent
            }
        });
        let pumps: Vec<_> = (0..PUMPS)
            .map(|who| {
                let (line, progress) = (Arc::clone(&line), Arc::clone(&progress));
                tokio::spawn(async move {
                    // Each message the pump was told is out (the cut one last, if any).
                    let mut out = Vec::new();
                    let mut seq = 0;
                    for _ in 0..ROUNDS {
                        let mut b = Batch::new(vec![
                            message(who, seq).into(),
                            message(who, seq + 1).into(),
                        ]);
                        // A batch the line refuses is dropped (a caller would queue it);
                        // the pump tries the next one until the line takes it.
                        let mut tries = 0;
                        let direct = loop {
                            match line.try_write(&mut b, || false) {
                                Direct::Busy if tries < 1000 && !line.is_closed() => {
                                    tries += 1;
                                    tokio::task::yield_now().await;
                                }
                                direct => break direct,
                            }
                        };
                        match direct {
                            Direct::Written => out.extend([seq, seq + 1]),
                            Direct::Partial { queue_from } => out.extend(seq..seq + queue_from),
                            Direct::Busy => {}
                        }
                        seq += 2;
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                    out
                })
            })
            .collect();
        // Close while the pumps are busy.
        while progress.load(Ordering::Relaxed) < PUMPS * ROUNDS / 2 {
            tokio::task::yield_now().await;
        }
        line.close();
        stop.store(true, Ordering::Release);
        let mut told: Vec<Vec<usize>> = Vec::new();
        for p in pumps {
            told.push(p.await.expect("pump"));
        }
        let own = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the task ends")
            .expect("task");
        let wire = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .expect("the stream ends once the line is closed")
            .expect("reader");

        let (frames, cut) = parse(&wire).expect("the stream is text frames");
        let mut seen: Vec<Vec<usize>> = vec![Vec::new(); PUMPS + 1];
        for f in frames {
            let text = std::str::from_utf8(f).expect("utf-8");
            let (who, rest) = text.split_once(':').expect("writer");
            let who: usize = who.parse().expect("writer");
            let seq: usize = rest[..7].parse().expect("seq");
            assert_eq!(text, message(who, seq), "a whole frame");
            seen[who].push(seq);
        }
        for (who, told) in told.iter().enumerate() {
            let seen = &seen[who];
            assert!(seen.windows(2).all(|w| w[0] < w[1]), "pump {who} in order");
            // A rest dropped by the close leaves the cut frame missing, at the end only.
            let missing: Vec<_> = told.iter().filter(|s| !seen.contains(s)).collect();
            assert!(
                missing.is_empty() || (cut && missing.len() == 1),
                "pump {who}: told written but not received: {missing:?}"
            );
            assert!(
                seen.iter().all(|s| told.contains(s)),
                "pump {who}: received but not told written"
            );
        }
        assert!(
            own.iter().all(|s| seen[PUMPS].contains(s)),
            "the task's frames"
        );
        let direct: usize = told.iter().map(Vec::len).sum();
        assert!(direct > 0 && !own.is_empty(), "both kinds of writer wrote");
    }

    /// An exhaustive model of the line: every interleaving of two pumps (each one
    /// `try_write`: enter, write, leave), the task (take, write its own frame, then flush and
    /// give back whenever it holds the socket) and a close, with every write outcome (all,
    /// cut anywhere, would block, messages already queued), from a free and from a sealed
    /// line. Each step is the line's own code over a scripted socket.
    mod model {
        use std::cell::RefCell;
        use std::collections::HashSet;
        use std::sync::atomic::AtomicBool;

        use futures::task::ArcWake;

        use super::*;

        /// What the socket's next write takes; the later writes of the same step take all.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
        enum Take {
            #[default]
            All,
            Upto(usize),
            WouldBlock,
            /// Not a write: the pump finds messages queued before its batch.
            Queued,
        }

        #[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
        struct Wire {
            bytes: Vec<u8>,
            next: Take,
            /// The last write would have blocked: the next readiness poll is pending.
            blocked: bool,
            shut: bool,
            writes: u32,
            /// Writes tried after the shutdown.
            late: u32,
        }

        #[derive(Debug, Default)]
        struct Scripted(RefCell<Wire>);

        impl Raw for Scripted {
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                let mut w = self.0.borrow_mut();
                if w.shut {
                    w.late += 1;
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                let n = match std::mem::take(&mut w.next) {
                    Take::All | Take::Queued => buf.len(),
                    Take::Upto(n) => n.min(buf.len()),
                    Take::WouldBlock => {
                        w.blocked = true;
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                };
                w.bytes.extend_from_slice(&buf[..n]);
                w.writes += 1;
                Ok(n)
            }

            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                if std::mem::take(&mut self.0.borrow_mut().blocked) {
                    // Room comes later, and with it a wake-up.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(Ok(()))
            }

            fn shutdown(&self, _: std::net::Shutdown) {
                self.0.borrow_mut().shut = true;
            }
        }

        #[derive(Debug, Default)]
        struct Flag(AtomicBool);

        impl ArcWake for Flag {
            fn wake_by_ref(arc: &Arc<Self>) {
                arc.0.store(true, Ordering::SeqCst);
            }
        }

        /// How many of its messages a pump was told went out (written, or cut and handed
        /// to the task).
        fn handed(direct: Direct, len: usize) -> usize {
            match direct {
                Direct::Written => len,
                Direct::Partial { queue_from } => queue_from,
                Direct::Busy => 0,
            }
        }

        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        enum Pump {
            Start,
            Inside,
            Leaving { to: u8, handed: usize },
            Done { handed: usize },
        }

        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        enum Task {
            Take,
            Write {
                at: usize,
            },
            /// Flushes and gives back whenever it holds the socket (the connection's loop).
            Serve,
            Done,
        }

        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Step {
            PumpEnter(usize),
            PumpWrite(usize, Take),
            PumpLeave(usize),
            TaskTake,
            TaskWrite(Take),
            TaskServe(Take),
            Close,
        }

        const MESSAGES: [&[&str]; 2] = [&["a1", "a2"], &["b1"]];
        const OWN: &str = "t1";
        /// Every way the kernel may take a pump's batch: cut in the first frame, at the
        /// frame boundary, in the second frame.
        const PUMP_TAKES: [&[Take]; 2] = [
            &[
                Take::All,
                Take::Upto(1),
                Take::Upto(4),
                Take::Upto(6),
                Take::WouldBlock,
                Take::Queued,
            ],
            &[Take::All, Take::Upto(2), Take::WouldBlock, Take::Queued],
        ];
        const TASK_TAKES: [Take; 3] = [Take::All, Take::Upto(1), Take::WouldBlock];

        struct World {
            line: Line<Scripted>,
            framed: [Vec<u8>; 2],
            ends: [Vec<usize>; 2],
            pumps: [Pump; 2],
            task: Task,
            parked: bool,
            woken: Arc<Flag>,
            closed: bool,
        }

        type Key = (u8, Option<Vec<u8>>, Wire, [Pump; 2], Task, bool, bool, bool);

        impl World {
            fn new(state: u8) -> Self {
                let mut framed: [Vec<u8>; 2] = Default::default();
                let mut ends: [Vec<usize>; 2] = Default::default();
                for (i, messages) in MESSAGES.iter().enumerate() {
                    let mut b = batch(messages);
                    let f = b.framed::<Text>();
                    framed[i].clone_from(&f.bytes);
                    ends[i].clone_from(&f.ends);
                }
                Self {
                    line: Line::with_state(Scripted::default(), state),
                    framed,
                    ends,
                    pumps: [Pump::Start; 2],
                    task: Task::Take,
                    parked: false,
                    woken: Arc::default(),
                    closed: false,
                }
            }

            fn state(&self) -> u8 {
                self.line.state.load(Ordering::SeqCst)
            }

            fn wire(&self) -> std::cell::Ref<'_, Wire> {
                self.line.raw.0.borrow()
            }

            fn key(&self) -> Key {
                (
                    self.state(),
                    self.line.rest.lock().unwrap().as_ref().map(|r| r.to_vec()),
                    self.wire().clone(),
                    self.pumps,
                    self.task,
                    self.parked,
                    self.woken.0.load(Ordering::SeqCst),
                    self.closed,
                )
            }

            fn copy(&self) -> Self {
                let line =
                    Line::with_state(Scripted(RefCell::new(self.wire().clone())), self.state());
                *line.rest.lock().unwrap() = self.line.rest.lock().unwrap().clone();
                let woken = Arc::new(Flag(AtomicBool::new(self.woken.0.load(Ordering::SeqCst))));
                if self.parked {
                    line.taker
                        .register(&futures::task::waker(Arc::clone(&woken)));
                }
                Self {
                    line,
                    framed: self.framed.clone(),
                    ends: self.ends.clone(),
                    pumps: self.pumps,
                    task: self.task,
                    parked: self.parked,
                    woken,
                    closed: self.closed,
                }
            }

            fn steps(&self) -> Vec<Step> {
                let mut steps = Vec::new();
                for (i, pump) in self.pumps.iter().enumerate() {
                    match pump {
                        Pump::Start => steps.push(Step::PumpEnter(i)),
                        Pump::Inside => {
                            steps.extend(PUMP_TAKES[i].iter().map(|&t| Step::PumpWrite(i, t)));
                        }
                        Pump::Leaving { .. } => steps.push(Step::PumpLeave(i)),
                        Pump::Done { .. } => {}
                    }
                }
                if !self.parked || self.woken.0.load(Ordering::SeqCst) {
                    match self.task {
                        Task::Take => steps.push(Step::TaskTake),
                        Task::Write { .. } => steps.extend(TASK_TAKES.map(Step::TaskWrite)),
                        Task::Serve if self.line.held_by_task() => {
                            steps.extend(TASK_TAKES.map(Step::TaskServe));
                        }
                        Task::Serve | Task::Done => {}
                    }
                }
                if !self.closed {
                    steps.push(Step::Close);
                }
                steps
            }

            /// The task's poll, with the wake-up flag as its waker; whether it is pending.
            fn poll_task<R>(
                &mut self,
                poll: impl FnOnce(&Line<Scripted>, &mut Context<'_>) -> Poll<R>,
            ) -> Poll<R> {
                self.woken.0.store(false, Ordering::SeqCst);
                let waker = futures::task::waker(Arc::clone(&self.woken));
                let r = poll(&self.line, &mut Context::from_waker(&waker));
                self.parked = r.is_pending();
                r
            }

            /// Takes `step`; checks what must hold of every step.
            fn step(&mut self, step: Step) {
                let (before, writes) = (self.state(), self.wire().writes);
                let mut task_state = None;
                match step {
                    Step::PumpEnter(i) => {
                        self.pumps[i] = if self.line.enter_pump() {
                            Pump::Inside
                        } else {
                            Pump::Done { handed: 0 }
                        };
                    }
                    Step::PumpWrite(i, take) => {
                        let (direct, to) = if take == Take::Queued {
                            (Direct::Busy, FREE)
                        } else {
                            self.line.raw.0.borrow_mut().next = take;
                            let framed = Framed {
                                bytes: self.framed[i].clone(),
                                ends: self.ends[i].clone(),
                            };
                            self.line.write_in_pump(&framed)
                        };
                        let handed = handed(direct, MESSAGES[i].len());
                        self.pumps[i] = Pump::Leaving { to, handed };
                    }
                    Step::PumpLeave(i) => {
                        let Pump::Leaving { to, handed } = self.pumps[i] else {
                            unreachable!()
                        };
                        self.line.leave_pump(to);
                        self.pumps[i] = Pump::Done { handed };
                    }
                    Step::TaskTake => {
                        self.task = match self.poll_task(|l, cx| l.poll_take(cx)) {
                            Poll::Pending => Task::Take,
                            Poll::Ready(Ok(())) => Task::Write { at: 0 },
                            Poll::Ready(Err(_)) => Task::Done,
                        };
                    }
                    Step::TaskWrite(take) => {
                        let Task::Write { at } = self.task else {
                            unreachable!()
                        };
                        self.line.raw.0.borrow_mut().next = take;
                        let own = framed(OWN.as_bytes());
                        let r = self.poll_task(|l, cx| l.poll_write(cx, &own[at..]));
                        task_state = Some(self.state());
                        self.task = match r {
                            Poll::Pending => Task::Write { at },
                            Poll::Ready(Ok(n)) if at + n == own.len() => Task::Serve,
                            Poll::Ready(Ok(n)) => Task::Write { at: at + n },
                            Poll::Ready(Err(_)) => Task::Done,
                        };
                    }
                    Step::TaskServe(take) => {
                        self.line.raw.0.borrow_mut().next = take;
                        let r = self.poll_task(|l, cx| l.poll_flush(cx));
                        task_state = Some(self.state());
                        match r {
                            Poll::Pending => {}
                            Poll::Ready(Ok(())) => self.line.release(),
                            Poll::Ready(Err(_)) => self.task = Task::Done,
                        }
                    }
                    Step::Close => {
                        self.line.close();
                        self.closed = true;
                    }
                }
                let wire = self.wire();
                assert_eq!(wire.late, 0, "{step:?}: written after the close");
                let wrote = wire.writes > writes;
                drop(wire);
                if wrote {
                    assert_ne!(before, CLOSED, "{step:?}: written on a closed line");
                    match step {
                        Step::PumpWrite(..) => assert!(
                            matches!(before, PUMP | PUMP_TASK_WAITS | CLOSING),
                            "{step:?}: a pump wrote in state {before}"
                        ),
                        _ => assert!(
                            matches!(task_state, Some(TASK | SEALED)),
                            "{step:?}: the task wrote in state {task_state:?}"
                        ),
                    }
                }
                let inside = self
                    .pumps
                    .iter()
                    .filter(|p| matches!(p, Pump::Inside | Pump::Leaving { .. }))
                    .count();
                assert!(inside <= 1, "{step:?}: two pumps inside");
                let state = self.state();
                assert!(
                    inside == 0 || matches!(state, PUMP | PUMP_TASK_WAITS | CLOSING),
                    "{step:?}: a pump inside in state {state}"
                );
                assert!(
                    inside == 1 || !matches!(state, PUMP | PUMP_TASK_WAITS | CLOSING),
                    "{step:?}: state {state} with no pump inside"
                );
                self.frames();
            }

            /// The messages on the wire, checked: whole known frames, each once, each pump's
            /// in order; and whether a cut frame ends it.
            fn frames(&self) -> (Vec<String>, bool) {
                let wire = self.wire();
                let (frames, cut) = parse(&wire.bytes).expect("only frames on the wire");
                let frames: Vec<String> = frames
                    .iter()
                    .map(|f| String::from_utf8(f.to_vec()).expect("utf-8"))
                    .collect();
                let known = ["a1", "a2", "b1", OWN];
                for (i, f) in frames.iter().enumerate() {
                    assert!(
                        known.contains(&f.as_str()),
                        "a mangled frame {f:?}: {frames:?}"
                    );
                    assert!(!frames[..i].contains(f), "{f} twice");
                }
                let at = |m: &str| frames.iter().position(|f| f == m);
                if let Some(a2) = at("a2") {
                    assert!(at("a1").is_some_and(|a1| a1 < a2), "a2 before a1");
                }
                (frames, cut)
            }

            /// Where nothing can move: everything handed out arrived, or the line closed.
            fn check_end(&self) {
                let woken = self.woken.0.load(Ordering::SeqCst);
                assert!(
                    !self.parked || woken || self.task == Task::Done,
                    "the task waits for a wake-up that never comes: {:?}, state {}",
                    self.task,
                    self.state()
                );
                let (frames, cut) = self.frames();
                let mut told: Vec<&str> = Vec::new();
                for (i, p) in self.pumps.iter().enumerate() {
                    let Pump::Done { handed } = p else {
                        panic!("a pump stuck at {p:?}")
                    };
                    told.extend(&MESSAGES[i][..*handed]);
                }
                if self.task == Task::Serve {
                    told.push(OWN);
                }
                if self.closed {
                    assert_eq!(self.state(), CLOSED, "a close left unfinished");
                    assert!(self.wire().shut, "the peer never saw the end");
                    assert!(frames.iter().all(|f| told.contains(&f.as_str())));
                    return;
                }
                assert!(!cut, "a cut frame never finished: {frames:?}");
                let mut frames: Vec<&str> = frames.iter().map(String::as_str).collect();
                frames.sort_unstable();
                told.sort_unstable();
                assert_eq!(frames, told, "what arrived is what the writers were told");
            }
        }

        fn explore(state: u8) -> usize {
            let mut seen: HashSet<Key> = HashSet::new();
            let mut stack = vec![World::new(state)];
            while let Some(world) = stack.pop() {
                if !seen.insert(world.key()) {
                    continue;
                }
                let steps = world.steps();
                // Where only a close could move: the end of a run that is never closed.
                if steps.iter().all(|&s| s == Step::Close) {
                    world.check_end();
                }
                for step in steps {
                    let mut next = world.copy();
                    next.step(step);
                    stack.push(next);
                }
            }
            seen.len()
        }

        #[test]
        fn every_interleaving_of_a_free_line_keeps_its_invariants() {
            let states = explore(FREE);
            assert!(states > 2_000, "explored {states} states");
        }

        #[test]
        fn every_interleaving_of_a_sealed_line_keeps_its_invariants() {
            let states = explore(SEALED);
            assert!(states > 100, "explored {states} states");
        }
    }
}
