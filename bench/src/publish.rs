//! Publishers, and the paced loop that drives them. Each message carries the publish time
//! (nanoseconds on the bench's clock) in its payload.
//!
//! | `--publish` | server | what one message is |
//! | --- | --- | --- |
//! | `ws://…` (switchboard) | edge | a WebSocket client on the route: `{"type":"publish","topic":"bench/t","payload":…}` |
//! | `grpc://host:port` (switchboard) | coordinator | `Messaging/Publish` (fanout) or `Messaging/Send` (send) |
//! | `nats://host:port` (switchboard) | coordinator | `{"username",…}` on the send subject (send only) |
//! | `nats://host:port` (nats) | nats-server | a plain NATS publish to `bench.t` |
//! | `ws://…/pub` (ws) | the Node peer | the payload as one text frame |

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use proto::v1::messaging_client::MessagingClient;
use proto::v1::{PublishRequest, SendRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Semaphore;

use crate::recv::{self, Clock, Flavor, NATS_SUBJECT, TOPIC};
use crate::ws::{self, WsUrl};

/// gRPC calls in flight at most; more wait (and lower the achieved rate, which is reported).
const GRPC_INFLIGHT: usize = 512;
/// The pacing tick.
const TICK: Duration = Duration::from_millis(1);
/// The namespace every scenario uses.
pub(crate) const NAMESPACE: &str = "default";
/// The frame `type` of targeted sends.
const SEND_TYPE: &str = "bench";
/// Publish payloads as bytes (`--binary`).
pub(crate) static BINARY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What a message is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The bench topic (fanout).
    Topic,
    /// One user (send).
    User,
}

#[derive(Debug)]
enum Kind {
    /// A WebSocket client; `sb` frames it as a Switchboard `publish`.
    Ws { w: OwnedWriteHalf, sb: bool },
    Grpc {
        client: MessagingClient<crate::common::Grpc>,
        permits: Arc<Semaphore>,
    },
    Nats {
        client: async_nats::Client,
        sb: bool,
    },
}

/// One publishing client.
#[derive(Debug)]
pub(crate) struct Publisher {
    kind: Kind,
    mode: Mode,
    size: usize,
    /// Calls or frames the server refused (gRPC errors, Switchboard `error` frames).
    errors: Rc<Cell<u64>>,
    buf: Vec<u8>,
}

/// Messages sent by one paced run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Published {
    pub(crate) total: u64,
    /// Stamped inside the measuring window.
    pub(crate) measured: u64,
}

impl Publisher {
    /// Connects to `target` (see the module table).
    pub(crate) async fn connect(
        target: &str,
        flavor: Flavor,
        mode: Mode,
        size: usize,
    ) -> anyhow::Result<Self> {
        let errors = Rc::new(Cell::new(0));
        let kind = if target.starts_with("ws://") {
            if mode == Mode::User {
                bail!("targeted sends go through grpc:// or nats://");
            }
            let url = WsUrl::parse(target)?;
            let (r, w) = match flavor {
                Flavor::Switchboard => recv::open(&url, flavor).await?,
                Flavor::Ws => {
                    let up = ws::connect(&url, recv::SETUP_TIMEOUT).await?;
                    recv::Conn {
                        stream: up.stream,
                        pending: up.rest,
                    }
                }
                Flavor::Nats => bail!("publish to nats-server with nats://"),
            }
            .stream
            .into_split();
            tokio::task::spawn_local(drain_replies(r, Rc::clone(&errors)));
            Kind::Ws {
                w,
                sb: flavor == Flavor::Switchboard,
            }
        } else if let Some(addr) = target.strip_prefix("grpc://") {
            if flavor != Flavor::Switchboard {
                bail!("grpc:// publishes to Switchboard only");
            }
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("cannot connect to gRPC at {addr}"))?;
            Kind::Grpc {
                client: MessagingClient::new(crate::common::with_api_key(channel)),
                permits: Arc::new(Semaphore::new(GRPC_INFLIGHT)),
            }
        } else if target.starts_with("nats://") {
            let sb = flavor == Flavor::Switchboard;
            if sb && mode == Mode::Topic {
                bail!("Switchboard topics are published through ws:// or grpc://");
            }
            let client = async_nats::connect(target)
                .await
                .with_context(|| format!("cannot connect to {target}"))?;
            Kind::Nats { client, sb }
        } else {
            bail!("{target}: --publish takes ws://, grpc:// or nats://");
        };
        Ok(Self {
            kind,
            mode,
            size,
            errors,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// How the messages travel, for the report.
    pub(crate) fn via(&self) -> &'static str {
        match (&self.kind, self.mode) {
            (Kind::Ws { sb: true, .. }, _) => "websocket publish frame",
            (Kind::Ws { sb: false, .. }, _) => "websocket text frame",
            (Kind::Grpc { .. }, Mode::Topic) => "grpc Messaging/Publish",
            (Kind::Grpc { .. }, Mode::User) => "grpc Messaging/Send",
            (Kind::Nats { sb: true, .. }, _) => "nats send subject",
            (Kind::Nats { sb: false, .. }, _) => "nats publish",
        }
    }

    pub(crate) fn errors(&self) -> u64 {
        self.errors.get()
    }

    /// Publishes at `rate` messages per second from now until the clock reads `until`;
    /// messages stamped in `[from, until)` are counted as measured. `user(i)` names the
    /// recipient of message `i` in [`Mode::User`].
    pub(crate) async fn paced(
        &mut self,
        clock: Clock,
        rate: f64,
        from: u64,
        until: u64,
        user: impl Fn(u64) -> String,
    ) -> anyhow::Result<Published> {
        let start = clock.now_ns();
        let mut next = tokio::time::Instant::now();
        let mut out = Published::default();
        let mut batch: Vec<(u64, String)> = Vec::new();
        loop {
            let now = clock.now_ns();
            if now >= until {
                break;
            }
            let due = ((now - start) as f64 * rate / 1e9) as u64;
            while out.total < due {
                let name = match self.mode {
                    Mode::User => user(out.total),
                    Mode::Topic => String::new(),
                };
                batch.push((now, name));
                out.total += 1;
                if now >= from {
                    out.measured += 1;
                }
            }
            if !batch.is_empty() {
                self.send(&batch).await?;
                batch.clear();
            }
            next += TICK;
            tokio::time::sleep_until(next.max(tokio::time::Instant::now())).await;
        }
        if let Kind::Nats { client, .. } = &self.kind {
            client.flush().await?;
        }
        Ok(out)
    }

    async fn send(&mut self, batch: &[(u64, String)]) -> anyhow::Result<()> {
        if BINARY.load(std::sync::atomic::Ordering::Relaxed)
            && !matches!(self.kind, Kind::Grpc { .. })
        {
            anyhow::bail!("--binary publishes through gRPC only (--publish grpc://…)");
        }
        let size = self.size;
        match &mut self.kind {
            Kind::Ws { w, sb } => {
                self.buf.clear();
                let mut body = Vec::with_capacity(size + 64);
                for (t, _) in batch {
                    body.clear();
                    if *sb {
                        body.extend_from_slice(
                            format!("{{\"type\":\"publish\",\"topic\":\"{TOPIC}\",\"payload\":")
                                .as_bytes(),
                        );
                        recv::payload(*t, size, &mut body);
                        body.push(b'}');
                    } else {
                        recv::payload(*t, size, &mut body);
                    }
                    ws::client_frame(ws::OP_TEXT, &body, &mut self.buf);
                }
                w.write_all(&self.buf).await?;
            }
            Kind::Grpc { client, permits } => {
                for (t, user) in batch {
                    let permit = Arc::clone(permits).acquire_owned().await?;
                    let mut body = Vec::with_capacity(size);
                    recv::payload(*t, size, &mut body);
                    let json = String::from_utf8(body).expect("payloads are ASCII");
                    let mut client = client.clone();
                    let errors = Rc::clone(&self.errors);
                    let mode = self.mode;
                    let user = user.clone();
                    let binary = BINARY.load(std::sync::atomic::Ordering::Relaxed);
                    tokio::task::spawn_local(async move {
                        let r = match mode {
                            Mode::Topic => client
                                .publish(PublishRequest {
                                    namespace: NAMESPACE.into(),
                                    topic: TOPIC.into(),
                                    payload: None,
                                    payload_binary: binary.then(|| json.as_bytes().to_vec()),
                                    payload_json: if binary { String::new() } else { json },
                                    message_id: String::new(),
                                    uncompressed: false,
                                })
                                .await
                                .map(drop),
                            Mode::User => client
                                .send(SendRequest {
                                    namespace: NAMESPACE.into(),
                                    user,
                                    conn_id: String::new(),
                                    r#type: SEND_TYPE.into(),
                                    payload: None,
                                    payload_binary: binary.then(|| json.as_bytes().to_vec()),
                                    payload_json: if binary { String::new() } else { json },
                                    message_id: String::new(),
                                    uncompressed: false,
                                })
                                .await
                                .map(drop),
                        };
                        if r.is_err() {
                            errors.set(errors.get() + 1);
                        }
                        drop(permit);
                    });
                }
            }
            Kind::Nats { client, sb } => {
                for (t, user) in batch {
                    let mut body = Vec::with_capacity(size + 96);
                    let subject = if *sb {
                        body.extend_from_slice(
                            format!(
                                "{{\"username\":\"{user}\",\"namespace\":\"{NAMESPACE}\",\
                                 \"type\":\"{SEND_TYPE}\",\"payload\":"
                            )
                            .as_bytes(),
                        );
                        recv::payload(*t, size, &mut body);
                        body.push(b'}');
                        proto::subject::DEFAULT_SEND
                    } else {
                        recv::payload(*t, size, &mut body);
                        NATS_SUBJECT
                    };
                    client.publish(subject, Bytes::from(body)).await?;
                }
            }
        }
        Ok(())
    }
}

/// Reads what the server says to the publisher (`published` acks) so that its outbound
/// queue never fills; counts `error` frames.
async fn drain_replies(mut r: tokio::net::tcp::OwnedReadHalf, errors: Rc<Cell<u64>>) {
    let mut buf = vec![0u8; 64 * 1024];
    let finder = memchr::memmem::Finder::new(b"\"type\":\"error\"");
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let found = finder.find_iter(&buf[..n]).count() as u64;
        if found > 0 {
            errors.set(errors.get() + found);
        }
    }
}
