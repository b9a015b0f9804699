//! The message ids one connection received lately, so that a backend's retry of a message
//! (`message_id` on `Send`, `Broadcast`, `Publish`) reaches each connection at most once.
//!
//! A connection that never receives an id has no record: the shell allocates one when the
//! first id reaches it. The record keeps each id's 64-bit keyed hash ([`MessageKey`]) and
//! the second it arrived, oldest first, in a ring that starts at [`MIN_CAPACITY`] entries
//! and doubles, up to [`CAPACITY`], only when the oldest entry is still inside the
//! [`WINDOW`]: a connection that receives an id now and then costs about a hundred bytes, a
//! busy one at most [`MAX_BYTES`]. An id is remembered for the window (at least [`WINDOW`],
//! less than a second more), or until [`CAPACITY`] younger ids have pushed it out, whichever
//! comes first. Once everything in a grown ring has expired, the next id shrinks it back.
//!
//! The hash is keyed per process (the shell passes a `std::collections::hash_map::
//! RandomState`), so a backend cannot choose two ids that collide; two different ids
//! collide by chance with a probability of about 2⁻⁶⁴ per pair.

use std::hash::BuildHasher;
use std::time::{Duration, Instant};

/// How long an id is remembered.
pub const WINDOW: Duration = Duration::from_secs(120);
/// The most ids a connection remembers: beyond, the oldest is forgotten before its window
/// ends.
pub const CAPACITY: usize = 64;
/// The ring's size when the first id arrives.
pub const MIN_CAPACITY: usize = 4;
/// A record's largest heap size: the record and a full ring.
pub const MAX_BYTES: usize = size_of::<Recent>() + CAPACITY * size_of::<Entry>();

const WINDOW_SECS: u32 = WINDOW.as_secs() as u32;

/// A message id as records keep it: its hash under the process's key. Computed once per
/// message, whatever the number of connections it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageKey(u64);

impl MessageKey {
    pub fn of(hasher: &impl BuildHasher, id: &str) -> Self {
        Self(hasher.hash_one(id))
    }
}

/// One connection's recent message ids.
#[derive(Debug, Clone)]
pub struct Recent {
    /// Entries count their time in whole seconds from here (u32: 136 years).
    epoch: Instant,
    /// Oldest first from `next` on, once the ring is full; in arrival order before.
    entries: Vec<Entry>,
    /// Where the next entry goes once the ring is full: the oldest one.
    next: usize,
}

/// 12 bytes: the key in two halves keeps the entry 4-aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    key: [u32; 2],
    /// Seconds since the record's epoch.
    at: u32,
}

impl Entry {
    fn new(key: MessageKey, at: u32) -> Self {
        Self {
            key: [key.0 as u32, (key.0 >> 32) as u32],
            at,
        }
    }

    fn is(&self, key: MessageKey) -> bool {
        self.key == Self::new(key, 0).key
    }

    fn fresh(&self, now: u32) -> bool {
        now.saturating_sub(self.at) <= WINDOW_SECS
    }
}

impl Recent {
    /// An empty record; its clock starts at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            epoch: now,
            entries: Vec::new(),
            next: 0,
        }
    }

    /// Records `key` as received at `now` and says whether it is new: `false` when the
    /// connection received it within the window (then the record is unchanged).
    pub fn first(&mut self, key: MessageKey, now: Instant) -> bool {
        let now = self.secs(now);
        if self.entries.iter().any(|e| e.is(key) && e.fresh(now)) {
            return false;
        }
        self.insert(Entry::new(key, now));
        true
    }

    /// Forgets `key` (its delivery failed after [`Recent::first`] said it was new), so that
    /// a retry is delivered.
    pub fn forget(&mut self, key: MessageKey) {
        for e in self.entries.iter_mut().filter(|e| e.is(key)) {
            // Expired at once; the slot is reused in its turn.
            e.at = 0;
            e.key = [0, 0];
        }
    }

    /// Ids the ring can hold before it grows or forgets the oldest.
    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    /// Heap bytes this record holds, itself included (when boxed).
    pub fn heap_bytes(&self) -> usize {
        size_of::<Self>() + self.entries.capacity() * size_of::<Entry>()
    }

    fn secs(&self, now: Instant) -> u32 {
        let secs = now.saturating_duration_since(self.epoch).as_secs();
        // An entry recorded at 0 would look fresh for the first window: start at the window
        // so that a forgotten (zeroed) entry is always expired.
        u32::try_from(secs)
            .unwrap_or(u32::MAX)
            .saturating_add(WINDOW_SECS + 1)
    }

    fn insert(&mut self, entry: Entry) {
        let len = self.entries.len();
        if len < self.entries.capacity() {
            self.entries.push(entry);
            return;
        }
        if len == 0 {
            self.entries.reserve_exact(MIN_CAPACITY);
            self.entries.push(entry);
            return;
        }
        // Full: the newest entry is just before the oldest.
        let newest = self.entries[(self.next + len - 1) % len];
        if !newest.fresh(entry.at) && len > MIN_CAPACITY {
            // Everything expired: start small again.
            self.entries = Vec::with_capacity(MIN_CAPACITY);
            self.next = 0;
            self.entries.push(entry);
            return;
        }
        let oldest = self.entries[self.next];
        if oldest.fresh(entry.at) && len < CAPACITY {
            self.entries.rotate_left(self.next);
            self.next = 0;
            self.entries.reserve_exact(len.min(CAPACITY - len));
            self.entries.push(entry);
            return;
        }
        self.entries[self.next] = entry;
        self.next = (self.next + 1) % len;
    }
}

#[cfg(test)]
// A test needs an origin instant; std has no other way to make one.
#[allow(clippy::disallowed_methods)]
mod tests {
    use std::collections::hash_map::RandomState;

    use super::*;

    fn keys(n: usize) -> Vec<MessageKey> {
        let h = RandomState::new();
        (0..n)
            .map(|i| MessageKey::of(&h, &format!("m-{i}")))
            .collect()
    }

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn a_repeat_within_the_window_is_not_new_and_after_it_is() {
        let t0 = Instant::now();
        let k = keys(2);
        let mut r = Recent::new(t0);
        assert!(r.first(k[0], t0));
        assert!(!r.first(k[0], t0));
        assert!(!r.first(k[0], at(t0, 60)));
        assert!(r.first(k[1], at(t0, 60)), "another id is new");
        // Remembered for at least the window, less than a second more.
        assert!(!r.first(k[0], t0 + WINDOW));
        assert!(r.first(k[0], t0 + WINDOW + Duration::from_secs(1)));
        // Remembered again from its new arrival.
        assert!(!r.first(k[0], at(t0, 200)));
    }

    #[test]
    fn the_key_is_the_same_for_the_same_id_and_hasher() {
        let h = RandomState::new();
        assert_eq!(MessageKey::of(&h, "a"), MessageKey::of(&h, "a"));
        assert_ne!(MessageKey::of(&h, "a"), MessageKey::of(&h, "b"));
    }

    #[test]
    fn the_ring_starts_small_and_grows_only_while_its_oldest_is_fresh() {
        let t0 = Instant::now();
        let k = keys(200);
        let mut r = Recent::new(t0);
        assert_eq!(r.capacity(), 0, "nothing before the first id");
        r.first(k[0], t0);
        assert_eq!(r.capacity(), MIN_CAPACITY);
        for key in &k[1..CAPACITY] {
            assert!(r.first(*key, t0));
        }
        assert_eq!(r.capacity(), CAPACITY);
        // Every one of them is still known.
        for key in &k[..CAPACITY] {
            assert!(!r.first(*key, at(t0, 1)));
        }
        // Full: the next id pushes out the oldest, and the ring stays at its bound.
        assert!(r.first(k[CAPACITY], at(t0, 1)));
        assert_eq!(r.capacity(), CAPACITY);
        assert!(r.first(k[0], at(t0, 1)), "the oldest was forgotten");
        assert!(!r.first(k[2], at(t0, 1)), "a younger one was not");
        assert!(r.heap_bytes() <= MAX_BYTES);
    }

    #[test]
    fn a_slow_stream_of_ids_never_grows_the_ring() {
        let t0 = Instant::now();
        let k = keys(50);
        let mut r = Recent::new(t0);
        // One id a minute: the oldest of four is always expired when the fifth comes.
        for (i, key) in k.iter().enumerate() {
            assert!(r.first(*key, at(t0, 60 * i as u64)));
        }
        assert_eq!(r.capacity(), MIN_CAPACITY);
    }

    #[test]
    fn a_grown_ring_shrinks_once_everything_expired() {
        let t0 = Instant::now();
        let k = keys(40);
        let mut r = Recent::new(t0);
        for key in &k[..32] {
            r.first(*key, t0);
        }
        assert_eq!(r.capacity(), 32);
        assert!(r.first(k[32], at(t0, 1000)));
        assert_eq!(r.capacity(), MIN_CAPACITY);
        assert!(!r.first(k[32], at(t0, 1001)));
        assert!(r.first(k[0], at(t0, 1001)));
    }

    #[test]
    fn a_forgotten_id_is_new_again() {
        let t0 = Instant::now();
        let k = keys(2);
        let mut r = Recent::new(t0);
        assert!(r.first(k[0], t0));
        assert!(r.first(k[1], t0));
        r.forget(k[0]);
        assert!(r.first(k[0], t0));
        assert!(!r.first(k[1], t0));
    }

    #[test]
    fn a_clock_that_steps_back_does_not_forget_early() {
        let t0 = Instant::now();
        let k = keys(1);
        let mut r = Recent::new(at(t0, 10));
        assert!(r.first(k[0], at(t0, 10)));
        // Before the epoch (an older `now` from another thread): counted as the epoch.
        assert!(!r.first(k[0], t0));
    }

    /// The figures the docs quote (docs/PROTOCOL.md §10): what a record costs.
    #[test]
    fn what_a_record_costs() {
        assert_eq!(size_of::<Entry>(), 12);
        assert_eq!(size_of::<Recent>(), 48);
        assert_eq!(MIN_CAPACITY * size_of::<Entry>() + size_of::<Recent>(), 96);
        assert_eq!(MAX_BYTES, 48 + 64 * 12);
    }
}
