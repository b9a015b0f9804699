//! The embedded mode over a real NATS server: `switchboard dev --nats URL` (or `nats.url` in
//! its config) runs the edge and the coordinator of one process over NATS, so that a backend
//! written with any NATS client answers hooks and sends through it. The real binary, a real
//! `nats-server` (`bus::testkit::TestNats`), a backend that is a plain `async-nats` client,
//! and WebSocket clients on the URLs the banner prints, with a monitoring tap on `>` attached
//! throughout (as the cluster tests keep one). `nats-server` must be on `PATH`: `scripts/test`
//! installs it; without it the tests fail, they never skip.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::harness::*;
use bus::testkit::TestNats;
use bus::{Bus as _, NatsBus, NatsOptions, Subscription};
use futures::StreamExt as _;
use serde_json::{Value, json};

/// The HS256 secret of the `/secure` route, in the variable the config names.
const JWT_SECRET: &str = "dev-nats-test-jwt-secret-0123456789";

/// An anonymous route whose client events go to a backend, and a JWT route whose token
/// names the namespace (so the banner's token must carry `aud` and `tenant` to be accepted).
const CONFIG: &str = "\
edge:
  routes:
    - path: /chat
      anonymous: true
      hooks:
        onmessage: { publish: backend.chat }
    - path: /secure
      auth: { hs256_secret_env: SB_DEV_JWT_SECRET, audience: [chat] }
      namespace: { claim: tenant, default: acme }
";

/// A `switchboard dev` process and what its banner said.
struct Dev {
    proc: Proc,
    /// The banner's first line.
    headline: String,
    /// The `websocket` URLs, in route order.
    urls: Vec<String>,
    grpc: SocketAddr,
    _dir: TempDir,
}

/// Removes the config's directory when the test ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `switchboard dev` with `yaml` as its config and `args`, and reads its banner.
async fn start_dev(yaml: &str, args: &[&str]) -> Dev {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("dev-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("dev.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut cmd = switchboard();
    cmd.arg("dev")
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"])
        .args(args)
        .env("SB_DEV_JWT_SECRET", JWT_SECRET)
        .envs(test_credentials());
    let (proc, ()) = Proc::start("dev", cmd, |line| {
        line.trim_start().starts_with("try ").then_some(())
    })
    .await;
    let output = proc.output();
    let banner: Vec<&str> = output
        .lines()
        .skip_while(|l| !l.starts_with("switchboard dev:"))
        .collect();
    let headline = banner.first().map(|l| (*l).to_owned()).unwrap_or_default();
    let word = |key: &str| {
        banner
            .iter()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(key)).then(|| words.next().unwrap_or_default().to_owned())
            })
            .collect::<Vec<_>>()
    };
    let urls = word("websocket");
    let grpc = word("grpc")
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no grpc address in the banner:\n{output}"));
    Dev {
        proc,
        headline,
        urls,
        grpc,
        _dir: TempDir(dir),
    }
}

/// A client on a URL the banner printed (`ws://addr/path?query`), as printed.
async fn connect(url: &str, name: &str) -> Client {
    let rest = url
        .strip_prefix("ws://")
        .unwrap_or_else(|| panic!("banner URL {url:?} is not ws://"));
    let (addr, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: SocketAddr = addr
        .parse()
        .unwrap_or_else(|e| panic!("banner URL {url:?}: {e}"));
    Client::connect(addr, path, &[], name).await
}

/// A NATS client subscribed to `>` for the test's whole life, as operators attach one: it
/// must change nothing.
async fn tap(nats: &TestNats) -> (NatsBus, Subscription) {
    let opts = NatsOptions {
        url: nats.url(),
        name: "dev-nats-tap".into(),
        ..NatsOptions::default()
    };
    let tap = bounded("tap connect", NatsBus::connect(opts))
        .await
        .expect("the tap connects");
    let everything = bounded("tap subscribe", tap.subscribe(">".into(), None))
        .await
        .expect("the tap subscribes to >");
    (tap, everything)
}

/// A backend that is nothing but an `async-nats` client: subscribed to `subject`, and
/// registered at the server before this returns.
async fn backend(nats: &TestNats, subject: &str) -> (async_nats::Client, async_nats::Subscriber) {
    let client = bounded("backend connect", async_nats::connect(nats.url()))
        .await
        .expect("the backend connects");
    let sub = bounded("backend subscribe", client.subscribe(subject.to_owned()))
        .await
        .expect("the backend subscribes");
    bounded("backend flush", client.flush())
        .await
        .expect("the server has the subscription");
    (client, sub)
}

/// Answers the next request on `sub` with `{"payload": payload}`; returns its body.
async fn answer(
    client: &async_nats::Client,
    sub: &mut async_nats::Subscriber,
    payload: Value,
) -> Value {
    let msg = bounded("a hook request for the backend", sub.next())
        .await
        .expect("the backend's subscription ended");
    let body: Value = serde_json::from_slice(&msg.payload).unwrap_or_else(|e| {
        panic!(
            "hook body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&msg.payload)
        )
    });
    let reply = msg.reply.clone().expect("a hook is a request");
    let answer = json!({ "payload": payload }).to_string();
    bounded("backend reply", client.publish(reply, answer.into()))
        .await
        .expect("the backend replies");
    body
}

#[tokio::test]
async fn dev_with_nats_serves_a_backend_on_nats_and_prints_working_urls() {
    let nats = TestNats::start().await;
    let _tap = tap(&nats).await;
    let dev = start_dev(CONFIG, &["--nats", &nats.url()]).await;
    assert!(
        dev.headline.contains(&format!("NATS at {}", nats.url())),
        "the banner names the bus: {:?}",
        dev.headline
    );
    assert_eq!(dev.urls.len(), 2, "one URL per route: {:?}", dev.urls);

    // A backend on NATS answers the hook of an event sent on the banner's URL.
    let (client, mut events) = backend(&nats, "backend.chat").await;
    let mut alice = connect(&dev.urls[0], "alice").await;
    alice
        .send(json!({"type": "greet", "id": 1, "text": "hi"}))
        .await;
    let body = answer(&client, &mut events, json!({"hello": "alice"})).await;
    assert_eq!(
        body["event"],
        json!({"type": "greet", "id": 1, "text": "hi"})
    );
    assert_eq!(
        (&body["username"], &body["namespace"]),
        (&json!("alice"), &json!("default"))
    );
    let reply = alice.recv().await;
    assert_eq!(
        (&reply["id"], &reply["payload"]),
        (&json!(1), &json!({"hello": "alice"})),
        "{reply}"
    );

    // The embedded coordinator reaches her through NATS: gRPC Send, and a backend's sb.send.
    let report = send(dev.grpc, "default", "alice", "note", "{\"n\":1}").await;
    assert_eq!((report.delivered, report.nodes), (1, 1), "{report:?}");
    assert_eq!(
        alice.recv().await,
        json!({"type": "note", "payload": {"n": 1}})
    );
    let request = json!({"username": "alice", "type": "note", "payload": {"n": 2}}).to_string();
    let answer = bounded("sb.send request", client.request("sb.send", request.into()))
        .await
        .expect("a coordinator answers on sb.send");
    let report: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(report["delivered"], 1, "{report}");
    assert_eq!(
        alice.recv().await,
        json!({"type": "note", "payload": {"n": 2}})
    );

    // The JWT route's URL carries a token minted for alice in the namespace of its claim.
    assert!(
        dev.urls[1].contains("/secure?token=ey"),
        "the JWT route's URL has a token: {}",
        dev.urls[1]
    );
    let mut secure = connect(&dev.urls[1], "alice-secure").await;
    secure.roundtrip().await;
    let report = send(dev.grpc, "acme", "alice", "note", "3").await;
    assert_eq!((report.delivered, report.nodes), (1, 1), "{report:?}");
    assert_eq!(secure.recv().await, json!({"type": "note", "payload": 3}));
    alice.roundtrip().await;
    drop(dev.proc);
}

#[tokio::test]
async fn nats_url_in_a_dev_config_is_used() {
    let nats = TestNats::start().await;
    let _tap = tap(&nats).await;
    let yaml = format!("nats:\n  url: {}\n{CONFIG}", nats.url());
    let dev = start_dev(&yaml, &[]).await;
    assert!(
        dev.headline.contains(&format!("NATS at {}", nats.url())),
        "the banner names the bus: {:?}",
        dev.headline
    );
    let (client, mut events) = backend(&nats, "backend.chat").await;
    let mut alice = connect(&dev.urls[0], "alice").await;
    alice.send(json!({"type": "greet", "id": 7})).await;
    answer(&client, &mut events, json!("hello")).await;
    let reply = alice.recv().await;
    assert_eq!(
        (&reply["id"], &reply["payload"]),
        (&json!(7), &json!("hello")),
        "{reply}"
    );
}
