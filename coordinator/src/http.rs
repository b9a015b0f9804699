//! The coordinator's HTTP listener: `/healthz`, `/readyz`, `/metrics`.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use bus::metrics::Text;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::messaging::Coordinator;

/// Serves until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    c: Coordinator,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(c);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn ready(State(c): State<Coordinator>) -> impl IntoResponse {
    if c.bus().is_connected() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "bus disconnected\n")
    }
}

async fn metrics(State(c): State<Coordinator>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&c),
    )
}

/// Prometheus text.
pub fn render(c: &Coordinator) -> String {
    let (entries, edges, suspect) = {
        let dir = c.directory();
        let suspect = dir.nodes().filter(|n| n.suspect_since.is_some()).count();
        (dir.connection_count(), dir.nodes().count(), suspect)
    };
    let bus = c.bus();
    let m = c.metrics();
    Text::default()
        .gauge(
            "coordinator_placement_entries",
            "Connections in this coordinator's share of placement.",
            entries as u64,
        )
        .gauge(
            "coordinator_edges",
            "Edges reporting to this coordinator.",
            edges as u64,
        )
        .gauge(
            "coordinator_edges_suspect",
            "Edges whose report stream is broken, within the grace period.",
            suspect as u64,
        )
        .gauge(
            "coordinator_ring_members",
            "Coordinators in this coordinator's ring.",
            c.cluster().ring().members().len() as u64,
        )
        .gauge(
            "coordinator_bus_connected",
            "1 when the bus connection is up.",
            u64::from(bus.is_connected()),
        )
        .counter(
            "coordinator_bus_reconnects_total",
            "Bus reconnections since start.",
            bus.reconnects(),
        )
        .labeled(
            "coordinator_messaging_calls_total",
            "Messaging calls answered by this coordinator, by call.",
            "call",
            &m.calls,
        )
        .counter(
            "coordinator_delivered_total",
            "Connections reached by Messaging calls answered here.",
            m.delivered.get(),
        )
        .counter(
            "coordinator_refused_total",
            "Connections that refused a message for backpressure.",
            m.refused.get(),
        )
        .labeled(
            "coordinator_unconfirmed_calls_total",
            "Messaging calls answered with some edge's part unknown (unconfirmed), by call.",
            "call",
            &m.unconfirmed_calls,
        )
        .labeled(
            "coordinator_grpc_refused_total",
            "gRPC calls refused before any service saw them, by reason.",
            "reason",
            &m.grpc_refused,
        )
        .histogram(
            "coordinator_send_duration_seconds",
            "Time from a Send's arrival to its answer.",
            &m.send_duration,
        )
        .finish()
}
