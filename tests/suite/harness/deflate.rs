//! A WebSocket client with permessage-deflate (RFC 7692), written out frame by frame:
//! tungstenite, which every other test client uses, has no extension support. It offers the
//! extension, reports what the edge answered, sends text and binary messages (compressed or
//! not, whole or in fragments) and receives frames with their RSV1 bit and their wire size,
//! inflating the compressed ones. Server frames are never fragmented by the edge.

use std::net::SocketAddr;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::poll::bounded;

/// One message from the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub opcode: u8,
    /// RSV1: the payload was compressed.
    pub compressed: bool,
    /// The payload's size on the wire (compressed, when it was).
    pub wire_len: usize,
    /// The payload, inflated.
    pub payload: Vec<u8>,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(self.opcode, 1, "a text frame: {self:?}");
        serde_json::from_slice(&self.payload).expect("JSON text")
    }
}

#[derive(Debug)]
pub struct DeflateClient {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// The `Sec-WebSocket-Extensions` the edge answered (empty: none).
    pub extensions: String,
}

impl DeflateClient {
    /// Opens `path_and_query` offering `offer` as `Sec-WebSocket-Extensions` (none if empty).
    pub async fn connect(addr: SocketAddr, path_and_query: &str, offer: &str) -> Self {
        let mut tcp = bounded("TCP connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        let mut req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        if !offer.is_empty() {
            req.push_str(&format!("Sec-WebSocket-Extensions: {offer}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes()).await.expect("write request");
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = bounded("the 101", tcp.read(&mut chunk))
                .await
                .expect("read the 101");
            assert!(n > 0, "closed before the 101");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let extensions = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-extensions"))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        buf.drain(..head_end);
        Self {
            tcp,
            buf,
            extensions,
        }
    }

    /// Sends one message as frames of at most `fragment` payload bytes (0: one frame).
    pub async fn send(&mut self, opcode: u8, payload: &[u8], compress: bool, fragment: usize) {
        let body = if compress {
            deflate(payload)
        } else {
            payload.to_vec()
        };
        let size = if fragment == 0 {
            body.len().max(1)
        } else {
            fragment
        };
        let chunks: Vec<&[u8]> = if body.is_empty() {
            vec![&[][..]]
        } else {
            body.chunks(size).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut first = if i == 0 { opcode } else { 0 };
            if i == 0 && compress {
                first |= 0x40;
            }
            if i == last {
                first |= 0x80;
            }
            self.write_frame(first, chunk).await;
        }
    }

    pub async fn send_text(&mut self, text: &str, compress: bool) {
        self.send(1, text.as_bytes(), compress, 0).await;
    }

    /// Writes `bytes` as they are (a frame a broken client builds).
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        bounded("write bytes", self.tcp.write_all(bytes))
            .await
            .expect("write bytes");
    }

    /// Writes one masked frame with this first byte.
    pub async fn write_frame(&mut self, first: u8, payload: &[u8]) {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![first];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n < 65536 {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        bounded("write a frame", self.tcp.write_all(&f))
            .await
            .expect("write a frame");
    }

    /// The next data or close frame (pings are answered, pongs skipped).
    pub async fn recv(&mut self) -> Received {
        loop {
            let (first, payload) = self.read_frame().await;
            match first & 0x0f {
                0x9 => self.write_frame(0x8a, &payload).await,
                0xa => {}
                opcode => {
                    assert!(first & 0x80 != 0, "the edge fragments no message");
                    let compressed = first & 0x40 != 0;
                    let wire_len = payload.len();
                    let payload = if compressed {
                        inflate(&payload)
                    } else {
                        payload
                    };
                    return Received {
                        opcode,
                        compressed,
                        wire_len,
                        payload,
                    };
                }
            }
        }
    }

    /// The code of the close frame that comes next (after any data frames, which are dropped).
    pub async fn close_code(&mut self) -> u16 {
        loop {
            let r = self.recv().await;
            if r.opcode == 8 {
                return u16::from_be_bytes([r.payload[0], r.payload[1]]);
            }
        }
    }

    /// Reads until the edge ends the connection: the close frame's code, or `None` when it
    /// dropped the connection without one (data frames before are dropped).
    pub async fn ended(&mut self) -> Option<u16> {
        loop {
            if let Some((first, payload, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                if first & 0x0f == 8 {
                    return Some(u16::from_be_bytes([payload[0], payload[1]]));
                }
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            match bounded("the edge to end the connection", self.tcp.read(&mut chunk)).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn read_frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if let Some((first, payload, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return (first, payload);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = bounded("a frame from the edge", self.tcp.read(&mut chunk))
                .await
                .expect("read");
            assert!(
                n > 0,
                "the edge closed the connection without a close frame"
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A whole unmasked server frame at the start of `buf`: first byte, payload, bytes used.
fn parse(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
    (buf.len() >= at + len).then(|| (buf[0], buf[at..at + len].to_vec(), at + len))
}

/// A message compressed as a client without context takeover does it.
pub fn deflate(payload: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() + 1024);
    c.compress_vec(payload, &mut out, FlushCompress::Sync)
        .unwrap();
    assert_eq!(
        c.total_in() as usize,
        payload.len(),
        "output buffer too small"
    );
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

pub fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(64 * 1024 * 1024);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .expect("valid deflate data");
    out
}
