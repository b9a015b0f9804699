//! NATS with users, permissions and TLS: a nats-server started here with a certificate from
//! a CA made here (rcgen) and password users; coordinators and edges (the real binary) reach
//! it with the credentials the config names, under the least permissions that docs/nats.md
//! documents (deploy/nats/permissions.conf, read here as it is); wrong credentials and a
//! missing CA stop a process at start, naming the key.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use bus::{Bus as _, NatsAuth, NatsBus, NatsOptions, NatsTls, Outgoing};
use futures::{StreamExt as _, TryStreamExt as _};
use proto::v1::{
    BroadcastRequest, GetRequest, ListRequest, PutRequest, WatchRequest, placement_event,
};
use serde_json::json;

use crate::harness::{
    Backend, Cluster, Proc, Spec, TestCa, authed, bounded, broadcast, channel, http_get, messaging,
    next_json, node_command, placement, publish, resources, scratch_dir, send, wait_history_rule,
};

/// The documented permissions, as the docs page shows them.
const PERMISSIONS: &str = include_str!("../../../deploy/nats/permissions.conf");
const DOCS: &str = include_str!("../../../docs/nats.md");

const PASSWORDS: [(&str, &str); 3] = [
    ("coordinator", "pw-coordinator-5f1c"),
    ("edge", "pw-edge-9a7e"),
    ("backend", "pw-backend-03bd"),
];

/// A CA, and a server certificate it signed for 127.0.0.1 and localhost, as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// Holds the files (removed on drop).
    _issuer: TestCa,
}

fn pki() -> Pki {
    let issuer = TestCa::new("nats");
    let server = issuer.issue("server", "localhost");
    Pki {
        ca: issuer.ca_file(),
        cert: server.cert,
        key: server.key,
        _issuer: issuer,
    }
}

/// A server config: TLS with `pki`, an account with JetStream and the three users, each with
/// its role's permissions from the documented file when `least` (else with none).
fn server_config(dir: &Path, pki: &Pki, least: bool) -> PathBuf {
    server_config_with(dir, pki, least, &[])
}

/// [`server_config`] with more users (lines of the account's `users` list).
fn server_config_with(dir: &Path, pki: &Pki, least: bool, more: &[String]) -> PathBuf {
    std::fs::write(dir.join("permissions.conf"), PERMISSIONS).unwrap();
    let mut users: Vec<String> = PASSWORDS
        .iter()
        .map(|(user, password)| {
            let permissions = if least {
                format!(", permissions: ${}", user.to_uppercase())
            } else {
                String::new()
            };
            format!("      {{user: {user}, password: \"{password}\"{permissions}}}")
        })
        .collect();
    users.extend(more.iter().map(|u| format!("      {u}")));
    // nats-server refuses variables that nothing uses: include them only when used.
    let include = if least {
        "include \"permissions.conf\"\n"
    } else {
        ""
    };
    let conf = format!(
        "{include}tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n\
         accounts {{\n  SWITCHBOARD {{\n    jetstream: enabled\n    users: [\n{}\n    ]\n  }}\n}}\n",
        pki.cert.display(),
        pki.key.display(),
        users.join("\n")
    );
    let path = dir.join("server.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

/// The processes' config: one anonymous route with a key-value resource in `profiles` and a
/// topic resource `feed`, NATS
/// over TLS with the test CA, the password from `NATS_PASSWORD`.
fn switchboard_yaml(pki: &Pki) -> String {
    format!(
        "edge:\n  routes:\n    - path: /connect\n      anonymous: true\n      publish: true\n      \
         allowed_origins: [\"*\"]\n      resources:\n        profiles: {{ kind: kv }}\n        feed: {{ kind: topic }}\n      \
         history:\n        - {{ topics: \"chat/#\", size: 10, ttl: 1m, read: true }}\n\
         nats:\n  password_env: NATS_PASSWORD\n  tls:\n    ca_file: {}\n",
        pki.ca.display()
    )
}

fn password(user: &str) -> &'static str {
    PASSWORDS.iter().find(|(u, _)| *u == user).unwrap().1
}

/// A backend's NATS client, as `user`, over TLS with the test CA.
async fn backend(c: &Cluster, pki: &Pki, user: &str) -> Backend {
    let opts = NatsOptions {
        url: c.nats.url(),
        name: format!("test-{user}"),
        auth: NatsAuth::UserPassword {
            user: user.to_owned(),
            password: password(user).to_owned(),
        },
        tls: NatsTls {
            required: true,
            ca_file: Some(pki.ca.clone()),
            client_cert: None,
        },
        ..NatsOptions::default()
    };
    let bus = bounded("backend connect", NatsBus::connect(opts))
        .await
        .unwrap_or_else(|e| panic!("{user} connects to NATS: {e:?}"));
    Backend { bus }
}

/// NATS with coordinator and edge users in `roles`: each role's user and password reach
/// only its processes.
async fn cluster(dir: &Path, pki: &Pki, least: bool) -> Cluster {
    let spec = Spec::new(1, 1)
        .config_yaml(switchboard_yaml(pki))
        .nats_config(server_config(dir, pki, least))
        .coordinator_env("SWITCHBOARD_NATS__USER", "coordinator")
        .coordinator_env("NATS_PASSWORD", password("coordinator"))
        .edge_env("SWITCHBOARD_NATS__USER", "edge")
        .edge_env("NATS_PASSWORD", password("edge"));
    Cluster::launch(spec).await
}

/// The server's log lines about permission violations.
fn violations(c: &Cluster) -> Vec<String> {
    c.nats
        .recent_log()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect()
}

/// Over TLS with the test CA, the coordinator authenticates with a password from the
/// environment and the edge with an NKey seed file; a client connected through the edge gets
/// a gRPC `Send`; nothing prints a password or the seed.
#[tokio::test]
async fn processes_connect_with_a_password_or_an_nkey_over_tls() {
    let dir = scratch_dir("nats-tls");
    let pki = pki();
    let nkey = nkeys::KeyPair::new_user();
    let seed = nkey.seed().unwrap();
    let seed_file = dir.join("edge.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).unwrap();
    let nkey_user = format!("{{nkey: {}}}", nkey.public_key());
    let yaml = switchboard_yaml(&pki).replace("  password_env: NATS_PASSWORD\n", "");
    let spec = Spec::new(1, 1)
        .config_yaml(yaml)
        .nats_config(server_config_with(&dir, &pki, false, &[nkey_user]))
        .coordinator_env("SWITCHBOARD_NATS__USER", "coordinator")
        .coordinator_env("SWITCHBOARD_NATS__PASSWORD_ENV", "NATS_PASSWORD")
        .coordinator_env("NATS_PASSWORD", password("coordinator"))
        .edge_env("SWITCHBOARD_NATS__NKEY_FILE", seed_file.to_str().unwrap());
    let c = Cluster::launch(spec).await;
    let tls_log = c.nats.recent_log();
    assert!(
        tls_log.contains("TLS required for client connections"),
        "the server requires TLS:\n{tls_log}"
    );
    let _alice = alice_gets_a_send(&c).await;

    // Both are connected as their users, over TLS.
    let monitor = c.nats.monitor_url();
    let monitor = monitor.strip_prefix("http://").unwrap().parse().unwrap();
    let (status, body) = http_get(monitor, "/connz?auth=true").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let connz: serde_json::Value = serde_json::from_str(&body).unwrap();
    let users: Vec<(String, bool)> = connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|conn| {
            (
                conn["authorized_user"].as_str().unwrap_or("").to_owned(),
                conn["tls_version"].is_string(),
            )
        })
        .collect();
    for user in ["coordinator", nkey.public_key().as_str()] {
        assert!(
            users.contains(&(user.to_owned(), true)),
            "{user} connected over TLS: {users:?}"
        );
    }
    for p in [&c.coords[0].proc, &c.edges[0].proc] {
        let out = p.tail();
        for (_, pw) in PASSWORDS {
            assert!(!out.contains(pw), "{} printed a password:\n{out}", p.name);
        }
        assert!(!out.contains(&seed), "{} printed the seed:\n{out}", p.name);
    }

    // Credentials written in the URL: taken out before use, `***` wherever the URL is shown.
    let pw = password("coordinator");
    let url = c
        .nats
        .url()
        .replace("nats://", &format!("nats://coordinator:{pw}@"));
    let cmd = process("coordinator", &c, &c.config, &url, &[]);
    let (p, banner) = Proc::start("c-url", cmd, |line| {
        line.contains(" grpc ").then(|| line.to_owned())
    })
    .await;
    let shown = format!("nats://***@127.0.0.1:{}", c.nats.port());
    assert!(
        banner.contains(&shown),
        "the banner shows {shown}: {banner}"
    );
    // The log line follows the banner: wait for it, then read everything printed.
    let logged = format!("nats={shown}");
    crate::harness::eventually(
        "the log to show the redacted URL",
        crate::harness::STEP,
        async || p.tail().contains(&logged).then_some(()),
    )
    .await;
    let out = p.tail();
    assert!(
        !out.contains(pw),
        "the process printed the password:\n{out}"
    );
}

/// The documented least permissions are enough for everything Switchboard does (gRPC Send
/// and Publish, a backend's send subject, a client event and its reply, a resource put and
/// get), and no more: a backend cannot command an edge or read the replies meant for one.
/// Topic history under the documented permissions: the edge made the rule's stream at start;
/// a client's publication and a gRPC Publish are stored (the coordinator learnt the rule
/// from the streams), a client recovers one, `Messaging.History` reads them.
async fn history_flow(c: &Cluster) {
    let grpc = c.grpc(0);
    wait_history_rule(grpc, "default", "chat/x").await;
    let mut carol = c.client(0, "carol", "default").await;
    carol
        .send(json!({"type": "subscribe", "topic": "chat/x", "id": 1}))
        .await;
    let s = carol.recv_type("subscribed").await;
    let r = publish(grpc, "default", "chat/x", r#""stored""#).await;
    assert!(r.offset > 0 && r.epoch == s["epoch"], "{r:?} {s}");
    assert_eq!(carol.recv_type("message").await["offset"], r.offset);
    carol
        .send(json!({"type": "publish", "topic": "chat/x", "payload": 2, "id": 2}))
        .await;
    let p = carol.recv_type("published").await;
    assert!(p["offset"].as_u64() > Some(r.offset), "{p}");
    let mut dave = c.client(0, "dave", "default").await;
    let since = json!({"offset": s["offset"], "epoch": s["epoch"]});
    dave.send(json!({"type": "subscribe", "topic": "chat/x", "since": since}))
        .await;
    assert_eq!(dave.recv_type("subscribed").await["recovered"], true);
    assert_eq!(dave.recv_type("message").await["payload"], "stored");
    let mut m = messaging(grpc).await;
    let page = m
        .history(proto::v1::HistoryRequest {
            namespace: "default".into(),
            topic: "chat/x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.messages.len(), 2, "{page:?}");
}

#[tokio::test]
async fn documented_least_permissions_carry_a_full_flow() {
    let start = "<!-- deploy/nats/permissions.conf -->\n```\n";
    let documented = DOCS
        .split_once(start)
        .and_then(|(_, rest)| rest.split_once("\n```\n"))
        .map(|(block, _)| format!("{block}\n"))
        .expect("docs/nats.md shows deploy/nats/permissions.conf");
    assert_eq!(
        documented, PERMISSIONS,
        "docs/nats.md shows deploy/nats/permissions.conf as it is"
    );

    let dir = scratch_dir("nats-least");
    let pki = pki();
    let c = cluster(&dir, &pki, true).await;
    let be = backend(&c, &pki, "backend").await;
    // gRPC Send: coordinator → sb.node.e1 → edge, and the edge's reply.
    let mut alice = alice_gets_a_send(&c).await;

    // A topic: the edge subscribes; the coordinator (gRPC Publish), another client (through
    // its edge) and a backend publish; the backend hears the client's publication.
    alice
        .send(json!({"type": "subscribe", "topic": "news/#", "id": "s"}))
        .await;
    let v = alice.recv().await;
    assert_eq!(v["type"], "subscribed", "{v}");
    let r = publish(c.grpc(0), "default", "news/today", r#""hello""#).await;
    assert_eq!(r.delivered, 1, "{r:?}");
    let topic = |v: &serde_json::Value| (v["topic"].clone(), v["payload"].clone());
    let v = alice.recv().await;
    assert_eq!(topic(&v), (json!("news/today"), json!("hello")), "{v}");
    history_flow(&c).await;
    let mut news = be.subscribe("sb.topic.default.news.>").await;
    // Placement.Watch: the coordinator hears its own placement events.
    let mut pc = placement(c.grpc(0)).await.unwrap();
    let watch = WatchRequest {
        user: "bob".into(),
        ..WatchRequest::default()
    };
    let mut watch = bounded("Placement.Watch", pc.watch(watch))
        .await
        .unwrap()
        .into_inner();
    let mut bob = c.client(0, "bob", "default").await;
    let event = bounded("bob's attach event", watch.next())
        .await
        .expect("the watch goes on")
        .unwrap();
    assert_eq!(event.kind(), placement_event::Kind::Attach, "{event:?}");
    bob.send(json!({"type": "publish", "topic": "news/bob", "payload": 1}))
        .await;
    let v = alice.recv().await;
    assert_eq!(topic(&v), (json!("news/bob"), json!(1)), "{v}");
    let (msg, _) = next_json(&mut news).await;
    assert_eq!(msg.subject, "sb.topic.default.news.bob");
    be.publish("sb.topic.default.news.backend", &json!(2)).await;
    let v = alice.recv().await;
    assert_eq!(topic(&v), (json!("news/backend"), json!(2)), "{v}");

    // Broadcasts: gRPC (coordinator → sb.edges) and the backends' subject.
    let req = BroadcastRequest {
        namespace: "default".into(),
        r#type: "all".into(),
        payload_json: "3".into(),
        skip_users: vec!["bob".into()],
        ..BroadcastRequest::default()
    };
    let r = broadcast(c.grpc(0), req).await;
    assert_eq!(r.delivered, 1, "{r:?}");
    assert_eq!(alice.recv().await, json!({"type": "all", "payload": 3}));
    be.publish(
        "sb.broadcast",
        &json!({"type": "all", "payload": 4, "namespace": "default", "skip": ["bob"]}),
    )
    .await;
    assert_eq!(alice.recv().await, json!({"type": "all", "payload": 4}));

    // A topic resource: the edge subscribes to its subject, a backend publishes items.
    alice
        .send(json!({"type": "watch", "resource": "feed", "id": "w"}))
        .await;
    let v = alice.recv().await;
    assert_ne!(v["type"], "error", "{v}");
    be.publish("sb.resource.feed", &json!({"id": "f1", "text": "fresh"}))
        .await;
    let v = alice.recv().await;
    assert!(v.to_string().contains("fresh"), "the feed item: {v}");

    // A client event to a backend, and the backend's reply back to the client.
    let mut events = be.subscribe("sb.event.default.hello").await;
    alice.send(json!({"type": "hello", "id": 7})).await;
    let (msg, body) = next_json(&mut events).await;
    assert_eq!(body["username"], "alice", "{body}");
    be.reply(&msg, &json!({"greeting": "hi alice"})).await;
    let v = alice.recv().await;
    assert_eq!(v["id"], 7, "{v}");
    assert!(v.to_string().contains("hi alice"), "{v}");

    // A backend's send subject, answered by the coordinators' queue group.
    let report = be
        .request(
            "sb.send",
            &json!({"username": "alice", "type": "from-backend", "payload": 2}),
        )
        .await;
    assert_eq!(report["delivered"], 1, "{report}");
    assert_eq!(
        alice.recv().await,
        json!({"type": "from-backend", "payload": 2})
    );

    // A resource: the coordinator creates the bucket and writes, the edge reads.
    let mut rc = resources(c.grpc(0)).await;
    let put = PutRequest {
        resource: "profiles".into(),
        item_json: json!({"id": "p1", "name": "Alice"}).to_string(),
        ..PutRequest::default()
    };
    bounded("Resources.Put", rc.put(put))
        .await
        .unwrap_or_else(|s| panic!("Resources.Put: {s}"));
    alice
        .send(json!({"type": "get", "resource": "profiles", "params": {"id": "p1"}, "id": "g"}))
        .await;
    let v = alice.recv().await;
    assert!(v.to_string().contains("Alice"), "the item: {v}");
    // A backend writes the bucket directly; the edge lists it (a JetStream consumer).
    let kv = be.jetstream().get_key_value("profiles").await.unwrap();
    let item = json!({"id": "p2", "name": "Bob"}).to_string();
    kv.put("p2", item.into()).await.unwrap();
    alice
        .send(json!({"type": "query", "resource": "profiles", "id": "q"}))
        .await;
    let v = alice.recv().await;
    assert!(
        v.to_string().contains("Alice") && v.to_string().contains("Bob"),
        "the list: {v}"
    );
    // … and reads it back; so does the coordinator (gRPC Get and List).
    let entry = kv.get("p1").await.unwrap().expect("p1 is there");
    assert!(String::from_utf8_lossy(&entry).contains("Alice"));
    let keys: Vec<String> = kv.keys().await.unwrap().try_collect().await.unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let got = bounded(
        "Resources.Get",
        rc.get(GetRequest {
            resource: "profiles".into(),
            id: "p2".into(),
        }),
    )
    .await
    .unwrap_or_else(|s| panic!("Resources.Get: {s}"))
    .into_inner();
    assert!(got.found, "{got:?}");
    let list = bounded(
        "Resources.List",
        rc.list(ListRequest {
            resource: "profiles".into(),
            ..ListRequest::default()
        }),
    )
    .await
    .unwrap_or_else(|s| panic!("Resources.List: {s}"))
    .into_inner();
    assert_eq!(list.items.len(), 2, "{list:?}");

    // Admin.Revoke: the coordinator writes the revocation bucket the edges watch.
    let ch = channel(c.grpc(0)).await.unwrap();
    let revoke = proto::v1::RevokeRequest {
        target: Some(proto::v1::revoke_request::Target::Sub("mallory".into())),
        ttl: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        reason: "test".into(),
        ..proto::v1::RevokeRequest::default()
    };
    bounded(
        "Admin.Revoke",
        proto::v1::admin_client::AdminClient::new(authed(ch)).revoke(revoke),
    )
    .await
    .unwrap_or_else(|s| panic!("Admin.Revoke under the documented permissions: {s}"));

    let none = violations(&c);
    assert!(
        none.is_empty(),
        "the documented permissions were not enough:\n{none:#?}"
    );

    // And no more than that: a backend cannot command the edges, nor listen to an edge's
    // commands or replies.
    be.bus
        .publish(Outgoing::new("sb.edges", Vec::new()))
        .await
        .unwrap();
    for subject in ["sb.node.e1", "_INBOX_sb_edge.>", "sb.coord.announce"] {
        // The server refuses the subscription (asynchronously, in its log).
        let _sub = be.bus.subscribe(subject.to_owned(), None).await;
    }
    be.sync().await;
    let refused = violations(&c);
    for subject in [
        "sb.edges",
        "sb.node.e1",
        "_INBOX_sb_edge.>",
        "sb.coord.announce",
    ] {
        assert!(
            refused
                .iter()
                .any(|l| l.contains(&format!("\"{subject}\""))),
            "{subject} refused to the backend: {refused:#?}"
        );
    }
}

/// A `switchboard ROLE` of the cluster `c` with the config file `config`, NATS at `url`,
/// listeners on free ports and the variables `env`.
fn process(role: &str, c: &Cluster, config: &Path, url: &str, env: &[(&str, &str)]) -> Command {
    let id = format!("{role}-{}", ulid::Ulid::new());
    let mut cmd = node_command(role, config, url, &id);
    cmd.args(["--coordinator", &c.grpc(0).to_string()])
        .envs(crate::harness::test_credentials())
        .envs(env.iter().copied());
    cmd
}

/// alice connects to edge 0 and a gRPC Send reaches her (answered delivered 1 on 1 node).
async fn alice_gets_a_send(c: &Cluster) -> crate::harness::Client {
    let mut alice = c.client(0, "alice", "default").await;
    c.wait_located(0, "default", "alice", 1).await;
    let r = send(c.grpc(0), "default", "alice", "note", r#"{"n":1}"#).await;
    assert_eq!((r.delivered, r.nodes), (1, 1), "{r:?}");
    assert_eq!(
        alice.recv().await,
        json!({"type": "note", "payload": {"n": 1}})
    );
    alice
}

/// The result of a process that must not start: its exit status and what it printed.
async fn failed_start(role: &str, c: &Cluster, yaml: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = c.dir.join(format!("fail-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut cmd = process(role, c, &config, &c.nats.url(), env);
    let out = bounded(&format!("{role} to give up"), cmd.output())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A wrong password, an unset password variable, a server certificate nobody told the
/// process to trust and a missing CA file each stop it at start, non-zero, with a message
/// naming the key — and never the password.
#[tokio::test]
async fn wrong_credentials_or_ca_stop_the_process_naming_the_key() {
    let dir = scratch_dir("nats-fail");
    let pki = pki();
    let c = cluster(&dir, &pki, true).await;
    let good = switchboard_yaml(&pki);
    let wrong = "wrong-password-7c2d";

    for role in ["coordinator", "edge"] {
        let env = [("SWITCHBOARD_NATS__USER", role), ("NATS_PASSWORD", wrong)];
        let (code, out) = failed_start(role, &c, &good, &env).await;
        assert_ne!(code, 0, "{role} with a wrong password: {out}");
        eprintln!(
            "{role}, wrong password: exit {code}: {}",
            out.trim().lines().last().unwrap_or_default()
        );
        assert!(
            out.contains("authorization violation")
                && out.contains("nats.user and nats.password_env"),
            "{role} with a wrong password names the keys: {out}"
        );
        assert!(!out.contains(wrong), "the password is not printed: {out}");

        let (code, out) = failed_start(role, &c, &good, &[("SWITCHBOARD_NATS__USER", role)]).await;
        assert_eq!(code, 64, "{role} without the variable: {out}");
        assert!(
            out.contains("nats.password_env: environment variable NATS_PASSWORD is not set"),
            "{out}"
        );

        // No CA: the platform's roots do not know the test CA.
        let no_ca = good.replace(&format!("  tls:\n    ca_file: {}\n", pki.ca.display()), "");
        assert_ne!(no_ca, good);
        let env = [
            ("SWITCHBOARD_NATS__USER", role),
            ("NATS_PASSWORD", password(role)),
        ];
        let (code, out) = failed_start(role, &c, &no_ca, &env).await;
        assert_ne!(code, 0, "{role} without the CA: {out}");
        eprintln!("{role}, no CA: exit {code}: {}", out.trim());
        assert!(
            out.contains("TLS") && out.contains("nats.tls.ca_file"),
            "{role} without the CA names nats.tls.ca_file: {out}"
        );

        let gone = good.replace(&pki.ca.display().to_string(), "/nonexistent/ca.pem");
        let (code, out) = failed_start(role, &c, &gone, &env).await;
        assert_eq!(code, 64, "{role} with a missing CA file: {out}");
        assert!(
            out.contains("nats.tls.ca_file: cannot read /nonexistent/ca.pem"),
            "{out}"
        );
    }
}
