//! TLS on the edge's listener (`wss://`, and `https://` for `/healthz`, `/readyz`,
//! `/metrics`): the handshake with the server config current at accept, then the same request
//! head, upgrade and connection task as a plain socket.
//!
//! A TLS connection's [`Line`] is sealed ([`crate::transport::ws`]): fan-out pumps cannot
//! write framed bytes into a TLS session, so they queue every frame for it and its task
//! writes them through the TLS stream. Plain connections keep the direct write.
//!
//! What an accepted connection arrives on is a [`Wire`]: the plain [`TcpStream`], whose
//! task writes through [`Socket`], or TLS over it, whose task writes through its TLS stream
//! over a [`Socket`] of a sealed line. A plain connection's code is the same as if TLS did
//! not exist: the choice is made once per accepted socket, by type.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::handle::{Agreed, ConnHandle, ConnInfo};
use crate::transport::ws::{Line, Socket};

/// What an accepted connection arrives on; the request head is read and answered through
/// it.
pub(crate) trait Wire: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// What tungstenite reads and writes once the connection runs.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Gives the socket to a new handle for `info`; returns the handle and the task's side.
    fn attach(
        self,
        info: ConnInfo,
        agreed: Agreed,
        stall_limit: Option<Duration>,
    ) -> (ConnHandle, Self::Io);
}

/// Plain: pumps may write to the socket directly.
impl Wire for TcpStream {
    type Io = Socket<ConnHandle>;

    fn attach(
        self,
        info: ConnInfo,
        agreed: Agreed,
        stall_limit: Option<Duration>,
    ) -> (ConnHandle, Self::Io) {
        let handle = ConnHandle::new(info, Line::new(self), agreed);
        let socket = Socket::new(handle.clone(), stall_limit);
        (handle, socket)
    }
}

/// Runs the TLS handshake on `tcp` within `limit`.
pub(crate) async fn accept(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    limit: Duration,
) -> io::Result<TlsStream<TlsIo>> {
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(TlsIo::Tcp(tcp));
    match tokio::time::timeout(limit, handshake).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no TLS handshake within {limit:?}"),
        )),
    }
}

/// What a TLS session runs over: the socket itself until the connection is admitted, then
/// the connection's [`Socket`] (its sealed line).
#[derive(Debug)]
pub(crate) enum TlsIo {
    Tcp(TcpStream),
    Line(Socket<ConnHandle>),
    /// Between the two, for the length of [`Wire::attach`].
    Moving,
}

/// TLS: the handle's line is sealed; the task writes through the TLS session.
impl Wire for TlsStream<TlsIo> {
    type Io = Self;

    fn attach(
        mut self,
        info: ConnInfo,
        agreed: Agreed,
        stall_limit: Option<Duration>,
    ) -> (ConnHandle, Self) {
        let (io, _) = self.get_mut();
        let tcp = match std::mem::replace(io, TlsIo::Moving) {
            TlsIo::Tcp(tcp) => tcp,
            TlsIo::Line(_) | TlsIo::Moving => unreachable!("a connection is attached once"),
        };
        let handle = ConnHandle::new(info, Line::sealed(tcp), agreed);
        *io = TlsIo::Line(Socket::new(handle.clone(), stall_limit));
        (handle, self)
    }
}

fn moving() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket is being attached")
}

impl AsyncRead for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Line(socket) => Pin::new(socket).poll_read(cx, buf),
            Self::Moving => Poll::Ready(Err(moving())),
        }
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Line(socket) => Pin::new(socket).poll_write(cx, buf),
            Self::Moving => Poll::Ready(Err(moving())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Line(socket) => Pin::new(socket).poll_flush(cx),
            Self::Moving => Poll::Ready(Err(moving())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Self::Line(socket) => Pin::new(socket).poll_shutdown(cx),
            Self::Moving => Poll::Ready(Err(moving())),
        }
    }
}
