//! The bus over a NATS server, through async-nats.
//!
//! The client reconnects forever with async-nats' default backoff (0 ms, then doubling from
//! 2 ms up to 4 s) and replays subscriptions on reconnect. Only the initial connect can fail.
//!
//! Each [`Subscription`] is fed by a small pump task that moves messages from the async-nats
//! subscriber into our own bounded queue with `try_send`, so that a subscriber that falls
//! behind loses messages *and they are counted* ([`Subscription::dropped`]); async-nats only
//! reports slow consumers as an event without saying which subscription. Dropping the
//! [`Subscription`] unsubscribes at once (the UNSUB is queued before anything the caller
//! sends next) and ends the pump.
//!
//! Headers: async-nats keeps them in a hash map, so their order is not preserved, and a name
//! sent with several values by another client arrives with its first value only.

use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::client::{
    FlushErrorKind, PublishError, PublishErrorKind, RequestErrorKind, SubscribeError,
    SubscribeErrorKind,
};
use async_nats::connection::State;
use async_nats::{ConnectOptions, HeaderMap, HeaderName, HeaderValue, Request, Subscriber};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::{
    Bus, BusError, Headers, Message, Outgoing, Subscription, validate_outgoing,
    validate_subscription,
};

/// How to reach the NATS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsOptions {
    /// Server URL(s), e.g. `nats://127.0.0.1:4222`; several may be given comma-separated.
    pub url: String,
    /// Connection name, shown in the server's monitoring (`/connz`).
    pub name: String,
    /// Messages buffered per subscription before new ones are dropped (at least 1).
    pub subscription_capacity: usize,
    /// Default timeout for requests made through [`NatsBus::client`] (JetStream included),
    /// and the bound on the registration round trip in `subscribe`.
    pub request_timeout: Duration,
    /// Bound on establishing one connection (TCP, handshake, first PONG).
    pub connect_timeout: Duration,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            name: "switchboard".to_owned(),
            subscription_capacity: 8192,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The bus over a NATS connection. Cloning gives another handle to the same connection.
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    capacity: usize,
    request_timeout: Duration,
    name: Arc<str>,
}

impl NatsBus {
    /// Connects to `opts.url`. Fails if the first connection cannot be established; once
    /// connected, the client reconnects forever in the background.
    pub async fn connect(opts: NatsOptions) -> Result<Self, BusError> {
        let capacity = opts.subscription_capacity.max(1);
        let client = ConnectOptions::new()
            .name(&opts.name)
            .connection_timeout(opts.connect_timeout)
            .request_timeout(Some(opts.request_timeout))
            .subscription_capacity(capacity)
            .max_reconnects(None)
            .connect(opts.url.as_str())
            .await
            .map_err(|e| BusError::Connect(Box::new(e)))?;
        Ok(Self {
            client,
            capacity,
            request_timeout: opts.request_timeout,
            name: opts.name.into(),
        })
    }

    /// The underlying client, e.g. for JetStream.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    async fn publish_now(&self, msg: Outgoing) -> Result<(), BusError> {
        validate_outgoing(&msg)?;
        let subject = msg.subject;
        let result = match (msg.reply, to_header_map(&msg.headers)?) {
            (None, None) => self.client.publish(subject, msg.payload).await,
            (Some(reply), None) => {
                self.client
                    .publish_with_reply(subject, reply, msg.payload)
                    .await
            }
            (None, Some(headers)) => {
                self.client
                    .publish_with_headers(subject, headers, msg.payload)
                    .await
            }
            (Some(reply), Some(headers)) => {
                self.client
                    .publish_with_reply_and_headers(subject, reply, headers, msg.payload)
                    .await
            }
        };
        result.map_err(publish_error)
    }

    async fn subscribe_now(
        &self,
        subject: String,
        queue: Option<String>,
    ) -> Result<Subscription, BusError> {
        validate_subscription(&subject, queue.as_deref())?;
        let subscriber = match queue {
            None => self.client.subscribe(subject.clone()).await,
            Some(queue) => self.client.queue_subscribe(subject.clone(), queue).await,
        }
        .map_err(|e| subscribe_error(e, subject))?;
        self.registered().await;

        let (tx, rx) = mpsc::channel(self.capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let subscriber = Arc::new(Mutex::new(Some(subscriber)));
        tokio::spawn(pump(Arc::clone(&subscriber), tx, Arc::clone(&dropped)));
        Ok(Subscription::new(
            Box::pin(QueueStream { rx, subscriber }),
            Arc::new(move || dropped.load(Ordering::Relaxed)),
        ))
    }

    /// Waits until the server has processed everything this connection sent so far, so that
    /// a subscription just sent is registered: a message this connection publishes to a fresh
    /// inbox it subscribed to comes back only after the server handled the earlier commands.
    /// It depends on nobody else: a request answered by "no responders" would wait out its
    /// timeout whenever another client (a monitoring tap on `>`) receives the inbox subject.
    /// Skipped while disconnected (the subscription is replayed on reconnect) and bounded by
    /// the request timeout.
    async fn registered(&self) {
        if self.client.connection_state() != State::Connected {
            return;
        }
        let inbox = self.client.new_inbox();
        let round_trip = async {
            let mut echo = self.client.subscribe(inbox.clone()).await.ok()?;
            self.client.publish(inbox, bytes::Bytes::new()).await.ok()?;
            echo.next().await
        };
        match tokio::time::timeout(self.request_timeout, round_trip).await {
            Ok(Some(_)) => {}
            Ok(None) => tracing::debug!("subscription registration round trip failed"),
            Err(_) => tracing::debug!("subscription registration round trip timed out"),
        }
    }

    async fn request_now(&self, msg: Outgoing, timeout: Duration) -> Result<Message, BusError> {
        validate_outgoing(&msg)?;
        let mut request = Request::new().payload(msg.payload).timeout(Some(timeout));
        if let Some(headers) = to_header_map(&msg.headers)? {
            request = request.headers(headers);
        }
        match self
            .client
            .send_request(async_nats::Subject::from(msg.subject.as_str()), request)
            .await
        {
            Ok(reply) => Ok(from_nats(reply)),
            Err(e) => Err(match e.kind() {
                RequestErrorKind::NoResponders => BusError::NoResponders {
                    subject: msg.subject,
                },
                RequestErrorKind::TimedOut => BusError::Timeout {
                    subject: msg.subject,
                    timeout,
                },
                RequestErrorKind::InvalidSubject => BusError::InvalidSubject(msg.subject),
                _ => BusError::Io(Box::new(e)),
            }),
        }
    }
}

/// The async-nats subscriber, shared by the pump (which polls it) and the [`QueueStream`]
/// (which takes it out on drop, so that unsubscribing happens at once, in order with the
/// commands the caller sends next). Locked only inside a synchronous `poll`.
type SharedSubscriber = Arc<Mutex<Option<Subscriber>>>;

fn lock(subscriber: &SharedSubscriber) -> MutexGuard<'_, Option<Subscriber>> {
    subscriber.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Moves messages from `subscriber` to `tx` until either side closes. Never waits on `tx`.
async fn pump(subscriber: SharedSubscriber, tx: mpsc::Sender<Message>, dropped: Arc<AtomicU64>) {
    loop {
        let next = poll_fn(|cx| match lock(&subscriber).as_mut() {
            Some(subscriber) => subscriber.poll_next_unpin(cx),
            None => Poll::Ready(None),
        });
        let msg = tokio::select! {
            biased;
            () = tx.closed() => break,
            msg = next => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        // Server status messages (a 503 "no responders" sent to a reply inbox) carry no
        // data; the local bus has no equivalent, and `request` reports them as errors.
        if msg.status.is_some() {
            continue;
        }
        match tx.try_send(from_nats(msg)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Closed(_)) => break,
        }
    }
    // Dropping the subscriber unsubscribes on the server.
    let subscriber = lock(&subscriber).take();
    drop(subscriber);
}

struct QueueStream {
    rx: mpsc::Receiver<Message>,
    subscriber: SharedSubscriber,
}

impl Stream for QueueStream {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for QueueStream {
    fn drop(&mut self) {
        // Unsubscribe now; dropping `rx` right after wakes the pump, which then exits.
        let subscriber = lock(&self.subscriber).take();
        drop(subscriber);
    }
}

fn to_header_map(headers: &Headers) -> Result<Option<HeaderMap>, BusError> {
    if headers.is_empty() {
        return Ok(None);
    }
    let mut map = HeaderMap::new();
    for (name, value) in headers.iter() {
        let invalid = || BusError::InvalidHeader(name.to_owned());
        let name = HeaderName::try_from(name).map_err(|_| invalid())?;
        let value: HeaderValue = value.parse().map_err(|_| invalid())?;
        map.insert(name, value);
    }
    Ok(Some(map))
}

fn from_nats(msg: async_nats::Message) -> Message {
    let mut headers = Headers::default();
    if let Some(map) = &msg.headers {
        for (name, values) in map.iter() {
            // Our headers hold one value per name; keep the first, as `HeaderMap::get` does.
            if let Some(value) = values.first() {
                headers.insert(name.to_string(), value.as_str());
            }
        }
    }
    Message {
        subject: msg.subject.into_string(),
        reply: msg.reply.map(async_nats::Subject::into_string),
        headers,
        payload: msg.payload,
    }
}

fn publish_error(e: PublishError) -> BusError {
    match e.kind() {
        PublishErrorKind::Send => BusError::Closed,
        _ => BusError::Io(Box::new(e)),
    }
}

fn subscribe_error(e: SubscribeError, subject: String) -> BusError {
    match e.kind() {
        SubscribeErrorKind::InvalidSubject | SubscribeErrorKind::InvalidQueueName => {
            BusError::InvalidSubject(subject)
        }
        SubscribeErrorKind::Other => BusError::Io(Box::new(e)),
    }
}

impl Bus for NatsBus {
    fn publish(&self, msg: Outgoing) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(self.publish_now(msg))
    }

    fn subscribe(
        &self,
        subject: String,
        queue: Option<String>,
    ) -> BoxFuture<'_, Result<Subscription, BusError>> {
        Box::pin(self.subscribe_now(subject, queue))
    }

    fn request(
        &self,
        msg: Outgoing,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Message, BusError>> {
        Box::pin(self.request_now(msg, timeout))
    }

    fn new_inbox(&self) -> String {
        self.client.new_inbox()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            self.client.flush().await.map_err(|e| match e.kind() {
                FlushErrorKind::SendError => BusError::Closed,
                FlushErrorKind::FlushError => BusError::Io(Box::new(e)),
            })
        })
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn reconnects(&self) -> u64 {
        // Counted by the client at every successful handshake, the first one included.
        self.client
            .statistics()
            .connects
            .load(Ordering::Relaxed)
            .saturating_sub(1)
    }
}

impl fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBus")
            .field("name", &self.name)
            .field("state", &self.client.connection_state())
            .field("reconnects", &self.reconnects())
            .finish_non_exhaustive()
    }
}
