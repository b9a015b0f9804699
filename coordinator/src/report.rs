//! `switchboard.v1.EdgeReport`: the long-lived stream each edge keeps to each coordinator,
//! carrying its placement deltas, and a heartbeat when there are none. A broken stream makes
//! the edge suspect at once, a silent one after [`proto::REPORT_SILENCE`]; its entries go
//! after the grace period unless it comes back. An edge forgotten while its stream stayed
//! open is asked to resend its whole state (`ReportAck.resync`).
//!
//! A stream speaks for one node: the one its credential names (any node id on a cluster
//! without a secret: the first batch's). A batch for another node ends the stream, and a
//! second stream for a node that already has one here is refused: it is never merged.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::Stream;
use proto::v1::edge_report_server::EdgeReport;
use proto::v1::{ReportAck, ReportBatch};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::access::Caller;
use crate::messaging::Coordinator;

/// Acks queued per stream; an edge that does not read them loses some (they are advisory).
const ACK_QUEUE: usize = 16;

#[derive(Debug, Clone)]
pub struct ReportService {
    coordinator: Coordinator,
    /// Node ids with a report stream open here.
    live: Arc<Mutex<HashSet<String>>>,
}

impl ReportService {
    pub fn new(coordinator: Coordinator) -> Self {
        Self {
            coordinator,
            live: Arc::default(),
        }
    }
}

/// Holds a node id in the live set until the stream that claimed it ends.
#[derive(Debug)]
struct Claim {
    live: Arc<Mutex<HashSet<String>>>,
    node: String,
}

impl Claim {
    fn take(live: &Arc<Mutex<HashSet<String>>>, node: &str) -> Option<Self> {
        let fresh = live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node.to_owned());
        fresh.then(|| Self {
            live: Arc::clone(live),
            node: node.to_owned(),
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.node);
    }
}

fn already_reporting(node: &str) -> Status {
    Status::already_exists(format!("node {node:?} already has a report stream here"))
}

type AckStream = Pin<Box<dyn Stream<Item = Result<ReportAck, Status>> + Send>>;

#[tonic::async_trait]
impl EdgeReport for ReportService {
    type ReportStream = AckStream;

    async fn report(
        &self,
        request: Request<Streaming<ReportBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        // The node this stream may speak for, when its credential names one.
        let mut bound = match Caller::of(&request) {
            Caller::Node(node) => Some(node.id),
            _ => None,
        };
        let mut claim = match &bound {
            Some(node) => {
                Some(Claim::take(&self.live, node).ok_or_else(|| already_reporting(node))?)
            }
            None => None,
        };
        let live = Arc::clone(&self.live);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(ACK_QUEUE);
        let c = self.coordinator.clone();
        let me = c.node_id().to_owned();
        let _ = tx.try_send(Ok(ReportAck {
            batches: 0,
            node_id: me.clone(),
            resync: false,
        }));
        tokio::spawn(async move {
            let mut stream: Option<(String, u64)> = None;
            let mut batches = 0u64;
            loop {
                let batch = match inbound.message().await {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), message = status.message(), "report stream broke");
                        break;
                    }
                };
                if bound.as_ref().is_some_and(|b| *b != batch.node_id) {
                    tracing::warn!(node = ?bound, claimed = %batch.node_id, "report for another node refused; stream ended");
                    let _ = tx.try_send(Err(Status::permission_denied(
                        "this credential reports for another node",
                    )));
                    break;
                }
                if claim.is_none() {
                    match Claim::take(&live, &batch.node_id) {
                        Some(c) => {
                            // Without a credential, the first batch names the one node.
                            bound = Some(batch.node_id.clone());
                            claim = Some(c);
                        }
                        None => {
                            let _ = tx.try_send(Err(already_reporting(&batch.node_id)));
                            break;
                        }
                    }
                }
                if stream.is_none() {
                    let generation = c.open_stream(&batch.node_id);
                    tracing::info!(node = %batch.node_id, "edge reporting");
                    stream = Some((batch.node_id.clone(), generation));
                }
                let node = batch.node_id.clone();
                c.apply(batch).await;
                // Forgotten while it could not report (stalled past the grace period): its
                // deltas are relative to state this directory no longer has.
                let resync = c.directory().needs_full(&node);
                batches += 1;
                let _ = tx.try_send(Ok(ReportAck {
                    batches,
                    node_id: me.clone(),
                    resync,
                }));
            }
            if let Some((node, generation)) = stream {
                tracing::info!(node = %node, "edge report stream ended");
                c.suspect(&node, generation);
            }
            drop(claim);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Takes a census of the edges on the bus every [`crate::messaging::CENSUS_EVERY`].
pub async fn run_census(c: Coordinator, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(crate::messaging::CENSUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => c.census().await,
        }
    }
}

/// How often a coordinator learns again which topics keep history: a rule an edge made
/// applies to `Messaging.Publish` within this long.
pub const HISTORY_RULES_EVERY: Duration = Duration::from_secs(1);

/// Learns the history rules from storage every [`HISTORY_RULES_EVERY`] (edges make them).
pub async fn run_history_rules(c: Coordinator, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(HISTORY_RULES_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => c.refresh_history().await,
        }
    }
}

/// How often liveness is checked: a silent edge is suspect at most this long after
/// [`proto::REPORT_SILENCE`].
const LIVENESS_CHECK: Duration = Duration::from_millis(250);

/// Marks edges that went silent suspect, and drops those suspect for longer than `grace`.
pub async fn run_reaper(c: Coordinator, grace: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(LIVENESS_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {
                // A tick far later than due means this process was stopped (SIGSTOP, a VM
                // pause): the edges' heartbeats are still queued on the streams.
                let stalled = last.elapsed() > proto::REPORT_SILENCE / 2;
                last = tokio::time::Instant::now();
                c.check_liveness(grace, stalled).await;
            }
        }
    }
}
