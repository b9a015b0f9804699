//! Delivery across edges: resolve placement, send one bus message to each edge that holds a
//! target (never to every edge), and add up what the edges report.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bus::{BusError, Outgoing, SharedBus};
use futures::StreamExt;
use prost::Message as _;
use proto::subject;
use proto::v1::{DeliveryReport, EdgeCommand, InspectReply, Target, edge_command};

use crate::placement::Directory;

/// What can go wrong delivering.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("bus unavailable")]
    Bus(#[from] BusError),
}

/// The coordinator's view of the cluster and its way to reach edges.
#[derive(Debug, Clone)]
pub struct Coordinator {
    pub(crate) directory: Arc<Mutex<Directory>>,
    bus: SharedBus,
    /// How long to wait for edges to answer a command.
    timeout: Duration,
}

impl Coordinator {
    pub fn new(bus: SharedBus, timeout: Duration) -> Self {
        Self {
            directory: Arc::default(),
            bus,
            timeout,
        }
    }

    pub fn directory(&self) -> MutexGuard<'_, Directory> {
        self.directory.lock().expect("directory poisoned")
    }

    /// A frame to one user (in one namespace or all) or one connection.
    pub async fn send(
        &self,
        target: Target,
        msg_type: String,
        payload: Vec<u8>,
    ) -> Result<DeliveryReport, DeliveryError> {
        let nodes = self.nodes_of(&target);
        let cmd = edge_command::Kind::Deliver(proto::v1::Deliver {
            target: Some(target),
            r#type: msg_type,
            payload,
        });
        self.to_nodes(nodes, cmd).await
    }

    /// Closes a user's connections (or one connection).
    pub async fn disconnect(
        &self,
        target: Target,
        code: u32,
        reason: String,
        hard: bool,
    ) -> Result<DeliveryReport, DeliveryError> {
        let nodes = self.nodes_of(&target);
        let cmd = edge_command::Kind::Disconnect(proto::v1::Disconnect {
            target: Some(target),
            code,
            reason,
            hard,
        });
        self.to_nodes(nodes, cmd).await
    }

    /// A frame to every connection (of one namespace), minus a skip list. Every edge gets it.
    pub async fn broadcast(
        &self,
        b: proto::v1::Broadcast,
    ) -> Result<DeliveryReport, DeliveryError> {
        let expected = self.directory().nodes().count();
        let cmd = EdgeCommand {
            kind: Some(edge_command::Kind::Broadcast(b)),
        };
        let out = Outgoing::new(subject::EDGES, cmd.encode_to_vec());
        self.scatter(out, expected).await
    }

    /// A publication to a topic; only edges with a matching watcher receive it (they
    /// subscribed to its subject).
    pub async fn publish(
        &self,
        namespace: &str,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<DeliveryReport, DeliveryError> {
        proto::topic::validate_topic(topic)
            .map_err(|e| DeliveryError::InvalidArgument(e.to_string()))?;
        let expected = self.directory().matching_filters(namespace, topic);
        let out = Outgoing::new(subject::topic(namespace, topic.split('/')), payload);
        self.scatter(out, expected).await
    }

    /// Live buffered bytes of some connections, asked of the edges that hold them.
    pub async fn inspect(&self, node_id: &str, conn_ids: Vec<String>) -> InspectReply {
        let cmd = EdgeCommand {
            kind: Some(edge_command::Kind::Inspect(proto::v1::Inspect { conn_ids })),
        };
        let out = Outgoing::new(subject::node(node_id), cmd.encode_to_vec());
        match self.bus.request(out, self.timeout).await {
            Ok(m) => InspectReply::decode(m.payload.as_ref()).unwrap_or_default(),
            Err(error) => {
                tracing::debug!(node = node_id, %error, "inspect unanswered");
                InspectReply::default()
            }
        }
    }

    fn nodes_of(&self, target: &Target) -> BTreeSet<String> {
        let dir = self.directory();
        if target.conn_ids.is_empty() {
            dir.nodes_of_user(&target.namespace, &target.user)
        } else {
            target
                .conn_ids
                .iter()
                .filter_map(|id| dir.node_of(id).map(str::to_owned))
                .collect()
        }
    }

    /// One request per node, in parallel; the reports added up.
    async fn to_nodes(
        &self,
        nodes: BTreeSet<String>,
        cmd: edge_command::Kind,
    ) -> Result<DeliveryReport, DeliveryError> {
        let payload = bytes::Bytes::from(EdgeCommand { kind: Some(cmd) }.encode_to_vec());
        let requests = nodes.iter().map(|node| {
            let out = Outgoing {
                subject: subject::node(node),
                payload: payload.clone(),
                ..Outgoing::default()
            };
            self.bus.request(out, self.timeout)
        });
        let mut total = DeliveryReport::default();
        for (node, result) in nodes.iter().zip(futures::future::join_all(requests).await) {
            match result {
                Ok(m) => add(&mut total, &m.payload),
                Err(error) => tracing::warn!(node = %node, %error, "edge did not answer"),
            }
        }
        Ok(total)
    }

    /// Publishes with a reply inbox and adds up answers until `expected` edges answered or
    /// the timeout passed.
    async fn scatter(
        &self,
        out: Outgoing,
        expected: usize,
    ) -> Result<DeliveryReport, DeliveryError> {
        let mut total = DeliveryReport::default();
        if expected == 0 {
            self.bus.publish(out).await?;
            return Ok(total);
        }
        let inbox = self.bus.new_inbox();
        let mut replies = self.bus.subscribe(inbox.clone(), None).await?;
        self.bus.publish(out.with_reply(inbox)).await?;
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        while (total.nodes as usize) < expected {
            tokio::select! {
                () = &mut deadline => {
                    tracing::warn!(answered = total.nodes, expected, "not every edge answered in time");
                    break;
                }
                m = replies.next() => match m {
                    Some(m) => add(&mut total, &m.payload),
                    None => break,
                },
            }
        }
        Ok(total)
    }
}

fn add(total: &mut DeliveryReport, payload: &[u8]) {
    match DeliveryReport::decode(payload) {
        Ok(r) => {
            total.delivered += r.delivered;
            total.refused += r.refused;
            total.nodes += r.nodes.max(1);
        }
        Err(error) => tracing::warn!(%error, "undecodable delivery report"),
    }
}
