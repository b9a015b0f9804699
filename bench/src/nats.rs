//! The NATS client protocol as it arrives inside WebSocket frames from nats-server: a byte
//! stream (a `MSG` may span two frames) of `INFO`, `+OK`, `-ERR`, `PING`, `PONG` and
//! `MSG <subject> <sid> [reply] <bytes>\r\n<payload>\r\n`.

use memchr::memmem;

/// Bytes of the stream not parsed yet (an incomplete line or payload).
#[derive(Debug, Default)]
pub(crate) struct NatsStream {
    pending: Vec<u8>,
}

/// Control lines seen in one [`NatsStream::feed_control`].
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Control {
    pub(crate) pong: bool,
    pub(crate) ping: bool,
}

impl NatsStream {
    /// Feeds one frame's payload; calls `on_msg` with each complete message payload.
    /// Returns whether the server sent `PING` (to be answered with `PONG`).
    #[inline]
    pub(crate) fn feed(&mut self, data: &[u8], on_msg: impl FnMut(&[u8])) -> bool {
        self.feed_all(data, on_msg).ping
    }

    /// Feeds one frame's payload during set-up, where no message is expected.
    pub(crate) fn feed_control(&mut self, data: &[u8]) -> Control {
        self.feed_all(data, |_| {})
    }

    fn feed_all(&mut self, data: &[u8], mut on_msg: impl FnMut(&[u8])) -> Control {
        if self.pending.is_empty() {
            let (used, c) = parse(data, &mut on_msg);
            self.pending.extend_from_slice(&data[used..]);
            return c;
        }
        self.pending.extend_from_slice(data);
        let buf = std::mem::take(&mut self.pending);
        let (used, c) = parse(&buf, &mut on_msg);
        self.pending = buf;
        self.pending.drain(..used);
        c
    }
}

/// Parses complete protocol messages; returns the bytes used.
fn parse(data: &[u8], on_msg: &mut impl FnMut(&[u8])) -> (usize, Control) {
    let mut c = Control::default();
    let mut pos = 0;
    while let Some(eol) = memmem::find(&data[pos..], b"\r\n") {
        let line = &data[pos..pos + eol];
        if let Some(args) = line.strip_prefix(b"MSG ") {
            let Some(len) = args
                .rsplit(|&b| b == b' ')
                .next()
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse::<usize>().ok())
            else {
                // Not a MSG line we understand: skip it.
                pos += eol + 2;
                continue;
            };
            let start = pos + eol + 2;
            if data.len() < start + len + 2 {
                break;
            }
            on_msg(&data[start..start + len]);
            pos = start + len + 2;
            continue;
        }
        match line {
            b"PING" => c.ping = true,
            b"PONG" => c.pong = true,
            _ => {}
        }
        pos += eol + 2;
    }
    (pos, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_across_frames() {
        let mut s = NatsStream::default();
        let mut got = Vec::new();
        let stream = b"INFO {}\r\nMSG bench.t 1 5\r\nhello\r\nPING\r\nMSG bench.t 1 _r 2\r\nhi\r\n";
        for cut in 0..stream.len() {
            got.clear();
            let mut ping = s.feed(&stream[..cut], |m| got.push(m.to_vec()));
            ping |= s.feed(&stream[cut..], |m| got.push(m.to_vec()));
            assert_eq!(got, vec![b"hello".to_vec(), b"hi".to_vec()], "cut at {cut}");
            assert!(ping);
            assert!(s.pending.is_empty());
        }
        assert!(s.feed_control(b"+OK\r\nPONG\r\n").pong);
    }
}
