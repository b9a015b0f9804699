//! A minimal WebSocket client: the upgrade, a parser of (unmasked) server frames over a byte
//! slice, and masked client frames. Just enough for a load generator: no extensions, no
//! fragmentation of our own frames, no UTF-8 validation of theirs.

use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opcodes (RFC 6455 §5.2).
pub(crate) const OP_CONTINUATION: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;

/// Offer permessage-deflate on upgrade (`--compress`).
pub(crate) static COMPRESS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Largest response head accepted on upgrade.
const MAX_HEAD: usize = 16 * 1024;
/// The masking key of every frame this client sends; the RFC wants it unpredictable, which
/// protects proxies, not a benchmark on loopback.
const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x2e];

/// `ws://host:port/path?query`, split.
#[derive(Debug, Clone)]
pub(crate) struct WsUrl {
    /// `host:port`.
    pub(crate) authority: String,
    /// Path and query, starting with `/`.
    pub(crate) target: String,
}

impl WsUrl {
    pub(crate) fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .with_context(|| format!("{url}: only ws:// URLs are supported"))?;
        let (authority, target) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if !authority.contains(':') {
            bail!("{url}: the port is needed");
        }
        Ok(Self {
            authority: authority.to_owned(),
            target: target.to_owned(),
        })
    }

    /// The same server with another path and query.
    pub(crate) fn with_target(&self, target: &str) -> Self {
        Self {
            authority: self.authority.clone(),
            target: target.to_owned(),
        }
    }

    /// Appends `&name=value` (or `?name=value`) to the query.
    pub(crate) fn with_param(&self, name: &str, value: &str) -> Self {
        let sep = if self.target.contains('?') { '&' } else { '?' };
        self.with_target(&format!("{}{sep}{name}={value}", self.target))
    }
}

/// An upgraded connection and the bytes that arrived after the response head.
#[derive(Debug)]
pub(crate) struct Upgraded {
    pub(crate) stream: TcpStream,
    pub(crate) rest: Vec<u8>,
}

/// Connects and upgrades within `timeout`.
pub(crate) async fn connect(url: &WsUrl, timeout: Duration) -> anyhow::Result<Upgraded> {
    tokio::time::timeout(timeout, connect_inner(url))
        .await
        .with_context(|| format!("upgrade to {} timed out", url.authority))?
}

async fn connect_inner(url: &WsUrl) -> anyhow::Result<Upgraded> {
    let mut stream = TcpStream::connect(&url.authority)
        .await
        .with_context(|| format!("cannot connect to {}", url.authority))?;
    stream.set_nodelay(true)?;
    let extension = if COMPRESS.load(std::sync::atomic::Ordering::Relaxed) {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extension}\r\n",
        url.target, url.authority
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("{} closed the connection during the upgrade", url.authority);
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(i) = memchr::memmem::find(&head, b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > MAX_HEAD {
            bail!("{}: response head too large", url.authority);
        }
    };
    let status_line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    if !status_line.starts_with(b"HTTP/1.1 101") {
        bail!(
            "{}{}: upgrade refused: {}",
            url.authority,
            url.target,
            String::from_utf8_lossy(&head[..end])
                .lines()
                .next()
                .unwrap_or_default()
        );
    }
    Ok(Upgraded {
        stream,
        rest: head[end..].to_vec(),
    })
}

/// The header of one server frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) opcode: u8,
    /// Bytes of the header (2, 4 or 10; 4 more when masked).
    pub(crate) len: usize,
    pub(crate) payload: usize,
    pub(crate) masked: bool,
    /// RSV1: a compressed message (permessage-deflate).
    pub(crate) rsv1: bool,
}

impl Header {
    /// Header and payload.
    pub(crate) fn total(&self) -> usize {
        self.len + self.payload
    }
}

/// Parses a frame header at the start of `buf`; `None` when more bytes are needed.
#[inline]
pub(crate) fn header(buf: &[u8]) -> Option<Header> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (mut len, payload) = match buf[1] & 0x7f {
        126 => {
            let b = buf.get(2..4)?;
            (4, usize::from(u16::from_be_bytes([b[0], b[1]])))
        }
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (10, usize::try_from(u64::from_be_bytes(b)).ok()?)
        }
        n => (2, usize::from(n)),
    };
    if masked {
        len += 4;
    }
    Some(Header {
        opcode,
        len,
        payload,
        masked,
        rsv1: buf[0] & 0x40 != 0,
    })
}

/// Appends one masked client frame (FIN set).
pub(crate) fn client_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if let Ok(n16) = u16::try_from(n) {
        out.push(0x80 | 126);
        out.extend_from_slice(&n16.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
}

/// One masked text frame.
pub(crate) fn text(payload: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    client_frame(OP_TEXT, payload.as_bytes(), &mut out);
    out
}

/// Reads frames from `stream` (after `pending`) until `done` accepts a data frame's payload;
/// answers pings. Returns the bytes read past that frame. For set-up steps, not the hot path.
pub(crate) async fn read_until(
    stream: &mut TcpStream,
    mut pending: Vec<u8>,
    timeout: Duration,
    mut done: impl FnMut(&[u8]) -> bool,
) -> anyhow::Result<Vec<u8>> {
    let work = async {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let mut pos = 0;
            while let Some(h) = header(&pending[pos..]) {
                if pending.len() - pos < h.total() {
                    break;
                }
                let payload = &pending[pos + h.len..pos + h.total()];
                pos += h.total();
                match h.opcode {
                    OP_TEXT | OP_BINARY | OP_CONTINUATION if done(payload) => {
                        return Ok(pending[pos..].to_vec());
                    }
                    OP_PING => {
                        let mut pong = Vec::new();
                        client_frame(0xA, payload, &mut pong);
                        stream.write_all(&pong).await?;
                    }
                    OP_CLOSE => bail!("server closed: {}", close_reason(payload)),
                    _ => {}
                }
            }
            pending.drain(..pos);
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("server closed the connection");
            }
            pending.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .context("no answer in time")?
}

/// `1013 slow consumer` from a close frame's payload.
pub(crate) fn close_reason(payload: &[u8]) -> String {
    match payload {
        [a, b, reason @ ..] => format!(
            "{} {}",
            u16::from_be_bytes([*a, *b]),
            String::from_utf8_lossy(reason)
        ),
        _ => "no code".into(),
    }
}

/// The close code of a close frame's payload (1005: none).
pub(crate) fn close_code(payload: &[u8]) -> u16 {
    match payload {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 1005,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_of_each_length() {
        assert_eq!(header(&[0x81]), None);
        let h = header(&[0x81, 5, b'h']).unwrap();
        assert_eq!((h.opcode, h.len, h.payload), (OP_TEXT, 2, 5));
        let h = header(&[0x82, 126, 0x01, 0x00]).unwrap();
        assert_eq!((h.len, h.payload), (4, 256));
        assert_eq!(header(&[0x82, 127, 0, 0, 0]), None);
        let h = header(&[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]).unwrap();
        assert_eq!((h.len, h.payload), (10, 65_536));
    }

    #[test]
    fn client_frames_are_masked() {
        let f = text("hello");
        let h = header(&f).unwrap();
        assert!(h.masked);
        assert_eq!((h.len, h.payload), (6, 5));
        let unmasked: Vec<u8> = f[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ MASK[i & 3])
            .collect();
        assert_eq!(unmasked, b"hello");
        let mut big = Vec::new();
        client_frame(OP_BINARY, &[0; 300], &mut big);
        assert_eq!(header(&big).unwrap().payload, 300);
    }

    #[test]
    fn urls() {
        let u = WsUrl::parse("ws://127.0.0.1:80/connect?user=a").unwrap();
        assert_eq!(u.authority, "127.0.0.1:80");
        assert_eq!(u.with_param("x", "1").target, "/connect?user=a&x=1");
        assert_eq!(WsUrl::parse("ws://h:1").unwrap().target, "/");
        assert!(WsUrl::parse("http://h:1/").is_err());
    }
}
