//! Cluster mode: the edge's report streams to the coordinators.
//!
//! The edge learns the coordinators from their announcements on the bus (and, for first
//! contact, from `ListNodes` on the configured coordinators), builds the same ring they do, and
//! keeps one `EdgeReport` stream per coordinator. Which coordinator each delta goes to is
//! decided by the pure [`Router`] ([`edge_core::router`]): each connection's deltas go to the
//! owner of its `namespace/user` key, node-level topic activations to every coordinator, and
//! its mirror of what was reported gives each coordinator its whole share when the ring
//! changes or a stream reconnects. Every stream carries at least a heartbeat each
//! [`proto::REPORT_HEARTBEAT`], so that a coordinator can tell a stalled edge from a quiet
//! one. This file keeps the streams, the clock and the bus.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bus::SharedBus;
use bus::tls::Dialer;
use edge_core::router::Router;
use futures::StreamExt;
use prost::Message as _;
use proto::subject;
use proto::v1::edge_report_client::EdgeReportClient;
use proto::v1::placement_client::PlacementClient;
use proto::v1::{CoordinatorAnnounce, ListNodesRequest, ReportBatch};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::server::Edge;

/// Batches queued per coordinator stream; beyond that the stream gets a full batch instead.
const STREAM_QUEUE: usize = 256;
/// Housekeeping period: expire members, retry full batches, readiness.
const TICK: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long leaving batches may take to reach the coordinators on shutdown.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the uplink needs. Its `Debug` shows no credential.
#[derive(Clone)]
pub struct UplinkOptions {
    /// Coordinator addresses for first contact.
    pub seeds: Vec<String>,
    pub member_timeout: Duration,
    /// This edge's WebSocket address, as operators see it in `ListNodes`.
    pub address: String,
    /// How coordinators are dialed (TLS with `cluster.tls`).
    pub dialer: Dialer,
    /// This edge's node credential ([`proto::credential`]), presented to coordinators;
    /// `None` on a cluster without a secret.
    pub credential: Option<String>,
}

impl std::fmt::Debug for UplinkOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UplinkOptions")
            .field("seeds", &self.seeds)
            .field("member_timeout", &self.member_timeout)
            .field("address", &self.address)
            .field("dialer", &self.dialer)
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A request carrying the edge's credential, if it has one (sensitive: never indexed by
/// HPACK, shown as such by `Debug`).
fn authorized<T>(message: T, credential: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = credential.and_then(|c| {
        format!("Bearer {c}")
            .parse::<tonic::metadata::AsciiMetadataValue>()
            .ok()
    });
    if let Some(mut value) = value {
        value.set_sensitive(true);
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Runs until `shutdown`; then tells every coordinator this edge is leaving.
pub async fn run(edge: Edge, bus: SharedBus, opts: UplinkOptions, shutdown: CancellationToken) {
    edge.set_upstream_ready(false);
    let mut announces = match bus.subscribe(subject::ANNOUNCE.to_owned(), None).await {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot subscribe to coordinator announcements");
            return;
        }
    };
    let _ = bus
        .publish(bus::Outgoing::new(subject::HELLO, Vec::new()))
        .await;
    let (found_tx, mut found) = mpsc::channel::<(String, String)>(64);
    let (events_tx, mut events) = mpsc::channel::<StreamEvent>(64);
    let credential: Option<Arc<str>> = opts.credential.as_deref().map(Arc::from);
    tokio::spawn(first_contact(
        opts.seeds.clone(),
        credential.clone(),
        opts.dialer.clone(),
        found_tx.clone(),
        shutdown.clone(),
    ));

    let epoch = Instant::now();
    let mut router = Router::new(
        edge.node_id().to_owned(),
        opts.address.clone(),
        opts.member_timeout,
    );
    let mut streams: HashMap<String, StreamHandle> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval(proto::REPORT_HEARTBEAT);
    let mut bus_was_down = false;
    let mut last_tick = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            batch = edge.next_report(&opts.address) => {
                for (id, b) in router.on_batch(batch) {
                    send(&mut streams, &id, b);
                }
            }
            Some(m) = announces.next() => {
                let Ok(a) = CoordinatorAnnounce::decode(m.payload.as_ref()) else { continue };
                let now = epoch.elapsed();
                if router.observe(&a.node_id, &a.grpc_address, a.leaving, now) {
                    reconcile(&router, credential.as_ref(), &opts.dialer, &mut streams, &events_tx);
                }
            }
            Some((id, address)) = found.recv() => {
                if router.observe(&id, &address, false, epoch.elapsed()) {
                    reconcile(&router, credential.as_ref(), &opts.dialer, &mut streams, &events_tx);
                }
            }
            _ = heartbeat.tick() => {
                let beat = router.heartbeat();
                for id in streams.keys().cloned().collect::<Vec<_>>() {
                    send(&mut streams, &id, beat.clone());
                }
            }
            Some(ev) = events.recv() => match ev {
                StreamEvent::Connected(id) | StreamEvent::Resync(id) => {
                    if let Some(s) = streams.get_mut(&id) {
                        s.connected = true;
                        s.needs_full = true;
                    }
                    flush_fulls(&router, &mut streams, edge.is_draining());
                    edge.set_upstream_ready(streams.values().any(|s| s.connected));
                }
                StreamEvent::Disconnected(id) => {
                    if let Some(s) = streams.get_mut(&id) {
                        s.connected = false;
                    }
                    edge.set_upstream_ready(streams.values().any(|s| s.connected));
                }
                StreamEvent::Unreachable(id) => {
                    // Out of the ring until it announces again, as the coordinators do.
                    if router.remove(&id) {
                        tracing::warn!(node = %id, "coordinator unreachable; removed from the ring");
                        reconcile(&router, credential.as_ref(), &opts.dialer, &mut streams, &events_tx);
                        edge.set_upstream_ready(streams.values().any(|s| s.connected));
                    }
                }
            },
            _ = tick.tick() => {
                // A tick far later than due means this process was stopped: the
                // coordinators' announcements are still queued.
                let stalled = last_tick.elapsed() > TICK * 2;
                last_tick = Instant::now();
                // Silence heard through a broken bus says nothing about the coordinators.
                if !bus.is_connected() {
                    bus_was_down = true;
                } else if std::mem::take(&mut bus_was_down) || stalled {
                    router.touch_all(epoch.elapsed());
                } else if router.expire(epoch.elapsed()) {
                    reconcile(&router, credential.as_ref(), &opts.dialer, &mut streams, &events_tx);
                }
                if router.is_alone() {
                    let _ = bus.publish(bus::Outgoing::new(subject::HELLO, Vec::new())).await;
                }
                let draining = edge.is_draining();
                if router.set_draining(draining) {
                    for s in streams.values_mut() {
                        s.needs_full = true;
                    }
                }
                flush_fulls(&router, &mut streams, draining);
            }
        }
    }
    // Leaving: every coordinator forgets this edge now instead of after the grace period.
    let leave = ReportBatch {
        node_id: edge.node_id().to_owned(),
        address: opts.address.clone(),
        leaving: true,
        draining: true,
        ..ReportBatch::default()
    };
    let tasks: Vec<_> = streams
        .into_values()
        .map(|s| {
            let _ = s.tx.try_send(leave.clone());
            s.stop.cancel();
            s.task
        })
        .collect();
    let _ = tokio::time::timeout(LEAVE_TIMEOUT, futures::future::join_all(tasks)).await;
}

#[derive(Debug)]
enum StreamEvent {
    Connected(String),
    /// The coordinator forgot this edge while the stream was open: send it everything.
    Resync(String),
    Disconnected(String),
    /// A connect attempt failed after the stream had broken.
    Unreachable(String),
}

#[derive(Debug)]
struct StreamHandle {
    address: String,
    tx: mpsc::Sender<ReportBatch>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    connected: bool,
    /// The next batch for this coordinator must be its whole share.
    needs_full: bool,
}

fn send(streams: &mut HashMap<String, StreamHandle>, id: &str, batch: ReportBatch) {
    let Some(s) = streams.get_mut(id) else { return };
    if s.needs_full {
        return;
    }
    if s.tx.try_send(batch).is_err() {
        s.needs_full = true;
    }
}

fn flush_fulls(router: &Router, streams: &mut HashMap<String, StreamHandle>, draining: bool) {
    for (id, s) in streams.iter_mut() {
        if s.needs_full && s.connected {
            let mut full = router.full_for(id);
            full.draining = draining;
            s.needs_full = s.tx.try_send(full).is_err();
        }
    }
}

/// Opens streams to new members, closes streams to gone ones, and re-sends every coordinator
/// its share of the new ring (the router rebuilt it when the members changed).
fn reconcile(
    router: &Router,
    credential: Option<&Arc<str>>,
    dialer: &Dialer,
    streams: &mut HashMap<String, StreamHandle>,
    events: &mpsc::Sender<StreamEvent>,
) {
    tracing::info!(ring = ?router.ring().members(), "coordinator ring changed");
    let members: HashMap<String, String> = router
        .members()
        .map(|m| (m.node_id.clone(), m.address.clone()))
        .collect();
    streams.retain(|id, s| {
        let keep = members.get(id).is_some_and(|a| *a == s.address);
        if !keep {
            s.stop.cancel();
        }
        keep
    });
    for (id, address) in members {
        streams.entry(id.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(STREAM_QUEUE);
            // Not a child of `shutdown`: on shutdown each stream is stopped only after the
            // leaving batch was queued on it.
            let stop = CancellationToken::new();
            let task = tokio::spawn(stream_task(
                id,
                address.clone(),
                credential.cloned(),
                dialer.clone(),
                rx,
                events.clone(),
                stop.clone(),
            ));
            StreamHandle {
                address,
                tx,
                stop,
                task,
                connected: false,
                needs_full: true,
            }
        });
    }
    for s in streams.values_mut() {
        s.needs_full = true;
    }
    flush_fulls(router, streams, router.draining());
}

/// Keeps one report stream to one coordinator open, reconnecting with backoff.
async fn stream_task(
    id: String,
    address: String,
    credential: Option<Arc<str>>,
    dialer: Dialer,
    mut rx: mpsc::Receiver<ReportBatch>,
    events: mpsc::Sender<StreamEvent>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut was_connected = false;
    // A stream that never opened points at the setup (address, TLS, credential): say so once.
    let mut first_failure = true;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let attempt = async {
            let endpoint = dialer.endpoint(&address)?.connect_timeout(CONNECT_TIMEOUT);
            let channel = dialer.connect(&endpoint).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(EdgeReportClient::new(channel))
        };
        let mut client = tokio::select! {
            () = stop.cancelled() => return,
            c = attempt => match c {
                Ok(c) => c,
                Err(error) => {
                    if std::mem::take(&mut first_failure) {
                        tracing::warn!(node = %id, %address, error = ?error, "cannot reach coordinator; retrying");
                    } else {
                        tracing::debug!(node = %id, %address, %error, "coordinator unreachable");
                    }
                    if std::mem::take(&mut was_connected) {
                        let _ = events.send(StreamEvent::Unreachable(id.clone())).await;
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        // Whatever was queued for the broken stream is stale: a full batch follows.
        while rx.try_recv().is_ok() {}
        let (itx, irx) = mpsc::channel::<ReportBatch>(STREAM_QUEUE);
        let mut acks = match client
            .report(authorized(ReceiverStream::new(irx), credential.as_deref()))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => {
                if std::mem::take(&mut first_failure) {
                    tracing::warn!(node = %id, %address, ?status, "coordinator refused the report stream; retrying");
                } else {
                    tracing::debug!(node = %id, code = ?status.code(), "report stream refused");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        was_connected = true;
        first_failure = false;
        tracing::info!(node = %id, %address, "reporting to coordinator");
        let _ = events.send(StreamEvent::Connected(id.clone())).await;
        let stopping = loop {
            tokio::select! {
                () = stop.cancelled() => break true,
                b = rx.recv() => match b {
                    Some(b) => if itx.send(b).await.is_err() { break false },
                    None => break true,
                },
                a = acks.next() => match a {
                    Some(Ok(ack)) if ack.resync => {
                        let _ = events.send(StreamEvent::Resync(id.clone())).await;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break false,
                },
            }
        };
        if stopping {
            // Hand over what is left (the leaving batch), then end the stream.
            while let Ok(b) = rx.try_recv() {
                if itx.send(b).await.is_err() {
                    break;
                }
            }
            drop(itx);
            let _ = tokio::time::timeout(LEAVE_TIMEOUT, async {
                while acks.next().await.is_some() {}
            })
            .await;
            return;
        }
        tracing::warn!(node = %id, %address, "report stream to coordinator broke; reconnecting");
        let _ = events.send(StreamEvent::Disconnected(id.clone())).await;
    }
}

/// Asks the configured coordinators who is in the ring, until someone answers.
async fn first_contact(
    seeds: Vec<String>,
    credential: Option<Arc<str>>,
    dialer: Dialer,
    found: mpsc::Sender<(String, String)>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut any = false;
        for seed in &seeds {
            let Ok(endpoint) = dialer.endpoint(seed) else {
                tracing::warn!(%seed, "not a valid coordinator address");
                continue;
            };
            let ask = async {
                let endpoint = endpoint.connect_timeout(CONNECT_TIMEOUT);
                let channel = dialer.connect(&endpoint).await.ok()?;
                PlacementClient::new(channel)
                    .list_nodes(authorized(ListNodesRequest {}, credential.as_deref()))
                    .await
                    .ok()
            };
            if let Some(resp) = ask.await {
                for c in resp.into_inner().coordinators {
                    any = true;
                    let _ = found.send((c.node_id, c.address)).await;
                }
            }
        }
        if any || seeds.is_empty() {
            return;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
