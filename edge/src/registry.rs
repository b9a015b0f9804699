//! The shell of the edge's local index ([`edge_core::index`]): the index under one lock,
//! one bus subscription per active (namespace, filter), and its pump, which frames each
//! publication once per dialect and hands the same bytes to every local subscriber. What
//! the index decides (the per-user limit, which filters of a connection overlap, the report
//! delta of every change) is pure and tested there; this file does the I/O around it.
//!
//! A topic's subscribers live in its [`Subscribers`] list, which the index edits under the
//! registry lock and the pump reads without it: one lock and one reference count per batch
//! of publications, whatever the number of subscribers.
//!
//! A backend's `message_id` (on a Deliver, a Broadcast, or a topic publication's
//! `Sb-Message-Id` header) is checked and hashed once per message; each recipient's record
//! ([`edge_core::recent`]) says whether it already has it. One that has it is not sent the
//! message again and counts as delivered in the edge's answer: the connection has the
//! message. Messages without an id take none of this: no clock read, no hash, no lock, no
//! allocation.
//!
//! **Invariant:** the index lock is never held across `.await`; fan-out takes one lock per
//! message, not per recipient (and, for a message with an id, one per recipient's record).

use std::collections::hash_map::RandomState;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bus::{Message, Outgoing, SharedBus, Subscription};
use edge_core::history::{Feed, Live, Position};
use edge_core::index::{Handle, Index, JoinError, Subscribers};
use edge_core::recent::MessageKey;
use edge_core::session::Subscribed;
use futures::{FutureExt as _, StreamExt};
use prost::Message as _;
use proto::frame::{FrameBuilder, Key, json_or_string};
use proto::subject;
use proto::v1::{Connection, DeliveryReport, ReportBatch, Target};
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use ulid::Ulid;

use crate::handle::{CloseRequest, ConnHandle, Delivery};
use crate::history::{History, Join, Joining, READ_LIMIT};
use crate::metrics::Metrics;
use crate::transport::{Batch, Direct, Out, Outlet, Wire, msgpack};

/// How long a subscriber waits for the bus subscription of a new topic.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The index and what its changes need: the bus for topic subscriptions, the tasks that
/// pump them, the metrics they count, and the wake-up of the report log's reader.
#[derive(Debug)]
pub(crate) struct Registry {
    index: Mutex<Index<ConnHandle, Arc<Topic>>>,
    node_id: String,
    bus: SharedBus,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    /// Something was logged (or a full report is due): the report's reader looks.
    reports: Notify,
    /// The key of message id hashes, random per process: ids a backend chooses cannot be
    /// made to collide.
    ids: RandomState,
    /// Topic history, when this edge keeps any.
    history: Option<History>,
}

/// A backend's message id, checked and hashed once per message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MessageId<'a> {
    text: &'a str,
    key: MessageKey,
}

/// One active topic filter in one namespace: what its pump needs.
#[derive(Debug)]
pub(crate) struct Topic {
    subscribers: Subscribers<ConnHandle>,
    ready: watch::Sender<Ready>,
    stop: CancellationToken,
    /// On a concrete history topic: the subscribers joining its feed.
    joining: Option<Joining>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ready {
    Pending,
    Yes,
    Failed,
}

/// Why a subscription could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SubscribeError {
    #[error("bus subscription failed")]
    Bus(#[from] bus::BusError),
    #[error("bus subscription not ready in time")]
    Timeout,
    #[error("subscription refused by the index")]
    Refused(#[from] JoinError),
    #[error("subscription ended before it was confirmed")]
    Ended,
    #[error("history unavailable")]
    History(#[from] bus::HistoryError),
}

impl Handle for ConnHandle {
    type Id = Ulid;

    fn id(&self) -> Ulid {
        self.info().id
    }

    fn namespace(&self) -> &str {
        &self.info().namespace
    }

    fn user(&self) -> &str {
        &self.info().user
    }

    fn user_limit(&self) -> usize {
        self.info().route.cfg.max_connections_per_user
    }

    fn same_route(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.info().route, &other.info().route)
    }

    fn record(&self) -> Connection {
        let info = self.info();
        Connection {
            remote_addr: info.remote.to_string(),
            connected_at_ms: info.connected_at_ms,
            route: info.route.cfg.path.clone(),
            context: Some(proto::json::to_struct(&info.claims)),
            params: info.params.iter().cloned().collect(),
            ..Connection::default()
        }
    }
}

/// How a connection's pushed frames look: its routing field, whether they carry the
/// message's `message_id` (its dialect has a place for it and the message has one), and its
/// wire form (MessagePack, permessage-deflate from a size on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Form {
    key: Key,
    message_id: bool,
    wire: Wire,
}

/// Forms without compression: each routing field, with and without `message_id`, in JSON
/// or MessagePack.
const FORMS: usize = 4 * Key::ALL.len();

impl Form {
    fn of(h: &ConnHandle, has_id: bool) -> Self {
        let cfg = &h.info().route.cfg;
        Self {
            key: cfg.key(),
            message_id: has_id && cfg.dialect.row().message_id,
            wire: h.wire(),
        }
    }

    /// Its slot among the uncompressed forms; compressed forms (rare, and keyed by their
    /// route's `min_size` too) are looked up in a short list.
    fn index(self) -> Option<usize> {
        if self.wire.deflate_from.is_some() {
            return None;
        }
        let mut i = self.key.index();
        if self.message_id {
            i += Key::ALL.len();
        }
        if self.wire.msgpack {
            i += 2 * Key::ALL.len();
        }
        Some(i)
    }
}

/// Something built once per form of a fan-out.
struct PerForm<T> {
    plain: [Option<T>; FORMS],
    deflated: Vec<(Form, T)>,
}

impl<T> PerForm<T> {
    fn new() -> Self {
        Self {
            plain: std::array::from_fn(|_| None),
            deflated: Vec::new(),
        }
    }

    fn get_or_insert_with(&mut self, form: Form, make: impl FnOnce() -> T) -> &mut T {
        if let Some(i) = form.index() {
            return self.plain[i].get_or_insert_with(make);
        }
        let at = match self.deflated.iter().position(|(f, _)| *f == form) {
            Some(at) => at,
            None => {
                self.deflated.push((form, make()));
                self.deflated.len() - 1
            }
        };
        &mut self.deflated[at].1
    }
}

/// A payload for clients: JSON text, or bytes for a binary frame.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Payload<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) binary: bool,
    /// May be compressed (false: HyperExpress's `compress = false`).
    pub(crate) compress: bool,
}

/// Whether a connection takes binary payloads (its route has `binary: true`).
fn takes_binary(h: &ConnHandle) -> bool {
    h.info().route.cfg.binary
}

/// Delivered/refused counts of one fan-out.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    pub(crate) delivered: u64,
    pub(crate) refused: u64,
    /// Connections that had the message already (its id within the window): not sent it
    /// again, and counted as delivered in the report.
    pub(crate) duplicates: u64,
}

impl Tally {
    fn add(&mut self, d: Delivery) {
        match d {
            Delivery::Queued => self.delivered += 1,
            Delivery::Refused => self.refused += 1,
            Delivery::Gone => {}
        }
    }

    /// Connections that have the message: those it was queued or written to now, and
    /// those that had it already.
    pub(crate) fn reached(self) -> u64 {
        self.delivered + self.duplicates
    }

    /// This edge's answer to a coordinator. A connection that had the message already
    /// counts as delivered: so a retry with the same message id answers truthfully.
    pub(crate) fn report(self, node_id: &str) -> DeliveryReport {
        DeliveryReport {
            delivered: self.reached(),
            refused: self.refused,
            nodes: 1,
            node_ids: vec![node_id.to_owned()],
            ..DeliveryReport::default()
        }
    }
}

impl Registry {
    /// The registry of node `node_id` (its connections' report records name it); topic
    /// pumps run on `tracker`.
    pub(crate) fn new(
        node_id: String,
        bus: SharedBus,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        history: Option<History>,
    ) -> Self {
        Self {
            index: Mutex::new(Index::new(node_id.clone())),
            node_id,
            bus,
            metrics,
            tracker,
            reports: Notify::new(),
            ids: RandomState::new(),
            history,
        }
    }

    /// Topic history, when this edge keeps any.
    pub(crate) fn history(&self) -> Option<&History> {
        self.history.as_ref()
    }

    /// A backend's message id, once per message: `None` when it is empty, or invalid (then
    /// the message goes out as one without an id: only a coordinator checks what backends
    /// send, and a backend may publish on a topic's subject directly).
    pub(crate) fn message_id<'a>(&self, id: &'a str) -> Option<MessageId<'a>> {
        if id.is_empty() || proto::frame::validate_message_id(id).is_err() {
            return None;
        }
        Some(MessageId {
            text: id,
            key: MessageKey::of(&self.ids, id),
        })
    }

    pub(crate) fn node_id(&self) -> &str {
        &self.node_id
    }

    pub(crate) fn bus(&self) -> &SharedBus {
        &self.bus
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn wake_reports(&self) {
        self.reports.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, Index<ConnHandle, Arc<Topic>>> {
        self.index.lock().expect("registry poisoned")
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    pub(crate) fn topic_count(&self) -> usize {
        self.lock().topic_count()
    }

    /// Adds a connection; refuses when its user holds too many on this route.
    pub(crate) fn attach(&self, handle: &ConnHandle) -> bool {
        let attached = self.lock().attach(handle.clone()).is_ok();
        if attached {
            self.wake_reports();
        }
        attached
    }

    /// Removes a connection and its topic subscriptions (those still being made too).
    pub(crate) fn detach(&self, handle: &ConnHandle) {
        let stopped = self.lock().detach(handle.id());
        for topic in stopped {
            topic.stop.cancel();
        }
        self.wake_reports();
    }

    /// Adds `handle` to the subscribers of `filter`, creating the bus subscription if this
    /// edge had no subscriber of it; returns once publications are flowing. On a concrete
    /// history topic the topic's pump serves the join (crate::history): the outcome says
    /// the client's position and whether it recovered from `since`.
    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        handle: &ConnHandle,
        filter: &str,
        since: Option<Position>,
    ) -> Result<Subscribed, SubscribeError> {
        let id = handle.id();
        let ns = &handle.info().namespace;
        let rule = self
            .history
            .as_ref()
            .filter(|_| !filter.contains(['+', '#']))
            .and_then(|h| h.rule_for(filter))
            .cloned();
        let (done, outcome) = oneshot::channel();
        let (topic, life, created) = {
            let mut index = self.lock();
            // Held before it enters the list: see crate::history.
            let joining = index.state(ns, filter).and_then(|t| t.joining.as_ref());
            if let Some(j) = joining {
                j.hold(id);
            }
            let joined = index.subscribe(id, filter, |subscribers| {
                let joining = rule.clone().map(|r| Joining::new(r, ns, filter));
                if let Some(j) = &joining {
                    j.hold(id);
                }
                Arc::new(Topic {
                    subscribers: subscribers.clone(),
                    ready: watch::channel(Ready::Pending).0,
                    stop: CancellationToken::new(),
                    joining,
                })
            });
            let joined = match joined {
                Ok(j) => j,
                Err(e) => {
                    if let Some(j) = index.state(ns, filter).and_then(|t| t.joining.as_ref()) {
                        j.release(id);
                    }
                    return Err(e.into());
                }
            };
            if let Some(j) = &joined.state.joining {
                j.push(Join {
                    conn: handle.clone(),
                    since: since.clone(),
                    done,
                    ahead_since: None,
                });
            }
            (Arc::clone(joined.state), joined.topic, joined.created)
        };
        if created {
            self.wake_reports();
            match self.open_topic(ns, filter, &topic).await {
                Ok((subs, feed)) => {
                    topic.ready.send_replace(Ready::Yes);
                    self.tracker
                        .spawn(pump(Arc::clone(self), Arc::clone(&topic), subs, feed));
                }
                Err(e) => {
                    topic.ready.send_replace(Ready::Failed);
                    topic.stop.cancel();
                    // Everyone waiting for this topic fails with it; the next subscriber
                    // makes it anew.
                    self.lock().drop_topic(ns, filter, life);
                    self.wake_reports();
                    return Err(e);
                }
            }
        } else {
            let mut rx = topic.ready.subscribe();
            let waited =
                tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx.wait_for(|r| *r != Ready::Pending))
                    .await;
            let ready = match waited {
                Ok(Ok(r)) => *r == Ready::Yes,
                Ok(Err(_)) | Err(_) => false,
            };
            if !ready {
                self.unsubscribe(handle, filter);
                return Err(SubscribeError::Timeout);
            }
        }
        let how = if topic.joining.is_some() {
            match tokio::time::timeout(SUBSCRIBE_TIMEOUT, outcome).await {
                Ok(Ok(how)) => how,
                Ok(Err(_)) => return Err(SubscribeError::Ended),
                Err(_) => {
                    self.unsubscribe(handle, filter);
                    return Err(SubscribeError::Timeout);
                }
            }
        } else {
            Subscribed::Live {
                position: None,
                // Only a concrete history topic recovers.
                recovered: since.map(|_| false),
            }
        };
        if !self.lock().confirm(id, filter) {
            return Err(SubscribeError::Ended);
        }
        self.wake_reports();
        Ok(how)
    }

    /// Removes `handle` from the subscribers of `filter`; the connection's younger
    /// overlapping filters stop deferring to it.
    pub(crate) fn unsubscribe(&self, handle: &ConnHandle, filter: &str) {
        let stopped = self.lock().unsubscribe(handle.id(), filter);
        if let Some(topic) = stopped {
            topic.stop.cancel();
        }
        self.wake_reports();
    }

    /// Waits for changes and returns the next report batch (a full one is built under the
    /// lock, and the log switches back to deltas in the same step).
    pub(crate) async fn next_report(&self, address: &str) -> ReportBatch {
        loop {
            let notified = self.reports.notified();
            let batch = self.lock().next_batch();
            if let Some(batch) = batch {
                if batch.more {
                    self.wake_reports();
                }
                return batch.into_report(&self.node_id, address);
            }
            notified.await;
        }
    }

    /// Makes the next report batch a full one.
    pub(crate) fn resync_reports(&self) {
        self.lock().resync();
        self.wake_reports();
    }

    /// Every connection, for drain, broadcast and snapshots.
    pub(crate) fn all(&self) -> Vec<ConnHandle> {
        self.lock().conns().cloned().collect()
    }

    /// The connections a command's target names.
    pub(crate) fn select(&self, target: &Target) -> Vec<ConnHandle> {
        self.lock().select(target)
    }

    pub(crate) fn get(&self, id: &str) -> Option<ConnHandle> {
        let id = Ulid::from_string(id).ok()?;
        self.lock().get(&id).cloned()
    }
}

/// Delivers `{"<key>": msg_type, "message_id"?: id, "payload": payload}` to `handles`,
/// except to those that had message `id` already. A binary payload goes as a binary frame of
/// its bytes alone, and only to connections of routes that take binary frames.
pub(crate) fn deliver_typed<'h>(
    metrics: &Metrics,
    handles: impl Iterator<Item = &'h ConnHandle>,
    msg_type: &str,
    payload: Payload<'_>,
    id: Option<MessageId<'_>>,
) -> Tally {
    let json = (!payload.binary).then(|| json_or_string(payload.bytes));
    let build = |form: Form| {
        let out = match &json {
            None if form.wire.msgpack => {
                let key = form.key.as_str();
                Out::binary(msgpack::envelope(key, msg_type, None, payload.bytes).into())
            }
            None => Out::binary(bytes::Bytes::copy_from_slice(payload.bytes)),
            Some(json) => {
                let frame = FrameBuilder::new(form.key, msg_type);
                let frame = match id {
                    Some(id) if form.message_id => frame.str("message_id", id.text),
                    _ => frame,
                };
                Out::from(frame.raw("payload", json).finish())
            }
        };
        out.encoded(form.wire, payload.compress)
    };
    let mut frames: PerForm<Out> = PerForm::new();
    let mut tally = Tally::default();
    let now = id.map(|_| Instant::now());
    for h in handles {
        if payload.binary && !takes_binary(h) {
            continue;
        }
        if let (Some(id), Some(now)) = (id, now)
            && !h.first(id.key, now)
        {
            tally.duplicates += 1;
            continue;
        }
        let form = Form::of(h, id.is_some());
        let delivery = Outlet::deliver(h, frames.get_or_insert_with(form, || build(form)));
        if let (Delivery::Refused, Some(id)) = (delivery, id) {
            h.forget(id.key);
        }
        tally.add(delivery);
    }
    metrics.record_fanout(tally.delivered, tally.refused);
    metrics.messages_duplicate.add(tally.duplicates);
    tally
}

/// Closes the connections a Disconnect names.
pub(crate) fn disconnect(handles: &[ConnHandle], code: u16, reason: &str, hard: bool) -> Tally {
    let code = if code == 0 { 1000 } else { code };
    for h in handles {
        Outlet::close(
            h,
            CloseRequest {
                code,
                reason: reason.to_owned(),
                hard,
            },
        );
    }
    Tally {
        delivered: handles.len() as u64,
        ..Tally::default()
    }
}

impl Registry {
    /// Opens a new topic's bus subscriptions and, on a history topic, its feed: storage's
    /// position once the subscriptions are up (whatever is stored later arrives live).
    async fn open_topic(
        &self,
        ns: &str,
        filter: &str,
        topic: &Topic,
    ) -> Result<(Vec<Subscription>, Option<Feed>), SubscribeError> {
        let subs = self.open_subscriptions(ns, filter).await?;
        let feed = match (&topic.joining, &self.history) {
            (Some(j), Some(h)) => {
                let state = tokio::time::timeout(SUBSCRIBE_TIMEOUT, h.store.state(&j.rule))
                    .await
                    .map_err(|_| SubscribeError::Timeout)??;
                Some(Feed::new(state.epoch, state.last))
            }
            _ => None,
        };
        Ok((subs, feed))
    }

    async fn open_subscriptions(
        &self,
        ns: &str,
        filter: &str,
    ) -> Result<Vec<Subscription>, SubscribeError> {
        let mut subjects = subject::topic_filter(ns, filter);
        // Stored history publications come on their own subjects, where only JetStream
        // sends: a filter that some rule's topics can match hears those too.
        if let Some(h) = &self.history
            && h.rules
                .iter()
                .any(|r| proto::topic::overlaps(&r.pattern, filter))
        {
            subjects.extend(subject::live_filter(ns, filter));
        }
        let mut subs = Vec::new();
        for s in subjects {
            subs.push(self.bus.subscribe(s, None).await?);
        }
        // Make sure the server has the subscriptions before the client hears "subscribed".
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.bus.flush())
            .await
            .map_err(|_| SubscribeError::Timeout)??;
        Ok(subs)
    }
}

/// Publications a pump takes in one go at most.
const PUMP_BATCH: usize = 256;
/// Direct socket writes between two yields, so that a large fan-out does not hold its
/// thread for long.
const WRITES_PER_YIELD: usize = 256;

async fn pump(
    registry: Arc<Registry>,
    topic: Arc<Topic>,
    subs: Vec<Subscription>,
    mut feed: Option<Feed>,
) {
    let mut messages = futures::stream::select_all(subs);
    let mut batch = Vec::new();
    let joining = topic.joining.as_ref();
    loop {
        let first = tokio::select! {
            () = topic.stop.cancelled() => break,
            () = async { joining.expect("guarded").wake.notified().await }, if joining.is_some() => {
                if let (Some(j), Some(f)) = (joining, feed.as_mut()) {
                    serve_joins(&registry, &topic, j, f).await;
                }
                continue;
            }
            // Joins ahead of the feed, when nothing else comes (crate::history).
            // (An async block: no timer is made unless the branch is on.)
            () = async { tokio::time::sleep(crate::history::AHEAD_TICK).await }, if joining.is_some_and(Joining::waits) => {
                if let (Some(j), Some(f)) = (joining, feed.as_mut()) {
                    serve_joins(&registry, &topic, j, f).await;
                }
                continue;
            }
            m = messages.next() => match m {
                Some(msg) => msg,
                None => break,
            },
        };
        // Whatever else has arrived goes out with it: one write per socket for all of them.
        batch.push(first);
        while batch.len() < PUMP_BATCH {
            match messages.next().now_or_never() {
                Some(Some(msg)) => batch.push(msg),
                _ => break,
            }
        }
        let pubs: Vec<Publication> = batch
            .drain(..)
            .filter_map(|m| Publication::new(&registry, m))
            .collect();
        let pubs = match (&mut feed, joining) {
            (Some(f), Some(j)) => follow_feed(&registry, &topic, j, f, pubs).await,
            _ => pubs,
        };
        publish_local(&registry, &topic, pubs).await;
        // Joins ahead of the feed may now be level with it.
        if let (Some(j), Some(f)) = (joining, feed.as_mut())
            && j.waits()
        {
            serve_joins(&registry, &topic, j, f).await;
        }
    }
}

/// Serves a history topic's waiting joins (crate::history).
async fn serve_joins(registry: &Registry, topic: &Topic, joining: &Joining, feed: &mut Feed) {
    let Some(history) = &registry.history else {
        return;
    };
    // All of a joiner's missed publications, or none: a recovery that does not fit in its
    // outbound queue is answered `recovered: false` rather than cut short.
    let queue = |conn: &ConnHandle, stored: &[&bus::history::Stored]| {
        let binary = takes_binary(conn);
        let frames: Vec<Out> = stored
            .iter()
            .map(|m| Publication::stored(registry, joining.topic.clone(), m))
            .filter(|p| binary || p.bytes.is_none())
            .map(|p| p.message(Form::of(conn, p.id.is_some())))
            .collect();
        let bytes = frames.iter().map(|f| f.len()).sum();
        if !conn.has_room(frames.len(), bytes) {
            return false;
        }
        for f in &frames {
            let _ = Outlet::deliver(conn, f);
        }
        registry.metrics.history_recovered.add(frames.len() as u64);
        true
    };
    let served =
        crate::history::serve_joins(&history.store, joining, feed, &topic.stop, queue).await;
    if served.new_epoch {
        tell_gap(registry, topic, &joining.topic, feed, feed.delivered() + 1);
    }
}

/// A history topic's live publications checked against its feed: repeats dropped, and
/// before a publication whose predecessor never arrived, the missed ones read from storage
/// (subscribers are told of a hole storage cannot fill).
async fn follow_feed(
    registry: &Registry,
    topic: &Topic,
    joining: &Joining,
    feed: &mut Feed,
    pubs: Vec<Publication>,
) -> Vec<Publication> {
    let Some(history) = &registry.history else {
        return pubs;
    };
    let mut out = Vec::with_capacity(pubs.len());
    for p in pubs {
        let Some(offset) = p.offset else {
            // Published on the live subject directly, not stored: delivered as it is.
            out.push(p);
            continue;
        };
        match feed.classify(offset, p.previous) {
            Live::Next => {}
            Live::Repeat => {
                // Within one epoch a live offset never goes back: storage was made anew.
                let state = tokio::time::timeout(READ_LIMIT, history.store.state(&joining.rule));
                match state.await {
                    Ok(Ok(state)) if state.epoch != feed.epoch => {
                        feed.restart(state.epoch, offset.saturating_sub(1));
                        tell_gap(registry, topic, &p.concrete, feed, offset);
                    }
                    _ => continue,
                }
            }
            Live::Gap { after } => {
                let read =
                    history
                        .store
                        .read(&joining.rule, &joining.namespace, &joining.topic, after);
                let read = match tokio::time::timeout(READ_LIMIT, read).await {
                    Ok(Ok(read)) => Some(read),
                    _ => None,
                };
                let mut whole = false;
                if let Some(read) = &read
                    && read.epoch != feed.epoch
                {
                    // Storage was made anew: this publication starts the new epoch's feed.
                    feed.restart(read.epoch.clone(), offset.saturating_sub(1));
                } else if let Some(read) = read {
                    let missed: Vec<_> = read
                        .messages
                        .into_iter()
                        .filter(|m| m.offset > after && m.offset < offset)
                        .collect();
                    whole = read.complete && missed.iter().any(|m| m.offset == p.previous);
                    registry
                        .metrics
                        .history_gaps_filled
                        .add(missed.len() as u64);
                    out.extend(
                        missed
                            .iter()
                            .map(|m| Publication::stored(registry, p.concrete.clone(), m)),
                    );
                }
                if !whole {
                    tell_gap(registry, topic, &p.concrete, feed, offset);
                }
            }
        }
        feed.advance(offset);
        out.push(p);
    }
    out
}

/// Tells a history topic's subscribers that publications before `offset` may be missing
/// (`{"type":"gap",…}`): their copy of the topic must be fetched anew.
fn tell_gap(registry: &Registry, topic: &Topic, concrete: &str, feed: &Feed, offset: u64) {
    registry.metrics.history_gaps_unfilled.inc();
    let build = |form: Form| {
        let frame = FrameBuilder::new(form.key, "gap")
            .str("topic", concrete)
            .str("epoch", &feed.epoch)
            .value("offset", &serde_json::Value::from(offset))
            .finish();
        Out::from(frame).encoded(form.wire, true)
    };
    let mut frames: PerForm<Out> = PerForm::new();
    let subs = topic.subscribers.snapshot();
    let held = topic
        .joining
        .as_ref()
        .map(Joining::held_now)
        .unwrap_or_default();
    for s in subs.iter() {
        if !held.contains(&s.conn.id()) {
            let form = Form::of(&s.conn, false);
            let _ = Outlet::deliver(&s.conn, frames.get_or_insert_with(form, || build(form)));
        }
    }
}

/// One topic publication on its way to this edge's subscribers of one filter.
struct Publication {
    concrete: String,
    /// JSON text, or the bytes of a binary publication.
    payload: String,
    bytes: Option<bytes::Bytes>,
    compress: bool,
    /// The backend's message id (`Sb-Message-Id`) and its key.
    id: Option<(String, MessageKey)>,
    /// Its position, when it was stored in history, and the position of the topic's
    /// publication before it (0: none).
    offset: Option<u64>,
    previous: u64,
    /// The publishing connection, when it does not want its own message back.
    skip: Option<Ulid>,
    reply: Option<String>,
    span: tracing::Span,
    tally: Tally,
}

impl Publication {
    fn new(registry: &Registry, msg: Message) -> Option<Self> {
        let (_, concrete) = subject::parse_topic(&msg.subject)?;
        // Positions are trusted only from JetStream's republish, on subjects nobody else
        // may publish to; a plain publication is delivered without one.
        let stored = msg.subject.starts_with(subject::LIVE_PREFIX);
        let header_u64 = |name| {
            let v = msg.headers.get(name).filter(|_| stored)?;
            v.parse::<u64>().ok()
        };
        let offset = header_u64(subject::HEADER_OFFSET);
        let previous = header_u64(subject::HEADER_PREVIOUS).unwrap_or(0);
        // The republish carries no reply subject: a coordinator that stored it names its
        // inbox in a header (and only a coordinator's inbox is answered).
        let reply = match msg.reply {
            Some(r) => Some(r),
            None if offset.is_some() => msg
                .headers
                .get(subject::HEADER_REPORT_TO)
                .filter(|r| r.starts_with(&format!("{}.", subject::COORDINATOR_INBOX)))
                .map(str::to_owned),
            None => None,
        };
        let span = if bus::trace::is_traced(&msg.headers) {
            let span = tracing::info_span!("edge.publish", topic = %concrete, delivered = tracing::field::Empty);
            bus::trace::follow(&span, &msg.headers);
            span
        } else {
            tracing::Span::none()
        };
        let mut p = Self::of(registry, concrete, &msg.headers, &msg.payload);
        p.offset = offset;
        p.previous = previous;
        p.reply = reply;
        p.span = span;
        Some(p)
    }

    /// A publication read from history (a recovered or gap-filled one): delivered like the
    /// live one was, without a report.
    fn stored(registry: &Registry, concrete: String, stored: &bus::history::Stored) -> Self {
        let mut p = Self::of(registry, concrete, &stored.headers, &stored.payload);
        p.offset = Some(stored.offset);
        p
    }

    fn of(registry: &Registry, concrete: String, headers: &bus::Headers, payload: &[u8]) -> Self {
        let id = headers
            .get(subject::HEADER_MESSAGE_ID)
            .and_then(|id| registry.message_id(id))
            .map(|id| (id.text.to_owned(), id.key));
        let origin = headers
            .get(subject::HEADER_ORIGIN)
            .and_then(|o| Ulid::from_string(o).ok());
        let echo = headers.get(subject::HEADER_ECHO).is_some();
        let binary = headers.get(subject::HEADER_BINARY).is_some();
        Self {
            payload: if binary {
                String::new()
            } else {
                json_or_string(payload)
            },
            bytes: binary.then(|| bytes::Bytes::copy_from_slice(payload)),
            compress: headers.get(subject::HEADER_COMPRESS) != Some("0"),
            concrete,
            id,
            offset: None,
            previous: 0,
            skip: if echo { None } else { origin },
            reply: None,
            span: tracing::Span::none(),
            tally: Tally::default(),
        }
    }

    /// The message in one form (built once per batch, by its [`Batch`]).
    fn message(&self, form: Form) -> Out {
        let out = match &self.bytes {
            Some(bytes) if form.wire.msgpack => {
                let key = form.key.as_str();
                let topic = Some(self.concrete.as_str());
                Out::binary(msgpack::envelope(key, "message", topic, bytes).into())
            }
            Some(bytes) => Out::binary(bytes.clone()),
            None => {
                let mut frame = FrameBuilder::new(form.key, "message").str("topic", &self.concrete);
                if let Some(offset) = self.offset {
                    frame = frame.value("offset", &serde_json::Value::from(offset));
                }
                let frame = match &self.id {
                    Some((id, _)) if form.message_id => frame.str("message_id", id),
                    _ => frame,
                };
                Out::from(frame.raw("payload", &self.payload).finish())
            }
        };
        out.encoded(form.wire, self.compress)
    }
}

/// A batch of publications to this edge's subscribers of one filter. Each dialect's messages
/// are built once, and framed once per transport kind into one buffer; a subscriber whose
/// connection can take it now gets that buffer in one write, the others get the messages
/// queued.
async fn publish_local(registry: &Registry, topic: &Topic, mut pubs: Vec<Publication>) {
    if pubs.is_empty() {
        return;
    }
    // Only a batch with message ids reads the clock and keeps, per subscriber, which
    // publications it had already.
    let has_ids = pubs.iter().any(|p| p.id.is_some());
    let now = has_ids.then(Instant::now);
    let mut had: Vec<bool> = if has_ids {
        vec![false; pubs.len()]
    } else {
        Vec::new()
    };
    // A snapshot: the loop yields, and the lock is never held across an await.
    let subs = topic.subscribers.snapshot();
    // Subscribers of a history topic whose join the pump has not served yet: read after the
    // snapshot, since a joiner is held before it enters the list (crate::history).
    let held = topic
        .joining
        .as_ref()
        .map(Joining::held_now)
        .unwrap_or_default();
    let mut batches: PerForm<Batch> = PerForm::new();
    let (mut writes, mut direct_frames, mut direct_bytes) = (0usize, 0u64, 0u64);
    for s in subs.iter() {
        let h = &s.conn;
        let form = Form::of(h, has_ids);
        let conn = h.id();
        if !held.is_empty() && held.contains(&conn) {
            continue;
        }
        // Not the publisher's own (unless it asked), and not one an older overlapping filter
        // of the same connection delivers.
        let binary = takes_binary(h);
        let wanted = |p: &Publication| {
            p.skip != Some(conn) && !s.shadowed(&p.concrete) && (binary || p.bytes.is_none())
        };
        if let Some(now) = now {
            mark_had(h, &pubs, wanted, now, &mut had);
        }
        let had = |i: usize| had.get(i).copied().unwrap_or(false);
        // The publications from this index on are queued; those before it were written.
        let mut queue_from = 0;
        let batch = batches.get_or_insert_with(form, || {
            Batch::new(pubs.iter().map(|p| p.message(form)).collect())
        });
        if pubs.iter().enumerate().all(|(i, p)| wanted(p) && !had(i)) {
            queue_from = match Outlet::try_write(h, batch) {
                Direct::Written => pubs.len(),
                Direct::Partial { queue_from } => queue_from,
                Direct::Busy => 0,
            };
        }
        for ((i, p), message) in pubs.iter_mut().enumerate().zip(batch.messages()) {
            if i < queue_from {
                p.tally.delivered += 1;
                direct_frames += 1;
                direct_bytes += message.len() as u64;
            } else if had(i) {
                p.tally.duplicates += 1;
            } else if wanted(p) {
                let delivery = Outlet::deliver(h, message);
                if let (Delivery::Refused, Some((_, key))) = (delivery, &p.id) {
                    h.forget(*key);
                }
                p.tally.add(delivery);
            }
        }
        if queue_from > 0 {
            writes += 1;
            if writes % WRITES_PER_YIELD == 0 {
                tokio::task::yield_now().await;
            }
        }
    }
    let metrics = &registry.metrics;
    metrics.frames_out.add(direct_frames);
    metrics.bytes_out.add(direct_bytes);
    for p in pubs {
        metrics.record_fanout(p.tally.delivered, p.tally.refused);
        metrics.messages_duplicate.add(p.tally.duplicates);
        p.span.record("delivered", p.tally.reached());
        if let Some(reply) = p.reply {
            let out = Outgoing::new(reply, p.tally.report(&registry.node_id).encode_to_vec());
            if let Err(error) = registry.bus.publish(out).await {
                tracing::debug!(%error, "publish report not sent");
            }
        }
    }
}

/// Sets `had[i]` when connection `h` wants publication `i` and had its message id already
/// (recording the new ones as received): one lock of its record for the whole batch, and
/// no record made for a connection that wants none of the ids.
fn mark_had(
    h: &ConnHandle,
    pubs: &[Publication],
    wanted: impl Fn(&Publication) -> bool,
    now: Instant,
    had: &mut [bool],
) {
    had.fill(false);
    if !pubs.iter().any(|p| p.id.is_some() && wanted(p)) {
        return;
    }
    let at = now.into_std();
    h.with_recent(now, |recent| {
        for (p, had) in pubs.iter().zip(had.iter_mut()) {
            if let Some((_, key)) = &p.id
                && wanted(p)
            {
                *had = !recent.first(*key, at);
            }
        }
    });
}
