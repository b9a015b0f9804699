//! TLS where users terminate it themselves: the coordinator's gRPC listener with a client CA
//! (mutual TLS), the edge's listener (`wss://`, HTTPS health and metrics), edges and
//! coordinators dialing coordinators over mutual TLS, and certificates replaced while
//! connections stay open. Every certificate is made here with `rcgen`; every process is
//! the real binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::testkit::TestNats;
use bus::tls::Dialer;
use futures::{SinkExt as _, StreamExt as _};
use proto::v1::messaging_client::MessagingClient;
use proto::v1::placement_client::PlacementClient;
use proto::v1::{
    DeliveryReport, ListNodesRequest, ListNodesResponse, LocateRequest, PublishRequest, SendRequest,
};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::Channel;

use crate::harness::{
    Authed, Issued, Proc, STEP, TEST_API_KEY, TestCa, after, authed, bounded, coordinator_banner,
    edge_banner, eventually, grpcurl_run, node_command, parse_response, poll_for, switchboard,
    upgrade_request,
};

/// Timings of the cluster processes: fast announcements, so that a test waits little.
const ENV: &[(&str, &str)] = &[
    ("SWITCHBOARD_COORDINATOR__ANNOUNCE_INTERVAL", "200ms"),
    ("SWITCHBOARD_COORDINATOR__MEMBER_TIMEOUT", "1s"),
    ("SWITCHBOARD_EDGE__MEMBER_TIMEOUT", "1s"),
    ("SWITCHBOARD_EDGE__DRAIN_WINDOW", "100ms"),
];

/// A client config trusting `ca`, presenting `identity` if given, offering `alpn`.
fn client_tls(ca: &Path, identity: Option<&Issued>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls_pemfile_certs(&pem) {
        roots.add(cert).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            use rustls::pki_types::PrivateKeyDer;
            use rustls::pki_types::pem::PemObject as _;
            let chain = rustls_pemfile_certs(&std::fs::read(&id.cert).unwrap());
            let key = PrivateKeyDer::from_pem_file(&id.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Clients.

/// A gRPC channel over TLS with `tls`, through the dialer edges and coordinators use.
async fn grpc_tls(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let (_keep, rx) = tokio::sync::watch::channel(tls);
    let dialer = Dialer::tls(rx, None);
    let endpoint = dialer
        .endpoint(&addr.to_string())?
        .connect_timeout(STEP)
        .timeout(STEP);
    dialer.connect(&endpoint).await
}

/// `ListNodes` on `channel`, or what the caller is told.
async fn list_nodes(channel: Channel) -> Result<ListNodesResponse, tonic::Status> {
    bounded(
        "ListNodes",
        PlacementClient::new(authed(channel)).list_nodes(ListNodesRequest {}),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// The whole chain of an error, for assertions on what the caller is told.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A TLS connection to `addr` (as `localhost`), handshake done or refused, within bounds.
async fn tls_connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = bounded("TCP connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    bounded(
        "TLS handshake",
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
}

/// The certificate a TLS server at `addr` presents to a new handshake.
async fn served_cert(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> CertificateDer<'static> {
    let stream = tls_connect(addr, tls)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// What a TLS client that the server refuses is told: the error of its first read.
async fn handshake_refusal(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> String {
    let mut stream = match tls_connect(addr, tls).await {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    let mut buf = [0u8; 64];
    match bounded("the server's refusal", stream.read(&mut buf)).await {
        Err(e) => e.to_string(),
        Ok(n) => panic!("the server accepted the connection: read {n} bytes"),
    }
}

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A `wss://` client at `path`; also returns the certificate the edge presented.
async fn wss(
    addr: SocketAddr,
    path: &str,
    tls: Arc<rustls::ClientConfig>,
) -> (Wss, CertificateDer<'static>) {
    let stream = tls_connect(addr, tls)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with the edge at {addr}: {e}"));
    let cert = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (ws, response) = bounded(
        "WebSocket upgrade",
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .unwrap_or_else(|e| panic!("wss upgrade at {path}: {e}"));
    assert_eq!(response.status(), 101);
    (ws, cert)
}

async fn send_json(ws: &mut Wss, v: Value) {
    bounded("send a frame", ws.send(Message::text(v.to_string())))
        .await
        .unwrap();
}

/// The next text frame, as JSON.
async fn recv_json(ws: &mut Wss) -> Value {
    loop {
        match bounded("a frame from the edge", ws.next()).await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Subscribes `ws` to `filter` and checks the answer.
async fn subscribe(ws: &mut Wss, filter: &str) {
    send_json(ws, json!({"type": "subscribe", "topic": filter})).await;
    assert_eq!(
        recv_json(ws).await,
        json!({"type": "subscribed", "topic": filter})
    );
}

async fn publish(
    client: &mut MessagingClient<Authed>,
    topic: &str,
    payload: &Value,
) -> DeliveryReport {
    let req = PublishRequest {
        namespace: "default".into(),
        topic: topic.into(),
        payload_json: payload.to_string(),
        ..PublishRequest::default()
    };
    bounded("Publish", client.publish(req))
        .await
        .unwrap_or_else(|s| panic!("Publish to {topic}: {s}"))
        .into_inner()
}

/// Publishes probes on `topic` until the coordinator reports a delivery (placement learns
/// of a new watcher asynchronously), and drains the probes from `ws`.
async fn settle_topic(client: &mut MessagingClient<Authed>, ws: &mut Wss, topic: &str) {
    let mut sent = 0;
    eventually(
        &format!("a watcher of {topic} in placement"),
        STEP,
        async || {
            sent += 1;
            (publish(client, topic, &json!({"probe": sent}))
                .await
                .delivered
                == 1)
                .then_some(())
        },
    )
    .await;
    // The probe that was delivered arrives; earlier ones may have too.
    loop {
        let frame = recv_json(ws).await;
        assert_eq!(frame["topic"], topic, "{frame}");
        if frame["payload"]["probe"] == sent {
            break;
        }
    }
}

/// Sends a plain-HTTP WebSocket upgrade to a TLS port; returns what came back before the
/// server closed.
async fn plain_upgrade(addr: SocketAddr) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let req = upgrade_request(addr, "/connect?user=p", &[]);
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    bounded("the server to close a plaintext connection", async {
        let _ = tcp.read_to_end(&mut got).await;
    })
    .await;
    got
}

/// `GET path` over TLS (HTTP/1.1, `Connection: close`): the status and the body.
async fn https_get(addr: SocketAddr, path: &str, tls: Arc<rustls::ClientConfig>) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut stream = bounded(
        "TLS handshake",
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    bounded("an HTTPS response", async {
        // A peer closing without close_notify is an error here; what was read counts.
        let _ = stream.read_to_end(&mut raw).await;
    })
    .await;
    parse_response(&String::from_utf8_lossy(&raw)).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs grpcurl with the test key and `args` (no `-plaintext`): its exit success and its
/// output.
async fn grpcurl_tls(args: &[&str]) -> (bool, String) {
    let key = format!("authorization: Bearer {TEST_API_KEY}");
    let mut all = vec!["-H", key.as_str()];
    all.extend_from_slice(args);
    let out = grpcurl_run(&all).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

// ---------------------------------------------------------------------------------------
// Processes.

fn write_config(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

/// A coordinator with `config`: its process and gRPC address.
async fn coordinator(nats: &TestNats, config: &Path, id: &str) -> (Proc, SocketAddr) {
    let mut cmd = node_command("coordinator", config, &nats.url(), id);
    cmd.envs(ENV.iter().copied())
        .envs(crate::harness::test_credentials());
    let (proc, (grpc, _)) = Proc::start(id, cmd, coordinator_banner).await;
    (proc, grpc)
}

/// An edge with `config` seeded with `coordinator`: its process and `wss://` address.
async fn edge(
    nats: &TestNats,
    config: &Path,
    id: &str,
    coordinator: SocketAddr,
) -> (Proc, SocketAddr) {
    let mut cmd = node_command("edge", config, &nats.url(), id);
    cmd.args(["--coordinator", &coordinator.to_string()])
        .envs(ENV.iter().copied())
        .envs(crate::harness::test_credentials());
    Proc::start(id, cmd, |line| edge_banner(line, "wss")).await
}

/// `switchboard dev` with `config`: its process, `wss://` and gRPC addresses.
async fn dev(config: &Path) -> (Proc, SocketAddr, SocketAddr) {
    let mut cmd = switchboard();
    cmd.arg("dev").arg("--config").arg(config).args([
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
    ]);
    // The banner names the WebSocket address on one line and the gRPC one on the next.
    let ws: Mutex<Option<SocketAddr>> = Mutex::new(None);
    let (proc, grpc) = Proc::start("dev", cmd, |line| {
        if let Some(url) = after(line, "websocket") {
            let addr = url.strip_prefix("wss://")?.split('/').next()?;
            *ws.lock().unwrap() = addr.parse().ok();
            return None;
        }
        after(line, "grpc")?.parse::<SocketAddr>().ok()
    })
    .await;
    let ws = ws
        .into_inner()
        .unwrap()
        .expect("a wss:// address in the banner");
    (proc, ws, grpc)
}

const ROUTE: &str = "  routes:\n    - path: /connect\n      anonymous: true\n      publish: true\n      allowed_origins: [\"*\"]\n";

// ---------------------------------------------------------------------------------------
// The tests.

/// The gRPC listener with a client CA: a client with a certificate the CA signed is served;
/// one without a certificate, one with a certificate of another CA, and a plaintext client
/// are refused at the connection, before any call.
#[tokio::test]
async fn grpc_with_a_client_ca_serves_only_clients_it_certified() {
    let pki = TestCa::new("grpc");
    let server = pki.issue("coordinator", "coordinator");
    let client = pki.issue("client", "operator");
    let stranger_pki = TestCa::new("stranger");
    let stranger = stranger_pki.issue("client", "operator");
    let config = write_config(
        &pki.dir,
        "config.yaml",
        &format!(
            "coordinator:\n  tls:\n    cert_file: {}\n    key_file: {}\n    client_ca_file: {}\n",
            server.cert.display(),
            server.key.display(),
            pki.ca_file().display()
        ),
    );
    let nats = TestNats::start().await;
    let (_c, grpc) = coordinator(&nats, &config, "c1").await;
    let ca = pki.ca_file();

    let channel = grpc_tls(grpc, client_tls(&ca, Some(&client), b"h2"))
        .await
        .expect("a certified client connects");
    let nodes = list_nodes(channel)
        .await
        .expect("a certified client is served");
    assert_eq!(
        nodes
            .coordinators
            .iter()
            .map(|c| c.node_id.as_str())
            .collect::<Vec<_>>(),
        ["c1"]
    );

    for (who, tls, alert) in [
        (
            "without a certificate",
            client_tls(&ca, None, b"h2"),
            "CertificateRequired",
        ),
        (
            "with another CA's certificate",
            client_tls(&ca, Some(&stranger), b"h2"),
            "UnknownCA",
        ),
    ] {
        // The call fails: the connection is closed before any request is answered.
        let told = match grpc_tls(grpc, Arc::clone(&tls)).await {
            Err(e) => chain(&e),
            Ok(channel) => match list_nodes(channel).await {
                Ok(r) => panic!("a client {who} was served: {r:?}"),
                Err(status) => format!("{status:?}"),
            },
        };
        eprintln!("a gRPC client {who} is told: {told}");
        // TLS 1.3 lets a client finish its side of the handshake first; the server's
        // refusal is the alert that follows.
        let refusal = handshake_refusal(grpc, tls).await;
        eprintln!("a TLS client {who} is told: {refusal}");
        assert!(
            refusal.contains(alert),
            "a client {who} should get the {alert} alert: {refusal}"
        );
    }

    // Plaintext HTTP/2 on the TLS port: the connection fails, no call is answered.
    let plain = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect_timeout(STEP)
            .timeout(STEP)
            .connect()
            .await
            .map_err(|e| chain(&e))?;
        list_nodes(channel).await.map_err(|s| format!("{s:?}"))
    };
    match plain.await {
        Ok(r) => panic!("a plaintext client was served: {r:?}"),
        Err(told) => eprintln!("a plaintext client is told: {told}"),
    }

    // grpcurl, as an operator would call it (docs/tls.md).
    let addr = grpc.to_string();
    let (ca, cert, key) = (
        ca.display().to_string(),
        client.cert.display().to_string(),
        client.key.display().to_string(),
    );
    let (ok, out) = grpcurl_tls(&[
        "-cacert",
        &ca,
        "-cert",
        &cert,
        "-key",
        &key,
        &addr,
        "switchboard.v1.Placement/ListNodes",
    ])
    .await;
    assert!(ok, "grpcurl with a client certificate: {out}");
    assert!(out.contains("\"c1\""), "ListNodes through grpcurl: {out}");
    let (ok, out) = grpcurl_tls(&["-connect-timeout", "2", "-cacert", &ca, &addr, "list"]).await;
    assert!(
        !ok,
        "grpcurl without a client certificate was served: {out}"
    );
    eprintln!("grpcurl without a client certificate is told: {out}");
    let (ok, out) = grpcurl_tls(&["-connect-timeout", "2", "-plaintext", &addr, "list"]).await;
    assert!(!ok, "grpcurl -plaintext was served: {out}");
}

/// The config of a TLS edge (`edge`) and gRPC listener (`grpc`, clients signed by `ca`),
/// plus, with `dial`, how processes dial the coordinators: the CA and an optional client
/// certificate.
fn tls_config(edge: &Issued, grpc: &Issued, ca: &Path, dial: Option<Option<&Issued>>) -> String {
    let mut yaml = format!(
        "edge:\n{ROUTE}  tls:\n    cert_file: {}\n    key_file: {}\n\
         coordinator:\n  tls:\n    cert_file: {}\n    key_file: {}\n    client_ca_file: {}\n",
        edge.cert.display(),
        edge.key.display(),
        grpc.cert.display(),
        grpc.key.display(),
        ca.display(),
    );
    if let Some(client) = dial {
        yaml.push_str(&format!(
            "cluster:\n  tls:\n    ca_file: {}\n",
            ca.display()
        ));
        if let Some(c) = client {
            yaml.push_str(&format!(
                "    cert_file: {}\n    key_file: {}\n",
                c.cert.display(),
                c.key.display()
            ));
        }
    }
    yaml
}

/// A cluster whose edge serves `wss://` and reports to two coordinators over mutual TLS,
/// which call each other over mutual TLS too: the edge is ready (a report stream is up),
/// `Publish` and `Send` through either coordinator reach a `wss://` client in order (one of
/// them forwards to the other, the owner of the user), health answers over HTTPS, and a
/// plain-HTTP upgrade on the TLS port gets nothing.
#[tokio::test]
async fn a_tls_cluster_delivers_publish_and_send_to_a_wss_client() {
    let pki = TestCa::new("cluster");
    let coord_cert = pki.issue("coordinator", "coordinator");
    let edge_cert = pki.issue("edge", "edge");
    let node_cert = pki.issue("node", "e1");
    let operator = pki.issue("operator", "operator");
    let ca = pki.ca_file();
    let yaml = tls_config(&edge_cert, &coord_cert, &ca, Some(Some(&node_cert)));
    let config = write_config(&pki.dir, "config.yaml", &yaml);
    let nats = TestNats::start().await;
    let (_c1, grpc) = coordinator(&nats, &config, "c1").await;
    let (_c2, grpc2) = coordinator(&nats, &config, "c2").await;
    let (e1, ws) = edge(&nats, &config, "e1", grpc).await;
    let http_tls = client_tls(&ca, None, b"http/1.1");

    // Ready means: on NATS, and a report stream to a coordinator (mutual TLS) is up.
    eventually(
        "the edge's /readyz over HTTPS to answer 200",
        STEP,
        async || {
            let (status, _) = https_get(ws, "/readyz", Arc::clone(&http_tls)).await;
            (status == 200).then_some(())
        },
    )
    .await;
    let (status, metrics) = https_get(ws, "/metrics", Arc::clone(&http_tls)).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("edge_"), "{metrics}");

    let (mut alice, served) = wss(ws, "/connect?user=alice", Arc::clone(&http_tls)).await;
    assert_eq!(
        served, edge_cert.der,
        "the edge serves its configured certificate"
    );
    subscribe(&mut alice, "news/+").await;

    let channel = grpc_tls(grpc, client_tls(&ca, Some(&operator), b"h2"))
        .await
        .unwrap();
    let mut messaging = MessagingClient::new(authed(channel.clone()));
    settle_topic(&mut messaging, &mut alice, "news/probe").await;
    // A burst: every frame for a TLS connection goes through its task, in order.
    for i in 0..100 {
        let r = publish(&mut messaging, "news/1", &json!({"n": i})).await;
        assert_eq!((r.delivered, r.refused), (1, 0), "Publish {i}: {r:?}");
    }
    for i in 0..100 {
        assert_eq!(
            recv_json(&mut alice).await,
            json!({"type": "message", "topic": "news/1", "payload": {"n": i}})
        );
    }

    // Send finds alice through placement, which the edge fed over its TLS report stream to
    // her owner; the other coordinator asks the owner over a TLS peer channel.
    let channel2 = grpc_tls(grpc2, client_tls(&ca, Some(&operator), b"h2"))
        .await
        .unwrap();
    for (name, channel) in [("c1", channel), ("c2", channel2)] {
        let mut placement = PlacementClient::new(authed(channel.clone()));
        eventually(
            &format!("Locate on {name} to find alice"),
            STEP,
            async || {
                let req = LocateRequest {
                    namespace: "default".into(),
                    user: "alice".into(),
                };
                let found = placement.locate(req).await.ok()?.into_inner();
                (found.connections.len() == 1).then_some(())
            },
        )
        .await;
        let req = SendRequest {
            namespace: "default".into(),
            user: "alice".into(),
            r#type: "note".into(),
            payload_json: json!({"via": name}).to_string(),
            ..SendRequest::default()
        };
        let r = bounded("Send", MessagingClient::new(authed(channel)).send(req))
            .await
            .unwrap_or_else(|s| panic!("Send through {name}: {s}"))
            .into_inner();
        assert_eq!(
            (r.delivered, r.node_ids.clone()),
            (1, vec!["e1".to_owned()]),
            "Send through {name}: {r:?}"
        );
        assert_eq!(
            recv_json(&mut alice).await,
            json!({"type": "note", "payload": {"via": name}})
        );
    }

    // Plain HTTP on the TLS port: no 101, no HTTP answer at all.
    let got = plain_upgrade(ws).await;
    assert!(
        !got.starts_with(b"HTTP/"),
        "a plaintext upgrade got an HTTP answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    drop(e1);
}

/// An edge whose coordinator requires client certificates, without one of its own, is not
/// served: it does not become ready, and `/readyz` says why.
#[tokio::test]
async fn an_edge_without_a_client_certificate_is_refused_by_the_coordinator() {
    let pki = TestCa::new("nocert");
    let coord_cert = pki.issue("coordinator", "coordinator");
    let edge_cert = pki.issue("edge", "edge");
    let ca = pki.ca_file();
    let yaml = tls_config(&edge_cert, &coord_cert, &ca, Some(None));
    let config = write_config(&pki.dir, "config.yaml", &yaml);
    let nats = TestNats::start().await;
    let (_c, grpc) = coordinator(&nats, &config, "c1").await;
    let (e1, ws) = edge(&nats, &config, "e1", grpc).await;
    let http_tls = client_tls(&ca, None, b"http/1.1");
    let warning = eventually("the edge to warn about the coordinator", STEP, async || {
        e1.tail()
            .lines()
            .find(|l| l.contains("WARN") && l.contains("coordinator") && l.contains("retrying"))
            .map(str::to_owned)
    })
    .await;
    eprintln!("the edge says: {warning}");
    // Bounded: the edge retries with a backoff of at most 2 s; it never becomes ready.
    let ready = poll_for(Duration::from_secs(4), async || {
        let (status, body) = https_get(ws, "/readyz", Arc::clone(&http_tls)).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(
        ready, None,
        "an edge without a client certificate became ready"
    );
    let (status, body) = https_get(ws, "/readyz", Arc::clone(&http_tls)).await;
    assert_eq!((status, body.as_str()), (503, "coordinator unreachable\n"));
}

/// Certificates replaced on disk are served to new handshakes after SIGHUP, and after a
/// poll of the files without one; connections opened before stay open and keep receiving;
/// a file that does not load keeps the last good certificate and the warning names it.
#[tokio::test]
async fn replaced_certificates_serve_new_handshakes_without_dropping_connections() {
    let pki = TestCa::new("reload");
    let edge_v1 = pki.issue("edge", "edge v1");
    let grpc_v1 = pki.issue("grpc", "grpc v1");
    let operator = pki.issue("operator", "operator");
    let ca = pki.ca_file();
    let yaml = tls_config(&edge_v1, &grpc_v1, &ca, None);
    let config = write_config(&pki.dir, "config.yaml", &yaml);
    let (proc, ws, grpc) = dev(&config).await;
    let http_tls = client_tls(&ca, None, b"http/1.1");
    let grpc_client_tls = client_tls(&ca, Some(&operator), b"h2");

    let (mut before, served) = wss(ws, "/connect?user=before", Arc::clone(&http_tls)).await;
    assert_eq!(served, edge_v1.der);
    assert_eq!(
        served_cert(grpc, Arc::clone(&grpc_client_tls)).await,
        grpc_v1.der
    );
    subscribe(&mut before, "news/+").await;
    // A gRPC connection opened before the reload, used after it.
    let mut messaging = MessagingClient::new(authed(
        grpc_tls(grpc, Arc::clone(&grpc_client_tls)).await.unwrap(),
    ));
    settle_topic(&mut messaging, &mut before, "news/probe").await;

    // New certificates (new keys, new names), then SIGHUP.
    let edge_v2 = pki.issue("edge", "edge v2");
    let grpc_v2 = pki.issue("grpc", "grpc v2");
    assert_ne!(edge_v2.der, edge_v1.der);
    proc.hangup().await;
    // The signal itself reloads (the file poll may see the change too, later or earlier).
    eventually("a reload the signal triggered", STEP, async || {
        proc.tail()
            .lines()
            .any(|l| l.contains("tls certificates reloaded") && l.contains("trigger=sighup"))
            .then_some(())
    })
    .await;
    eventually(
        "a new wss handshake to see the new certificate",
        STEP,
        async || {
            let (_, served) = wss(ws, "/connect?user=probe", Arc::clone(&http_tls)).await;
            (served == edge_v2.der).then_some(())
        },
    )
    .await;
    eventually(
        "a new gRPC handshake to see the new certificate",
        STEP,
        async || {
            (served_cert(grpc, Arc::clone(&grpc_client_tls)).await == grpc_v2.der).then_some(())
        },
    )
    .await;

    // The connections from before are open and still carry messages.
    let r = publish(&mut messaging, "news/1", &json!({"after": "reload"})).await;
    assert_eq!(r.delivered, 1, "{r:?}");
    assert_eq!(
        recv_json(&mut before).await,
        json!({"type": "message", "topic": "news/1", "payload": {"after": "reload"}})
    );
    let (mut after_reload, _) = wss(ws, "/connect?user=after", Arc::clone(&http_tls)).await;
    subscribe(&mut after_reload, "news/+").await;

    // A bad file: the last good certificate stays, and the warning names key and file.
    std::fs::write(&edge_v2.cert, b"not a certificate").unwrap();
    proc.hangup().await;
    let warning = eventually(
        "a warning about the bad certificate file",
        STEP,
        async || {
            proc.tail()
                .lines()
                .find(|l| l.contains("WARN") && l.contains("edge.tls.cert_file"))
                .map(str::to_owned)
        },
    )
    .await;
    assert!(
        warning.contains(&edge_v2.cert.display().to_string()),
        "the warning names the file: {warning}"
    );
    let (_, served) = wss(ws, "/connect?user=probe2", Arc::clone(&http_tls)).await;
    assert_eq!(
        served, edge_v2.der,
        "a bad file replaced the last good certificate"
    );

    // Files changed without a signal are read at the next poll of their metadata.
    let edge_v3 = pki.issue("edge", "edge v3");
    let limit = switchboard::tls::POLL * 2 + STEP;
    eventually("the polled files to be served", limit, async || {
        let (_, served) = wss(ws, "/connect?user=probe3", Arc::clone(&http_tls)).await;
        (served == edge_v3.der).then_some(())
    })
    .await;
    let r = publish(&mut messaging, "news/2", &json!({"still": "open"})).await;
    assert_eq!(r.delivered, 2, "{r:?}");
    for ws in [&mut before, &mut after_reload] {
        assert_eq!(
            recv_json(ws).await,
            json!({"type": "message", "topic": "news/2", "payload": {"still": "open"}})
        );
    }

    // Key material never reaches the log.
    let key_pem = std::fs::read_to_string(&edge_v3.key).unwrap();
    let key_line = key_pem.lines().nth(1).unwrap();
    assert!(!proc.tail().contains(key_line), "key material in the log");
}
