//! Liveness: how fast placement learns that an edge stalled, left or came back, and what
//! backends are told meanwhile. Real `nats-server`, real binaries (SIGSTOP, SIGCONT, SIGTERM),
//! real WebSocket clients and gRPC calls, with the monitoring tap on `>` attached.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::*;
use proto::v1::{DeliveryReport, LocateRequest, LocateResponse, PublishRequest};
use serde_json::json;
use tokio::time::Instant;

/// How soon a stalled edge must be left out of placement answers.
const STALL_BOUND: Duration = Duration::from_secs(4);

/// The whole Locate answer (connections and `complete`), `None` on any failure.
async fn locate(addr: SocketAddr, namespace: &str, user: &str) -> Option<LocateResponse> {
    let mut client = placement(addr).await.ok()?;
    let req = LocateRequest {
        namespace: namespace.into(),
        user: user.into(),
    };
    let answer = tokio::time::timeout(STEP, client.locate(req)).await.ok()?;
    answer.ok().map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_stalled_edge_is_suspect_within_seconds_and_whole_again_when_it_resumes() {
    let opts = Opts::default();
    let c = Cluster::start(2, 1, opts).await;
    let mut alice = c.client(0, "alice", "default").await;
    let mut bob = c.client(1, "bob", "default").await;
    c.wait_located(0, "default", "alice", 1).await;
    c.wait_located(0, "default", "bob", 1).await;
    let addr = c.grpc(0);

    c.edges[0].proc.pause().await;
    let paused = Instant::now();
    eventually(
        "Locate to leave out the stalled edge and say so",
        STALL_BOUND * 2,
        async || {
            let r = locate(addr, "default", "alice").await?;
            (r.connections.is_empty() && !r.complete).then_some(())
        },
    )
    .await;
    let took = paused.elapsed();
    eprintln!("a SIGSTOPped edge left placement answers after {took:?}");
    assert!(
        took <= STALL_BOUND,
        "suspect after {took:?}, bound {STALL_BOUND:?}"
    );

    // A send to a user on the suspect edge says at once that its fate is unknown.
    let asked = Instant::now();
    let r = send(addr, "default", "alice", "note", r#""while-suspect""#).await;
    assert_eq!(
        (r.delivered, r.unconfirmed.clone()),
        (0, vec!["e1".to_owned()]),
        "{r:?}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "took {:?}",
        asked.elapsed()
    );
    // The healthy edge is unaffected, and its answer is whole.
    let r = send(addr, "default", "bob", "note", r#""to-bob""#).await;
    assert_eq!((r.delivered, r.unconfirmed.len()), (1, 0), "{r:?}");
    assert_eq!(bob.recv().await["payload"], "to-bob");

    // Past the grace period the edge is forgotten: now nobody matching is connected as far
    // as placement knows, and a send says so (delivered 0, nothing unconfirmed).
    eventually(
        "the stalled edge to be forgotten",
        opts.edge_grace * 3,
        async || {
            let nodes = list_nodes(addr).await.ok()?;
            nodes.nodes.iter().all(|n| n.node_id != "e1").then_some(())
        },
    )
    .await;
    let r = send(addr, "default", "alice", "note", r#""forgotten""#).await;
    assert_eq!((r.delivered, r.unconfirmed.len()), (0, 0), "{r:?}");

    // It resumes, is asked for its whole state, and is whole again.
    c.edges[0].proc.resume().await;
    eventually("the resumed edge to be located again", STEP, async || {
        let r = locate(addr, "default", "alice").await?;
        (r.connections.len() == 1 && r.complete).then_some(())
    })
    .await;
    let r = send(addr, "default", "alice", "note", r#""after""#).await;
    assert_eq!((r.delivered, r.unconfirmed.len()), (1, 0), "{r:?}");
    // The send answered "delivered 0, nothing unconfirmed" never arrives; the one sent while
    // suspect may.
    loop {
        let frame = alice.recv().await;
        match frame["payload"].as_str() {
            Some("after") => break,
            Some("while-suspect") => {}
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

/// A stalled bus (nats-server SIGSTOPped: every connection stays open, nothing moves) holds
/// no Publish or Send past the request timeout, and neither answer claims what it could not
/// confirm. The calls are made at once, before the edge could be thought stalled itself.
#[tokio::test]
async fn a_stalled_bus_holds_no_answer_past_the_request_timeout() {
    let c = Cluster::start(1, 1, Opts::default()).await;
    let mut alice = c.client(0, "alice", "default").await;
    alice
        .send(json!({"type": "subscribe", "topic": "news"}))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "subscribed", "topic": "news"})
    );
    c.wait_located(0, "default", "alice", 1).await;
    settle_topic(&c, 0, "news", 1, &mut [&mut alice]).await;
    let addr = c.grpc(0);
    let mut messaging = messaging(addr).await;
    // The coordinator's request timeout in these clusters, and what an answer may add to it.
    let bound = Duration::from_secs(2) + Duration::from_millis(500);

    // Both at once, before the stalled bus makes the edge look stalled too (its reports
    // stop): a Send waits for the edge's answer, a Publish first registers its reply inbox.
    c.nats.pause().await;
    let asked = Instant::now();
    let publication = PublishRequest {
        namespace: "default".into(),
        topic: "news".into(),
        payload_json: r#""while-stalled""#.into(),
        ..PublishRequest::default()
    };
    let note = send_req("default", "alice", "note", r#""while-stalled""#);
    let (mut m1, mut m2) = (messaging.clone(), messaging.clone());
    let ((published, publish_took), (sent, send_took)) = tokio::join!(
        async {
            let answer = tokio::time::timeout(3 * bound, m1.publish(publication)).await;
            (answer, asked.elapsed())
        },
        async {
            let answer = tokio::time::timeout(3 * bound, m2.send(note)).await;
            (answer, asked.elapsed())
        },
    );
    // "Nothing was sent" (Unavailable) or "unknown for e1": either is true.
    let unknown =
        |answer: Option<Result<tonic::Response<DeliveryReport>, tonic::Status>>, what| match answer
            .unwrap_or_else(|| panic!("{what} unanswered while the bus stalled"))
        {
            Ok(r) => {
                let r = r.into_inner();
                assert_eq!(
                    (r.delivered, r.unconfirmed.clone()),
                    (0, vec!["e1".to_owned()]),
                    "{what}: {r:?}"
                );
                true
            }
            Err(status) => {
                assert_eq!(
                    status.code(),
                    tonic::Code::Unavailable,
                    "{what}: {status:?}"
                );
                false
            }
        };
    let publication_may_arrive = unknown(published.ok(), "Publish");
    unknown(sent.ok(), "Send");
    eprintln!(
        "on a stalled bus: Publish answered in {publish_took:?} (may arrive: \
         {publication_may_arrive}), Send in {send_took:?}"
    );
    assert!(
        publish_took <= bound,
        "Publish answered after {publish_took:?}"
    );
    assert!(send_took <= bound, "Send answered after {send_took:?}");

    // Whole again once the bus moves: a Send reaches alice. Before it, at most the Send that
    // was unconfirmed, and the publication only if its answer allowed it (the coordinator's
    // sends reach the edge in order).
    c.nats.resume().await;
    let mut attempt = 0;
    let last = eventually("a Send to reach alice again", STEP, async || {
        attempt += 1;
        let payload = format!("after-{attempt}");
        let note = send_req("default", "alice", "note", &json!(payload).to_string());
        let r = messaging.send(note).await.ok()?.into_inner();
        (r.delivered == 1).then_some(payload)
    })
    .await;
    loop {
        let frame = alice.recv().await;
        match (frame["type"].as_str(), frame["payload"].as_str()) {
            (Some("note"), Some(p)) if p == last => break,
            (Some("note"), Some(p)) if p.starts_with("after-") || p == "while-stalled" => {}
            (Some("message"), Some("while-stalled")) if publication_may_arrive => {}
            _ => panic!("unexpected frame {frame}"),
        }
    }
    settle_topic(&c, 0, "news", 1, &mut [&mut alice]).await;
}

#[tokio::test]
async fn a_terminated_edge_leaves_placement_as_soon_as_it_has_drained() {
    // A grace period far longer than the bound: only the edge's leaving batch can explain a
    // prompt exit from placement.
    let opts = Opts {
        edge_grace: Duration::from_secs(60),
        ..Opts::default()
    };
    let mut c = Cluster::start(2, 2, opts).await;
    let _alice = c.client(1, "alice", "default").await;
    c.wait_located(0, "default", "alice", 1).await;
    c.wait_located(1, "default", "alice", 1).await;

    c.edges[1].proc.terminate().await;
    c.edges[1].proc.wait().await;
    let exited = Instant::now();
    let grpc: Vec<SocketAddr> = c.coords.iter().map(|k| k.grpc).collect();
    eventually(
        "every coordinator to forget the edge that left",
        STEP,
        async || {
            for &addr in &grpc {
                let nodes = list_nodes(addr).await.ok()?;
                let r = locate(addr, "default", "alice").await?;
                let gone = nodes.nodes.iter().all(|n| n.node_id != "e2")
                    && r.connections.is_empty()
                    && r.complete;
                gone.then_some(())?;
            }
            Some(())
        },
    )
    .await;
    let took = exited.elapsed();
    eprintln!("a drained edge left placement {took:?} after it exited");
    assert!(took < Duration::from_secs(1), "left after {took:?}");
}

#[tokio::test]
async fn a_new_coordinator_never_answers_nobody_for_edges_it_has_not_heard_from() {
    let mut c = Cluster::start(2, 1, Opts::default()).await;
    let mut alice = c.client(0, "alice", "default").await;
    let mut bob = c.client(1, "bob", "default").await;
    for w in [&mut alice, &mut bob] {
        w.send(serde_json::json!({"type": "subscribe", "topic": "news"}))
            .await;
        w.recv_type("subscribed").await;
    }
    c.wait_located(0, "default", "alice", 1).await;
    c.wait_located(0, "default", "bob", 1).await;
    settle_topic(&c, 0, "news", 2, &mut [&mut alice, &mut bob]).await;

    // A coordinator joins (a scale-out, or a restart) and is asked at once, before the
    // edges' report streams reach it: it knows the edges only from its census of the bus.
    let new = c.add_coordinator("c2").await;
    let addr = c.grpc(new);
    let r = broadcast(
        addr,
        proto::v1::BroadcastRequest {
            r#type: "bc".into(),
            payload_json: "1".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(
        r.delivered == 2 || !r.unconfirmed.is_empty(),
        "Broadcast: {r:?}"
    );
    let r = publish(addr, "default", "news", "2").await;
    assert!(
        r.delivered == 2 || !r.unconfirmed.is_empty(),
        "Publish: {r:?}"
    );
    for user in ["alice", "bob"] {
        let r = send(addr, "default", user, "note", "3").await;
        assert!(
            r.delivered == 1 || !r.unconfirmed.is_empty(),
            "Send to {user}: {r:?}"
        );
        let l = locate(addr, "default", user).await.expect("Locate answers");
        assert!(
            l.connections.len() == 1 || !l.complete,
            "Locate {user}: {l:?}"
        );
    }
    // Whatever the answers said, everything was delivered, once.
    for w in [&mut alice, &mut bob] {
        assert_eq!(w.recv_type("bc").await["payload"], 1);
        assert_eq!(w.recv_type("message").await["payload"], 2);
        assert_eq!(w.recv_type("note").await["payload"], 3);
    }
    // And once the edges report to it, its answers are whole.
    eventually(
        "the new coordinator to hold its whole share",
        STEP,
        async || {
            let l = locate(addr, "default", "alice").await?;
            (l.connections.len() == 1 && l.complete).then_some(())
        },
    )
    .await;
    let r = send(addr, "default", "bob", "note", "4").await;
    assert_eq!((r.delivered, r.unconfirmed.len()), (1, 0), "{r:?}");
}
