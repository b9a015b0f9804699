//! The gRPC services: proto ↔ domain, routing across coordinators, and domain errors →
//! `Status` (only here).
//!
//! Any coordinator answers any call. A call about one `namespace/user` goes to the key's owner
//! on the ring; a call no key pins down (every namespace, a conn id, listings, totals) asks
//! every coordinator for its share and merges. Calls between coordinators carry the
//! [`LOCAL`] metadata key: "answer from your own directory, do not forward".
//!
//! A peer call takes at most one request timeout. A peer that cannot be connected to leaves
//! the ring until it announces again; one that answers anything (even an error) stays, and
//! one that does not answer in time makes the answer uncertain: its part of a delivery is
//! `unconfirmed`, a placement answer is `complete: false`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use prost::Message as _;
use proto::subject;
use proto::v1::messaging_client::MessagingClient;
use proto::v1::messaging_server::Messaging;
use proto::v1::placement_client::PlacementClient;
use proto::v1::placement_server::Placement;
use proto::v1::{
    BroadcastRequest, Connection, DeliveryReport, DisconnectRequest, HistoryRequest,
    HistoryResponse, ListConnectionsRequest, ListConnectionsResponse, ListNodesRequest,
    ListNodesResponse, LocateRequest, LocateResponse, Node, PlacementEvent, PlacementEvents,
    PresenceRequest, PresenceResponse, PublishRequest, SendRequest, StatsRequest, StatsResponse,
    Target, WatchRequest,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::access::Caller;
use crate::cluster::Owner;
use crate::messaging::{Coordinator, DeliveryError, add_unconfirmed, merge};
use crate::placement::Filter;

/// Metadata key on calls between coordinators.
pub const LOCAL: &str = "sb-local";
/// Largest ListConnections page.
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;
/// Placement events buffered per Watch stream; a watcher further behind loses events.
const WATCH_BUFFER: usize = 1024;

/// `switchboard.v1.Messaging`.
#[derive(Debug, Clone)]
pub struct MessagingService(pub Coordinator);

/// `switchboard.v1.Placement`.
#[derive(Debug, Clone)]
pub struct PlacementService(pub Coordinator);

impl From<DeliveryError> for Status {
    fn from(e: DeliveryError) -> Self {
        match e {
            DeliveryError::InvalidArgument(m) => Status::invalid_argument(m),
            DeliveryError::Bus(e) => Status::unavailable(format!("bus unavailable: {e}")),
            DeliveryError::Disconnected => Status::unavailable("bus disconnected; try again"),
            DeliveryError::History(m) => Status::unavailable(m),
            e @ DeliveryError::NotSent(_) => Status::unavailable(e.to_string()),
        }
    }
}

/// The span of one Messaging call, a child of the caller's trace context (`traceparent`
/// metadata) when it sent one. The parent is set before the span is first entered.
fn call_span<T>(name: &'static str, r: &Request<T>) -> tracing::Span {
    let span = tracing::info_span!("grpc", otel.name = name);
    let md = r.metadata();
    let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
    bus::trace::follow_with(&span, &get);
    span
}

/// "Answer from your own share": honoured only from a peer coordinator (or from anyone on an
/// unauthenticated cluster), so that no other caller can get a partial answer that looks
/// whole.
fn is_local<T>(c: &Coordinator, r: &Request<T>) -> bool {
    if !r.metadata().contains_key(LOCAL) {
        return false;
    }
    match Caller::of(r) {
        Caller::Anonymous => c.peer_authorization().is_none(),
        caller => caller.is_coordinator(),
    }
}

/// A request to a peer, marked local.
fn local<T>(msg: T, coordinator: &Coordinator) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(LOCAL, tonic::metadata::MetadataValue::from_static("1"));
    if let Some(auth) = coordinator.peer_authorization() {
        r.metadata_mut().insert("authorization", auth.clone());
    }
    r.set_timeout(coordinator.timeout());
    let md = r.metadata_mut();
    bus::trace::inject_with(&tracing::Span::current(), &mut |k, v| {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
            tonic::metadata::MetadataValue::try_from(v),
        ) {
            md.insert(k, v);
        }
    });
    r
}

type PeerCall<T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send>>;

/// What every peer answered.
struct Gathered<T> {
    answers: Vec<T>,
    /// Peers that did not answer: their share is missing.
    silent: Vec<String>,
}

/// Asks every peer (marked local) in parallel and returns the answers that came in time.
async fn gather<T, F>(c: &Coordinator, call: F) -> Gathered<T>
where
    F: Fn(Channel) -> PeerCall<T>,
{
    let peers = c.cluster().peers();
    let calls = peers.iter().map(|(_, ch)| within(c, call(ch.clone())));
    let mut out = Gathered {
        answers: Vec::new(),
        silent: Vec::new(),
    };
    for ((id, _), r) in peers.iter().zip(futures::future::join_all(calls).await) {
        match r {
            Ok(resp) => out.answers.push(resp.into_inner()),
            Err(status) => {
                peer_error(c, id, &status);
                out.silent.push(id.clone());
            }
        }
    }
    out
}

/// A peer call bounded by one request timeout on this side: a stopped peer never answers,
/// whatever deadline it was sent.
async fn within<T>(c: &Coordinator, call: PeerCall<T>) -> Result<Response<T>, Status> {
    tokio::time::timeout(c.timeout(), call)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("peer did not answer in time")))
}

/// Whether the call never reached the peer (connecting failed): then nothing was done there.
fn is_unreachable(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Whether the peer may have done the call without saying so (timed out, or the connection
/// broke mid-call), as opposed to answering with an error.
fn is_uncertain(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    ) || std::error::Error::source(status).is_some()
}

/// Logs a failed peer call; a peer that cannot be connected to leaves the ring until it
/// announces again (one that answers, even with an error, is alive).
fn peer_error(c: &Coordinator, id: &str, status: &Status) {
    tracing::warn!(node = id, code = ?status.code(), message = status.message(), "peer call failed");
    if is_unreachable(status) {
        c.cluster().peer_failed(id);
    }
}

/// The payload as JSON text: `payload_json` verbatim (checked), else `payload`, else null.
fn payload(value: Option<&prost_types::Value>, json: &str) -> Result<Vec<u8>, Status> {
    if !json.is_empty() {
        serde_json::from_str::<&serde_json::value::RawValue>(json).map_err(|e| {
            Status::invalid_argument(format!("payload_json is not valid JSON: {e}"))
        })?;
        return Ok(json.as_bytes().to_vec());
    }
    let value = value.map_or(serde_json::Value::Null, proto::json::from_value);
    Ok(value.to_string().into_bytes())
}

fn message_id(id: &str) -> Result<(), Status> {
    proto::frame::validate_message_id(id).map_err(Status::invalid_argument)
}

fn target(namespace: &str, user: &str, conn_id: &str) -> Result<Target, Status> {
    if conn_id.is_empty() && user.is_empty() {
        return Err(Status::invalid_argument("set user or conn_id"));
    }
    let conn_ids = if conn_id.is_empty() {
        Vec::new()
    } else {
        vec![conn_id.to_owned()]
    };
    Ok(Target {
        namespace: namespace.to_owned(),
        user: user.to_owned(),
        conn_ids,
    })
}

impl MessagingService {
    /// Runs a targeted call (Send, Disconnect) where the target lives: at the key's owner, or
    /// at every coordinator when no key pins it down. `here` does the local part; `there`
    /// forwards to a peer.
    async fn targeted<R, H, HF>(
        &self,
        req: R,
        t: &Target,
        here: H,
        there: fn(Channel, Request<R>) -> PeerCall<DeliveryReport>,
    ) -> Result<DeliveryReport, Status>
    where
        R: Clone + Send + 'static,
        H: Fn() -> HF,
        HF: Future<Output = Result<DeliveryReport, DeliveryError>>,
    {
        let c = &self.0;
        if t.namespace.is_empty() || !t.conn_ids.is_empty() {
            // Before any peer is asked: an error must mean nothing was delivered.
            c.check_bus()?;
            let (mine, theirs) =
                futures::join!(here(), gather(c, |ch| there(ch, local(req.clone(), c))));
            let mut total = mine?;
            for r in &theirs.answers {
                merge(&mut total, r);
            }
            add_unconfirmed(&mut total, theirs.silent);
            return Ok(total);
        }
        // An owner that cannot be reached has died: the ring moves the key, try again.
        for _ in 0..3 {
            match c.cluster().owner(&t.namespace, &t.user) {
                Owner::Me => return Ok(here().await?),
                Owner::Peer(id, ch) => match within(c, there(ch, local(req.clone(), c))).await {
                    Ok(r) => return Ok(r.into_inner()),
                    Err(status) if is_unreachable(&status) => peer_error(c, &id, &status),
                    Err(status) if is_uncertain(&status) => {
                        peer_error(c, &id, &status);
                        let mut total = DeliveryReport::default();
                        add_unconfirmed(&mut total, [id]);
                        return Ok(total);
                    }
                    // The owner answered: its error is the answer.
                    Err(status) => return Err(status),
                },
            }
        }
        Ok(here().await?)
    }
}

#[tonic::async_trait]
impl Messaging for MessagingService {
    async fn send(
        &self,
        request: Request<SendRequest>,
    ) -> Result<Response<DeliveryReport>, Status> {
        let span = call_span("Messaging.Send", &request);
        async move {
            let is_local = is_local(&self.0, &request);
            let r = request.into_inner();
            if r.r#type.is_empty() {
                return Err(Status::invalid_argument("type is required"));
            }
            let (body, binary) = match &r.payload_binary {
                Some(bytes) => (bytes.clone(), true),
                None => (payload(r.payload.as_ref(), &r.payload_json)?, false),
            };
            message_id(&r.message_id)?;
            let t = target(&r.namespace, &r.user, &r.conn_id)?;
            let frame = proto::v1::Deliver {
                target: None,
                r#type: r.r#type.clone(),
                payload: body,
                message_id: r.message_id.clone(),
                binary,
                uncompressed: r.uncompressed,
            };
            let here = || self.0.send(t.clone(), &frame);
            if is_local {
                return Ok(Response::new(here().await?));
            }
            let there: fn(Channel, Request<SendRequest>) -> PeerCall<DeliveryReport> =
                |ch, req| Box::pin(async move { MessagingClient::new(ch).send(req).await });
            let started = tokio::time::Instant::now();
            let report = self.targeted(r.clone(), &t, here, there).await?;
            self.0.metrics().record("send", &report);
            self.0
                .metrics()
                .send_duration
                .observe(started.elapsed().as_secs_f64());
            Ok(Response::new(report))
        }
        .instrument(span)
        .await
    }

    async fn broadcast(
        &self,
        request: Request<BroadcastRequest>,
    ) -> Result<Response<DeliveryReport>, Status> {
        let span = call_span("Messaging.Broadcast", &request);
        async move {
            let r = request.into_inner();
            if r.r#type.is_empty() {
                return Err(Status::invalid_argument("type is required"));
            }
            let (body, binary) = match r.payload_binary {
                Some(bytes) => (bytes, true),
                None => (payload(r.payload.as_ref(), &r.payload_json)?, false),
            };
            message_id(&r.message_id)?;
            let b = proto::v1::Broadcast {
                namespace: r.namespace,
                r#type: r.r#type,
                payload: body,
                skip_conn_ids: r.skip_conn_ids,
                skip_users: r.skip_users,
                message_id: r.message_id,
                binary,
                uncompressed: r.uncompressed,
            };
            let report = self.0.broadcast(b).await?;
            self.0.metrics().record("broadcast", &report);
            Ok(Response::new(report))
        }
        .instrument(span)
        .await
    }

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<DeliveryReport>, Status> {
        let span = call_span("Messaging.Publish", &request);
        async move {
            let r = request.into_inner();
            if r.namespace.is_empty() {
                return Err(Status::invalid_argument("namespace is required"));
            }
            let (body, binary) = match r.payload_binary {
                Some(bytes) => (bytes, true),
                None => (payload(r.payload.as_ref(), &r.payload_json)?, false),
            };
            message_id(&r.message_id)?;
            let form = crate::messaging::PayloadForm {
                binary,
                uncompressed: r.uncompressed,
            };
            let report = self
                .0
                .publish(&r.namespace, &r.topic, body, &r.message_id, form)
                .await?;
            self.0.metrics().record("publish", &report);
            Ok(Response::new(report))
        }
        .instrument(span)
        .await
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let span = call_span("Messaging.History", &request);
        async move {
            let r = request.into_inner();
            if r.namespace.is_empty() {
                return Err(Status::invalid_argument("namespace is required"));
            }
            proto::topic::validate_topic(&r.topic)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let Some(history) = self.0.history() else {
                return Err(Status::failed_precondition(
                    "this cluster keeps no topic history",
                ));
            };
            let Some(rule) = history.rule_for(&r.topic) else {
                return Err(Status::not_found(format!(
                    "topic {:?} keeps no history (no edge route declares a rule for it)",
                    r.topic
                )));
            };
            let size = usize::try_from(rule.size).unwrap_or(usize::MAX);
            let limit = match usize::try_from(r.limit).unwrap_or(usize::MAX) {
                0 => size,
                n if n <= size => n,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "limit must be at most the rule's size, {size}"
                    )));
                }
            };
            let since = (!r.since_epoch.is_empty()).then_some(r.since_epoch.as_str());
            let after = if since.is_some() { r.since_offset } else { 0 };
            let read = history
                .store
                .read(&rule, &r.namespace, &r.topic, after)
                .await
                .map_err(|e| Status::unavailable(format!("{e}; try again")))?;
            self.0.metrics().calls.inc("history");
            Ok(Response::new(crate::history::page(read, since, limit)))
        }
        .instrument(span)
        .await
    }

    async fn disconnect(
        &self,
        request: Request<DisconnectRequest>,
    ) -> Result<Response<DeliveryReport>, Status> {
        let span = call_span("Messaging.Disconnect", &request);
        async move {
            let is_local = is_local(&self.0, &request);
            let r = request.into_inner();
            let code = if r.code == 0 { 1000 } else { r.code };
            if !(1000..=4999).contains(&code) || matches!(code, 1004..=1006 | 1015) {
                let msg = format!("{code} is not a close code a server may send");
                return Err(Status::invalid_argument(msg));
            }
            if r.reason.len() > 123 {
                return Err(Status::invalid_argument("reason is longer than 123 bytes"));
            }
            let t = target(&r.namespace, &r.user, &r.conn_id)?;
            let here = || self.0.disconnect(t.clone(), code, r.reason.clone(), r.hard);
            if is_local {
                return Ok(Response::new(here().await?));
            }
            let there: fn(Channel, Request<DisconnectRequest>) -> PeerCall<DeliveryReport> =
                |ch, req| Box::pin(async move { MessagingClient::new(ch).disconnect(req).await });
            let report = self.targeted(r.clone(), &t, here, there).await?;
            self.0.metrics().record("disconnect", &report);
            Ok(Response::new(report))
        }
        .instrument(span)
        .await
    }
}

impl PlacementService {
    /// This coordinator's page, with live buffered bytes asked of the edges.
    async fn local_page(&self, r: &ListConnectionsRequest, size: usize) -> ListConnectionsResponse {
        let filter = Filter {
            namespace: r.namespace.clone(),
            user: r.user.clone(),
            node_id: r.node_id.clone(),
            topic: r.topic.clone(),
        };
        let (mut connections, next) = self.0.directory().list(&filter, &r.page_token, size);
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for c in &connections {
            by_node
                .entry(c.node_id.clone())
                .or_default()
                .push(c.conn_id.clone());
        }
        let asks = by_node.into_iter().map(|(node, ids)| {
            let coord = self.0.clone();
            async move { coord.inspect(&node, ids).await }
        });
        let mut buffered = HashMap::new();
        for reply in futures::future::join_all(asks).await {
            buffered.extend(reply.buffered_bytes);
        }
        for c in &mut connections {
            c.buffered_bytes = buffered.get(&c.conn_id).copied().unwrap_or(0);
        }
        ListConnectionsResponse {
            connections,
            next_page_token: next.unwrap_or_default(),
            complete: self.0.is_complete(),
        }
    }

    fn local_nodes(&self) -> Vec<Node> {
        let dir = self.0.directory();
        let now = self.0.now();
        let wall = crate::messaging::unix_ms();
        dir.nodes()
            .map(|n| Node {
                node_id: n.node_id.clone(),
                address: n.address.clone(),
                connections: n.connection_count() as u64,
                state: n.state().to_owned(),
                last_seen_ms: wall
                    - i64::try_from(now.saturating_sub(n.last_seen).as_millis()).unwrap_or(0),
            })
            .collect()
    }

    fn local_stats(&self) -> StatsResponse {
        let dir = self.0.directory();
        let mut s = StatsResponse {
            connections: dir.connection_count() as u64,
            complete: dir.is_complete(&self.0.cluster().ring_members()),
            ..StatsResponse::default()
        };
        for c in dir.connections() {
            *s.by_namespace.entry(c.namespace.clone()).or_default() += 1;
            *s.by_node.entry(c.node_id.clone()).or_default() += 1;
        }
        for n in dir.nodes() {
            s.by_node.entry(n.node_id.clone()).or_default();
        }
        s
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<PlacementEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Placement for PlacementService {
    async fn locate(
        &self,
        request: Request<LocateRequest>,
    ) -> Result<Response<LocateResponse>, Status> {
        let is_local = is_local(&self.0, &request);
        let r = request.into_inner();
        if r.user.is_empty() {
            return Err(Status::invalid_argument("user is required"));
        }
        let here = || {
            let connections = self.0.directory().locate(&r.namespace, &r.user);
            LocateResponse {
                connections,
                complete: self.0.is_complete(),
            }
        };
        if is_local {
            return Ok(Response::new(here()));
        }
        if r.namespace.is_empty() {
            let mut all = here();
            let c = &self.0;
            let call = |ch: Channel| -> PeerCall<LocateResponse> {
                let req = local(r.clone(), c);
                Box::pin(async move { PlacementClient::new(ch).locate(req).await })
            };
            let theirs = gather(c, call).await;
            all.complete &= theirs.silent.is_empty();
            for resp in theirs.answers {
                all.connections.extend(resp.connections);
                all.complete &= resp.complete;
            }
            all.connections.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
            return Ok(Response::new(all));
        }
        // An owner that cannot be reached has died: the ring moves the key, try again.
        for _ in 0..3 {
            match self.0.cluster().owner(&r.namespace, &r.user) {
                Owner::Me => break,
                Owner::Peer(id, ch) => {
                    let req = local(r.clone(), &self.0);
                    let call = async move { PlacementClient::new(ch).locate(req).await };
                    match within(&self.0, Box::pin(call)).await {
                        Ok(resp) => return Ok(resp),
                        Err(status) if is_unreachable(&status) => {
                            peer_error(&self.0, &id, &status);
                        }
                        Err(status) => {
                            peer_error(&self.0, &id, &status);
                            let message = format!("the owner coordinator {id} did not answer");
                            return Err(Status::unavailable(message));
                        }
                    }
                }
            }
        }
        Ok(Response::new(here()))
    }

    async fn list_connections(
        &self,
        request: Request<ListConnectionsRequest>,
    ) -> Result<Response<ListConnectionsResponse>, Status> {
        let is_local = is_local(&self.0, &request);
        let r = request.into_inner();
        let size = match r.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let mine = self.local_page(&r, size).await;
        if is_local {
            return Ok(Response::new(mine));
        }
        // Every coordinator's page starts after the same token and is sorted by conn id:
        // merging them and keeping the first `size` gives the cluster's page.
        let c = &self.0;
        let call = |ch: Channel| -> PeerCall<ListConnectionsResponse> {
            let req = local(r.clone(), c);
            Box::pin(async move { PlacementClient::new(ch).list_connections(req).await })
        };
        let pages = gather(c, call).await;
        let mut more = !mine.next_page_token.is_empty();
        let mut complete = mine.complete && pages.silent.is_empty();
        let mut all: Vec<Connection> = mine.connections;
        for p in pages.answers {
            more |= !p.next_page_token.is_empty();
            complete &= p.complete;
            all.extend(p.connections);
        }
        all.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
        more |= all.len() > size;
        all.truncate(size);
        let next_page_token = if more {
            all.last().map(|c| c.conn_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListConnectionsResponse {
            connections: all,
            next_page_token,
            complete,
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let is_local = is_local(&self.0, &request);
        let mut nodes: BTreeMap<String, Node> = self
            .local_nodes()
            .into_iter()
            .map(|n| (n.node_id.clone(), n))
            .collect();
        let coordinators = self
            .0
            .cluster()
            .members()
            .into_iter()
            .map(|(node_id, address)| proto::v1::Coordinator { node_id, address })
            .collect();

        if !is_local {
            let c = &self.0;
            let call = |ch: Channel| -> PeerCall<ListNodesResponse> {
                let req = local(ListNodesRequest {}, c);
                Box::pin(async move { PlacementClient::new(ch).list_nodes(req).await })
            };
            // Each coordinator holds its share of an edge's connections: add them up.
            for resp in gather(c, call).await.answers {
                for n in resp.nodes {
                    let slot = nodes.entry(n.node_id.clone()).or_insert_with(|| Node {
                        connections: 0,
                        ..n.clone()
                    });
                    slot.connections += n.connections;
                    slot.last_seen_ms = slot.last_seen_ms.max(n.last_seen_ms);
                }
            }
        }
        let nodes = nodes.into_values().collect();
        Ok(Response::new(ListNodesResponse {
            nodes,
            coordinators,
        }))
    }

    async fn presence(
        &self,
        request: Request<PresenceRequest>,
    ) -> Result<Response<PresenceResponse>, Status> {
        let is_local = is_local(&self.0, &request);
        let r = request.into_inner();
        if r.namespace.is_empty() {
            return Err(Status::invalid_argument("namespace is required"));
        }
        let mut users: BTreeSet<String> = self.0.directory().presence(&r.namespace, &r.topic);
        let mut complete = self.0.is_complete();
        if !is_local {
            let c = &self.0;
            let call = |ch: Channel| -> PeerCall<PresenceResponse> {
                let req = local(r.clone(), c);
                Box::pin(async move { PlacementClient::new(ch).presence(req).await })
            };
            let theirs = gather(c, call).await;
            complete &= theirs.silent.is_empty();
            for resp in theirs.answers {
                users.extend(resp.users);
                complete &= resp.complete;
            }
        }
        Ok(Response::new(PresenceResponse {
            users: users.into_iter().collect(),
            complete,
        }))
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let is_local = is_local(&self.0, &request);
        let mut s = self.local_stats();
        if !is_local {
            let c = &self.0;
            let call = |ch: Channel| -> PeerCall<StatsResponse> {
                let req = local(StatsRequest {}, c);
                Box::pin(async move { PlacementClient::new(ch).stats(req).await })
            };
            let theirs = gather(c, call).await;
            s.complete &= theirs.silent.is_empty();
            for other in theirs.answers {
                s.complete &= other.complete;
                s.connections += other.connections;
                for (k, v) in other.by_namespace {
                    *s.by_namespace.entry(k).or_default() += v;
                }
                for (k, v) in other.by_node {
                    *s.by_node.entry(k).or_default() += v;
                }
            }
        }
        s.nodes = u32::try_from(s.by_node.len()).unwrap_or(u32::MAX);
        s.coordinators = u32::try_from(self.0.cluster().ring().members().len()).unwrap_or(u32::MAX);
        Ok(Response::new(s))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let f = request.into_inner();
        let bus = self.0.bus();
        let sub = bus
            .subscribe(subject::PLACEMENT_EVENTS.to_owned(), None)
            .await
            .map_err(|e| Status::unavailable(format!("bus unavailable: {e}")))?;
        let keep = move |e: &PlacementEvent| {
            let node_ok = f.node_id.is_empty() || e.node_id == f.node_id;
            let conn_ok = match &e.connection {
                Some(c) => {
                    (f.namespace.is_empty() || c.namespace == f.namespace)
                        && (f.user.is_empty() || c.user == f.user)
                }
                None => f.user.is_empty() && f.namespace.is_empty(),
            };
            node_ok && conn_ok
        };
        let events = sub
            .flat_map(move |m| {
                let batch = PlacementEvents::decode(m.payload.as_ref()).unwrap_or_default();
                let kept: Vec<Result<PlacementEvent, Status>> =
                    batch.events.into_iter().filter(&keep).map(Ok).collect();
                futures::stream::iter(kept)
            })
            .ready_chunks(WATCH_BUFFER)
            .flat_map(futures::stream::iter);
        Ok(Response::new(Box::pin(events)))
    }
}
