//! A connection's TCP socket, written by its task and, in between, by fan-out pumps.
//!
//! A topic message for N local subscribers is framed once; when a subscriber's socket is
//! free, the pump writes the framed bytes to it at once with one non-blocking `write`,
//! instead of queueing them and waking the connection's task. That saves a task wake-up,
//! a queue round trip and a copy per recipient, which is most of the fan-out's cost.
//!
//! **Invariant:** one writer at a time, and only whole frames leave a writer. The socket's
//! [`Line`] is in one of five states:
//! - `FREE`: nobody is writing; tungstenite's write buffer is empty.
//! - `PUMP`: a pump is inside one non-blocking `write` (never across an `.await`).
//! - `TASK`: the connection's task owns the socket. It takes it before tungstenite writes a
//!   byte and gives it back ([`crate::conn`]'s settle) only once tungstenite's buffer is
//!   flushed. A pump whose write was partial hands the socket to the task in this state,
//!   with the unwritten end in `rest`, which goes out before any other byte.
//! - `SEALED`: a TLS connection ([`crate::tls`]): the task owns the socket for good. Bytes
//!   on the wire are TLS records that only the task's TLS session can make, so pumps never
//!   write there; they find the socket taken and queue, as for a busy plain socket.
//! - `CLOSED`: the connection is over; nobody writes again.
//!
//! Pumps that find the socket taken, or frames already queued, queue instead, so a
//! connection's frames keep their order.
//!
//! What an accepted connection arrives on is a [`Wire`]: the plain [`TcpStream`], whose
//! task writes through [`Socket`], or TLS over it, whose task writes through its TLS stream
//! over a [`Socket`] of a sealed line. A plain connection's code is the same as if TLS did
//! not exist: the choice is made once per accepted socket, by type.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Sleep;

use crate::conn::{ConnHandle, ConnInfo};

const FREE: u8 = 0;
const PUMP: u8 = 1;
const TASK: u8 = 2;
const SEALED: u8 = 3;
const CLOSED: u8 = 4;

/// The shared write side of one connection (lives in its handle).
#[derive(Debug)]
pub(crate) struct Line {
    tcp: TcpStream,
    state: AtomicU8,
    /// The unwritten end of a pump's partial write; the task writes it first.
    rest: Mutex<Option<Bytes>>,
    /// Wakes the task when a pump hands it a `rest`.
    pub(crate) rest_ready: Notify,
}

/// What [`Line::try_write_frames`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direct {
    /// Every frame is written.
    Written,
    /// The kernel took part: frames before `queue_from` are written or (the one it cut)
    /// handed to the task; the caller queues the frames from `queue_from` on.
    Partial { queue_from: usize },
    /// The socket is taken or not writable: queue the frames instead.
    Busy,
}

impl Line {
    pub(crate) fn new(tcp: TcpStream) -> Self {
        Self::with_state(tcp, FREE)
    }

    /// The line of a TLS connection: only its task ever writes.
    pub(crate) fn sealed(tcp: TcpStream) -> Self {
        Self::with_state(tcp, SEALED)
    }

    fn with_state(tcp: TcpStream, state: u8) -> Self {
        Self {
            tcp,
            state: AtomicU8::new(state),
            rest: Mutex::new(None),
            rest_ready: Notify::new(),
        }
    }

    /// One non-blocking write of whole frames from a pump, if the socket is free. `ends`
    /// are the frames' end offsets in `frames`. `queued` is checked once the socket is
    /// taken: frames already queued go first.
    pub(crate) fn try_write_frames(
        &self,
        frames: &[u8],
        ends: &[usize],
        queued: impl FnOnce() -> bool,
    ) -> Direct {
        if self
            .state
            .compare_exchange(FREE, PUMP, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Direct::Busy;
        }
        if queued() {
            self.state.store(FREE, Ordering::Release);
            return Direct::Busy;
        }
        // Only this pump changes the state while it is PUMP (close waits), so stores suffice.
        match self.tcp.try_write(frames) {
            Ok(n) if n == frames.len() => {
                self.state.store(FREE, Ordering::Release);
                Direct::Written
            }
            Ok(n) => {
                // Hand the socket and the end of the frame the kernel cut to the task: nobody
                // else may write before it. The whole frames after it are the caller's to
                // queue (shared, counted against the queue's bounds), not copied here.
                let cut = ends.partition_point(|&end| end <= n);
                let end = ends.get(cut).copied().unwrap_or(frames.len());
                *self.rest.lock().expect("rest poisoned") =
                    Some(Bytes::copy_from_slice(&frames[n..end]));
                self.state.store(TASK, Ordering::Release);
                self.rest_ready.notify_one();
                Direct::Partial {
                    queue_from: cut + 1,
                }
            }
            Err(_) => {
                // WouldBlock (a slow reader) or a dead socket: the task finds out and decides.
                self.state.store(FREE, Ordering::Release);
                Direct::Busy
            }
        }
    }

    /// Whether the connection is over.
    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) == CLOSED
    }

    /// Whether the task holds the socket for now (and must flush before giving it back);
    /// false for a sealed line, which it never gives back.
    pub(crate) fn held_by_task(&self) -> bool {
        self.state.load(Ordering::Acquire) == TASK
    }

    /// The task takes the socket; it waits out a pump's write in progress (a few µs).
    fn take(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self
            .state
            .compare_exchange(FREE, TASK, Ordering::Acquire, Ordering::Relaxed)
        {
            Ok(_) | Err(TASK | SEALED) => Poll::Ready(Ok(())),
            Err(CLOSED) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Err(_) => {
                // A pump on another thread is inside one write(2): let it finish.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    /// The task takes the socket before work that must not be overtaken by pumps (a reply
    /// to a subscribe is written before the topic's first message).
    pub(crate) async fn hold(&self) {
        let _ = std::future::poll_fn(|cx| self.take(cx)).await;
    }

    /// Gives the socket back to the pumps. The caller has flushed tungstenite's buffer. A
    /// sealed line stays with the task.
    pub(crate) fn release(&self) {
        let _ = self
            .state
            .compare_exchange(TASK, FREE, Ordering::Release, Ordering::Relaxed);
    }

    /// Nobody writes again; the peer sees the TCP connection end even while handles live on.
    pub(crate) fn close(&self) {
        loop {
            let now = self.state.load(Ordering::Acquire);
            if now == PUMP {
                // A pump inside its one write(2) on another thread: a few µs, unless that
                // thread is preempted; then let it run.
                std::thread::yield_now();
                continue;
            }
            if self
                .state
                .compare_exchange_weak(now, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                break;
            }
        }
        let _ = socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Both);
    }

    /// Writes a pump's unwritten end, if there is one. The task owns the socket.
    fn poll_rest(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut slot = self.rest.lock().expect("rest poisoned");
        while let Some(rest) = slot.as_mut() {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.tcp.try_write(rest) {
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
}

/// The connection task's view of its socket, given to tungstenite. Every write takes the
/// line for the task first.
///
/// A client that takes none of our bytes for `stall_limit` is dropped: a write that cannot
/// progress that long fails with `TimedOut`, whichever of the task's writes it is (queued
/// frames, a reply, a ping, a pump's handed-over rest).
#[derive(Debug)]
pub(crate) struct Socket {
    handle: ConnHandle,
    stall_limit: Option<Duration>,
    /// Running while a write waits for the socket; allocated only then.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl Socket {
    pub(crate) fn new(handle: ConnHandle, stall_limit: Option<Duration>) -> Self {
        Self {
            handle,
            stall_limit,
            stalled: None,
        }
    }

    /// Passes `r` on, timing how long writes have been waiting for the socket.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
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

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let tcp = &self.handle.line().tcp;
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

impl AsyncWrite for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = poll_write_line(self.handle.line(), cx, buf);
        self.watch(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let line = self.handle.line();
        let r = if line.held_by_task() {
            line.poll_rest(cx)
        } else {
            Poll::Ready(Ok(()))
        };
        self.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.handle.line().close();
        Poll::Ready(Ok(()))
    }
}

/// What an accepted connection arrives on; the request head is read and answered through
/// it.
pub(crate) trait Wire: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// What tungstenite reads and writes once the connection runs.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Gives the socket to a new handle for `info`; returns the handle and the task's side.
    fn attach(self, info: ConnInfo, stall_limit: Option<Duration>) -> (ConnHandle, Self::Io);
}

/// Plain: pumps may write to the socket directly.
impl Wire for TcpStream {
    type Io = Socket;

    fn attach(self, info: ConnInfo, stall_limit: Option<Duration>) -> (ConnHandle, Socket) {
        let handle = ConnHandle::new(info, Line::new(self));
        let socket = Socket::new(handle.clone(), stall_limit);
        (handle, socket)
    }
}

/// The task's write: take the line, finish a pump's rest, then write `buf`.
fn poll_write_line(line: &Line, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    ready!(line.take(cx))?;
    ready!(line.poll_rest(cx))?;
    loop {
        ready!(line.tcp.poll_write_ready(cx))?;
        match line.tcp.try_write(buf) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Appends one unmasked server text frame carrying `payload`.
pub(crate) fn text_frame(payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x81);
    let n = payload.len();
    if n < 126 {
        out.push(n as u8);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(126);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    use super::*;

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

    #[tokio::test]
    async fn a_partial_write_hands_the_socket_and_the_rest_to_the_task() {
        use tokio::io::AsyncReadExt;
        let (server, mut client) = tcp_pair().await;
        let line = std::sync::Arc::new(Line::new(server));
        let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        // Eight frames of 128 KiB: the kernel takes far less than the first.
        let ends: Vec<usize> = (1..=8).map(|i| i * big.len() / 8).collect();
        assert_eq!(
            line.try_write_frames(&big, &ends, || false),
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
        assert_eq!(line.try_write_frames(b"zz", &[2], || false), Direct::Busy);
        let reader = tokio::spawn(async move {
            let mut all = head;
            client.read_to_end(&mut all).await.expect("read");
            all
        });
        std::future::poll_fn(|cx| line.poll_rest(cx))
            .await
            .expect("the task writes the rest");
        line.release();
        assert_eq!(
            line.try_write_frames(b"zz", &[2], || true),
            Direct::Busy,
            "frames queued go first"
        );
        let free = async {
            // Busy while the reader has not made room yet (tokio's readiness can be stale).
            while line.try_write_frames(b"zz", &[2], || false) == Direct::Busy {
                line.tcp.writable().await.expect("writable");
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), free)
            .await
            .expect("a free line takes a pump's write");
        line.close();
        assert_eq!(
            line.try_write_frames(b"zz", &[2], || false),
            Direct::Busy,
            "closed"
        );
        // The first frame (its cut end written by the task), then the pump's later write;
        // the other seven frames were the caller's to queue.
        let first = ends[0];
        let all = reader.await.expect("reader");
        assert_eq!(all.len(), first + 2);
        assert!(
            all[..first] == big[..first],
            "the rest did not follow the partial write"
        );
        assert_eq!(&all[first..], b"zz");
    }

    #[tokio::test]
    async fn a_sealed_line_stays_with_its_task() {
        use tokio::io::AsyncReadExt;
        let (server, mut client) = tcp_pair().await;
        let line = Line::sealed(server);
        assert_eq!(line.try_write_frames(b"zz", &[2], || false), Direct::Busy);
        // The task takes it at once, and giving it back leaves it sealed.
        tokio::time::timeout(std::time::Duration::from_secs(10), line.hold())
            .await
            .expect("the task takes a sealed line at once");
        line.release();
        assert!(!line.held_by_task());
        assert_eq!(line.try_write_frames(b"zz", &[2], || false), Direct::Busy);
        std::future::poll_fn(|cx| poll_write_line(&line, cx, b"ok"))
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
            let mut ours = Vec::new();
            text_frame(&payload, &mut ours);
            let mut theirs = Vec::new();
            Frame::message(payload, OpCode::Data(Data::Text), true)
                .format(&mut theirs)
                .expect("a frame formats into a Vec");
            assert_eq!(ours, theirs, "payload of {n} bytes");
        }
    }
}
