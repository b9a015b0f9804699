//! One connection's protocol, as a state machine in the manner of quinn-proto's
//! `Connection`: the shell feeds it what happened (a text frame, a ping, a backend's reply,
//! the outcome of an action, the time) and drains what is to be done with
//! [`Session::poll_action`]; it asks [`Session::poll_timeout`] when to call
//! [`Session::handle_timeout`]. The session decides every answer, error and close the client
//! sees; it reads no clock, touches no socket and knows no bus.
//!
//! The per-connection deadlines (idle, heartbeat ping and pong, the token's refresh notice
//! and expiry) are one timer: [`Session::poll_timeout`] is the earliest. Activity only moves
//! the idle deadline later, so a shell may keep a timer armed for an earlier instant and let
//! [`Session::handle_timeout`] find nothing due (the timer is moved lazily, not per frame).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use proto::frame::{self, ClientFrame, ErrorCode, FrameBuilder, FrameError, Key};
use proto::topic;
use serde_json::{Map, Value};

use crate::dialect::{Dialect, Other, Unreadable};
use crate::history::{HistoryCall, Page, Position};
use crate::verb::Verb;

/// What a session needs to know of its route, built once per route by the shell.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub dialect: Dialect,
    /// The routing field in effect (the route's `key`, or the dialect's).
    pub key: Key,
    /// Close (1000) after this long without a frame from the client; zero: never.
    pub idle_timeout: Duration,
    /// Ping this often; zero: never.
    pub heartbeat_interval: Duration,
    /// A pong (or any frame) must arrive this long after a ping.
    pub heartbeat_timeout: Duration,
    pub rate: RateLimit,
    /// Topic filters one connection may hold.
    pub max_topics: usize,
    /// Backend requests awaiting a reply at once.
    pub max_inflight: usize,
    /// Whether clients may `publish`.
    pub client_publish: bool,
    pub events: EventRoutes,
    /// The connect hook: a request before any frame is read.
    pub onconnect: Option<ConnectHook>,
    /// monument routes: which events are requests and which are published.
    pub monument: MonumentModes,
    /// Resource types, by name.
    pub resources: BTreeMap<String, Resource>,
    /// How a token's `exp` is enforced; `None` on routes that take no token.
    pub token: Option<TokenPolicy>,
    /// The topics whose publications are kept (any route's rules: storage is shared).
    pub history: Vec<crate::history::Rule>,
    /// How resume tokens are made; `None`: none are.
    pub resume: Option<ResumeRules>,
}

/// What making and checking resume tokens takes.
#[derive(Debug, Clone)]
pub struct ResumeRules {
    pub key: proto::resume::Key,
    pub ttl: Duration,
    /// The route's path, which a token names.
    pub route: String,
    /// What a valid token on the upgrade does to the connect hook.
    pub onconnect: OnResume,
}

/// What a valid resume token presented on the upgrade does to the route's connect hook.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnResume {
    /// It does not run: the token proves it accepted this user on this route before (a
    /// rolling deploy does not ask backends again for every client).
    #[default]
    Skip,
    /// It runs as on any connection.
    Run,
    /// It does not run; backends hear a `resumed` event (no answer awaited) instead.
    Event,
}

/// Who a resumable session belongs to, and its clock in Unix time (tokens expire in it).
#[derive(Debug)]
struct Owner {
    user: String,
    namespace: String,
    born: Instant,
    born_ms: i64,
    /// Unix seconds when the connect hook last accepted this user on this route: this
    /// connection's start, or, when a resume skipped the hook, the token's.
    accepted: i64,
}

impl Owner {
    /// `now` in Unix seconds.
    fn unix_s(&self, now: Instant) -> i64 {
        let since = now.saturating_duration_since(self.born).as_millis();
        (self.born_ms + i64::try_from(since).unwrap_or(i64::MAX / 2)) / 1000
    }
}

/// A publication taken: on a history topic, where it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub position: Option<Position>,
}

/// How a subscription turned out ([`Session::subscribed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscribed {
    Failed,
    /// Live; on a history topic with the position the client now has, and whether it
    /// recovered what it missed since the position it asked for (`None`: it asked none).
    Live {
        position: Option<Position>,
        recovered: Option<bool>,
    },
}

/// The client frame rate limit: a token bucket; `close_after` refusals in a row close.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Zero: no limit.
    pub per_second: u32,
    pub burst: u32,
    pub close_after: u32,
}

/// Where client events go (the route's `hooks.onmessage`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventRoutes {
    /// Whether the route has an `onmessage` hook at all.
    pub hooked: bool,
    /// The subject of each event type with a subject of its own.
    pub typed: Vec<(String, String)>,
    /// The subject that hears every event.
    pub general: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectHook {
    pub subject: String,
    /// Refuse the connection when the hook does not answer.
    pub required: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MonumentModes {
    /// `…:get:…` events are requests answered as `…:set:…`.
    pub data: bool,
    /// Other events are published on the subject they name.
    pub passthrough: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub kind: ResourceKind,
    /// The params field naming an item (`get`).
    pub id_field: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    /// A key-value bucket: query, all, get, watch.
    Kv,
    /// A subject: watch only.
    Topic,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenPolicy {
    /// Grace after `exp` before the close.
    pub leeway: Duration,
    /// `refresh_required` this long before `exp` (dialects with `refresh`); zero: no notice.
    pub refresh_lead: Duration,
}

/// What the shell is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write this frame to the client now (answers go before anything queued after them).
    Send(String),
    /// Send a WebSocket ping (heartbeat).
    Ping,
    /// Flush the pong the transport queued for the client's ping.
    FlushPong,
    /// Open a subscription to `filter`, recovering from `since` when given; report with
    /// [`Session::subscribed`].
    Subscribe {
        filter: String,
        id: Option<Value>,
        since: Option<Position>,
    },
    /// Close the subscription to `filter`.
    Unsubscribe { filter: String },
    /// Publish a client's topic message; report with [`Session::published`].
    Publish {
        topic: String,
        payload: String,
        echo: bool,
        id: Option<Value>,
    },
    /// A request to backends; its outcome goes to [`Session::on_reply`] with `request`.
    Request {
        request: RequestId,
        to: To,
        body: Body,
    },
    /// A message to backends that nobody answers (monument passthrough); report a failure
    /// with [`Session::emit_failed`].
    Emit { subject: String, body: Body },
    /// Run a resource verb (query, all, get, watch) against the store or bus; the shell
    /// answers it with the frames of [`crate::session::resource_frames`]'s shape.
    Resource(ResourceCall),
    /// Stop the watch with this key.
    StopWatch(String),
    /// Read a topic's history; answer with [`Session::history_read`].
    History(HistoryCall),
    /// Check a new token for this connection; report with [`Session::token_checked`].
    CheckToken { token: String, id: Option<Value> },
    /// A frame was ignored by design (counted by the shell).
    Ignored,
    /// End the connection.
    Close(Close),
}

/// Where a message to backends goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    /// A subject the route's config names, or monument's event name.
    Subject(String),
    /// The event's own subject (`sb.event.<namespace>.<type>`), which the shell spells: it
    /// knows the connection's namespace.
    OwnEvent(String),
}

/// The body of a message to backends: the shell wraps it in the connection's context.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// The context alone (the connect hook).
    Context,
    /// The context with the client's frame under `event`.
    Event(Map<String, Value>),
    /// monument's `{message: <frame>, socket: <context>}`.
    Socket(Map<String, Value>),
}

/// A resource verb to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceCall {
    pub verb: Verb,
    pub name: String,
    pub kind: ResourceKind,
    pub id_field: String,
    pub params: Map<String, Value>,
    pub id: Option<Value>,
    /// For a watch: its key on this connection (a second watch with the same key replaces
    /// the first, whose `StopWatch` comes before).
    pub watch_key: Option<String>,
}

/// Identifies a backend request of this session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(u64);

/// Why a backend request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Nobody listens on the subject.
    NoResponders,
    /// No answer within the request timeout.
    Timeout(Duration),
    /// The bus failed; the text is safe to show.
    Unavailable(String),
}

impl Failure {
    fn code(&self) -> ErrorCode {
        match self {
            Self::NoResponders => ErrorCode::NoResponders,
            Self::Timeout(_) => ErrorCode::Timeout,
            Self::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::NoResponders => "no backend is listening for this event".to_owned(),
            Self::Timeout(t) => format!("no reply within {t:?}"),
            Self::Unavailable(m) => m.clone(),
        }
    }
}

/// Why the session ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    Idle(Duration),
    HeartbeatTimeout(Duration),
    RateLimited,
    /// The connect hook refused the connection (its frame was sent before).
    Refused,
    TokenExpired,
}

/// What a pending request's answer turns into.
#[derive(Debug)]
enum Pending {
    /// The connect hook.
    Connect { required: bool },
    /// A client event: the answer's default type, the client's id, and whether "nobody
    /// listens" is silent (the general subject beside a typed one).
    Event {
        reply_type: String,
        id: Option<Value>,
        quiet: bool,
    },
    /// monument data-style: answered as the `…:set:…` event.
    MonumentData { set: String },
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    rules: std::sync::Arc<Rules>,
    /// The connection's id: the default session id `init` answers.
    conn_id: String,
    // B-trees, not hash sets: empty they take 24 bytes and no hasher keys, and a connection
    // holds few entries (memory per idle connection is a bar).
    /// Filters held, each with its position when on a history topic (for resume tokens).
    topics: BTreeMap<String, Option<Box<Position>>>,
    watches: BTreeSet<String>,
    /// Set when the route makes resume tokens: boxed, so that routes without them pay
    /// one pointer.
    owner: Option<Box<Owner>>,
    /// The client opened a session (`init`): its answers carry resume tokens from then on.
    sessioned: bool,
    pending: BTreeMap<RequestId, Pending>,
    next_request: u64,
    /// The connect hook has not answered: nothing is read until it does.
    connecting: bool,
    rate: TokenBucket,
    refused_in_a_row: u32,
    token: Option<TokenClock>,
    active_at: Instant,
    ping_at: Option<Instant>,
    pong_by: Option<Instant>,
    out: VecDeque<Action>,
    closed: bool,
}

impl Session {
    /// A session opened at `now` (`now_ms`: the same instant in Unix milliseconds), for a
    /// token expiring at `exp` (Unix seconds; `None` when it has none).
    pub fn new(
        rules: std::sync::Arc<Rules>,
        conn_id: String,
        now: Instant,
        now_ms: i64,
        exp: Option<i64>,
    ) -> Self {
        let token = match (rules.token, exp) {
            (Some(policy), Some(exp)) => {
                let notify = rules.dialect.refreshes() && !policy.refresh_lead.is_zero();
                Some(TokenClock::new(
                    exp,
                    now_ms,
                    now,
                    policy.leeway,
                    notify.then_some(policy.refresh_lead),
                ))
            }
            _ => None,
        };
        let beat = rules.heartbeat_interval;
        let mut s = Self {
            rate: TokenBucket::new(rules.rate.per_second, rules.rate.burst, now),
            ping_at: (!beat.is_zero()).then(|| now + beat),
            rules,
            conn_id,
            topics: BTreeMap::new(),
            watches: BTreeSet::new(),
            owner: None,
            sessioned: false,
            pending: BTreeMap::new(),
            next_request: 0,
            connecting: false,
            refused_in_a_row: 0,
            token,
            active_at: now,
            pong_by: None,
            out: VecDeque::new(),
            closed: false,
        };
        if let Some(hook) = s.rules.onconnect.clone() {
            s.connecting = true;
            let request = s.track(Pending::Connect {
                required: hook.required,
            });
            s.out.push_back(Action::Request {
                request,
                to: To::Subject(hook.subject),
                body: Body::Context,
            });
        }
        s
    }

    /// Makes the session resumable (when its route makes resume tokens): tokens name
    /// `user` in `namespace` and expire in Unix time, `now_ms` being `now`.
    pub fn resumable(mut self, user: &str, namespace: &str, now: Instant, now_ms: i64) -> Self {
        if self.rules.resume.is_some() && self.rules.dialect.row().resume {
            self.owner = Some(Box::new(Owner {
                user: user.to_owned(),
                namespace: namespace.to_owned(),
                born: now,
                born_ms: now_ms,
                accepted: now_ms / 1000,
            }));
        }
        self
    }

    /// The client presented resume `token` on the upgrade: when it is valid, the connect
    /// hook does as the route's `onconnect` says ([`OnResume`]). The subscriptions come
    /// back with the `init` that carries the token, as without it.
    ///
    /// Never on an anonymous route (anyone may claim any user there, so a token proves
    /// nothing of the hook), and not when the hook's last acceptance the token carries is
    /// older than one `resume.ttl`: the hook is asked again at least that often.
    pub fn resuming(mut self, token: Option<&str>, now: Instant) -> Self {
        let Some(token) = token else { return self };
        let Some(rules) = self.rules.resume.as_ref() else {
            return self;
        };
        let (on, ttl) = (rules.onconnect, rules.ttl);
        if !self.connecting || on == OnResume::Run || self.rules.token.is_none() {
            return self;
        }
        let Ok(resume) = self.check_resume(token, now) else {
            return self;
        };
        let Some(owner) = self.owner.as_mut() else {
            return self;
        };
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        if owner.unix_s(now).saturating_sub(resume.accepted) > ttl {
            return self;
        }
        owner.accepted = resume.accepted;
        // The hook's request is the only thing queued at this point.
        self.connecting = false;
        self.pending.clear();
        self.out.clear();
        if on == OnResume::Event
            && let Some(owner) = &self.owner
        {
            self.out.push_back(Action::Emit {
                subject: proto::subject::event(&owner.namespace, "resumed"),
                body: Body::Context,
            });
        }
        self
    }

    /// The next thing to do, in order. The queue's buffer goes with its last action: an
    /// idle session holds none (memory per idle connection is a bar).
    pub fn poll_action(&mut self) -> Option<Action> {
        let action = self.out.pop_front();
        if self.out.is_empty() && self.out.capacity() > 0 {
            self.out = VecDeque::new();
        }
        action
    }

    /// Whether an action waits (the shell can skip driving when none does).
    pub fn has_actions(&self) -> bool {
        !self.out.is_empty()
    }

    /// Whether reading from the client waits (for the connect hook's answer).
    pub fn reads_paused(&self) -> bool {
        self.connecting
    }

    /// Whether the session has ended the connection.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The topic filters the connection holds.
    pub fn topics(&self) -> impl Iterator<Item = &String> {
        self.topics.keys()
    }

    /// Backend requests awaiting a reply.
    pub fn inflight(&self) -> usize {
        self.pending.len()
    }

    /// The earliest deadline: idle, ping, pong, token notice or expiry.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let idle =
            (!self.rules.idle_timeout.is_zero()).then(|| self.active_at + self.rules.idle_timeout);
        [
            idle,
            self.ping_at,
            self.pong_by,
            self.token.as_ref().map(TokenClock::next),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if self.pong_by.is_some_and(|t| t <= now) {
            return self.close(Close::HeartbeatTimeout(self.rules.heartbeat_timeout));
        }
        let idle = self.rules.idle_timeout;
        if !idle.is_zero() && self.active_at + idle <= now {
            return self.close(Close::Idle(idle));
        }
        match self.token.as_mut().and_then(|c| c.on_timer(now)) {
            Some(TokenEvent::Expired) => return self.close(Close::TokenExpired),
            Some(TokenEvent::Notify { exp }) => {
                let f = FrameBuilder::new(self.rules.key, "refresh_required")
                    .value("exp", &Value::from(exp))
                    .finish();
                self.out.push_back(Action::Send(f));
            }
            None => {}
        }
        if let Some(ping_at) = self.ping_at
            && ping_at <= now
        {
            self.ping_at = Some(now + self.rules.heartbeat_interval);
            // While the connect hook is pending nothing is read, so no pong could be seen:
            // no ping then (the hook's wait is bounded by the request timeout).
            if !self.connecting {
                self.pong_by
                    .get_or_insert(now + self.rules.heartbeat_timeout);
                self.out.push_back(Action::Ping);
            }
        }
    }

    /// Any frame arrived from the client (data, ping, pong, close): it is alive.
    pub fn on_received(&mut self) {
        self.pong_by = None;
    }

    /// The client's ping: counted against the rate limit like a frame. When refused, the
    /// pong the transport queued waits for the next write (no error frame: that would
    /// answer a flood with a flood).
    pub fn on_ping(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        self.active_at = now;
        if self.take_rate(now) {
            self.out.push_back(Action::FlushPong);
        }
    }

    /// A binary frame from the client, on a route that takes them: it counts against the
    /// rate limit like a text frame. Whether the shell may pass it on to backends; a refusal
    /// is answered as for a text frame.
    pub fn on_binary(&mut self, now: Instant) -> bool {
        if self.closed {
            return false;
        }
        self.active_at = now;
        if self.take_rate(now) {
            return true;
        }
        if !self.closed {
            let f = frame::error(
                self.rules.key,
                None,
                ErrorCode::RateLimited,
                "too many frames; slow down",
            );
            self.out.push_back(Action::Send(f));
        }
        false
    }

    /// A text frame from the client.
    pub fn on_text(&mut self, text: &str, now: Instant) {
        if self.closed {
            return;
        }
        self.active_at = now;
        if !self.take_rate(now) {
            if !self.closed {
                let f = frame::error(
                    self.rules.key,
                    None,
                    ErrorCode::RateLimited,
                    "too many frames; slow down",
                );
                self.out.push_back(Action::Send(f));
            }
            return;
        }
        let (dialect, key) = (self.rules.dialect, self.rules.key);
        let f = match ClientFrame::parse(text, key) {
            Ok(f) => f,
            Err(_) if dialect.row().unreadable == Unreadable::Ignore => {
                return self.out.push_back(Action::Ignored);
            }
            Err(FrameError::InvalidJson(_)) => {
                return self.send_error(None, ErrorCode::InvalidJson, "frame is not a JSON object");
            }
            Err(FrameError::MissingKey(k)) => {
                let msg = format!("frame has no string \"{k}\" field");
                return self.send_error(None, ErrorCode::MissingType, &msg);
            }
        };
        let Some(verb) = dialect.verb(&f.verb) else {
            return match dialect.row().other {
                Other::SubjectEvent => self.monument_event(f),
                Other::ForwardOrUnknownHandler if !self.rules.events.hooked => {
                    let field = dialect.row().resource_field;
                    let name = f.str(field).unwrap_or_default().to_owned();
                    let msg = format!("unknown handler {:?}", f.verb);
                    let e = self.resource_error(&f, &name, ErrorCode::UnknownVerb, &msg);
                    self.out.push_back(Action::Send(e));
                }
                Other::Forward | Other::ForwardOrUnknownHandler => self.forward_event(&f),
            };
        };
        let id = f.id.as_ref();
        match verb {
            // The session id is the answer's `id`.
            Verb::Init => self.init(&f, now),
            Verb::Ping => {
                let a = FrameBuilder::new(key, "pong").id(id).finish();
                self.out.push_back(Action::Send(a));
            }
            Verb::Subscribe => self.subscribe(&f, now),
            Verb::Unsubscribe => self.unsubscribe(&f, now),
            Verb::Publish => self.publish(&f),
            Verb::History => self.history(&f),
            Verb::Refresh => self.refresh(&f),
            Verb::Watch | Verb::Stop | Verb::Query | Verb::All | Verb::Get => {
                self.resource(verb, &f);
            }
        }
    }

    /// The outcome of [`Action::Subscribe`]. On a history topic the frame comes before the
    /// publications recovered for it, which the shell queued behind the socket it holds.
    pub fn subscribed(
        &mut self,
        filter: String,
        id: Option<&Value>,
        how: Subscribed,
        now: Instant,
    ) {
        if self.closed {
            return;
        }
        let key = self.rules.key;
        let Subscribed::Live {
            position,
            recovered,
        } = how
        else {
            return self.send_error(id, ErrorCode::Unavailable, "subscription failed; try again");
        };
        let mut a = FrameBuilder::new(key, "subscribed")
            .id(id)
            .str("topic", &filter);
        if let Some(r) = recovered {
            a = a.value("recovered", &Value::Bool(r));
        }
        if let Some(p) = &position {
            a = a
                .str("epoch", &p.epoch)
                .value("offset", &Value::from(p.offset));
        }
        self.topics.insert(filter, position.map(Box::new));
        if let Some(token) = self.resume_token(now) {
            a = a.str("resume", &token);
        }
        self.out.push_back(Action::Send(a.finish()));
    }

    /// The answer to [`Action::History`].
    pub fn history_read(&mut self, call: &HistoryCall, read: Option<Page>) {
        if self.closed {
            return;
        }
        let Some(page) = read else {
            return self.send_error(
                call.id.as_ref(),
                ErrorCode::Unavailable,
                "history unavailable; try again",
            );
        };
        let mut messages = String::from("[");
        for (i, m) in page.messages.iter().enumerate() {
            if i > 0 {
                messages.push(',');
            }
            let binary = if m.binary { ",\"binary\":true" } else { "" };
            messages.push_str(&format!(
                "{{\"offset\":{},\"payload\":{}{binary}}}",
                m.offset, m.payload
            ));
        }
        messages.push(']');
        let a = FrameBuilder::new(self.rules.key, "history")
            .id(call.id.as_ref())
            .str("topic", &call.topic)
            .str("epoch", &page.epoch)
            .value("offset", &Value::from(page.last))
            .value("complete", &Value::Bool(page.complete))
            .value("more", &Value::Bool(page.more))
            .raw("messages", &messages)
            .finish();
        self.out.push_back(Action::Send(a));
    }

    /// The outcome of [`Action::Publish`]: `None` when it was not taken.
    pub fn published(&mut self, topic: &str, id: Option<&Value>, how: Option<Published>) {
        if self.closed {
            return;
        }
        let Some(how) = how else {
            return self.send_error(id, ErrorCode::Unavailable, "publish failed; try again");
        };
        let mut a = FrameBuilder::new(self.rules.key, "published")
            .id(id)
            .str("topic", topic);
        if let Some(p) = how.position {
            a = a
                .str("epoch", &p.epoch)
                .value("offset", &Value::from(p.offset));
        }
        self.out.push_back(Action::Send(a.finish()));
    }

    /// The outcome of [`Action::Emit`] when it failed.
    pub fn emit_failed(&mut self) {
        if self.closed {
            return;
        }
        self.send_error(
            None,
            ErrorCode::Unavailable,
            "event not delivered; try again",
        );
    }

    /// The outcome of [`Action::CheckToken`]: the new token's `exp`, or why it was refused
    /// (a message safe to show). On success the new deadlines replace the old; after a
    /// refusal the old token's stay in force.
    pub fn token_checked(
        &mut self,
        id: Option<&Value>,
        checked: Result<Option<i64>, &str>,
        now: Instant,
        now_ms: i64,
    ) {
        if self.closed {
            return;
        }
        let key = self.rules.key;
        match checked {
            Ok(exp) => {
                let policy = self.rules.token.unwrap_or_default();
                let notify = self.rules.dialect.refreshes() && !policy.refresh_lead.is_zero();
                self.token = exp.map(|exp| {
                    TokenClock::new(
                        exp,
                        now_ms,
                        now,
                        policy.leeway,
                        notify.then_some(policy.refresh_lead),
                    )
                });
                let a = FrameBuilder::new(key, "refreshed")
                    .id(id)
                    .value("exp", &exp.map_or(Value::Null, Value::from))
                    .finish();
                self.out.push_back(Action::Send(a));
            }
            Err(message) => self.send_error(id, ErrorCode::InvalidToken, message),
        }
    }

    /// A backend request's outcome: the reply's bytes, or why there is none.
    pub fn on_reply(&mut self, request: RequestId, result: Result<&[u8], Failure>) {
        let Some(pending) = self.pending.remove(&request) else {
            return;
        };
        if self.closed {
            return;
        }
        let key = self.rules.key;
        match pending {
            Pending::Connect { required } => {
                self.connecting = false;
                match result {
                    Ok(body) => match parse_answer(body) {
                        Answer::Payload(p) => {
                            self.out
                                .push_back(Action::Send(hook_frame(key, "onconnect", None, &p)))
                        }
                        Answer::Error(e) => {
                            self.out
                                .push_back(Action::Send(hook_frame(key, "error", None, &e)));
                            self.close(Close::Refused);
                        }
                    },
                    Err(e) if required => {
                        let f = frame::error(key, None, e.code(), "connect hook did not answer");
                        self.out.push_back(Action::Send(f));
                        self.close(Close::Refused);
                    }
                    Err(_) => {}
                }
            }
            Pending::Event {
                reply_type,
                id,
                quiet,
            } => {
                let f = match result {
                    Ok(body) => {
                        let reply_type = serde_json::from_slice::<Value>(body)
                            .ok()
                            .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned))
                            .unwrap_or(reply_type);
                        match parse_answer(body) {
                            Answer::Payload(p) => hook_frame(key, &reply_type, id.as_ref(), &p),
                            Answer::Error(e) => hook_frame(key, "error", id.as_ref(), &e),
                        }
                    }
                    Err(Failure::NoResponders) if quiet => return,
                    Err(e) => frame::error(key, id.as_ref(), e.code(), &e.message()),
                };
                self.out.push_back(Action::Send(f));
            }
            Pending::MonumentData { set } => {
                let f = match result {
                    Ok(body) => monument_reply(key, &set, body),
                    Err(e) => frame::error(key, None, e.code(), &e.message()),
                };
                self.out.push_back(Action::Send(f));
            }
        }
    }

    fn close(&mut self, why: Close) {
        if !self.closed {
            self.closed = true;
            self.out.push_back(Action::Close(why));
        }
    }

    fn send_error(&mut self, id: Option<&Value>, code: ErrorCode, message: &str) {
        let f = frame::error(self.rules.key, id, code, message);
        self.out.push_back(Action::Send(f));
    }

    fn track(&mut self, p: Pending) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        self.pending.insert(id, p);
        id
    }

    /// Takes a token for one client frame (text or ping); `false` when refused. Refused
    /// `close_after` times in a row closes the connection.
    fn take_rate(&mut self, now: Instant) -> bool {
        if self.rate.take(now) {
            self.refused_in_a_row = 0;
            return true;
        }
        self.refused_in_a_row += 1;
        if self.refused_in_a_row >= self.rules.rate.close_after {
            self.close(Close::RateLimited);
        }
        false
    }

    /// The `topic` field of a topic verb, or the error frame saying it is missing.
    fn topic_field<'f>(&mut self, f: &'f ClientFrame) -> Option<&'f str> {
        let t = f.str("topic");
        if t.is_none() {
            let msg = format!("{} needs a string \"topic\"", f.verb);
            self.send_error(f.id.as_ref(), ErrorCode::InvalidFrame, &msg);
        }
        t
    }

    fn subscribe(&mut self, f: &ClientFrame, now: Instant) {
        let Some(filter) = self.topic_field(f) else {
            return;
        };
        if let Err(e) = topic::validate_filter(filter) {
            return self.send_error(f.id.as_ref(), ErrorCode::InvalidTopic, &e.to_string());
        }
        let since = match f.body.get("since") {
            None | Some(Value::Null) => None,
            Some(v) => match Position::from_json(v) {
                Ok(p) => Some(p),
                Err(e) => return self.send_error(f.id.as_ref(), ErrorCode::InvalidFrame, e),
            },
        };
        if let Some(held) = self.topics.get(filter) {
            let how = Subscribed::Live {
                position: held.as_deref().cloned(),
                recovered: None,
            };
            return self.subscribed(filter.to_owned(), f.id.as_ref(), how, now);
        }
        if self.topics.len() >= self.rules.max_topics {
            return self.send_error(
                f.id.as_ref(),
                ErrorCode::Forbidden,
                "too many topics on this connection",
            );
        }
        self.out.push_back(Action::Subscribe {
            filter: filter.to_owned(),
            id: f.id.clone(),
            since,
        });
    }

    /// `{"type":"init"}` answers the session id (and a resume token); with `resume`, the
    /// token's subscriptions are made again, each recovering from its position (the
    /// client's `positions`, else the token's).
    fn init(&mut self, f: &ClientFrame, now: Instant) {
        let key = self.rules.key;
        self.sessioned = true;
        let session = f
            .str("session")
            .filter(|s| !s.is_empty() && s.len() <= 128)
            .unwrap_or(&self.conn_id)
            .to_owned();
        let mut a = FrameBuilder::new(key, "session").str("id", &session);
        let mut restore = Vec::new();
        if let Some(token) = f.str("resume") {
            match self.check_resume(token, now) {
                Ok(resume) => {
                    a = a.value("resumed", &Value::Bool(true));
                    restore = resume.subscriptions;
                }
                Err(why) => {
                    a = a
                        .value("resumed", &Value::Bool(false))
                        .str("reason", &why.to_string());
                }
            }
        }
        let positions = f.body.get("positions");
        let room = self.rules.max_topics.saturating_sub(self.topics.len());
        let restore: Vec<(String, Option<Position>)> = restore
            .into_iter()
            .filter(|h| {
                !self.topics.contains_key(&h.topic) && topic::validate_filter(&h.topic).is_ok()
            })
            .take(room)
            .map(|h| {
                let given = positions
                    .and_then(|p| p.get(&h.topic))
                    .and_then(|p| Position::from_json(p).ok());
                let held = h
                    .offset
                    .zip(h.epoch)
                    .map(|(offset, epoch)| Position { offset, epoch });
                (h.topic, given.or(held))
            })
            .collect();
        // The token names what the connection holds and what it is restoring.
        let held = self.topics.iter().map(|(t, p)| (t.as_str(), p.as_deref()));
        let restoring = restore.iter().map(|(t, p)| (t.as_str(), p.as_ref()));
        if let Some(token) = self.mint(now, held.chain(restoring)) {
            a = a.str("resume", &token);
        }
        self.out.push_back(Action::Send(a.finish()));
        for (filter, since) in restore {
            self.out.push_back(Action::Subscribe {
                filter,
                id: None,
                since,
            });
        }
    }

    /// The subscriptions a client's resume token restores, if this route made it for this
    /// user in this namespace and it has not expired.
    fn check_resume(
        &self,
        token: &str,
        now: Instant,
    ) -> Result<proto::resume::Resume, proto::resume::Refused> {
        use proto::resume::{Refused, verify};
        let (Some(rules), Some(owner)) = (&self.rules.resume, &self.owner) else {
            return Err(Refused::Malformed);
        };
        let resume = verify(&rules.key, token, owner.unix_s(now))?;
        if resume.user != owner.user
            || resume.namespace != owner.namespace
            || resume.route != rules.route
        {
            return Err(Refused::Forged);
        }
        Ok(resume)
    }

    /// A resume token for the subscriptions held now, once the client opened a session.
    fn resume_token(&self, now: Instant) -> Option<String> {
        if !self.sessioned {
            return None;
        }
        self.mint(
            now,
            self.topics.iter().map(|(t, p)| (t.as_str(), p.as_deref())),
        )
    }

    fn mint<'a>(
        &self,
        now: Instant,
        held: impl Iterator<Item = (&'a str, Option<&'a Position>)>,
    ) -> Option<String> {
        let (rules, owner) = (self.rules.resume.as_ref()?, self.owner.as_ref()?);
        let ttl = i64::try_from(rules.ttl.as_secs()).unwrap_or(i64::MAX);
        let resume = proto::resume::Resume {
            user: owner.user.clone(),
            namespace: owner.namespace.clone(),
            route: rules.route.clone(),
            exp: owner.unix_s(now).saturating_add(ttl),
            accepted: owner.accepted,
            subscriptions: held
                .map(|(topic, p)| proto::resume::Held {
                    topic: topic.to_owned(),
                    offset: p.map(|p| p.offset),
                    epoch: p.map(|p| p.epoch.clone()),
                })
                .collect(),
        };
        Some(proto::resume::mint(&rules.key, &resume))
    }

    /// `{"type":"history","topic":…,"limit"?:…,"since"?:…}` on a topic whose rule lets
    /// clients read it.
    fn history(&mut self, f: &ClientFrame) {
        let Some(t) = self.topic_field(f) else { return };
        let id = f.id.as_ref();
        if let Err(e) = topic::validate_topic(t) {
            return self.send_error(id, ErrorCode::InvalidTopic, &e.to_string());
        }
        let Some(rule) = crate::history::rule_for(&self.rules.history, t) else {
            return self.send_error(id, ErrorCode::NotSupported, "this topic keeps no history");
        };
        if !rule.read {
            return self.send_error(
                id,
                ErrorCode::Forbidden,
                "clients may not read this topic's history",
            );
        }
        let size = rule.size;
        let limit = match f.body.get("limit") {
            None | Some(Value::Null) => size,
            Some(v) => match v.as_u64() {
                Some(n) if (1..=size).contains(&n) => n,
                _ => {
                    let msg = format!("limit must be 1 to {size}");
                    return self.send_error(id, ErrorCode::InvalidFrame, &msg);
                }
            },
        };
        let since = match f.body.get("since") {
            None | Some(Value::Null) => None,
            Some(v) => match Position::from_json(v) {
                Ok(p) => Some(p),
                Err(e) => return self.send_error(id, ErrorCode::InvalidFrame, e),
            },
        };
        self.out.push_back(Action::History(HistoryCall {
            topic: t.to_owned(),
            since,
            limit,
            id: f.id.clone(),
        }));
    }

    fn unsubscribe(&mut self, f: &ClientFrame, now: Instant) {
        let Some(filter) = self.topic_field(f) else {
            return;
        };
        if self.topics.remove(filter).is_some() {
            self.out.push_back(Action::Unsubscribe {
                filter: filter.to_owned(),
            });
        }
        let mut a = FrameBuilder::new(self.rules.key, "unsubscribed")
            .id(f.id.as_ref())
            .str("topic", filter);
        if let Some(token) = self.resume_token(now) {
            a = a.str("resume", &token);
        }
        self.out.push_back(Action::Send(a.finish()));
    }

    fn publish(&mut self, f: &ClientFrame) {
        if !self.rules.client_publish {
            return self.send_error(
                f.id.as_ref(),
                ErrorCode::Forbidden,
                "clients may not publish on this route",
            );
        }
        let Some(t) = self.topic_field(f) else { return };
        if let Err(e) = topic::validate_topic(t) {
            return self.send_error(f.id.as_ref(), ErrorCode::InvalidTopic, &e.to_string());
        }
        self.out.push_back(Action::Publish {
            topic: t.to_owned(),
            payload: f.body.get("payload").unwrap_or(&Value::Null).to_string(),
            echo: f.flag("echo"),
            id: f.id.clone(),
        });
    }

    /// `{"type":"refresh","token":…}`: checked by the shell as the upgrade's was.
    fn refresh(&mut self, f: &ClientFrame) {
        let Some(token) = f.str("token").filter(|t| !t.is_empty()) else {
            return self.send_error(
                f.id.as_ref(),
                ErrorCode::InvalidFrame,
                "refresh needs a string \"token\"",
            );
        };
        if self.rules.token.is_none() {
            return self.send_error(
                f.id.as_ref(),
                ErrorCode::NotSupported,
                "this route takes no token",
            );
        }
        self.out.push_back(Action::CheckToken {
            token: token.to_owned(),
            id: f.id.clone(),
        });
    }

    fn resource(&mut self, verb: Verb, f: &ClientFrame) {
        let field = self.rules.dialect.row().resource_field;
        let name = f.str(field).unwrap_or_default().to_owned();
        let params = match f.body.get("params") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => {
                let e = self.resource_error(
                    f,
                    &name,
                    ErrorCode::InvalidFrame,
                    "params must be an object",
                );
                return self.out.push_back(Action::Send(e));
            }
        };
        if verb == Verb::Stop {
            let key = watch_key(&name, &params);
            let prefix = format!("{name}\u{0}");
            let stopped: Vec<String> = self
                .watches
                .iter()
                .filter(|k| **k == key || (params.is_empty() && k.starts_with(&prefix)))
                .cloned()
                .collect();
            for k in stopped {
                self.watches.remove(&k);
                self.out.push_back(Action::StopWatch(k));
            }
            if self.rules.dialect.row().answers_stop {
                let a = FrameBuilder::new(self.rules.key, "stopped")
                    .id(f.id.as_ref())
                    .str(field, &name)
                    .value("params", &Value::Object(params))
                    .finish();
                self.out.push_back(Action::Send(a));
            }
            return;
        }
        let Some(res) = self.rules.resources.get(&name) else {
            let msg = if name.is_empty() {
                format!("{} needs a \"{field}\" naming a resource", f.verb)
            } else {
                format!("no resource type {name:?} on this route")
            };
            let e = self.resource_error(f, &name, ErrorCode::UnknownResource, &msg);
            return self.out.push_back(Action::Send(e));
        };
        if res.kind == ResourceKind::Topic && verb != Verb::Watch {
            let msg = format!("{name} is a topic: it can be watched, not queried");
            let e = self.resource_error(f, &name, ErrorCode::NotSupported, &msg);
            return self.out.push_back(Action::Send(e));
        }
        let (kind, id_field) = (res.kind, res.id_field.clone());
        let watch_key = (verb == Verb::Watch).then(|| {
            let k = watch_key(&name, &params);
            if !self.watches.insert(k.clone()) {
                self.out.push_back(Action::StopWatch(k.clone()));
            }
            k
        });
        self.out.push_back(Action::Resource(ResourceCall {
            verb,
            name,
            kind,
            id_field,
            params,
            id: f.id.clone(),
            watch_key,
        }));
    }

    /// A frame the shell built for the client (a resource's answer), sent in order with the
    /// session's own.
    pub fn answer(&mut self, frame: String) {
        if !self.closed {
            self.out.push_back(Action::Send(frame));
        }
    }

    /// The shell's watch ended on its own (its store failed): forget its key.
    pub fn watch_ended(&mut self, key: &str) {
        self.watches.remove(key);
    }

    /// An error about a resource: the usual code and message, plus the resource and params
    /// (as MonoRail's `{handler: error, type, params}`).
    fn resource_error(
        &self,
        f: &ClientFrame,
        name: &str,
        code: ErrorCode,
        message: &str,
    ) -> String {
        let params = f
            .body
            .get("params")
            .cloned()
            .unwrap_or(Value::Object(Map::new()));
        FrameBuilder::new(self.rules.key, "error")
            .id(f.id.as_ref())
            .str("code", code.as_str())
            .str("message", message)
            .str(self.rules.dialect.row().resource_field, name)
            .value("params", &params)
            .finish()
    }

    /// Any frame not handled by a built-in verb: a request to backends on the subjects the
    /// route's hooks map it to (the type's own subject, and the general one, which hears
    /// every event); each reply goes back to this connection only.
    fn forward_event(&mut self, f: &ClientFrame) {
        if self.pending.len() >= self.rules.max_inflight {
            return self.send_error(
                f.id.as_ref(),
                ErrorCode::TooManyRequests,
                "too many events awaiting a reply",
            );
        }
        let events = &self.rules.events;
        let typed = events
            .typed
            .iter()
            .find(|(t, _)| *t == f.verb)
            .map(|(_, s)| s.clone());
        let general = events.general.clone();
        let subjects: Vec<(To, bool)> = match (typed, general) {
            (None, None) => vec![(To::OwnEvent(f.verb.clone()), false)],
            (Some(t), None) => vec![(To::Subject(t), false)],
            (None, Some(g)) => vec![(To::Subject(g), false)],
            // Both hear it; only the type's own subject reports that nobody listens.
            (Some(t), Some(g)) => vec![(To::Subject(t), false), (To::Subject(g), true)],
        };
        for (to, quiet) in subjects {
            // The answer's type, unless the backend names one: the hook's subject, or the
            // event's type on its own subject.
            let reply_type = match &to {
                To::Subject(s) | To::OwnEvent(s) => s.clone(),
            };
            let request = self.track(Pending::Event {
                reply_type,
                id: f.id.clone(),
                quiet,
            });
            self.out.push_back(Action::Request {
                request,
                to,
                body: Body::Event(f.body.clone()),
            });
        }
    }

    /// monument: data-style events (`…:get:…`) are requests whose reply comes back as the
    /// matching `…:set:…` event; others are published on the subject the event names.
    fn monument_event(&mut self, f: ClientFrame) {
        let event = f.verb;
        if !is_client_subject(&event) {
            return self.send_error(
                f.id.as_ref(),
                ErrorCode::InvalidEvent,
                "event names a reserved or invalid subject",
            );
        }
        let modes = self.rules.monument;
        if event.contains(":get:") && modes.data {
            if self.pending.len() >= self.rules.max_inflight {
                return self.send_error(
                    f.id.as_ref(),
                    ErrorCode::TooManyRequests,
                    "too many events awaiting a reply",
                );
            }
            let set = event.replacen(":get:", ":set:", 1);
            let request = self.track(Pending::MonumentData { set });
            return self.out.push_back(Action::Request {
                request,
                to: To::Subject(event),
                body: Body::Socket(f.body),
            });
        }
        if !modes.passthrough {
            return self.out.push_back(Action::Ignored);
        }
        self.out.push_back(Action::Emit {
            subject: event,
            body: Body::Socket(f.body),
        });
    }
}

/// The identity of a watch on a connection: resource and params.
fn watch_key(name: &str, params: &Map<String, Value>) -> String {
    format!("{name}\u{0}{}", Value::Object(params.clone()))
}

/// A subject a client may name: valid for publishing, and outside what Switchboard and NATS
/// reserve for themselves.
fn is_client_subject(s: &str) -> bool {
    proto::subject::is_valid_publish_subject(s)
        && s.len() <= 256
        && !s.starts_with("sb.")
        && !s.starts_with("_INBOX")
        && !s.starts_with('$')
}

enum Answer {
    Payload(String),
    Error(String),
}

/// A backend answers `{"payload":…}` or `{"error":…}`; anything else is the payload.
fn parse_answer(body: &[u8]) -> Answer {
    if let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(body) {
        if let Some(e) = m.remove("error") {
            return Answer::Error(e.to_string());
        }
        if let Some(p) = m.remove("payload") {
            return Answer::Payload(p.to_string());
        }
        return Answer::Payload(Value::Object(m).to_string());
    }
    Answer::Payload(frame::json_or_string(body))
}

fn hook_frame(key: Key, verb: &str, id: Option<&Value>, payload: &str) -> String {
    FrameBuilder::new(key, verb)
        .id(id)
        .raw("payload", payload)
        .finish()
}

fn monument_reply(key: Key, set: &str, body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut m)) => {
            if let Some(e) = m.remove("error") {
                FrameBuilder::new(key, "error")
                    .raw("payload", &e.to_string())
                    .finish()
            } else {
                m.remove(key.as_str());
                let mut b = FrameBuilder::new(key, set);
                for (k, v) in &m {
                    b = b.value(k, v);
                }
                b.finish()
            }
        }
        _ => FrameBuilder::new(key, set)
            .raw("payload", &frame::json_or_string(body))
            .finish(),
    }
}

/// A connection's token deadlines: `refresh_required` at `notify_at` (dialects with the
/// `refresh` verb), the close with 4001 at `expire_at` (`exp` plus the route's leeway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TokenClock {
    exp: i64,
    notify_at: Option<Instant>,
    expire_at: Instant,
}

/// What a [`TokenClock`] calls for when the timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenEvent {
    Notify { exp: i64 },
    Expired,
}

const TEN_YEARS_MS: i64 = 10 * 365 * 86_400 * 1000;

impl TokenClock {
    /// Deadlines for a token expiring at `exp` (Unix seconds), seen at `now_ms` (Unix
    /// milliseconds) = `now`.
    fn new(exp: i64, now_ms: i64, now: Instant, leeway: Duration, lead: Option<Duration>) -> Self {
        // A far `exp` is as good as ten years: no connection lives that long, and the
        // timer's arithmetic cannot overflow.
        let left = exp
            .saturating_mul(1000)
            .saturating_sub(now_ms)
            .clamp(0, TEN_YEARS_MS);
        let exp_at = now + Duration::from_millis(left as u64);
        Self {
            exp,
            notify_at: lead.map(|l| exp_at.checked_sub(l).unwrap_or(now).max(now)),
            expire_at: exp_at
                .checked_add(leeway)
                .unwrap_or(exp_at + Duration::from_millis(TEN_YEARS_MS as u64)),
        }
    }

    fn next(&self) -> Instant {
        self.notify_at
            .map_or(self.expire_at, |n| n.min(self.expire_at))
    }

    /// What is due at `now`; a notice is given once.
    fn on_timer(&mut self, now: Instant) -> Option<TokenEvent> {
        if self.expire_at <= now {
            return Some(TokenEvent::Expired);
        }
        if self.notify_at.is_some_and(|n| n <= now) {
            self.notify_at = None;
            return Some(TokenEvent::Notify { exp: self.exp });
        }
        None
    }
}

/// A token bucket refilled continuously.
#[derive(Debug)]
struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(per_second: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst);
        Self {
            per_second: f64::from(per_second),
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if self.per_second == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
// A test needs an origin instant; std has no other way to make one.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn token_clock_notifies_once_then_expires() {
        let now = Instant::now();
        let s = Duration::from_secs;
        // exp 10 s away, seen at t = 1000 s; 3 s notice, 1 s leeway.
        let mut c = TokenClock::new(1010, 1_000_000, now, s(1), Some(s(3)));
        assert_eq!(c.next(), now + s(7));
        assert_eq!(c.on_timer(now + s(6)), None);
        assert_eq!(
            c.on_timer(now + s(7)),
            Some(TokenEvent::Notify { exp: 1010 })
        );
        assert_eq!(
            c.next(),
            now + s(11),
            "after the notice only the expiry is left"
        );
        assert_eq!(c.on_timer(now + s(10)), None);
        assert_eq!(c.on_timer(now + s(11)), Some(TokenEvent::Expired));
        // A lead longer than the token's life: the notice is due at once.
        let c = TokenClock::new(1002, 1_000_000, now, Duration::ZERO, Some(s(30)));
        assert_eq!(c.next(), now);
        // Already expired: due at once; no notice on dialects without `refresh`.
        let mut c = TokenClock::new(990, 1_000_000, now, Duration::ZERO, None);
        assert_eq!(c.on_timer(now), Some(TokenEvent::Expired));
        // Absurd values neither overflow nor expire early.
        let c = TokenClock::new(i64::MAX, 0, now, s(u64::from(u32::MAX)), Some(s(30)));
        assert!(c.next() > now + s(86_400 * 365));
        let c = TokenClock::new(i64::MIN, i64::MAX, now, Duration::ZERO, Some(s(30)));
        assert_eq!(c.next(), now);
    }

    #[test]
    fn bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 2, t0);
        assert!(b.take(t0));
        assert!(b.take(t0));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert!(!b.take(t0 + Duration::from_millis(100)));
        // No limit: always.
        let mut free = TokenBucket::new(0, 0, t0);
        assert!((0..1000).all(|_| free.take(t0)));
    }
}
