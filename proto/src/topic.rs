//! MQTT topic syntax: levels separated by `/`, `+` matches one level, `#` matches the rest
//! (and its parent) and only as the last level. Publications name concrete topics;
//! subscriptions name filters.

/// Longest topic or filter accepted, in bytes.
pub const MAX_LEN: usize = 1024;
/// Most levels in a topic or filter.
pub const MAX_LEVELS: usize = 32;

/// Why a topic or filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("topic has more than {MAX_LEVELS} levels")]
    TooManyLevels,
    #[error("a publication topic cannot contain + or #")]
    WildcardInTopic,
    #[error("+ and # must fill a whole level, and # must be the last level")]
    MisplacedWildcard,
    #[error("a topic cannot contain control characters (U+0000 included)")]
    ControlCharacter,
}

/// Checks a concrete topic (for publishing).
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    check_shape(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInTopic);
    }
    Ok(())
}

/// Checks a subscription filter.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_shape(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    for (i, level) in levels.iter().enumerate() {
        let wild = level.contains(['+', '#']);
        let ok = !wild || *level == "+" || (*level == "#" && i == last);
        if !ok {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// Whether `filter` matches the concrete `topic`.
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some concrete topic matches both filters `a` and `b` (both already validated).
pub fn overlaps(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
            _ => return false,
        }
    }
}

fn check_shape(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_LEN {
        return Err(TopicError::TooLong);
    }
    if s.split('/').count() > MAX_LEVELS {
        return Err(TopicError::TooManyLevels);
    }
    // MQTT forbids U+0000; the other controls (C0, DEL, C1) have no business in a topic
    // either, and would reach logs and backends as they are.
    if s.chars().any(char::is_control) {
        return Err(TopicError::ControlCharacter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_topics_validate() {
        assert!(validate_filter("scores/+/eu").is_ok());
        assert!(validate_filter("scores/#").is_ok());
        assert!(validate_filter("#").is_ok());
        assert_eq!(
            validate_filter("scores/#/eu"),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(
            validate_filter("sc+ores"),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(validate_topic("scores/+"), Err(TopicError::WildcardInTopic));
        assert_eq!(validate_topic(""), Err(TopicError::Empty));
        assert!(validate_topic("a.b/*/>").is_ok());
        for bad in ["a\u{0}b", "a/\n", "\t", "x/\u{7f}", "x/\u{85}"] {
            assert_eq!(
                validate_topic(bad),
                Err(TopicError::ControlCharacter),
                "{bad:?}"
            );
            assert_eq!(
                validate_filter(bad),
                Err(TopicError::ControlCharacter),
                "{bad:?}"
            );
        }
        assert!(validate_topic("ünï/cödé/😀").is_ok());
    }

    #[test]
    fn matching_follows_mqtt() {
        assert!(matches("scores/+/eu", "scores/42/eu"));
        assert!(!matches("scores/+/eu", "scores/42/us"));
        assert!(matches("scores/#", "scores"));
        assert!(matches("scores/#", "scores/1/2/3"));
        assert!(!matches("scores/+", "scores/1/2"));
        assert!(matches("#", "anything/at/all"));
    }

    #[test]
    fn overlap_means_a_topic_matches_both() {
        let pairs = [
            ("#", "x/y", true),
            ("+/#", "x/y", true),
            ("#", "+/#", true),
            ("x/#", "x", true),
            ("x/+", "x/y", true),
            ("+/y", "x/+", true),
            ("x/y", "x/y", true),
            ("x/y", "x/z", false),
            ("x/+", "x", false),
            ("x/+", "x/y/z", false),
            ("y/#", "x/#", false),
            ("+", "x/y", false),
        ];
        for (a, b, want) in pairs {
            assert_eq!(overlaps(a, b), want, "{a} ~ {b}");
            assert_eq!(overlaps(b, a), want, "{b} ~ {a}");
        }
        // Whenever a topic matches both, they overlap.
        for t in ["x", "x/y", "x/y/z", "a/y"] {
            for (a, b, _) in pairs {
                if matches(a, t) && matches(b, t) {
                    assert!(overlaps(a, b), "{a} ~ {b} via {t}");
                }
            }
        }
    }
}
