//! The dialect table: everything that distinguishes one client protocol from another is a
//! column of one row here, so a new dialect is one row (and its test). The session engine
//! reads the row; no other module names a dialect.

use std::fmt;

use proto::frame::Key;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::verb::Verb;

/// What a dialect does with a frame that is not a JSON object with its routing field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// An error frame (`invalid_json`, `missing_type`).
    Error,
    /// Nothing (counted): the client library never expects an answer to those.
    Ignore,
}

/// What a dialect does with a frame whose routing value is not one of its verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Other {
    /// An event forwarded to backends through the route's hooks.
    Forward,
    /// monument: a data-style request (`…:get:…` answered as `…:set:…`) or a passthrough
    /// publication on the subject the event names, as the route's `monument` mode allows.
    SubjectEvent,
    /// MonoRail: forwarded when the route has an `onmessage` hook, else an `unknown_verb`
    /// error naming the resource and params it was sent.
    ForwardOrUnknownHandler,
}

/// One row of the table.
#[derive(Debug, PartialEq, Eq)]
pub struct Row {
    /// The name routes give in `dialect:`.
    pub name: &'static str,
    /// The routing field of its frames (a route's `key:` may override it).
    pub key: Key,
    /// Its built-in verbs.
    pub verbs: &'static [Verb],
    /// The field naming a resource type in resource verbs and their answers.
    pub resource_field: &'static str,
    /// Whether `stop` is answered (`stopped`).
    pub answers_stop: bool,
    pub unreadable: Unreadable,
    pub other: Other,
    /// Whether routes of this dialect take the `monument` mode key.
    pub monument_modes: bool,
    /// Whether pushed frames (sends, broadcasts, topic messages) carry the backend's
    /// `message_id` when it set one. Only the native protocol has a place for it: the seed
    /// systems' clients get their frames exactly as those systems sent them.
    pub message_id: bool,
    /// Whether `session`, `subscribed` and `unsubscribed` carry resume tokens (docs/PROTOCOL.md
    /// §4.6) once the client opened a session with `init`. Native only, like `message_id`.
    pub resume: bool,
    /// Conformance only (`echo`): the transport echoes every frame back and the session
    /// sees none; no verbs, no events, no hooks.
    pub echo: bool,
}

/// The native protocol: every verb, `type`-keyed; other frames are events.
const NATIVE: Row = Row {
    name: "native",
    key: Key::Type,
    verbs: &Verb::ALL,
    resource_field: "resource",
    answers_stop: true,
    unreadable: Unreadable::Error,
    other: Other::Forward,
    monument_modes: false,
    message_id: true,
    resume: true,
    echo: false,
};

/// Every dialect. The first row is the default.
pub static TABLE: &[Row] = &[
    NATIVE,
    Row {
        name: "monument",
        key: Key::Event,
        verbs: &[],
        resource_field: "resource",
        answers_stop: true,
        unreadable: Unreadable::Ignore,
        other: Other::SubjectEvent,
        monument_modes: true,
        message_id: false,
        resume: false,
        echo: false,
    },
    // The native protocol under HyperExpress's names for limits.
    Row {
        name: "hyperexpress",
        message_id: false,
        resume: false,
        ..NATIVE
    },
    Row {
        name: "monorail",
        key: Key::Handler,
        verbs: &[
            Verb::Init,
            Verb::Watch,
            Verb::Stop,
            Verb::Query,
            Verb::All,
            Verb::Get,
        ],
        resource_field: "type",
        answers_stop: false,
        unreadable: Unreadable::Error,
        other: Other::ForwardOrUnknownHandler,
        monument_modes: false,
        message_id: false,
        resume: false,
        echo: false,
    },
    // Hooks, sends and broadcasts only.
    Row {
        name: "bodhi",
        verbs: &[],
        message_id: false,
        resume: false,
        ..NATIVE
    },
    // Conformance testing (Autobahn|Testsuite): every frame comes back as it was sent.
    Row {
        name: "echo",
        verbs: &[],
        message_id: false,
        resume: false,
        echo: true,
        ..NATIVE
    },
];

/// A route's dialect: a row of [`TABLE`], chosen by name in the config.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Dialect(&'static Row);

impl Dialect {
    /// The dialect a config names.
    pub fn named(name: &str) -> Option<Self> {
        TABLE.iter().find(|r| r.name == name).map(Self)
    }

    /// Every dialect's name, for error messages and docs.
    pub fn names() -> impl Iterator<Item = &'static str> {
        TABLE.iter().map(|r| r.name)
    }

    pub fn row(self) -> &'static Row {
        self.0
    }

    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// The routing field.
    pub fn key(self) -> Key {
        self.0.key
    }

    /// The built-in verb `value` names in this dialect; `None` for anything else (an event).
    pub fn verb(self, value: &str) -> Option<Verb> {
        Verb::parse(value).filter(|v| self.has(*v))
    }

    pub fn has(self, verb: Verb) -> bool {
        self.0.verbs.contains(&verb)
    }

    /// Whether clients are told `refresh_required` before their token expires (the
    /// dialects with the `refresh` verb); the others are closed at expiry.
    pub fn refreshes(self) -> bool {
        self.has(Verb::Refresh)
    }

    /// Whether the dialect has any resource verb (routes may then configure `resources`).
    pub fn has_resources(self) -> bool {
        Verb::RESOURCES.iter().any(|v| self.has(*v))
    }
}

impl Default for Dialect {
    fn default() -> Self {
        Self(&TABLE[0])
    }
}

impl fmt::Debug for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

impl Serialize for Dialect {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name)
    }
}

impl<'de> Deserialize<'de> for Dialect {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Self::named(&name).ok_or_else(|| {
            let known: Vec<_> = Self::names().collect();
            serde::de::Error::custom(format!(
                "unknown dialect {name:?}; expected one of {}",
                known.join(", ")
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(name: &str) -> Dialect {
        Dialect::named(name).expect("dialect in the table")
    }

    #[test]
    fn names_are_unique_and_the_default_is_native() {
        let mut names: Vec<_> = Dialect::names().collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TABLE.len());
        assert_eq!(Dialect::default().name(), "native");
        assert_eq!(Dialect::named("Native"), None);
    }

    #[test]
    fn each_row_says_what_its_clients_expect() {
        // native and hyperexpress: every verb, `type`-keyed.
        for name in ["native", "hyperexpress"] {
            for v in Verb::ALL {
                assert_eq!(d(name).verb(v.as_str()), Some(v), "{name} {v:?}");
            }
            assert_eq!(d(name).key(), Key::Type);
            assert!(d(name).refreshes());
        }
        // MonoRail: init and resources under `handler`; `type` names the resource.
        let m = d("monorail");
        assert_eq!(m.key(), Key::Handler);
        assert_eq!(m.verb("subscribe"), None);
        assert_eq!(m.verb("watch"), Some(Verb::Watch));
        assert!(!m.row().answers_stop && !m.refreshes() && m.has_resources());
        assert_eq!(m.row().resource_field, "type");
        // monument and bodhi: no built-ins; everything is an event.
        for name in ["monument", "bodhi"] {
            assert!(Verb::ALL.iter().all(|v| d(name).verb(v.as_str()).is_none()));
            assert!(!d(name).has_resources());
        }
        assert_eq!(d("monument").key(), Key::Event);
        assert_eq!(d("monument").row().unreadable, Unreadable::Ignore);
        assert!(d("monument").row().monument_modes);
        // Only native frames carry a backend's message_id.
        for name in Dialect::names() {
            assert_eq!(d(name).row().message_id, name == "native", "{name}");
        }
    }

    #[test]
    fn config_names_round_trip_and_unknown_ones_are_refused() {
        for name in Dialect::names() {
            let parsed: Dialect = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            assert_eq!(
                serde_json::to_string(&parsed).unwrap(),
                format!("\"{name}\"")
            );
        }
        let e = serde_json::from_str::<Dialect>("\"socketio\"").unwrap_err();
        assert!(
            e.to_string().contains("expected one of native, monument"),
            "{e}"
        );
    }
}
