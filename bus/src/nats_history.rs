//! [`HistoryStore`] over NATS JetStream: one stream per rule, for cluster mode.
//!
//! **Streams.** Rule `pattern` is kept by the stream [`subject::history_stream`]`(pattern)`
//! on the subjects [`subject::history_filter`]`(pattern)` (`sb.hist.*.<levels>`: every
//! namespace), file storage, discard old, `max_msgs_per_subject = size + 1` and
//! `max_age = ttl`. The one message more than the rule keeps makes a reader exactly `size`
//! behind provably complete (see [`NatsHistory`]'s `read`). The pattern is in the stream's
//! description and metadata, so [`HistoryStore::rules`] rebuilds the rules from the
//! streams alone. [`HistoryStore::ensure`] creates or updates the streams, with no call that
//! needs the account info (async-nats 0.51 cannot parse it from servers before 2.10).
//!
//! **Live delivery.** Each stream republishes what it stores from `sb.hist.>` to `sb.live.>`
//! (every rule's stream has the same republish mapping; each republishes only its own
//! subjects): the server itself sends every stored publication on its topic subject with
//! `Nats-Sequence` ([`subject::HEADER_OFFSET`]) and `Nats-Last-Sequence`
//! ([`subject::HEADER_PREVIOUS`], the sequence of the same subject's last message still
//! stored before it, 0 when none: one removed by age is not named), after the headers it was
//! published with. Backends with a bare NATS client get the same
//! by a JetStream publish to [`subject::history`].
//!
//! **Offsets and epochs.** An offset is the stream sequence; the epoch is the stream's
//! creation time in Unix nanoseconds (decimal), so a stream deleted and made again has
//! another. `append` takes the epoch from a per-stream cache filled by any stream info
//! (`state` and `read` always ask the server); the cache is dropped when an append fails and
//! refreshed when an acknowledged sequence is not above the highest one seen, which is what
//! a stream made anew by another process gives. Until this process notices (its first append
//! after the stream is gone, or a sequence not above the highest it saw, or any `state` or
//! `read`), an append may still name the old epoch: only if the new stream already holds more
//! messages than the old one did when last seen here.
//!
//! **Reads** use an ephemeral pull consumer (memory storage, ack none, filtered on the topic,
//! starting at `after + 1`), fetch until the server says nothing is pending, then ask for
//! the stream's state and delete the consumer at the same time: three round trips.
//!
//! Tested against nats-server 2.15.1 only; nothing here needs more than 2.9 (the pattern is
//! also in the description, as 2.9 keeps no stream metadata), but 2.9 was not run.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{self, DiscardPolicy, Republish, StorageType};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use proto::subject;
use tracing::debug;

use crate::Headers;
use crate::history::{Appended, HistoryError, HistoryStore, Read, Rule, State, Stored};

/// Metadata key of a history stream that holds its rule's pattern (servers 2.10 and later).
const PATTERN_METADATA: &str = "switchboard.pattern";
/// The description of a history stream is this, then the pattern (every server version).
const DESCRIPTION_PREFIX: &str = "Switchboard topic history of rule ";
/// A read's consumer is removed by the server after this long unused, should the delete
/// after the read be lost.
const READ_CONSUMER_IDLE: Duration = Duration::from_secs(10);
/// How long a JetStream call may take (async-nats' default is 5 s): an append waits for
/// its acknowledgement within a caller's request, and one that times out because no stream
/// took it (see `append`) should not hold that request long.
const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages asked for in one fetch of a read.
const READ_BATCH: usize = 1024;

/// How history streams are created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsHistoryOptions {
    /// Copies of each stream in a JetStream cluster (1 for a single server).
    pub replicas: usize,
}

impl Default for NatsHistoryOptions {
    fn default() -> Self {
        Self { replicas: 1 }
    }
}

/// History over JetStream. Cloning gives another handle to the same connection and cache.
///
/// **Why `complete` holds.** A read of the messages of subject `s` after sequence `a`
/// answers `complete` when the stream's first sequence, asked *after* the consumer drained,
/// is at most `a + 1`, and at most `size` messages came back. Only two things remove a
/// message here. (1) The age limit (and any stream-wide limit) removes a prefix of the whole
/// stream, so it raises the first sequence: a first sequence still at most `a + 1` proves
/// that nothing above `a` went that way before the read ended. (2) The per-subject count
/// limit removes a message of `s` only when `size + 1` newer messages of `s` are stored; from
/// then on, `s` always holds at least `size + 1` messages newer than it (each later removal
/// again leaves `size + 1` newer ones, and age removed none of them, by (1)). A consumer
/// that reads in sequence order until nothing is pending delivers every message it passed
/// that was still stored, so if it skipped a removed message above `a` it delivered at least
/// `size + 1` messages. Hence at most `size` delivered and no prefix removal above `a` means
/// nothing above `a` was removed. A reader exactly `size` behind is therefore complete, one
/// `size + 1` behind is reported incomplete although nothing may be missing ("when unsure:
/// false"), and so is any read from before the stream's first stored message (a position
/// taken from [`State::last`] on a quiet topic of a busy rule, once the rule's oldest
/// message is gone): JetStream does not say which subjects the removed messages had. An
/// operator deleting single messages by hand is not covered.
#[derive(Debug, Clone)]
pub struct NatsHistory {
    inner: Arc<Inner>,
}

impl NatsHistory {
    /// History on `client` (connected to a server with JetStream enabled).
    pub fn new(client: async_nats::Client, opts: NatsHistoryOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                js: {
                    let mut js = jetstream::new(client.clone());
                    js.set_timeout(JETSTREAM_TIMEOUT);
                    js
                },
                client,
                opts,
                epochs: Mutex::new(HashMap::new()),
                known: Mutex::new(HashSet::new()),
            }),
        }
    }
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    opts: NatsHistoryOptions,
    /// Per stream name: what its last info said; never locked across an `.await`.
    epochs: Mutex<HashMap<String, Epoch>>,
    /// Streams this process has seen exist (made, read or listed): one of them found
    /// missing was deleted, and is made anew; one never seen is not made by an append.
    known: Mutex<HashSet<String>>,
}

/// A stream's epoch and the highest sequence seen since it was read.
#[derive(Debug, Clone)]
struct Epoch {
    epoch: String,
    last: u64,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsHistory")
            .field("opts", &self.opts)
            .field("streams", &self.epochs.try_lock().map(|e| e.len()).ok())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Epoch>> {
        self.epochs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers what `info` says about its stream's epoch; returns the epoch.
    fn remember(&self, info: &stream::Info) -> String {
        self.seen(&info.config.name);
        let epoch = epoch_of(info);
        self.lock().insert(
            info.config.name.clone(),
            Epoch {
                epoch: epoch.clone(),
                last: info.state.last_sequence,
            },
        );
        epoch
    }

    async fn info(&self, name: &str) -> Result<stream::Info, HistoryError> {
        let stream = self
            .js
            .get_stream_no_info(name)
            .await
            .map_err(unavailable)?;
        match stream.get_info().await {
            Ok(info) => {
                self.remember(&info);
                Ok(info)
            }
            Err(error) => {
                self.lock().remove(name);
                Err(unavailable(error))
            }
        }
    }

    async fn ensure(&self, rules: &[Rule]) -> Result<(), HistoryError> {
        for rule in rules {
            let config = stream_config(rule, self.opts.replicas);
            // Update first, create when missing (`create_or_update_stream`): neither asks for
            // the account info. Updating keeps the stream, its messages and its epoch. When
            // another process created it between our update and create (with other limits),
            // our create fails: update once more.
            let info = match self.js.create_or_update_stream(config.clone()).await {
                Ok(info) => info,
                Err(error) => {
                    debug!(stream = config.name, %error, "history stream not made; updating");
                    self.js.update_stream(&config).await.map_err(unavailable)?
                }
            };
            self.remember(&info);
        }
        Ok(())
    }

    fn seen(&self, name: &str) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if !known.contains(name) {
            known.insert(name.to_owned());
        }
    }

    fn was_seen(&self, name: &str) -> bool {
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known.contains(name)
    }

    /// Whether JetStream says stream `name` does not exist (not: it could not be asked).
    async fn is_missing(&self, name: &str) -> bool {
        match self.js.get_stream(name).await {
            Err(e) => matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ),
            Ok(_) => false,
        }
    }

    async fn rules(&self) -> Result<Vec<Rule>, HistoryError> {
        let infos: Vec<stream::Info> =
            self.js.streams().try_collect().await.map_err(unavailable)?;
        let mut rules: Vec<Rule> = infos
            .iter()
            .filter(|info| info.config.name.starts_with(subject::HISTORY_STREAM_PREFIX))
            .filter_map(|info| {
                self.seen(&info.config.name);
                rule_of(&info.config)
            })
            .collect();
        rules.sort_by(|a, b| a.pattern.cmp(&b.pattern));
        Ok(rules)
    }

    async fn append(
        &self,
        rule: &Rule,
        namespace: &str,
        topic: &str,
        headers: Headers,
        payload: Bytes,
    ) -> Result<Appended, HistoryError> {
        if !proto::topic::matches(&rule.pattern, topic) {
            return Err(HistoryError::Unavailable(
                format!("topic {topic:?} is not in history rule {:?}", rule.pattern).into(),
            ));
        }
        let max = self.client.server_info().max_payload;
        let size = payload.len() + header_len(&headers);
        if size > max {
            return Err(HistoryError::TooLarge { size, max });
        }
        let mut map = header_map(&headers)?;
        // A backend's retry (the same message id) is stored once: JetStream drops a second
        // publication with the same `Nats-Msg-Id` within its duplicate window (2 min) and
        // acknowledges the first's offset. Scoped to the topic, as ids are the backend's.
        if let Some(id) = headers.get(subject::HEADER_MESSAGE_ID)
            && let Ok(value) = format!("{namespace}/{topic}/{id}").parse::<HeaderValue>()
        {
            map.insert("Nats-Msg-Id", value);
        }
        let name = subject::history_stream(&rule.pattern);
        let to = subject::history(namespace, topic.split('/'));
        let publish = || async {
            let (to, map, payload) = (to.clone(), map.clone(), payload.clone());
            self.js.publish_with_headers(to, map, payload).await?.await
        };
        let mut ack = publish().await;
        // No stream took it: none listens (then the server says so at once, unless another
        // client subscribed to the subject, a monitoring tap on `>` say, and the publish times
        // out). When a stream this process saw is gone (an operator deleted it to reset
        // history), it is made anew, a new epoch readers notice, and the publication goes into
        // it; when the stream is there, what became of the publication is unknown, and the
        // caller is told so. A stream never made is not made here: `ensure` makes them.
        if let Err(e) = &ack
            && matches!(
                e.kind(),
                PublishErrorKind::StreamNotFound | PublishErrorKind::TimedOut
            )
            && self.was_seen(&name)
            && self.is_missing(&name).await
        {
            debug!(stream = %name, "history stream missing: making it anew");
            self.ensure(std::slice::from_ref(rule)).await?;
            ack = publish().await;
        }
        let ack = match ack {
            Ok(ack) => ack,
            Err(error) => {
                self.lock().remove(&name);
                return Err(match error.kind() {
                    PublishErrorKind::MaxPayloadExceeded => HistoryError::TooLarge { size, max },
                    _ => unavailable(error),
                });
            }
        };
        if ack.stream != name {
            return Err(HistoryError::Unavailable(
                format!("{topic:?} was stored by stream {}, not {name}", ack.stream).into(),
            ));
        }
        // A sequence not above the highest one seen: the stream may have been made anew (or
        // acknowledgements of concurrent appends arrived out of order: one info too many).
        let cached = self.lock().get_mut(&name).and_then(|e| {
            let fresh = ack.sequence > e.last;
            e.last = e.last.max(ack.sequence);
            fresh.then(|| e.epoch.clone())
        });
        let epoch = match cached {
            Some(epoch) => epoch,
            None => epoch_of(&self.info(&name).await?),
        };
        Ok(Appended {
            offset: ack.sequence,
            epoch,
        })
    }

    async fn state(&self, rule: &Rule) -> Result<State, HistoryError> {
        let info = self.info(&subject::history_stream(&rule.pattern)).await?;
        Ok(State {
            epoch: epoch_of(&info),
            last: info.state.last_sequence,
        })
    }

    async fn read(
        &self,
        rule: &Rule,
        namespace: &str,
        topic: &str,
        after: u64,
    ) -> Result<Read, HistoryError> {
        let name = subject::history_stream(&rule.pattern);
        let stream = self
            .js
            .get_stream_no_info(&name)
            .await
            .map_err(unavailable)?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .create_consumer(pull::Config {
                filter_subject: subject::history(namespace, topic.split('/')),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: after.saturating_add(1),
                },
                ack_policy: AckPolicy::None,
                memory_storage: true,
                inactive_threshold: READ_CONSUMER_IDLE,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                self.lock().remove(&name);
                unavailable(e)
            })?;
        let consumer_name = consumer.cached_info().name.clone();
        let mut pending = consumer.cached_info().num_pending;
        let mut messages = Vec::new();
        while pending > 0 {
            let want = usize::try_from(pending).map_or(READ_BATCH, |p| p.min(READ_BATCH));
            let mut batch = consumer
                .fetch()
                .max_messages(want)
                .messages()
                .await
                .map_err(unavailable)?;
            let mut got = 0;
            while let Some(message) = batch.next().await {
                let message = message.map_err(HistoryError::Unavailable)?;
                let info = message.info().map_err(HistoryError::Unavailable)?;
                pending = info.pending;
                let offset = info.stream_sequence;
                messages.push(Stored {
                    offset,
                    headers: stored_headers(message.headers.as_ref()),
                    payload: message.payload.clone(),
                });
                got += 1;
            }
            if got == 0 {
                // The server had nothing more after all (removed meanwhile).
                break;
            }
        }
        let (info, deleted) =
            futures::join!(stream.get_info(), stream.delete_consumer(&consumer_name));
        if let Err(error) = deleted {
            debug!(stream = name, %error, "read consumer not deleted; it expires by itself");
        }
        let info = info.map_err(|e| {
            self.lock().remove(&name);
            unavailable(e)
        })?;
        let epoch = self.remember(&info);
        let complete = info.state.first_sequence <= after.saturating_add(1)
            && u64::try_from(messages.len()).unwrap_or(u64::MAX) <= rule.size;
        Ok(Read {
            epoch,
            last: info.state.last_sequence,
            messages,
            complete,
        })
    }
}

impl HistoryStore for NatsHistory {
    fn ensure(&self, rules: &[Rule]) -> BoxFuture<'_, Result<(), HistoryError>> {
        let rules = rules.to_vec();
        Box::pin(async move { self.inner.ensure(&rules).await })
    }

    fn rules(&self) -> BoxFuture<'_, Result<Vec<Rule>, HistoryError>> {
        Box::pin(self.inner.rules())
    }

    fn append(
        &self,
        rule: &Rule,
        namespace: &str,
        topic: &str,
        headers: Headers,
        payload: Bytes,
    ) -> BoxFuture<'_, Result<Appended, HistoryError>> {
        let (rule, namespace, topic) = (rule.clone(), namespace.to_owned(), topic.to_owned());
        Box::pin(async move {
            self.inner
                .append(&rule, &namespace, &topic, headers, payload)
                .await
        })
    }

    fn state(&self, rule: &Rule) -> BoxFuture<'_, Result<State, HistoryError>> {
        let rule = rule.clone();
        Box::pin(async move { self.inner.state(&rule).await })
    }

    fn read(
        &self,
        rule: &Rule,
        namespace: &str,
        topic: &str,
        after: u64,
    ) -> BoxFuture<'_, Result<Read, HistoryError>> {
        let (rule, namespace, topic) = (rule.clone(), namespace.to_owned(), topic.to_owned());
        Box::pin(async move { self.inner.read(&rule, &namespace, &topic, after).await })
    }
}

/// The stream that keeps `rule`.
fn stream_config(rule: &Rule, replicas: usize) -> stream::Config {
    stream::Config {
        name: subject::history_stream(&rule.pattern),
        description: Some(format!("{DESCRIPTION_PREFIX}{}", rule.pattern)),
        subjects: subject::history_filter(&rule.pattern),
        max_messages_per_subject: i64::try_from(rule.size.saturating_add(1)).unwrap_or(i64::MAX),
        max_age: rule.ttl,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        allow_direct: true,
        num_replicas: replicas.max(1),
        republish: Some(Republish {
            source: format!("{}.>", subject::HISTORY_PREFIX),
            destination: format!("{}.>", subject::LIVE_PREFIX),
            headers_only: false,
        }),
        metadata: HashMap::from([(PATTERN_METADATA.to_owned(), rule.pattern.clone())]),
        ..Default::default()
    }
}

/// The rule a history stream keeps, from its configuration; `None` for a stream with our
/// prefix that we did not make.
fn rule_of(config: &stream::Config) -> Option<Rule> {
    let pattern = config.metadata.get(PATTERN_METADATA).cloned().or_else(|| {
        config
            .description
            .as_deref()?
            .strip_prefix(DESCRIPTION_PREFIX)
            .map(str::to_owned)
    })?;
    if subject::history_stream(&pattern) != config.name {
        return None;
    }
    let size = u64::try_from(config.max_messages_per_subject)
        .ok()?
        .checked_sub(1)
        .filter(|s| *s > 0)?;
    Some(Rule {
        pattern,
        size,
        ttl: config.max_age,
    })
}

/// A stream's epoch: its creation time in Unix nanoseconds.
fn epoch_of(info: &stream::Info) -> String {
    info.created.unix_timestamp_nanos().to_string()
}

/// The bytes `headers` take in a NATS message (`NATS/1.0\r\n`, `name: value\r\n`…, `\r\n`).
fn header_len(headers: &Headers) -> usize {
    if headers.is_empty() {
        return 0;
    }
    let lines: usize = headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
    "NATS/1.0\r\n\r\n".len() + lines
}

fn header_map(headers: &Headers) -> Result<HeaderMap, HistoryError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers.iter() {
        let invalid =
            || HistoryError::Unavailable(crate::BusError::InvalidHeader(name.to_owned()).into());
        let name = HeaderName::try_from(name).map_err(|_| invalid())?;
        let value: HeaderValue = value.parse().map_err(|_| invalid())?;
        map.insert(name, value);
    }
    Ok(map)
}

/// The headers a message was appended with: without the `Nats-*` ones JetStream adds.
fn stored_headers(map: Option<&HeaderMap>) -> Headers {
    let mut headers = Headers::default();
    for (name, values) in map.into_iter().flat_map(HeaderMap::iter) {
        let name = name.to_string();
        if name.starts_with("Nats-") {
            continue;
        }
        if let Some(value) = values.first() {
            headers.insert(name, value.as_str());
        }
    }
    headers
}

fn unavailable(error: impl std::error::Error + Send + Sync + 'static) -> HistoryError {
    HistoryError::Unavailable(Box::new(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, size: u64) -> Rule {
        Rule {
            pattern: pattern.into(),
            size,
            ttl: Duration::from_secs(300),
        }
    }

    fn history() -> stream::Config {
        stream_config(&rule("chat/#", 100), 1)
    }

    #[test]
    fn rules_come_back_from_stream_configs() {
        let config = history();
        assert_eq!(rule_of(&config), Some(rule("chat/#", 100)));
        // Servers before 2.10 keep no metadata: the description says it.
        let old = stream::Config {
            metadata: HashMap::new(),
            ..history()
        };
        assert_eq!(rule_of(&old), Some(rule("chat/#", 100)));
        // A stream with our prefix that we did not make.
        let foreign = stream::Config {
            name: subject::history_stream("other/#"),
            ..history()
        };
        assert_eq!(rule_of(&foreign), None);
        let unlimited = stream::Config {
            max_messages_per_subject: -1,
            ..history()
        };
        assert_eq!(rule_of(&unlimited), None);
        let bare = stream::Config {
            metadata: HashMap::new(),
            description: None,
            ..history()
        };
        assert_eq!(rule_of(&bare), None);
    }

    #[test]
    fn stored_headers_leave_out_jetstreams() {
        let mut map = HeaderMap::new();
        map.insert("Sb-Message-Id", "m1");
        map.insert("Nats-Sequence", "7");
        map.insert("Nats-Msg-Id", "x");
        let mut want = Headers::default();
        want.insert("Sb-Message-Id", "m1");
        assert_eq!(stored_headers(Some(&map)), want);
        assert_eq!(stored_headers(None), Headers::default());
    }

    #[test]
    fn header_bytes_as_on_the_wire() {
        assert_eq!(header_len(&Headers::default()), 0);
        let mut h = Headers::default();
        h.insert("A", "bc");
        assert_eq!(header_len(&h), "NATS/1.0\r\nA: bc\r\n\r\n".len());
    }
}
