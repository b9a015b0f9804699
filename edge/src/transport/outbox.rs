//! A connection's outbound queue: bounded in frames and bytes, lock-free, and without a
//! heap allocation until the first frame is queued (then it keeps one block). Most
//! connections never queue one: replies bypass it, and fan-out to an idle socket is written
//! directly (see `socket`).
//!
//! Many producers (pumps, commands) push; the connection's task alone pops.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use crossbeam_queue::SegQueue;
use futures::task::AtomicWaker;

use super::Out;

#[derive(Debug)]
pub(crate) struct Outbox {
    frames: SegQueue<Out>,
    /// Frames in `frames`.
    len: AtomicUsize,
    /// Bytes queued and not yet written to the socket (popped frames count until written).
    buffered: AtomicUsize,
    max_frames: usize,
    max_bytes: usize,
    task: AtomicWaker,
}

/// Why [`Outbox::push`] refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full;

impl Outbox {
    pub(crate) fn new(max_frames: usize, max_bytes: usize) -> Self {
        Self {
            frames: SegQueue::new(),
            len: AtomicUsize::new(0),
            buffered: AtomicUsize::new(0),
            max_frames: max_frames.max(1),
            max_bytes,
            task: AtomicWaker::new(),
        }
    }

    /// Queues a frame and wakes the task. One frame is always accepted into an empty
    /// queue, however large.
    pub(crate) fn push(&self, frame: &Out) -> Result<(), Full> {
        let bytes = frame.len();
        let before = self.buffered.fetch_add(bytes, Ordering::AcqRel);
        if before > 0 && before + bytes > self.max_bytes {
            self.buffered.fetch_sub(bytes, Ordering::AcqRel);
            return Err(Full);
        }
        if self.len.fetch_add(1, Ordering::AcqRel) >= self.max_frames {
            self.len.fetch_sub(1, Ordering::AcqRel);
            self.buffered.fetch_sub(bytes, Ordering::AcqRel);
            return Err(Full);
        }
        self.frames.push(frame.clone());
        self.task.wake();
        Ok(())
    }

    /// The next frame, for the task.
    pub(crate) fn pop(&self) -> Option<Out> {
        let frame = self.frames.pop()?;
        self.len.fetch_sub(1, Ordering::AcqRel);
        Some(frame)
    }

    /// The next frame, or the task is woken when one is pushed.
    pub(crate) fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Out> {
        if let Some(f) = self.pop() {
            return Poll::Ready(f);
        }
        self.task.register(cx.waker());
        self.pop().map_or(Poll::Pending, Poll::Ready)
    }

    pub(crate) async fn recv(&self) -> Out {
        std::future::poll_fn(|cx| self.poll_pop(cx)).await
    }

    /// The task wrote popped frames of `bytes` in all.
    pub(crate) fn written(&self, bytes: usize) {
        self.buffered.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Bytes queued or popped and not yet written.
    pub(crate) fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }

    /// Whether `frames` more frames of `bytes` in all would be taken now (others may push
    /// meanwhile: a promise only while nobody else does).
    pub(crate) fn has_room(&self, frames: usize, bytes: usize) -> bool {
        let (len, buffered) = (
            self.len.load(Ordering::Acquire),
            self.buffered.load(Ordering::Acquire),
        );
        frames == 0
            || (len + frames <= self.max_frames
                && (buffered == 0 || buffered + bytes <= self.max_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Out {
        Out::from("x".repeat(n))
    }

    #[test]
    fn bounded_by_frames_and_by_bytes() {
        let q = Outbox::new(2, 100);
        assert_eq!(q.push(&frame(10)), Ok(()));
        assert_eq!(q.push(&frame(10)), Ok(()));
        assert_eq!(q.push(&frame(10)), Err(Full), "third frame over max_frames");
        assert_eq!(q.pop().map(|f| f.len()), Some(10));
        assert_eq!(q.push(&frame(95)), Err(Full), "over max_bytes");
        assert_eq!(q.buffered(), 20, "a refused frame leaves no trace");
        q.written(10);
        assert_eq!(q.push(&frame(90)), Ok(()));
        assert_eq!(q.buffered(), 100);
    }

    #[test]
    fn an_empty_queue_takes_one_large_frame() {
        let q = Outbox::new(4, 100);
        assert_eq!(q.push(&frame(1000)), Ok(()));
        assert_eq!(q.push(&frame(1)), Err(Full));
    }

    #[tokio::test]
    async fn a_push_wakes_the_waiting_task() {
        let q = std::sync::Arc::new(Outbox::new(4, 1000));
        let waiting = tokio::spawn({
            let q = std::sync::Arc::clone(&q);
            async move { q.recv().await }
        });
        tokio::task::yield_now().await;
        q.push(&frame(3)).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the task was not woken")
            .unwrap();
        assert_eq!(got.len(), 3);
    }
}
