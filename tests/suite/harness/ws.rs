//! The WebSocket client of every test: a real TCP socket, any path and request headers, any
//! frame out, and reads that fail the test with what came instead of what was expected.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::poll::{STEP, bounded};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An upgrade the edge refused: its HTTP status, and what of the body came with the head
/// (often nothing: [`refused_upgrade`](super::http::refused_upgrade) reads the whole body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub body: String,
}

/// A WebSocket client over a real TCP socket.
#[derive(Debug)]
pub struct Client {
    ws: Ws,
    pub name: String,
    /// The client's end of the TCP connection (the edge's `remote_addr` of it).
    pub local_addr: SocketAddr,
    /// The bound on each expected frame or close ([`STEP`] unless set with [`Client::waiting`]).
    wait: Duration,
}

impl Client {
    /// Opens a socket to `addr` at `path_and_query` with extra request headers; fails the
    /// test when the upgrade is refused.
    pub async fn connect(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
        name: &str,
    ) -> Self {
        Self::try_connect(addr, path_and_query, headers, name)
            .await
            .unwrap_or_else(|r| {
                panic!("{name}: upgrade refused with HTTP {}: {}", r.status, r.body)
            })
    }

    /// Opens a socket, or returns the refusal.
    pub async fn try_connect(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
        name: &str,
    ) -> Result<Self, Refusal> {
        let tcp = bounded("TCP connect", TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("{name}: TCP connect to {addr}: {e}"));
        Self::handshake(tcp, addr, path_and_query, headers, name).await
    }

    /// Opens a socket whose kernel receive buffer is about `rcvbuf` bytes: a client that
    /// stops reading fills up quickly.
    pub async fn connect_small_rcvbuf(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
        name: &str,
        rcvbuf: u32,
    ) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(rcvbuf).unwrap();
        let tcp = bounded("TCP connect", socket.connect(addr))
            .await
            .unwrap_or_else(|e| panic!("{name}: TCP connect to {addr}: {e}"));
        Self::handshake(tcp, addr, path_and_query, headers, name)
            .await
            .unwrap_or_else(|r| {
                panic!("{name}: upgrade refused with HTTP {}: {}", r.status, r.body)
            })
    }

    async fn handshake(
        tcp: TcpStream,
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
        name: &str,
    ) -> Result<Self, Refusal> {
        let local_addr = tcp.local_addr().unwrap();
        let url = format!("ws://{addr}{path_and_query}");
        let mut req = url
            .as_str()
            .into_client_request()
            .unwrap_or_else(|e| panic!("{name}: bad request {url}: {e}"));
        for (k, v) in headers {
            req.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let upgrade = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp));
        match bounded(&format!("{name}: upgrade of {url}"), upgrade).await {
            Ok((ws, _)) => Ok(Self {
                ws,
                name: name.to_owned(),
                local_addr,
                wait: STEP,
            }),
            Err(WsError::Http(resp)) => Err(Refusal {
                status: resp.status().as_u16(),
                body: resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Err(e) => panic!("{name}: upgrade of {url} failed: {e}"),
        }
    }

    /// The WebSocket itself, for a test that reads it on a task of its own (and must not fail
    /// when the connection ends, e.g. to count what arrived before an edge died).
    pub fn into_ws(self) -> Ws {
        self.ws
    }

    /// The same client with `wait` as the bound on each expected frame or close.
    pub fn waiting(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Sends `frame` as a JSON text frame.
    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// Sends a text frame exactly as given.
    pub async fn send_text(&mut self, text: &str) {
        self.send_message(WsMessage::text(text)).await;
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.send_message(WsMessage::binary(data)).await;
    }

    /// Sends a text frame with any payload bytes, UTF-8 or not (a raw frame, masked as a
    /// client's must be).
    pub async fn send_raw_text(&mut self, payload: Vec<u8>) {
        let frame = Frame::message(payload, OpCode::Data(Data::Text), true);
        self.send_message(WsMessage::Frame(frame)).await;
    }

    pub async fn send_message(&mut self, m: WsMessage) {
        bounded("WebSocket send", self.ws.send(m))
            .await
            .unwrap_or_else(|e| panic!("{}: send: {e}", self.name));
    }

    /// The next text frame as JSON (control frames skipped).
    pub async fn recv(&mut self) -> Value {
        self.recv_within(self.wait).await
    }

    /// The next text frame as JSON (control frames skipped), within `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Value {
        let name = self.name.clone();
        let next = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Text(t))) => {
                        return serde_json::from_str::<Value>(&t)
                            .unwrap_or_else(|e| panic!("{name}: frame {t:?} is not JSON: {e}"));
                    }
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                    other => panic!("{name}: expected a text frame, got {other:?}"),
                }
            }
        };
        timeout(limit, next)
            .await
            .unwrap_or_else(|_| panic!("{}: no frame within {limit:?}", self.name))
    }

    /// The next binary frame's bytes (control frames skipped).
    pub async fn recv_binary(&mut self) -> Vec<u8> {
        let (name, limit) = (self.name.clone(), self.wait);
        let next = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Binary(b))) => return b.to_vec(),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                    other => panic!("{name}: expected a binary frame, got {other:?}"),
                }
            }
        };
        timeout(limit, next)
            .await
            .unwrap_or_else(|_| panic!("{}: no binary frame within {limit:?}", self.name))
    }

    /// The next frame, which must have `"type": ty`.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(
            v["type"], ty,
            "{}: expected a {ty:?} frame, got {v}",
            self.name
        );
        v
    }

    /// The next frame, which must be an error frame with `code` and a message.
    pub async fn recv_error(&mut self, code: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(
            v["type"], "error",
            "{}: expected an error frame, got {v}",
            self.name
        );
        assert_eq!(
            v["code"], code,
            "{}: expected error code {code:?}, got {v}",
            self.name
        );
        assert!(
            v["message"].is_string(),
            "{}: error frame without a message: {v}",
            self.name
        );
        v
    }

    /// The next message of any kind (pings and pongs included) within `limit`; `None` when
    /// nothing came. Fails the test when the connection fails or ends.
    pub async fn next_message_within(&mut self, limit: Duration) -> Option<WsMessage> {
        match timeout(limit, self.ws.next()).await {
            Err(_) => None,
            Ok(Some(Ok(m))) => Some(m),
            Ok(other) => panic!("{}: expected a message, got {other:?}", self.name),
        }
    }

    /// Sends a ping and expects its pong as the very next frame: the socket is open and
    /// served, and nothing was pending for it (every answer to an earlier frame of this
    /// client has been read, and no message meant for others came). Only on dialects with
    /// the `ping` verb (native, hyperexpress).
    pub async fn roundtrip(&mut self) {
        let id = ulid::Ulid::new().to_string();
        self.send(serde_json::json!({"type": "ping", "id": id}))
            .await;
        let v = self.recv().await;
        assert_eq!(
            v,
            serde_json::json!({"type": "pong", "id": id}),
            "{}: expected only the pong, got another frame first",
            self.name
        );
    }

    /// Waits for the server's close frame, with no text frame before it: (code, reason).
    pub async fn close_frame(&mut self) -> (u16, String) {
        let ((code, reason), texts) = self.close_frame_after_texts().await;
        assert!(
            texts.is_empty(),
            "{}: frames before the close: {texts:?}",
            self.name
        );
        (code, reason)
    }

    /// Waits for the server's close frame, reading past any text frames: (code, reason).
    pub async fn expect_close(&mut self) -> (u16, String) {
        self.close_frame_after_texts().await.0
    }

    /// Waits for the server's close frame; returns (code, reason) and the text frames that
    /// came before it.
    pub async fn close_frame_after_texts(&mut self) -> ((u16, String), Vec<Value>) {
        self.close_frame_after_texts_within(self.wait).await
    }

    /// [`Client::close_frame_after_texts`] within `limit`.
    pub async fn close_frame_after_texts_within(
        &mut self,
        limit: Duration,
    ) -> ((u16, String), Vec<Value>) {
        let name = self.name.clone();
        let mut texts = Vec::new();
        let read = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Close(Some(f)))) => {
                        return (u16::from(f.code), f.reason.to_string());
                    }
                    Some(Ok(WsMessage::Text(t))) => texts.push(
                        serde_json::from_str(&t).unwrap_or_else(|_| Value::String(t.to_string())),
                    ),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                    other => {
                        panic!("{name}: expected a close frame, got {other:?}; frames: {texts:?}")
                    }
                }
            }
        };
        let close = timeout(limit, read)
            .await
            .unwrap_or_else(|_| panic!("{}: no close frame within {limit:?}", self.name));
        (close, texts)
    }

    /// Reads the raw socket until the TCP connection ends, without writing anything (a
    /// WebSocket client would answer pings, and writing to a closed socket resets it and
    /// loses what is still unread). Fails if a close frame arrives. Returns the opcodes of
    /// the frames read. Use it on a client with no partly read frames.
    pub async fn expect_dropped(self) -> Vec<u8> {
        let limit = self.wait;
        self.expect_dropped_within(limit).await
    }

    /// [`Client::expect_dropped`] within `limit`.
    pub async fn expect_dropped_within(self, limit: Duration) -> Vec<u8> {
        let MaybeTlsStream::Plain(tcp) = self.ws.into_inner() else {
            unreachable!("plain TCP only")
        };
        expect_dropped(tcp, limit, &self.name).await
    }

    /// Closes from the client side without a code and waits (bounded) for the server's
    /// answer.
    pub async fn close(self) {
        self.close_with(None).await;
    }

    /// The client's TCP connection, to write and read raw bytes (a plain connection only).
    pub fn into_tcp(self) -> TcpStream {
        match self.ws.into_inner() {
            MaybeTlsStream::Plain(tcp) => tcp,
            _ => panic!("{}: not a plain connection", self.name),
        }
    }

    /// Closes from the client side with `code` and waits (bounded) for the server's answer.
    pub async fn close_code(self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        self.close_with(Some(frame)).await;
    }

    async fn close_with(mut self, frame: Option<CloseFrame>) {
        let _ = timeout(self.wait, self.ws.close(frame)).await;
        let drain = async { while let Some(Ok(_)) = self.ws.next().await {} };
        let _ = timeout(self.wait, drain).await;
    }
}

/// The HTTP status of an upgrade request to `path` (101 when it was accepted; the client is
/// then closed).
pub async fn upgrade_status(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> u16 {
    match Client::try_connect(addr, path, headers, path).await {
        Ok(c) => {
            c.close().await;
            101
        }
        Err(refusal) => refusal.status,
    }
}

/// The opcodes of the (unmasked) server frames in `buf`; a trailing partial frame counts.
pub fn server_opcodes(mut buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while buf.len() >= 2 {
        out.push(buf[0] & 0x0f);
        let (len, head) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 if buf.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&buf[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(n)).expect("a frame length"),
                    10,
                )
            }
            126 | 127 => break,
            n => (usize::from(n), 2),
        };
        buf = buf.get(head + len..).unwrap_or_default();
    }
    out
}

/// The status code of the first close frame among the (unmasked) server frames in `buf`.
pub fn server_close_code(mut buf: &[u8]) -> Option<u16> {
    while buf.len() >= 2 {
        let (len, head) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 if buf.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&buf[2..10]);
                (usize::try_from(u64::from_be_bytes(n)).ok()?, 10)
            }
            126 | 127 => return None,
            n => (usize::from(n), 2),
        };
        if buf[0] & 0x0f == 0x8 && len >= 2 && buf.len() >= head + 2 {
            return Some(u16::from_be_bytes([buf[head], buf[head + 1]]));
        }
        buf = buf.get(head + len..)?;
    }
    None
}

/// Reads the raw socket until the TCP connection ends, without writing anything. Fails if
/// that takes longer than `limit` or a close frame arrives. Returns the opcodes of the
/// frames read; `who` names the client in failures.
pub async fn expect_dropped(mut tcp: TcpStream, limit: Duration, who: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    timeout(limit, read)
        .await
        .unwrap_or_else(|_| panic!("{who}: connection not dropped within {limit:?}"));
    let opcodes = server_opcodes(&buf);
    assert!(
        !opcodes.contains(&0x8),
        "{who}: expected the connection to be dropped without a close frame, got frames \
         {opcodes:x?}"
    );
    opcodes
}
