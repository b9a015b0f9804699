//! Cluster behaviour: a real `nats-server` on a free port (`bus::testkit::TestNats`), three
//! edges and two coordinators run as the real `switchboard` binary (so that they can be
//! SIGKILLed), driven only through what clients, backends and operators use: WebSockets, the
//! gRPC services, `/readyz` and `/metrics`, `grpcurl`, and the NATS server's own monitoring
//! (`/connz`) and subjects.
//!
//! Every listener is bound to port 0 and found through the banner a process prints; every wait
//! is a bounded poll or a bounded wait for a frame, a line or a message; every child process
//! is killed when its guard drops, also when an assertion fails (the tail of its output is then
//! printed with the failure). `nats-server` and `grpcurl` must be on `PATH`: `scripts/test`
//! installs them. Without them the tests fail; they never skip.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use crate::harness::*;
use bus::{Bus as _, Outgoing};
use futures::StreamExt as _;
use proto::v1::{BroadcastRequest, PresenceRequest, StatsRequest};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

// ---------------------------------------------------------------------------------------
// 1. Send reaches only the edges that hold the user.

#[tokio::test]
async fn send_reaches_only_the_edges_holding_the_user() {
    let c = Cluster::start(3, 2, Opts::default()).await;
    let mut alice1 = c.client(0, "alice", "default").await;
    let mut alice2 = c.client(1, "alice", "default").await;
    let mut bob3 = c.client(2, "bob", "default").await;
    let conns = c.wait_located(0, "default", "alice", 2).await;
    assert_eq!(node_ids(&conns), BTreeSet::from(["e1".into(), "e2".into()]));
    c.wait_located(1, "default", "alice", 2).await;
    c.wait_located(0, "default", "bob", 1).await;

    let observer = c.observer().await;
    let mut node_msgs = observer.subscribe("sb.node.>".into(), None).await.unwrap();

    // Through each coordinator in turn: at least one of them is not the key's owner and
    // forwards.
    for (round, coord) in [0, 1].into_iter().enumerate() {
        let before = c.connz().await;
        let mut delivered_before = Vec::new();
        for e in 0..3 {
            delivered_before.push(c.edge_metric(e, "edge_messages_delivered_total").await);
        }

        let payload = json!({"round": round}).to_string();
        let report = send(c.grpc(coord), "default", "alice", "note", &payload).await;
        assert_eq!(
            (report.delivered, report.refused, report.nodes),
            (2, 0, 2),
            "Send through {}: {report:?}",
            c.coords[coord].id
        );
        let want = json!({"type": "note", "payload": {"round": round}});
        assert_eq!(alice1.recv().await, want);
        assert_eq!(alice2.recv().await, want);
        bob3.roundtrip().await;

        // The send travelled on the subjects of e1 and e2, once each, and on no other
        // node subject.
        let marker = format!("sb.node.marker-{}", ulid::Ulid::new());
        observer
            .publish(Outgoing::new(marker.clone(), Vec::new()))
            .await
            .unwrap();
        let mut subjects = subjects_until(&mut node_msgs, &marker).await;
        subjects.sort();
        assert_eq!(subjects, ["sb.node.e1", "sb.node.e2"], "round {round}");

        // The NATS server delivered nothing to e3 but coordinator announcements; e1 and e2
        // got exactly one message on their node subject.
        let after = c.connz().await;
        let (e3_before, e3_after) = (
            sub_counts(connection(&before, "e3")),
            sub_counts(connection(&after, "e3")),
        );
        assert!(
            e3_after.contains_key("sb.node.e3"),
            "e3 has no subscription on its node subject: {e3_after:?}"
        );
        for (subject, n) in &e3_after {
            if subject == "sb.coord.announce" {
                continue;
            }
            assert_eq!(
                e3_before.get(subject).copied().unwrap_or(0),
                *n,
                "e3 received a NATS message on {subject} because of a send to others"
            );
        }
        for e in ["e1", "e2"] {
            let subject = format!("sb.node.{e}");
            let grew = sub_counts(connection(&after, e))[&subject]
                - sub_counts(connection(&before, e))[&subject];
            assert_eq!(grew, 1, "{e} got {grew} messages on {subject} for one send");
        }
        // And the edges' own counters agree.
        for (e, want) in [(0, 1), (1, 1), (2, 0)] {
            let now = c.edge_metric(e, "edge_messages_delivered_total").await;
            assert_eq!(
                now - delivered_before[e],
                want,
                "edge_messages_delivered_total of {}",
                c.edges[e].id
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. The same user name in two namespaces.

#[tokio::test]
async fn same_user_in_two_namespaces_stays_isolated() {
    let c = Cluster::start(3, 2, Opts::default()).await;
    let mut a1 = c.client(0, "alice", "team-a").await;
    let mut b2 = c.client(1, "alice", "team-b").await;
    let mut a3 = c.client(2, "alice", "team-a").await;
    let in_a = c.wait_located(0, "team-a", "alice", 2).await;
    assert_eq!(node_ids(&in_a), BTreeSet::from(["e1".into(), "e3".into()]));
    let in_b = c.wait_located(1, "team-b", "alice", 1).await;
    assert_eq!(node_ids(&in_b), BTreeSet::from(["e2".into()]));
    for coord in [0, 1] {
        c.wait_located(coord, "", "alice", 3).await;
    }

    let r = send(c.grpc(1), "team-a", "alice", "only-a", "1").await;
    assert_eq!((r.delivered, r.nodes), (2, 2), "{r:?}");
    let want = json!({"type": "only-a", "payload": 1});
    assert_eq!(a1.recv().await, want);
    assert_eq!(a3.recv().await, want);
    b2.roundtrip().await;

    let r = send(c.grpc(0), "team-b", "alice", "only-b", "2").await;
    assert_eq!((r.delivered, r.nodes), (1, 1), "{r:?}");
    assert_eq!(b2.recv().await, json!({"type": "only-b", "payload": 2}));
    a1.roundtrip().await;
    a3.roundtrip().await;

    let r = send(c.grpc(0), "team-c", "alice", "nobody", "3").await;
    assert_eq!(r.delivered, 0, "a namespace alice is not in: {r:?}");

    // No namespace: every socket of alice, whatever its namespace, through either coordinator.
    for (coord, n) in [(0, 4), (1, 5)] {
        let r = send(c.grpc(coord), "", "alice", "everywhere", &n.to_string()).await;
        assert_eq!((r.delivered, r.nodes), (3, 3), "{r:?}");
        let want = json!({"type": "everywhere", "payload": n});
        for client in [&mut a1, &mut b2, &mut a3] {
            assert_eq!(client.recv().await, want, "{}", client.name);
        }
    }
    for client in [&mut a1, &mut b2, &mut a3] {
        client.roundtrip().await;
    }
}

// ---------------------------------------------------------------------------------------
// 3. Broadcast with a namespace and a skip list.

#[tokio::test]
async fn broadcast_with_namespace_and_skip_list_reaches_exactly_the_rest() {
    let c = Cluster::start(3, 2, Opts::default()).await;
    let mut u1 = c.client(0, "u1", "room").await;
    let mut u2a = c.client(0, "u2", "room").await;
    let mut x1 = c.client(0, "x1", "hall").await;
    let mut u3 = c.client(1, "u3", "room").await;
    let mut u2b = c.client(1, "u2", "room").await;
    let mut u4 = c.client(2, "u4", "room").await;
    let mut u5 = c.client(2, "u5", "room").await;
    // u5 holds a second socket, in the same namespace, on e1: only the skipped conn id misses.
    let mut u5b = c.client(0, "u5", "room").await;
    for (user, n) in [("u1", 1), ("u2", 2), ("u3", 1), ("u4", 1)] {
        c.wait_located(0, "room", user, n).await;
    }
    c.wait_located(0, "hall", "x1", 1).await;
    let u5_conns = c.wait_located(1, "room", "u5", 2).await;
    let skipped = u5_conns
        .iter()
        .find(|conn| conn.node_id == "e3")
        .expect("u5 has a connection on e3")
        .conn_id
        .clone();

    let r = broadcast(
        c.grpc(1),
        BroadcastRequest {
            namespace: "room".into(),
            r#type: "bc".into(),
            payload_json: r#"{"n":1}"#.into(),
            skip_users: vec!["u2".into()],
            skip_conn_ids: vec![skipped],
            ..BroadcastRequest::default()
        },
    )
    .await;
    // u1 (e1), u3 (e2), u4 (e3) and u5's socket on e1.
    assert_eq!((r.delivered, r.refused, r.nodes), (4, 0, 3), "{r:?}");
    let want = json!({"type": "bc", "payload": {"n": 1}});
    for client in [&mut u1, &mut u3, &mut u4, &mut u5b] {
        assert_eq!(client.recv().await, want, "{}", client.name);
    }
    for client in [&mut u2a, &mut u2b, &mut u5, &mut x1] {
        client.roundtrip().await;
    }

    // Without a namespace or a skip list: every socket on every edge.
    let r = broadcast(
        c.grpc(0),
        BroadcastRequest {
            r#type: "all".into(),
            payload_json: "2".into(),
            ..BroadcastRequest::default()
        },
    )
    .await;
    assert_eq!((r.delivered, r.nodes), (8, 3), "{r:?}");
    let want = json!({"type": "all", "payload": 2});
    for client in [
        &mut u1, &mut u2a, &mut x1, &mut u3, &mut u2b, &mut u4, &mut u5, &mut u5b,
    ] {
        assert_eq!(client.recv().await, want, "{}", client.name);
        client.roundtrip().await;
    }
}

// ---------------------------------------------------------------------------------------
// 4. Topic publications reach only the edges with a watcher.

#[tokio::test]
async fn topic_publish_reaches_only_edges_with_watchers() {
    let c = Cluster::start(3, 2, Opts::default()).await;
    let mut watcher = c.client(0, "w", "default").await;
    let mut idle2 = c.client(1, "i2", "default").await;
    let mut idle3 = c.client(2, "i3", "default").await;
    watcher
        .send(json!({"type": "subscribe", "topic": "news/+"}))
        .await;
    assert_eq!(
        watcher.recv().await,
        json!({"type": "subscribed", "topic": "news/+"})
    );

    let observer = c.observer().await;
    let mut topic_msgs = observer.subscribe("sb.topic.>".into(), None).await.unwrap();

    // Placement learns about e1's watcher asynchronously, on each coordinator.
    for coord in [0, 1] {
        settle_topic(&c, coord, "news/probe", 1, &mut [&mut watcher]).await;
    }

    for coord in [0, 1] {
        let payload = json!({"headline": coord}).to_string();
        let r = publish(c.grpc(coord), "default", "news/1", &payload).await;
        assert_eq!(
            (r.delivered, r.refused, r.nodes),
            (1, 0, 1),
            "Publish through {}: {r:?}",
            c.coords[coord].id
        );
        assert_eq!(
            watcher.recv().await,
            json!({"type": "message", "topic": "news/1", "payload": {"headline": coord}})
        );
        // The publication travelled on the topic's subject.
        let m = bounded("the publication on sb.topic.>", async {
            loop {
                let m = topic_msgs.next().await.expect("subscription ended");
                if m.subject != "sb.topic.default.news.probe" {
                    return m;
                }
            }
        })
        .await;
        assert_eq!(m.subject, "sb.topic.default.news.1");
        let body: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body, json!({"headline": coord}));
    }
    idle2.roundtrip().await;
    idle3.roundtrip().await;

    // Only e1 subscribed to the topic's subject on the NATS server.
    let connz = c.connz().await;
    let topic_subs = |edge: &str| -> Vec<String> {
        sub_counts(connection(&connz, edge))
            .into_keys()
            .filter(|s| s.starts_with("sb.topic."))
            .collect()
    };
    assert_eq!(topic_subs("e1"), ["sb.topic.default.news.*"]);
    assert!(topic_subs("e2").is_empty(), "e2: {:?}", topic_subs("e2"));
    assert!(topic_subs("e3").is_empty(), "e3: {:?}", topic_subs("e3"));

    // A backend publishing straight on NATS reaches the watcher too.
    observer
        .publish(Outgoing::new(
            "sb.topic.default.news.2",
            r#"{"direct":true}"#,
        ))
        .await
        .unwrap();
    assert_eq!(
        watcher.recv().await,
        json!({"type": "message", "topic": "news/2", "payload": {"direct": true}})
    );
    idle2.roundtrip().await;
    idle3.roundtrip().await;
    watcher.roundtrip().await;

    // The last local watcher leaves: e1 drops its NATS subscription.
    watcher
        .send(json!({"type": "unsubscribe", "topic": "news/+"}))
        .await;
    assert_eq!(
        watcher.recv().await,
        json!({"type": "unsubscribed", "topic": "news/+"})
    );
    let mut last = Vec::new();
    let dropped = poll_for(STEP, async || {
        let connz = c.connz().await;
        last = sub_counts(connection(&connz, "e1"))
            .into_keys()
            .filter(|s| s.starts_with("sb.topic."))
            .collect();
        last.is_empty().then_some(())
    })
    .await;
    assert!(
        dropped.is_some(),
        "e1 kept its topic subscriptions after its last watcher left: {last:?}"
    );
    observer
        .publish(Outgoing::new("sb.topic.default.news.3", "3"))
        .await
        .unwrap();
    watcher.roundtrip().await;
}

// ---------------------------------------------------------------------------------------
// 5. An edge dies without warning.

#[tokio::test]
async fn killed_edge_leaves_placement_within_the_grace_period() {
    let opts = Opts::default();
    // The reaper runs every grace/4; a margin covers process exit and RPC latency.
    let bound = opts.edge_grace * 3;
    let mut c = Cluster::start(3, 2, opts).await;
    let _alice1 = c.client(0, "alice", "default").await;
    let _alice3 = c.client(2, "alice", "default").await;
    let _bob3 = c.client(2, "bob", "default").await;
    let mut carol2 = c.client(1, "carol", "default").await;
    c.wait_located(0, "default", "alice", 2).await;
    c.wait_located(1, "default", "bob", 1).await;
    c.wait_located(0, "default", "carol", 1).await;

    c.edges[2].proc.kill().await;
    let killed = Instant::now();
    let grpc: Vec<SocketAddr> = c.coords.iter().map(|k| k.grpc).collect();
    eventually(
        "e3 and its connections to leave every answer of every coordinator",
        bound,
        async || {
            for &addr in &grpc {
                let alice = try_locate(addr, "default", "alice").await.ok()?;
                let bob = try_locate(addr, "default", "bob").await.ok()?;
                let carol = try_locate(addr, "default", "carol").await.ok()?;
                let everywhere = try_locate(addr, "", "bob").await.ok()?;
                let nodes = list_nodes(addr).await.ok()?;
                let mut client = placement(addr).await.ok()?;
                let stats = client.stats(StatsRequest {}).await.ok()?.into_inner();
                let presence = client
                    .presence(PresenceRequest {
                        namespace: "default".into(),
                        topic: String::new(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                let gone = node_ids(&alice) == BTreeSet::from(["e1".into()])
                    && bob.is_empty()
                    && everywhere.is_empty()
                    && carol.len() == 1
                    && nodes.nodes.iter().all(|n| n.node_id != "e3")
                    && nodes.nodes.len() == 2
                    && stats.connections == 2
                    && !stats.by_node.contains_key("e3")
                    && presence.users == ["alice", "carol"];
                if !gone {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let took = killed.elapsed();
    eprintln!(
        "placement dropped the SIGKILLed edge after {took:?} (grace {:?}, bound {bound:?})",
        opts.edge_grace
    );

    // Nothing else is affected.
    let r = send(c.grpc(0), "default", "carol", "still", "1").await;
    assert_eq!((r.delivered, r.nodes), (1, 1), "{r:?}");
    assert_eq!(carol2.recv().await, json!({"type": "still", "payload": 1}));
}

/// An edge that dies without warning affects nothing else. While it is suspect
/// (its entries kept for the grace period), a Broadcast or a Publish must not wait for its
/// answer until the request timeout.
#[tokio::test]
async fn dead_edge_within_its_grace_period_does_not_stall_broadcast_or_publish() {
    /// `coordinator.request_timeout` of the cluster; a prompt answer takes far less.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
    const PROMPT: Duration = Duration::from_secs(1);
    // A long grace: the dead edge stays suspect for the whole test.
    let opts = Opts {
        edge_grace: Duration::from_secs(60),
        ..Opts::default()
    };
    let mut c = Cluster::start(3, 2, opts).await;
    let mut a1 = c.client(0, "a", "default").await;
    let mut b2 = c.client(1, "b", "default").await;
    let mut d3 = c.client(2, "d", "default").await;
    for w in [&mut a1, &mut d3] {
        w.send(json!({"type": "subscribe", "topic": "news/+"}))
            .await;
        assert_eq!(
            w.recv().await,
            json!({"type": "subscribed", "topic": "news/+"})
        );
    }
    for coord in [0, 1] {
        settle_topic(&c, coord, "news/probe", 2, &mut [&mut a1, &mut d3]).await;
    }
    for user in ["a", "b", "d"] {
        c.wait_located(0, "default", user, 1).await;
    }

    c.edges[2].proc.kill().await;
    drop(d3);
    for k in &c.coords {
        eventually(
            &format!("{} to notice that e3's report stream broke", k.id),
            STEP,
            async || {
                let (_, text) = http_get(k.http, "/metrics").await.ok()?;
                let suspect = metric(&text, "coordinator_edges_suspect")?;
                let edges = metric(&text, "coordinator_edges")?;
                (suspect == 1 || edges == 2).then_some(())
            },
        )
        .await;
    }

    for coord in [0, 1] {
        let id = &c.coords[coord].id;
        let t = Instant::now();
        let r = broadcast(
            c.grpc(coord),
            BroadcastRequest {
                r#type: "bc".into(),
                payload_json: coord.to_string(),
                ..BroadcastRequest::default()
            },
        )
        .await;
        let took = t.elapsed();
        // The dead edge may have held someone: the caller is told its part is unknown.
        assert_eq!(
            (r.delivered, r.nodes, r.unconfirmed.clone()),
            (2, 2, vec!["e3".to_owned()]),
            "Broadcast through {id}: {r:?}"
        );
        let want = json!({"type": "bc", "payload": coord});
        assert_eq!(a1.recv().await, want);
        assert_eq!(b2.recv().await, want);
        assert!(
            took < PROMPT,
            "Broadcast through {id} took {took:?} while e3 was dead (request timeout \
             {REQUEST_TIMEOUT:?}): it waits for the answer of an edge whose report stream is broken"
        );

        let t = Instant::now();
        let r = publish(c.grpc(coord), "default", "news/1", &coord.to_string()).await;
        let took = t.elapsed();
        assert_eq!(
            (r.delivered, r.nodes, r.unconfirmed.clone()),
            (1, 1, vec!["e3".to_owned()]),
            "Publish through {id}: {r:?}"
        );
        assert_eq!(
            a1.recv().await,
            json!({"type": "message", "topic": "news/1", "payload": coord})
        );
        assert!(
            took < PROMPT,
            "Publish through {id} took {took:?} while e3, which watched the topic, was dead \
             (request timeout {REQUEST_TIMEOUT:?}): it waits for the answer of an edge whose \
             report stream is broken"
        );

        // A send to the user on the dead edge: unknown at once, not "nobody there".
        let t = Instant::now();
        let r = send(c.grpc(coord), "default", "d", "note", "1").await;
        assert_eq!(
            (r.delivered, r.unconfirmed.clone()),
            (0, vec!["e3".to_owned()]),
            "Send through {id}: {r:?}"
        );
        assert!(
            t.elapsed() < PROMPT,
            "Send through {id} took {:?}",
            t.elapsed()
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. A coordinator dies without warning.

#[tokio::test]
async fn killed_coordinator_leaves_locate_complete_within_bound() {
    /// How long placement may take to be whole again through the survivor.
    const BOUND: Duration = Duration::from_secs(10);
    let mut c = Cluster::start(3, 2, Opts::default()).await;
    let users: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    let mut clients = Vec::new();
    for (i, user) in users.iter().enumerate() {
        clients.push(c.client(i % 3, user, "default").await);
    }
    let mut conn_of = BTreeMap::new();
    for (i, user) in users.iter().enumerate() {
        let conns = c.wait_located(i % 2, "default", user, 1).await;
        assert_eq!(conns[0].node_id, format!("e{}", i % 3 + 1));
        conn_of.insert(user.clone(), conns[0].conn_id.clone());
    }

    // Kill the coordinator that owns the most keys (it must own some).
    let mut entries = Vec::new();
    for k in &c.coords {
        let (_, text) = http_get(k.http, "/metrics").await.unwrap();
        entries.push(metric(&text, "coordinator_placement_entries").unwrap());
    }
    assert_eq!(
        entries.iter().sum::<u64>(),
        12,
        "placement entries {entries:?}"
    );
    let victim = usize::from(entries[1] > entries[0]);
    let survivor = 1 - victim;
    assert!(entries[victim] > 0, "placement entries {entries:?}");
    c.coords[victim].proc.kill().await;
    let killed = Instant::now();

    let addr = c.grpc(survivor);
    let mut missing = Vec::new();
    let whole = poll_for(BOUND, async || {
        missing.clear();
        for user in &users {
            let found = try_locate(addr, "default", user).await.unwrap_or_default();
            if found.len() != 1 || found[0].conn_id != conn_of[user] {
                missing.push(user.clone());
            }
        }
        missing.is_empty().then_some(())
    })
    .await;
    let took = killed.elapsed();
    assert!(
        whole.is_some(),
        "Locate through {} still missing {missing:?} {BOUND:?} after {} was killed",
        c.coords[survivor].id,
        c.coords[victim].id
    );
    eprintln!(
        "Locate was complete again through {} {took:?} after SIGKILL of {} (owned {} of 12 keys; bound {BOUND:?})",
        c.coords[survivor].id, c.coords[victim].id, entries[victim]
    );

    // The ring has dropped the dead coordinator, and sends reach every user again.
    let survivor_id = c.coords[survivor].id.clone();
    eventually("the ring to drop the dead coordinator", BOUND, async || {
        let nodes = list_nodes(addr).await.ok()?;
        let ids: Vec<&str> = nodes
            .coordinators
            .iter()
            .map(|k| k.node_id.as_str())
            .collect();
        (ids == [survivor_id.as_str()]).then_some(())
    })
    .await;
    for (user, client) in users.iter().zip(&mut clients) {
        let r = send(addr, "default", user, "after", r#""kill""#).await;
        assert_eq!((r.delivered, r.nodes), (1, 1), "Send to {user}: {r:?}");
        assert_eq!(
            client.recv().await,
            json!({"type": "after", "payload": "kill"})
        );
    }
}

// ---------------------------------------------------------------------------------------
// 7. The NATS server goes away and comes back.

#[tokio::test]
async fn nats_restart_keeps_sockets_and_delivery_recovers() {
    /// How long delivery may take to work again after the server is back (the NATS clients
    /// reconnect with a backoff of up to 4 s).
    const RECOVERY: Duration = Duration::from_secs(12);
    let opts = Opts::default();
    // Longer than the membership timeout, so that no process may take the silence of the
    // others during its own outage for their death.
    let outage = opts.member_timeout * 5 / 2;
    let mut c = Cluster::start(3, 2, opts).await;
    let mut alice = c.client(0, "alice", "default").await;
    let mut bob = c.client(2, "bob", "default").await;
    bob.send(json!({"type": "subscribe", "topic": "alerts/+"}))
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type": "subscribed", "topic": "alerts/+"})
    );
    c.wait_located(0, "default", "alice", 1).await;
    c.wait_located(1, "default", "bob", 1).await;
    let r = send(c.grpc(1), "default", "alice", "before", "0").await;
    assert_eq!(r.delivered, 1, "{r:?}");
    assert_eq!(alice.recv().await, json!({"type": "before", "payload": 0}));

    c.nats.kill().await;
    let down = Instant::now();
    for e in &c.edges {
        wait_http_status(
            &format!("{} during the outage", e.id),
            e.ws,
            "/readyz",
            503,
            STEP,
        )
        .await;
    }
    for k in &c.coords {
        wait_http_status(
            &format!("{} during the outage", k.id),
            k.http,
            "/readyz",
            503,
            STEP,
        )
        .await;
    }
    // The sockets stay open and served for the whole outage (pings paced well under the
    // route's rate limit).
    let mut pace = tokio::time::interval(Duration::from_millis(250));
    while down.elapsed() < outage {
        pace.tick().await;
        alice.roundtrip().await;
        bob.roundtrip().await;
    }

    c.nats.restart().await;
    let restarted = Instant::now();
    for e in &c.edges {
        wait_http_status(
            &format!("{} after the restart", e.id),
            e.ws,
            "/readyz",
            200,
            RECOVERY,
        )
        .await;
    }
    let ready_after = restarted.elapsed();
    // Sends that were lost while subscriptions came back may or may not have arrived; the
    // first one reported delivered must arrive, after any earlier ones.
    let mut attempt = 0u32;
    let first = eventually("a Send to be delivered again", RECOVERY, async || {
        attempt += 1;
        let r = send(c.grpc(0), "default", "alice", "after", &attempt.to_string()).await;
        (r.delivered == 1).then_some(attempt)
    })
    .await;
    loop {
        let v = alice.recv().await;
        assert_eq!(v["type"], "after", "unexpected frame {v}");
        if v["payload"] == first {
            break;
        }
    }
    let delivered_after = restarted.elapsed();
    // The topic subscription made before the outage works again, the same way.
    settle_topic(&c, 1, "alerts/1", 1, &mut [&mut bob]).await;
    eprintln!(
        "NATS down for {:?}; after the restart: edges ready in {ready_after:?}, send delivered \
         in {delivered_after:?}, publish in {:?}",
        restarted.duration_since(down),
        restarted.elapsed()
    );

    // The cluster is whole again through either coordinator.
    for coord in [0, 1] {
        let nodes = list_nodes(c.grpc(coord)).await.unwrap();
        assert_eq!(nodes.coordinators.len(), 2, "{nodes:?}");
        assert_eq!(nodes.nodes.len(), 3, "{nodes:?}");
        c.wait_located(coord, "default", "alice", 1).await;
        c.wait_located(coord, "default", "bob", 1).await;
        let r = send(c.grpc(coord), "default", "bob", "whole", "1").await;
        assert_eq!(r.delivered, 1, "{r:?}");
        assert_eq!(bob.recv().await, json!({"type": "whole", "payload": 1}));
    }
    alice.roundtrip().await;
    bob.roundtrip().await;
}

// ---------------------------------------------------------------------------------------
// 8. grpcurl against a cluster coordinator, with no .proto files.

/// `grpcurl -d BODY ADDR METHOD`, its JSON answer.
async fn grpcurl_call(addr: &str, method: &str, body: &Value) -> Value {
    grpcurl_json(&["-d", &body.to_string(), addr, method]).await
}

/// A field of grpcurl's JSON, under its JSON name or its proto name.
fn field<'a>(v: &'a Value, json_name: &str, proto_name: &str) -> &'a Value {
    match &v[json_name] {
        Value::Null => &v[proto_name],
        found => found,
    }
}

/// A uint64 as grpcurl prints it (a string), or 0 when omitted as the default.
fn uint64(v: &Value) -> u64 {
    match v {
        Value::Null => 0,
        Value::String(s) => s.parse().unwrap_or_else(|e| panic!("uint64 {s:?}: {e}")),
        other => other
            .as_u64()
            .unwrap_or_else(|| panic!("not a uint64: {other}")),
    }
}

#[tokio::test]
async fn grpcurl_reaches_every_service_of_a_cluster_coordinator() {
    let c = Cluster::start(3, 2, Opts::default()).await;
    let addr = c.grpc(0).to_string();
    let mut alice = c.client(0, "alice", "default").await;
    let mut bob = c.client(1, "bob", "default").await;
    let mut dave = c.client(2, "dave", "default").await;
    for user in ["alice", "bob", "dave"] {
        c.wait_located(0, "default", user, 1).await;
    }
    bob.send(json!({"type": "subscribe", "topic": "news/+"}))
        .await;
    assert_eq!(
        bob.recv().await,
        json!({"type": "subscribed", "topic": "news/+"})
    );

    let list = grpcurl(&[&addr, "list"]).await;
    let services: BTreeSet<&str> = list.lines().map(str::trim).collect();
    for s in [
        "switchboard.v1.Messaging",
        "switchboard.v1.Placement",
        "switchboard.v1.EdgeReport",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(s), "`grpcurl list` lacks {s}:\n{list}");
    }
    let health = grpcurl_call(&addr, "grpc.health.v1.Health/Check", &json!({})).await;
    assert_eq!(health, json!({"status": "SERVING"}));

    let nodes = grpcurl_call(&addr, "switchboard.v1.Placement/ListNodes", &json!({})).await;
    let ids: BTreeSet<&str> = nodes["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("ListNodes: {nodes}"))
        .iter()
        .map(|n| field(n, "nodeId", "node_id").as_str().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from(["e1", "e2", "e3"]), "{nodes}");
    let coords: BTreeSet<&str> = nodes["coordinators"]
        .as_array()
        .unwrap_or_else(|| panic!("ListNodes: {nodes}"))
        .iter()
        .map(|n| field(n, "nodeId", "node_id").as_str().unwrap())
        .collect();
    assert_eq!(coords, BTreeSet::from(["c1", "c2"]), "{nodes}");

    let stats = grpcurl_call(&addr, "switchboard.v1.Placement/Stats", &json!({})).await;
    assert_eq!(uint64(&stats["connections"]), 3, "{stats}");
    assert_eq!(stats["nodes"], 3, "{stats}");
    assert_eq!(stats["coordinators"], 2, "{stats}");
    assert_eq!(stats["complete"], true, "{stats}");
    assert_eq!(
        uint64(&field(&stats, "byNamespace", "by_namespace")["default"]),
        3,
        "{stats}"
    );

    let presence = grpcurl_call(
        &addr,
        "switchboard.v1.Placement/Presence",
        &json!({"namespace": "default"}),
    )
    .await;
    assert_eq!(
        presence,
        json!({"users": ["alice", "bob", "dave"], "complete": true})
    );

    let located = grpcurl_call(
        &addr,
        "switchboard.v1.Placement/Locate",
        &json!({"namespace": "default", "user": "alice"}),
    )
    .await;
    let conns = located["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("Locate: {located}"));
    assert_eq!(conns.len(), 1, "{located}");
    assert_eq!(field(&conns[0], "nodeId", "node_id"), "e1", "{located}");
    assert_eq!(located["complete"], true, "{located}");

    let listed = grpcurl_call(
        &addr,
        "switchboard.v1.Placement/ListConnections",
        &json!({"namespace": "default"}),
    )
    .await;
    let users: BTreeSet<&str> = listed["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("ListConnections: {listed}"))
        .iter()
        .map(|c| c["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, BTreeSet::from(["alice", "bob", "dave"]), "{listed}");
    assert_eq!(listed["complete"], true, "{listed}");

    let sent = grpcurl_call(
        &addr,
        "switchboard.v1.Messaging/Send",
        &json!({"namespace": "default", "user": "alice", "type": "greet", "payload_json": "{\"hi\":1}"}),
    )
    .await;
    assert_eq!(uint64(&sent["delivered"]), 1, "{sent}");
    assert_eq!(
        alice.recv().await,
        json!({"type": "greet", "payload": {"hi": 1}})
    );

    let bc = grpcurl_call(
        &addr,
        "switchboard.v1.Messaging/Broadcast",
        &json!({"namespace": "default", "type": "all", "payload_json": "7", "skip_users": ["dave"]}),
    )
    .await;
    assert_eq!(uint64(&bc["delivered"]), 2, "{bc}");
    assert_eq!(uint64(&bc["nodes"]), 3, "{bc}");
    assert_eq!(alice.recv().await, json!({"type": "all", "payload": 7}));
    assert_eq!(bob.recv().await, json!({"type": "all", "payload": 7}));
    dave.roundtrip().await;

    let published = grpcurl_call(
        &addr,
        "switchboard.v1.Messaging/Publish",
        &json!({"namespace": "default", "topic": "news/1", "payload_json": "\"extra\""}),
    )
    .await;
    assert!(published.is_object(), "{published}");
    assert_eq!(
        bob.recv().await,
        json!({"type": "message", "topic": "news/1", "payload": "extra"})
    );

    let dropped = grpcurl_call(
        &addr,
        "switchboard.v1.Messaging/Disconnect",
        &json!({"namespace": "default", "user": "dave", "code": 4001, "reason": "bye"}),
    )
    .await;
    assert_eq!(uint64(&dropped["delivered"]), 1, "{dropped}");
    assert_eq!(dave.close_frame().await, (4001, "bye".to_owned()));

    // Watch is a server stream: keep connecting new clients until grpcurl prints an ATTACH of
    // one of them (the stream may not be registered when the first one connects).
    let mut watch = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-H",
            &format!("authorization: Bearer {TEST_API_KEY}"),
            "-max-time",
            "15",
            "-d",
            r#"{"namespace":"watched"}"#,
        ])
        .arg(&addr)
        .arg("switchboard.v1.Placement/Watch")
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run grpcurl: {e}; {MISSING_GRPCURL}"));
    let (tx, mut lines) = mpsc::channel::<String>(1024);
    let stdout = watch.stdout.take().unwrap();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    let mut printed = String::new();
    let mut watchers = Vec::new();
    let seen = poll_for(STEP, async || {
        watchers.push(
            c.client(2, &format!("watcher{}", watchers.len()), "watched")
                .await,
        );
        // Wait (bounded) for output, which comes only as events do.
        while let Ok(Some(line)) = timeout(Duration::from_millis(500), lines.recv()).await {
            printed.push_str(&line);
            printed.push('\n');
            if printed.contains("\"ATTACH\"") && printed.contains("\"watcher") {
                return Some(());
            }
        }
        None
    })
    .await;
    let _ = watch.start_kill();
    assert!(
        seen.is_some(),
        "grpcurl Placement/Watch printed no ATTACH of a new client; it printed:\n{printed}"
    );
    assert!(
        printed.contains("\"e3\""),
        "the ATTACH names the edge: {printed}"
    );
}
