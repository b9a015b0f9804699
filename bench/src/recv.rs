//! The receiving side: one task per connection on the load core's single thread, reading
//! raw frames into one big thread-local buffer, finding the publish timestamp in each
//! delivery, and recording publish→receive latency into one shared histogram.
//!
//! Per delivery the work is a frame header, a `memmem` for `"t":`, a few digits and a
//! histogram increment; the clock is read once per `read()`, not per frame.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use memchr::memmem;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::nats::NatsStream;
use crate::ws::{self, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_TEXT, WsUrl};

/// The one read buffer of the load thread.
const READ_BUF: usize = 256 * 1024;
/// Reads in a row on one connection before letting the others run.
const READS_PER_TURN: usize = 16;
/// Time allowed for one connection's upgrade and subscription.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// The Switchboard topic and the NATS subject the scenarios use.
pub(crate) const TOPIC: &str = "bench/t";
pub(crate) const NATS_SUBJECT: &str = "bench.t";

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUF]);
    /// Compressed deliveries are inflated here, one at a time (no context takeover).
    static INFLATE: RefCell<(flate2::Decompress, std::collections::HashMap<u64, Vec<u8>>)> =
        RefCell::new((flate2::Decompress::new(false), std::collections::HashMap::new()));
}

/// Bytes inflated of each compressed delivery: its envelope and the stamp.
const INFLATE_HEAD: usize = 160;

/// Payloads are realistic JSON (`--json-body`).
pub(crate) static JSON_BODY: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Which server the clients talk to, and so how deliveries are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Flavor {
    /// Switchboard: JSON frames, `{"type":"message","topic":…,"payload":{"t":…}}`.
    Switchboard,
    /// nats-server's WebSocket listener: NATS protocol (`MSG …`) inside WebSocket frames.
    Nats,
    /// A plain broadcast server (bench/peers/ws-broadcast.js): the payload as sent.
    Ws,
}

impl Flavor {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Switchboard => "switchboard",
            Self::Nats => "nats-server",
            Self::Ws => "node-ws",
        }
    }
}

/// Nanoseconds since the bench started: the clock every timestamp in a payload uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock(Instant);

impl Clock {
    pub(crate) fn new() -> Self {
        Self(Instant::now())
    }

    pub(crate) fn now_ns(self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The `Instant` of a timestamp.
    pub(crate) fn at(self, ns: u64) -> Instant {
        self.0 + Duration::from_nanos(ns)
    }
}

/// What all receivers add up. Single-threaded (the load runtime is current-thread).
#[derive(Debug)]
pub(crate) struct Sink {
    pub(crate) clock: Clock,
    finder: memmem::Finder<'static>,
    /// Deliveries of messages stamped in `[from, until)` are measured; others are counted
    /// as `outside` (warm-up, or stragglers of an earlier step).
    from: Cell<u64>,
    until: Cell<u64>,
    hist: RefCell<Histogram<u64>>,
    received: Cell<u64>,
    outside: Cell<u64>,
    /// Data frames without a timestamp (acks, session frames…).
    other: Cell<u64>,
    first_ns: Cell<u64>,
    last_ns: Cell<u64>,
    closes: RefCell<BTreeMap<u16, u64>>,
    /// Bytes read from the sockets since the window started.
    wire_bytes: Cell<u64>,
}

/// A snapshot of one measuring window.
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    pub(crate) received: u64,
    pub(crate) outside: u64,
    pub(crate) other: u64,
    /// When the first and the last measured delivery arrived.
    pub(crate) first_ns: u64,
    pub(crate) last_ns: u64,
    pub(crate) hist: Histogram<u64>,
    pub(crate) closes: BTreeMap<u16, u64>,
    pub(crate) wire_bytes: u64,
}

impl Sink {
    pub(crate) fn new(clock: Clock) -> Self {
        Self {
            clock,
            finder: memmem::Finder::new(b"\"t\":").into_owned(),
            from: Cell::new(u64::MAX),
            until: Cell::new(u64::MAX),
            hist: RefCell::new(new_histogram()),
            received: Cell::new(0),
            outside: Cell::new(0),
            other: Cell::new(0),
            first_ns: Cell::new(0),
            last_ns: Cell::new(0),
            closes: RefCell::new(BTreeMap::new()),
            wire_bytes: Cell::new(0),
        }
    }

    /// Starts a new window: counters and histogram reset (closes are kept).
    pub(crate) fn window(&self, from: u64, until: u64) {
        self.from.set(from);
        self.until.set(until);
        self.hist.borrow_mut().reset();
        self.received.set(0);
        self.outside.set(0);
        self.other.set(0);
        self.first_ns.set(0);
        self.last_ns.set(0);
        self.wire_bytes.set(0);
    }

    pub(crate) fn received(&self) -> u64 {
        self.received.get()
    }

    pub(crate) fn tally(&self) -> Tally {
        Tally {
            received: self.received.get(),
            outside: self.outside.get(),
            other: self.other.get(),
            first_ns: self.first_ns.get(),
            last_ns: self.last_ns.get(),
            hist: self.hist.borrow().clone(),
            closes: self.closes.borrow().clone(),
            wire_bytes: self.wire_bytes.get(),
        }
    }

    pub(crate) fn closed(&self, code: u16) {
        *self.closes.borrow_mut().entry(code).or_default() += 1;
    }

    /// One data payload that may carry a timestamp.
    #[inline]
    fn on_payload(&self, payload: &[u8], now: u64) {
        let Some(i) = self.finder.find(payload) else {
            self.other.set(self.other.get() + 1);
            return;
        };
        let mut t: u64 = 0;
        for &b in &payload[i + 4..] {
            if !b.is_ascii_digit() {
                break;
            }
            t = t.wrapping_mul(10).wrapping_add(u64::from(b - b'0'));
        }
        if t < self.from.get() || t >= self.until.get() {
            self.outside.set(self.outside.get() + 1);
            return;
        }
        if self.received.get() == 0 {
            self.first_ns.set(now);
        }
        self.received.set(self.received.get() + 1);
        self.last_ns.set(now);
        // In µs; saturates at the histogram's top instead of failing.
        self.hist
            .borrow_mut()
            .saturating_record(now.saturating_sub(t) / 1000);
    }
}

/// 1 µs .. 100 s at 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("constant bounds are valid")
}

/// An upgraded, subscribed connection, ready for [`receive`].
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) pending: Vec<u8>,
}

/// Upgrades and waits until the server confirms the connection: Switchboard answers
/// `session` to `init`, nats-server `PONG` to `CONNECT`+`PING`, the ws peer says `ok`.
pub(crate) async fn open(url: &WsUrl, flavor: Flavor) -> anyhow::Result<Conn> {
    let up = ws::connect(url, SETUP_TIMEOUT).await?;
    let (mut stream, rest) = (up.stream, up.rest);
    let pending = match flavor {
        Flavor::Switchboard => {
            stream.write_all(&ws::text("{\"type\":\"init\"}")).await?;
            ws::read_until(&mut stream, rest, SETUP_TIMEOUT, |p| {
                memmem::find(p, b"\"session\"").is_some()
            })
            .await?
        }
        Flavor::Nats => {
            let hello = "CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n";
            stream.write_all(&ws::text(hello)).await?;
            let mut nats = NatsStream::default();
            ws::read_until(&mut stream, rest, SETUP_TIMEOUT, |p| {
                nats.feed_control(p).pong
            })
            .await?
        }
        Flavor::Ws => ws::read_until(&mut stream, rest, SETUP_TIMEOUT, |p| p == b"ok").await?,
    };
    Ok(Conn { stream, pending })
}

/// [`open`], then subscribes to the bench topic and waits for the confirmation.
pub(crate) async fn subscribe(url: &WsUrl, flavor: Flavor) -> anyhow::Result<Conn> {
    let mut c = open(url, flavor).await?;
    let pending = std::mem::take(&mut c.pending);
    c.pending = match flavor {
        Flavor::Switchboard => {
            let sub = format!("{{\"type\":\"subscribe\",\"topic\":\"{TOPIC}\"}}");
            c.stream.write_all(&ws::text(&sub)).await?;
            let mut refused = None;
            let rest = ws::read_until(&mut c.stream, pending, SETUP_TIMEOUT, |p| {
                if memmem::find(p, b"\"subscribed\"").is_some() {
                    return true;
                }
                if memmem::find(p, b"\"error\"").is_some() {
                    refused = Some(String::from_utf8_lossy(p).into_owned());
                    return true;
                }
                false
            })
            .await?;
            if let Some(e) = refused {
                bail!("subscribe refused: {e}");
            }
            rest
        }
        Flavor::Nats => {
            let sub = format!("SUB {NATS_SUBJECT} 1\r\nPING\r\n");
            c.stream.write_all(&ws::text(&sub)).await?;
            let mut nats = NatsStream::default();
            ws::read_until(&mut c.stream, pending, SETUP_TIMEOUT, |p| {
                nats.feed_control(p).pong
            })
            .await?
        }
        // Every client of the broadcast server is a subscriber.
        Flavor::Ws => pending,
    };
    Ok(c)
}

/// The URL of client `name`: Switchboard's anonymous routes take the user from `?user=`.
pub(crate) fn client_url(url: &WsUrl, flavor: Flavor, name: &str) -> WsUrl {
    match flavor {
        Flavor::Switchboard => url.with_param("user", name),
        Flavor::Nats | Flavor::Ws => url.clone(),
    }
}

/// Opens `n` connections with at most `parallel` handshakes at once; `make(i)` opens
/// connection `i` (and says what it gives back: the connection, or what it learnt).
pub(crate) async fn open_many<T, F, Fut>(
    n: usize,
    parallel: usize,
    make: F,
) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    use futures::StreamExt as _;
    let results: Vec<anyhow::Result<T>> = futures::stream::iter(0..n)
        .map(make)
        .buffer_unordered(parallel)
        .collect()
        .await;
    let mut conns = Vec::with_capacity(n);
    for (i, r) in results.into_iter().enumerate() {
        conns.push(r.with_context(|| format!("connection {i} of {n}"))?);
    }
    Ok(conns)
}

enum Step {
    /// The read filled the buffer: there may be more.
    Again,
    /// Nothing more to read for now (readiness cleared).
    Wait,
    End,
}

/// Reads deliveries until the connection ends.
pub(crate) async fn receive(conn: Conn, flavor: Flavor, sink: Rc<Sink>) {
    let Conn {
        stream,
        mut pending,
    } = conn;
    let mut nats = NatsStream::default();
    loop {
        if stream.readable().await.is_err() {
            sink.closed(1006);
            return;
        }
        let mut reads = 0;
        loop {
            let step = BUF.with_borrow_mut(|buf| {
                read_once(&stream, buf, &mut pending, &mut nats, flavor, &sink)
            });
            match step {
                Step::Again => {}
                Step::Wait => break,
                Step::End => return,
            }
            reads += 1;
            if reads == READS_PER_TURN {
                tokio::task::yield_now().await;
                break;
            }
        }
    }
}

/// One `read()`. After a short read the receive queue is known to be empty, so readiness
/// is cleared right away (by answering `WouldBlock` inside `try_io`), saving the `read()`
/// that would only return `EAGAIN`: one syscall per wake-up instead of two.
fn read_once(
    stream: &TcpStream,
    buf: &mut [u8],
    pending: &mut Vec<u8>,
    nats: &mut NatsStream,
    flavor: Flavor,
    sink: &Sink,
) -> Step {
    let kept = pending.len();
    if kept >= buf.len() {
        // A frame larger than the read buffer: not something these servers send.
        sink.closed(1009);
        return Step::End;
    }
    buf[..kept].copy_from_slice(pending);
    let space = buf.len() - kept;
    let mut got = None;
    let read = stream.try_io(Interest::READABLE, || {
        let n = stream.try_read(&mut buf[kept..])?;
        got = Some(n);
        if n > 0 && n < space {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    let n = match (got, read) {
        (Some(0), _) => {
            sink.closed(1006);
            return Step::End;
        }
        (Some(n), _) => n,
        (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
        (None, _) => {
            sink.closed(1006);
            return Step::End;
        }
    };
    let drained = n < space;
    sink.wire_bytes.set(sink.wire_bytes.get() + n as u64);
    let data = &buf[..kept + n];
    let now = sink.clock.now_ns();
    let mut pos = 0;
    let mut end = false;
    let mut pong: Option<Vec<u8>> = None;
    while let Some(h) = ws::header(&data[pos..]) {
        if data.len() - pos < h.total() {
            break;
        }
        let payload = &data[pos + h.len..pos + h.total()];
        pos += h.total();
        match (h.opcode, flavor) {
            (OP_TEXT | OP_BINARY | OP_CONTINUATION, Flavor::Nats) => {
                let ping = nats.feed(payload, |m| sink.on_payload(m, now));
                if ping {
                    pong.get_or_insert_with(Vec::new)
                        .extend_from_slice(&ws::text("PONG\r\n"));
                }
            }
            // Only the head of a compressed delivery is inflated: the stamp is in its first
            // bytes, and the load core must not be the limit (the tests check the content).
            // Every subscriber gets the same compressed bytes: each distinct message is
            // inflated once, the others find its head by the bytes' hash.
            (OP_TEXT | OP_BINARY, _) if h.rsv1 => INFLATE.with_borrow_mut(|(d, heads)| {
                let key = {
                    use std::hash::{BuildHasher as _, BuildHasherDefault};
                    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                        .hash_one(payload)
                };
                if heads.len() > 4096 {
                    heads.clear();
                }
                let head = heads.entry(key).or_insert_with(|| {
                    let mut out = Vec::with_capacity(INFLATE_HEAD);
                    d.reset(false);
                    let _ = d.decompress_vec(payload, &mut out, flate2::FlushDecompress::None);
                    out
                });
                sink.on_payload(head, now);
            }),
            (OP_TEXT | OP_BINARY | OP_CONTINUATION, _) => sink.on_payload(payload, now),
            (OP_PING, _) => {
                ws::client_frame(0xA, payload, pong.get_or_insert_with(Vec::new));
            }
            (OP_CLOSE, _) => {
                sink.closed(ws::close_code(payload));
                end = true;
                break;
            }
            _ => {}
        }
    }
    if let Some(p) = pong {
        // Tiny and rare (heartbeats): a full socket buffer would only lose a pong.
        let _ = stream.try_write(&p);
    }
    pending.clear();
    pending.extend_from_slice(&data[pos..]);
    match (end, drained) {
        (true, _) => Step::End,
        (false, true) => Step::Wait,
        (false, false) => Step::Again,
    }
}

/// A payload of exactly `size` bytes (at least 32): `{"t":<ns>,"pad":"xx…"}`, or with
/// `--json-body` `{"t":<ns>,"items":[{records…}],"pad":"xx…"}`.
pub(crate) fn payload(t: u64, size: usize, out: &mut Vec<u8>) {
    use std::io::Write as _;
    let start = out.len();
    let _ = write!(out, "{{\"t\":{t},");
    if JSON_BODY.load(std::sync::atomic::Ordering::Relaxed) {
        const STATUS: [&str; 4] = ["active", "pending", "shipped", "returned"];
        let _ = write!(out, "\"items\":[");
        let mut i = 0u64;
        // Records until about 120 bytes are left for the last one and the padding.
        while out.len() - start + 120 < size {
            let v = t.wrapping_mul(2_654_435_761).wrapping_add(i * 97) % 100_000;
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(
                out,
                "{sep}{{\"id\":{},\"sku\":\"SKU-{v:05}\",\"status\":\"{}\",\"price\":{}.{:02},\"qty\":{}}}",
                v + i,
                STATUS[(v % 4) as usize],
                v % 500,
                v % 100,
                v % 7 + 1
            );
            i += 1;
        }
        let _ = write!(out, "],");
    }
    let _ = write!(out, "\"pad\":\"");
    let used = out.len() - start + 2;
    out.extend(std::iter::repeat_n(b'x', size.saturating_sub(used)));
    out.extend_from_slice(b"\"}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_size_and_the_stamp() {
        let mut p = Vec::new();
        payload(123_456_789, 100, &mut p);
        assert_eq!(p.len(), 100);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["t"], 123_456_789);
    }

    #[test]
    fn sink_measures_inside_the_window_only() {
        let sink = Sink::new(Clock::new());
        sink.window(1_000, 2_000_000);
        let frame = br#"{"type":"message","topic":"bench/t","payload":{"t":1500,"pad":"x"}}"#;
        sink.on_payload(frame, 501_500);
        sink.on_payload(br#"{"t":999}"#, 501_500);
        sink.on_payload(br#"{"type":"subscribed"}"#, 501_500);
        let t = sink.tally();
        assert_eq!((t.received, t.outside, t.other), (1, 1, 1));
        assert_eq!(t.hist.max(), 500);
    }
}
