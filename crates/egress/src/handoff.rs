//! The handoff: the bounded, lock-free queue between `emit` (any thread; never blocks, never
//! fails) and the writer thread.

use crossbeam_queue::ArrayQueue;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};

/// The bounded, lock-free queue between a sink's `emit` (any thread; never blocks, never fails)
/// and its writer thread, with its counters: every item offered is handed over or counted as
/// dropped.
#[derive(Debug)]
pub struct Handoff<T> {
    queue: ArrayQueue<T>,
    /// Refuses (and counts) from now on.
    closed: AtomicBool,
    /// Items offered to [`Handoff::push`].
    pub emitted: AtomicU64,
    /// Items queued.
    pub handed: AtomicU64,
    /// Items the writer took and finished ([`Handoff::done`]).
    pub processed: AtomicU64,
    /// Items refused: the queue was full, or closed.
    pub dropped: AtomicU64,
}

/// What [`Handoff::push`] did with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued for the writer.
    Queued,
    /// Dropped and counted; `first` is true for the first drop ever (to warn once).
    Dropped {
        /// The first drop of this handoff.
        first: bool,
    },
}

impl<T> Handoff<T> {
    /// A queue of `capacity` items (at least 1).
    pub fn new(capacity: usize) -> Handoff<T> {
        Handoff {
            queue: ArrayQueue::new(capacity.max(1)),
            closed: AtomicBool::new(false),
            emitted: AtomicU64::new(0),
            handed: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues `item`, or drops and counts it when full or closed. Never blocks.
    pub fn push(&self, item: T) -> Pushed {
        self.emitted.fetch_add(1, Relaxed);
        if self.closed.load(Relaxed) {
            self.dropped.fetch_add(1, Relaxed);
            return Pushed::Dropped { first: false };
        }
        match self.queue.push(item) {
            Ok(()) => {
                self.handed.fetch_add(1, Relaxed);
                Pushed::Queued
            }
            Err(_) => Pushed::Dropped {
                first: self.dropped.fetch_add(1, Relaxed) == 0,
            },
        }
    }

    /// The oldest item; call [`Handoff::done`] once it is stored.
    pub fn pop(&self) -> Option<T> {
        self.queue.pop()
    }

    /// One popped item is stored (or dropped and counted elsewhere).
    pub fn done(&self) {
        self.processed.fetch_add(1, Relaxed);
    }

    /// Whether nothing waits in the queue.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Items between `push` and `done` now.
    pub fn pending(&self) -> u64 {
        self.handed
            .load(Relaxed)
            .saturating_sub(self.processed.load(Relaxed))
    }

    /// Refuses every later `push` (counted as dropped).
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_counts_every_item_queued_or_dropped() {
        let h = Handoff::new(2);
        assert_eq!(h.push(1), Pushed::Queued);
        assert_eq!(h.push(2), Pushed::Queued);
        assert_eq!(h.push(3), Pushed::Dropped { first: true });
        assert_eq!(h.push(4), Pushed::Dropped { first: false });
        assert_eq!(h.pending(), 2);
        assert_eq!(h.pop(), Some(1));
        h.done();
        assert_eq!(h.pending(), 1);
        h.close();
        assert_eq!(h.push(5), Pushed::Dropped { first: false });
        let counts = [&h.emitted, &h.handed, &h.processed, &h.dropped].map(|c| c.load(Relaxed));
        assert_eq!(counts, [5, 2, 1, 3]);
    }
}
