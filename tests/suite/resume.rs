//! Nothing lost across a reconnect, at scale and under faults (the acceptance run of topic
//! history): 300 clients over three edges behind haproxy (on `deploy/local`'s config), each
//! subscribed to one of ten history topics, while a backend publishes numbered messages
//! round the topics. One edge is SIGKILLed, later another is drained (SIGTERM, 1001); their
//! clients reconnect through haproxy to the survivors with their resume tokens (on the URL,
//! so that no hook runs, and in `init` with their last positions). Every client must end
//! with every message of its topic exactly once and in the order stored, having been told
//! `resumed: true` and `recovered: true` on each reconnect.
//!
//! Prints `RESUME-FIGURES key=value…`: clients, messages published and delivered, reconnects
//! and the attempts they took, time from the fault to the last client recovered.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::harness::*;

const EDGES: usize = 3;
const CLIENTS: usize = 300;
const TOPICS: u64 = 10;
/// The backend's pace: one publication each, round the topics.
const TICK: Duration = Duration::from_millis(10);
const RECONNECT_ATTEMPTS: u32 = 50;
const NS: &str = "acme";

const YAML: &str = "edge:\n  routes:\n    - path: /connect\n      anonymous: true\n      allowed_origins: [\"*\"]\n      history:\n        - topics: \"chat/#\"\n          size: 1000\n          ttl: 5m\n";

fn topic(t: u64) -> String {
    format!("chat/t{t}")
}

/// One client's life across its connections.
#[derive(Debug, Default)]
struct Life {
    /// Message numbers, in the order received.
    got: Vec<u64>,
    /// Their offsets, in the order received.
    offsets: Vec<u64>,
    /// The position to resume from.
    epoch: String,
    offset: u64,
    token: String,
    reconnects: u32,
    attempts: u32,
    /// What went wrong (a resume or recovery refused, a frame out of place).
    broken: Vec<String>,
    recovered_at: Option<Instant>,
}

type Shared = Arc<Mutex<Life>>;

fn lock(l: &Shared) -> std::sync::MutexGuard<'_, Life> {
    l.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads one connection of client `u` until it ends: records messages and tokens.
async fn read(ws: &mut Ws, life: &Shared) {
    while let Some(Ok(m)) = ws.next().await {
        let WsMessage::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        let mut l = lock(life);
        if let Some(token) = v["resume"].as_str() {
            l.token = token.to_owned();
        }
        match v["type"].as_str() {
            Some("message") => {
                l.got.push(v["payload"]["n"].as_u64().unwrap());
                l.offset = v["offset"].as_u64().unwrap();
                let offset = l.offset;
                l.offsets.push(offset);
            }
            Some("subscribed") => {
                if l.reconnects > 0 && v["recovered"] != true {
                    l.broken.push(format!("not recovered: {v}"));
                }
                if l.reconnects > 0 && l.recovered_at.is_none() {
                    l.recovered_at = Some(Instant::now());
                }
                l.epoch = v["epoch"].as_str().unwrap_or_default().to_owned();
                l.offset = l.offset.max(v["offset"].as_u64().unwrap_or(0));
            }
            Some("session") => {
                if l.reconnects > 0 && v["resumed"] != true {
                    l.broken.push(format!("not resumed: {v}"));
                }
            }
            _ => l.broken.push(format!("unexpected frame {v}")),
        }
    }
}

/// Client `u`: connects to `first`, subscribes, then reconnects through `lb` with its resume
/// token whenever its connection ends, until `done`.
async fn client(
    u: usize,
    first: SocketAddr,
    lb: SocketAddr,
    life: Shared,
    done: watch::Receiver<bool>,
) {
    let t = u as u64 % TOPICS;
    let url = |addr: SocketAddr, resume: &str| {
        let q = if resume.is_empty() {
            String::new()
        } else {
            format!("&resume={resume}")
        };
        format!("ws://{addr}/connect?user=u{u}&namespace={NS}{q}")
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(url(first, ""))
        .await
        .unwrap();
    for f in [
        json!({"type": "init"}),
        json!({"type": "subscribe", "topic": topic(t)}),
    ] {
        ws.send(WsMessage::text(f.to_string())).await.unwrap();
    }
    loop {
        read(&mut ws, &life).await;
        if *done.borrow() {
            return;
        }
        let (token, epoch, offset) = {
            let mut l = lock(&life);
            l.reconnects += 1;
            (l.token.clone(), l.epoch.clone(), l.offset)
        };
        let mut attempts = 0;
        ws = loop {
            attempts += 1;
            match timeout(STEP, tokio_tungstenite::connect_async(url(lb, &token))).await {
                Ok(Ok((ws, _))) => break ws,
                _ if attempts < RECONNECT_ATTEMPTS => sleep(Duration::from_millis(100)).await,
                _ => {
                    lock(&life)
                        .broken
                        .push(format!("no reconnect in {attempts} attempts"));
                    return;
                }
            }
        };
        lock(&life).attempts += attempts;
        let init = json!({"type": "init", "resume": token,
                          "positions": {topic(t): {"offset": offset, "epoch": epoch}}});
        if ws.send(WsMessage::text(init.to_string())).await.is_err() {
            continue;
        }
    }
}

/// Publishes `{"n": n}` on topic `n % TOPICS` every [`TICK`] until `stop`; returns the last n.
async fn publisher(grpc: SocketAddr, next: Arc<AtomicU64>, mut stop: watch::Receiver<bool>) -> u64 {
    let messaging = messaging(grpc).await;
    let mut tick = tokio::time::interval(TICK);
    let mut calls = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        let n = next.fetch_add(1, Ordering::Relaxed) + 1;
        let req = proto::v1::PublishRequest {
            namespace: NS.into(),
            topic: topic(n % TOPICS),
            payload_json: json!({"n": n}).to_string(),
            ..Default::default()
        };
        // Not awaited in turn: while a killed edge is not yet suspect, an answer waits for
        // its report. A publication is stored before it is answered, in the order sent.
        let mut m = messaging.clone();
        calls.spawn(async move {
            let answered = timeout(STEP, m.publish(req)).await;
            assert!(matches!(answered, Ok(Ok(_))), "Publish {n}: {answered:?}");
        });
    }
    while let Some(r) = calls.join_next().await {
        r.unwrap();
    }
    next.load(Ordering::Relaxed)
}

#[tokio::test]
async fn clients_of_a_killed_and_a_drained_edge_resume_elsewhere_without_losing_a_message() {
    let _one = crate::faults::serial().await;
    let started = Instant::now();
    let mut c = Cluster::launch(Spec::new(EDGES, 1).config_yaml(YAML)).await;
    wait_history_rule(c.grpc(0), NS, &topic(0)).await;
    let edges: Vec<SocketAddr> = (0..EDGES).map(|e| c.ws(e)).collect();
    let lb = Haproxy::start(&c.dir, &edges).await;
    let (done_tx, done) = watch::channel(false);
    let lives: Vec<Shared> = (0..CLIENTS).map(|_| Shared::default()).collect();
    for (u, life) in lives.iter().enumerate() {
        tokio::spawn(client(
            u,
            edges[u % EDGES],
            lb.addr,
            Arc::clone(life),
            done.clone(),
        ));
    }
    eventually("every client subscribed", WAIT, async || {
        lives
            .iter()
            .all(|l| !lock(l).epoch.is_empty())
            .then_some(())
    })
    .await;

    let next = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let load = tokio::spawn(publisher(c.grpc(0), Arc::clone(&next), stop));
    let published = async |k: u64| {
        let what = format!("{k} publications");
        eventually(&what, STEP, async || {
            (next.load(Ordering::Relaxed) >= k).then_some(())
        })
        .await;
    };
    published(100).await;
    let killed = Instant::now();
    c.edges[0].proc.kill().await;
    published(300).await;
    let drained = Instant::now();
    c.edges[1].proc.terminate().await;
    published(500).await;
    stop_tx.send_replace(true);
    let last = load.await.unwrap();

    // Every client gets every message of its topic, once, in order.
    let expect = |u: usize| -> Vec<u64> {
        (1..=last)
            .filter(|n| n % TOPICS == u as u64 % TOPICS)
            .collect()
    };
    let all_in = poll_for(WAIT * 2, async || {
        lives
            .iter()
            .enumerate()
            .all(|(u, l)| lock(l).got.len() >= expect(u).len())
            .then_some(())
    })
    .await;
    done_tx.send_replace(true);
    let mut broken = Vec::new();
    let (mut delivered, mut reconnects, mut attempts, mut latest) = (0, 0, 0, Duration::ZERO);
    for (u, l) in lives.iter().enumerate() {
        let l = lock(l);
        delivered += l.got.len();
        reconnects += l.reconnects;
        attempts += l.attempts;
        // Every message of its topic once, in the order stored (offsets increase; the
        // publisher does not await each answer, so two calls may be stored out of their
        // numbers' order).
        if !l.offsets.windows(2).all(|w| w[0] < w[1]) {
            broken.push(format!("u{u}: offsets out of order: {:?}", l.offsets));
        }
        let mut numbers = l.got.clone();
        numbers.sort_unstable();
        if numbers != expect(u) {
            let dup = l.got.len()
                - l.got
                    .iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .len();
            broken.push(format!(
                "u{u} got {} of {} (duplicates {dup}), first difference at {:?}",
                l.got.len(),
                expect(u).len(),
                numbers.iter().zip(expect(u)).position(|(a, b)| *a != b)
            ));
        }
        broken.extend(l.broken.iter().map(|b| format!("u{u}: {b}")));
        if let Some(at) = l.recovered_at {
            let from = if u % EDGES == 0 { killed } else { drained };
            latest = latest.max(at.saturating_duration_since(from));
        }
    }
    println!(
        "RESUME-FIGURES clients={CLIENTS} published={last} delivered={delivered} \
         reconnects={reconnects} reconnect_attempts={attempts} last_recovered_ms={} \
         test_ms={}",
        latest.as_millis(),
        started.elapsed().as_millis()
    );
    // The clients of the killed and the drained edge reconnected (those of the killed one
    // that landed on the drained one, twice); those of the third never had to.
    for (u, l) in lives.iter().enumerate() {
        let n = lock(l).reconnects;
        let faulted = u % EDGES < 2;
        if faulted == (n == 0) {
            broken.push(format!(
                "u{u} (on edge {}) reconnected {n} times",
                u % EDGES
            ));
        }
    }
    assert!(
        all_in.is_some() && broken.is_empty(),
        "{}",
        broken.join("\n")
    );
}
