//! Upgrade-time admission (docs/PROTOCOL.md §2, docs/routes.md): JWT from a header, a query
//! parameter or a cookie (HS256, RS256), the user claim, granted namespaces, origins, routes.
//!
//! `tests/fixtures/rs256_*.pem` are throwaway keys made for these tests with
//! `openssl genrsa -out rs256_private.pem 2048` and `openssl rsa -pubout`.

use edge::config::{AuthConfig, RouteConfig};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proto::v1::ListConnectionsRequest;
use serde_json::{Value, json};

use crate::harness::{TestNode, WAIT, bearer, config_with, fixture, unix_now, upgrade_status};

const SECRET: &str = "test-secret-for-hs256";

fn hs256(claims: &Value) -> String {
    crate::harness::hs256(claims, SECRET)
}

fn hs256_with(claims: &Value, secret: &[u8]) -> String {
    crate::harness::hs256(claims, secret)
}

fn rs256(claims: &Value, private_pem: &str) -> String {
    let pem = std::fs::read(fixture(private_pem)).unwrap();
    let key = EncodingKey::from_rsa_pem(&pem).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &key).unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": unix_now() + 600})
}

fn route(path: &str, auth: AuthConfig) -> RouteConfig {
    RouteConfig {
        path: path.into(),
        auth,
        ..RouteConfig::default()
    }
}

fn hs_auth() -> AuthConfig {
    AuthConfig {
        hs256_secret: Some(SECRET.into()),
        ..AuthConfig::default()
    }
}

async fn hs_node() -> TestNode {
    TestNode::start(config_with(vec![route("/secure", hs_auth())])).await
}

#[tokio::test]
async fn hs256_token_from_header_query_or_cookie_admits_the_sub() {
    let node = hs_node().await;
    let (h, q, k) = (
        hs256(&claims("via-header")),
        hs256(&claims("via-query")),
        hs256(&claims("via-cookie")),
    );
    let mut a = node
        .ws("/secure", &[("Authorization", bearer(&h).as_str())])
        .await;
    let mut b = node.ws(&format!("/secure?token={q}"), &[]).await;
    let cookie = format!("theme=dark; ID_TOKEN={k}; other=1");
    let mut c = node.ws("/secure", &[("Cookie", cookie.as_str())]).await;
    for (client, user) in [
        (&mut a, "via-header"),
        (&mut b, "via-query"),
        (&mut c, "via-cookie"),
    ] {
        client.roundtrip().await;
        let located = node.wait_located("default", user, 1).await;
        assert_eq!(located[0].remote_addr, client.local_addr.to_string());
    }
}

#[tokio::test]
async fn user_claim_can_be_preferred_username() {
    let auth = AuthConfig {
        user_claim: "preferred_username".into(),
        ..hs_auth()
    };
    let node = TestNode::start(config_with(vec![route("/bodhi", auth)])).await;
    let token =
        hs256(&json!({"sub": "id-123", "preferred_username": "jane", "exp": unix_now() + 600}));
    let cookie = format!("ID_TOKEN={token}");
    let mut c = node
        .ws("/bodhi?namespace=acme", &[("Cookie", cookie.as_str())])
        .await;
    c.roundtrip().await;
    node.wait_located("acme", "jane", 1).await;
    assert!(node.locate("", "id-123").await.is_empty());

    let no_claim = hs256(&claims("only-sub"));
    let status = upgrade_status(node.ws_addr, &format!("/bodhi?token={no_claim}"), &[]).await;
    assert_eq!(status, 401, "token without the user claim");
}

#[tokio::test]
async fn rs256_public_key_verifies_tokens() {
    let auth = AuthConfig {
        rs256_public_key_file: Some(fixture("rs256_public.pem")),
        ..AuthConfig::default()
    };
    let node = TestNode::start(config_with(vec![route("/rs", auth)])).await;
    let good = rs256(&claims("rsa-user"), "rs256_private.pem");
    let mut c = node.ws(&format!("/rs?token={good}"), &[]).await;
    c.roundtrip().await;
    node.wait_located("default", "rsa-user", 1).await;

    let other_key = rs256(&claims("rsa-user"), "rs256_other_private.pem");
    assert_eq!(
        upgrade_status(node.ws_addr, &format!("/rs?token={other_key}"), &[]).await,
        401,
        "signed by another key"
    );
    // Algorithm confusion: an HS256 token whose secret is the public key.
    let public = std::fs::read(fixture("rs256_public.pem")).unwrap();
    let confused = hs256_with(&claims("rsa-user"), &public);
    assert_eq!(
        upgrade_status(node.ws_addr, &format!("/rs?token={confused}"), &[]).await,
        401,
        "HS256 token on an RS256 route"
    );
}

#[tokio::test]
async fn bad_expired_or_missing_tokens_get_401() {
    let node = hs_node().await;
    let addr = node.ws_addr;
    let expired = hs256(&json!({"sub": "late", "exp": unix_now() - 120}));
    let not_yet = hs256(&json!({"sub": "early", "exp": unix_now() + 600, "nbf": unix_now() + 300}));
    let wrong_secret = hs256_with(&claims("forger"), b"not-the-secret");
    let good = hs256(&claims("ok"));
    let mut tampered = good.clone();
    // Change one character in the middle of the payload part.
    let mid = good.find('.').unwrap() + 5;
    let ch = if &good[mid..=mid] == "A" { "B" } else { "A" };
    tampered.replace_range(mid..=mid, ch);

    for (what, path, headers) in [
        ("expired", format!("/secure?token={expired}"), vec![]),
        (
            "nbf in the future",
            format!("/secure?token={not_yet}"),
            vec![],
        ),
        (
            "wrong secret",
            format!("/secure?token={wrong_secret}"),
            vec![],
        ),
        ("tampered", format!("/secure?token={tampered}"), vec![]),
        ("garbage", "/secure?token=abc.def.ghi".to_owned(), vec![]),
        ("missing", "/secure".to_owned(), vec![]),
        ("empty", "/secure?token=".to_owned(), vec![]),
        (
            "not bearer",
            "/secure".to_owned(),
            vec![("Authorization", format!("Basic {good}"))],
        ),
        (
            "bad header token",
            "/secure".to_owned(),
            vec![("Authorization", bearer(&expired))],
        ),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(upgrade_status(addr, &path, &headers).await, 401, "{what}");
    }
    assert_eq!(
        upgrade_status(addr, &format!("/secure?token={good}"), &[]).await,
        101
    );
    assert!(node.locate("", "late").await.is_empty());
}

#[tokio::test]
async fn namespaces_claim_limits_the_namespaces_a_token_opens() {
    let node = hs_node().await;
    let addr = node.ws_addr;
    let token = hs256(&json!({"sub": "scoped", "namespaces": ["a", "b"], "exp": unix_now() + 600}));
    let one = hs256(&json!({"sub": "single", "namespaces": "a", "exp": unix_now() + 600}));
    let any = hs256(&json!({"sub": "wild", "namespaces": ["*"], "exp": unix_now() + 600}));
    assert_eq!(
        upgrade_status(addr, &format!("/secure?namespace=c&token={token}"), &[]).await,
        403
    );
    assert_eq!(
        upgrade_status(addr, &format!("/secure?token={token}"), &[]).await,
        403,
        "the default namespace is not granted either"
    );
    assert_eq!(
        upgrade_status(addr, &format!("/secure?namespace=b&token={one}"), &[]).await,
        403
    );
    let mut ok = node
        .ws(&format!("/secure?namespace=b&token={token}"), &[])
        .await;
    ok.roundtrip().await;
    node.wait_located("b", "scoped", 1).await;
    let mut single = node
        .ws(&format!("/secure?namespace=a&token={one}"), &[])
        .await;
    single.roundtrip().await;
    let mut wild = node
        .ws(&format!("/secure?namespace=zz&token={any}"), &[])
        .await;
    wild.roundtrip().await;
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403() {
    let listed = RouteConfig {
        allowed_origins: vec!["https://good.example".into()],
        ..route("/listed", hs_auth())
    };
    let same_origin = route("/same", hs_auth());
    let node = TestNode::start(config_with(vec![listed, same_origin])).await;
    let addr = node.ws_addr;
    let token = hs256(&claims("origin-user"));
    let listed = format!("/listed?token={token}");
    let same = format!("/same?token={token}");
    assert_eq!(
        upgrade_status(addr, &listed, &[("Origin", "https://evil.example")]).await,
        403
    );
    assert_eq!(
        upgrade_status(addr, &listed, &[("Origin", "https://good.example")]).await,
        101
    );
    assert_eq!(
        upgrade_status(addr, &listed, &[]).await,
        101,
        "no Origin: not a browser"
    );
    // No allow-list: only the same origin as the Host.
    assert_eq!(
        upgrade_status(addr, &same, &[("Origin", "https://evil.example")]).await,
        403
    );
    let own = format!("http://{addr}");
    assert_eq!(
        upgrade_status(addr, &same, &[("Origin", own.as_str())]).await,
        101
    );
    // A good origin does not stand in for the token.
    assert_eq!(
        upgrade_status(addr, "/listed", &[("Origin", "https://good.example")]).await,
        401
    );
}

#[tokio::test]
async fn unknown_paths_get_404() {
    let node = hs_node().await;
    let token = hs256(&claims("lost"));
    for path in ["/nope", "/secure/extra", "/", "/securex"] {
        assert_eq!(
            upgrade_status(node.ws_addr, &format!("{path}?token={token}"), &[]).await,
            404,
            "{path}"
        );
    }
}

#[tokio::test]
async fn claims_are_the_connection_context() {
    let node = hs_node().await;
    let claims = json!({
        "sub": "ctx-user",
        "role": "admin",
        "level": 5,
        "flags": {"beta": true},
        "exp": unix_now() + 600,
    });
    let token = hs256(&claims);
    let mut c = node
        .ws(
            "/secure?namespace=ctx",
            &[("Authorization", bearer(&token).as_str())],
        )
        .await;
    c.roundtrip().await;
    node.wait_located("ctx", "ctx-user", 1).await;
    let listed = node
        .list_all(ListConnectionsRequest {
            namespace: "ctx".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(listed.len(), 1);
    let context = listed[0]
        .context
        .as_ref()
        .expect("connection has a context");
    let got = Value::Object(
        context
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), proto::json::from_value(v)))
            .collect(),
    );
    assert_eq!(got, claims);

    // The same claims travel with the connection's events.
    let mut backend = node.subscribe(proto::subject::event("ctx", "hello")).await;
    c.send(json!({"type": "hello"})).await;
    let m = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut backend))
        .await
        .unwrap()
        .unwrap();
    let body: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(body["claims"], claims);
    assert_eq!(body["username"], "ctx-user");
}
