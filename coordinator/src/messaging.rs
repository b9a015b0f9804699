//! The coordinator's core: its directory, its place in the cluster, and delivery across
//! edges (resolve placement, one bus message to each edge that holds a target — never to every
//! edge — and add up what the edges report).
//!
//! Every report tells the truth about each edge concerned: it answered (`node_ids`), or its
//! part is unknown (`unconfirmed`: asked and silent past the deadline, suspect and told
//! without waiting, or holding a share this coordinator has not caught up with). All edges
//! are asked in parallel under one deadline, [`Coordinator::edge_timeout`], shorter than a
//! forwarded call's, so that a coordinator forwarding to this one hears the answer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bus::metrics::{Counter, Histogram, LabeledCounter};
use bus::{BusError, Outgoing, SharedBus};
use futures::StreamExt;
use prost::Message as _;
use proto::subject;
use proto::v1::placement_event::Kind;
use proto::v1::{
    DeliveryReport, EdgeCommand, InspectReply, PlacementEvent, PlacementEvents, ReportBatch,
    Target, edge_command,
};

use bus::history::Rule;

use crate::cluster::Cluster;
use crate::config::CoordinatorConfig;
use crate::history::TopicHistory;
use crate::placement::{Change, Directory, Node};

/// Upper bounds (seconds) of the delivery latency histogram.
static LATENCY_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// What the coordinator counts for `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    /// Messaging calls answered, by call (send, broadcast, publish, disconnect).
    pub calls: LabeledCounter,
    /// Time from a Send's arrival to its answer (edges reached), in seconds.
    pub send_duration: Histogram,
    pub delivered: Counter,
    pub refused: Counter,
    /// Messaging calls whose report left some edge's part unknown, by call.
    pub unconfirmed_calls: LabeledCounter,
    /// gRPC calls refused by the access check, by reason (missing, unknown, scope…).
    pub grpc_refused: LabeledCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            calls: LabeledCounter::default(),
            send_duration: Histogram::new(&LATENCY_BOUNDS),
            delivered: Counter::default(),
            refused: Counter::default(),
            unconfirmed_calls: LabeledCounter::default(),
            grpc_refused: LabeledCounter::default(),
        }
    }
}

impl Metrics {
    pub(crate) fn record(&self, call: &str, report: &DeliveryReport) {
        self.calls.inc(call);
        self.delivered.add(report.delivered);
        self.refused.add(report.refused);
        if !report.unconfirmed.is_empty() {
            self.unconfirmed_calls.inc(call);
        }
    }
}

/// What can go wrong delivering.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("bus unavailable")]
    Bus(#[from] BusError),
    #[error("bus disconnected")]
    Disconnected,
    /// Storing a publication on a history topic failed (the text is safe to show).
    #[error("history unavailable: {0}")]
    History(String),
    /// The bus took nothing within the call's wait (it stalls): nothing was sent.
    #[error("the bus took nothing within {0:?}: nothing was sent; try again")]
    NotSent(Duration),
}

/// The coordinator's state and its way to reach edges. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Coordinator {
    directory: Arc<Mutex<Directory>>,
    metrics: Arc<Metrics>,
    cluster: Arc<Cluster>,
    bus: SharedBus,
    /// How long to wait for edges (and peers) to answer.
    timeout: Duration,
    epoch: tokio::time::Instant,
    /// `Bearer <this coordinator's node credential>`, sent on calls to peers.
    peer_authorization: Option<tonic::metadata::AsciiMetadataValue>,
    /// Topic history, when this coordinator publishes into it.
    history: Option<Arc<TopicHistory>>,
}

/// How a publication reaches the edges: on its topic subject, or through history (stored
/// first, then republished on that subject with its position).
enum Via<'a> {
    Bus,
    History {
        history: &'a TopicHistory,
        rule: Rule,
        namespace: &'a str,
        topic: &'a str,
    },
}

impl Coordinator {
    /// `address` is this coordinator's gRPC address as peers should dial it.
    pub fn new(node_id: String, address: String, bus: SharedBus, cfg: &CoordinatorConfig) -> Self {
        let cluster = Cluster::new(node_id, address, cfg.member_timeout);
        Self {
            directory: Arc::default(),
            metrics: Arc::default(),
            cluster: Arc::new(cluster),
            bus,
            timeout: cfg.request_timeout,
            epoch: tokio::time::Instant::now(),
            peer_authorization: None,
            history: None,
        }
    }

    /// Publications on topics that keep history go through `store` (whose rules are
    /// learned from it: [`Coordinator::refresh_history`]).
    pub fn with_history(mut self, store: bus::SharedHistory) -> Self {
        self.history = Some(Arc::new(TopicHistory::new(store)));
        self
    }

    /// Learns again which topics keep history.
    pub async fn refresh_history(&self) {
        if let Some(h) = &self.history {
            h.refresh().await;
        }
    }

    pub(crate) fn history(&self) -> Option<&TopicHistory> {
        self.history.as_deref()
    }

    /// Peers are called with this coordinator's credential under the cluster `secret`.
    pub fn with_cluster_secret(mut self, secret: &[u8]) -> Self {
        let credential =
            proto::credential::mint(secret, proto::credential::Role::Coordinator, self.node_id());
        // Sensitive: shown as such by `Debug`, and never indexed by HPACK.
        self.peer_authorization = format!("Bearer {credential}")
            .parse::<tonic::metadata::AsciiMetadataValue>()
            .ok()
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        self
    }

    /// The `authorization` value of calls to peers, if the cluster has a secret.
    pub fn peer_authorization(&self) -> Option<&tonic::metadata::AsciiMetadataValue> {
        self.peer_authorization.as_ref()
    }

    pub fn directory(&self) -> MutexGuard<'_, Directory> {
        self.directory.lock().expect("directory poisoned")
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The cluster view, shared: for the membership task ([`crate::cluster::run_membership`]).
    pub fn shared_cluster(&self) -> Arc<Cluster> {
        Arc::clone(&self.cluster)
    }

    /// When this coordinator's clock started: [`Self::now`] is the time since.
    pub fn epoch(&self) -> tokio::time::Instant {
        self.epoch
    }

    pub fn bus(&self) -> SharedBus {
        Arc::clone(&self.bus)
    }

    pub fn node_id(&self) -> &str {
        self.cluster.self_id()
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long edges get to answer: three quarters of the request timeout, so that a call
    /// forwarded from a peer (which waits one request timeout) is answered in time.
    pub(crate) fn edge_timeout(&self) -> Duration {
        self.timeout * 3 / 4
    }

    /// Whether answers from this directory are whole (no suspect edge, every share current).
    pub fn is_complete(&self) -> bool {
        let ring = self.cluster.ring_members();
        self.directory().is_complete(&ring)
    }

    /// Time since this coordinator started: the clock of the sans-io state machines.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Applies an edge's report batch and tells `Placement.Watch` streams what changed.
    pub async fn apply(&self, batch: ReportBatch) {
        let changes = self.directory().apply(batch, self.now());
        self.announce_changes(changes).await;
    }

    /// A report stream from an edge opened; returns its generation.
    pub fn open_stream(&self, node_id: &str) -> u64 {
        self.directory().open_stream(node_id)
    }

    /// An edge's report stream broke.
    pub fn suspect(&self, node_id: &str, stream: u64) {
        self.directory().suspect(node_id, stream, self.now());
    }

    /// Marks silent edges suspect and drops edges suspect for longer than `grace`. After
    /// this process itself `stalled`, every edge counts as just heard from instead: the
    /// silence was this side's.
    pub async fn check_liveness(&self, grace: Duration, stalled: bool) {
        let now = self.now();
        let changes = {
            let mut dir = self.directory();
            if stalled {
                dir.touch_all(now);
            }
            for node in dir.silence(now, proto::REPORT_SILENCE) {
                tracing::warn!(node = %node, "edge silent; suspect");
            }
            dir.expire(now, grace, CENSUS_EVERY * 2 + CENSUS_WAIT)
        };
        self.announce_changes(changes).await;
    }

    /// A frame to one user (in one namespace or all) or some connections, from this
    /// coordinator's directory (`frame`'s own target is ignored).
    pub async fn send(
        &self,
        target: Target,
        frame: &proto::v1::Deliver,
    ) -> Result<DeliveryReport, DeliveryError> {
        self.check_bus()?;
        let plan = self.plan(&target);
        self.to_nodes(plan, |target| {
            edge_command::Kind::Deliver(proto::v1::Deliver {
                target: Some(target),
                ..frame.clone()
            })
        })
        .await
    }

    /// Closes a user's connections (or some connections) from this coordinator's directory.
    pub async fn disconnect(
        &self,
        target: Target,
        code: u32,
        reason: String,
        hard: bool,
    ) -> Result<DeliveryReport, DeliveryError> {
        self.check_bus()?;
        let plan = self.plan(&target);
        self.to_nodes(plan, |target| {
            edge_command::Kind::Disconnect(proto::v1::Disconnect {
                target: Some(target),
                code,
                reason: reason.clone(),
                hard,
            })
        })
        .await
    }

    /// A frame to every connection (of one namespace), minus a skip list. Every edge gets it.
    pub async fn broadcast(
        &self,
        b: proto::v1::Broadcast,
    ) -> Result<DeliveryReport, DeliveryError> {
        self.check_bus()?;
        let expected = self
            .directory()
            .nodes()
            .map(|n| (n.node_id.clone(), usize::from(!n.is_suspect())))
            .collect();
        let cmd = EdgeCommand {
            kind: Some(edge_command::Kind::Broadcast(b)),
        };
        let out = traced(Outgoing::new(subject::EDGES, cmd.encode_to_vec()));
        self.scatter(out, expected).await
    }

    /// A publication to a topic; only edges with a matching watcher receive it (they
    /// subscribed to its subject).
    pub async fn publish(
        &self,
        namespace: &str,
        topic: &str,
        payload: Vec<u8>,
        message_id: &str,
        form: PayloadForm,
    ) -> Result<DeliveryReport, DeliveryError> {
        proto::topic::validate_topic(topic)
            .map_err(|e| DeliveryError::InvalidArgument(e.to_string()))?;
        self.check_bus()?;
        // Suspect edges, and joining ones (whose filters are unknown here), count 0 answers:
        // they are listed unconfirmed.
        let expected = {
            let dir = self.directory();
            let mut expected = dir.matching_filters(namespace, topic);
            for (node, count) in &mut expected {
                if dir.node(node).is_some_and(Node::is_suspect) {
                    *count = 0;
                }
            }
            for node in dir.joining() {
                expected.insert(node.to_owned(), 0);
            }
            expected
        };
        let mut out = traced(Outgoing::new(
            subject::topic(namespace, topic.split('/')),
            payload,
        ));
        if !message_id.is_empty() {
            out.headers.insert(subject::HEADER_MESSAGE_ID, message_id);
        }
        if form.binary {
            out.headers.insert(subject::HEADER_BINARY, "1");
        }
        if form.uncompressed {
            out.headers.insert(subject::HEADER_COMPRESS, "0");
        }
        let via = match self.history.as_deref() {
            Some(history) => match history.rule_for(topic) {
                Some(rule) => Via::History {
                    history,
                    rule,
                    namespace,
                    topic,
                },
                None => Via::Bus,
            },
            None => Via::Bus,
        };
        self.scatter_via(out, expected, via).await
    }

    /// Asks every edge on the bus to name itself, and records those unknown here as joining:
    /// an edge that has not reported to this coordinator yet (it just started, or cannot
    /// reach it) is then answered as unknown, never as nobody.
    pub async fn census(&self) {
        let cmd = EdgeCommand {
            kind: Some(edge_command::Kind::Census(proto::v1::Census {})),
        };
        let out = Outgoing::new(subject::EDGES, cmd.encode_to_vec());
        let mut ids = Vec::new();
        let answered = self.replies(out, CENSUS_WAIT, |r| {
            ids.extend(r.node_ids);
            false
        });
        match answered.await {
            Ok(()) => {
                let now = self.now();
                self.directory().seen_on_bus(ids, now);
            }
            Err(error) => tracing::debug!(%error, "census not taken"),
        }
    }

    /// Fails fast while the bus is down, so a backend can tell "nobody there" from "cluster
    /// broken".
    pub(crate) fn check_bus(&self) -> Result<(), DeliveryError> {
        if self.bus.is_connected() {
            Ok(())
        } else {
            Err(DeliveryError::Disconnected)
        }
    }

    /// Live buffered bytes of some connections, asked of the edge that holds them. Half the
    /// edge deadline: a stalled edge (not yet suspect) must not hold up a listing, nor make
    /// a peer's share of it miss the forwarding deadline; its figures are then 0.
    pub async fn inspect(&self, node_id: &str, conn_ids: Vec<String>) -> InspectReply {
        let inspect = proto::v1::Inspect { conn_ids };
        let cmd = EdgeCommand {
            kind: Some(edge_command::Kind::Inspect(inspect)),
        };
        let out = Outgoing::new(subject::node(node_id), cmd.encode_to_vec());
        match self.bus.request(out, self.edge_timeout() / 2).await {
            Ok(m) => InspectReply::decode(m.payload.as_ref()).unwrap_or_default(),
            Err(error) => {
                tracing::debug!(node = node_id, %error, "inspect unanswered");
                InspectReply::default()
            }
        }
    }

    /// Which edges to ask, each with the target it should apply. A user in one namespace is
    /// one key, so this coordinator (its owner) knows all of it and the edge may select by
    /// user; otherwise (every namespace, or conn ids) other coordinators hold other shares of
    /// the same user, so each names exactly the connections it knows, or an edge would get
    /// the same frame from two coordinators.
    ///
    /// An edge whose share here is behind the ring (it has not re-reported since the ring
    /// changed) may hold the user without this directory knowing: a user target is sent to
    /// it as well (the edge selects truthfully); a conn id target cannot be, so it is
    /// reported unknown.
    fn plan(&self, target: &Target) -> Plan {
        let ring = self.cluster.ring_members();
        let dir = self.directory();
        let behind = dir.behind(&ring);
        let mut plan = Plan::default();
        let mut place = |node: String, t: Target| {
            if dir.node(&node).is_some_and(Node::is_suspect) {
                plan.suspect.push((node, t));
            } else {
                plan.ask.push((node, t));
            }
        };
        if target.conn_ids.is_empty() && !target.namespace.is_empty() {
            let holders = dir.placed(&target.namespace, &target.user);
            let mut nodes: BTreeSet<String> = holders.map(|c| c.node_id.clone()).collect();
            nodes.extend(behind);
            for n in nodes {
                place(n, target.clone());
            }
            return plan;
        }
        // A connection on an edge that is behind may also be known to another coordinator
        // (its old or new owner): naming it here could deliver it twice. That edge is
        // reported unknown instead.
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if target.conn_ids.is_empty() {
            for c in dir.placed("", &target.user) {
                if !behind.contains(&c.node_id) {
                    let ids = by_node.entry(c.node_id.clone()).or_default();
                    ids.push(c.conn_id.clone());
                }
            }
        } else {
            for id in &target.conn_ids {
                if let Some(n) = dir.node_of(id).filter(|n| !behind.contains(*n)) {
                    by_node.entry(n.to_owned()).or_default().push(id.clone());
                }
            }
        }
        for (node, conn_ids) in by_node {
            let t = Target {
                namespace: target.namespace.clone(),
                user: String::new(),
                conn_ids,
            };
            place(node, t);
        }
        plan.unknown = behind.into_iter().collect();
        plan
    }

    /// One request per edge to ask, in parallel under one deadline; suspect edges are told
    /// without waiting. The reports added up; every edge whose part is unknown listed.
    async fn to_nodes(
        &self,
        plan: Plan,
        command: impl Fn(Target) -> edge_command::Kind,
    ) -> Result<DeliveryReport, DeliveryError> {
        let message = |node: &str, target: &Target| {
            let cmd = EdgeCommand {
                kind: Some(command(target.clone())),
            };
            traced(Outgoing::new(subject::node(node), cmd.encode_to_vec()))
        };
        // One deadline from the call on: a stalled bus may hold a send itself, not only
        // the answer.
        let wait = self.edge_timeout();
        let deadline = tokio::time::Instant::now() + wait;
        let requests = plan.ask.iter().map(|(node, target)| {
            let out = message(node, target);
            let subject = out.subject.clone();
            async move {
                tokio::time::timeout_at(deadline, self.bus.request(out, wait))
                    .await
                    .unwrap_or(Err(BusError::Timeout {
                        subject,
                        timeout: wait,
                    }))
            }
        });
        let mut total = DeliveryReport::default();
        let mut unconfirmed = plan.unknown;
        for (node, target) in &plan.suspect {
            // It may come back and deliver: the part is unknown, not lost.
            let sent = tokio::time::timeout_at(deadline, self.bus.publish(message(node, target)));
            if !matches!(sent.await, Ok(Ok(()))) {
                tracing::debug!(node = %node, "command to a suspect edge not sent");
            }
            unconfirmed.push(node.clone());
        }
        let nodes = plan.ask.iter().map(|(n, _)| n);
        for (node, result) in nodes.zip(futures::future::join_all(requests).await) {
            match result {
                Ok(m) => add(&mut total, &m.payload),
                // Even "no responders" proves nothing: the edge may be resubscribing after
                // a bus reconnect.
                Err(error) => {
                    tracing::warn!(node = %node, %error, "edge did not answer");
                    unconfirmed.push(node.clone());
                }
            }
        }
        add_unconfirmed(&mut total, unconfirmed);
        Ok(total)
    }

    /// Publishes with a reply inbox and adds up answers until every edge in `expected` gave
    /// its count of answers (one per matching subscription) or the deadline passed. An edge
    /// expected to give 0 answers is suspect: its part is unknown. Edges not expected (one
    /// that just started) are counted when they answer in time.
    async fn scatter(
        &self,
        out: Outgoing,
        expected: BTreeMap<String, usize>,
    ) -> Result<DeliveryReport, DeliveryError> {
        self.scatter_via(out, expected, Via::Bus).await
    }

    /// [`Coordinator::scatter`], sending `out` the way `via` says; through history the
    /// report says where the publication was stored.
    async fn scatter_via(
        &self,
        out: Outgoing,
        mut expected: BTreeMap<String, usize>,
        via: Via<'_>,
    ) -> Result<DeliveryReport, DeliveryError> {
        let mut total = DeliveryReport::default();
        let suspect: Vec<String> = expected
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(id, _)| id.clone())
            .collect();
        expected.retain(|_, n| *n > 0);
        if expected.is_empty() {
            let deadline = tokio::time::Instant::now() + self.edge_timeout();
            if let Some(stored) = self.send_within(out, None, &via, deadline).await? {
                (total.offset, total.epoch) = (stored.offset, stored.epoch);
            }
            add_unconfirmed(&mut total, suspect);
            return Ok(total);
        }
        let stored = self
            .replies_via(out, self.edge_timeout(), &via, |r| {
                for id in &r.node_ids {
                    if let Some(left) = expected.get_mut(id) {
                        *left -= 1;
                        if *left == 0 {
                            expected.remove(id);
                        }
                    }
                }
                merge(&mut total, &r);
                expected.is_empty()
            })
            .await?;
        if let Some(stored) = stored {
            (total.offset, total.epoch) = (stored.offset, stored.epoch);
        }
        if !expected.is_empty() {
            tracing::warn!(silent = ?expected.keys().collect::<Vec<_>>(), "not every edge answered in time");
        }
        add_unconfirmed(&mut total, suspect.into_iter().chain(expected.into_keys()));
        Ok(total)
    }

    /// Publishes `out` with a reply inbox and hands each edge's report to `take` until it
    /// says it has all it waits for, or `wait` passed.
    async fn replies(
        &self,
        out: Outgoing,
        wait: Duration,
        take: impl FnMut(DeliveryReport) -> bool,
    ) -> Result<(), BusError> {
        self.replies_via(out, wait, &Via::Bus, take)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                DeliveryError::Bus(e) => e,
                other => BusError::Io(other.to_string().into()),
            })
    }

    /// Sends `out` (its replies to `reply`) the way `via` says: where it was stored, when
    /// through history. JetStream's republish drops the reply subject, so through history
    /// it travels in a header.
    async fn send_via(
        &self,
        mut out: Outgoing,
        reply: Option<String>,
        via: &Via<'_>,
    ) -> Result<Option<bus::history::Appended>, DeliveryError> {
        match via {
            Via::Bus => {
                out.reply = reply;
                self.bus.publish(out).await?;
                Ok(None)
            }
            Via::History {
                history,
                rule,
                namespace,
                topic,
            } => {
                if let Some(reply) = reply {
                    out.headers.insert(subject::HEADER_REPORT_TO, reply);
                }
                let stored = history
                    .store
                    .append(rule, namespace, topic, out.headers, out.payload)
                    .await
                    .map_err(|e| match e {
                        bus::HistoryError::TooLarge { .. } => {
                            DeliveryError::InvalidArgument(e.to_string())
                        }
                        // It may have been stored: a retry with the same message_id is
                        // stored once.
                        bus::HistoryError::Unavailable(_) => DeliveryError::History(format!(
                            "{e}: the publication may or may not be stored; retry with the same message_id"
                        )),
                    })?;
                Ok(Some(stored))
            }
        }
    }

    /// [`Coordinator::send_via`], by `deadline` when through the bus: a stalled bus may hold
    /// the send, and then nothing was sent. Storing in history has its own bound
    /// (JetStream's), and its failure says the publication may or may not be stored.
    async fn send_within(
        &self,
        out: Outgoing,
        reply: Option<String>,
        via: &Via<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<Option<bus::history::Appended>, DeliveryError> {
        match via {
            Via::Bus => tokio::time::timeout_at(deadline, self.send_via(out, reply, via))
                .await
                .unwrap_or(Err(DeliveryError::NotSent(self.edge_timeout()))),
            Via::History { .. } => self.send_via(out, reply, via).await,
        }
    }

    /// [`Coordinator::replies`], sending the way `via` says. The wait runs from the call on:
    /// a stalled bus can hold the reply inbox's registration or the send (then nothing was
    /// sent, and the caller hears so in time). Through history, the edges get their whole
    /// wait after the publication is stored.
    async fn replies_via(
        &self,
        out: Outgoing,
        wait: Duration,
        via: &Via<'_>,
        mut take: impl FnMut(DeliveryReport) -> bool,
    ) -> Result<Option<bus::history::Appended>, DeliveryError> {
        let deadline = tokio::time::Instant::now() + wait;
        let inbox = self.bus.new_inbox();
        let mut replies =
            tokio::time::timeout_at(deadline, self.bus.subscribe(inbox.clone(), None))
                .await
                .map_err(|_| DeliveryError::NotSent(wait))??;
        let stored = self.send_within(out, Some(inbox), via, deadline).await?;
        let deadline = match via {
            Via::Bus => deadline,
            Via::History { .. } => tokio::time::Instant::now() + wait,
        };
        let deadline = tokio::time::sleep_until(deadline);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return Ok(stored),
                m = replies.next() => match m {
                    Some(m) => {
                        if let Some(r) = decode_report(&m.payload)
                            && take(r)
                        {
                            return Ok(stored);
                        }
                    }
                    None => return Ok(stored),
                },
            }
        }
    }

    async fn announce_changes(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let at_ms = unix_ms();
        let events: Vec<PlacementEvent> = changes
            .into_iter()
            .filter_map(|c| self.event(c, at_ms))
            .collect();
        if events.is_empty() {
            return;
        }
        let body = PlacementEvents { events }.encode_to_vec();
        let out = Outgoing::new(subject::PLACEMENT_EVENTS, body);
        if let Err(error) = self.bus.publish(out).await {
            tracing::debug!(%error, "placement events not published");
        }
    }

    fn event(&self, change: Change, at_ms: i64) -> Option<PlacementEvent> {
        // Every coordinator sees every edge come and go; the owner of `node/<id>` speaks.
        let speaks = |n: &str| self.cluster.owns(&format!("node/{n}"));
        let (kind, connection, node_id) = match change {
            Change::Attached(c) => (Kind::Attach, Some(c), String::new()),
            Change::Detached(c) => (Kind::Detach, Some(c), String::new()),
            Change::NodeUp(n) if speaks(&n) => (Kind::NodeUp, None, n),
            Change::NodeDown(n) if speaks(&n) => (Kind::NodeDown, None, n),
            Change::NodeUp(_) | Change::NodeDown(_) => return None,
        };
        let node_id = connection.as_ref().map_or(node_id, |c| c.node_id.clone());
        Some(PlacementEvent {
            kind: kind.into(),
            connection,
            node_id,
            at_ms,
        })
    }
}

/// The message, carrying the current span's trace context to the edges.
fn traced(mut out: Outgoing) -> Outgoing {
    bus::trace::inject(&tracing::Span::current(), &mut out.headers);
    out
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// How often each coordinator asks who is on the bus ([`Coordinator::census`]).
pub const CENSUS_EVERY: Duration = Duration::from_secs(5);
/// How long a census waits for answers.
pub const CENSUS_WAIT: Duration = Duration::from_millis(500);

/// Which edges one targeted call concerns ([`Coordinator::plan`]).
#[derive(Debug, Default)]
struct Plan {
    /// Edges to ask, each with the target it should apply.
    ask: Vec<(String, Target)>,
    /// Suspect edges holding targets: told without waiting, reported unconfirmed.
    suspect: Vec<(String, Target)>,
    /// Edges that may hold targets this directory does not know yet: reported unconfirmed.
    unknown: Vec<String>,
}

fn decode_report(payload: &[u8]) -> Option<DeliveryReport> {
    DeliveryReport::decode(payload)
        .inspect_err(|error| tracing::warn!(%error, "undecodable delivery report"))
        .ok()
}

/// Adds one edge's report into a total.
pub(crate) fn add(total: &mut DeliveryReport, payload: &[u8]) {
    if let Some(r) = decode_report(payload) {
        merge(total, &r);
    }
}

/// Lists `nodes` as unconfirmed in `total` (sorted, each once).
pub(crate) fn add_unconfirmed(total: &mut DeliveryReport, nodes: impl IntoIterator<Item = String>) {
    total.unconfirmed.extend(nodes);
    total.unconfirmed.sort();
    total.unconfirmed.dedup();
}

/// Adds `r` into `total`; an edge counted by two coordinators is one node. An edge may be
/// both answered and unconfirmed (one coordinator's part of it answered, another's did not).
pub(crate) fn merge(total: &mut DeliveryReport, r: &DeliveryReport) {
    total.delivered += r.delivered;
    total.refused += r.refused;
    for id in &r.node_ids {
        if !total.node_ids.contains(id) {
            total.node_ids.push(id.clone());
        }
    }
    total.node_ids.sort();
    total.nodes = u32::try_from(total.node_ids.len()).unwrap_or(u32::MAX);
    add_unconfirmed(total, r.unconfirmed.iter().cloned());
}

/// How a publication's payload reaches clients: as bytes (a binary frame) rather than JSON,
/// and never compressed.
#[derive(Debug, Clone, Copy, Default)]
pub struct PayloadForm {
    pub binary: bool,
    pub uncompressed: bool,
}
