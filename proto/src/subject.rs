//! NATS subjects and header names. Every subject Switchboard uses is spelled here.
//!
//! | subject | who publishes | who subscribes |
//! | --- | --- | --- |
//! | `sb.node.<node>` | coordinators: [`EdgeCommand`](crate::v1::EdgeCommand) for one edge | that edge |
//! | `sb.edges` | coordinators: commands for every edge (broadcast, inspect) | every edge |
//! | `sb.topic.<ns>.<levels…>` | anyone: a topic publication | edges with a local watcher |
//! | `sb.hist.<ns>.<levels…>` | publishers of history topics (JetStream publish) | the rule's stream ([`history_stream`]) |
//! | `sb.live.<ns>.<levels…>` | JetStream only: stored history publications, republished with their offsets | edges with a local watcher of a history topic |
//! | `sb.event.<ns>.<type>` | edges: client events no route hook maps elsewhere | backends |
//! | `sb.coord.announce` | coordinators, every second and when leaving | edges, coordinators |
//! | `sb.coord.hello` | a starting process | coordinators (they announce at once) |
//! | `sb.placement.events` | coordinators: placement changes | `Placement.Watch` streams |
//! | `sb.send`, `sb.broadcast` (configurable) | backends with only a NATS client | coordinators (queue group) |
//! | `_INBOX_sb_edge.…`, `_INBOX_sb_coord.…` | replies to edges' and coordinators' requests | that process |
//!
//! **Invariant:** client-chosen strings (namespaces, topic levels, event types) only ever
//! enter a subject through [`token`], so they can neither inject a wildcard nor leave their
//! prefix.

use std::fmt::Write as _;

/// Prefix of topic publication subjects.
pub const TOPIC_PREFIX: &str = "sb.topic";
/// Prefix of history topic publications on their way into storage (republished, with their
/// position, under [`TOPIC_PREFIX`]).
pub const HISTORY_PREFIX: &str = "sb.hist";
/// Prefix of stored history publications delivered live, with their offsets in headers.
/// Only JetStream's republish sends here (no role's permissions allow publishing), so the
/// offsets and report address of a message on it can be trusted.
pub const LIVE_PREFIX: &str = "sb.live";
/// Prefix of the JetStream streams that keep topic history, one per rule.
pub const HISTORY_STREAM_PREFIX: &str = "SB_HISTORY_";
/// Every edge subscribes here for cluster-wide commands.
pub const EDGES: &str = "sb.edges";

/// Coordinators announce themselves here ([`CoordinatorAnnounce`](crate::v1::CoordinatorAnnounce)).
pub const ANNOUNCE: &str = "sb.coord.announce";
/// A process that just started asks coordinators to announce at once.
pub const HELLO: &str = "sb.coord.hello";
/// Placement changes ([`PlacementEvent`](crate::v1::PlacementEvent)) for `Placement.Watch`.
pub const PLACEMENT_EVENTS: &str = "sb.placement.events";
/// Queue group of the coordinators on the send and broadcast subjects.
pub const COORDINATOR_QUEUE: &str = "sb-coordinators";
/// Default subject backends publish sends on (`{username, namespace?, type, payload}`).
pub const DEFAULT_SEND: &str = "sb.send";
/// Default subject backends publish broadcasts on (`{type, payload, namespace?, skip?}`).
pub const DEFAULT_BROADCAST: &str = "sb.broadcast";
/// Reply subjects of edges (their inbox prefix): apart from backends' `_INBOX.>`, so that
/// NATS permissions can keep a backend from reading the replies meant for an edge.
pub const EDGE_INBOX: &str = "_INBOX_sb_edge";
/// Reply subjects of coordinators (their inbox prefix).
pub const COORDINATOR_INBOX: &str = "_INBOX_sb_coord";

/// Header: the connection that published a topic message (so it can be skipped).
pub const HEADER_ORIGIN: &str = "Sb-Origin";
/// Header: the publisher asked to receive its own publication.
pub const HEADER_ECHO: &str = "Sb-Echo";
/// Header: the connection a client event or lifecycle event is about.
pub const HEADER_CONN_ID: &str = "Sb-Conn-Id";
/// Header: that connection's namespace.
pub const HEADER_NAMESPACE: &str = "Sb-Namespace";
/// Header: that connection's user (empty on anonymous routes).
pub const HEADER_USER: &str = "Sb-User";
/// Header: the backend's message id of a topic publication (deduplicated per connection).
pub const HEADER_MESSAGE_ID: &str = "Sb-Message-Id";
/// Header: the payload is bytes, not JSON (a topic publication reaches clients as a binary
/// frame; a client's binary frame reaches backends with it). Any value.
pub const HEADER_BINARY: &str = "Sb-Binary";
/// Header: `0` keeps a topic publication uncompressed for every client (the `compress`
/// flag of HyperExpress's `publish`).
pub const HEADER_COMPRESS: &str = "Sb-Compress";
/// Header: a stored publication's offset (set by JetStream when it republishes it).
pub const HEADER_OFFSET: &str = "Nats-Sequence";
/// Header: the offset of the same topic's publication before it, 0 for none (set by
/// JetStream when it republishes it): a receiver that did not see that one missed it.
pub const HEADER_PREVIOUS: &str = "Nats-Last-Sequence";
/// Header: where edges send their delivery report for a history publication (JetStream's
/// republish carries no reply subject).
pub const HEADER_REPORT_TO: &str = "Sb-Report-To";
/// Header: W3C trace context.
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// The subject of one edge's command inbox.
pub fn node(node_id: &str) -> String {
    format!("sb.node.{}", token(node_id))
}

/// The default subject of a topic resource's items.
pub fn resource(name: &str) -> String {
    format!("sb.resource.{}", token(name))
}

/// The default subject of a client event of `event_type` in `namespace`.
pub fn event(namespace: &str, event_type: &str) -> String {
    format!("sb.event.{}.{}", token(namespace), token(event_type))
}

/// The subject a publication to `levels` (already validated) in `namespace` travels on.
pub fn topic<'a>(namespace: &str, levels: impl IntoIterator<Item = &'a str>) -> String {
    under(TOPIC_PREFIX, namespace, levels)
}

/// The subject a stored history publication to `levels` in `namespace` is delivered on.
pub fn live<'a>(namespace: &str, levels: impl IntoIterator<Item = &'a str>) -> String {
    under(LIVE_PREFIX, namespace, levels)
}

fn under<'a>(prefix: &str, namespace: &str, levels: impl IntoIterator<Item = &'a str>) -> String {
    let mut s = format!("{prefix}.{}", token(namespace));
    for level in levels {
        s.push('.');
        push_token(&mut s, level);
    }
    s
}

/// The subject a publication to `levels` (already validated) of a history topic in
/// `namespace` is stored under.
pub fn history<'a>(namespace: &str, levels: impl IntoIterator<Item = &'a str>) -> String {
    under(HISTORY_PREFIX, namespace, levels)
}

/// The subjects of a history rule's stream: its MQTT `pattern` (already validated) in every
/// namespace.
pub fn history_filter(pattern: &str) -> Vec<String> {
    topic_filter("*", pattern)
        .into_iter()
        .map(|s| {
            let rest = s
                .strip_prefix(TOPIC_PREFIX)
                .and_then(|r| r.strip_prefix(".~2A"))
                .unwrap_or_default();
            format!("{HISTORY_PREFIX}.*{rest}")
        })
        .collect()
}

/// The name of the stream that keeps the history of rule `pattern`: stable across
/// processes and releases (FNV-1a, not the standard library's randomly keyed hash).
pub fn history_stream(pattern: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in pattern.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{HISTORY_STREAM_PREFIX}{hash:016x}")
}

/// The subjects that carry every publication matching the MQTT `filter` (already
/// validated) in `namespace`. A trailing `#` also matches its parent level, so it needs two
/// subjects.
pub fn topic_filter(namespace: &str, filter: &str) -> Vec<String> {
    filter_under(TOPIC_PREFIX, namespace, filter)
}

/// The subjects that deliver every stored history publication matching `filter` in
/// `namespace` (as [`topic_filter`], under [`LIVE_PREFIX`]).
pub fn live_filter(namespace: &str, filter: &str) -> Vec<String> {
    filter_under(LIVE_PREFIX, namespace, filter)
}

fn filter_under(prefix: &str, namespace: &str, filter: &str) -> Vec<String> {
    let (head, multi) = match filter.strip_suffix("#") {
        Some(head) => (head.strip_suffix('/').unwrap_or(head), true),
        None => (filter, false),
    };
    let mut base = format!("{prefix}.{}", token(namespace));
    if !(multi && head.is_empty()) {
        for level in head.split('/') {
            base.push('.');
            if level == "+" {
                base.push('*');
            } else {
                push_token(&mut base, level);
            }
        }
    }
    match (multi, head.is_empty()) {
        (false, _) => vec![base],
        (true, true) => vec![format!("{base}.>")],
        (true, false) => vec![format!("{base}.>"), base],
    }
}

/// Splits a topic publication subject (under [`TOPIC_PREFIX`] or [`LIVE_PREFIX`]) back into
/// its namespace and MQTT topic.
pub fn parse_topic(subject: &str) -> Option<(String, String)> {
    let rest = subject
        .strip_prefix(TOPIC_PREFIX)
        .or_else(|| subject.strip_prefix(LIVE_PREFIX))?
        .strip_prefix('.')?;
    let mut tokens = rest.split('.');
    let namespace = untoken(tokens.next()?)?;
    let mut topic = String::new();
    for (i, t) in tokens.enumerate() {
        if i > 0 {
            topic.push('/');
        }
        topic.push_str(&untoken(t)?);
    }
    Some((namespace, topic))
}

/// Encodes any string as one subject token: ASCII letters, digits, `-` and `_` stand for
/// themselves, every other byte is `~XX` (hex), and the empty string is `~`.
pub fn token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    push_token(&mut out, s);
    out
}

fn push_token(out: &mut String, s: &str) {
    if s.is_empty() {
        out.push('~');
        return;
    }
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            let _ = write!(out, "~{b:02X}");
        }
    }
}

/// Decodes a token made by [`token`].
pub fn untoken(t: &str) -> Option<String> {
    if t == "~" {
        return Some(String::new());
    }
    if !t.contains('~') {
        return Some(t.to_owned());
    }
    let mut bytes = Vec::with_capacity(t.len());
    let mut it = t.bytes();
    while let Some(b) = it.next() {
        if b == b'~' {
            let hi = (it.next()? as char).to_digit(16)?;
            let lo = (it.next()? as char).to_digit(16)?;
            bytes.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

/// Whether `subject` is a valid subject to publish on: non-empty tokens, no wildcards,
/// no whitespace.
pub fn is_valid_publish_subject(subject: &str) -> bool {
    is_valid_subject(subject) && subject.split('.').all(|t| t != "*" && t != ">")
}

/// Whether `subject` is a valid subscription subject: non-empty tokens, no whitespace,
/// `*` only as a whole token, `>` only as the whole last token.
pub fn is_valid_subject(subject: &str) -> bool {
    if subject.is_empty() || subject.chars().any(char::is_whitespace) {
        return false;
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    let last = tokens.len() - 1;
    tokens.iter().enumerate().all(|(i, t)| {
        !t.is_empty() && (t.len() == 1 || !t.contains(['*', '>'])) && (*t != ">" || i == last)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_cannot_inject_wildcards_or_separators() {
        for s in ["a.b", "*", ">", "a b", "", "~", "x\ty", "ü", "a>"] {
            let t = token(s);
            assert!(!t.is_empty());
            assert!(!t.contains(['.', '*', '>', ' ', '\t']), "{s:?} -> {t:?}");
            assert_eq!(untoken(&t).as_deref(), Some(s));
        }
        assert_eq!(token("room-1_x"), "room-1_x");
    }

    #[test]
    fn topic_subjects_round_trip() {
        let s = topic("acme", "scores/42/eu".split('/'));
        assert_eq!(s, "sb.topic.acme.scores.42.eu");
        assert_eq!(
            parse_topic(&s),
            Some(("acme".into(), "scores/42/eu".into()))
        );
        let odd = topic("a.b", "x.y//*".split('/'));
        assert_eq!(parse_topic(&odd), Some(("a.b".into(), "x.y//*".into())));
    }

    #[test]
    fn filters_map_to_wildcard_subjects() {
        assert_eq!(
            topic_filter("ns", "scores/+/eu"),
            vec!["sb.topic.ns.scores.*.eu"]
        );
        assert_eq!(
            topic_filter("ns", "scores/#"),
            vec!["sb.topic.ns.scores.>", "sb.topic.ns.scores"]
        );
        assert_eq!(topic_filter("ns", "#"), vec!["sb.topic.ns.>"]);
        assert_eq!(
            live_filter("ns", "a/#"),
            vec!["sb.live.ns.a.>", "sb.live.ns.a"]
        );
        let l = live("ns", ["a", "b"]);
        assert_eq!(parse_topic(&l), Some(("ns".into(), "a/b".into())));
    }

    #[test]
    fn history_subjects_cover_every_namespace() {
        assert_eq!(
            history_filter("chat/#"),
            vec!["sb.hist.*.chat.>", "sb.hist.*.chat"]
        );
        assert_eq!(history_filter("a/+/b"), vec!["sb.hist.*.a.*.b"]);
        assert_eq!(history_filter("#"), vec!["sb.hist.*.>"]);
        assert_eq!(
            history("acme", "chat/x.y".split('/')),
            "sb.hist.acme.chat.x~2Ey"
        );
        let name = history_stream("chat/#");
        assert_eq!(name, history_stream("chat/#"));
        assert_ne!(name, history_stream("chat/+"));
        assert!(name.starts_with("SB_HISTORY_") && name.len() == 27);
    }
}
