//! Traces across processes: one coordinator and one edge (the real binary, over a real
//! nats-server) export spans over OTLP/gRPC to a small receiver in this test, which checks
//! that one trace runs from a backend's gRPC call (its `traceparent`) through the coordinator
//! to the edge's delivery, and from a client event on the edge to the backend.

use std::time::Duration;

use crate::harness::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use proto::v1::SendRequest;
use serde_json::json;
use tokio::sync::mpsc;

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

/// Collects exported spans.
struct Receiver(mpsc::Sender<Got>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                let got = Got {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                };
                let _ = self.0.send(got).await;
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts the receiver on a free port; returns its endpoint and the spans it gets.
async fn receiver() -> (String, mpsc::Receiver<Got>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(10_000);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), rx)
}

/// Waits (bounded) for a span matching `want` among those received, keeping the others.
async fn span(
    rx: &mut mpsc::Receiver<Got>,
    seen: &mut Vec<Got>,
    what: &str,
    want: impl Fn(&Got) -> bool,
) -> Got {
    if let Some(s) = seen.iter().find(|s| want(s)) {
        return s.clone();
    }
    let found = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(s) = rx.recv().await {
            seen.push(s.clone());
            if want(&s) {
                return Some(s);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(s)) => s,
        _ => panic!("no span {what}; received: {seen:#?}"),
    }
}

#[tokio::test]
async fn one_trace_runs_from_a_backend_call_through_coordinator_and_edge() {
    let (endpoint, mut rx) = receiver().await;
    let cluster = Cluster::launch(
        Spec::new(1, 1)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100"),
    )
    .await;
    let mut alice = cluster.client(0, "alice", "default").await;
    cluster.wait_located(0, "default", "alice", 1).await;

    // The backend's call carries its own trace context.
    let trace_id = format!("{:032x}", ulid::Ulid::new().0);
    let parent = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(SendRequest {
        namespace: "default".into(),
        user: "alice".into(),
        r#type: "traced".into(),
        payload_json: "1".into(),
        ..SendRequest::default()
    });
    let traceparent = format!("00-{trace_id}-{parent}-01");
    req.metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    let mut grpc = messaging(cluster.grpc(0)).await;
    let report = grpc.send(req).await.unwrap().into_inner();
    assert_eq!(report.delivered, 1);
    assert_eq!(alice.recv().await, json!({"type": "traced", "payload": 1}));

    let mut seen = Vec::new();
    let coord = span(
        &mut rx,
        &mut seen,
        "Messaging.Send from the coordinator",
        |s| s.name == "Messaging.Send" && s.trace_id == trace_id,
    )
    .await;
    assert_eq!(
        coord.parent_span_id, parent,
        "the coordinator's span continues the caller's"
    );
    assert_eq!(coord.service, "switchboard-coordinator");
    let edge = span(&mut rx, &mut seen, "edge.command from the edge", |s| {
        s.name == "edge.command" && s.trace_id == trace_id
    })
    .await;
    assert_eq!(edge.service, "switchboard-edge", "a second process");
    assert_eq!(
        edge.parent_span_id, coord.span_id,
        "the edge's span is the coordinator's child"
    );

    // A client event: the backend receives the edge's trace context in the headers.
    let backend = cluster.backend().await;
    let mut events = backend.subscribe("sb.event.default.hello").await;
    alice.send(json!({"type": "hello", "id": 1})).await;
    let msg = bounded(
        "the event on the bus",
        futures::StreamExt::next(&mut events),
    )
    .await
    .unwrap();
    let header = msg
        .headers
        .get("traceparent")
        .expect("the event carries a traceparent")
        .to_owned();
    let parts: Vec<&str> = header.split('-').collect();
    assert_eq!(parts.len(), 4, "{header}");
    backend.reply(&msg, &json!({"payload": "hi"})).await;
    assert_eq!(alice.recv().await["payload"], "hi");
    let event = span(&mut rx, &mut seen, "edge.event", |s| {
        s.name == "edge.event" && s.trace_id == parts[1]
    })
    .await;
    assert_eq!(
        event.span_id, parts[2],
        "the backend's parent is the edge's event span"
    );
    assert_eq!(event.service, "switchboard-edge");
}
