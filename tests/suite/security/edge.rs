//! The edge's side of the trust boundary (issue 10, points 5, 6 and 8 and the check-config
//! row): each test reproduces the attack of the issue's table against the real binary (a real
//! nats-server, a coordinator, an edge) and asserts the refusal or the single delivery.

use std::net::SocketAddr;
use std::path::PathBuf;

use futures::StreamExt as _;
use proto::v1::ListConnectionsRequest;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::harness::{
    Cluster, STEP, Spec, bounded, eventually, hs256, http_exchange, http_get, http_head,
    list_connections, publish, scratch_dir, settle_topic, switchboard, unix_now,
    upgrade_request_as,
};

const SECRET: &str = "edge-security-secret";
/// A valid `Sec-WebSocket-Key` (RFC 6455's example: base64 of 16 bytes).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// One edge and one coordinator over a real nats-server, every process on `yaml`, the JWT
/// secret in `SWITCHBOARD_JWT_SECRET`, and logs at debug level for the edge's own crates.
async fn cluster(yaml: &str) -> Cluster {
    Cluster::launch(Spec::new(1, 1).config_yaml(yaml).jwt_secret(SECRET).env(
        "RUST_LOG",
        "info,edge=debug,coordinator=debug,switchboard=debug,bus=debug",
    ))
    .await
}

fn token(claims: &Value) -> String {
    hs256(claims, SECRET)
}

fn jwt_route(extra: &str) -> String {
    format!(
        "edge:\n  routes:\n    - path: /connect\n      auth: {{ hs256_secret_env: SWITCHBOARD_JWT_SECRET }}\n{extra}"
    )
}

/// The status of an upgrade request (the head only: a 101 keeps the connection open).
async fn status_of(addr: SocketAddr, request: &str) -> u16 {
    http_head(addr, request)
        .await
        .unwrap_or_else(|e| panic!("request {request:?}: {e}"))
        .0
}

/// The status and whole body of an upgrade the edge refuses.
async fn refusal(addr: SocketAddr, request: &str) -> (u16, String) {
    let status = status_of(addr, request).await;
    assert_ne!(
        status, 101,
        "upgraded where a refusal was expected: {request:?}"
    );
    http_exchange(addr, request)
        .await
        .unwrap_or_else(|e| panic!("request {request:?}: {e}"))
}

async fn edge_metrics(c: &Cluster) -> String {
    let (status, text) = http_get(c.ws(0), "/metrics").await.unwrap();
    assert_eq!(status, 200);
    text
}

// ---------------------------------------------------------------------------------------
// Point 5: a token is consumed by auth and goes nowhere else.

/// `?token=`, `Authorization: Bearer` and the `ID_TOKEN` cookie: none of the three tokens is
/// in ListConnections, in any hook body a backend receives (upgrade, onconnect, onmessage,
/// onclose), in anything an observer subscribed to `>` sees on NATS, in the edge's and the
/// coordinator's log output (debug level), or on either's /metrics. The other query
/// parameters and cookies are still there, and so are the claims.
#[tokio::test]
async fn a_token_is_consumed_by_auth_and_leaks_nowhere() {
    let c = cluster(&jwt_route(
        "      hooks:\n        upgrade: { publish: app.upgrade }\n        onconnect: { publish: app.connect }\n        onmessage: { publish: app.message }\n        onclose: { publish: app.close }\n",
    ))
    .await;
    let backend = c.backend().await;
    let (seen_tx, mut seen) = mpsc::channel::<(String, Value)>(64);
    let mut handlers = Vec::new();
    for subject in ["app.upgrade", "app.connect", "app.message", "app.close"] {
        let mut sub = backend.subscribe(subject).await;
        let (backend, tx) = (backend.clone(), seen_tx.clone());
        handlers.push(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let body: Value = serde_json::from_slice(&msg.payload).unwrap();
                if msg.reply.is_some() {
                    let answer = match msg.subject.as_str() {
                        "app.upgrade" => json!({"context": {"checked": true}}),
                        _ => json!({"payload": "ok"}),
                    };
                    backend.reply(&msg, &answer).await;
                }
                let _ = tx.send((msg.subject.clone(), body)).await;
            }
        }));
    }
    // Last: once it listens on `>`, no other client can sync with a request to nobody.
    let spy = c.backend().await;
    let mut everything = spy.subscribe_everything().await;

    let exp = unix_now() + 600;
    let tokens: Vec<String> = ["via-query", "via-header", "via-cookie"]
        .iter()
        .map(|u| token(&json!({"sub": u, "exp": exp, "team": "blue"})))
        .collect();
    let query = format!("/connect?room=r1&token={}", tokens[0]);
    let bearer = format!("Bearer {}", tokens[1]);
    let cookie = format!("theme=dark; ID_TOKEN={}; lang=en", tokens[2]);
    let mut clients = vec![
        c.connect_as(0, &query, &[], "via-query").await,
        c.connect_as(
            0,
            "/connect?room=r2",
            &[("authorization", &bearer)],
            "via-header",
        )
        .await,
        c.connect_as(0, "/connect?room=r3", &[("cookie", &cookie)], "via-cookie")
            .await,
    ];
    for client in &mut clients {
        // The onconnect reply, then an event and its reply.
        assert_eq!(client.recv().await["payload"], "ok");
        client.send(json!({"type": "chat", "id": 1})).await;
        assert_eq!(client.recv().await["payload"], "ok");
    }

    let listed = list_connections(c.grpc(0), ListConnectionsRequest::default()).await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    for conn in &listed {
        let text = format!("{conn:?}");
        for t in &tokens {
            assert!(
                !text.contains(t.as_str()),
                "ListConnections hands out a token: {text}"
            );
        }
        assert!(conn.params.contains_key("room"), "{conn:?}");
        assert!(!conn.params.contains_key("token"), "{conn:?}");
        let context = proto::json::from_struct(conn.context.as_ref().unwrap());
        assert_eq!(
            context.get("team"),
            Some(&json!("blue")),
            "claims stay: {context:?}"
        );
    }

    for client in clients {
        client.close_code(1000).await;
    }
    // Every hook: 3 upgrades, 3 connects, 3 messages, 3 closes.
    let mut bodies = Vec::new();
    while bodies.len() < 12 {
        bodies.push(bounded("the hook bodies", seen.recv()).await.unwrap());
    }
    for (subject, body) in &bodies {
        let text = body.to_string();
        for t in &tokens {
            assert!(
                !text.contains(t.as_str()),
                "{subject} carries a token: {text}"
            );
        }
        assert!(!text.to_lowercase().contains("bearer"), "{subject}: {text}");
        if subject == "app.upgrade" {
            assert!(body["headers"].get("authorization").is_none(), "{text}");
            assert!(body["query"].get("token").is_none(), "{text}");
            assert!(body["query"]["room"].is_string(), "{text}");
            if let Some(cookie) = body["headers"].get("cookie") {
                assert_eq!(cookie, "theme=dark; lang=en", "{text}");
            }
        } else {
            assert_eq!(body["claims"]["team"], "blue", "{subject}: {text}");
            assert!(body["params"]["room"].is_string(), "{subject}: {text}");
        }
    }

    // Everything on NATS during the test, up to a marker.
    let marker = format!("marker.{}", ulid::Ulid::new());
    spy.publish(&marker, &Value::Null).await;
    let mut captured = 0;
    bounded("the marker on the observer", async {
        while let Some(m) = everything.next().await {
            if m.subject == marker {
                return;
            }
            captured += 1;
            let payload = String::from_utf8_lossy(&m.payload);
            let headers = format!("{:?}", m.headers);
            for t in &tokens {
                assert!(
                    !payload.contains(t.as_str()) && !headers.contains(t.as_str()),
                    "a token on NATS subject {}: {payload} {headers}",
                    m.subject
                );
            }
        }
        panic!("the observer's subscription ended");
    })
    .await;
    assert!(captured >= 12, "the observer saw only {captured} messages");

    let metrics = [
        edge_metrics(&c).await,
        http_get(c.coords[0].http, "/metrics").await.unwrap().1,
    ];
    let logs = [c.edges[0].proc.output(), c.coords[0].proc.output()];
    assert!(
        logs[0].contains("connection open"),
        "the edge logged nothing: {}",
        logs[0]
    );
    for text in metrics.iter().chain(&logs) {
        for t in &tokens {
            assert!(
                !text.contains(t.as_str()),
                "a token in logs or metrics:\n{text}"
            );
        }
    }
    for h in handlers {
        h.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Point 6: a namespace from a claim holds.

/// With `namespace: {claim: tenant}`, a token for `acme` asking `?namespace=globex` gets 403
/// `namespace_not_granted` (it used to land in `globex`); `?namespace=acme` and no parameter
/// land in `acme`. check-config states the precedence.
#[tokio::test]
async fn a_claimed_namespace_cannot_be_overridden_by_the_query() {
    let yaml = jwt_route("      namespace: { claim: tenant }\n");
    let c = cluster(&yaml).await;
    let t = token(&json!({"sub": "alice", "tenant": "acme", "exp": unix_now() + 600}));
    let host = c.ws(0).to_string();
    let (status, body) = refusal(
        c.ws(0),
        &upgrade_request_as(
            &format!("/connect?namespace=globex&token={t}"),
            "1.1",
            &host,
            KEY,
            &[],
        ),
    )
    .await;
    assert_eq!((status, body.trim()), (403, "namespace_not_granted"));
    // A token without the claim cannot pick a tenant with the query either.
    let untenanted = token(&json!({"sub": "alice", "exp": unix_now() + 600}));
    let (status, body) = refusal(
        c.ws(0),
        &upgrade_request_as(
            &format!("/connect?namespace=globex&token={untenanted}"),
            "1.1",
            &host,
            KEY,
            &[],
        ),
    )
    .await;
    assert_eq!((status, body.trim()), (403, "bad_namespace_claim"));
    let mut same = c
        .connect(0, &format!("/connect?namespace=acme&token={t}"), &[])
        .await;
    let mut bare = c.connect(0, &format!("/connect?token={t}"), &[]).await;
    same.roundtrip().await;
    bare.roundtrip().await;
    let conns = c.wait_located(0, "", "alice", 2).await;
    assert!(conns.iter().all(|x| x.namespace == "acme"), "{conns:?}");

    let out = switchboard()
        .arg("check-config")
        .arg(&c.config)
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("precedence: claim:tenant (required)"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------
// The check-config row.

/// Each contradiction of the issue (and a namespace claim on an anonymous route) exits 64
/// naming the key; every example in deploy/examples still loads.
#[tokio::test]
async fn check_config_refuses_contradictions_naming_the_key() {
    let dir = scratch_dir("edge-security");
    let cases = [
        (
            "edge:\n  routes:\n    - path: /x\n      anonymous: true\n      auth: { hs256_secret_env: SWITCHBOARD_JWT_SECRET }\n",
            "edge.routes[0].anonymous",
        ),
        (
            &*jwt_route("      heartbeat: { interval: 5s, timeout: 10s }\n"),
            "edge.routes[0].heartbeat.timeout",
        ),
        (
            &*jwt_route("      rate_limit: { per_second: 100, burst: 10 }\n"),
            "edge.routes[0].rate_limit.burst",
        ),
        (
            &*jwt_route("      rate_limit: { close_after: 0 }\n"),
            "edge.routes[0].rate_limit.close_after",
        ),
        (
            "edge:\n  routes:\n    - path: /x\n      anonymous: true\n      namespace: { claim: tenant }\n",
            "edge.routes[0].namespace.claim",
        ),
    ];
    for (i, (yaml, key)) in cases.iter().enumerate() {
        let file = dir.join(format!("case{i}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        let out = switchboard()
            .arg("check-config")
            .arg(&file)
            .env("SWITCHBOARD_JWT_SECRET", SECRET)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{yaml}: {out:?}");
        assert!(stderr.contains(&format!("{key}:")), "{yaml}: {stderr}");
    }
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        let out = switchboard()
            .arg("check-config")
            .arg(&path)
            .env("SWITCHBOARD_JWT_SECRET", SECRET)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}: {out:?}", path.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// Point 8.

const ANONYMOUS: &str =
    "edge:\n  routes:\n    - path: /connect\n      anonymous: true\n      publish: true\n";

/// `?user=a%0A<timestamp> WARN forged`: the pretty log shows the value escaped on the
/// connection's own line; no line of the edge's output starts with the forged text.
#[tokio::test]
async fn client_values_cannot_forge_log_lines() {
    let c = cluster(ANONYMOUS).await;
    let forged = "2026-01-01T00:00:00.000000Z  WARN edge: forged";
    let mut client = c
        .connect(
            0,
            "/connect?user=a%0A2026-01-01T00:00:00.000000Z%20%20WARN%20edge:%20forged&namespace=n%0D%1B[2J",
            &[],
        )
        .await;
    client.roundtrip().await;
    let out = eventually("the connection's log line", STEP, async || {
        let out = c.edges[0].proc.output();
        out.contains("connection open").then_some(out)
    })
    .await;
    assert!(
        out.lines().all(|l| !l.starts_with(forged)),
        "a forged line:\n{out}"
    );
    assert!(
        !out.contains(['\r', '\u{1b}']),
        "raw control characters:\n{out}"
    );
    let line = out.lines().find(|l| l.contains("connection open")).unwrap();
    assert!(line.contains(r"user=a\n2026-01-01"), "{line}");
    assert!(line.contains(r"ns=n\r\u{1b}[2J"), "{line}");
}

/// Same origin compares scheme, host and port: `https://host` on this plain listener is
/// refused (it passed), and so is another port.
#[tokio::test]
async fn same_origin_compares_scheme_host_and_port() {
    let c = cluster(ANONYMOUS).await;
    let addr = c.ws(0);
    let host = addr.to_string();
    let up =
        |origin: &str| upgrade_request_as("/connect", "1.1", &host, KEY, &[("Origin", origin)]);
    let own = format!("http://{host}");
    assert_eq!(status_of(addr, &up(&own)).await, 101);
    let https = format!("https://{host}");
    assert_eq!(refusal(addr, &up(&https)).await, (403, "origin\n".into()));
    let other_port = format!("http://127.0.0.1:{}", addr.port() + 1);
    assert_eq!(refusal(addr, &up(&other_port)).await.0, 403);
}

/// DNS rebinding: `Host: evil` + `Origin: http://evil` is same-origin (101 without a Host
/// list); with `allowed_hosts` it is refused with 403 `host`. `public_origins` stands for the
/// listener's own origin behind a proxy that terminates TLS.
#[tokio::test]
async fn allowed_hosts_refuse_a_rebound_host_and_public_origins_stand_in() {
    let yaml = "edge:\n  routes:\n    - path: /same\n      anonymous: true\n    - path: /pinned\n      anonymous: true\n      allowed_hosts: [ws.example.com]\n    - path: /proxied\n      anonymous: true\n      public_origins: [\"https://ws.example.com\"]\n";
    let c = cluster(yaml).await;
    let addr = c.ws(0);
    let host = addr.to_string();
    let up = |path: &str, host: &str, origin: &str| {
        upgrade_request_as(path, "1.1", host, KEY, &[("Origin", origin)])
    };
    assert_eq!(
        status_of(addr, &up("/same", "evil", "http://evil")).await,
        101
    );
    assert_eq!(
        refusal(addr, &up("/pinned", "evil", "http://evil")).await,
        (403, "host\n".into())
    );
    let pinned = "http://ws.example.com";
    assert_eq!(
        status_of(addr, &up("/pinned", "ws.example.com", pinned)).await,
        101
    );
    let public = "https://ws.example.com";
    assert_eq!(
        status_of(addr, &up("/proxied", "ws.example.com", public)).await,
        101
    );
    let own = format!("http://{host}");
    assert_eq!(refusal(addr, &up("/proxied", &host, &own)).await.0, 403);
}

/// 401/403 bodies are a reason code: jsonwebtoken's text (`unknown variant \`none\``…)
/// stays in the debug log.
#[tokio::test]
async fn refusals_say_a_reason_code_only() {
    let c = cluster(&jwt_route("")).await;
    let host = c.ws(0).to_string();
    // alg=none, as an attacker crafts it.
    let none = format!(
        "{}.{}.",
        base64url(r#"{"alg":"none","typ":"JWT"}"#),
        base64url(&json!({"sub": "mallory", "exp": unix_now() + 600}).to_string())
    );
    let granted_elsewhere =
        token(&json!({"sub": "bob", "namespaces": ["a"], "exp": unix_now() + 600}));
    for (path, want) in [
        (format!("/connect?token={none}"), (401, "invalid_token")),
        ("/connect?token=garbage".to_owned(), (401, "invalid_token")),
        ("/connect".to_owned(), (401, "missing_token")),
        (
            format!("/connect?namespace=b&token={granted_elsewhere}"),
            (403, "namespace_not_granted"),
        ),
    ] {
        let (status, body) =
            refusal(c.ws(0), &upgrade_request_as(&path, "1.1", &host, KEY, &[])).await;
        assert_eq!(
            (status, body.as_str()),
            (want.0, format!("{}\n", want.1).as_str()),
            "{path}"
        );
    }
    let log = c.edges[0].proc.output();
    assert!(
        log.contains("upgrade refused"),
        "details at debug level:\n{log}"
    );
}

fn base64url(s: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A connection subscribed to `#`, `+/#` and `x/y` gets one copy of a publication on `x/y`
/// (it got three), and Publish reports one delivery; after it drops `#`, still one.
#[tokio::test]
async fn overlapping_filters_deliver_one_copy() {
    let c = cluster(ANONYMOUS).await;
    let mut client = c.client(0, "fan", "default").await;
    for (i, filter) in ["#", "+/#", "x/y"].iter().enumerate() {
        client
            .send(json!({"type": "subscribe", "topic": filter, "id": i}))
            .await;
        assert_eq!(client.recv().await["type"], "subscribed");
    }
    // Placement learns of the filters asynchronously; a probe through `#` settles it.
    settle_topic(&c, 0, "probe", 1, &mut [&mut client]).await;
    for (n, topic) in [(1, "x/y"), (2, "x/z"), (3, "x")] {
        let r = publish(c.grpc(0), "default", topic, &json!({"n": n}).to_string()).await;
        assert_eq!(r.delivered, 1, "{topic}: {r:?}");
        assert_eq!(
            client.recv().await,
            json!({"type": "message", "topic": topic, "payload": {"n": n}})
        );
        client.roundtrip().await;
    }
    client
        .send(json!({"type": "unsubscribe", "topic": "#"}))
        .await;
    assert_eq!(client.recv().await["type"], "unsubscribed");
    let r = publish(c.grpc(0), "default", "x/y", r#"{"n":4}"#).await;
    assert_eq!(r.delivered, 1, "{r:?}");
    assert_eq!(client.recv().await["payload"], json!({"n": 4}));
    client.roundtrip().await;
}

/// U+0000 and other control characters in a topic or filter are `invalid_topic`.
#[tokio::test]
async fn control_characters_in_topics_are_invalid() {
    let c = cluster(ANONYMOUS).await;
    let mut client = c.client(0, "ctl", "default").await;
    for (verb, topic) in [
        ("subscribe", "a\u{0}b"),
        ("subscribe", "a/\n"),
        ("publish", "x\u{0}"),
        ("publish", "x/\u{85}"),
    ] {
        client
            .send(json!({"type": verb, "topic": topic, "payload": 1}))
            .await;
        let answer = client.recv().await;
        assert_eq!(answer["type"], "error", "{verb} {topic:?}: {answer}");
        assert_eq!(
            answer["code"], "invalid_topic",
            "{verb} {topic:?}: {answer}"
        );
    }
    client.roundtrip().await;
}

/// An HTTP/1.0 upgrade and a `Sec-WebSocket-Key` that is not base64 of 16 bytes get 400.
#[tokio::test]
async fn http10_upgrades_and_malformed_keys_get_400() {
    let c = cluster(ANONYMOUS).await;
    let addr = c.ws(0);
    let host = addr.to_string();
    let path = "/connect?user=k";
    assert_eq!(
        refusal(addr, &upgrade_request_as(path, "1.0", &host, KEY, &[]))
            .await
            .0,
        400
    );
    // "Hello, world!" is 13 bytes.
    for key in ["SGVsbG8sIHdvcmxkIQ==", "abc", "!!!!!!!!!!!!!!!!!!!!!!=="] {
        let (status, _) = refusal(addr, &upgrade_request_as(path, "1.1", &host, key, &[])).await;
        assert_eq!(status, 400, "{key}");
    }
    assert_eq!(
        status_of(addr, &upgrade_request_as(path, "1.1", &host, KEY, &[])).await,
        101
    );
}

/// A flood of WebSocket pings counts toward the rate limit: the socket closes with 1008.
#[tokio::test]
async fn pings_count_toward_the_rate_limit() {
    let c = cluster(
        "edge:\n  routes:\n    - path: /connect\n      anonymous: true\n      rate_limit: { per_second: 1, burst: 5, close_after: 3 }\n",
    )
    .await;
    let mut flood = c.client(0, "flood", "default").await;
    // Exactly the burst (5) and the refusals that close (3): a ping more could still be
    // unread when the edge closes, and the kernel would then reset the close frame away.
    for _ in 0..8 {
        flood.send_message(WsMessage::Ping("x".into())).await;
    }
    let ((code, _), _) = flood.close_frame_after_texts().await;
    assert_eq!(code, 1008);
}

/// Client-chosen close codes outside 1000–1015 share the `other` label.
#[tokio::test]
async fn unknown_client_close_codes_share_one_label() {
    let c = cluster(ANONYMOUS).await;
    for (i, code) in [4321u16, 3999, 4999, 1000].into_iter().enumerate() {
        let client = c.client(0, &format!("closer{i}"), "default").await;
        client.close_code(code).await;
    }
    let text = eventually("the other closes in /metrics", STEP, async || {
        let again = edge_metrics(&c).await;
        (again.contains("edge_closes_total{code=\"other\"} 3")
            && again.contains("edge_closes_total{code=\"1000\"} 1"))
        .then_some(again)
    })
    .await;
    for code in ["4321", "3999", "4999"] {
        assert!(!text.contains(&format!("code=\"{code}\"")), "{text}");
    }
}
