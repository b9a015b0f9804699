//! Faults under load: one process of a running cluster fails while a backend keeps sending,
//! and what the backend was *told* is checked against what the clients *got*.
//!
//! Each test runs two coordinators and three edges (real binaries, a real `nats-server`, the
//! harness's monitoring tap on `>`), ten users per edge with one WebSocket each, every one
//! subscribed to one of ten topics (each topic watched on every edge). A steady numbered load
//! runs through the whole fault: every 20 ms a gRPC `Send` to the next user and a `Publish` to
//! the next topic, alternating the coordinators, each with a `message_id`; every answer
//! (report or status) is kept with its send time. Then one fault: an edge SIGKILLed, an edge
//! SIGSTOPped for 5 s, a coordinator SIGKILLed, a coordinator SIGSTOPped for 5 s, or
//! nats-server killed and restarted on the same port 2 s later. As soon as the cluster is
//! whole again, every call answered unconfirmed or with an error is retried once with the same
//! `message_id`, as a backend does; the load runs on a while; markers through every live
//! coordinator then prove that what was in flight has arrived.
//!
//! What must hold (the contract of `DeliveryReport` in `proto/switchboard/v1/common.proto`):
//!
//! - **no duplicate**: no connection gets a message number twice, retries included;
//! - **no ghost**: a call answered `delivered: 0` with nothing `unconfirmed` reaches nobody
//!   (deliveries by an edge that an answer names neither in `node_ids` nor in `unconfirmed`
//!   are counted as `unnamed`, not failed: they mislead no backend);
//! - **survivors lose nothing**: a connection that stayed open, on an edge the answer (or the
//!   retry's) lists in `node_ids`, gets the message exactly once;
//! - **no false "nobody"**: a user connected to a healthy edge for the whole test is never
//!   answered `delivered: 0` with nothing unconfirmed, and no answer leaves out the edge of
//!   such a user or subscriber without calling it unconfirmed (**no lost untold**); the users
//!   of a stalled edge may be, once placement has forgotten it (`edge_grace`);
//! - **no untold timeout**: an answer that waited the whole request timeout (someone did not
//!   answer in time) has something `unconfirmed`;
//! - placement (`ListConnections`, `Locate`) leaves out a killed edge's connections within 1 s
//!   and a stopped one's within 4 s; a resumed edge's users are listed and reachable again;
//! - a Send through a surviving coordinator never waits much longer than one request timeout;
//! - after an edge's SIGKILL its clients reconnect through haproxy (on `deploy/local`'s
//!   config), each on its first attempt.
//!
//! Every test prints one line `FAULT-FIGURES fault=… key=value…` with what it measured
//! (`cargo test --test suite faults:: -- --nocapture 2>&1 | grep FAULT-FIGURES`), then fails
//! with every broken rule at once. The keys: `exclusion_ms` (placement left the edge out;
//! `exclusion_by` per coordinator and call, `placement_max_ms` the slowest placement answer
//! meanwhile), `whole_ms` (after the fault ended, until whole again), `forgotten_ms`,
//! `ring_ms`; per call kind the answers `*_delivered`, `*_unconfirmed`, `*_errored`,
//! `*_nobody` (delivered 0, nothing unconfirmed); `retries` and how they were answered;
//! the counts of each rule's breaches (`duplicates`, `ghosts`, `lost`, `lost_untold`,
//! `false_nobody`, `untold_timeouts`; `unnamed` is only counted); `max_send_ms`
//! (`max_send_survivor_ms` through the survivor); `reconnect_*` and haproxy's own retries and
//! redispatches; `test_ms`. `FAULTS_DUMP=1` also prints every call whose answer was not a
//! plain delivery or that took over 500 ms.
//!
//! The fault tests run one at a time (a semaphore): their time bounds are about the cluster,
//! not about a CPU shared with another fault test.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt as _;
use proto::v1::messaging_client::MessagingClient;
use proto::v1::{DeliveryReport, ListConnectionsRequest, PublishRequest, SendRequest};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, SemaphorePermit, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, interval, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tonic::transport::Endpoint;

use crate::harness::*;

const EDGES: usize = 3;
const COORDS: usize = 2;
const USERS_PER_EDGE: usize = 10;
const USERS: usize = EDGES * USERS_PER_EDGE;
const NS: &str = "default";
/// Topics `faults/0`… : user `u` watches topic `u % TOPICS`, so that each topic has a
/// watcher on every edge, and Publish `n` goes to topic `n % TOPICS`. Each connection then
/// gets about 7 messages with ids a second, well under the 64 recent ids an edge keeps per
/// connection over the time a retry waits for (docs/PROTOCOL.md, retries).
const TOPICS: usize = 10;
/// The load's pace: one Send and one Publish per tick.
const TICK: Duration = Duration::from_millis(20);
/// The backend's own deadline on each call.
const CALL_LIMIT: Duration = Duration::from_secs(5);
/// `coordinator.request_timeout` of the harness's clusters.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How much longer than one request timeout a Send through a survivor may take.
const LATENCY_MARGIN: Duration = Duration::from_secs(1);
/// Placement leaves out a SIGKILLed edge's connections within this…
const KILLED_EXCLUDED: Duration = Duration::from_secs(1);
/// …and a SIGSTOPped one's within this.
const STOPPED_EXCLUDED: Duration = Duration::from_secs(4);
/// How long a stopped process stays stopped.
const STALL: Duration = Duration::from_secs(5);
/// How long nats-server stays down.
const NATS_DOWN: Duration = Duration::from_secs(2);
/// Sends answered before a fault, and again after the cluster is whole.
const STEADY: usize = 50;
/// How often each placement answer is probed while an edge is being left out.
const PROBE: Duration = Duration::from_millis(100);
/// Reconnect attempts a client makes (100 ms apart) before it gives up.
const RECONNECT_ATTEMPTS: u32 = 30;

/// One fault test at a time.
static SERIAL: Semaphore = Semaphore::const_new(1);

pub(crate) async fn serial() -> SemaphorePermit<'static> {
    SERIAL.acquire().await.expect("never closed")
}

// ---------------------------------------------------------------------------------------
// The faults.

#[tokio::test]
async fn edge_sigkill() {
    let _one = serial().await;
    let mut rig = Rig::start(true).await;
    let load = rig.start_load();
    rig.wait_answered(STEADY).await;

    let victim = 2;
    rig.c.edges[victim].proc.kill().await;
    let killed = Instant::now();
    rig.faulted_edge = Some(victim);
    let excluded = rig.excluded_after(victim, killed, STEP).await;
    rig.bound(
        "exclusion",
        excluded,
        KILLED_EXCLUDED,
        "a SIGKILLed edge's connections",
    );
    rig.wait_reconnected(victim).await;
    rig.figure("whole_ms", ms(killed.elapsed()));
    // The fault ends when placement has forgotten the dead edge: until then its part of
    // every answer is rightly unconfirmed, and so would be the retries'.
    rig.wait_forgotten(victim).await;
    rig.figure("forgotten_ms", ms(killed.elapsed()));

    rig.after_fault(load, &[0, 1]).await;
    rig.finish("edge-sigkill", &[0, 1]).await;
}

#[tokio::test]
async fn edge_sigstop_then_sigcont() {
    let _one = serial().await;
    let mut rig = Rig::start(false).await;
    let load = rig.start_load();
    rig.wait_answered(STEADY).await;

    let victim = 2;
    rig.faulted_edge = Some(victim);
    rig.c.edges[victim].proc.pause().await;
    let stopped = Instant::now();
    let excluded = rig.excluded_after(victim, stopped, STALL).await;
    rig.bound(
        "exclusion",
        excluded,
        STOPPED_EXCLUDED,
        "a SIGSTOPped edge's connections",
    );
    sleep_until(stopped + STALL).await;
    rig.c.edges[victim].proc.resume().await;
    let resumed = Instant::now();
    rig.wait_listed_again(victim).await;
    rig.figure("whole_ms", ms(resumed.elapsed()));

    rig.after_fault(load, &[0, 1]).await;
    rig.finish("edge-sigstop", &[0, 1]).await;
}

#[tokio::test]
async fn coordinator_sigkill() {
    let _one = serial().await;
    let mut rig = Rig::start(false).await;
    let load = rig.start_load();
    rig.wait_answered(STEADY).await;

    let (victim, survivor) = (1, 0);
    rig.c.coords[victim].proc.kill().await;
    let killed = Instant::now();
    rig.survivors = vec![survivor];
    rig.wait_ring(survivor, 1).await;
    rig.figure("ring_ms", ms(killed.elapsed()));

    rig.after_fault(load, &[survivor]).await;
    rig.finish("coordinator-sigkill", &[survivor]).await;
}

#[tokio::test]
async fn coordinator_sigstop_then_sigcont() {
    let _one = serial().await;
    let mut rig = Rig::start(false).await;
    let load = rig.start_load();
    rig.wait_answered(STEADY).await;

    let (victim, survivor) = (1, 0);
    rig.c.coords[victim].proc.pause().await;
    let stopped = Instant::now();
    rig.survivors = vec![survivor];
    sleep_until(stopped + STALL).await;
    rig.c.coords[victim].proc.resume().await;
    let resumed = Instant::now();
    rig.wait_whole().await;
    rig.figure("whole_ms", ms(resumed.elapsed()));

    rig.after_fault(load, &[0, 1]).await;
    rig.finish("coordinator-sigstop", &[0, 1]).await;
}

#[tokio::test]
async fn nats_restart_on_the_same_port() {
    let _one = serial().await;
    let mut rig = Rig::start(false).await;
    let load = rig.start_load();
    rig.wait_answered(STEADY).await;

    let port = rig.c.nats.port();
    rig.c.nats.kill().await;
    let down = Instant::now();
    sleep_until(down + NATS_DOWN).await;
    rig.c.nats.restart().await;
    assert_eq!(
        rig.c.nats.port(),
        port,
        "nats-server came back on another port"
    );
    let restarted = Instant::now();
    rig.wait_whole().await;
    rig.figure("whole_ms", ms(restarted.elapsed()));

    rig.after_fault(load, &[0, 1]).await;
    rig.finish("nats-restart", &[0, 1]).await;
}

/// The rules hold without a fault: what the fault tests find is the fault's, not the rig's.
#[tokio::test]
async fn no_fault_baseline() {
    let _one = serial().await;
    let rig = Rig::start(false).await;
    let load = rig.start_load();
    rig.wait_answered(2 * STEADY).await;
    load.stop().await;
    rig.finish("none", &[0, 1]).await;
}

/// The load balancer of `deploy/local` as the fault tests run it: haproxy accepts the config,
/// fails over (checks every 500 ms, retries on another edge with redispatch), and logs the
/// path of a WebSocket URL but never its query string, where clients put their token.
#[tokio::test]
async fn deploy_local_haproxy_fails_over_and_logs_no_query_string() {
    let text = deploy_local_haproxy_config();
    for needle in [
        "option httpchk GET /readyz",
        "inter 500ms",
        "option redispatch",
        "retry-on conn-failure",
        "%HP",
    ] {
        assert!(
            text.contains(needle),
            "deploy/local's haproxy config lacks {needle:?}:\n{text}"
        );
    }
    for leak in ["%HU", "%r ", "%{+Q}r", "%HQ", "option httplog"] {
        assert!(
            !text.contains(leak),
            "deploy/local's haproxy config logs query strings ({leak:?}):\n{text}"
        );
    }
    let c = Cluster::start(2, 1, Opts::default()).await;
    let lb = Haproxy::start(&c.dir, &[c.ws(0), c.ws(1)]).await;
    let secret = "sekrit-token-value-0123";
    let path = format!("/connect?user=carol&namespace={NS}&token={secret}");
    let mut client = Client::connect(lb.addr, &path, &[], "carol via haproxy").await;
    client.roundtrip().await;
    client.close().await;
    let log = eventually("haproxy to log the closed connection", STEP, async || {
        let log = lb.log();
        log.contains("/connect").then_some(log)
    })
    .await;
    assert!(
        !log.contains(secret) && !log.contains("token="),
        "haproxy logged the query string:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------
// The rig: a cluster, its clients, the load and what it was told.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Send,
    Publish,
}

#[derive(Debug, Clone)]
enum Answer {
    Report(DeliveryReport),
    Error(String),
}

/// What a backend concludes from an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Reached some connections; nothing unknown.
    Delivered,
    /// `delivered: 0`, nothing refused, nothing unconfirmed: nobody matching was connected.
    Nobody,
    /// Some part unknown (`unconfirmed` not empty).
    Unconfirmed,
    /// An error status, or no answer within the backend's deadline.
    Errored,
}

impl Answer {
    fn outcome(&self) -> Outcome {
        match self {
            Answer::Error(_) => Outcome::Errored,
            Answer::Report(r) if !r.unconfirmed.is_empty() => Outcome::Unconfirmed,
            Answer::Report(r) if r.delivered == 0 && r.refused == 0 => Outcome::Nobody,
            Answer::Report(_) => Outcome::Delivered,
        }
    }

    /// The edges that answered (empty on an error).
    fn answered(&self) -> &[String] {
        match self {
            Answer::Report(r) => &r.node_ids,
            Answer::Error(_) => &[],
        }
    }

    /// Whether the answer names edge `id` at all (answered or unconfirmed); an error names
    /// everyone, as it tells nothing.
    fn names(&self, id: &str) -> bool {
        match self {
            Answer::Report(r) => r.node_ids.iter().chain(&r.unconfirmed).any(|n| n == id),
            Answer::Error(_) => true,
        }
    }

    fn unconfirmed_is_edges_only(&self) -> bool {
        match self {
            Answer::Report(r) => r.unconfirmed.iter().all(|n| n.starts_with('e')),
            Answer::Error(_) => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Call {
    kind: Kind,
    n: u64,
    /// The target user of a Send.
    user: Option<usize>,
    coord: usize,
    sent: Instant,
    took: Duration,
    answer: Answer,
    retry: bool,
}

/// One WebSocket connection of a user, and what it got.
#[derive(Debug)]
struct Conn {
    user: usize,
    /// Its edge (index), when known.
    edge: Option<usize>,
    /// Connected (and subscribed) before the load started.
    initial: bool,
    opened: Instant,
    closed: Option<Instant>,
    /// Frames per message number.
    frames: BTreeMap<(Kind, u64), u32>,
    marks: BTreeSet<u64>,
    /// Anything else that came (errors, unknown frames).
    other: Vec<String>,
}

#[derive(Debug, Clone)]
struct Reconnect {
    user: usize,
    attempts: u32,
    ok: bool,
    failures: Vec<String>,
}

/// What the load, the readers and the reconnecting clients share.
#[derive(Debug, Default)]
struct Shared {
    /// The last message number of the load.
    numbers: AtomicU64,
    conns: Mutex<Vec<Conn>>,
    calls: Mutex<Vec<Call>>,
    reconnects: Mutex<Vec<Reconnect>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug)]
struct Rig {
    c: Cluster,
    lb: Option<Haproxy>,
    shared: Arc<Shared>,
    messaging: Vec<MessagingClient<Authed>>,
    /// Coordinators that stay up (the others are the fault's victims).
    survivors: Vec<usize>,
    /// The edge the fault hit (killed or stalled). Once placement has forgotten it, an
    /// answer may rightly say that its users are not there.
    faulted_edge: Option<usize>,
    figures: Vec<(String, String)>,
    broken: Vec<String>,
    next_mark: u64,
    started: Instant,
    retries: usize,
}

fn user_name(u: usize) -> String {
    format!("u{u:02}")
}

fn topic(k: usize) -> String {
    format!("faults/{k}")
}

/// The topic a user watches.
fn topic_of_user(u: usize) -> usize {
    u % TOPICS
}

/// The topic of Publish `n`.
fn topic_of_publish(n: u64) -> usize {
    usize::try_from(n).expect("small") % TOPICS
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

impl Rig {
    /// The cluster, haproxy in front of its edges (when `lb`), every user connected to its
    /// edge, subscribed, and listed by both coordinators.
    async fn start(lb: bool) -> Self {
        let started = Instant::now();
        let c = Cluster::start(EDGES, COORDS, Opts::default()).await;
        let lb = match lb {
            true => {
                let edges: Vec<SocketAddr> = (0..EDGES).map(|e| c.ws(e)).collect();
                Some(Haproxy::start(&c.dir, &edges).await)
            }
            false => None,
        };
        let mut clients = Vec::new();
        for u in 0..USERS {
            let mut client = c.client(u / USERS_PER_EDGE, &user_name(u), NS).await;
            let watched = topic(topic_of_user(u));
            client
                .send(json!({"type": "subscribe", "topic": watched}))
                .await;
            assert_eq!(
                client.recv().await,
                json!({"type": "subscribed", "topic": watched})
            );
            clients.push(client);
        }
        for coord in 0..COORDS {
            for k in 0..TOPICS {
                let mut watchers: Vec<&mut Client> = clients
                    .iter_mut()
                    .enumerate()
                    .filter(|(u, _)| topic_of_user(*u) == k)
                    .map(|(_, client)| client)
                    .collect();
                let n = watchers.len() as u64;
                settle_topic(&c, coord, &topic(k), n, &mut watchers).await;
            }
            eventually(
                &format!("{} to list all {USERS} connections", c.coords[coord].id),
                STEP,
                async || {
                    let all =
                        try_list_connections(c.grpc(coord), ListConnectionsRequest::default())
                            .await
                            .ok()?;
                    (all.len() == USERS).then_some(())
                },
            )
            .await;
        }
        let messaging = (0..COORDS)
            .map(|k| {
                let channel = Endpoint::from_shared(format!("http://{}", c.grpc(k)))
                    .expect("a valid URI")
                    .connect_timeout(Duration::from_secs(1))
                    .connect_lazy();
                MessagingClient::new(authed(channel))
            })
            .collect();
        let shared = Arc::new(Shared::default());
        let reconnect_via = lb.as_ref().map(|p| p.addr);
        for (u, client) in clients.into_iter().enumerate() {
            let idx = {
                let mut conns = lock(&shared.conns);
                conns.push(Conn {
                    user: u,
                    edge: Some(u / USERS_PER_EDGE),
                    initial: true,
                    opened: Instant::now(),
                    closed: None,
                    frames: BTreeMap::new(),
                    marks: BTreeSet::new(),
                    other: Vec::new(),
                });
                conns.len() - 1
            };
            tokio::spawn(read_conn(
                Arc::clone(&shared),
                idx,
                client.into_ws(),
                reconnect_via,
            ));
        }
        Self {
            c,
            lb,
            shared,
            messaging,
            survivors: (0..COORDS).collect(),
            faulted_edge: None,
            figures: Vec::new(),
            broken: Vec::new(),
            next_mark: 0,
            started,
            retries: 0,
        }
    }

    fn figure(&mut self, key: &str, value: impl std::fmt::Display) {
        self.figures.push((key.to_owned(), value.to_string()));
    }

    fn broke(&mut self, what: String) {
        self.broken.push(what);
    }

    /// Records `name_ms` and breaks the rule when it is missing or above `bound`.
    fn bound(&mut self, name: &str, took: Option<Duration>, bound: Duration, what: &str) {
        match took {
            Some(t) => {
                self.figure(&format!("{name}_ms"), ms(t));
                if t > bound {
                    self.broke(format!(
                        "placement left out {what} after {t:?}, more than {bound:?}"
                    ));
                }
            }
            None => {
                self.figure(&format!("{name}_ms"), "never");
                self.broke(format!("placement never left out {what}"));
            }
        }
    }

    /// Original (not retried) Sends answered so far.
    fn answered(&self) -> usize {
        lock(&self.shared.calls)
            .iter()
            .filter(|c| c.kind == Kind::Send && !c.retry)
            .count()
    }

    async fn wait_answered(&self, n: usize) {
        eventually(
            &format!("{n} Sends of the load to be answered"),
            STEP * 3,
            async || (self.answered() >= n).then_some(()),
        )
        .await;
    }

    fn start_load(&self) -> Load {
        let (stop, mut stopped) = watch::channel(false);
        let shared = Arc::clone(&self.shared);
        let messaging = self.messaging.clone();
        let task = tokio::spawn(async move {
            let mut calls = JoinSet::new();
            let mut tick = interval(TICK);
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tick.tick() => {}
                }
                let n = shared.numbers.fetch_add(1, Ordering::Relaxed) + 1;
                let user = usize::try_from(n).expect("small") % USERS;
                let send_via = usize::try_from(n).expect("small") % COORDS;
                let publish_via = (send_via + 1) % COORDS;
                calls.spawn(call(
                    Arc::clone(&shared),
                    messaging[send_via].clone(),
                    Kind::Send,
                    n,
                    Some(user),
                    send_via,
                    false,
                ));
                calls.spawn(call(
                    Arc::clone(&shared),
                    messaging[publish_via].clone(),
                    Kind::Publish,
                    n,
                    None,
                    publish_via,
                    false,
                ));
                while calls.try_join_next().is_some() {}
            }
            // Every call is bounded by CALL_LIMIT.
            while calls.join_next().await.is_some() {}
        });
        Load { stop, task }
    }

    /// How long after `from` every placement answer leaves out edge `victim`'s connections:
    /// `ListConnections`, and `Locate` of its first user, through every coordinator. Each of
    /// these four is probed every [`PROBE`] by a call of its own (a slow answer does not delay
    /// the next probe); a check is met when an answer arrives without the edge's connections
    /// (and, for the list, with every other edge's), and the
    /// result is the latest of the four (`None` when one is not met within `limit`). Records
    /// when each was met (`exclusion_by`) and the slowest placement answer meanwhile.
    async fn excluded_after(
        &mut self,
        victim: usize,
        from: Instant,
        limit: Duration,
    ) -> Option<Duration> {
        let id = self.c.edges[victim].id.clone();
        let user = user_name(victim * USERS_PER_EDGE);
        let met = Arc::new(Mutex::new(BTreeMap::<String, Duration>::new()));
        let slowest = Arc::new(Mutex::new(Duration::ZERO));
        let mut probes = JoinSet::new();
        let mut pace = interval(PROBE);
        let checks = 2 * self.c.coords.len();
        while from.elapsed() < limit && lock(&met).len() < checks {
            pace.tick().await;
            for k in &self.c.coords {
                for call in ["list", "locate"] {
                    let name = format!("{}:{call}", k.id);
                    if lock(&met).contains_key(&name) {
                        continue;
                    }
                    let (met, slowest) = (Arc::clone(&met), Arc::clone(&slowest));
                    let (addr, id, user) = (k.grpc, id.clone(), user.clone());
                    probes.spawn(async move {
                        let sent = Instant::now();
                        let answer = match call {
                            "list" => {
                                try_list_connections(addr, ListConnectionsRequest::default()).await
                            }
                            _ => try_locate(addr, NS, &user).await,
                        };
                        let took = sent.elapsed();
                        let mut slow = lock(&slowest);
                        *slow = (*slow).max(took);
                        drop(slow);
                        // Left out, and nothing else: a list must still hold every
                        // connection of the other edges (an empty answer proves nothing).
                        let whole = |all: &Vec<proto::v1::Connection>| {
                            let others = all.iter().filter(|c| c.node_id != id).count();
                            others == all.len()
                                && (call == "locate" || others >= USERS - USERS_PER_EDGE)
                        };
                        if answer.is_ok_and(|all| whole(&all)) {
                            lock(&met).entry(name).or_insert(from.elapsed());
                        }
                    });
                }
            }
            while probes.try_join_next().is_some() {}
        }
        // Each probe is bounded (STEP): let the ones in flight answer.
        while bounded("placement probes", probes.join_next())
            .await
            .is_some()
        {}
        let met = lock(&met).clone();
        let by: Vec<String> = met
            .iter()
            .map(|(k, d)| format!("{k}={}", d.as_millis()))
            .collect();
        self.figure("exclusion_by", by.join(","));
        self.figure("placement_max_ms", ms(*lock(&slowest)));
        (met.len() == checks)
            .then(|| met.values().max().copied())
            .flatten()
            .filter(|&t| t <= limit)
    }

    /// Waits until every client of the dead edge `victim` has reconnected (or given up) and
    /// each reconnected one is located on another edge; records where it landed.
    async fn wait_reconnected(&mut self, victim: usize) {
        let users: Vec<usize> = (victim * USERS_PER_EDGE..(victim + 1) * USERS_PER_EDGE).collect();
        let done = poll_for(STEP, async || {
            (lock(&self.shared.reconnects).len() >= users.len()).then_some(())
        })
        .await;
        if done.is_none() {
            let n = lock(&self.shared.reconnects).len();
            self.broke(format!(
                "only {n} of the {} clients of the killed edge tried to reconnect within {STEP:?}",
                users.len()
            ));
        }
        let victim_id = self.c.edges[victim].id.clone();
        for &u in &users {
            let reconnected = lock(&self.shared.conns)
                .iter()
                .rposition(|c| c.user == u && !c.initial);
            let Some(idx) = reconnected else { continue };
            let addr = self.c.grpc(self.survivors[0]);
            let name = user_name(u);
            let found = poll_for(STEP, async || {
                let conns = try_locate(addr, NS, &name).await.ok()?;
                match conns.as_slice() {
                    [one] if one.node_id != victim_id => Some(one.node_id.clone()),
                    _ => None,
                }
            })
            .await;
            match found {
                Some(node) => {
                    let edge = self.c.edges.iter().position(|e| e.id == node);
                    lock(&self.shared.conns)[idx].edge = edge;
                }
                None => self.broke(format!(
                    "{name} reconnected through haproxy but is not located on a live edge \
                     within {STEP:?}"
                )),
            }
        }
    }

    /// Waits until no coordinator lists edge `victim` among the nodes any more.
    async fn wait_forgotten(&mut self, victim: usize) {
        let id = self.c.edges[victim].id.clone();
        let grpc: Vec<SocketAddr> = (0..COORDS).map(|k| self.c.grpc(k)).collect();
        let limit = Opts::default().edge_grace + STEP;
        let gone = poll_for(limit, async || {
            for &addr in &grpc {
                let nodes = list_nodes(addr).await.ok()?;
                if nodes.nodes.iter().any(|n| n.node_id == id) {
                    return None;
                }
            }
            Some(())
        })
        .await;
        if gone.is_none() {
            self.broke(format!(
                "the killed edge {id} was still listed by a coordinator {limit:?} after its death"
            ));
        }
    }

    /// Waits until every coordinator lists the resumed edge `victim`'s connections again.
    async fn wait_listed_again(&mut self, victim: usize) {
        let id = self.c.edges[victim].id.clone();
        let grpc: Vec<SocketAddr> = (0..COORDS).map(|k| self.c.grpc(k)).collect();
        let whole = poll_for(STEP, async || {
            for &addr in &grpc {
                let all = try_list_connections(addr, ListConnectionsRequest::default())
                    .await
                    .ok()?;
                if all.iter().filter(|c| c.node_id == id).count() != USERS_PER_EDGE {
                    return None;
                }
            }
            Some(())
        })
        .await;
        if whole.is_none() {
            self.broke(format!(
                "the resumed edge {id}'s {USERS_PER_EDGE} connections were not listed by every \
                 coordinator again within {STEP:?}"
            ));
        }
    }

    /// Waits until `coord`'s ring holds `n` coordinators.
    async fn wait_ring(&mut self, coord: usize, n: usize) {
        let addr = self.c.grpc(coord);
        let ok = poll_for(STEP, async || {
            let nodes = list_nodes(addr).await.ok()?;
            (nodes.coordinators.len() == n).then_some(())
        })
        .await;
        if ok.is_none() {
            self.broke(format!(
                "{}'s ring did not hold {n} coordinator(s) within {STEP:?}",
                self.c.coords[coord].id
            ));
        }
    }

    /// Waits until every process is ready again and every coordinator lists every
    /// connection (see [`Cluster::wait_ready`]).
    async fn wait_whole(&mut self) {
        self.c.wait_ready().await;
        for coord in 0..COORDS {
            let addr = self.c.grpc(coord);
            let ok = poll_for(STEP, async || {
                let all = try_list_connections(addr, ListConnectionsRequest::default())
                    .await
                    .ok()?;
                (all.len() == USERS).then_some(())
            })
            .await;
            if ok.is_none() {
                self.broke(format!(
                    "{} did not list all {USERS} connections again within {STEP:?}",
                    self.c.coords[coord].id
                ));
            }
        }
    }

    /// Retries every call answered unconfirmed or with an error, once, with its
    /// `message_id`, through `via` in turn; returns how many.
    async fn retry_unsure(&self, via: &[usize]) -> usize {
        let calls = lock(&self.shared.calls).clone();
        let retried: BTreeSet<(Kind, u64)> = calls
            .iter()
            .filter(|c| c.retry)
            .map(|c| (c.kind, c.n))
            .collect();
        let unsure: Vec<Call> = calls
            .into_iter()
            .filter(|c| {
                !c.retry
                    && !retried.contains(&(c.kind, c.n))
                    && matches!(c.answer.outcome(), Outcome::Unconfirmed | Outcome::Errored)
            })
            .collect();
        let n = unsure.len();
        futures::stream::iter(unsure.into_iter().enumerate())
            .for_each_concurrent(8, |(i, c)| {
                let coord = via[i % via.len()];
                call(
                    Arc::clone(&self.shared),
                    self.messaging[coord].clone(),
                    c.kind,
                    c.n,
                    c.user,
                    coord,
                    true,
                )
            })
            .await;
        n
    }

    /// A marker Send to every user with a live connection and a marker Publish, through each
    /// of `via`: each must be delivered and arrive. What the coordinators sent each edge
    /// before a marker reaches the edge before it, so afterwards nothing is still in flight.
    async fn markers(&mut self, via: &[usize]) {
        let live: Vec<(usize, usize)> = lock(&self.shared.conns)
            .iter()
            .enumerate()
            .filter(|(_, c)| c.closed.is_none())
            .map(|(i, c)| (i, c.user))
            .collect();
        let mut want: Vec<(usize, u64)> = Vec::new();
        for &coord in via {
            let mut client = self.messaging[coord].clone();
            for &(idx, user) in &live {
                self.next_mark += 1;
                let m = self.next_mark;
                let req = SendRequest {
                    namespace: NS.into(),
                    user: user_name(user),
                    r#type: "mark".into(),
                    payload_json: json!({ "m": m }).to_string(),
                    message_id: format!("mark-{m}"),
                    ..SendRequest::default()
                };
                match timeout(CALL_LIMIT, client.send(req)).await {
                    Ok(Ok(r)) if r.get_ref().delivered == 1 => want.push((idx, m)),
                    other => self.broke(format!(
                        "marker Send to {} through {}: {other:?}",
                        user_name(user),
                        self.c.coords[coord].id
                    )),
                }
            }
            for k in 0..TOPICS {
                self.next_mark += 1;
                let m = self.next_mark;
                let req = PublishRequest {
                    namespace: NS.into(),
                    topic: topic(k),
                    payload_json: json!({ "mark": m }).to_string(),
                    message_id: format!("mark-{m}"),
                    ..PublishRequest::default()
                };
                let watchers: Vec<usize> = live
                    .iter()
                    .filter(|&&(_, user)| topic_of_user(user) == k)
                    .map(|&(idx, _)| idx)
                    .collect();
                match timeout(CALL_LIMIT, client.publish(req)).await {
                    Ok(Ok(r)) if r.get_ref().delivered as usize == watchers.len() => {
                        want.extend(watchers.iter().map(|&idx| (idx, m)));
                    }
                    other => self.broke(format!(
                        "marker Publish to {} through {} ({} live watchers): {other:?}",
                        topic(k),
                        self.c.coords[coord].id,
                        watchers.len()
                    )),
                }
            }
        }
        let arrived = poll_for(STEP, async || {
            let conns = lock(&self.shared.conns);
            want.iter()
                .all(|&(idx, m)| conns[idx].marks.contains(&m))
                .then_some(())
        })
        .await;
        if arrived.is_none() {
            let conns = lock(&self.shared.conns);
            let missing: Vec<String> = want
                .iter()
                .filter(|&&(idx, m)| !conns[idx].marks.contains(&m))
                .map(|&(idx, m)| format!("{}#{m}", user_name(conns[idx].user)))
                .collect();
            drop(conns);
            self.broke(format!(
                "{} marker(s) reported delivered never arrived: {missing:?}",
                missing.len()
            ));
        }
    }

    /// The fault is over: stops `load` (its calls in flight end), retries what was
    /// unsure through `via` at once (each connection's recent ids are bounded: a backend
    /// retries promptly), then runs the load again until [`STEADY`] more Sends are answered.
    async fn after_fault(&mut self, load: Load, via: &[usize]) {
        load.stop().await;
        self.retries += self.retry_unsure(via).await;
        let load = self.start_load();
        self.wait_answered(self.answered() + STEADY).await;
        load.stop().await;
    }

    /// Retries, markers, the rules; prints the figures; fails with every broken rule.
    async fn finish(mut self, fault: &str, via: &[usize]) {
        self.retries += self.retry_unsure(via).await;
        self.figure("retries", self.retries);
        self.markers(via).await;
        self.check();
        self.reconnect_figures().await;
        self.figure("test_ms", ms(self.started.elapsed()));
        let mut line = format!("FAULT-FIGURES fault={fault}");
        for (k, v) in &self.figures {
            let _ = write!(line, " {k}={v}");
        }
        eprintln!("{line}");
        if !self.broken.is_empty() {
            let mut text = format!("{fault}: {} rule(s) broken:\n", self.broken.len());
            for b in &self.broken {
                let _ = writeln!(text, "- {b}");
            }
            panic!("{text}");
        }
    }

    async fn reconnect_figures(&mut self) {
        let (Some(victim), true) = (self.faulted_edge, self.lb.is_some()) else {
            return;
        };
        let reconnects = lock(&self.shared.reconnects).clone();
        let first_try = reconnects
            .iter()
            .filter(|r| r.ok && r.attempts == 1)
            .count();
        let max = reconnects.iter().map(|r| r.attempts).max().unwrap_or(0);
        self.figure("reconnects", reconnects.len());
        self.figure("reconnect_first_try", first_try);
        self.figure("reconnect_attempts_max", max);
        if let Some(lb) = &self.lb {
            let servers = lb.servers().await;
            let retries: u64 = servers.iter().map(|s| s.retries).sum();
            let redispatches: u64 = servers.iter().map(|s| s.redispatches).sum();
            self.figure("haproxy_retries", retries);
            self.figure("haproxy_redispatches", redispatches);
        }
        for r in &reconnects {
            if !(r.ok && r.attempts == 1) {
                self.broke(format!(
                    "{} (on the killed edge {}) reconnected through haproxy in {} attempt(s) \
                     (ok: {}); failures: {:?}",
                    user_name(r.user),
                    self.c.edges[victim].id,
                    r.attempts,
                    r.ok,
                    r.failures
                ));
            }
        }
        if reconnects.len() < USERS_PER_EDGE {
            self.broke(format!(
                "only {} of the killed edge's {USERS_PER_EDGE} clients reconnected",
                reconnects.len()
            ));
        }
    }

    /// Holds what the backend was told against what the clients got.
    fn check(&mut self) {
        let calls = lock(&self.shared.calls).clone();
        let conns = lock(&self.shared.conns);
        let edge_ids: Vec<String> = self.c.edges.iter().map(|e| e.id.clone()).collect();
        let coord_ids: Vec<String> = self.c.coords.iter().map(|k| k.id.clone()).collect();
        let faulted = self.faulted_edge;
        let mut broken = Vec::new();
        let mut count = BTreeMap::<&str, usize>::new();
        let retry_of: BTreeMap<(Kind, u64), &Call> = calls
            .iter()
            .filter(|c| c.retry)
            .map(|c| ((c.kind, c.n), c))
            .collect();

        for call in calls.iter().filter(|c| !c.retry) {
            let what = describe(call, &coord_ids);
            let outcome = call.answer.outcome();
            let key = match (call.kind, outcome) {
                (Kind::Send, Outcome::Delivered) => "send_delivered",
                (Kind::Send, Outcome::Nobody) => "send_nobody",
                (Kind::Send, Outcome::Unconfirmed) => "send_unconfirmed",
                (Kind::Send, Outcome::Errored) => "send_errored",
                (Kind::Publish, Outcome::Delivered) => "pub_delivered",
                (Kind::Publish, Outcome::Nobody) => "pub_nobody",
                (Kind::Publish, Outcome::Unconfirmed) => "pub_unconfirmed",
                (Kind::Publish, Outcome::Errored) => "pub_errored",
            };
            *count.entry(key).or_default() += 1;
            // A coordinator waits a whole request timeout only for an edge (or a peer) that
            // does not answer: that part is unknown, and the answer must say so. (A
            // coordinator that was stopped itself waited for nobody: survivors only.)
            if call.took >= REQUEST_TIMEOUT
                && self.survivors.contains(&call.coord)
                && matches!(outcome, Outcome::Delivered | Outcome::Nobody)
            {
                broken.push(format!(
                    "untold timeout: {what} waited the request timeout ({REQUEST_TIMEOUT:?}) \
                     for someone, yet has nothing unconfirmed"
                ));
                *count.entry("untold_timeouts").or_default() += 1;
            }
            let retry = retry_of.get(&(call.kind, call.n)).copied();
            // The connections the message was for: the user's, or every subscriber's.
            let targets = conns.iter().filter(|c| match call.user {
                Some(u) => c.user == u,
                None => topic_of_user(c.user) == topic_of_publish(call.n),
            });
            for conn in targets {
                let got = conn.frames.get(&(call.kind, call.n)).copied().unwrap_or(0);
                let who = format!(
                    "{}{} on {}",
                    user_name(conn.user),
                    if conn.initial { "" } else { " (reconnected)" },
                    conn.edge
                        .map_or("an unknown edge", |e| edge_ids[e].as_str())
                );
                // Connected and subscribed on a healthy edge for the whole test.
                let whole_test = conn.initial
                    && conn.closed.is_none()
                    && conn.edge.is_some()
                    && conn.edge != faulted;
                if got > 1 {
                    broken.push(format!("duplicate: {who} got {what} {got} times"));
                    *count.entry("duplicates").or_default() += 1;
                }
                if outcome == Outcome::Nobody && got > 0 {
                    broken.push(format!("ghost: {who} got {what}, answered nobody"));
                    *count.entry("ghosts").or_default() += 1;
                }
                if outcome == Outcome::Nobody && whole_test {
                    broken.push(format!(
                        "false nobody: {what} answered nobody while {who} was connected"
                    ));
                    *count.entry("false_nobody").or_default() += 1;
                }
                let Some(edge) = conn.edge else { continue };
                let id = edge_ids[edge].as_str();
                let sure = call.answer.unconfirmed_is_edges_only();
                // Counted, not a rule: an extra delivery the answer does not mention misleads
                // no backend (unlike one answered nobody, a ghost).
                if sure && !call.answer.names(id) && got > 0 && outcome != Outcome::Nobody {
                    *count.entry("unnamed").or_default() += 1;
                }
                if sure && !call.answer.names(id) && whole_test && outcome != Outcome::Nobody {
                    broken.push(format!(
                        "lost untold: {what} names neither {id} as answered nor as \
                         unconfirmed while {who} was connected and subscribed"
                    ));
                    *count.entry("lost_untold").or_default() += 1;
                }
                // Delivered by the original or by the retry (whose answer is definitive):
                // a connection open to the end, on an edge that answered, has it once.
                let confirmed = |a: &Call| {
                    a.answer.answered().iter().any(|n| n == id)
                        && conn.closed.is_none()
                        && conn.opened < a.sent
                        && (call.kind == Kind::Send || conn.initial)
                };
                let definitive_retry =
                    retry.filter(|r| matches!(r.answer.outcome(), Outcome::Delivered));
                if (confirmed(call) || definitive_retry.is_some_and(confirmed)) && got == 0 {
                    broken.push(format!(
                        "lost: {who} never got {what} although {id} answered for it"
                    ));
                    *count.entry("lost").or_default() += 1;
                }
            }
        }
        drop(conns);

        // Retries: a retry answered nobody while the user was connected is a false nobody.
        for r in calls.iter().filter(|c| c.retry) {
            *count.entry("retry_answered").or_default() += usize::from(matches!(
                r.answer.outcome(),
                Outcome::Delivered | Outcome::Nobody
            ));
            *count.entry("retry_unsure").or_default() += usize::from(matches!(
                r.answer.outcome(),
                Outcome::Unconfirmed | Outcome::Errored
            ));
        }

        let sends: Vec<&Call> = calls
            .iter()
            .filter(|c| c.kind == Kind::Send && !c.retry)
            .collect();
        let max_send = sends.iter().map(|c| c.took).max().unwrap_or_default();
        let max_survivor = sends
            .iter()
            .filter(|c| self.survivors.contains(&c.coord))
            .map(|c| c.took)
            .max()
            .unwrap_or_default();
        let slow: Vec<String> = sends
            .iter()
            .filter(|c| {
                self.survivors.contains(&c.coord) && c.took > REQUEST_TIMEOUT + LATENCY_MARGIN
            })
            .map(|c| describe(c, &coord_ids))
            .collect();
        if self.survivors.len() < COORDS && !slow.is_empty() {
            broken.push(format!(
                "{} Send(s) through the surviving coordinator took longer than the request \
                 timeout {REQUEST_TIMEOUT:?} + {LATENCY_MARGIN:?}: {:?}",
                slow.len(),
                &slow[..slow.len().min(5)]
            ));
        }
        self.figure("sends", sends.len());
        self.figure(
            "publishes",
            calls
                .iter()
                .filter(|c| c.kind == Kind::Publish && !c.retry)
                .count(),
        );
        for key in [
            "send_delivered",
            "send_unconfirmed",
            "send_errored",
            "send_nobody",
            "pub_delivered",
            "pub_unconfirmed",
            "pub_errored",
            "pub_nobody",
            "retry_answered",
            "retry_unsure",
            "duplicates",
            "ghosts",
            "unnamed",
            "lost",
            "lost_untold",
            "false_nobody",
            "untold_timeouts",
        ] {
            self.figure(key, count.get(key).copied().unwrap_or(0));
        }
        self.figure("max_send_ms", ms(max_send));
        if std::env::var_os("FAULTS_DUMP").is_some() {
            for c in calls.iter().filter(|c| {
                c.took > Duration::from_millis(500) || c.answer.outcome() != Outcome::Delivered
            }) {
                eprintln!("DUMP {}", describe(c, &coord_ids));
            }
        }
        if self.survivors.len() < COORDS {
            self.figure("max_send_survivor_ms", ms(max_survivor));
        }
        let others: Vec<String> = lock(&self.shared.conns)
            .iter()
            .flat_map(|c| {
                c.other
                    .iter()
                    .map(move |o| format!("{}: {o}", user_name(c.user)))
            })
            .collect();
        if !others.is_empty() {
            broken.push(format!(
                "{} unexpected frame(s), e.g. {:?}",
                others.len(),
                &others[..others.len().min(5)]
            ));
        }
        // One line per rule and kind is enough to read; the counts are in the figures.
        let mut seen = BTreeMap::<String, usize>::new();
        for b in broken {
            let rule = b.split(':').next().unwrap_or_default().to_owned();
            let n = seen.entry(rule).or_default();
            *n += 1;
            if *n <= 5 {
                self.broken.push(b);
            }
        }
        for (rule, n) in seen.into_iter().filter(|(_, n)| *n > 5) {
            self.broken
                .push(format!("{rule}: {} more like these", n - 5));
        }
    }
}

fn describe(call: &Call, coord_ids: &[String]) -> String {
    let what = match (call.kind, call.user) {
        (Kind::Send, Some(u)) => format!("Send #{} to {}", call.n, user_name(u)),
        _ => format!("Publish #{}", call.n),
    };
    let answer = match &call.answer {
        Answer::Report(r) => format!(
            "delivered {} nodes {:?} unconfirmed {:?}",
            r.delivered, r.node_ids, r.unconfirmed
        ),
        Answer::Error(e) => format!("error {e}"),
    };
    format!(
        "{what}{} through {} ({answer}, in {:?})",
        if call.retry { " (retry)" } else { "" },
        coord_ids[call.coord],
        call.took
    )
}

/// The running load; [`Load::stop`] ends it and waits for the calls in flight.
#[derive(Debug)]
struct Load {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    async fn stop(self) {
        let _ = self.stop.send(true);
        bounded("the load's calls in flight", self.task)
            .await
            .expect("the load task ends");
    }
}

/// One numbered call with its `message_id`, bounded by the backend's deadline; its answer
/// goes into `shared`.
async fn call(
    shared: Arc<Shared>,
    mut client: MessagingClient<Authed>,
    kind: Kind,
    n: u64,
    user: Option<usize>,
    coord: usize,
    retry: bool,
) {
    let sent = Instant::now();
    let result = match (kind, user) {
        (Kind::Send, Some(u)) => {
            let req = SendRequest {
                namespace: NS.into(),
                user: user_name(u),
                r#type: "f".into(),
                payload_json: json!({ "n": n }).to_string(),
                message_id: format!("send-{n}"),
                ..SendRequest::default()
            };
            timeout(CALL_LIMIT, client.send(req)).await
        }
        _ => {
            let req = PublishRequest {
                namespace: NS.into(),
                topic: topic(topic_of_publish(n)),
                payload_json: json!({ "p": n }).to_string(),
                message_id: format!("pub-{n}"),
                ..PublishRequest::default()
            };
            timeout(CALL_LIMIT, client.publish(req)).await
        }
    };
    let answer = match result {
        Ok(Ok(r)) => Answer::Report(r.into_inner()),
        Ok(Err(status)) => Answer::Error(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Answer::Error(format!("no answer within {CALL_LIMIT:?}")),
    };
    lock(&shared.calls).push(Call {
        kind,
        n,
        user,
        coord,
        sent,
        took: sent.elapsed(),
        answer,
        retry,
    });
}

/// Reads connection `idx` until it ends, counting what arrives; then, when `reconnect_via`
/// is given, reconnects its user there (as a client behind a load balancer does).
async fn read_conn(shared: Arc<Shared>, idx: usize, mut ws: Ws, reconnect_via: Option<SocketAddr>) {
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            WsMessage::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap_or_else(|_| json!(t.to_string()));
                record(&mut lock(&shared.conns)[idx], &v);
            }
            WsMessage::Close(_) => break,
            _ => {}
        }
    }
    let user = {
        let mut conns = lock(&shared.conns);
        conns[idx].closed = Some(Instant::now());
        conns[idx].user
    };
    if let Some(lb) = reconnect_via {
        Box::pin(reconnect(shared, user, lb)).await;
    }
}

fn record(conn: &mut Conn, v: &Value) {
    let n = |key: &str| v["payload"][key].as_u64();
    match (v["type"].as_str(), v["topic"].as_str()) {
        (Some("f"), _) if n("n").is_some() => {
            *conn
                .frames
                .entry((Kind::Send, n("n").unwrap()))
                .or_default() += 1;
        }
        (Some("message"), Some(t)) if t.starts_with("faults/") && n("p").is_some() => {
            *conn
                .frames
                .entry((Kind::Publish, n("p").unwrap()))
                .or_default() += 1;
        }
        (Some("message"), Some(t)) if t.starts_with("faults/") && n("mark").is_some() => {
            conn.marks.insert(n("mark").unwrap());
        }
        (Some("mark"), _) if n("m").is_some() => {
            conn.marks.insert(n("m").unwrap());
        }
        (Some("subscribed"), _) => {}
        _ => conn.other.push(v.to_string()),
    }
}

/// Reconnects `user` through the load balancer at `lb`, subscribes it again, and reads the
/// new connection; records how many attempts it took.
async fn reconnect(shared: Arc<Shared>, user: usize, lb: SocketAddr) {
    let url = format!("ws://{lb}/connect?user={}&namespace={NS}", user_name(user));
    let mut attempts = 0;
    let mut failures = Vec::new();
    let ws = loop {
        attempts += 1;
        match timeout(STEP, tokio_tungstenite::connect_async(url.as_str())).await {
            Ok(Ok((ws, _))) => break Some(ws),
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(_) => failures.push(format!("no upgrade within {STEP:?}")),
        }
        if attempts == RECONNECT_ATTEMPTS {
            break None;
        }
        sleep(Duration::from_millis(100)).await;
    };
    lock(&shared.reconnects).push(Reconnect {
        user,
        attempts,
        ok: ws.is_some(),
        failures,
    });
    let Some(mut ws) = ws else { return };
    let opened = Instant::now();
    let watched = topic(topic_of_user(user));
    let subscribe = WsMessage::text(json!({"type": "subscribe", "topic": watched}).to_string());
    if futures::SinkExt::send(&mut ws, subscribe).await.is_err() {
        return;
    }
    let idx = {
        let mut conns = lock(&shared.conns);
        conns.push(Conn {
            user,
            edge: None,
            initial: false,
            opened,
            closed: None,
            frames: BTreeMap::new(),
            marks: BTreeSet::new(),
            other: Vec::new(),
        });
        conns.len() - 1
    };
    read_conn(shared, idx, ws, None).await;
}
