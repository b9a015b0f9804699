//! The edge's local index: connections by id and by user, and topic filters with their
//! local subscribers. One bus subscription per active (namespace, filter); its pump frames
//! each publication once per dialect and hands the same bytes to every local subscriber.
//!
//! A connection whose filters overlap (`#`, `+/#` and `x/y`) hears each publication once:
//! every subscriber entry lists the connection's *older* filters that overlap it (none for
//! almost every entry), and a pump skips a publication one of them matches, since the
//! oldest matching filter's pump delivers it. A new filter never makes an older one skip
//! anything, so subscribing loses nothing; an unsubscribe takes the filter out of the lists
//! of the connection's younger ones.
//!
//! **Invariant:** the index lock is never held across `.await`; fan-out takes one lock per
//! message, not per recipient.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bus::{Message, Outgoing, Subscription};
use futures::{FutureExt as _, StreamExt};
use prost::Message as _;
use proto::frame::{FrameBuilder, Key, json_or_string};
use proto::subject;
use proto::v1::{DeliveryReport, Target, delta};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use ulid::Ulid;

use crate::conn::{CloseRequest, ConnHandle, Delivery};
use crate::report;
use crate::server::Shared;
use crate::transport::{Batch, Direct, Outlet};

/// How long a subscriber waits for the bus subscription of a new topic.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    conns: HashMap<Ulid, ConnHandle>,
    users: HashMap<String, Vec<ConnHandle>>,
    topics: HashMap<(String, String), Arc<Topic>>,
}

/// One active topic filter in one namespace.
#[derive(Debug)]
pub(crate) struct Topic {
    subscribers: Mutex<Vec<Subscriber>>,
    ready: watch::Sender<Ready>,
    stop: CancellationToken,
}

/// A connection holding a topic filter.
#[derive(Debug, Clone)]
struct Subscriber {
    handle: ConnHandle,
    /// The connection's filters, subscribed before this one, that overlap it; `None` when
    /// there are none (the common case costs one branch per delivery).
    older: Option<Arc<[String]>>,
}

impl Subscriber {
    /// Whether an older filter of the connection matches `topic`: its pump delivers it.
    fn shadowed(&self, topic: &str) -> bool {
        self.older
            .as_ref()
            .is_some_and(|o| o.iter().any(|f| proto::topic::matches(f, topic)))
    }
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
}

/// The whole index at one instant, for a full report.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) conns: Vec<ConnHandle>,
    /// Topic filters per connection.
    pub(crate) by_conn: HashMap<Ulid, Vec<String>>,
    /// Active (namespace, filter) pairs on this edge.
    pub(crate) active: Vec<(String, String)>,
}

fn node_topic(namespace: &str, topic: &str, active: bool) -> delta::Kind {
    delta::Kind::NodeTopic(proto::v1::NodeTopic {
        namespace: namespace.to_owned(),
        topic: topic.to_owned(),
        active,
    })
}

/// Frames of one message, built lazily once per dialect.
struct Frames<'a> {
    build: &'a (dyn Fn(Key) -> String + Sync),
    cache: [Option<Utf8Bytes>; 3],
}

impl<'a> Frames<'a> {
    fn new(build: &'a (dyn Fn(Key) -> String + Sync)) -> Self {
        Self {
            build,
            cache: [None, None, None],
        }
    }

    fn get(&mut self, key: Key) -> &Utf8Bytes {
        self.cache[key.index()].get_or_insert_with(|| (self.build)(key).into())
    }
}

/// Delivered/refused counts of one fan-out.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    pub(crate) delivered: u64,
    pub(crate) refused: u64,
}

impl Tally {
    fn add(&mut self, d: Delivery) {
        match d {
            Delivery::Queued => self.delivered += 1,
            Delivery::Refused => self.refused += 1,
            Delivery::Gone => {}
        }
    }

    /// This edge's answer to a coordinator.
    pub(crate) fn report(self, node_id: &str) -> DeliveryReport {
        DeliveryReport {
            delivered: self.delivered,
            refused: self.refused,
            nodes: 1,
            node_ids: vec![node_id.to_owned()],
        }
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("registry poisoned")
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().conns.len()
    }

    pub(crate) fn topic_count(&self) -> usize {
        self.lock().topics.len()
    }

    /// Adds a connection; refuses when its user holds too many on this route.
    pub(crate) fn attach(&self, shared: &Shared, handle: &ConnHandle) -> bool {
        let info = handle.info();
        let limit = info.route.cfg.max_connections_per_user;
        let mut inner = self.lock();
        if limit > 0 && !info.user.is_empty() {
            let held = inner.users.get(&info.user).map_or(0, |v| {
                v.iter()
                    .filter(|h| {
                        h.info().namespace == info.namespace
                            && Arc::ptr_eq(&h.info().route, &info.route)
                    })
                    .count()
            });
            if held >= limit {
                return false;
            }
        }
        inner.conns.insert(info.id, handle.clone());
        inner
            .users
            .entry(info.user.clone())
            .or_default()
            .push(handle.clone());
        shared.reporter.push(delta::Kind::Attach(report::connection(
            handle,
            &shared.node_id,
            &[],
        )));
        true
    }

    /// Removes a connection and its topic subscriptions.
    pub(crate) fn detach<'a>(
        &self,
        shared: &Shared,
        handle: &ConnHandle,
        topics: impl Iterator<Item = &'a String>,
    ) {
        for filter in topics {
            // The connection is going: no younger filter needs its list updated.
            self.unsubscribe(shared, handle, filter, std::iter::empty());
        }
        let info = handle.info();
        let mut inner = self.lock();
        if inner.conns.remove(&info.id).is_none() {
            return;
        }
        if let Some(list) = inner.users.get_mut(&info.user) {
            list.retain(|h| h.id() != info.id);
            if list.is_empty() {
                inner.users.remove(&info.user);
            }
        }
        shared
            .reporter
            .push(delta::Kind::Detach(report::conn_ref(handle)));
    }

    /// Adds `handle` to the subscribers of `filter`, creating the bus subscription if this
    /// edge had no subscriber of it; returns once publications are flowing. `held` are the
    /// filters the connection already holds.
    pub(crate) async fn subscribe<'a>(
        &self,
        shared: &Arc<Shared>,
        handle: &ConnHandle,
        filter: &str,
        held: impl Iterator<Item = &'a String>,
    ) -> Result<(), SubscribeError> {
        let older: Vec<String> = held
            .filter(|f| proto::topic::overlaps(f, filter))
            .cloned()
            .collect();
        let subscriber = Subscriber {
            handle: handle.clone(),
            older: (!older.is_empty()).then(|| older.into()),
        };
        let ns = handle.info().namespace.clone();
        let topic_key = (ns.clone(), filter.to_owned());
        let (topic, created) = {
            let mut inner = self.lock();
            let mut created = false;
            let topic = inner
                .topics
                .entry(topic_key.clone())
                .or_insert_with(|| {
                    created = true;
                    Arc::new(Topic {
                        subscribers: Mutex::new(Vec::new()),
                        ready: watch::channel(Ready::Pending).0,
                        stop: CancellationToken::new(),
                    })
                })
                .clone();
            topic
                .subscribers
                .lock()
                .expect("topic poisoned")
                .push(subscriber);
            if created {
                shared.reporter.push(node_topic(&ns, filter, true));
            }
            (topic, created)
        };
        if created {
            match open_subscriptions(shared, &ns, filter).await {
                Ok(subs) => {
                    topic.ready.send_replace(Ready::Yes);
                    shared
                        .tracker
                        .spawn(pump(Arc::clone(shared), Arc::clone(&topic), subs));
                }
                Err(e) => {
                    topic.ready.send_replace(Ready::Failed);
                    self.drop_topic(shared, &topic_key, &topic);
                    return Err(e);
                }
            }
        } else {
            let mut rx = topic.ready.subscribe();
            let waited =
                tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx.wait_for(|r| *r != Ready::Pending))
                    .await;
            match waited {
                Ok(Ok(r)) if *r == Ready::Yes => {}
                Ok(_) => {
                    self.remove_subscriber(shared, &topic_key, handle);
                    return Err(SubscribeError::Timeout);
                }
                Err(_) => {
                    self.remove_subscriber(shared, &topic_key, handle);
                    return Err(SubscribeError::Timeout);
                }
            }
        }
        let change = report::topic_change(handle, filter);
        shared.reporter.push(delta::Kind::Subscribe(change));
        Ok(())
    }

    /// Removes `handle` from the subscribers of `filter`; `remaining` are the filters the
    /// connection keeps, whose lists of older overlapping filters lose this one.
    pub(crate) fn unsubscribe<'a>(
        &self,
        shared: &Shared,
        handle: &ConnHandle,
        filter: &str,
        remaining: impl Iterator<Item = &'a String>,
    ) {
        let ns = &handle.info().namespace;
        let key = (ns.clone(), filter.to_owned());
        let removed = self.remove_subscriber(shared, &key, handle);
        for other in remaining.filter(|f| proto::topic::overlaps(f, filter)) {
            let inner = self.lock();
            let Some(topic) = inner.topics.get(&(ns.clone(), other.clone())) else {
                continue;
            };
            let mut subs = topic.subscribers.lock().expect("topic poisoned");
            if let Some(s) = subs.iter_mut().find(|s| s.handle.id() == handle.id())
                && let Some(older) = &s.older
            {
                let kept: Vec<String> = older.iter().filter(|f| *f != filter).cloned().collect();
                s.older = (!kept.is_empty()).then(|| kept.into());
            }
        }
        if removed {
            shared
                .reporter
                .push(delta::Kind::Unsubscribe(report::topic_change(
                    handle, filter,
                )));
        }
    }

    fn remove_subscriber(
        &self,
        shared: &Shared,
        key: &(String, String),
        handle: &ConnHandle,
    ) -> bool {
        let mut inner = self.lock();
        let Some(topic) = inner.topics.get(key).cloned() else {
            return false;
        };
        let mut subs = topic.subscribers.lock().expect("topic poisoned");
        let before = subs.len();
        subs.retain(|s| s.handle.id() != handle.id());
        let removed = subs.len() < before;
        if subs.is_empty() {
            drop(subs);
            inner.topics.remove(key);
            topic.stop.cancel();
            shared.reporter.push(node_topic(&key.0, &key.1, false));
        }
        removed
    }

    fn drop_topic(&self, shared: &Shared, key: &(String, String), topic: &Arc<Topic>) {
        let mut inner = self.lock();
        if inner.topics.get(key).is_some_and(|t| Arc::ptr_eq(t, topic)) {
            inner.topics.remove(key);
            shared.reporter.push(node_topic(&key.0, &key.1, false));
        }
        topic.stop.cancel();
    }

    /// Every connection, for drain, broadcast and snapshots.
    pub(crate) fn all(&self) -> Vec<ConnHandle> {
        self.lock().conns.values().cloned().collect()
    }

    /// Every connection with its topic filters, taken under the index lock; `during` runs
    /// under the same lock (the reporter switches back to deltas there).
    pub(crate) fn snapshot(&self, during: impl FnOnce()) -> Snapshot {
        let inner = self.lock();
        let mut by_conn: HashMap<Ulid, Vec<String>> = HashMap::new();
        for ((_, filter), topic) in &inner.topics {
            for s in topic.subscribers.lock().expect("topic poisoned").iter() {
                by_conn
                    .entry(s.handle.id())
                    .or_default()
                    .push(filter.clone());
            }
        }
        let conns = inner.conns.values().cloned().collect();
        let active = inner.topics.keys().cloned().collect();
        during();
        Snapshot {
            conns,
            by_conn,
            active,
        }
    }

    /// The connections a command's target names.
    pub(crate) fn select(&self, target: &Target) -> Vec<ConnHandle> {
        let inner = self.lock();
        if !target.conn_ids.is_empty() {
            return target
                .conn_ids
                .iter()
                .filter_map(|id| Ulid::from_string(id).ok())
                .filter_map(|id| inner.conns.get(&id).cloned())
                .filter(|h| target.namespace.is_empty() || h.info().namespace == target.namespace)
                .collect();
        }
        inner
            .users
            .get(&target.user)
            .map(|list| {
                list.iter()
                    .filter(|h| {
                        target.namespace.is_empty() || h.info().namespace == target.namespace
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn get(&self, id: &str) -> Option<ConnHandle> {
        let id = Ulid::from_string(id).ok()?;
        self.lock().conns.get(&id).cloned()
    }
}

/// Delivers `{"<key>": msg_type, "payload": payload}` to `handles`.
pub(crate) fn deliver_typed<'h>(
    shared: &Shared,
    handles: impl Iterator<Item = &'h ConnHandle>,
    msg_type: &str,
    payload: &[u8],
) -> Tally {
    let payload = json_or_string(payload);
    let build = |key: Key| {
        FrameBuilder::new(key, msg_type)
            .raw("payload", &payload)
            .finish()
    };
    let mut frames = Frames::new(&build);
    let mut tally = Tally::default();
    for h in handles {
        tally.add(Outlet::deliver(h, frames.get(h.info().route.cfg.key())));
    }
    shared.metrics.record_fanout(tally);
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
        refused: 0,
    }
}

async fn open_subscriptions(
    shared: &Shared,
    ns: &str,
    filter: &str,
) -> Result<Vec<Subscription>, SubscribeError> {
    let mut subs = Vec::new();
    for s in subject::topic_filter(ns, filter) {
        subs.push(shared.bus.subscribe(s, None).await?);
    }
    // Make sure the server has the subscriptions before the client hears "subscribed".
    tokio::time::timeout(SUBSCRIBE_TIMEOUT, shared.bus.flush())
        .await
        .map_err(|_| SubscribeError::Timeout)??;
    Ok(subs)
}

/// Publications a pump takes in one go at most.
const PUMP_BATCH: usize = 256;
/// Direct socket writes between two yields, so that a large fan-out does not hold its
/// thread for long.
const WRITES_PER_YIELD: usize = 256;

async fn pump(shared: Arc<Shared>, topic: Arc<Topic>, subs: Vec<Subscription>) {
    let mut messages = futures::stream::select_all(subs);
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            () = topic.stop.cancelled() => break,
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
        publish_local(&shared, &topic, &mut batch).await;
    }
}

/// One topic publication on its way to this edge's subscribers of one filter.
struct Publication {
    concrete: String,
    payload: String,
    /// The publishing connection, when it does not want its own message back.
    skip: Option<Ulid>,
    reply: Option<String>,
    span: tracing::Span,
    tally: Tally,
}

impl Publication {
    fn new(msg: Message) -> Option<Self> {
        let (_, concrete) = subject::parse_topic(&msg.subject)?;
        let origin = msg
            .headers
            .get(subject::HEADER_ORIGIN)
            .and_then(|o| Ulid::from_string(o).ok());
        let echo = msg.headers.get(subject::HEADER_ECHO).is_some();
        let span = if bus::trace::is_traced(&msg.headers) {
            let span = tracing::info_span!("edge.publish", topic = %concrete, delivered = tracing::field::Empty);
            bus::trace::follow(&span, &msg.headers);
            span
        } else {
            tracing::Span::none()
        };
        Some(Self {
            payload: json_or_string(&msg.payload),
            concrete,
            skip: if echo { None } else { origin },
            reply: msg.reply,
            span,
            tally: Tally::default(),
        })
    }

    /// The message in one dialect (built once per batch, by its [`Batch`]).
    fn message(&self, key: Key) -> Utf8Bytes {
        FrameBuilder::new(key, "message")
            .str("topic", &self.concrete)
            .raw("payload", &self.payload)
            .finish()
            .into()
    }
}

/// A batch of publications to this edge's subscribers of one filter. Each dialect's messages
/// are built once, and framed once per transport kind into one buffer; a subscriber whose
/// connection can take it now gets that buffer in one write, the others get the messages
/// queued.
async fn publish_local(shared: &Shared, topic: &Topic, batch: &mut Vec<Message>) {
    let mut pubs: Vec<Publication> = batch.drain(..).filter_map(Publication::new).collect();
    if pubs.is_empty() {
        return;
    }
    // A snapshot: the loop yields, and the lock is never held across an await.
    let subs: Vec<Subscriber> = topic.subscribers.lock().expect("topic poisoned").clone();
    let mut batches: [Option<Batch>; 3] = [None, None, None];
    let (mut writes, mut direct_frames, mut direct_bytes) = (0usize, 0u64, 0u64);
    for s in &subs {
        let h = &s.handle;
        let key = h.info().route.cfg.key();
        let id = h.id();
        // Not the publisher's own (unless it asked), and not one an older overlapping filter
        // of the same connection delivers.
        let wanted = |p: &Publication| p.skip != Some(id) && !s.shadowed(&p.concrete);
        // The publications from this index on are queued; those before it were written.
        let mut queue_from = 0;
        let batch = batches[key.index()]
            .get_or_insert_with(|| Batch::new(pubs.iter().map(|p| p.message(key)).collect()));
        if pubs.iter().all(wanted) {
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
            } else if wanted(p) {
                p.tally.add(Outlet::deliver(h, message));
            }
        }
        if queue_from > 0 {
            writes += 1;
            if writes % WRITES_PER_YIELD == 0 {
                tokio::task::yield_now().await;
            }
        }
    }
    shared.metrics.frames_out.add(direct_frames);
    shared.metrics.bytes_out.add(direct_bytes);
    for p in pubs {
        shared.metrics.record_fanout(p.tally);
        p.span.record("delivered", p.tally.delivered);
        if let Some(reply) = p.reply {
            let out = Outgoing::new(reply, p.tally.report(&shared.node_id).encode_to_vec());
            if let Err(error) = shared.bus.publish(out).await {
                tracing::debug!(%error, "publish report not sent");
            }
        }
    }
}

/// Commands from coordinators on this node's subject and the all-edges subject.
pub(crate) async fn command_pump(
    shared: Arc<Shared>,
    subs: Vec<Subscription>,
    stop: CancellationToken,
) {
    let mut messages = futures::stream::select_all(subs);
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            m = messages.next() => match m { Some(m) => m, None => break },
        };
        let answer = match proto::v1::EdgeCommand::decode(msg.payload.as_ref()) {
            Ok(cmd) if bus::trace::is_traced(&msg.headers) => {
                // Only traced commands pay for a span: the trace runs from the backend's call
                // to the sockets this edge queued the frame for.
                let span = tracing::info_span!("edge.command", node = %shared.node_id, delivered = tracing::field::Empty);
                bus::trace::follow(&span, &msg.headers);
                let _inside = span.enter();
                crate::command::run(&shared, cmd)
            }
            Ok(cmd) => crate::command::run(&shared, cmd),
            Err(error) => {
                tracing::warn!(%error, subject = %msg.subject, "undecodable edge command");
                continue;
            }
        };
        if let Some(reply) = msg.reply
            && let Err(error) = shared.bus.publish(Outgoing::new(reply, answer)).await
        {
            tracing::debug!(%error, "command answer not sent");
        }
    }
}
