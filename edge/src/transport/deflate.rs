//! permessage-deflate (RFC 7692) in the edge's own framing: tungstenite 0.30 has no
//! extension support (it fails every frame with RSV1 set), so the edge negotiates the
//! extension itself, compresses what it writes, and inflates what clients send before
//! tungstenite reads it.
//!
//! * **Negotiation** ([`negotiate`]): the first acceptable offer of `Sec-WebSocket-Extensions`
//!   is answered `permessage-deflate; server_no_context_takeover; client_no_context_takeover`.
//!   Neither side keeps a sliding window between messages, so a message for N subscribers is
//!   compressed once (once per window size in use) and the same bytes go to all N, and an
//!   idle connection holds no compression state at all. An offer that names
//!   `server_max_window_bits` (8 to 15) is accepted with that limit, repeated in the answer
//!   ([`Agreement`]); `client_max_window_bits` is accepted with any valid value (the inflater
//!   reads every window size).
//! * **Writing** ([`compress`]): one compressor per thread, reset for each message (no
//!   context takeover); the trailing `00 00 ff ff` of the sync flush is cut (RFC 7692 §7.2.1).
//!   Under a window below 32 KiB, each piece of the window's size is compressed after a full
//!   flush (which forgets the data before it), so no match reaches further back than the
//!   client's window: miniz_oxide has one window size, and zlib none below 512 bytes.
//! * **Reading** ([`Inflate`]): a filter between the socket and tungstenite. It parses the
//!   client's frames; frames without RSV1 pass through unchanged; a compressed message (RSV1
//!   on its first frame, fragmented or not) is unmasked and inflated as it arrives, bounded by
//!   the route's `max_payload` (a message that inflates past it ends the connection with 1009
//!   before more than that is allocated: no zip bombs), and handed on as one plain frame.
//!   Control frames in between pass at once. RSV1 anywhere else (a control frame, a
//!   continuation) is passed on for tungstenite to refuse, and an undecodable stream becomes
//!   a frame tungstenite refuses: the connection fails, as RFC 7692 §8.2.3 asks.
//!
//! **Invariant:** the inflater and the inflated message exist only while a compressed message
//! is being received; their bytes are charged to the route's [`Budget`], and past the budget
//! new connections are not offered compression.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The window the edge compresses with for a connection, as `server_max_window_bits`: 15
/// (32 KiB) unless the client's offer limits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window(u8);

impl Default for Window {
    fn default() -> Self {
        Self::LARGEST
    }
}

impl Window {
    const LARGEST: Self = Self(15);

    fn bytes(self) -> usize {
        1 << self.0
    }
}

/// What the edge agreed to with a client's offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Agreement {
    /// The window compressed messages keep within.
    pub(crate) window: Window,
    /// Whether the offer named `server_max_window_bits` (even 15): the answer must repeat
    /// it then (RFC 7692 §7.1.2.1), and must not otherwise.
    window_named: bool,
}

impl Agreement {
    /// The extension's answer in the 101 response.
    pub(crate) fn response(self) -> String {
        let mut answer =
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover".to_owned();
        if self.window_named {
            answer.push_str(&format!("; server_max_window_bits={}", self.window.0));
        }
        answer
    }
}

/// What an inflater costs while a message is being inflated: miniz_oxide's state with its
/// 32 KiB window, rounded up.
const INFLATER_BYTES: usize = 48 * 1024;

/// Bytes read from the socket per read while a connection is filtered.
const READ_CHUNK: usize = 4096;

/// The agreement on the first acceptable offer of a request's `Sec-WebSocket-Extensions`
/// header values, or `None` when no offer is acceptable (then the connection runs
/// uncompressed).
pub(crate) fn negotiate<'a>(headers: impl IntoIterator<Item = &'a str>) -> Option<Agreement> {
    headers
        .into_iter()
        .flat_map(|h| h.split(','))
        .find_map(acceptable)
}

/// What one offer (`permessage-deflate; param; param=value`) agrees to, if it can be
/// accepted.
fn acceptable(offer: &str) -> Option<Agreement> {
    let mut parts = offer.split(';').map(str::trim);
    if parts.next() != Some("permessage-deflate") {
        return None;
    }
    let mut agreement = Agreement {
        window: Window::LARGEST,
        window_named: false,
    };
    let mut seen: Vec<&str> = Vec::new();
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (param, None),
        };
        if seen.contains(&name) {
            return None; // RFC 7692 §7: a repeated parameter declines the offer
        }
        seen.push(name);
        let ok = match (name, value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => true,
            ("server_max_window_bits", Some(v)) => match window_bits(v) {
                Some(bits) => {
                    agreement.window = Window(bits);
                    agreement.window_named = true;
                    true
                }
                None => false,
            },
            ("client_max_window_bits", None) => true,
            ("client_max_window_bits", Some(v)) => window_bits(v).is_some(),
            _ => false,
        };
        if !ok {
            return None;
        }
    }
    Some(agreement)
}

/// A window-bits value as RFC 7692 §7.1.2 writes it: 8 to 15 in digits without a leading
/// zero, quoted or not; anything else declines the offer (§7).
fn window_bits(value: &str) -> Option<u8> {
    let digits = match value.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"')?,
        None => value,
    };
    if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|bits| (8..=15).contains(bits))
}

thread_local! {
    static COMPRESSOR: RefCell<Compress> = RefCell::new(Compress::new(Compression::default(), false));
}

/// `message` compressed as one permessage-deflate message (no context takeover) for a
/// client whose window is `window`.
///
/// The output buffer is made large enough for each piece and its flush at once (deflate's
/// worst case: the input stored, 5 bytes per block of at most 64 KiB, plus the flush), so
/// one call does it: feeding miniz_oxide an output buffer that filled up in the middle of a
/// sync flush lost part of a message (Autobahn 12.2.9 and 12.2.14, and the test
/// `compressed_messages_of_every_size_and_ratio_round_trip`). Another call is made only if
/// that bound were ever short.
pub(crate) fn compress(message: &[u8], window: Window) -> Vec<u8> {
    // The compressor's own window is 32 KiB: a smaller one is kept by compressing each
    // piece of its size after a full flush, which forgets everything before it.
    let (piece, flush) = match window {
        Window::LARGEST => (message.len().max(1), FlushCompress::Sync),
        _ => (window.bytes(), FlushCompress::Full),
    };
    let room = |len: usize| len + 5 * (len / 16_384 + 1) + 64;
    COMPRESSOR.with_borrow_mut(|c| {
        c.reset();
        let pieces = message.len().div_ceil(piece).max(1);
        let mut out = Vec::with_capacity(room(message.len()) + 64 * (pieces - 1));
        for mut input in message
            .chunks(piece)
            .chain(message.is_empty().then_some(message))
        {
            loop {
                if out.capacity() - out.len() < room(input.len()) {
                    out.reserve(room(input.len()));
                }
                let before = c.total_in();
                c.compress_vec(input, &mut out, flush)
                    .expect("deflate of a complete buffer cannot fail");
                input = &input[(c.total_in() - before) as usize..];
                if input.is_empty() && out.capacity() - out.len() >= 16 {
                    break;
                }
                out.reserve(out.capacity());
            }
        }
        if out.ends_with(&[0, 0, 0xff, 0xff]) {
            out.truncate(out.len() - 4);
        }
        // Queued for many connections: no more memory than the bytes need.
        out.shrink_to_fit();
        out
    })
}

/// A read's error when a client began a compressed message while its route's compression
/// budget was spent: the connection ends with 1013 (try again later).
#[derive(Debug, thiserror::Error)]
#[error("the route's compression memory budget is spent")]
pub(crate) struct OverBudget;

/// A route's memory budget for compression state (`compression.memory_budget`).
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Whether a new connection may be offered compression.
    pub(crate) fn admits(&self) -> bool {
        self.used.load(Ordering::Relaxed) < self.limit
    }

    /// Bytes of compression state held now.
    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The read side of a connection, inflating client messages when the extension is on.
#[derive(Debug)]
pub(crate) struct Inflate<S> {
    inner: S,
    filter: Option<Box<Filter>>,
}

impl<S> Inflate<S> {
    /// A connection without the extension: reads pass straight through.
    pub(crate) fn plain(inner: S) -> Self {
        Self {
            inner,
            filter: None,
        }
    }

    /// A connection with the extension, messages bounded by `max` bytes inflated; `rest` is
    /// what was read after the request head.
    pub(crate) fn deflate(inner: S, max: usize, budget: Arc<Budget>, rest: &[u8]) -> Self {
        let mut filter = Box::new(Filter::new(max, budget));
        filter.feed(rest);
        Self {
            inner,
            filter: Some(filter),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Inflate<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(filter) = this.filter.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        loop {
            if filter.take_out(buf) {
                return Poll::Ready(Ok(()));
            }
            if filter.over_budget {
                return Poll::Ready(Err(io::Error::other(OverBudget)));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            filter.feed(read.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inflate<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The frame filter: client bytes in, bytes for tungstenite out (pure; no I/O).
#[derive(Debug)]
pub(crate) struct Filter {
    max: usize,
    budget: Arc<Budget>,
    /// The frame header being read (at most 14 bytes).
    head: [u8; 14],
    head_len: usize,
    stage: Stage,
    /// The data message in progress, if fragmented or compressed.
    message: Message,
    /// Bytes for tungstenite, from `out_at` on.
    out: Vec<u8>,
    out_at: usize,
    /// While a compressed message arrives.
    inflating: Option<Box<Inflating>>,
    /// A compressed message began while the budget was spent: the connection ends.
    over_budget: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Header,
    /// Payload bytes passed on unchanged.
    Pass {
        left: u64,
    },
    /// Payload bytes of a compressed message: unmasked and inflated.
    Inflate {
        left: u64,
        mask: [u8; 4],
        at: usize,
        fin: bool,
    },
    /// The connection failed; what follows is dropped.
    Dead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Message {
    None,
    /// A fragmented message without compression: its continuations pass.
    Plain,
    /// A compressed message with this opcode.
    Deflated(u8),
}

#[derive(Debug)]
struct Inflating {
    inflater: Decompress,
    /// Compressed bytes received.
    taken: usize,
    inflated: Vec<u8>,
    /// What is charged to the budget for this message.
    charged: usize,
}

impl Filter {
    pub(crate) fn new(max: usize, budget: Arc<Budget>) -> Self {
        Self {
            max,
            budget,
            head: [0; 14],
            head_len: 0,
            stage: Stage::Header,
            message: Message::None,
            out: Vec::new(),
            out_at: 0,
            inflating: None,
            over_budget: false,
        }
    }

    /// Copies pending output into `buf`; whether there was any.
    fn take_out(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let pending = &self.out[self.out_at..];
        if pending.is_empty() || buf.remaining() == 0 {
            return false;
        }
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        self.out_at += n;
        if self.out_at == self.out.len() {
            self.out.clear();
            self.out_at = 0;
            // An idle connection keeps no buffer beyond a few frames' worth.
            if self.out.capacity() > 4096 {
                self.out = Vec::new();
            }
        }
        true
    }

    /// Everything pending for tungstenite (tests).
    #[cfg(test)]
    fn drain(&mut self) -> Vec<u8> {
        let out = self.out[self.out_at..].to_vec();
        self.out.clear();
        self.out_at = 0;
        out
    }

    /// Takes bytes from the client.
    pub(crate) fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match self.stage {
                Stage::Dead => return,
                Stage::Header => {
                    let need = self.header_len();
                    let take = (need - self.head_len).min(input.len());
                    self.head[self.head_len..self.head_len + take].copy_from_slice(&input[..take]);
                    self.head_len += take;
                    input = &input[take..];
                    if self.head_len == self.header_len() {
                        self.on_header();
                    }
                }
                Stage::Pass { left } => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    self.out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.stage = Stage::Pass {
                        left: left - n as u64,
                    };
                    if left == n as u64 {
                        self.stage = Stage::Header;
                    }
                }
                Stage::Inflate {
                    left,
                    mask,
                    at,
                    fin,
                } => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    let mut chunk = [0u8; READ_CHUNK];
                    let n = n.min(chunk.len());
                    for (i, (c, b)) in chunk.iter_mut().zip(&input[..n]).enumerate() {
                        *c = b ^ mask[(at + i) % 4];
                    }
                    input = &input[n..];
                    let left = left - n as u64;
                    self.stage = Stage::Inflate {
                        left,
                        mask,
                        at: (at + n) % 4,
                        fin,
                    };
                    if !self.inflate(&chunk[..n]) {
                        return;
                    }
                    if left == 0 {
                        self.stage = Stage::Header;
                        if fin {
                            self.finish_message();
                        }
                    }
                }
            }
        }
        // A frame with an empty payload ends at its header.
        if let Stage::Pass { left: 0 } = self.stage {
            self.stage = Stage::Header;
        }
        if let Stage::Inflate {
            left: 0, fin: true, ..
        } = self.stage
        {
            self.stage = Stage::Header;
            self.finish_message();
        }
    }

    /// The length of the header being read, as far as its first bytes tell.
    fn header_len(&self) -> usize {
        if self.head_len < 2 {
            return 2;
        }
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.head[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn on_header(&mut self) {
        let head = &self.head[..self.head_len];
        let (b0, b1) = (head[0], head[1]);
        let fin = b0 & 0x80 != 0;
        let rsv1 = b0 & 0x40 != 0;
        let others = b0 & 0x30 != 0;
        let opcode = b0 & 0x0f;
        let masked = b1 & 0x80 != 0;
        let len = match b1 & 0x7f {
            126 => u64::from(u16::from_be_bytes([head[2], head[3]])),
            127 => u64::from_be_bytes(head[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        };
        // An unmasked frame has no mask (tungstenite refuses it once passed on).
        let mask: [u8; 4] = match masked {
            true => head[self.head_len - 4..]
                .try_into()
                .expect("four bytes of mask"),
            false => [0; 4],
        };
        self.head_len = 0;
        let control = opcode & 0x08 != 0;
        let starts = opcode == 1 || opcode == 2;
        match self.message {
            Message::Deflated(_) if control && !rsv1 => {}
            // Inside a compressed message only plain masked continuations may come.
            Message::Deflated(_) if opcode != 0 || rsv1 || others || !masked => {
                return self.poison();
            }
            Message::Deflated(_) => {
                return self.start_inflate(len, mask, fin);
            }
            // Past the budget no new inflater is made: the connection ends (1013).
            Message::None if starts && rsv1 && !others && masked && !self.budget.admits() => {
                self.over_budget = true;
                return self.die();
            }
            Message::None if starts && rsv1 && !others && masked => {
                self.message = Message::Deflated(opcode);
                self.inflating = Some(self.new_inflating());
                return self.start_inflate(len, mask, fin);
            }
            Message::None if starts && !fin => self.message = Message::Plain,
            Message::Plain if opcode == 0 && fin => self.message = Message::None,
            _ => {}
        }
        // Passed on as it came: tungstenite checks everything else.
        self.out.extend_from_slice(head);
        self.stage = Stage::Pass { left: len };
    }

    fn new_inflating(&self) -> Box<Inflating> {
        self.budget.charge(INFLATER_BYTES);
        Box::new(Inflating {
            inflater: Decompress::new(false),
            taken: 0,
            inflated: Vec::new(),
            charged: INFLATER_BYTES,
        })
    }

    fn start_inflate(&mut self, len: u64, mask: [u8; 4], fin: bool) {
        self.stage = Stage::Inflate {
            left: len,
            mask,
            at: 0,
            fin,
        };
    }

    /// Inflates `input` into the message; false when the connection failed.
    fn inflate(&mut self, mut input: &[u8]) -> bool {
        // Sync: everything the inflater can give goes out now (none kept back inside it),
        // so "it produced less than there was room for" means it is done with this input.
        let flush = FlushDecompress::Sync;
        let max = self.max;
        let Some(m) = self.inflating.as_mut() else {
            self.poison();
            return false;
        };
        m.taken += input.len();
        // Compressed input beyond what any message within the bound needs.
        if m.taken > max + max / 64 + 1024 {
            self.too_big();
            return false;
        }
        loop {
            if m.inflated.capacity() - m.inflated.len() < 1024 {
                let grow = m.inflated.capacity().clamp(4096, 1 << 20);
                // Exact: `reserve` may double, past the bound.
                m.inflated
                    .reserve_exact(grow.min(max + 1 - m.inflated.len().min(max)));
            }
            let room = m.inflated.capacity() - m.inflated.len();
            let before = (m.inflater.total_in(), m.inflater.total_out());
            let status = m.inflater.decompress_vec(input, &mut m.inflated, flush);
            let taken = (m.inflater.total_in() - before.0) as usize;
            let produced = (m.inflater.total_out() - before.1) as usize;
            input = &input[taken..];
            if m.inflated.len() > max {
                self.too_big();
                return false;
            }
            match status {
                Err(_) => {
                    self.poison();
                    return false;
                }
                Ok(Status::StreamEnd) => break,
                Ok(_) if input.is_empty() && produced < room => break,
                // No progress with input left and room to spare: not a stream we can read.
                Ok(_) if taken == 0 && produced == 0 && room > 0 && !input.is_empty() => {
                    self.poison();
                    return false;
                }
                Ok(_) if taken == 0 && produced == 0 => break,
                Ok(_) => {}
            }
        }
        let charge = m.inflated.capacity();
        if charge > m.charged - INFLATER_BYTES {
            self.budget.charge(charge - (m.charged - INFLATER_BYTES));
            m.charged = INFLATER_BYTES + charge;
        }
        true
    }

    /// The compressed message is complete: hand it on as one plain, masked frame.
    fn finish_message(&mut self) {
        let Message::Deflated(opcode) = self.message else {
            return;
        };
        if !self.inflate(&[0, 0, 0xff, 0xff]) {
            return;
        }
        self.message = Message::None;
        let Some(m) = self.inflating.take() else {
            return;
        };
        self.budget.release(m.charged);
        let payload = m.inflated;
        let len = payload.len();
        self.out.push(0x80 | opcode);
        if len < 126 {
            self.out.push(0x80 | len as u8);
        } else if let Ok(n) = u16::try_from(len) {
            self.out.push(0x80 | 126);
            self.out.extend_from_slice(&n.to_be_bytes());
        } else {
            self.out.push(0x80 | 127);
            self.out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        // A zero mask: the payload reads as it is.
        self.out.extend_from_slice(&[0; 4]);
        self.out.extend_from_slice(&payload);
    }

    /// A message that inflates past the bound: a frame header claiming one byte more than
    /// the bound, which tungstenite refuses as too big (1009) before reading its payload.
    fn too_big(&mut self) {
        let Message::Deflated(opcode) = self.message else {
            return self.poison();
        };
        self.out.push(0x80 | opcode);
        self.out.push(0x80 | 127);
        self.out
            .extend_from_slice(&(self.max as u64 + 1).to_be_bytes());
        self.out.extend_from_slice(&[0; 4]);
        self.die();
    }

    /// A frame tungstenite refuses (RSV2 set): the connection fails.
    fn poison(&mut self) {
        self.out
            .extend_from_slice(&[0x80 | 0x20 | 0x01, 0x80, 0, 0, 0, 0]);
        self.die();
    }

    fn die(&mut self) {
        self.stage = Stage::Dead;
        if let Some(m) = self.inflating.take() {
            self.budget.release(m.charged);
        }
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        if let Some(m) = self.inflating.take() {
            self.budget.release(m.charged);
        }
    }
}

#[cfg(test)]
mod tests {
    use miniz_oxide::inflate::TINFLStatus;

    use super::*;

    fn inflate_all(compressed: &[u8]) -> Vec<u8> {
        let mut d = Decompress::new(false);
        let mut input = compressed.to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(1 << 20);
        d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        out
    }

    /// `compressed` inflated with a window of 2^`bits` bytes: the inflater's output buffer is
    /// the window and wraps, so a match reaching further back fails the stream (or would
    /// read bytes the window no longer holds, and differ from the message).
    fn inflate_within(compressed: &[u8], bits: u8) -> Result<Vec<u8>, TINFLStatus> {
        use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
        let mut input = compressed.to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut input = &input[..];
        let mut window = vec![0u8; 1 << bits];
        let mut at = 0;
        let mut out = Vec::new();
        let mut d = DecompressorOxide::new();
        loop {
            let (status, read, written) = decompress(
                &mut d,
                input,
                &mut window,
                at,
                inflate_flags::TINFL_FLAG_HAS_MORE_INPUT,
            );
            out.extend_from_slice(&window[at..at + written]);
            at = (at + written) % window.len();
            input = &input[read..];
            match status {
                TINFLStatus::HasMoreOutput => {}
                TINFLStatus::NeedsMoreInput if input.is_empty() => return Ok(out),
                other => return Err(other),
            }
        }
    }

    #[test]
    fn the_window_inflater_sees_a_match_beyond_its_window() {
        // Proof that `inflate_within` can fail: 32 KiB-window output read with 2^8 bytes.
        let mut m: Vec<u8> = (0..=255).collect();
        m.extend((0..=255u8).rev());
        m.extend(0..=255u8);
        let c = compress(&m, Window::LARGEST);
        assert_eq!(inflate_within(&c, 15), Ok(m.clone()));
        assert_ne!(inflate_within(&c, 8), Ok(m));
    }

    #[test]
    fn compressed_messages_of_every_size_and_ratio_round_trip() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..600u64 {
            let window = Window(8 + (round % 8) as u8);
            let size = 1000 + (next() % 70000) as usize;
            let p = 30 + (round % 50); // percent of random bytes
            let mut m = Vec::with_capacity(size);
            while m.len() < size {
                let r = next();
                if r % 100 < p {
                    m.push((r >> 8) as u8);
                } else {
                    m.push(b'a' + (r % 3) as u8);
                }
            }
            let c = compress(&m, window);
            let back = inflate_within(&c, window.0).unwrap();
            assert_eq!(
                back.len(),
                m.len(),
                "round {round}, {size} bytes, {p}% random, {window:?}"
            );
            assert!(back == m, "round {round}, {window:?}");
        }
    }

    /// A masked client frame.
    fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = vec![first];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n < 65536 {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// Reads back one frame the filter handed on: (first byte, payload unmasked).
    fn parse(out: &[u8]) -> (u8, Vec<u8>, usize) {
        let (b0, b1) = (out[0], out[1]);
        let (len, mut at) = match b1 & 0x7f {
            126 => (u16::from_be_bytes([out[2], out[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let mask: [u8; 4] = out[at..at + 4].try_into().unwrap();
        at += 4;
        let payload: Vec<u8> = out[at..at + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        (b0, payload, at + len)
    }

    fn filter(max: usize) -> (Filter, Arc<Budget>) {
        let budget = Arc::new(Budget::new(1 << 30));
        (Filter::new(max, Arc::clone(&budget)), budget)
    }

    #[test]
    fn offers_are_accepted_or_declined_by_their_parameters() {
        let n = |h: &str| negotiate([h]).map(|a| (a.window.0, a.window_named));
        assert_eq!(n("permessage-deflate"), Some((15, false)));
        assert_eq!(
            n("permessage-deflate; client_max_window_bits"),
            Some((15, false))
        );
        assert_eq!(
            n("permessage-deflate; client_max_window_bits=10; server_no_context_takeover"),
            Some((15, false))
        );
        assert_eq!(
            n("permessage-deflate; server_max_window_bits=10"),
            Some((10, true))
        );
        assert_eq!(
            n("permessage-deflate; server_max_window_bits=\"9\""),
            Some((9, true)),
            "a quoted value"
        );
        assert_eq!(
            n("permessage-deflate; server_max_window_bits=7, permessage-deflate"),
            Some((15, false)),
            "the second offer is acceptable"
        );
        assert_eq!(
            n("permessage-deflate; server_max_window_bits=15"),
            Some((15, true))
        );
        assert_eq!(
            n("permessage-deflate; server_max_window_bits=8"),
            Some((8, true))
        );
        for bad in ["", "16", "08", "+8", "\"8", "8\"", "9x", "\"\""] {
            let offer = format!("permessage-deflate; server_max_window_bits={bad}");
            assert_eq!(n(&offer), None, "{offer}");
            let offer = format!("permessage-deflate; client_max_window_bits={bad}");
            assert_eq!(n(&offer), None, "{offer}");
        }
        assert_eq!(n("permessage-deflate; server_max_window_bits"), None);
        assert_eq!(n("permessage-deflate; client_max_window_bits=7"), None);
        assert_eq!(n("permessage-deflate; server_no_context_takeover=1"), None);
        assert_eq!(n("permessage-deflate; mystery"), None);
        assert_eq!(
            n("permessage-deflate; client_no_context_takeover; client_no_context_takeover"),
            None
        );
        assert_eq!(n("x-webkit-deflate-frame"), None);
        assert_eq!(negotiate([]), None);
    }

    #[test]
    fn the_answer_repeats_a_window_limit_the_offer_named() {
        let plain = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        let answer = |offer: &str| negotiate([offer]).unwrap().response();
        assert_eq!(answer("permessage-deflate"), plain);
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=8"),
            format!("{plain}; server_max_window_bits=8")
        );
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=15"),
            format!("{plain}; server_max_window_bits=15")
        );
    }

    #[test]
    fn a_small_window_keeps_every_match_within_it() {
        // 256 random bytes eight times over: compressible only by reaching 256 bytes back.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let block: Vec<u8> = (0..256)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let message = block.repeat(8);
        let wide = compress(&message, Window::LARGEST);
        let w8 = compress(&message, Window(8));
        let w9 = compress(&message, Window(9));
        assert_eq!(inflate_all(&wide), message);
        assert_eq!(inflate_within(&w8, 8).as_ref(), Ok(&message));
        assert_eq!(inflate_within(&w9, 9).as_ref(), Ok(&message));
        assert!(wide.len() < 400, "32 KiB window: {} bytes", wide.len());
        // 256-byte window: each piece stands alone, nothing to match.
        assert!(
            w8.len() > message.len() * 9 / 10,
            "256-byte window: {} bytes",
            w8.len()
        );
        // 512-byte window: each piece's second half matches its first, 256 bytes back.
        assert!(
            w9.len() < message.len() * 2 / 3,
            "512-byte window: {} bytes",
            w9.len()
        );
        for bits in 8..=15 {
            for m in [&b""[..], b"x", &vec![b'a'; 100_000]] {
                let c = compress(m, Window(bits));
                assert_eq!(inflate_within(&c, bits).as_deref(), Ok(m), "window {bits}");
            }
        }
    }

    #[test]
    fn compress_round_trips_and_cuts_the_flush_marker() {
        let json =
            br#"{"type":"message","topic":"a/b","payload":{"text":"hello hello hello hello"}}"#;
        for message in [&b""[..], b"x", json, &vec![b'a'; 200_000]] {
            let c = compress(message, Window::LARGEST);
            assert!(!c.ends_with(&[0, 0, 0xff, 0xff]));
            assert_eq!(inflate_all(&c), message);
        }
        assert!(compress(json, Window::LARGEST).len() < json.len());
    }

    #[test]
    fn plain_frames_pass_unchanged() {
        let (mut f, _) = filter(1024);
        let mut input = client_frame(0x81, b"hello", [1, 2, 3, 4]);
        input.extend(client_frame(0x89, b"ping", [5, 6, 7, 8]));
        input.extend(client_frame(0x01, b"frag", [1, 1, 1, 1]));
        input.extend(client_frame(0x80, b"ment", [2, 2, 2, 2]));
        input.extend(client_frame(0x82, b"", [9, 9, 9, 9]));
        // Byte by byte: headers and payloads split anywhere.
        for b in &input {
            f.feed(std::slice::from_ref(b));
        }
        assert_eq!(f.drain(), input);
    }

    #[test]
    fn unmasked_frames_pass_on_for_tungstenite_to_refuse() {
        let mut frames = vec![
            vec![0x81, 0x00],
            vec![0x89, 0x00],
            vec![0xc1, 0x03, b'a', b'b', b'c'],
            vec![0x82, 0x7e, 0x00, 0x01, 0xff],
        ];
        frames.push(
            [0x82, 0x7f]
                .into_iter()
                .chain((1u64).to_be_bytes())
                .chain([7])
                .collect(),
        );
        for frame in frames {
            let (mut f, _) = filter(1024);
            f.feed(&frame);
            assert_eq!(f.drain(), frame, "{frame:02x?}");
        }
    }

    #[test]
    fn a_compressed_message_is_inflated_into_one_plain_frame() {
        let (mut f, budget) = filter(1 << 20);
        let text = r#"{"type":"ping","pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
        let c = compress(text.as_bytes(), Window::LARGEST);
        f.feed(&client_frame(0xc1, &c, [7, 3, 1, 9]));
        let out = f.drain();
        let (b0, payload, used) = parse(&out);
        assert_eq!((b0, used), (0x81, out.len()));
        assert_eq!(payload, text.as_bytes());
        assert_eq!(budget.used(), 0, "nothing held between messages");
    }

    #[test]
    fn a_fragmented_compressed_message_with_a_ping_between() {
        let (mut f, _) = filter(1 << 20);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let c = compress(&data, Window::LARGEST);
        let (a, b) = c.split_at(c.len() / 2);
        let mut input = client_frame(0x42, a, [1, 2, 3, 4]); // binary, RSV1, not final
        let ping = client_frame(0x89, b"p", [0, 0, 0, 1]);
        input.extend(&ping);
        input.extend(client_frame(0x80, b, [4, 3, 2, 1]));
        for chunk in input.chunks(777) {
            f.feed(chunk);
        }
        let out = f.drain();
        assert_eq!(&out[..ping.len()], &ping[..], "the ping goes first");
        let (b0, payload, used) = parse(&out[ping.len()..]);
        assert_eq!((b0, used), (0x82, out.len() - ping.len()));
        assert_eq!(payload, data);
    }

    #[test]
    fn incompressible_messages_round_trip_whole_in_any_chunks() {
        // Stored blocks: the inflater holds output back until the message's end.
        let mut x: u32 = 12345;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let c = compress(&data, Window::LARGEST);
        assert_eq!(inflate_all(&c), data);
        for chunk in [1usize, 256, 4096, 100_000] {
            let (mut f, _) = filter(1 << 20);
            let input = client_frame(0xc2, &c, [9, 8, 7, 6]);
            for part in input.chunks(chunk) {
                f.feed(part);
            }
            let out = f.drain();
            let (b0, payload, _) = parse(&out);
            assert_eq!(b0, 0x82);
            assert_eq!(payload.len(), data.len(), "chunks of {chunk}");
            assert_eq!(payload, data);
        }
    }

    #[test]
    fn a_message_inflating_past_the_bound_is_refused_as_too_big() {
        let (mut f, budget) = filter(64 * 1024);
        let bomb = compress(&vec![0u8; 10 << 20], Window::LARGEST);
        assert!(bomb.len() < 20 * 1024);
        f.feed(&client_frame(0xc2, &bomb, [1, 2, 3, 4]));
        let out = f.drain();
        assert_eq!(out[0], 0x82);
        assert_eq!(out[1], 0x80 | 127);
        let claimed = u64::from_be_bytes(out[2..10].try_into().unwrap());
        assert_eq!(claimed, 64 * 1024 + 1);
        assert_eq!(budget.used(), 0);
        f.feed(&client_frame(0x81, b"after", [0; 4]));
        assert!(f.drain().is_empty(), "nothing after the failure");
    }

    #[test]
    fn rsv1_out_of_place_and_bad_data_fail_the_connection() {
        // On a control frame: passed on for tungstenite to refuse.
        let (mut f, _) = filter(1024);
        let ping = client_frame(0xc9, b"", [0; 4]);
        f.feed(&ping);
        assert_eq!(f.drain(), ping);
        // A new data frame inside a compressed message.
        let (mut f, _) = filter(1024);
        f.feed(&client_frame(
            0x41,
            &compress(b"abc", Window::LARGEST),
            [0; 4],
        ));
        f.feed(&client_frame(0x81, b"x", [0; 4]));
        assert_eq!(f.drain()[0] & 0x20, 0x20, "a frame with RSV2");
        // Not deflate data.
        let (mut f, _) = filter(1024);
        f.feed(&client_frame(0xc1, &[0xff; 16], [0; 4]));
        assert_eq!(f.drain()[0] & 0x20, 0x20);
    }
}
