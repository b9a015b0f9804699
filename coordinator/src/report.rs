//! `switchboard.v1.EdgeReport`: the long-lived stream each edge keeps to each coordinator,
//! carrying its placement deltas. A broken stream makes the edge suspect; its entries go
//! after the grace period unless it comes back.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use proto::v1::edge_report_server::EdgeReport;
use proto::v1::{ReportAck, ReportBatch};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::messaging::Coordinator;

/// Acks queued per stream; an edge that does not read them loses some (they are advisory).
const ACK_QUEUE: usize = 16;

#[derive(Debug, Clone)]
pub struct ReportService(pub Coordinator);

type AckStream = Pin<Box<dyn Stream<Item = Result<ReportAck, Status>> + Send>>;

#[tonic::async_trait]
impl EdgeReport for ReportService {
    type ReportStream = AckStream;

    async fn report(
        &self,
        request: Request<Streaming<ReportBatch>>,
    ) -> Result<Response<AckStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(ACK_QUEUE);
        let c = self.0.clone();
        let me = c.node_id().to_owned();
        let _ = tx.try_send(Ok(ReportAck {
            batches: 0,
            node_id: me.clone(),
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
                if stream.is_none() {
                    let generation = c.open_stream(&batch.node_id);
                    tracing::info!(node = %batch.node_id, "edge reporting");
                    stream = Some((batch.node_id.clone(), generation));
                }
                c.apply(batch).await;
                batches += 1;
                let _ = tx.try_send(Ok(ReportAck {
                    batches,
                    node_id: me.clone(),
                }));
            }
            if let Some((node, generation)) = stream {
                tracing::info!(node = %node, "edge report stream ended");
                c.suspect(&node, generation);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Drops edges whose stream has been broken for longer than `grace`.
pub async fn run_reaper(c: Coordinator, grace: Duration, shutdown: CancellationToken) {
    let every = (grace / 4).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => c.expire(grace).await,
        }
    }
}
