//! The per-connection session driven through its public API as the shell drives it: client
//! frames and the outcomes of actions in, actions out, time as explicit instants. Every verb
//! is checked in every dialect of the table that has it (docs/PROTOCOL.md §4, §9), then
//! events and their replies (§5), timers (§3, §8), and property tests: arbitrary frames in
//! every dialect, and topic traffic against a model.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_core::dialect::{Other, TABLE, Unreadable};
use edge_core::history::{Entry, Page, Position};
use edge_core::session::{
    Action, Body, Close, ConnectHook, EventRoutes, Failure, MonumentModes, Published, RateLimit,
    RequestId, Resource, ResourceCall, ResourceKind, Rules, Session, Subscribed, To, TokenPolicy,
};
use edge_core::{Dialect, Verb};
use proptest::prelude::*;
use proto::frame::Key;
use serde_json::{Map, Value, json};

/// The test's origin in Unix milliseconds (the same instant as [`origin`]).
const NOW_MS: i64 = 1_800_000_000_000;
/// The same in Unix seconds, for tokens' `exp`.
const NOW_S: i64 = NOW_MS / 1000;
const CONN: &str = "01CONNECTION";

/// The one clock read of these tests: an arbitrary origin the session only sees offsets of.
#[allow(
    clippy::disallowed_methods,
    reason = "std has no other way to make an Instant"
)]
fn origin() -> Instant {
    Instant::now()
}

fn dialect(name: &str) -> Dialect {
    Dialect::named(name).expect("a dialect of the table")
}

fn every_dialect() -> Vec<Dialect> {
    TABLE.iter().map(|r| dialect(r.name)).collect()
}

/// The dialects that have `verb`; never empty for a verb of the native table.
fn having(verb: Verb) -> Vec<Dialect> {
    let ds: Vec<_> = every_dialect()
        .into_iter()
        .filter(|d| d.has(verb))
        .collect();
    assert!(!ds.is_empty(), "no dialect has {verb:?}");
    ds
}

/// A route of `d` with the limits of the default config and nothing optional.
fn rules(d: Dialect) -> Rules {
    Rules {
        dialect: d,
        key: d.key(),
        max_topics: 256,
        max_inflight: 32,
        ..Rules::default()
    }
}

/// A route with a key-value resource `nodes` and a topic resource `alerts`.
fn with_resources(mut r: Rules) -> Rules {
    for (name, kind) in [("nodes", ResourceKind::Kv), ("alerts", ResourceKind::Topic)] {
        let res = Resource {
            kind,
            id_field: "id".to_owned(),
        };
        r.resources.insert(name.to_owned(), res);
    }
    r
}

/// A session and the instant it was opened at.
struct Conn {
    s: Session,
    t0: Instant,
    key: Key,
    /// The dialect's resource field.
    field: &'static str,
}

/// A subscription's outcome in tests of topics without history.
fn outcome(ok: bool) -> Subscribed {
    if ok {
        Subscribed::Live {
            position: None,
            recovered: None,
        }
    } else {
        Subscribed::Failed
    }
}

/// A publication's outcome on a topic without history.
fn taken(ok: bool) -> Option<Published> {
    ok.then_some(Published { position: None })
}

impl Conn {
    fn open(rules: Rules) -> Self {
        Self::open_with_exp(rules, None)
    }

    fn open_with_exp(rules: Rules, exp: Option<i64>) -> Self {
        let t0 = origin();
        let (key, field) = (rules.key, rules.dialect.row().resource_field);
        let s = Session::new(Arc::new(rules), CONN.to_owned(), t0, NOW_MS, exp);
        Self { s, t0, key, field }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// Sends `frame` (its routing field added) at the origin and drains the actions.
    fn verb(&mut self, verb: &str, fields: Value) -> Vec<Action> {
        let text = frame(self.key, verb, fields).to_string();
        self.text(&text)
    }

    fn text(&mut self, text: &str) -> Vec<Action> {
        self.s.on_text(text, self.t0);
        self.drain()
    }

    fn drain(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.s.poll_action()).collect()
    }

    /// The session's one action for `verb`, which must be a frame to the client.
    fn answer(&mut self, verb: &str, fields: Value) -> Value {
        only_frame(self.verb(verb, fields))
    }

    /// Sends an event and returns the requests it made.
    fn requests(&mut self, verb: &str, fields: Value) -> Vec<(RequestId, To, Body)> {
        self.verb(verb, fields)
            .into_iter()
            .map(|a| match a {
                Action::Request { request, to, body } => (request, to, body),
                other => panic!("expected a request, got {other:?}"),
            })
            .collect()
    }

    /// The actions after a backend request's outcome.
    fn reply(&mut self, request: RequestId, result: Result<&[u8], Failure>) -> Vec<Action> {
        self.s.on_reply(request, result);
        self.drain()
    }

    fn topics(&self) -> BTreeSet<String> {
        self.s.topics().cloned().collect()
    }
}

/// `{"<key>":"<verb>", …fields}`.
fn frame(key: Key, verb: &str, fields: Value) -> Value {
    let mut m = Map::new();
    m.insert(key.as_str().to_owned(), Value::from(verb));
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    Value::Object(m)
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The frames among `actions`, parsed.
fn frames(actions: &[Action]) -> Vec<Value> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(t) => Some(parse(t)),
            _ => None,
        })
        .collect()
}

/// An action with its frame parsed, to compare frames as JSON rather than as text.
#[derive(Debug, PartialEq)]
enum Norm {
    Frame(Value),
    Act(Action),
}

fn norm(actions: Vec<Action>) -> Vec<Norm> {
    actions
        .into_iter()
        .map(|a| match a {
            Action::Send(t) => Norm::Frame(parse(&t)),
            other => Norm::Act(other),
        })
        .collect()
}

fn only_frame(actions: Vec<Action>) -> Value {
    match <[Action; 1]>::try_from(actions) {
        Ok([Action::Send(t)]) => parse(&t),
        Ok(other) => panic!("expected one frame, got {other:?}"),
        Err(other) => panic!("expected one frame, got {other:?}"),
    }
}

/// Asserts `f` is an error frame with `code` (and the frame's `id` when given).
#[allow(
    clippy::needless_pass_by_value,
    reason = "expected ids read best as `Some(json!(1))`"
)]
fn assert_error(key: Key, f: &Value, code: &str, id: Option<Value>) {
    assert_eq!(f[key.as_str()], "error", "{f}");
    assert_eq!(f["code"], code, "{f}");
    assert!(f["message"].as_str().is_some_and(|m| !m.is_empty()), "{f}");
    assert_eq!(f.get("id"), id.as_ref(), "{f}");
}

fn error_frame(key: Key, actions: Vec<Action>, code: &str, id: Option<Value>) {
    let f = only_frame(actions);
    assert_error(key, &f, code, id);
}

/// Unwraps the event body of a request.
fn event_body(body: &Body) -> &Map<String, Value> {
    match body {
        Body::Event(m) => m,
        other => panic!("expected an event body, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// §4.1 init and ping
// ---------------------------------------------------------------------------------------

#[test]
fn init_answers_the_session_it_names_or_the_connection_id() {
    for d in having(Verb::Init) {
        let mut c = Conn::open(rules(d));
        let k = d.key().as_str();
        let f = c.answer("init", json!({}));
        assert_eq!(f, json!({k: "session", "id": CONN}), "{d}");
        // A client's own name is kept; its frame `id` is not the answer's.
        let f = c.answer("init", json!({"session": "s-1", "id": 9}));
        assert_eq!(f, json!({k: "session", "id": "s-1"}), "{d}");
        let longest = "x".repeat(128);
        let f = c.answer("init", json!({ "session": longest }));
        assert_eq!(f["id"], longest.as_str(), "{d}");
        // Empty, too long or not a string: the connection's id.
        for bad in [json!(""), json!("x".repeat(129)), json!(5), json!(null)] {
            let f = c.answer("init", json!({ "session": bad }));
            assert_eq!(f["id"], CONN, "{d} {bad}");
        }
    }
}

#[test]
fn ping_is_answered_pong_with_the_frames_id() {
    for d in having(Verb::Ping) {
        let mut c = Conn::open(rules(d));
        let k = d.key().as_str();
        assert_eq!(c.answer("ping", json!({})), json!({k: "pong"}), "{d}");
        assert_eq!(
            c.answer("ping", json!({"id": 3})),
            json!({k: "pong", "id": 3})
        );
        assert_eq!(
            c.answer("ping", json!({"id": "p"})),
            json!({k: "pong", "id": "p"})
        );
        // An id that is neither a string nor a number is not an id.
        assert_eq!(
            c.answer("ping", json!({"id": [1]})),
            json!({k: "pong"}),
            "{d}"
        );
    }
}

/// A client matching answers by a numeric `id` (JavaScript's `Math.random()`, say) gets back
/// the number it sent, not a neighbour of it.
#[test]
fn a_fractional_id_comes_back_as_the_same_number() {
    let mut c = Conn::open(rules(dialect("native")));
    for id in [
        "0.9856906946328695",
        "0.21291890726713458",
        "3.775875797511407e150",
    ] {
        let text = format!(r#"{{"type":"ping","id":{id}}}"#);
        let f = only_frame(c.text(&text));
        let sent: f64 = id.parse().expect("a float");
        assert_eq!(f["id"].as_f64(), Some(sent), "{text} answered {f}");
    }
}

/// A route's `key:` overrides its dialect's routing field, in what clients send and in every
/// frame the edge builds (docs/PROTOCOL.md §9).
#[test]
fn a_routes_key_routes_every_frame() {
    let native = dialect("native");
    let mut c = Conn::open_with_exp(
        Rules {
            key: Key::Event,
            ..with_token(with_resources(rules(native)))
        },
        Some(EXP),
    );
    assert_eq!(
        c.answer("ping", json!({"id": 1})),
        json!({"event": "pong", "id": 1})
    );
    let f = c.answer("query", json!({"resource": "nope"}));
    assert_eq!(f["event"], "error");
    // The dialect's own field is no routing field any more.
    error_frame(c.key, c.text(r#"{"type":"ping"}"#), "missing_type", None);
    c.s.handle_timeout(c.at(70_000));
    assert_eq!(
        only_frame(c.drain()),
        json!({"event": "refresh_required", "exp": EXP})
    );
    let reqs = c.requests("chat", json!({"id": 2}));
    let f = only_frame(c.reply(reqs[0].0, Ok(b"1")));
    assert_eq!(f, json!({"event": "chat", "id": 2, "payload": 1}));
}

/// A verb a dialect lacks is whatever that dialect makes of any other routing value.
#[test]
fn verbs_a_dialect_lacks_are_not_answered_as_verbs() {
    let mut seen = 0;
    for d in every_dialect() {
        for v in Verb::ALL.into_iter().filter(|v| !d.has(*v)) {
            seen += 1;
            let mut c = Conn::open(rules(d));
            let actions = c.verb(v.as_str(), json!({"id": 1, "topic": "a"}));
            match d.row().other {
                Other::Forward => match actions.as_slice() {
                    [Action::Request { to, body, .. }] => {
                        assert_eq!(*to, To::OwnEvent(v.as_str().to_owned()), "{d} {v:?}");
                        assert_eq!(event_body(body)["topic"], "a");
                    }
                    other => panic!("{d} {v:?}: {other:?}"),
                },
                Other::ForwardOrUnknownHandler => {
                    error_frame(c.key, actions, "unknown_verb", Some(json!(1)));
                }
                // No monument mode: nothing is forwarded.
                Other::SubjectEvent => assert_eq!(actions, [Action::Ignored], "{d} {v:?}"),
            }
        }
    }
    assert!(
        seen >= 11 + 11 + 5,
        "monument, bodhi and monorail lack verbs"
    );
}

// ---------------------------------------------------------------------------------------
// §4.2 topics
// ---------------------------------------------------------------------------------------

#[test]
fn subscribe_is_answered_once_the_shell_has_the_subscription() {
    for d in having(Verb::Subscribe) {
        let mut c = Conn::open(rules(d));
        let k = d.key().as_str();
        let actions = c.verb("subscribe", json!({"topic": "chat/+", "id": 1}));
        assert_eq!(
            actions,
            [Action::Subscribe {
                filter: "chat/+".to_owned(),
                id: Some(json!(1)),
                since: None,
            }],
            "{d}: no answer before the subscription is in place"
        );
        assert!(c.topics().is_empty());
        c.s.subscribed(
            "chat/+".to_owned(),
            Some(&json!(1)),
            outcome(true),
            origin(),
        );
        let f = only_frame(c.drain());
        assert_eq!(f, json!({k: "subscribed", "id": 1, "topic": "chat/+"}));
        assert_eq!(c.topics(), BTreeSet::from(["chat/+".to_owned()]));
    }
}

#[test]
fn subscribe_refuses_invalid_filters_and_frames_without_a_topic() {
    for d in having(Verb::Subscribe) {
        let mut c = Conn::open(rules(d));
        let too_long = "a".repeat(1025);
        let too_deep = vec!["a"; 33].join("/");
        for bad in ["a/#/b", "a+", "a/b#", "", "a/\u{1}", &too_long, &too_deep] {
            let actions = c.verb("subscribe", json!({"topic": bad, "id": "s"}));
            error_frame(c.key, actions, "invalid_topic", Some(json!("s")));
        }
        for bad in [json!({"id": 2}), json!({"id": 2, "topic": 7})] {
            let actions = c.verb("subscribe", bad);
            error_frame(c.key, actions, "invalid_frame", Some(json!(2)));
        }
        assert!(c.topics().is_empty(), "{d}");
    }
}

#[test]
fn subscribe_past_max_topics_is_forbidden() {
    for d in having(Verb::Subscribe) {
        let mut c = Conn::open(Rules {
            max_topics: 2,
            ..rules(d)
        });
        for t in ["a", "b"] {
            let actions = c.verb("subscribe", json!({ "topic": t }));
            assert!(matches!(actions.as_slice(), [Action::Subscribe { .. }]));
            c.s.subscribed(t.to_owned(), None, outcome(true), origin());
            c.drain();
        }
        let actions = c.verb("subscribe", json!({"topic": "c", "id": 3}));
        error_frame(c.key, actions, "forbidden", Some(json!(3)));
        // A filter already held is not one more.
        let f = c.answer("subscribe", json!({"topic": "a", "id": 4}));
        assert_eq!(f[c.key.as_str()], "subscribed", "{d}");
        // After an unsubscribe there is room again.
        c.verb("unsubscribe", json!({"topic": "b"}));
        let actions = c.verb("subscribe", json!({"topic": "c"}));
        assert!(
            matches!(actions.as_slice(), [Action::Subscribe { .. }]),
            "{d}"
        );
    }
}

#[test]
fn subscribing_twice_answers_without_a_second_subscription() {
    for d in having(Verb::Subscribe) {
        let mut c = Conn::open(rules(d));
        let k = d.key().as_str();
        c.verb("subscribe", json!({"topic": "a/#"}));
        c.s.subscribed("a/#".to_owned(), None, outcome(true), origin());
        c.drain();
        let f = c.answer("subscribe", json!({"topic": "a/#", "id": 2}));
        assert_eq!(f, json!({k: "subscribed", "id": 2, "topic": "a/#"}));
        assert_eq!(c.topics().len(), 1);
    }
}

#[test]
fn a_failed_subscription_is_unavailable_and_holds_nothing() {
    for d in having(Verb::Subscribe) {
        let mut c = Conn::open(rules(d));
        c.verb("subscribe", json!({"topic": "a", "id": 1}));
        c.s.subscribed("a".to_owned(), Some(&json!(1)), outcome(false), origin());
        error_frame(c.key, c.drain(), "unavailable", Some(json!(1)));
        assert!(c.topics().is_empty());
        // And the client may try again.
        let actions = c.verb("subscribe", json!({"topic": "a"}));
        assert!(
            matches!(actions.as_slice(), [Action::Subscribe { .. }]),
            "{d}"
        );
    }
}

#[test]
fn unsubscribe_closes_a_held_filter_and_is_answered_either_way() {
    for d in having(Verb::Unsubscribe) {
        let mut c = Conn::open(rules(d));
        let k = d.key().as_str();
        c.verb("subscribe", json!({"topic": "a/+"}));
        c.s.subscribed("a/+".to_owned(), None, outcome(true), origin());
        c.drain();
        let actions = c.verb("unsubscribe", json!({"topic": "a/+", "id": 5}));
        let answer = json!({k: "unsubscribed", "id": 5, "topic": "a/+"});
        let unsubscribe = Action::Unsubscribe {
            filter: "a/+".to_owned(),
        };
        let expected = [Norm::Act(unsubscribe), Norm::Frame(answer)];
        assert_eq!(norm(actions), expected, "{d}");
        assert!(c.topics().is_empty());
        // Not held (any more, or ever, or not even a filter): answered, nothing to close.
        for t in ["a/+", "never", "a/#/b"] {
            let f = c.answer("unsubscribe", json!({ "topic": t }));
            assert_eq!(f, json!({k: "unsubscribed", "topic": t}), "{d}");
        }
        let actions = c.verb("unsubscribe", json!({"id": 6}));
        error_frame(c.key, actions, "invalid_frame", Some(json!(6)));
    }
}

#[test]
fn publish_is_forbidden_unless_the_route_allows_it() {
    for d in having(Verb::Publish) {
        let mut c = Conn::open(rules(d));
        let actions = c.verb("publish", json!({"topic": "a", "payload": 1, "id": 1}));
        error_frame(c.key, actions, "forbidden", Some(json!(1)));
    }
}

#[test]
fn publish_hands_the_topic_payload_and_echo_to_the_shell() {
    for d in having(Verb::Publish) {
        let mut c = Conn::open(Rules {
            client_publish: true,
            ..rules(d)
        });
        let k = d.key().as_str();
        let actions = c.verb(
            "publish",
            json!({"topic": "chat/room1", "payload": {"text": "hi"}, "echo": true, "id": 2}),
        );
        assert_eq!(
            actions,
            [Action::Publish {
                topic: "chat/room1".to_owned(),
                payload: r#"{"text":"hi"}"#.to_owned(),
                echo: true,
                id: Some(json!(2)),
            }],
            "{d}"
        );
        // No payload is null; no echo (or not a boolean) is no echo.
        for echo in [json!(null), json!(false), json!("true"), json!(1)] {
            let actions = c.verb("publish", json!({"topic": "t", "echo": echo}));
            let expected = Action::Publish {
                topic: "t".to_owned(),
                payload: "null".to_owned(),
                echo: false,
                id: None,
            };
            assert_eq!(actions, [expected], "{d} {echo}");
        }
        c.s.published("chat/room1", Some(&json!(2)), taken(true));
        let f = only_frame(c.drain());
        assert_eq!(f, json!({k: "published", "id": 2, "topic": "chat/room1"}));
        c.s.published("chat/room1", Some(&json!("x")), taken(false));
        error_frame(c.key, c.drain(), "unavailable", Some(json!("x")));
    }
}

#[test]
fn publish_needs_a_concrete_topic() {
    for d in having(Verb::Publish) {
        let mut c = Conn::open(Rules {
            client_publish: true,
            ..rules(d)
        });
        for bad in ["a/+", "a/#", "#", "", "a\u{0}"] {
            let actions = c.verb("publish", json!({"topic": bad, "id": 3}));
            error_frame(c.key, actions, "invalid_topic", Some(json!(3)));
        }
        for bad in [json!({"id": 4}), json!({"id": 4, "topic": ["a"]})] {
            let actions = c.verb("publish", bad);
            error_frame(c.key, actions, "invalid_frame", Some(json!(4)));
        }
    }
}

// ---------------------------------------------------------------------------------------
// §4.4 refresh
// ---------------------------------------------------------------------------------------

/// A route with a token: `refresh_required` 30 s before `exp`, the close 5 s after it.
fn with_token(r: Rules) -> Rules {
    Rules {
        token: Some(TokenPolicy {
            leeway: Duration::from_secs(5),
            refresh_lead: Duration::from_secs(30),
        }),
        ..r
    }
}

/// A token expiring 100 s after the origin.
const EXP: i64 = NOW_S + 100;

#[test]
fn refresh_needs_a_token() {
    for d in having(Verb::Refresh) {
        let mut c = Conn::open_with_exp(with_token(rules(d)), Some(EXP));
        for bad in [
            json!({"id": 1}),
            json!({"id": 1, "token": ""}),
            json!({"id": 1, "token": 7}),
        ] {
            let actions = c.verb("refresh", bad);
            error_frame(c.key, actions, "invalid_frame", Some(json!(1)));
        }
    }
}

#[test]
fn refresh_on_a_route_without_tokens_is_not_supported() {
    for d in having(Verb::Refresh) {
        let mut c = Conn::open(rules(d));
        let actions = c.verb("refresh", json!({"token": "t", "id": "r"}));
        error_frame(c.key, actions, "not_supported", Some(json!("r")));
    }
}

#[test]
fn an_accepted_refresh_rearms_the_token_deadlines() {
    for d in having(Verb::Refresh) {
        let mut c = Conn::open_with_exp(with_token(rules(d)), Some(EXP));
        let k = d.key().as_str();
        let actions = c.verb("refresh", json!({"token": "new.jwt", "id": 7}));
        let check = Action::CheckToken {
            token: "new.jwt".to_owned(),
            id: Some(json!(7)),
        };
        assert_eq!(actions, [check], "{d}");
        let exp = NOW_S + 1000;
        c.s.token_checked(
            Some(&json!(7)),
            Ok(Some(exp)),
            c.at(80_000),
            NOW_MS + 80_000,
        );
        let f = only_frame(c.drain());
        assert_eq!(f, json!({k: "refreshed", "id": 7, "exp": exp}), "{d}");
        // The new token's notice (30 s before its exp) is the next deadline; the old
        // token's expiry is gone.
        assert_eq!(c.s.poll_timeout(), Some(c.at(970_000)), "{d}");
        c.s.handle_timeout(c.at(105_000));
        assert_eq!(
            c.drain(),
            [],
            "{d}: the old token's expiry no longer closes"
        );
        c.s.handle_timeout(c.at(970_000));
        let f = only_frame(c.drain());
        assert_eq!(f, json!({k: "refresh_required", "exp": exp}));
        c.s.handle_timeout(c.at(1_005_000));
        assert_eq!(c.drain(), [Action::Close(Close::TokenExpired)], "{d}");
    }
}

#[test]
fn a_refused_refresh_keeps_the_old_deadlines() {
    for d in having(Verb::Refresh) {
        let mut c = Conn::open_with_exp(with_token(rules(d)), Some(EXP));
        c.verb("refresh", json!({"token": "bad", "id": 7}));
        let before = c.s.poll_timeout();
        let message = "token is for another user";
        c.s.token_checked(Some(&json!(7)), Err(message), c.at(10_000), NOW_MS + 10_000);
        let f = only_frame(c.drain());
        assert_error(c.key, &f, "invalid_token", Some(json!(7)));
        assert_eq!(f["message"], message);
        assert_eq!(c.s.poll_timeout(), before, "{d}");
        c.s.handle_timeout(c.at(70_000));
        assert_eq!(frames(&c.drain())[0][d.key().as_str()], "refresh_required");
        c.s.handle_timeout(c.at(105_000));
        assert_eq!(c.drain(), [Action::Close(Close::TokenExpired)], "{d}");
    }
}

#[test]
fn an_accepted_refresh_without_exp_ends_the_token_deadlines() {
    for d in having(Verb::Refresh) {
        let mut c = Conn::open_with_exp(with_token(rules(d)), Some(EXP));
        c.verb("refresh", json!({"token": "forever"}));
        c.s.token_checked(None, Ok(None), c.at(1_000), NOW_MS + 1_000);
        let k = d.key().as_str();
        assert_eq!(only_frame(c.drain()), json!({k: "refreshed", "exp": null}));
        assert_eq!(c.s.poll_timeout(), None, "{d}");
    }
}

// ---------------------------------------------------------------------------------------
// §4.3 resources
// ---------------------------------------------------------------------------------------

/// The resource verbs that name a resource type that must exist.
const LOOKUPS: [Verb; 4] = [Verb::Watch, Verb::Query, Verb::All, Verb::Get];

fn resource_call(actions: &[Action]) -> &ResourceCall {
    match actions.last() {
        Some(Action::Resource(call)) => call,
        other => panic!("expected a resource call, got {other:?}"),
    }
}

#[test]
fn resource_verbs_on_an_unknown_resource_say_which_one() {
    for d in having(Verb::Watch) {
        let mut c = Conn::open(with_resources(rules(d)));
        let (k, field) = (d.key().as_str(), d.row().resource_field);
        for v in LOOKUPS {
            assert!(d.has(v), "{d} {v:?}");
            let f = c.answer(
                v.as_str(),
                json!({field: "nope", "params": {"a": 1}, "id": 1}),
            );
            assert_error(c.key, &f, "unknown_resource", Some(json!(1)));
            assert_eq!(f[field], "nope", "{d} {v:?}");
            assert_eq!(f["params"], json!({"a": 1}));
            // No resource named at all (or not a string).
            for fields in [json!({}), json!({ field: 3 })] {
                let f = c.answer(v.as_str(), fields);
                assert_error(c.key, &f, "unknown_resource", None);
                assert_eq!(f[field], "", "{d} {v:?}");
                assert_eq!(f["params"], json!({}));
            }
            assert_eq!(f[k], "error");
        }
    }
}

#[test]
fn resource_params_must_be_an_object() {
    for d in having(Verb::Watch) {
        let mut c = Conn::open(with_resources(rules(d)));
        let field = d.row().resource_field;
        for v in Verb::RESOURCES {
            for bad in [json!([1]), json!("x"), json!(3), json!(true)] {
                let f = c.answer(v.as_str(), json!({field: "nodes", "params": bad, "id": 2}));
                assert_error(c.key, &f, "invalid_frame", Some(json!(2)));
                assert_eq!(f[field], "nodes", "{d} {v:?}");
                assert_eq!(f["params"], bad, "{d} {v:?}: the params sent");
            }
        }
        // `null` is no params.
        let actions = c.verb("query", json!({field: "nodes", "params": null}));
        assert_eq!(resource_call(&actions).params, Map::new());
    }
}

#[test]
fn topic_resources_can_be_watched_not_queried() {
    for d in having(Verb::Watch) {
        let mut c = Conn::open(with_resources(rules(d)));
        let field = d.row().resource_field;
        for v in [Verb::Query, Verb::All, Verb::Get] {
            let f = c.answer(v.as_str(), json!({field: "alerts", "id": 3}));
            assert_error(c.key, &f, "not_supported", Some(json!(3)));
            assert_eq!(f[field], "alerts", "{d} {v:?}");
        }
        let actions = c.verb("watch", json!({ field: "alerts" }));
        let call = resource_call(&actions);
        assert_eq!((call.verb, call.kind), (Verb::Watch, ResourceKind::Topic));
    }
}

#[test]
fn kv_resource_verbs_go_to_the_shell_with_what_it_needs() {
    for d in having(Verb::Watch) {
        let mut c = Conn::open(with_resources(rules(d)));
        let field = d.row().resource_field;
        for v in LOOKUPS {
            let actions = c.verb(
                v.as_str(),
                json!({field: "nodes", "params": {"rack": "r1"}, "id": 8}),
            );
            assert_eq!(actions.len(), 1, "{d} {v:?}: {actions:?}");
            let call = resource_call(&actions);
            assert_eq!(call.verb, v);
            assert_eq!(call.name, "nodes");
            assert_eq!(call.kind, ResourceKind::Kv);
            assert_eq!(call.id_field, "id");
            assert_eq!(Value::Object(call.params.clone()), json!({"rack": "r1"}));
            assert_eq!(call.id, Some(json!(8)));
            assert_eq!(call.watch_key.is_some(), v == Verb::Watch, "{d} {v:?}");
        }
    }
}

/// Watches `nodes` with `params`; returns the watch's key.
fn watch(c: &mut Conn, params: Value) -> String {
    let mut fields = Map::new();
    fields.insert(c.field.to_owned(), json!("nodes"));
    fields.insert("params".to_owned(), params);
    let actions = c.verb("watch", Value::Object(fields));
    resource_call(&actions)
        .watch_key
        .clone()
        .expect("a watch has a key")
}

#[test]
fn a_second_watch_with_the_same_params_replaces_the_first() {
    for d in having(Verb::Watch) {
        let mut c = Conn::open(with_resources(rules(d)));
        let k1 = watch(&mut c, json!({"rack": "r1", "row": 2}));
        let field = d.row().resource_field;
        let again = json!({field: "nodes", "params": {"row": 2, "rack": "r1"}});
        let actions = c.verb("watch", again);
        assert_eq!(actions.len(), 2, "{d}: {actions:?}");
        assert_eq!(actions[0], Action::StopWatch(k1.clone()), "{d}");
        assert_eq!(resource_call(&actions).watch_key.as_ref(), Some(&k1));
        // Other params are another watch.
        let k2 = watch(&mut c, json!({"rack": "r2"}));
        assert_ne!(k1, k2);
        // A watch that ended on its own is not stopped again.
        c.s.watch_ended(&k2);
        let actions = c.verb("watch", json!({field: "nodes", "params": {"rack": "r2"}}));
        assert_eq!(actions.len(), 1, "{d}: {actions:?}");
    }
}

#[test]
fn stop_ends_one_watch_or_every_watch_of_a_resource() {
    for d in having(Verb::Stop) {
        let mut c = Conn::open(with_resources(rules(d)));
        let field = d.row().resource_field;
        let answered = |params: Value, id: Option<i64>| -> Vec<Norm> {
            if !d.row().answers_stop {
                return vec![];
            }
            let mut f = frame(d.key(), "stopped", json!({}));
            if let Some(id) = id {
                f["id"] = json!(id);
            }
            f[field] = json!("nodes");
            f["params"] = params;
            vec![Norm::Frame(f)]
        };
        let r1 = watch(&mut c, json!({"rack": "r1"}));
        let r2 = watch(&mut c, json!({"rack": "r2"}));
        let all = watch(&mut c, json!({}));
        // One watch: the one with the same params.
        let actions = c.verb(
            "stop",
            json!({field: "nodes", "params": {"rack": "r1"}, "id": 9}),
        );
        let mut expected = vec![Norm::Act(Action::StopWatch(r1))];
        expected.extend(answered(json!({"rack": "r1"}), Some(9)));
        assert_eq!(norm(actions), expected, "{d}");
        // Nothing watched with these params: answered all the same.
        let actions = c.verb("stop", json!({field: "nodes", "params": {"rack": "r9"}}));
        assert_eq!(norm(actions), answered(json!({"rack": "r9"}), None), "{d}");
        // Empty params: every watch of the resource, in any order.
        let mut actions = norm(c.verb("stop", json!({ field: "nodes" })));
        let answer = answered(json!({}), None);
        let stops: BTreeSet<_> = actions.drain(..actions.len() - answer.len()).collect_keys();
        assert_eq!(stops, BTreeSet::from([r2, all]), "{d}");
        assert_eq!(actions, answer, "{d}");
        let actions = c.verb("stop", json!({ field: "nodes" }));
        assert_eq!(
            norm(actions),
            answered(json!({}), None),
            "{d}: nothing left"
        );
    }
}

trait CollectKeys {
    fn collect_keys(self) -> BTreeSet<String>;
}

impl<I: Iterator<Item = Norm>> CollectKeys for I {
    fn collect_keys(self) -> BTreeSet<String> {
        self.map(|a| match a {
            Norm::Act(Action::StopWatch(k)) => k,
            other => panic!("expected a stop, got {other:?}"),
        })
        .collect()
    }
}

#[test]
fn monorail_stop_has_no_answer() {
    let d = dialect("monorail");
    assert!(!d.row().answers_stop);
    let mut c = Conn::open(with_resources(rules(d)));
    let key = watch(&mut c, json!({"rack": "r1"}));
    let actions = c.verb(
        "stop",
        json!({"type": "nodes", "params": {"rack": "r1"}, "id": 1}),
    );
    assert_eq!(actions, [Action::StopWatch(key)]);
    assert_eq!(c.verb("stop", json!({"type": "nodes"})), []);
}

// ---------------------------------------------------------------------------------------
// §3 and §9: frames a dialect cannot read
// ---------------------------------------------------------------------------------------

#[test]
fn unreadable_frames_are_errors_without_an_id() {
    let ds: Vec<_> = every_dialect()
        .into_iter()
        .filter(|d| d.row().unreadable == Unreadable::Error)
        .collect();
    assert_eq!(ds.len(), TABLE.len() - 1, "all but monument");
    for d in ds {
        let mut c = Conn::open(rules(d));
        let k = d.key().as_str();
        for text in [
            "{",
            "not json",
            "[1,2]",
            "\"ping\"",
            "42",
            "null",
            "",
            "{\"id\":1,}",
        ] {
            let actions = c.text(text);
            error_frame(c.key, actions, "invalid_json", None);
        }
        let other = Key::ALL
            .into_iter()
            .find(|x| *x != d.key())
            .expect("3 keys");
        for f in [
            json!({"id": 1}),
            json!({k: 5, "id": 1}),
            json!({k: null}),
            json!({k: {"v": "ping"}}),
            json!({other.as_str(): "ping", "id": 1}),
        ] {
            let f = only_frame(c.text(&f.to_string()));
            assert_error(c.key, &f, "missing_type", None);
            let message = f["message"].as_str().unwrap_or_default();
            assert!(message.contains(&format!("\"{k}\"")), "{d}: {message}");
        }
    }
}

#[test]
fn monument_ignores_unreadable_frames() {
    let d = dialect("monument");
    let mut c = Conn::open(monument(true, true));
    for text in [
        "{",
        "[1]",
        "null",
        "{}",
        r#"{"event":5}"#,
        r#"{"type":"ping"}"#,
    ] {
        assert_eq!(c.text(text), [Action::Ignored], "{d} {text}");
    }
}

// ---------------------------------------------------------------------------------------
// §5 events
// ---------------------------------------------------------------------------------------

/// The dialects whose every other routing value is an event (MonoRail's too, once its
/// route has an `onmessage` hook).
fn forwarding() -> Vec<Rules> {
    every_dialect()
        .into_iter()
        .filter_map(|d| match d.row().other {
            Other::Forward => Some(rules(d)),
            Other::ForwardOrUnknownHandler => Some(Rules {
                events: EventRoutes {
                    hooked: true,
                    ..EventRoutes::default()
                },
                ..rules(d)
            }),
            Other::SubjectEvent => None,
        })
        .collect()
}

fn onmessage(r: Rules) -> Rules {
    Rules {
        events: EventRoutes {
            hooked: true,
            typed: vec![("message_type_one".to_owned(), "socket:type_one".to_owned())],
            general: Some("socket:generalMessage".to_owned()),
        },
        ..r
    }
}

#[test]
fn events_without_hooks_go_to_their_own_subject() {
    let routes = forwarding();
    // At least these (a new dialect that forwards joins the loop).
    let names: Vec<_> = routes.iter().map(|r| r.dialect.name()).collect();
    for name in ["native", "hyperexpress", "monorail", "bodhi"] {
        assert!(names.contains(&name), "{name} forwards events: {names:?}");
    }
    for r in routes {
        let d = r.dialect;
        let mut c = Conn::open(r);
        let k = c.key.as_str();
        let reqs = c.requests("chat.hello", json!({"id": "e1", "text": "hi"}));
        let [(request, to, body)] = reqs.as_slice() else {
            panic!("{d}: one request, got {reqs:?}")
        };
        assert_eq!(*to, To::OwnEvent("chat.hello".to_owned()), "{d}");
        let sent = frame(c.key, "chat.hello", json!({"id": "e1", "text": "hi"}));
        assert_eq!(
            Value::Object(event_body(body).clone()),
            sent,
            "{d}: the whole frame"
        );
        assert_eq!(c.s.inflight(), 1);
        let f = only_frame(c.reply(*request, Ok(br#"{"payload":{"ok":true}}"#)));
        assert_eq!(
            f,
            json!({k: "chat.hello", "id": "e1", "payload": {"ok": true}}),
            "{d}"
        );
        assert_eq!(c.s.inflight(), 0);
    }
}

#[test]
fn typed_and_general_subjects_both_hear_an_event() {
    for r in forwarding() {
        let d = r.dialect;
        let mut c = Conn::open(onmessage(r));
        let k = c.key.as_str();
        let reqs = c.requests("message_type_one", json!({"id": "q1", "text": "hi"}));
        let tos: Vec<_> = reqs.iter().map(|(_, to, _)| to.clone()).collect();
        let typed = To::Subject("socket:type_one".to_owned());
        let general = To::Subject("socket:generalMessage".to_owned());
        assert_eq!(tos, [typed, general.clone()], "{d}");
        let ok = br#"{"payload":{"ok":true}}"#;
        let f = only_frame(c.reply(reqs[0].0, Ok(ok)));
        let expected = json!({k: "socket:type_one", "id": "q1", "payload": {"ok": true}});
        assert_eq!(f, expected, "{d}");
        let f = only_frame(c.reply(reqs[1].0, Ok(br#"{"payload":{"seen":true}}"#)));
        let expected = json!({k: "socket:generalMessage", "id": "q1", "payload": {"seen": true}});
        assert_eq!(f, expected, "{d}");

        // Nobody on the general subject beside a typed one: quiet; on the typed one: told.
        let reqs = c.requests("message_type_one", json!({"id": 3}));
        assert_eq!(c.reply(reqs[1].0, Err(Failure::NoResponders)), [], "{d}");
        let actions = c.reply(reqs[0].0, Err(Failure::NoResponders));
        error_frame(c.key, actions, "no_responders", Some(json!(3)));
        // The general subject's other failures are not quiet.
        let reqs = c.requests("message_type_one", json!({"id": 4}));
        let actions = c.reply(reqs[1].0, Err(Failure::Timeout(Duration::from_secs(5))));
        error_frame(c.key, actions, "timeout", Some(json!(4)));

        // Another type: the general subject alone, which then reports that nobody listens.
        let reqs = c.requests("other", json!({"id": 5}));
        assert_eq!(reqs.len(), 1, "{d}");
        assert_eq!(reqs[0].1, general, "{d}");
        let actions = c.reply(reqs[0].0, Err(Failure::NoResponders));
        error_frame(c.key, actions, "no_responders", Some(json!(5)));
    }
}

#[test]
fn monorail_unknown_handlers_are_errors_without_an_onmessage_hook() {
    let d = dialect("monorail");
    let mut c = Conn::open(with_resources(rules(d)));
    let f = c.answer(
        "frobnicate",
        json!({"type": "nodes", "params": {"a": 1}, "id": 4}),
    );
    assert_error(c.key, &f, "unknown_verb", Some(json!(4)));
    assert_eq!(f["message"], r#"unknown handler "frobnicate""#);
    assert_eq!(
        (&f["type"], &f["params"]),
        (&json!("nodes"), &json!({"a": 1}))
    );
    let f = c.answer("frobnicate", json!({}));
    assert_eq!((&f["type"], &f["params"]), (&json!(""), &json!({})));
    assert_eq!(c.s.inflight(), 0);

    // With the hook, the same frame is an event.
    let mut c = Conn::open(onmessage(rules(d)));
    let reqs = c.requests("frobnicate", json!({"type": "nodes"}));
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].1, To::Subject("socket:generalMessage".to_owned()));
}

#[test]
fn events_past_max_inflight_are_too_many_requests() {
    for r in forwarding() {
        let d = r.dialect;
        let mut c = Conn::open(Rules {
            max_inflight: 2,
            ..r
        });
        let first = c.requests("e", json!({"id": 1}));
        c.requests("e", json!({"id": 2}));
        let actions = c.verb("e", json!({"id": 3}));
        error_frame(c.key, actions, "too_many_requests", Some(json!(3)));
        assert_eq!(c.s.inflight(), 2, "{d}");
        // A reply makes room.
        c.reply(first[0].0, Err(Failure::NoResponders));
        assert_eq!(c.requests("e", json!({"id": 4})).len(), 1, "{d}");
    }
}

// ---------------------------------------------------------------------------------------
// §5 replies
// ---------------------------------------------------------------------------------------

#[test]
fn event_replies_become_frames_for_the_client() {
    let cases: &[(&[u8], Value)] = &[
        (
            br#"{"payload":{"ok":true}}"#,
            json!({"payload": {"ok": true}}),
        ),
        (br#"{"payload":null}"#, json!({"payload": null})),
        (br#"{"payload":"x","extra":1}"#, json!({"payload": "x"})),
        (
            br#"{"error":{"reason":"no"}}"#,
            json!({"@": "error", "payload": {"reason": "no"}}),
        ),
        (
            br#"{"error":"no","payload":1}"#,
            json!({"@": "error", "payload": "no"}),
        ),
        // The backend names the answer's type.
        (
            br#"{"type":"custom","payload":1}"#,
            json!({"@": "custom", "payload": 1}),
        ),
        (
            br#"{"type":"custom","x":1}"#,
            json!({"@": "custom", "payload": {"type": "custom", "x": 1}}),
        ),
        (br#"{"type":7,"payload":1}"#, json!({"payload": 1})),
        // Anything else is the payload, as JSON.
        (br#"{"x":1}"#, json!({"payload": {"x": 1}})),
        (b"[1,2]", json!({"payload": [1, 2]})),
        (b" 42 ", json!({"payload": 42})),
        (b"hello", json!({"payload": "hello"})),
        (b"{\"unclosed\":", json!({"payload": "{\"unclosed\":"})),
        (b"\xff\xfeok", json!({"payload": "\u{fffd}\u{fffd}ok"})),
        (b"", json!({"payload": ""})),
    ];
    for r in forwarding() {
        let d = r.dialect;
        let mut c = Conn::open(r);
        let k = c.key.as_str();
        for (body, expected) in cases {
            let reqs = c.requests("chat", json!({"id": "e"}));
            let f = only_frame(c.reply(reqs[0].0, Ok(body)));
            let mut expected = expected.clone();
            let obj = expected.as_object_mut().expect("an object");
            let verb = obj.remove("@").unwrap_or_else(|| json!("chat"));
            obj.insert(k.to_owned(), verb);
            obj.insert("id".to_owned(), json!("e"));
            assert_eq!(f, expected, "{d}: {}", String::from_utf8_lossy(body));
        }
    }
}

#[test]
fn failed_event_requests_are_error_frames_with_the_clients_id() {
    for r in forwarding() {
        let d = r.dialect;
        let mut c = Conn::open(r);
        let failures = [
            (Failure::NoResponders, "no_responders"),
            (Failure::Timeout(Duration::from_secs(5)), "timeout"),
            (
                Failure::Unavailable("bus unavailable".to_owned()),
                "unavailable",
            ),
        ];
        for (failure, code) in failures {
            let reqs = c.requests("chat", json!({"id": 12}));
            let f = only_frame(c.reply(reqs[0].0, Err(failure)));
            assert_error(c.key, &f, code, Some(json!(12)));
            let reqs = c.requests("chat", json!({}));
            let f = only_frame(c.reply(reqs[0].0, Err(Failure::NoResponders)));
            assert_eq!(f.get("id"), None, "{d}");
        }
        let reqs = c.requests("chat", json!({}));
        let actions = c.reply(
            reqs[0].0,
            Err(Failure::Unavailable("bus unavailable".into())),
        );
        assert_eq!(only_frame(actions)["message"], "bus unavailable", "{d}");
    }
}

#[test]
fn a_reply_is_taken_once_and_only_for_its_session() {
    let mut c = Conn::open(rules(dialect("native")));
    let reqs = c.requests("chat", json!({"id": 1}));
    assert_eq!(c.reply(reqs[0].0, Ok(b"1")).len(), 1);
    assert_eq!(c.reply(reqs[0].0, Ok(b"1")), [], "a second reply");
    // A request id of another session that this one never made.
    let mut other = Conn::open(rules(dialect("native")));
    for _ in 0..3 {
        other.requests("chat", json!({}));
    }
    let later = other.requests("chat", json!({}));
    assert_eq!(c.reply(later[0].0, Ok(b"1")), []);
}

// ---------------------------------------------------------------------------------------
// §5 the connect hook
// ---------------------------------------------------------------------------------------

fn with_connect(r: Rules, required: bool) -> Rules {
    Rules {
        onconnect: Some(ConnectHook {
            subject: "hooks.onconnect.publish".to_owned(),
            required,
        }),
        ..r
    }
}

/// Opens a session with a connect hook and returns the hook's request.
fn open_connecting(r: Rules) -> (Conn, RequestId) {
    let mut c = Conn::open(r);
    assert!(c.s.reads_paused(), "reads wait for the connect hook");
    let actions = c.drain();
    let [
        Action::Request {
            request,
            to,
            body: Body::Context,
        },
    ] = actions.as_slice()
    else {
        panic!("expected the connect hook's request, got {actions:?}")
    };
    assert_eq!(*to, To::Subject("hooks.onconnect.publish".to_owned()));
    (c, *request)
}

#[test]
fn the_connect_hooks_answer_is_pushed_and_reads_resume() {
    for d in every_dialect() {
        for required in [false, true] {
            let (mut c, request) = open_connecting(with_connect(rules(d), required));
            let k = d.key().as_str();
            let f = only_frame(c.reply(request, Ok(br#"{"payload":{"motd":"hi"}}"#)));
            assert_eq!(f, json!({k: "onconnect", "payload": {"motd": "hi"}}), "{d}");
            assert!(!c.s.reads_paused() && !c.s.is_closed(), "{d}");
            // Anything else is the payload.
            let (mut c, request) = open_connecting(with_connect(rules(d), required));
            let f = only_frame(c.reply(request, Ok(b"welcome")));
            assert_eq!(f, json!({k: "onconnect", "payload": "welcome"}), "{d}");
        }
    }
}

#[test]
fn a_connect_hooks_error_is_pushed_then_the_connection_refused() {
    for d in every_dialect() {
        let (mut c, request) = open_connecting(with_connect(rules(d), false));
        let k = d.key().as_str();
        let actions = c.reply(request, Ok(br#"{"error":"banned"}"#));
        let expected = [
            Norm::Frame(json!({k: "error", "payload": "banned"})),
            Norm::Act(Action::Close(Close::Refused)),
        ];
        assert_eq!(norm(actions), expected, "{d}");
        assert!(c.s.is_closed() && !c.s.reads_paused());
        assert_eq!(c.text("{}"), []);
    }
}

#[test]
fn a_required_connect_hook_that_does_not_answer_refuses_the_connection() {
    let failures = [
        (Failure::NoResponders, "no_responders"),
        (Failure::Timeout(Duration::from_secs(5)), "timeout"),
        (
            Failure::Unavailable("bus unavailable".to_owned()),
            "unavailable",
        ),
    ];
    for d in every_dialect() {
        for (failure, code) in failures.clone() {
            let (mut c, request) = open_connecting(with_connect(rules(d), true));
            let actions = c.reply(request, Err(failure));
            let [Action::Send(f), Action::Close(Close::Refused)] = actions.as_slice() else {
                panic!("{d}: {actions:?}")
            };
            assert_error(c.key, &parse(f), code, None);
        }
    }
}

#[test]
fn an_optional_connect_hook_that_does_not_answer_lets_the_connection_go_on() {
    for d in every_dialect() {
        let (mut c, request) = open_connecting(with_connect(rules(d), false));
        assert_eq!(c.reply(request, Err(Failure::NoResponders)), [], "{d}");
        assert!(!c.s.reads_paused() && !c.s.is_closed(), "{d}");
    }
}

// ---------------------------------------------------------------------------------------
// §9 monument
// ---------------------------------------------------------------------------------------

fn monument(data: bool, passthrough: bool) -> Rules {
    Rules {
        monument: MonumentModes { data, passthrough },
        ..rules(dialect("monument"))
    }
}

#[test]
fn monument_data_style_events_are_requests_answered_as_set() {
    let mut c = Conn::open(monument(true, false));
    let sent = json!({"event": "data:get:this-item", "args": [1]});
    let actions = c.text(&sent.to_string());
    let [Action::Request { request, to, body }] = actions.as_slice() else {
        panic!("{actions:?}")
    };
    assert_eq!(*to, To::Subject("data:get:this-item".to_owned()));
    assert_eq!(
        *body,
        Body::Socket(sent.as_object().cloned().expect("object"))
    );
    // An object's fields, under the `:set:` event (the reply's own `event` is not kept).
    let f = only_frame(c.reply(*request, Ok(br#"{"name":"x","event":"other","n":[1]}"#)));
    assert_eq!(
        f,
        json!({"event": "data:set:this-item", "name": "x", "n": [1]})
    );

    let cases: &[(&[u8], Value)] = &[
        (
            b"[1]",
            json!({"event": "data:set:this-item", "payload": [1]}),
        ),
        (
            b"plain",
            json!({"event": "data:set:this-item", "payload": "plain"}),
        ),
        (
            br#"{"error":"nope"}"#,
            json!({"event": "error", "payload": "nope"}),
        ),
    ];
    for (body, expected) in cases {
        let reqs = c.requests("data:get:this-item", json!({}));
        let f = only_frame(c.reply(reqs[0].0, Ok(body)));
        assert_eq!(f, *expected);
    }
    for (failure, code) in [
        (Failure::NoResponders, "no_responders"),
        (Failure::Timeout(Duration::from_secs(5)), "timeout"),
    ] {
        let reqs = c.requests("data:get:this-item", json!({}));
        let actions = c.reply(reqs[0].0, Err(failure));
        error_frame(c.key, actions, code, None);
    }
    // Only the first `:get:` becomes `:set:`.
    let reqs = c.requests("a:get:b:get:c", json!({}));
    let f = only_frame(c.reply(reqs[0].0, Ok(b"1")));
    assert_eq!(f["event"], "a:set:b:get:c");
}

#[test]
fn monument_passthrough_publishes_events_on_their_subject() {
    let mut c = Conn::open(monument(false, true));
    for event in ["chat.message", "data:get:this-item"] {
        let sent = json!({"event": event, "text": "hi"});
        let actions = c.text(&sent.to_string());
        let emit = Action::Emit {
            subject: event.to_owned(),
            body: Body::Socket(sent.as_object().cloned().expect("object")),
        };
        assert_eq!(actions, [emit], "{event}");
    }
    c.s.emit_failed();
    error_frame(c.key, c.drain(), "unavailable", None);
}

#[test]
fn monument_modes_decide_what_is_ignored() {
    let mut c = Conn::open(monument(true, false));
    assert_eq!(c.verb("chat.message", json!({})), [Action::Ignored]);
    let mut c = Conn::open(monument(false, false));
    for event in ["chat.message", "data:get:x"] {
        assert_eq!(c.verb(event, json!({})), [Action::Ignored], "{event}");
    }
    let mut c = Conn::open(monument(true, true));
    assert!(matches!(
        c.verb("data:get:x", json!({})).as_slice(),
        [Action::Request { .. }]
    ));
    assert!(matches!(
        c.verb("x", json!({})).as_slice(),
        [Action::Emit { .. }]
    ));
}

#[test]
fn monument_refuses_events_naming_reserved_or_invalid_subjects() {
    let longest = "a".repeat(256);
    let too_long = "a".repeat(257);
    let mut c = Conn::open(monument(true, true));
    for event in [
        "sb.event.x",
        "sb.",
        "_INBOX.abc",
        "_INBOXES",
        "$SYS.x",
        "$JS.API.x",
        "a b",
        "a..b",
        ".a",
        "a.",
        "a.*",
        "a.>",
        "*",
        ">",
        "",
        "a\tb",
        &too_long,
    ] {
        let actions = c.verb(event, json!({"id": 1}));
        error_frame(c.key, actions, "invalid_event", Some(json!(1)));
    }
    for event in ["sbx.a", "inbox", "a$", &longest] {
        assert!(
            matches!(c.verb(event, json!({})).as_slice(), [Action::Emit { .. }]),
            "{event}"
        );
    }
}

#[test]
fn monument_data_requests_past_max_inflight_are_too_many_requests() {
    let mut c = Conn::open(Rules {
        max_inflight: 1,
        ..monument(true, true)
    });
    c.requests("data:get:a", json!({}));
    let actions = c.verb("data:get:b", json!({}));
    error_frame(c.key, actions, "too_many_requests", None);
    // Passthrough is no request: it is not limited.
    assert!(matches!(
        c.verb("x", json!({})).as_slice(),
        [Action::Emit { .. }]
    ));
}

#[test]
fn monument_too_many_requests_echoes_the_frames_id() {
    let mut c = Conn::open(Rules {
        max_inflight: 0,
        ..monument(true, false)
    });
    let actions = c.verb("data:get:a", json!({"id": 7}));
    error_frame(c.key, actions, "too_many_requests", Some(json!(7)));
}

#[test]
fn a_failed_passthrough_is_unavailable() {
    let mut c = Conn::open(monument(false, true));
    c.verb("x", json!({}));
    c.s.emit_failed();
    let f = only_frame(c.drain());
    assert_error(c.key, &f, "unavailable", None);
    assert_eq!(f["event"], "error");
}

// ---------------------------------------------------------------------------------------
// §8 timers
// ---------------------------------------------------------------------------------------

#[test]
fn a_connection_without_frames_for_idle_timeout_is_closed() {
    let idle = Duration::from_secs(10);
    let mut c = Conn::open(Rules {
        idle_timeout: idle,
        ..rules(dialect("native"))
    });
    assert_eq!(c.s.poll_timeout(), Some(c.at(10_000)));
    c.s.handle_timeout(c.at(9_999));
    assert_eq!(c.drain(), []);
    // A text frame, then a ping, move the deadline; a timer armed earlier finds nothing due.
    c.s.on_text(r#"{"type":"ping"}"#, c.at(5_000));
    c.drain();
    assert_eq!(c.s.poll_timeout(), Some(c.at(15_000)));
    c.s.handle_timeout(c.at(10_000));
    assert_eq!(c.drain(), []);
    c.s.on_ping(c.at(12_000));
    assert_eq!(c.drain(), [Action::FlushPong]);
    c.s.handle_timeout(c.at(21_999));
    assert_eq!(c.drain(), []);
    c.s.handle_timeout(c.at(22_000));
    assert_eq!(c.drain(), [Action::Close(Close::Idle(idle))]);
    assert!(c.s.is_closed());
    // Nothing after the close.
    c.s.on_text(r#"{"type":"ping"}"#, c.at(22_001));
    c.s.on_ping(c.at(22_001));
    c.s.handle_timeout(c.at(60_000));
    assert_eq!(c.drain(), []);
}

#[test]
fn without_timeouts_there_is_no_deadline() {
    for d in every_dialect() {
        let mut c = Conn::open(rules(d));
        assert_eq!(c.s.poll_timeout(), None, "{d}");
        c.s.handle_timeout(c.at(86_400_000));
        assert_eq!(c.drain(), [], "{d}");
    }
}

fn with_heartbeat(r: Rules) -> Rules {
    Rules {
        heartbeat_interval: Duration::from_secs(25),
        heartbeat_timeout: Duration::from_secs(10),
        ..r
    }
}

#[test]
fn a_heartbeat_ping_unanswered_closes_the_connection() {
    for d in every_dialect() {
        let mut c = Conn::open(with_heartbeat(rules(d)));
        assert_eq!(c.s.poll_timeout(), Some(c.at(25_000)));
        c.s.handle_timeout(c.at(24_999));
        assert_eq!(c.drain(), []);
        c.s.handle_timeout(c.at(25_000));
        assert_eq!(c.drain(), [Action::Ping], "{d}");
        assert_eq!(c.s.poll_timeout(), Some(c.at(35_000)));
        // A text frame is not what the heartbeat waits for: the shell reports receptions.
        c.s.handle_timeout(c.at(34_999));
        assert_eq!(c.drain(), []);
        c.s.handle_timeout(c.at(35_000));
        let close = Close::HeartbeatTimeout(Duration::from_secs(10));
        assert_eq!(c.drain(), [Action::Close(close)], "{d}");
    }
}

#[test]
fn anything_received_answers_the_heartbeat() {
    let mut c = Conn::open(with_heartbeat(rules(dialect("native"))));
    c.s.handle_timeout(c.at(25_000));
    assert_eq!(c.drain(), [Action::Ping]);
    c.s.on_received();
    assert_eq!(c.s.poll_timeout(), Some(c.at(50_000)));
    c.s.handle_timeout(c.at(35_000));
    assert_eq!(c.drain(), []);
    c.s.handle_timeout(c.at(50_000));
    assert_eq!(c.drain(), [Action::Ping]);
    c.s.handle_timeout(c.at(60_000));
    assert!(matches!(
        c.drain().as_slice(),
        [Action::Close(Close::HeartbeatTimeout(_))]
    ));
}

#[test]
fn no_heartbeat_ping_while_the_connect_hook_is_pending() {
    let (mut c, request) = open_connecting(with_connect(
        with_heartbeat(rules(dialect("native"))),
        false,
    ));
    c.s.handle_timeout(c.at(25_000));
    assert_eq!(c.drain(), [], "nothing is read, so no pong could be seen");
    assert_eq!(c.s.poll_timeout(), Some(c.at(50_000)), "no pong deadline");
    c.s.handle_timeout(c.at(45_000));
    assert_eq!(c.drain(), []);
    c.reply(request, Err(Failure::Timeout(Duration::from_secs(5))));
    c.s.handle_timeout(c.at(50_000));
    assert_eq!(c.drain(), [Action::Ping]);
}

#[test]
fn the_token_notice_comes_once_then_the_close_at_expiry() {
    for d in having(Verb::Refresh) {
        let mut c = Conn::open_with_exp(with_token(rules(d)), Some(EXP));
        let k = d.key().as_str();
        assert_eq!(
            c.s.poll_timeout(),
            Some(c.at(70_000)),
            "{d}: exp - refresh_lead"
        );
        c.s.handle_timeout(c.at(69_999));
        assert_eq!(c.drain(), []);
        c.s.handle_timeout(c.at(70_000));
        let f = only_frame(c.drain());
        assert_eq!(f, json!({k: "refresh_required", "exp": EXP}), "{d}");
        assert_eq!(c.s.poll_timeout(), Some(c.at(105_000)), "{d}: exp + leeway");
        c.s.handle_timeout(c.at(71_000));
        c.s.handle_timeout(c.at(104_999));
        assert_eq!(c.drain(), [], "{d}: one notice");
        c.s.handle_timeout(c.at(105_000));
        assert_eq!(c.drain(), [Action::Close(Close::TokenExpired)], "{d}");
        c.s.handle_timeout(c.at(200_000));
        assert_eq!(c.drain(), []);
    }
}

#[test]
fn dialects_without_refresh_are_closed_at_expiry_without_notice() {
    let ds: Vec<_> = every_dialect()
        .into_iter()
        .filter(|d| !d.refreshes())
        .collect();
    let names: Vec<_> = ds.iter().map(|d| d.name()).collect();
    for name in ["monument", "monorail", "bodhi"] {
        assert!(names.contains(&name), "{name} has no refresh: {names:?}");
    }
    for d in ds {
        let mut c = Conn::open_with_exp(with_token(rules(d)), Some(EXP));
        assert_eq!(c.s.poll_timeout(), Some(c.at(105_000)), "{d}");
        c.s.handle_timeout(c.at(70_000));
        assert_eq!(c.drain(), [], "{d}");
        c.s.handle_timeout(c.at(105_000));
        assert_eq!(c.drain(), [Action::Close(Close::TokenExpired)], "{d}");
    }
}

#[test]
fn token_deadlines_need_a_policy_and_an_exp() {
    let native = dialect("native");
    let c = Conn::open_with_exp(with_token(rules(native)), None);
    assert_eq!(c.s.poll_timeout(), None, "a token without exp");
    let c = Conn::open_with_exp(rules(native), Some(EXP));
    assert_eq!(c.s.poll_timeout(), None, "a route that takes no token");
    // No refresh lead: no notice, the close at expiry.
    let mut r = with_token(rules(native));
    r.token = Some(TokenPolicy {
        refresh_lead: Duration::ZERO,
        ..r.token.unwrap_or_default()
    });
    let mut c = Conn::open_with_exp(r, Some(EXP));
    assert_eq!(c.s.poll_timeout(), Some(c.at(105_000)));
    c.s.handle_timeout(c.at(104_000));
    assert_eq!(c.drain(), []);
    // A token that expired already: the notice now, the close after the leeway.
    let mut c = Conn::open_with_exp(with_token(rules(native)), Some(NOW_S - 10));
    assert_eq!(c.s.poll_timeout(), Some(c.t0));
    c.s.handle_timeout(c.t0);
    assert_eq!(frames(&c.drain())[0]["type"], "refresh_required");
    c.s.handle_timeout(c.at(5_000));
    assert_eq!(c.drain(), [Action::Close(Close::TokenExpired)]);
    // A far exp does not overflow.
    let c = Conn::open_with_exp(with_token(rules(native)), Some(i64::MAX));
    assert!(c.s.poll_timeout().is_some_and(|t| t > c.at(86_400_000)));
}

// ---------------------------------------------------------------------------------------
// §3 the rate limit
// ---------------------------------------------------------------------------------------

fn with_rate(r: Rules, per_second: u32, burst: u32, close_after: u32) -> Rules {
    Rules {
        rate: RateLimit {
            per_second,
            burst,
            close_after,
        },
        ..r
    }
}

#[test]
fn frames_over_the_rate_limit_are_refused_then_the_connection_closed() {
    for d in every_dialect() {
        let mut c = Conn::open(with_rate(with_heartbeat(rules(d)), 1, 2, 3));
        let ping = frame(c.key, "ping", json!({"id": 1})).to_string();
        for _ in 0..2 {
            let actions = c.text(&ping);
            assert!(
                frames(&actions).iter().all(|f| f["code"] != "rate_limited"),
                "{d}"
            );
        }
        for _ in 0..2 {
            // Not acted on; no id: the frame was not read.
            error_frame(c.key, c.text(&ping), "rate_limited", None);
        }
        assert_eq!(c.text(&ping), [Action::Close(Close::RateLimited)], "{d}");
        assert_eq!(c.text(&ping), []);
        c.s.on_ping(c.at(10_000));
        c.s.handle_timeout(c.at(100_000));
        assert_eq!(c.drain(), [], "{d}: nothing after the close");
    }
}

#[test]
fn an_accepted_frame_resets_the_refusals_in_a_row() {
    let mut c = Conn::open(with_rate(rules(dialect("native")), 1, 1, 2));
    let ping = r#"{"type":"ping"}"#;
    assert_eq!(frames(&c.text(ping))[0]["type"], "pong");
    error_frame(c.key, c.text(ping), "rate_limited", None);
    // A second later the bucket holds one token again.
    c.s.on_text(ping, c.at(1_000));
    assert_eq!(frames(&c.drain())[0]["type"], "pong");
    c.s.on_text(ping, c.at(1_000));
    error_frame(c.key, c.drain(), "rate_limited", None);
    c.s.on_text(ping, c.at(1_000));
    assert_eq!(c.drain(), [Action::Close(Close::RateLimited)]);
}

#[test]
fn pings_take_from_the_rate_limit() {
    let mut c = Conn::open(with_rate(rules(dialect("native")), 1, 2, 2));
    c.s.on_ping(c.t0);
    c.s.on_ping(c.t0);
    assert_eq!(c.drain(), [Action::FlushPong, Action::FlushPong]);
    // Refused: the pong waits, and no error frame answers a flood with a flood.
    c.s.on_ping(c.t0);
    assert_eq!(c.drain(), []);
    c.s.on_ping(c.at(1_000));
    assert_eq!(c.drain(), [Action::FlushPong]);
    c.s.on_ping(c.at(1_000));
    assert_eq!(c.drain(), []);
    assert!(!c.s.is_closed());
    c.s.on_text(r#"{"type":"ping"}"#, c.at(1_000));
    assert_eq!(
        c.drain(),
        [Action::Close(Close::RateLimited)],
        "pings and frames in a row"
    );
}

// ---------------------------------------------------------------------------------------
// Nothing after the close
// ---------------------------------------------------------------------------------------

#[test]
fn the_outcomes_of_actions_after_the_close_send_nothing() {
    let mut c = Conn::open(with_rate(
        Rules {
            client_publish: true,
            ..with_token(rules(dialect("native")))
        },
        1,
        4,
        1,
    ));
    c.verb("subscribe", json!({"topic": "a", "id": 1}));
    c.verb("publish", json!({"topic": "a", "id": 2}));
    c.verb("refresh", json!({"token": "t", "id": 3}));
    c.verb("chat", json!({"id": 4}));
    assert_eq!(c.text("{}"), [Action::Close(Close::RateLimited)]);
    // The shell's actions were under way when the session closed; their outcomes come in.
    c.s.subscribed("a".to_owned(), Some(&json!(1)), outcome(true), origin());
    c.s.published("a", Some(&json!(2)), taken(false));
    c.s.token_checked(Some(&json!(3)), Err("nope"), c.at(1), NOW_MS);
    c.s.emit_failed();
    assert_eq!(c.drain(), []);
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

/// The codes of docs/PROTOCOL.md §7, read from its table.
fn documented_codes() -> BTreeSet<String> {
    protocol_section("## 7. Error codes")
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_documented_error_codes_are_read_from_the_protocol() {
    let codes = documented_codes();
    assert_eq!(codes.len(), 15, "{codes:?}");
    assert!(codes.contains("invalid_json") && codes.contains("invalid_event"));
}

/// A section of docs/PROTOCOL.md: from its heading to the next one of its level.
fn protocol_section(heading: &str) -> &'static str {
    let doc = include_str!("../../docs/PROTOCOL.md");
    let start = doc
        .find(heading)
        .unwrap_or_else(|| panic!("{heading} in docs/PROTOCOL.md"));
    let rest = &doc[start + heading.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    &rest[..end]
}

/// §4's table lists the verbs in the order of [`Verb::ALL`], and nothing else.
#[test]
fn the_protocol_documents_every_verb() {
    let documented: Vec<_> = protocol_section("## 4. Built-in verbs")
        .lines()
        .filter_map(|l| l.strip_prefix(r#"| `{"type":""#))
        .filter_map(|l| l.split('"').next())
        .collect();
    let verbs: Vec<_> = Verb::ALL.iter().map(|v| v.as_str()).collect();
    assert_eq!(documented, verbs);
}

/// §9's table says of each dialect what its row of the table does.
#[test]
fn the_protocol_documents_the_dialect_table() {
    let mut named = BTreeSet::new();
    for line in protocol_section("## 9. Dialects").lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(name) = cells.get(1).and_then(|c| c.strip_prefix('`')) else {
            continue;
        };
        let d = dialect(name.trim_end_matches('`'));
        named.insert(d.name());
        let [routing, verbs, field, stop, unreadable] = [2, 3, 4, 5, 6].map(|i| cells[i]);
        assert_eq!(routing, format!("`{}`", d.key().as_str()), "{d}");
        let listed: Vec<_> = verbs
            .split(", ")
            .map(|v| v.trim_matches('`'))
            .filter_map(Verb::parse)
            .collect();
        match verbs {
            "all (§4)" => assert!(Verb::ALL.iter().all(|v| d.has(*v)), "{d}"),
            "none" => assert!(Verb::ALL.iter().all(|v| !d.has(*v)), "{d}"),
            _ => assert_eq!(listed, d.row().verbs, "{d}"),
        }
        if d.has_resources() {
            assert_eq!(field, format!("`{}`", d.row().resource_field), "{d}");
        } else {
            assert_eq!(field, "–", "{d}");
        }
        match (d.has(Verb::Stop), d.row().answers_stop) {
            (true, true) => assert_eq!(stop, "`stopped`", "{d}"),
            (true, false) => assert_eq!(stop, "none", "{d}"),
            (false, _) => assert!(stop.starts_with('–'), "{d}"),
        }
        let ignores = unreadable.starts_with("ignored");
        assert_eq!(ignores, d.row().unreadable == Unreadable::Ignore, "{d}");
    }
    assert_eq!(named, Dialect::names().collect(), "every dialect, once");
}

/// Routing values: the verbs, events (monument's data-style ones too), reserved subjects
/// and odd ones.
const VERBS: &[&str] = &[
    "init",
    "ping",
    "refresh",
    "subscribe",
    "unsubscribe",
    "publish",
    "watch",
    "stop",
    "query",
    "all",
    "get",
];
const EVENTS: &[&str] = &[
    "chat.hello",
    "message_type_one",
    "data:get:item",
    "data:get:other",
    "data:set:item",
];
const ODD: &[&str] = &[
    "sb.event.x",
    "_INBOX.x",
    "$SYS.x",
    "a b",
    "",
    "error",
    "session",
];

fn routing() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => prop::sample::select(VERBS).prop_map(Value::from),
        2 => prop::sample::select(EVENTS).prop_map(Value::from),
        1 => prop::sample::select(ODD).prop_map(Value::from),
        1 => json_leaf(),
    ]
}

const TOPICS: &[&str] = &[
    "a", "a/b", "a/+", "#", "a/#", "+/+", "a/#/b", "a+", "", "a\u{0}",
];

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A string from `pool` mostly, else anything JSON.
fn field(pool: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => prop::sample::select(pool).prop_map(Value::from),
        1 => json_leaf(),
    ]
}

/// Stands for the route's routing field in a generated frame.
const ROUTE_KEY: &str = "@route";

/// A JSON object a client might send: a routing field (mostly the route's, perhaps another
/// dialect's, perhaps not a string), an id of any kind, and the fields the verbs read, each
/// perhaps absent.
fn client_object() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        any::<i64>().prop_map(Value::from),
        "[a-z0-9]{0,6}".prop_map(Value::from),
        json_value(),
    ];
    let params = prop_oneof![
        Just(json!({})),
        Just(json!({"rack": "r1"})),
        Just(json!({"id": "n1"})),
        json_value(),
    ];
    let key = prop_oneof![
        3 => Just(ROUTE_KEY),
        1 => prop::sample::select(&Key::ALL[..]).prop_map(Key::as_str),
    ];
    (
        key,
        prop::option::weighted(0.9, routing()),
        prop::option::of(id),
        prop::option::of(field(TOPICS)),
        prop::option::of(field(&["nodes", "alerts", "nope"])),
        prop::option::of(params),
        prop::option::of(json_value()),
        prop::option::of(field(&["s-1", "", "tok.en"])),
        prop::option::of(json_leaf()),
    )
        .prop_map(
            |(key, routing, id, topic, resource, params, payload, name, echo)| {
                let mut m = Map::new();
                let fields = [
                    ("id", id),
                    ("topic", topic),
                    ("resource", resource.clone()),
                    ("type", resource),
                    ("params", params),
                    ("payload", payload),
                    ("session", name.clone()),
                    ("token", name),
                    ("echo", echo),
                    (key, routing),
                ];
                for (name, v) in fields {
                    if let Some(v) = v {
                        m.insert(name.to_owned(), v);
                    }
                }
                Value::Object(m)
            },
        )
}

/// A text frame: mostly a JSON object, sometimes anything.
fn client_text() -> impl Strategy<Value = Text> {
    prop_oneof![
        6 => client_object().prop_map(Text::Object),
        1 => any::<String>().prop_map(Text::Raw),
        1 => "[\\[\\]{}\",:a-z0-9 ]{0,24}".prop_map(Text::Raw),
    ]
}

#[derive(Debug, Clone)]
enum Text {
    /// Sent with [`ROUTE_KEY`] replaced by the route's routing field.
    Object(Value),
    Raw(String),
}

impl Text {
    fn to_text(&self, key: Key) -> String {
        match self {
            Self::Raw(t) => t.clone(),
            Self::Object(v) => {
                let mut m = v.as_object().cloned().unwrap_or_default();
                if let Some(routing) = m.remove(ROUTE_KEY) {
                    m.insert(key.as_str().to_owned(), routing);
                }
                Value::Object(m).to_string()
            }
        }
    }
}

/// A route of any dialect, with any of the options the session reads.
fn any_rules() -> impl Strategy<Value = Rules> {
    let events =
        (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(hooked, t, g)| EventRoutes {
            hooked: hooked || t || g,
            typed: if t {
                vec![("message_type_one".to_owned(), "socket:type_one".to_owned())]
            } else {
                vec![]
            },
            general: g.then(|| "socket:general".to_owned()),
        });
    let rate = prop_oneof![
        Just(RateLimit::default()),
        (1..4u32, 1..6u32, 1..4u32).prop_map(|(per_second, burst, close_after)| RateLimit {
            per_second,
            burst,
            close_after,
        }),
    ];
    let token = prop::option::of((0..3u64, 0..60u64).prop_map(|(leeway, lead)| TokenPolicy {
        leeway: Duration::from_secs(leeway),
        refresh_lead: Duration::from_secs(lead),
    }));
    (
        (
            0..TABLE.len(),
            prop::option::weighted(0.2, prop::sample::select(&Key::ALL[..])),
        ),
        any::<bool>(),
        events,
        rate,
        token,
        (any::<bool>(), any::<bool>()),
        (0..4usize, 0..4usize),
        prop::option::of(any::<bool>()),
        (0..3u64, prop::sample::select(&[0u64, 5][..])),
    )
        .prop_map(
            |(
                (row, key),
                client_publish,
                events,
                rate,
                token,
                (data, passthrough),
                (max_topics, max_inflight),
                connect,
                (idle, beat),
            )| {
                let d = dialect(TABLE[row].name);
                with_resources(Rules {
                    dialect: d,
                    key: key.unwrap_or(d.key()),
                    idle_timeout: Duration::from_secs(idle * 10),
                    heartbeat_interval: Duration::from_secs(beat),
                    heartbeat_timeout: Duration::from_secs(2),
                    rate,
                    max_topics,
                    max_inflight,
                    client_publish,
                    events,
                    history: Vec::new(),
                    resume: None,
                    onconnect: connect.map(|required| ConnectHook {
                        subject: "hooks.onconnect".to_owned(),
                        required,
                    }),
                    monument: MonumentModes { data, passthrough },
                    resources: Default::default(),
                    token,
                })
            },
        )
}

/// What happens to a connection next.
#[derive(Debug, Clone)]
enum Step {
    Text(Text),
    Ping,
    Received,
    /// Time passes (ms) and the timer fires.
    Wait(u64),
    /// One of the actions under way gets its outcome: which (modulo their number) and how.
    Outcome(usize, u8),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        8 => client_text().prop_map(Step::Text),
        1 => Just(Step::Ping),
        1 => Just(Step::Received),
        2 => (0..40_000u64).prop_map(Step::Wait),
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, how)| Step::Outcome(i, how)),
    ];
    prop::collection::vec(step, 1..40)
}

/// An action of the session the shell has not reported on yet.
#[derive(Debug)]
enum UnderWay {
    /// A backend request, and the `id` its answer must carry (none for the connect hook and
    /// monument's data requests, whose answers have none).
    Request(RequestId, Option<Value>),
    Subscribe(String, Option<Value>),
    Publish(String, Option<Value>),
    Token(Option<Value>),
    Emit,
}

const REPLIES: &[&[u8]] = &[
    br#"{"payload":{"ok":true}}"#,
    br#"{"error":"no"}"#,
    br#"{"type":"custom","x":1}"#,
    b"[1]",
    b"plain",
    b"\xff",
    b"",
];

/// The `id` of a client frame as the session reads it: a string or a number under `id` of a
/// JSON object with a string routing field.
fn client_id(text: &str, key: Key) -> Result<Option<Value>, ()> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) if m.get(key.as_str()).is_some_and(Value::is_string) => Ok(m
            .get("id")
            .filter(|v| v.is_string() || v.is_number())
            .cloned()),
        _ => Err(()),
    }
}

/// Checks one frame the session sent: JSON, routed by the route's key, an error with a
/// documented code (or a backend's payload), and the `id` it must carry.
fn check_frame(
    text: &str,
    key: Key,
    codes: &BTreeSet<String>,
    id: Option<&Option<Value>>,
) -> Result<(), TestCaseError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {text}")))?;
    let routing = v.get(key.as_str()).and_then(Value::as_str);
    prop_assert!(routing.is_some(), "no string {:?}: {}", key.as_str(), text);
    if routing == Some("error") {
        match v.get("code") {
            Some(code) => {
                let code = code.as_str().unwrap_or_default();
                prop_assert!(codes.contains(code), "undocumented code: {}", text);
                prop_assert!(v["message"].is_string(), "{}", text);
            }
            None => prop_assert!(
                v.get("payload").is_some(),
                "neither code nor payload: {}",
                text
            ),
        }
    }
    // The session's own answer names the session; a refused frame was not read.
    let exempt = routing == Some("session") || v["code"] == "rate_limited";
    if let (Some(id), false) = (id, exempt) {
        prop_assert_eq!(v.get("id"), id.as_ref(), "{}", text);
    }
    Ok(())
}

/// A session driven as the shell drives it, and what the checks need to know.
struct Driver {
    s: Session,
    key: Key,
    codes: BTreeSet<String>,
    under_way: Vec<UnderWay>,
    closed: bool,
    /// The `id` the answers to the requests made next must carry.
    request_id: Option<Value>,
}

impl Driver {
    /// Carries out the session's actions, checking each: every frame (with `direct`, the
    /// `id` it must carry), nothing after the close. Returns how many there were.
    fn drain(&mut self, direct: Option<&Option<Value>>) -> Result<usize, TestCaseError> {
        let mut n = 0;
        while let Some(action) = self.s.poll_action() {
            n += 1;
            prop_assert!(!self.closed, "{:?} after the close", action);
            let under_way = match action {
                Action::Send(text) => {
                    check_frame(&text, self.key, &self.codes, direct)?;
                    continue;
                }
                Action::Close(_) => {
                    self.closed = true;
                    prop_assert!(self.s.is_closed());
                    continue;
                }
                Action::Request { request, .. } => {
                    UnderWay::Request(request, self.request_id.clone())
                }
                Action::Subscribe { filter, id, .. } => UnderWay::Subscribe(filter, id),
                Action::Publish { topic, id, .. } => UnderWay::Publish(topic, id),
                Action::CheckToken { id, .. } => UnderWay::Token(id),
                Action::Emit { .. } => UnderWay::Emit,
                Action::Ping
                | Action::FlushPong
                | Action::Unsubscribe { .. }
                | Action::Resource(_)
                | Action::History(_)
                | Action::StopWatch(_)
                | Action::Ignored => continue,
            };
            self.under_way.push(under_way);
        }
        prop_assert_eq!(self.s.is_closed(), self.closed);
        Ok(n)
    }
}

/// Drives a session through `steps` as a shell would, checking every action.
fn run(rules: Rules, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let key = rules.key;
    let monument = rules.dialect.row().other == Other::SubjectEvent;
    let t0 = origin();
    let mut now = t0;
    let s = Session::new(
        Arc::new(rules),
        CONN.to_owned(),
        t0,
        NOW_MS,
        Some(NOW_S + 60),
    );
    let mut d = Driver {
        s,
        key,
        codes: documented_codes(),
        under_way: vec![],
        closed: false,
        request_id: None,
    };
    // The connect hook's request, if any.
    d.drain(None)?;
    for step in steps {
        // The `id` every frame of this step must carry, when the step answers a client frame.
        let mut direct: Option<Option<Value>> = None;
        match step {
            Step::Text(text) => {
                let text = text.to_text(key);
                // The shell reads nothing while the connect hook is pending.
                if !d.s.reads_paused() {
                    if let Ok(id) = client_id(&text, key) {
                        direct = Some(id.clone());
                        // monument's answers carry no id.
                        d.request_id = if monument { None } else { id };
                    }
                    d.s.on_text(&text, now);
                }
            }
            Step::Ping => d.s.on_ping(now),
            Step::Received => d.s.on_received(),
            Step::Wait(ms) => {
                now += Duration::from_millis(ms);
                let due = d.s.poll_timeout().is_some_and(|t| t <= now);
                d.s.handle_timeout(now);
                let n = d.drain(None)?;
                // A timer that fires early finds nothing due; one that fired leaves no
                // deadline behind it (the shell would spin).
                prop_assert!(due || n == 0, "{} actions before any deadline", n);
                let next = d.s.poll_timeout();
                prop_assert!(d.closed || next.is_none_or(|t| t > now), "still due");
            }
            Step::Outcome(i, how) => {
                if d.under_way.is_empty() {
                    continue;
                }
                let action = d.under_way.remove(i % d.under_way.len());
                // The outcomes the shell reports after the close are checked on their own
                // (`the_outcomes_of_actions_after_the_close_send_nothing`).
                match action {
                    UnderWay::Request(request, id) => {
                        direct = Some(id);
                        let result = match how % 4 {
                            0 => Err(Failure::NoResponders),
                            1 => Err(Failure::Timeout(Duration::from_secs(5))),
                            2 => Err(Failure::Unavailable("bus unavailable".to_owned())),
                            _ => Ok(REPLIES[usize::from(how / 4) % REPLIES.len()]),
                        };
                        d.s.on_reply(request, result);
                    }
                    _ if d.closed => {}
                    UnderWay::Subscribe(filter, id) => {
                        direct = Some(id.clone());
                        d.s.subscribed(filter, id.as_ref(), outcome(how % 2 == 0), origin());
                    }
                    UnderWay::Publish(topic, id) => {
                        direct = Some(id.clone());
                        d.s.published(&topic, id.as_ref(), taken(how % 2 == 0));
                    }
                    UnderWay::Token(id) => {
                        direct = Some(id.clone());
                        let checked = match how % 3 {
                            0 => Ok(Some(NOW_S + i64::from(how))),
                            1 => Ok(None),
                            _ => Err("token is for another user"),
                        };
                        let ms = i64::try_from((now - t0).as_millis()).unwrap_or(i64::MAX);
                        d.s.token_checked(id.as_ref(), checked, now, NOW_MS + ms);
                    }
                    UnderWay::Emit => d.s.emit_failed(),
                }
            }
        }
        d.drain(direct.as_ref())?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever a client sends, in any dialect and any route, and whatever the shell reports:
    /// no panic; every frame is JSON routed by the route's key; every error code is
    /// documented; a client's `id` comes back on the answers to its frame; nothing follows
    /// the close.
    #[test]
    fn any_frames_in_any_dialect_keep_the_protocol(rules in any_rules(), steps in steps()) {
        run(rules, steps)?;
    }
}

/// The filters of the model test, and whether each is a valid filter.
const FILTERS: &[(&str, bool)] = &[
    ("a", true),
    ("a/b", true),
    ("a/+", true),
    ("#", true),
    ("a/#", true),
    ("+/+", true),
    ("a/#/b", false),
    ("a+", false),
    ("", false),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Subscribes and unsubscribes in any order, each subscription reported (ok or failed) by
    /// the shell before the next frame, as the shell does: the session's topics are those of
    /// a set, and it asks the shell to subscribe or unsubscribe exactly when the set changes.
    #[test]
    fn topics_follow_a_set(
        row in prop::sample::select(having(Verb::Subscribe)),
        max_topics in 0..4usize,
        ops in prop::collection::vec((any::<bool>(), 0..FILTERS.len(), any::<bool>()), 0..40),
    ) {
        let mut c = Conn::open(Rules { max_topics, ..rules(row) });
        let k = c.key.as_str();
        let mut model = BTreeSet::new();
        for (n, (subscribe, f, ok)) in ops.into_iter().enumerate() {
            let (filter, valid) = FILTERS[f];
            let id = json!(n);
            if subscribe {
                let actions = c.verb("subscribe", json!({"topic": filter, "id": id}));
                if !valid || model.contains(filter) || model.len() >= max_topics {
                    let f = only_frame(actions);
                    let expected = if !valid {
                        "invalid_topic"
                    } else if model.contains(filter) {
                        "subscribed"
                    } else {
                        "forbidden"
                    };
                    let got = f.get("code").unwrap_or(&f[k]);
                    prop_assert_eq!(got, &json!(expected), "{}", f);
                } else {
                    let ask = Action::Subscribe { filter: filter.to_owned(), id: Some(id.clone()), since: None };
                    prop_assert_eq!(actions, vec![ask]);
                    c.s.subscribed(filter.to_owned(), Some(&id), outcome(ok), origin());
                    let f = only_frame(c.drain());
                    if ok {
                        model.insert(filter.to_owned());
                        prop_assert_eq!(&f[k], "subscribed");
                    } else {
                        prop_assert_eq!(&f["code"], "unavailable");
                    }
                }
            } else {
                let actions = c.verb("unsubscribe", json!({"topic": filter, "id": id}));
                let mut expected = vec![];
                if model.remove(filter) {
                    expected.push(Norm::Act(Action::Unsubscribe { filter: filter.to_owned() }));
                }
                expected.push(Norm::Frame(json!({k: "unsubscribed", "id": id, "topic": filter})));
                prop_assert_eq!(norm(actions), expected);
            }
            prop_assert_eq!(c.topics(), model.clone());
        }
    }
}

/// The params of the watch model test.
const PARAMS: &[&str] = &[
    r#"{}"#,
    r#"{"rack":"r1"}"#,
    r#"{"rack":"r2"}"#,
    r#"{"rack":"r1","row":1}"#,
];

/// What a client or the shell does to a connection's watches.
#[derive(Debug, Clone)]
enum WatchOp {
    Watch(bool, usize),
    Stop(bool, usize),
    /// The shell's watch with these params ended on its own.
    Ended(bool, usize),
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Watches and stops in any order, on two resources: the session's watches are those of
    /// a map from (resource, params) to the watch's key; a watch of a pair already watched
    /// stops the old one first; `stop` ends the pair's watch, or with empty params every
    /// watch of the resource; each is answered as the dialect answers.
    #[test]
    fn watches_follow_a_map(
        d in prop::sample::select(having(Verb::Watch)),
        ops in prop::collection::vec(
            prop_oneof![
                3 => (any::<bool>(), 0..PARAMS.len()).prop_map(|(r, p)| WatchOp::Watch(r, p)),
                2 => (any::<bool>(), 0..PARAMS.len()).prop_map(|(r, p)| WatchOp::Stop(r, p)),
                1 => (any::<bool>(), 0..PARAMS.len()).prop_map(|(r, p)| WatchOp::Ended(r, p)),
            ],
            0..40,
        ),
    ) {
        let mut c = Conn::open(with_resources(rules(d)));
        let (k, field) = (d.key().as_str(), d.row().resource_field);
        let mut model: std::collections::BTreeMap<(&str, &str), String> = Default::default();
        for op in ops {
            let (WatchOp::Watch(r, p) | WatchOp::Stop(r, p) | WatchOp::Ended(r, p)) = op;
            let name = if r { "nodes" } else { "alerts" };
            let params: Value = serde_json::from_str(PARAMS[p]).expect("JSON");
            let fields = |params: Value| {
                let mut f = Map::new();
                f.insert(field.to_owned(), json!(name));
                f.insert("params".to_owned(), params);
                Value::Object(f)
            };
            match op {
                WatchOp::Watch(..) => {
                    let mut actions = c.verb("watch", fields(params));
                    let call = match actions.pop() {
                        Some(Action::Resource(call)) => call,
                        other => return Err(TestCaseError::fail(format!("{other:?}"))),
                    };
                    let key = call.watch_key.expect("a watch has a key");
                    let stops: Vec<_> = model.get(&(name, PARAMS[p])).cloned().into_iter().collect();
                    prop_assert_eq!(actions, stops.into_iter().map(Action::StopWatch).collect::<Vec<_>>());
                    if let Some(old) = model.insert((name, PARAMS[p]), key.clone()) {
                        prop_assert_eq!(old, key, "the same pair, the same key");
                    }
                    let keys: BTreeSet<_> = model.values().collect();
                    prop_assert_eq!(keys.len(), model.len(), "a key per pair");
                }
                WatchOp::Stop(..) => {
                    let mut actions = norm(c.verb("stop", fields(params.clone())));
                    if d.row().answers_stop {
                        let mut answer = fields(params);
                        answer[k] = json!("stopped");
                        prop_assert_eq!(actions.pop(), Some(Norm::Frame(answer)));
                    }
                    let stopped: BTreeSet<String> = actions.into_iter().collect_keys();
                    let expected: BTreeSet<String> = model
                        .iter()
                        .filter(|((n, ps), _)| *n == name && (p == 0 || *ps == PARAMS[p]))
                        .map(|(_, key)| key.clone())
                        .collect();
                    model.retain(|_, key| !expected.contains(key));
                    prop_assert_eq!(stopped, expected);
                }
                WatchOp::Ended(..) => {
                    if let Some(key) = model.remove(&(name, PARAMS[p])) {
                        c.s.watch_ended(&key);
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Frames and pings at any pace: in any stretch of time, no more are acted on than the
    /// burst plus the rate over that stretch; each refused frame is answered `rate_limited` (a ping: nothing),
    /// and the `close_after`th refusal in a row closes instead.
    #[test]
    fn the_rate_limit_holds_at_any_pace(
        per_second in 1..10u32,
        burst in 1..10u32,
        close_after in 1..5u32,
        frames in prop::collection::vec((0..400u64, any::<bool>()), 1..80),
    ) {
        let mut c = Conn::open(with_rate(rules(dialect("native")), per_second, burst, close_after));
        let (mut ms, mut refused_in_a_row) = (0u64, 0u32);
        // When each frame acted on was received.
        let mut accepted: Vec<u64> = vec![];
        for (gap, ping) in frames {
            ms += gap;
            if ping {
                c.s.on_ping(c.at(ms));
            } else {
                c.s.on_text(r#"{"type":"ping"}"#, c.at(ms));
            }
            let actions = c.drain();
            let refused = match actions.as_slice() {
                [Action::FlushPong] if ping => false,
                [Action::Send(f)] if !ping && parse(f)["type"] == "pong" => false,
                [] if ping => true,
                [Action::Send(f)] if !ping => {
                    prop_assert_eq!(&parse(f)["code"], "rate_limited");
                    true
                }
                [Action::Close(Close::RateLimited)] => {
                    prop_assert_eq!(refused_in_a_row + 1, close_after);
                    prop_assert!(c.s.is_closed());
                    return Ok(());
                }
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            };
            if refused {
                refused_in_a_row += 1;
                prop_assert!(refused_in_a_row < close_after);
            } else {
                refused_in_a_row = 0;
                accepted.push(ms);
                for (i, from) in accepted.iter().enumerate() {
                    let n = accepted.len() - i;
                    let allowed = f64::from(burst) + f64::from(per_second) * (ms - from) as f64 / 1000.0;
                    prop_assert!(n as f64 <= allowed + 1e-9, "{} acted on from {} to {} ms", n, from, ms);
                }
            }
        }
    }
}

/// A frame the shell built (a resource's answer) goes out in order with the session's own,
/// and the action queue holds nothing once drained; after a close it is dropped.
#[test]
fn shell_answers_keep_their_place_and_stop_after_the_close() {
    let idle = Duration::from_secs(10);
    let mut c = Conn::open(Rules {
        idle_timeout: idle,
        ..rules(dialect("native"))
    });
    c.s.on_text(r#"{"type":"ping","id":1}"#, c.t0);
    c.s.answer(r#"{"type":"list","items":[]}"#.to_owned());
    assert!(c.s.has_actions());
    let sent: Vec<Action> = c.drain();
    assert_eq!(
        sent,
        [
            Action::Send(r#"{"type":"pong","id":1}"#.to_owned()),
            Action::Send(r#"{"type":"list","items":[]}"#.to_owned()),
        ]
    );
    assert!(!c.s.has_actions());
    c.s.handle_timeout(c.at(10_000));
    assert_eq!(c.drain(), [Action::Close(Close::Idle(idle))]);
    c.s.answer(r#"{"type":"list","items":[]}"#.to_owned());
    assert!(!c.s.has_actions(), "nothing after the close");
}

/// A native route that keeps the history of `chat/#` (readable) and `news/#` (not), and
/// makes resume tokens.
fn history_rules() -> Rules {
    use edge_core::history::Rule;
    use edge_core::session::ResumeRules;
    Rules {
        history: vec![
            Rule {
                pattern: "chat/#".into(),
                size: 100,
                read: true,
            },
            Rule {
                pattern: "news/#".into(),
                size: 10,
                read: false,
            },
        ],
        resume: Some(ResumeRules {
            key: proto::resume::key(b"a cluster secret for tests"),
            ttl: Duration::from_secs(300),
            route: "/connect".into(),
            onconnect: Default::default(),
        }),
        ..rules(dialect("native"))
    }
}

/// A resumable session of `user` in namespace `acme` on [`history_rules`].
fn resumable(user: &str) -> Conn {
    let mut c = Conn::open(history_rules());
    let s = std::mem::replace(
        &mut c.s,
        Session::new(
            Arc::new(Rules::default()),
            String::new(),
            c.t0,
            NOW_MS,
            None,
        ),
    );
    c.s = s.resumable(user, "acme", c.t0, NOW_MS);
    c
}

fn at(offset: u64, epoch: &str) -> Position {
    Position {
        offset,
        epoch: epoch.into(),
    }
}

#[test]
fn subscribe_since_asks_for_recovery_and_says_whether_it_happened() {
    let mut c = resumable("alice");
    c.verb("init", json!({}));
    let actions = c.verb(
        "subscribe",
        json!({"topic": "chat/a", "id": 1, "since": {"offset": 41, "epoch": "E"}}),
    );
    assert_eq!(
        actions,
        [Action::Subscribe {
            filter: "chat/a".into(),
            id: Some(json!(1)),
            since: Some(at(41, "E")),
        }]
    );
    let how = Subscribed::Live {
        position: Some(at(57, "E")),
        recovered: Some(true),
    };
    c.s.subscribed("chat/a".into(), Some(&json!(1)), how, c.t0);
    let f = only_frame(c.drain());
    assert_eq!(
        (&f["type"], &f["recovered"], &f["epoch"], &f["offset"]),
        (&json!("subscribed"), &json!(true), &json!("E"), &json!(57))
    );
    assert!(f["resume"].as_str().is_some_and(|t| t.starts_with("sbr1.")));
    for bad in [
        json!(41),
        json!({"offset": -1, "epoch": "E"}),
        json!({"offset": 1}),
    ] {
        let f = only_frame(c.verb(
            "subscribe",
            json!({"topic": "chat/b", "id": 2, "since": bad}),
        ));
        assert_eq!(f["code"], "invalid_frame", "{f}");
    }
}

#[test]
fn a_resume_token_restores_the_subscriptions_at_the_positions_given() {
    let mut first = resumable("alice");
    let mut plain = resumable("alice");
    plain.verb("subscribe", json!({"topic": "chat/a"}));
    plain
        .s
        .subscribed("chat/a".into(), None, outcome(true), plain.t0);
    let f = only_frame(plain.drain());
    assert!(f.get("resume").is_none(), "no session, no token: {f}");
    first.verb("init", json!({}));
    for (topic, pos) in [("chat/a", Some(at(57, "E"))), ("news/#", None)] {
        first.verb("subscribe", json!({"topic": topic}));
        let how = Subscribed::Live {
            position: pos,
            recovered: None,
        };
        first.s.subscribed(topic.into(), None, how, first.t0);
    }
    let token = frames(&first.drain())
        .last()
        .and_then(|f| f["resume"].as_str().map(str::to_owned))
        .expect("the last subscribed frame carries a token");
    assert!(!token.contains("alice"), "no plain identity in the token");

    // Another edge: the client's own position for chat/a wins over the token's.
    let mut again = resumable("alice");
    let actions = again.verb(
        "init",
        json!({"resume": token, "positions": {"chat/a": {"offset": 60, "epoch": "E"}}}),
    );
    let f = &frames(&actions)[0];
    assert_eq!(
        (&f["type"], &f["resumed"]),
        (&json!("session"), &json!(true))
    );
    let subs: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Subscribe { filter, since, .. } => Some((filter.clone(), since.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        subs,
        [
            ("chat/a".to_owned(), Some(at(60, "E"))),
            ("news/#".to_owned(), None)
        ]
    );

    // Another user, or a token from elsewhere, restores nothing.
    let mut mallory = resumable("mallory");
    let actions = mallory.verb("init", json!({"resume": token}));
    let f = only_frame(actions);
    assert_eq!(f["resumed"], false);
    assert!(f["reason"].as_str().is_some());
    let mut later = resumable("alice");
    let actions = later.verb("init", json!({"resume": format!("{token}x")}));
    assert_eq!(only_frame(actions)["resumed"], false);
}

#[test]
fn a_token_expires_after_its_ttl() {
    let mut first = resumable("alice");
    let token = only_frame(first.verb("init", json!({})))["resume"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut late = resumable("alice");
    let text = json!({"type": "init", "resume": token}).to_string();
    late.s.on_text(&text, late.at(301_000));
    let f = only_frame(late.drain());
    assert_eq!(
        (&f["resumed"], &f["reason"]),
        (&json!(false), &json!("resume token expired"))
    );
}

#[test]
fn history_is_read_where_a_rule_allows_it() {
    let mut c = resumable("alice");
    let f = only_frame(c.verb("history", json!({"topic": "other/x", "id": 1})));
    assert_eq!(f["code"], "not_supported");
    let f = only_frame(c.verb("history", json!({"topic": "news/x", "id": 2})));
    assert_eq!(f["code"], "forbidden");
    for bad in [json!(0), json!(101), json!("5")] {
        let f = only_frame(c.verb("history", json!({"topic": "chat/x", "id": 3, "limit": bad})));
        assert_eq!(f["code"], "invalid_frame", "{f}");
    }
    let f = only_frame(c.verb("history", json!({"topic": "chat/+", "id": 3})));
    assert_eq!(f["code"], "invalid_topic");
    let actions = c.verb(
        "history",
        json!({"topic": "chat/x", "id": 4, "limit": 2, "since": {"offset": 5, "epoch": "E"}}),
    );
    let [Action::History(call)] = actions.as_slice() else {
        panic!("{actions:?}")
    };
    assert_eq!((call.after(), call.limit), (5, 2));
    let page = Page {
        epoch: "E".into(),
        last: 9,
        complete: true,
        more: true,
        messages: vec![
            Entry {
                offset: 6,
                payload: "{\"a\":1}".into(),
                binary: false,
            },
            Entry {
                offset: 8,
                payload: "\"b\"".into(),
                binary: false,
            },
            Entry {
                offset: 9,
                payload: "\"AAE=\"".into(),
                binary: true,
            },
        ],
    };
    c.s.history_read(call, Some(page));
    let f = only_frame(c.drain());
    assert_eq!(
        f,
        json!({"type": "history", "id": 4, "topic": "chat/x", "epoch": "E", "offset": 9,
               "complete": true, "more": true,
               "messages": [{"offset": 6, "payload": {"a": 1}}, {"offset": 8, "payload": "b"},
                            {"offset": 9, "payload": "AAE=", "binary": true}]})
    );
    c.s.history_read(call, None);
    assert_eq!(only_frame(c.drain())["code"], "unavailable");
}

#[test]
fn a_valid_token_on_the_upgrade_skips_the_connect_hook_as_the_route_says() {
    use edge_core::session::OnResume;
    let token = only_frame(resumable("alice").verb("init", json!({})))["resume"]
        .as_str()
        .unwrap()
        .to_owned();
    let open = |on: OnResume, token: Option<&str>| {
        let mut r = history_rules();
        r.onconnect = Some(ConnectHook {
            subject: "hooks.onconnect".into(),
            required: true,
        });
        r.resume.as_mut().unwrap().onconnect = on;
        r.token = Some(TokenPolicy::default());
        let t0 = origin();
        let mut s = Session::new(Arc::new(r), CONN.into(), t0, NOW_MS, None)
            .resumable("alice", "acme", t0, NOW_MS)
            .resuming(token, t0);
        std::iter::from_fn(move || s.poll_action()).collect::<Vec<_>>()
    };
    let hooked = |a: &[Action]| a.iter().any(|a| matches!(a, Action::Request { .. }));
    assert!(
        hooked(&open(OnResume::Skip, None)),
        "no token: the hook runs"
    );
    assert!(
        hooked(&open(OnResume::Skip, Some("sbr1.forged.x"))),
        "a bad token changes nothing"
    );
    assert!(hooked(&open(OnResume::Run, Some(&token))));
    assert!(open(OnResume::Skip, Some(&token)).is_empty());
    // Not on an anonymous route: anyone may claim any user there.
    let mut anonymous = history_rules();
    anonymous.onconnect = Some(ConnectHook {
        subject: "hooks.onconnect".into(),
        required: true,
    });
    let t0 = origin();
    let mut s = Session::new(Arc::new(anonymous), CONN.into(), t0, NOW_MS, None)
        .resumable("alice", "acme", t0, NOW_MS)
        .resuming(Some(&token), t0);
    assert!(hooked(
        &std::iter::from_fn(|| s.poll_action()).collect::<Vec<_>>()
    ));
    // Not when the hook last accepted the user more than one resume.ttl ago, however often
    // the token was made anew since.
    let later = NOW_MS + 301_000;
    let mut r = history_rules();
    r.onconnect = Some(ConnectHook {
        subject: "hooks.onconnect".into(),
        required: true,
    });
    r.token = Some(TokenPolicy::default());
    let mut fresh = Session::new(Arc::new(r.clone()), CONN.into(), t0, later, None)
        .resumable("alice", "acme", t0, later);
    // A token made at `later` from a session whose acceptance is `NOW_MS` is not enough.
    let mut old = Session::new(Arc::new(r), CONN.into(), t0, NOW_MS, None)
        .resumable("alice", "acme", t0, NOW_MS);
    while old.poll_action().is_some() {}
    old.on_text(
        &json!({"type": "init"}).to_string(),
        t0 + Duration::from_secs(299),
    );
    let renewed = std::iter::from_fn(|| old.poll_action())
        .find_map(|a| match a {
            Action::Send(f) => serde_json::from_str::<Value>(&f).ok()?["resume"]
                .as_str()
                .map(str::to_owned),
            _ => None,
        })
        .unwrap();
    fresh = fresh.resuming(Some(&renewed), t0);
    assert!(hooked(
        &std::iter::from_fn(|| fresh.poll_action()).collect::<Vec<_>>()
    ));
    let event = open(OnResume::Event, Some(&token));
    assert!(
        matches!(event.as_slice(), [Action::Emit { subject, body: Body::Context }] if subject == "sb.event.acme.resumed"),
        "{event:?}"
    );
}

/// A binary frame (routes with `binary: true`) takes a token like a text frame: passed on
/// while the limit allows, answered `rate_limited` when refused, closed after `close_after`.
#[test]
fn binary_frames_count_against_the_rate_limit() {
    let mut c = Conn::open(with_rate(rules(dialect("native")), 1, 2, 2));
    assert!(c.s.on_binary(c.at(0)));
    assert!(c.s.on_binary(c.at(1)));
    assert!(c.drain().is_empty(), "passed on: nothing to answer");
    assert!(!c.s.on_binary(c.at(2)));
    match c.drain().as_slice() {
        [Action::Send(f)] => assert_eq!(parse(f)["code"], "rate_limited"),
        other => panic!("{other:?}"),
    }
    assert!(!c.s.on_binary(c.at(3)));
    assert!(matches!(
        c.drain().as_slice(),
        [Action::Close(Close::RateLimited)]
    ));
    assert!(!c.s.on_binary(c.at(5000)), "closed: nothing more");
}
