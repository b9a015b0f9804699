//! What operators watch: `/metrics` of an edge and a coordinator is valid Prometheus text
//! (`promtool check metrics`, from Debian's `prometheus` package: `scripts/test` installs
//! it) and carries the figures the issue lists; each connection logs one line when it opens
//! and one when it closes, with the reason.

use std::process::Stdio;

use crate::harness::*;
use serde_json::json;
use tokio::io::AsyncWriteExt as _;

async fn promtool(text: &str, what: &str) {
    let child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = child.unwrap_or_else(|e| {
        panic!("promtool is missing ({e}): run scripts/test, which installs Debian's prometheus package")
    });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .await
        .unwrap();
    let out = bounded("promtool", child.wait_with_output()).await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed on {what}:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_pass_promtool_and_logs_tell_each_connection() {
    let cluster = Cluster::launch(Spec::new(1, 1)).await;
    let mut alice = cluster.client(0, "alice", "default").await;
    alice
        .send(json!({"type": "subscribe", "topic": "news/+"}))
        .await;
    assert_eq!(alice.recv().await["type"], "subscribed");
    cluster.wait_located(0, "default", "alice", 1).await;
    let report = send(cluster.grpc(0), "default", "alice", "hi", "1").await;
    assert_eq!(report.delivered, 1);
    assert_eq!(alice.recv().await["type"], "hi");

    let (status, edge) = http_get(cluster.ws(0), "/metrics").await.unwrap();
    assert_eq!(status, 200);
    promtool(&edge, "the edge").await;
    for name in [
        "edge_connections{route=\"/connect\"} 1",
        "edge_namespaces{route=\"/connect\"} 1",
        "edge_upgrades_total 1",
        "edge_frames_in_total",
        "edge_bytes_out_total",
        "edge_fanout_size_bucket",
        "edge_slow_consumer_closes_total",
        "edge_outbound_buffered_bytes",
        "edge_bus_reconnects_total",
    ] {
        assert!(edge.contains(name), "edge /metrics lacks {name}:\n{edge}");
    }
    let (status, coord) = http_get(cluster.coords[0].http, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    promtool(&coord, "the coordinator").await;
    for name in [
        "coordinator_placement_entries 1",
        "coordinator_ring_members 1",
        "coordinator_edges 1",
        "coordinator_messaging_calls_total{call=\"send\"} 1",
        "coordinator_send_duration_seconds_count 1",
    ] {
        assert!(
            coord.contains(name),
            "coordinator /metrics lacks {name}:\n{coord}"
        );
    }

    // One log line when the connection opens, one when it closes with the reason.
    drop(alice);
    let log = poll_for(std::time::Duration::from_secs(10), async || {
        let tail = cluster.edges[0].proc.tail();
        tail.contains("connection closed").then_some(tail)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no close line in the edge's log:\n{}",
            cluster.edges[0].proc.tail()
        )
    });
    assert_eq!(log.matches("connection open").count(), 1, "{log}");
    assert!(
        log.contains("code=1006") || log.contains("code=1000"),
        "the close line says how: {log}"
    );
}
