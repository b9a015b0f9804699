//! Plain HTTP/1 on a raw TCP connection, as curl, a probe or a scraper speaks it (and as a
//! browser's upgrade request looks): readiness, metrics, refused upgrades.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::poll::{STEP, eventually};
use std::time::Duration;

/// A plain HTTP/1.0 GET: (status, body). `Err` when the connection fails.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_exchange(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
    .await
}

/// Writes `request` as it is and reads the response until the server closes (or
/// [`STEP`]): (status, everything after the head). `Err` when the connection fails.
pub async fn http_exchange(addr: SocketAddr, request: &str) -> Result<(u16, String), String> {
    let text = exchange(
        addr,
        request,
        async |tcp: &mut TcpStream, raw: &mut Vec<u8>| tcp.read_to_end(raw).await.map(drop),
    )
    .await?;
    parse_response(&text)
}

/// Connects to `addr`, writes `request` and lets `read` read the answer, all within
/// [`STEP`]: what was read.
async fn exchange(
    addr: SocketAddr,
    request: &str,
    read: impl AsyncFnOnce(&mut TcpStream, &mut Vec<u8>) -> std::io::Result<()>,
) -> Result<String, String> {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        tcp.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        read(&mut tcp, &mut raw).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&raw).into_owned())
    };
    timeout(STEP, exchange)
        .await
        .map_err(|_| format!("request to {addr} timed out"))?
}

/// The text of a WebSocket upgrade request for `path_and_query` on `addr` with extra
/// headers, as a browser or curl sends it.
pub fn upgrade_request(addr: SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> String {
    let host = addr.to_string();
    upgrade_request_as(
        path_and_query,
        "1.1",
        &host,
        "dGhlIHNhbXBsZSBub25jZQ==",
        headers,
    )
}

/// A raw upgrade request with any HTTP `version`, `Host`, `Sec-WebSocket-Key` and extra
/// headers, valid or not.
pub fn upgrade_request_as(
    path_and_query: &str,
    version: &str,
    host: &str,
    key: &str,
    headers: &[(&str, &str)],
) -> String {
    let mut text = format!(
        "GET {path_and_query} HTTP/{version}\r\nHost: {host}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
    );
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    text
}

/// An upgrade request the edge refuses: (status, body), read until the edge closes.
pub async fn refused_upgrade(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let request = upgrade_request(addr, path_and_query, headers);
    http_exchange(addr, &request)
        .await
        .unwrap_or_else(|e| panic!("upgrade of {path_and_query}: {e}"))
}

/// Writes `request` as it is and reads only the response head (the connection may stay
/// open, as after a `101`): (status, the head).
pub async fn http_head(addr: SocketAddr, request: &str) -> Result<(u16, String), String> {
    let text = exchange(
        addr,
        request,
        async |tcp: &mut TcpStream, raw: &mut Vec<u8>| {
            let mut chunk = [0u8; 1024];
            while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
                match tcp.read(&mut chunk).await? {
                    0 => break,
                    n => raw.extend_from_slice(&chunk[..n]),
                }
            }
            Ok(())
        },
    )
    .await?;
    let (status, _) = parse_response(&text)?;
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_owned();
    Ok((status, head))
}

pub fn parse_response(text: &str) -> Result<(u16, String), String> {
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of an unlabelled Prometheus sample.
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until `GET path` on `addr` (of the process `who`) answers `status`; fails the test
/// after `limit`.
pub async fn wait_http_status(
    who: &str,
    addr: SocketAddr,
    path: &str,
    status: u16,
    limit: Duration,
) {
    let what = format!("{path} of {who} to answer {status}");
    eventually(&what, limit, async || {
        let (got, _) = http_get(addr, path).await.ok()?;
        (got == status).then_some(())
    })
    .await;
}
