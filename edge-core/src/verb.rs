//! The built-in verbs: parsed once from a frame's routing field, matched by the compiler
//! everywhere after. A dialect's row in [`crate::dialect`] says which of them it has;
//! anything else a client sends is an event for backends.

/// A verb the edge answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// Opens (or names) a session: answered `session`.
    Init,
    /// Answered `pong`.
    Ping,
    /// A new token for an open connection: answered `refreshed` or an error.
    Refresh,
    Subscribe,
    Unsubscribe,
    Publish,
    /// Reads a topic's history: answered `history`.
    History,
    /// Resources: a watch streams changes until `stop`.
    Watch,
    Stop,
    Query,
    All,
    Get,
}

impl Verb {
    /// Every verb, in the order of docs/PROTOCOL.md §4.
    pub const ALL: [Verb; 12] = [
        Verb::Init,
        Verb::Ping,
        Verb::Refresh,
        Verb::Subscribe,
        Verb::Unsubscribe,
        Verb::Publish,
        Verb::History,
        Verb::Watch,
        Verb::Stop,
        Verb::Query,
        Verb::All,
        Verb::Get,
    ];

    /// The verb a frame's routing value names, if it names one.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "init" => Self::Init,
            "ping" => Self::Ping,
            "refresh" => Self::Refresh,
            "subscribe" => Self::Subscribe,
            "unsubscribe" => Self::Unsubscribe,
            "publish" => Self::Publish,
            "history" => Self::History,
            "watch" => Self::Watch,
            "stop" => Self::Stop,
            "query" => Self::Query,
            "all" => Self::All,
            "get" => Self::Get,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Init => "init",
            Self::Ping => "ping",
            Self::Refresh => "refresh",
            Self::Subscribe => "subscribe",
            Self::Unsubscribe => "unsubscribe",
            Self::Publish => "publish",
            Self::History => "history",
            Self::Watch => "watch",
            Self::Stop => "stop",
            Self::Query => "query",
            Self::All => "all",
            Self::Get => "get",
        }
    }

    /// The verbs on resources.
    pub const RESOURCES: [Verb; 5] = [Verb::Watch, Verb::Stop, Verb::Query, Verb::All, Verb::Get];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verb_parses_from_its_name_and_nothing_else_does() {
        for v in Verb::ALL {
            assert_eq!(Verb::parse(v.as_str()), Some(v));
        }
        for s in ["", "INIT", "init ", "message", "subscribe\0", "pong"] {
            assert_eq!(Verb::parse(s), None, "{s:?}");
        }
    }
}
