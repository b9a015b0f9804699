//! The HTTP/1.1 request head in front of every WebSocket: read, parse, answer plain
//! requests (`/healthz`, `/readyz`, `/metrics`, refusals) and accept upgrades.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request head read, in bytes.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 48;

/// A parsed request head.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestHead {
    pub(crate) method: String,
    /// The minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub(crate) version: u8,
    pub(crate) path: String,
    pub(crate) query: HashMap<String, String>,
    /// Header names lower-cased; repeated headers joined with `, `.
    pub(crate) headers: HashMap<String, String>,
}

impl RequestHead {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// A cookie's value.
    pub(crate) fn cookie(&self, name: &str) -> Option<&str> {
        self.header("cookie")?
            .split(';')
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.trim_matches('"'))
    }

    /// Whether the request asks for a WebSocket upgrade.
    pub(crate) fn is_upgrade(&self) -> bool {
        let has_token = |name: &str, token: &str| {
            self.header(name)
                .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        };
        has_token("upgrade", "websocket") && has_token("connection", "upgrade")
    }
}

/// Why a request head could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeadError {
    #[error("request head is malformed")]
    Malformed(#[source] Option<httparse::Error>),
    #[error("request head is larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("no request head within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before the request head ended")]
    Closed,
    #[error("reading the request head failed")]
    Io(#[from] std::io::Error),
}

/// Reads one request head. Returns it and the bytes read past it (the start of the first
/// WebSocket frame, if the client did not wait for the 101).
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Result<(RequestHead, Vec<u8>), HeadError> {
    tokio::time::timeout(limit, read_head_inner(stream))
        .await
        .map_err(|_| HeadError::Timeout(limit))?
}

async fn read_head_inner<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(RequestHead, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let start = buf.len();
        buf.resize(MAX_HEAD.min(start + 1024), 0);
        let n = stream.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(HeadError::Closed);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(len)) => {
                let head = to_head(&req).ok_or(HeadError::Malformed(None))?;
                return Ok((head, buf.split_off(len)));
            }
            Err(e) => return Err(HeadError::Malformed(Some(e))),
        }
    }
}

fn to_head(req: &httparse::Request<'_, '_>) -> Option<RequestHead> {
    let target = req.path?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers: HashMap<String, String> = HashMap::new();
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).ok()?.trim().to_owned();
        headers
            .entry(h.name.to_ascii_lowercase())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    Some(RequestHead {
        method: req.method?.to_owned(),
        version: req.version?,
        path: percent_decode(path)?,
        query: parse_query(query)?,
        headers,
    })
}

/// Parses `a=1&b=x%20y`; the first value of a repeated name wins.
fn parse_query(q: &str) -> Option<HashMap<String, String>> {
    let mut out = HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(&k.replace('+', " "))?;
        let v = percent_decode(&v.replace('+', " "))?;
        out.entry(k).or_insert(v);
    }
    Some(out)
}

fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = (bytes.next()? as char).to_digit(16)?;
            let lo = (bytes.next()? as char).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// Writes a complete plain response and shuts the write side.
pub(crate) async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        502 => "Bad Gateway",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n{}\r\n",
        body.len(),
        if status == 426 {
            "sec-websocket-version: 13\r\n"
        } else {
            ""
        },
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Whether a `Sec-WebSocket-Key` is what RFC 6455 §4.1 asks for: base64 of 16 bytes.
pub(crate) fn is_valid_key(key: &str) -> bool {
    use base64::Engine as _;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|b| b.len() == 16)
}

/// The 101 answer to a valid upgrade request, with the extension and subprotocol agreed on.
pub(crate) fn switching_protocols(
    key: &str,
    extensions: Option<&str>,
    protocol: Option<&str>,
) -> String {
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n"
    );
    if let Some(e) = extensions {
        head.push_str(&format!("sec-websocket-extensions: {e}\r\n"));
    }
    if let Some(p) = protocol {
        head.push_str(&format!("sec-websocket-protocol: {p}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Matches `path` against a route pattern such as `/{channel}`; returns the captured
/// segments.
pub(crate) fn match_path(pattern: &str, path: &str) -> Option<Vec<(String, String)>> {
    let mut params = Vec::new();
    let (mut p, mut s) = (pattern.split('/'), path.split('/'));
    loop {
        match (p.next(), s.next()) {
            (None, None) => return Some(params),
            (Some(pat), Some(seg)) => {
                if let Some(name) = pat.strip_prefix('{').and_then(|n| n.strip_suffix('}')) {
                    if seg.is_empty() {
                        return None;
                    }
                    params.push((name.to_owned(), seg.to_owned()));
                } else if pat != seg {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_head_and_keeps_the_rest() {
        let raw = b"GET /connect?user=al%20ice&namespace=n&x HTTP/1.1\r\nHost: h\r\nCookie: a=1; ID_TOKEN=tok\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\nREST";
        let mut r = &raw[..];
        let (head, rest) = read_head(&mut r, Duration::from_secs(1)).await.unwrap();
        assert_eq!(head.path, "/connect");
        assert_eq!(head.query["user"], "al ice");
        assert_eq!(head.query["x"], "");
        assert_eq!(head.cookie("ID_TOKEN"), Some("tok"));
        assert!(head.is_upgrade());
        assert_eq!(rest, b"REST");
    }

    #[tokio::test]
    async fn rejects_garbage_and_oversize() {
        let mut r = &b"\x00\x01 nonsense\r\n\r\n"[..];
        assert!(matches!(
            read_head(&mut r, Duration::from_secs(1)).await,
            Err(HeadError::Malformed(_))
        ));
        let big = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 9000]].concat();
        let mut r = &big[..];
        assert!(matches!(
            read_head(&mut r, Duration::from_secs(1)).await,
            Err(HeadError::TooLarge)
        ));
    }

    #[tokio::test]
    async fn keeps_the_http_version() {
        let mut r = &b"GET / HTTP/1.0\r\nHost: h\r\n\r\n"[..];
        let (head, _) = read_head(&mut r, Duration::from_secs(1)).await.unwrap();
        assert_eq!(head.version, 0);
    }

    #[test]
    fn keys_are_base64_of_16_bytes() {
        assert!(is_valid_key("dGhlIHNhbXBsZSBub25jZQ=="));
        // Base64 of "Hello, world!": 13 bytes.
        for bad in [
            "SGVsbG8sIHdvcmxkIQ==",
            "",
            "x",
            "not base64 at all!!!!!!!",
            "dGhlIHNhbXBsZSBub25jZQ",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(!is_valid_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn path_patterns_capture_segments() {
        assert_eq!(match_path("/connect", "/connect"), Some(vec![]));
        assert_eq!(match_path("/connect", "/other"), None);
        assert_eq!(
            match_path("/{channel}", "/logs"),
            Some(vec![("channel".into(), "logs".into())])
        );
        assert_eq!(match_path("/{channel}", "/"), None);
        assert_eq!(match_path("/{channel}", "/a/b"), None);
    }
}
