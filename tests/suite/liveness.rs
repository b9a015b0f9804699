//! Liveness: how fast placement learns that an edge stalled, left or came back, and what
//! backends are told meanwhile. Real `nats-server`, real binaries (SIGSTOP, SIGCONT, SIGTERM),
//! real WebSocket clients and gRPC calls, with the monitoring tap on `>` attached.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::*;
use proto::v1::{LocateRequest, LocateResponse};
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
