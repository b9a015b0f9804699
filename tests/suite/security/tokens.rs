//! Token lifecycle (issue 10, point 7), against the real binary and a real nats-server:
//! `exp` required by default, ES256 and EdDSA keys, JWKS by `kid` from a file and from an
//! HTTPS URL with rotation, `refresh_required` → `refresh` → `refreshed` or the close with
//! 4001, and revocation through `Admin.Revoke` closing connections on two edges within 1 s.
//!
//! `tests/fixtures/{es256,es256_other,ed25519,ed25519_other}_private.pem` are throwaway keys
//! made with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` and
//! `openssl genpkey -algorithm ED25519` (`*_public.pem`: `openssl pkey -pubout`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proto::v1::admin_client::AdminClient;
use proto::v1::revoke_request::Target;
use proto::v1::{RevokeRequest, RevokeResponse};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::harness::{Client, Cluster, STEP, Spec, bounded, eventually, fixture, hs256, unix_now};

const SECRET: &str = "tokens-suite-secret";
/// The bound the issue sets on closing a revoked token's connections.
const REVOKE_BOUND: Duration = Duration::from_secs(1);

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

/// A token signed with the private key fixture `key` (PEM) under `alg`, with `kid`.
fn signed(alg: Algorithm, key: &str, kid: Option<&str>, claims: &Value) -> String {
    let key = encoding_key(alg, key);
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn encoding_key(alg: Algorithm, key: &str) -> EncodingKey {
    match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem(key)).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem(key)).unwrap(),
        other => panic!("no fixture for {other:?}"),
    }
}

/// The public JWK of private key fixture `key`, with `kid`.
fn jwk(alg: Algorithm, key: &str, kid: &str) -> Value {
    let mut j = serde_json::to_value(Jwk::from_encoding_key(&encoding_key(alg, key), alg).unwrap())
        .unwrap();
    j["kid"] = Value::from(kid);
    j
}

fn claims(sub: &str, ttl: i64) -> Value {
    json!({"sub": sub, "exp": unix_now() + ttl})
}

fn yaml_path(p: &std::path::Path) -> String {
    serde_json::to_string(&p.display().to_string()).unwrap()
}

// ---------------------------------------------------------------------------------------
// exp and algorithms.

#[tokio::test]
async fn exp_is_required_and_es256_eddsa_keys_verify() {
    let yaml = format!(
        "edge:\n  routes:\n\
         \x20   - path: /hs\n      auth: {{ hs256_secret_env: SWITCHBOARD_JWT_SECRET }}\n\
         \x20   - path: /lax\n      auth: {{ hs256_secret_env: SWITCHBOARD_JWT_SECRET, require_exp: false }}\n\
         \x20   - path: /es\n      auth: {{ es256_public_key_file: {} }}\n\
         \x20   - path: /ed\n      auth: {{ eddsa_public_key_file: {} }}\n",
        yaml_path(&fixture("es256_public.pem")),
        yaml_path(&fixture("ed25519_public.pem")),
    );
    let c = Cluster::launch(Spec::new(1, 1).config_yaml(yaml).jwt_secret(SECRET)).await;

    let no_exp = hs256(&json!({"sub": "forever"}), SECRET);
    assert_eq!(
        c.upgrade_status(0, &format!("/hs?token={no_exp}")).await,
        401
    );
    let mut lax = c.connect(0, &format!("/lax?token={no_exp}"), &[]).await;
    lax.roundtrip().await;
    let with_exp = hs256(&claims("timely", 600), SECRET);
    c.connect(0, &format!("/hs?token={with_exp}"), &[])
        .await
        .roundtrip()
        .await;

    let es = signed(
        Algorithm::ES256,
        "es256_private.pem",
        None,
        &claims("ec", 600),
    );
    let ed = signed(
        Algorithm::EdDSA,
        "ed25519_private.pem",
        None,
        &claims("ed", 600),
    );
    c.connect(0, &format!("/es?token={es}"), &[])
        .await
        .roundtrip()
        .await;
    c.connect(0, &format!("/ed?token={ed}"), &[])
        .await
        .roundtrip()
        .await;

    let refused = [
        // Signed with another key of the right type.
        (
            "/es",
            signed(
                Algorithm::ES256,
                "es256_other_private.pem",
                None,
                &claims("x", 600),
            ),
        ),
        (
            "/ed",
            signed(
                Algorithm::EdDSA,
                "ed25519_other_private.pem",
                None,
                &claims("x", 600),
            ),
        ),
        // The right route's key type, the wrong algorithm: no confusion.
        ("/es", ed.clone()),
        ("/ed", es.clone()),
        ("/es", hs256(&claims("x", 600), SECRET)),
        // No exp on a key route either.
        (
            "/es",
            signed(
                Algorithm::ES256,
                "es256_private.pem",
                None,
                &json!({"sub": "x"}),
            ),
        ),
    ];
    for (route, token) in refused {
        assert_eq!(
            c.upgrade_status(0, &format!("{route}?token={token}")).await,
            401,
            "{route} accepted a token it must refuse"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Refresh.

#[tokio::test]
async fn expiring_tokens_get_refresh_required_and_close_with_4001_unless_refreshed() {
    let yaml = "edge:\n  routes:\n\
         \x20   - path: /hs\n      auth: { hs256_secret_env: SWITCHBOARD_JWT_SECRET, refresh_lead: 3s }\n\
         \x20     heartbeat: { interval: 0s }\n\
         \x20   - path: /mr\n      dialect: monorail\n\
         \x20     auth: { hs256_secret_env: SWITCHBOARD_JWT_SECRET, refresh_lead: 3s }\n\
         \x20     heartbeat: { interval: 0s }\n";
    let c = Cluster::launch(Spec::new(1, 1).config_yaml(yaml).jwt_secret(SECRET)).await;
    // A 3–4 s token (exp has whole seconds) with a 3 s lead: the notice comes within a second,
    // leaving two or more for the refusals and the refresh before it expires.
    let first_exp = unix_now() + 4;
    let short = hs256(
        &json!({"sub": "ann", "exp": first_exp, "namespaces": ["default"]}),
        SECRET,
    );
    let mut keeper = c
        .connect_as(0, &format!("/hs?token={short}"), &[], "keeper")
        .await;
    let mut idler = c
        .connect_as(0, &format!("/hs?token={short}"), &[], "idler")
        .await;
    let mut wrong = c
        .connect_as(0, &format!("/hs?token={short}"), &[], "wrong")
        .await;
    // A dialect without the refresh verb gets no notice, only the close.
    let mut monorail = c
        .connect_as(0, &format!("/mr?token={short}"), &[], "monorail")
        .await;

    // refresh_lead before exp: the notice, with the exp it is about.
    for client in [&mut keeper, &mut idler, &mut wrong] {
        let notice = client.recv_within(Duration::from_secs(4)).await;
        assert_eq!(
            notice,
            json!({"type": "refresh_required", "exp": first_exp}),
            "{}",
            client.name
        );
    }

    // Another user's token, a token for other namespaces, and garbage are refused, and
    // leave the connection's own deadline in force.
    let other_user = hs256(&claims("bob", 600), SECRET);
    let narrower_elsewhere = hs256(
        &json!({"sub": "ann", "exp": unix_now() + 600, "namespaces": ["other"]}),
        SECRET,
    );
    for (what, token) in [
        ("another user's", other_user.as_str()),
        ("another namespace's", narrower_elsewhere.as_str()),
        ("a forged", "e30.e30.c2ln"),
    ] {
        wrong
            .send(json!({"type": "refresh", "id": what, "token": token}))
            .await;
        let answer = wrong.recv().await;
        assert_eq!(answer["type"], "error", "{what} token: {answer}");
        assert_eq!(answer["code"], "invalid_token", "{what} token: {answer}");
        assert_eq!(answer["id"], what);
        let text = answer.to_string();
        assert!(!text.contains(token), "the error echoes the token: {text}");
    }

    let fresh_exp = unix_now() + 600;
    let fresh = hs256(
        &json!({"sub": "ann", "exp": fresh_exp, "namespaces": ["default"]}),
        SECRET,
    );
    keeper
        .send(json!({"type": "refresh", "id": 1, "token": fresh}))
        .await;
    assert_eq!(
        keeper.recv().await,
        json!({"type": "refreshed", "id": 1, "exp": fresh_exp})
    );

    // The ones that did not refresh close at exp with 4001 "token expired".
    for client in [&mut idler, &mut wrong, &mut monorail] {
        let ((code, reason), texts) = client.close_frame_after_texts().await;
        assert_eq!(
            (code, reason.as_str()),
            (4001, "token expired"),
            "{}",
            client.name
        );
        assert!(
            texts.is_empty(),
            "{}: frames before the close: {texts:?}",
            client.name
        );
        assert!(
            unix_now() >= first_exp,
            "{} closed before its token expired",
            client.name
        );
    }
    // The refreshed one is still open past the first exp (which the closes above prove has
    // passed), and served.
    assert!(unix_now() >= first_exp);
    keeper.roundtrip().await;
}

// ---------------------------------------------------------------------------------------
// Revocation.

/// An Admin client with the test API key (scope `admin`).
async fn admin(addr: SocketAddr) -> AdminClient<crate::harness::Authed> {
    let ch = crate::harness::channel(addr)
        .await
        .unwrap_or_else(|e| panic!("gRPC {e}"));
    AdminClient::new(crate::harness::authed(ch))
}

async fn revoke(addr: SocketAddr, target: Target, reason: &str) -> RevokeResponse {
    let req = RevokeRequest {
        target: Some(target),
        namespace: String::new(),
        ttl: Some(prost_types::Duration {
            seconds: 300,
            nanos: 0,
        }),
        reason: reason.into(),
    };
    let mut client = admin(addr).await;
    bounded("Admin/Revoke", client.revoke(req))
        .await
        .unwrap_or_else(|s| panic!("Admin/Revoke: {s}"))
        .into_inner()
}

/// Revokes `target` through coordinator 0 and waits for each of `doomed` to close with
/// 4003; prints and returns the time from the call to each close.
async fn revoke_and_time(c: &Cluster, target: Target, doomed: &mut [Client]) -> Vec<Duration> {
    let what = format!("{target:?}");
    let start = Instant::now();
    let answer = revoke(c.grpc(0), target, "suite").await;
    assert!(answer.until > unix_now(), "{answer:?}");
    let closes = doomed.iter_mut().map(|client| async move {
        let ((code, reason), _) = client.close_frame_after_texts().await;
        assert_eq!(
            (code, reason.as_str()),
            (4003, "token revoked"),
            "{}",
            client.name
        );
        (client.name.clone(), start.elapsed())
    });
    let timed = futures::future::join_all(closes).await;
    for (name, took) in &timed {
        eprintln!("revocation of {what}: {name} closed {took:?} after the Admin/Revoke call");
    }
    timed
        .into_iter()
        .map(|(name, took)| {
            assert!(took < REVOKE_BOUND, "{name} closed only after {took:?}");
            took
        })
        .collect()
}

#[tokio::test]
async fn revoked_jti_and_sub_close_their_connections_on_two_edges_within_a_second() {
    let yaml = "edge:\n  routes:\n\
         \x20   - path: /hs\n      auth: { hs256_secret_env: SWITCHBOARD_JWT_SECRET }\n";
    let c = Cluster::launch(Spec::new(2, 1).config_yaml(yaml).jwt_secret(SECRET)).await;
    let token = |sub: &str, jti: &str| {
        hs256(
            &json!({"sub": sub, "jti": jti, "exp": unix_now() + 600}),
            SECRET,
        )
    };
    let (leaked, kept) = (token("carol", "leaked-1"), token("carol", "kept-1"));
    let mut doomed = vec![
        c.connect_as(0, &format!("/hs?token={leaked}"), &[], "leaked@e1")
            .await,
        c.connect_as(1, &format!("/hs?token={leaked}"), &[], "leaked@e2")
            .await,
    ];
    let mut spared = vec![
        c.connect_as(0, &format!("/hs?token={kept}"), &[], "kept@e1")
            .await,
        c.connect_as(1, &format!("/hs?token={kept}"), &[], "kept@e2")
            .await,
    ];
    for client in doomed.iter_mut().chain(spared.iter_mut()) {
        client.roundtrip().await;
    }
    revoke_and_time(&c, Target::Jti("leaked-1".into()), &mut doomed).await;
    for client in &mut spared {
        client.roundtrip().await;
    }
    // New upgrades with the revoked token are refused on both edges.
    for edge in 0..2 {
        assert_eq!(
            c.upgrade_status(edge, &format!("/hs?token={leaked}")).await,
            401
        );
    }

    // Every token of a subject, whatever its jti.
    let mut doomed = vec![
        c.connect_as(
            0,
            &format!("/hs?token={}", token("dave", "d-1")),
            &[],
            "dave1@e1",
        )
        .await,
        c.connect_as(
            1,
            &format!("/hs?token={}", token("dave", "d-2")),
            &[],
            "dave2@e2",
        )
        .await,
    ];
    for client in &mut doomed {
        client.roundtrip().await;
    }
    revoke_and_time(&c, Target::Sub("dave".into()), &mut doomed).await;
    for client in &mut spared {
        client.roundtrip().await;
    }
    assert_eq!(
        c.upgrade_status(1, &format!("/hs?token={}", token("dave", "d-3")))
            .await,
        401
    );
    // A refresh to a revoked token is refused too.
    spared[0]
        .send(json!({"type": "refresh", "token": token("carol", "leaked-1")}))
        .await;
    assert_eq!(spared[0].recv().await["code"], "invalid_token");
}

#[tokio::test]
async fn the_revocation_watch_resumes_after_a_nats_restart() {
    let yaml = "edge:\n  routes:\n\
         \x20   - path: /hs\n      auth: { hs256_secret_env: SWITCHBOARD_JWT_SECRET }\n";
    let mut c = Cluster::launch(Spec::new(1, 1).config_yaml(yaml).jwt_secret(SECRET)).await;
    // The bucket exists before the restart (JetStream keeps it on disk).
    revoke(c.grpc(0), Target::Jti("warm-up".into()), "suite").await;
    c.nats.restart().await;
    c.wait_ready().await;
    let token = hs256(
        &json!({"sub": "erin", "jti": "after-restart", "exp": unix_now() + 600}),
        SECRET,
    );
    let mut client = c.connect(0, &format!("/hs?token={token}"), &[]).await;
    client.roundtrip().await;
    // A revocation written after the restart reaches the edge: its watch was resumed (or
    // the bucket relisted). The bound covers the watch's recovery (two idle heartbeats).
    let start = Instant::now();
    revoke(c.grpc(0), Target::Jti("after-restart".into()), "suite").await;
    let ((code, _), _) = client.close_frame_after_texts().await;
    assert_eq!(code, 4003);
    eprintln!(
        "revocation after a NATS restart: closed {:?} after the call",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// JWKS.

#[tokio::test]
async fn jwks_file_selects_keys_by_kid() {
    let dir = std::env::temp_dir().join(format!("sb-jwks-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let set = json!({"keys": [
        jwk(Algorithm::ES256, "es256_private.pem", "ec-1"),
        jwk(Algorithm::EdDSA, "ed25519_private.pem", "ed-1"),
    ]});
    let path = dir.join("jwks.json");
    std::fs::write(&path, set.to_string()).unwrap();
    let yaml = format!(
        "edge:\n  routes:\n    - path: /jwks\n      auth: {{ jwks_file: {} }}\n",
        yaml_path(&path)
    );
    let c = Cluster::launch(Spec::new(1, 1).config_yaml(yaml)).await;
    let es = signed(
        Algorithm::ES256,
        "es256_private.pem",
        Some("ec-1"),
        &claims("e", 600),
    );
    let ed = signed(
        Algorithm::EdDSA,
        "ed25519_private.pem",
        Some("ed-1"),
        &claims("d", 600),
    );
    c.connect(0, &format!("/jwks?token={es}"), &[])
        .await
        .roundtrip()
        .await;
    c.connect(0, &format!("/jwks?token={ed}"), &[])
        .await
        .roundtrip()
        .await;
    let refused = [
        // The kid of the other key: the key's algorithm is not the token's.
        signed(
            Algorithm::ES256,
            "es256_private.pem",
            Some("ed-1"),
            &claims("e", 600),
        ),
        // Unknown kid, no kid (two keys), another signer under a known kid.
        signed(
            Algorithm::ES256,
            "es256_private.pem",
            Some("ec-9"),
            &claims("e", 600),
        ),
        signed(
            Algorithm::ES256,
            "es256_private.pem",
            None,
            &claims("e", 600),
        ),
        signed(
            Algorithm::ES256,
            "es256_other_private.pem",
            Some("ec-1"),
            &claims("e", 600),
        ),
    ];
    for token in refused {
        assert_eq!(
            c.upgrade_status(0, &format!("/jwks?token={token}")).await,
            401
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An HTTPS server of one JWKS document that the test may change; counts its fetches.
struct JwksServer {
    addr: SocketAddr,
    ca_pem: String,
    doc: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    async fn start(doc: &Value) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = Arc::new(Mutex::new(doc.to_string()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (d, f) = (Arc::clone(&doc), Arc::clone(&fetches));
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, d, f) = (acceptor.clone(), Arc::clone(&d), Arc::clone(&f));
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    f.fetch_add(1, Ordering::SeqCst);
                    let body = d.lock().unwrap().clone();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self {
            addr,
            ca_pem: ca_cert.pem(),
            doc,
            fetches,
            task,
        }
    }

    fn serve(&self, doc: &Value) {
        *self.doc.lock().unwrap() = doc.to_string();
    }
}

#[tokio::test]
async fn jwks_url_is_fetched_over_https_and_picks_up_a_rotated_key() {
    let first = json!({"keys": [jwk(Algorithm::ES256, "es256_private.pem", "2026-a")]});
    let server = JwksServer::start(&first).await;
    let dir = std::env::temp_dir().join(format!("sb-jwks-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &server.ca_pem).unwrap();
    let yaml = format!(
        "edge:\n  routes:\n    - path: /jwks\n      auth:\n        jwks_url: https://{}/keys.json\n\
         \x20       jwks_ca_file: {}\n        jwks_refresh_min: 1s\n        jwks_refresh: 10m\n",
        server.addr,
        yaml_path(&ca)
    );
    let c = Cluster::launch(Spec::new(1, 1).config_yaml(yaml)).await;
    let old = signed(
        Algorithm::ES256,
        "es256_private.pem",
        Some("2026-a"),
        &claims("o", 600),
    );
    // The first fetch runs at start; wait for it rather than assume it is done.
    eventually("the first JWKS fetch to admit a token", STEP, async || {
        (c.upgrade_status(0, &format!("/jwks?token={old}")).await == 101).then_some(())
    })
    .await;

    // Rotation: a new key under a new kid is published; a token naming it makes the edge
    // refetch (at most once per jwks_refresh_min) and is admitted once the set has it.
    let new = signed(
        Algorithm::EdDSA,
        "ed25519_private.pem",
        Some("2026-b"),
        &claims("n", 600),
    );
    let before = server.fetches.load(Ordering::SeqCst);
    assert_eq!(
        c.upgrade_status(0, &format!("/jwks?token={new}")).await,
        401
    );
    server.serve(&json!({"keys": [
        jwk(Algorithm::ES256, "es256_private.pem", "2026-a"),
        jwk(Algorithm::EdDSA, "ed25519_private.pem", "2026-b"),
    ]}));
    let start = Instant::now();
    let mut attempts = 0u32;
    eventually("the rotated key to be admitted", STEP, async || {
        attempts += 1;
        (c.upgrade_status(0, &format!("/jwks?token={new}")).await == 101).then_some(())
    })
    .await;
    let fetched = server.fetches.load(Ordering::SeqCst) - before;
    eprintln!(
        "jwks rotation: admitted {:?} after publishing, {attempts} attempts, {fetched} fetches",
        start.elapsed()
    );
    // Unknown kids do not make the edge hammer the URL: one fetch per second at most.
    let bound = 2 + start.elapsed().as_secs() as usize;
    assert!(
        fetched <= bound,
        "{fetched} fetches for {attempts} attempts (bound {bound})"
    );
    c.connect(0, &format!("/jwks?token={old}"), &[])
        .await
        .roundtrip()
        .await;

    // A failed fetch keeps the last good set.
    server.serve(&json!("not a key set"));
    let unknown = signed(
        Algorithm::EdDSA,
        "ed25519_private.pem",
        Some("2026-x"),
        &claims("x", 600),
    );
    let before = server.fetches.load(Ordering::SeqCst);
    eventually("a refetch of the broken set", STEP, async || {
        assert_eq!(
            c.upgrade_status(0, &format!("/jwks?token={unknown}")).await,
            401
        );
        (server.fetches.load(Ordering::SeqCst) > before).then_some(())
    })
    .await;
    c.connect(0, &format!("/jwks?token={new}"), &[])
        .await
        .roundtrip()
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}
