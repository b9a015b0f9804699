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
use std::path::PathBuf;
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
    /// Credentials belong in [`auth`](Self::auth), not in the URL (async-nats logs its server
    /// addresses at debug level): see [`split_userinfo`].
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
    /// Who this client is to the server. Default: nobody.
    pub auth: NatsAuth,
    /// TLS towards the server. Default: TLS only if the URL is `tls://` or the server
    /// requires it, verified against the platform's roots.
    pub tls: NatsTls,
    /// First token of this client's reply subjects (requests, JetStream). A prefix per role
    /// lets NATS permissions keep one role from reading another's replies. Default `_INBOX`.
    pub inbox_prefix: String,
}

/// One way of authenticating to the server; the values themselves, already read by the
/// caller. `Debug` shows which, never the secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    #[default]
    None,
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// An NKey seed (`SU…`).
    NKey(String),
    /// The contents of a `.creds` file: a user JWT and its NKey seed.
    Credentials(String),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .finish_non_exhaustive(),
            Self::Token(_) => f.write_str("Token(..)"),
            Self::NKey(_) => f.write_str("NKey(..)"),
            Self::Credentials(_) => f.write_str("Credentials(..)"),
        }
    }
}

/// TLS towards the server. The files are read by async-nats at every (re)connect, so a
/// renewed certificate is picked up on the next reconnect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// Refuse a server that does not speak TLS.
    pub required: bool,
    /// PEM CA bundle to verify the server with, instead of the platform's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and private key, for servers that verify clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            name: "switchboard".to_owned(),
            subscription_capacity: 8192,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            auth: NatsAuth::None,
            tls: NatsTls::default(),
            inbox_prefix: "_INBOX".to_owned(),
        }
    }
}

/// Splits the credentials out of a comma-separated list of server URLs: the URLs without
/// their `user:password@` or `token@` part, and that part (percent-decoded) if any. Every URL
/// carrying credentials must carry the same ones.
pub fn split_userinfo(urls: &str) -> Result<(String, Option<NatsAuth>), UrlError> {
    let mut plain = Vec::new();
    let mut found: Option<NatsAuth> = None;
    for url in urls.split(',') {
        let url = url.trim();
        let (scheme, rest) = match url.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, url),
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let host = match authority.rsplit_once('@') {
            None => authority,
            Some((userinfo, host)) => {
                let auth = match userinfo.split_once(':') {
                    Some((user, password)) => NatsAuth::UserPassword {
                        user: percent_decode(user)?,
                        password: percent_decode(password)?,
                    },
                    None => NatsAuth::Token(percent_decode(userinfo)?),
                };
                match &found {
                    Some(other) if *other != auth => return Err(UrlError::DifferentCredentials),
                    _ => found = Some(auth),
                }
                host
            }
        };
        plain.push(match scheme {
            Some(scheme) => format!("{scheme}://{host}{path}"),
            None => format!("{host}{path}"),
        });
    }
    Ok((plain.join(","), found))
}

/// The URL list with any credentials replaced by `***`, for logs and banners.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let start = url.find("://").map_or(0, |i| i + 3);
            let end = url[start..]
                .find(['/', '?', '#'])
                .map_or(url.len(), |i| start + i);
            match url[start..end].rfind('@') {
                Some(at) => format!("{}***{}", &url[..start], &url[start + at..]),
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A server URL list that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("the URLs carry different credentials")]
    DifferentCredentials,
    #[error("the credentials in the URL are not valid percent-encoded UTF-8")]
    BadEncoding,
}

fn percent_decode(s: &str) -> Result<String, UrlError> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let mut hex = || {
            bytes
                .next()
                .and_then(|b| (b as char).to_digit(16))
                .ok_or(UrlError::BadEncoding)
        };
        let (hi, lo) = (hex()?, hex()?);
        out.push(u8::try_from(hi * 16 + lo).map_err(|_| UrlError::BadEncoding)?);
    }
    String::from_utf8(out).map_err(|_| UrlError::BadEncoding)
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
        let mut options = ConnectOptions::new()
            .name(&opts.name)
            .connection_timeout(opts.connect_timeout)
            .request_timeout(Some(opts.request_timeout))
            .subscription_capacity(capacity)
            .custom_inbox_prefix(&opts.inbox_prefix)
            .max_reconnects(None);
        options = match opts.auth {
            NatsAuth::None => options,
            NatsAuth::UserPassword { user, password } => options.user_and_password(user, password),
            NatsAuth::Token(token) => options.token(token),
            NatsAuth::NKey(seed) => options.nkey(seed),
            NatsAuth::Credentials(creds) => options
                .credentials(&creds)
                .map_err(|e| BusError::Connect(Box::new(e)))?,
        };
        if let Some(ca) = opts.tls.ca_file {
            options = options.add_root_certificates(ca);
        }
        if let Some((cert, key)) = opts.tls.client_cert {
            options = options.add_client_certificate(cert, key);
        }
        if opts.tls.required {
            options = options.require_tls(true);
        }
        let client = options
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
        caught_up(&self.client, self.request_timeout).await;
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

/// Waits (at most `limit`) until the server has processed everything `client` sent so far:
/// a message it publishes to a fresh inbox it subscribed to comes back only after the server
/// handled the earlier commands. It depends on nobody else, so a client listening on `>`
/// changes nothing. Skipped while disconnected (subscriptions are replayed on reconnect).
pub(crate) async fn caught_up(client: &async_nats::Client, limit: Duration) {
    if client.connection_state() != State::Connected {
        return;
    }
    let inbox = client.new_inbox();
    let round_trip = async {
        let mut echo = client.subscribe(inbox.clone()).await.ok()?;
        client.publish(inbox, bytes::Bytes::new()).await.ok()?;
        echo.next().await
    };
    match tokio::time::timeout(limit, round_trip).await {
        Ok(Some(_)) => {}
        Ok(None) => tracing::debug!("registration round trip failed"),
        Err(_) => tracing::debug!("registration round trip timed out"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_urls() {
        let (urls, auth) =
            split_userinfo("nats://svc:p%40ss@a:4222, tls://svc:p%40ss@b:4222/x").unwrap();
        assert_eq!(urls, "nats://a:4222,tls://b:4222/x");
        assert_eq!(
            auth,
            Some(NatsAuth::UserPassword {
                user: "svc".into(),
                password: "p@ss".into()
            })
        );
        let (urls, auth) = split_userinfo("s3cr3t@127.0.0.1:4222").unwrap();
        assert_eq!(urls, "127.0.0.1:4222");
        assert_eq!(auth, Some(NatsAuth::Token("s3cr3t".into())));
        assert_eq!(
            split_userinfo("nats://a:4222,nats://b:4222").unwrap(),
            ("nats://a:4222,nats://b:4222".into(), None)
        );
        assert_eq!(
            split_userinfo("nats://u:1@a,nats://u:2@b"),
            Err(UrlError::DifferentCredentials)
        );
        assert_eq!(split_userinfo("nats://u:%zz@a"), Err(UrlError::BadEncoding));
    }

    #[test]
    fn redacted_urls_and_debug_show_no_secret() {
        assert_eq!(
            redact_url("nats://svc:hunter2@a:4222,nats://b:4222,tok@c"),
            "nats://***@a:4222,nats://b:4222,***@c"
        );
        for auth in [
            NatsAuth::UserPassword {
                user: "svc".into(),
                password: "hunter2".into(),
            },
            NatsAuth::Token("hunter2".into()),
            NatsAuth::NKey("hunter2".into()),
            NatsAuth::Credentials("hunter2".into()),
        ] {
            let shown = format!(
                "{:?}",
                NatsOptions {
                    auth,
                    ..NatsOptions::default()
                }
            );
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }
}
