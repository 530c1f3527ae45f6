//! The bounded two-class queue between `emit` (any thread, never blocks) and a sink's drain.
//!
//! Policy, with one capacity shared by both classes (256 by default, like the seed):
//! 1. Room left: the event is queued.
//! 2. Full, and at least one `Low` is queued: the **oldest `Low`** is dropped to make room (for a new
//!    `High` or a new `Low`).
//! 3. Full of `High` only, new `Low`: the new `Low` itself is dropped (a `High` is never dropped to
//!    make room for a `Low`).
//! 4. Full of `High` only, new `High`: the **oldest `High`** is dropped (the seed's drop-oldest).
//!    We chose this over a reserved `High` capacity: with no `Low` to shed, the newest one-off event
//!    (say `session_closed` after a burst) is worth more than the oldest, and it keeps one capacity
//!    knob instead of two.
//!
//! Every drop is counted per class. Events leave in the order they were queued, across classes
//! (each class is a FIFO tagged with a sequence number; [`PriorityQueue::drain_into`] merges them).
//!
//! Freeing a dropped event (a dozen small allocations) is kept off the caller's thread: dropped
//! events go to a bounded "dead" list that the consumer frees with its next drain. Only when that
//! list is full (the consumer is stalled) is a dropped event handed back to the caller to free,
//! outside the lock; so memory stays bounded by twice the capacity.

use crate::envelope::Event;
use crate::priority::Priority;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Default capacity of a sink queue (the seed's).
pub const DEFAULT_CAPACITY: usize = 256;

/// Default [`EventQueue::min_idle`]: shorter than the gap between events at 10,000 events/s
/// (100 µs, so each is written at once), long enough that a flat-out producer wakes the consumer
/// at most ~20,000 times a second and its events go in batches.
pub const DEFAULT_MIN_IDLE: Duration = Duration::from_micros(50);

/// Running totals of a queue, per class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// `High` events offered to `push` (accepted or not).
    pub pushed_high: u64,
    /// `Low` events offered to `push` (accepted or not).
    pub pushed_low: u64,
    /// `High` events dropped by the queue (evicted, or refused after close).
    pub dropped_high: u64,
    /// `Low` events dropped by the queue (evicted, refused when full of `High`, or after close).
    pub dropped_low: u64,
    /// `High` events taken by `drain_into`.
    pub taken_high: u64,
    /// `Low` events taken by `drain_into`.
    pub taken_low: u64,
}

impl QueueCounts {
    /// All events offered.
    pub fn pushed(&self) -> u64 {
        self.pushed_high + self.pushed_low
    }

    /// All events dropped.
    pub fn dropped(&self) -> u64 {
        self.dropped_high + self.dropped_low
    }

    /// All events taken.
    pub fn taken(&self) -> u64 {
        self.taken_high + self.taken_low
    }
}

/// What one `push` did.
#[derive(Debug)]
pub struct Pushed {
    /// Events queued after this push (a consumer is woken when it reaches the wake mark).
    pub len: usize,
    /// The class dropped by this push, if any (the new event's own class when it was refused).
    pub dropped: Option<Priority>,
    /// The dropped event when the dead list is full: the caller frees it after releasing the lock.
    pub dropped_event: Option<Event>,
}

/// The queue itself (not synchronized: see [`EventQueue`] for the shared version).
#[derive(Debug)]
pub struct PriorityQueue {
    high: VecDeque<(u64, Event)>,
    low: VecDeque<(u64, Event)>,
    /// Dropped events awaiting the consumer, who frees them (bounded by `capacity`).
    dead: Vec<Event>,
    capacity: usize,
    next_seq: u64,
    closed: bool,
    counts: QueueCounts,
}

impl PriorityQueue {
    /// An empty queue holding at most `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        PriorityQueue {
            high: VecDeque::with_capacity(capacity.min(4096)),
            low: VecDeque::with_capacity(capacity.min(4096)),
            dead: Vec::with_capacity(capacity.min(4096)),
            capacity,
            next_seq: 0,
            closed: false,
            counts: QueueCounts::default(),
        }
    }

    /// Offers one event; applies the policy in the module docs. Never blocks, never fails.
    pub fn push(&mut self, event: Event) -> Pushed {
        let class = event.priority();
        match class {
            Priority::High => self.counts.pushed_high += 1,
            Priority::Low => self.counts.pushed_low += 1,
        }
        if self.closed {
            // After close nobody drains the dead list: the caller frees its own event.
            self.count_drop(class);
            return Pushed {
                len: self.len(),
                dropped: Some(class),
                dropped_event: Some(event),
            };
        }
        let mut dropped = None;
        let mut dropped_event = None;
        if self.len() >= self.capacity {
            if let Some((_, old)) = self.low.pop_front() {
                dropped = Some(Priority::Low);
                dropped_event = self.bury(old);
            } else if class == Priority::Low {
                self.count_drop(Priority::Low);
                return Pushed {
                    dropped: Some(Priority::Low),
                    dropped_event: self.bury(event),
                    len: self.len(),
                };
            } else if let Some((_, old)) = self.high.pop_front() {
                dropped = Some(Priority::High);
                dropped_event = self.bury(old);
            }
        }
        if let Some(c) = dropped {
            self.count_drop(c);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        match class {
            Priority::High => self.high.push_back((seq, event)),
            Priority::Low => self.low.push_back((seq, event)),
        }
        Pushed {
            len: self.len(),
            dropped,
            dropped_event,
        }
    }

    /// Keeps a dropped event for the consumer to free; hands it back when the dead list is full.
    fn bury(&mut self, event: Event) -> Option<Event> {
        if self.dead.len() < self.capacity {
            self.dead.push(event);
            None
        } else {
            Some(event)
        }
    }

    /// Swaps the dead list with `spare` (pass an empty vector; its allocation is reused). The
    /// consumer then frees the dropped events outside any lock.
    pub fn swap_dead(&mut self, spare: &mut Vec<Event>) {
        if !self.dead.is_empty() {
            std::mem::swap(&mut self.dead, spare);
        }
    }

    fn count_drop(&mut self, class: Priority) {
        match class {
            Priority::High => self.counts.dropped_high += 1,
            Priority::Low => self.counts.dropped_low += 1,
        }
    }

    /// Moves every queued event to `out`, oldest first across both classes; returns how many.
    pub fn drain_into(&mut self, out: &mut Vec<Event>) -> usize {
        self.drain_into_max(out, usize::MAX)
    }

    /// Moves the `max` oldest queued events (across both classes) to `out`, oldest first; the
    /// rest stay queued (a consumer held to a budget). Returns how many moved.
    pub fn drain_into_max(&mut self, out: &mut Vec<Event>, max: usize) -> usize {
        let n = self.len().min(max);
        out.reserve(n);
        let (mut nh, mut nl) = (0u64, 0u64);
        for _ in 0..n {
            let take_high = match (self.high.front(), self.low.front()) {
                (Some((sh, _)), Some((sl, _))) => sh < sl,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let next = if take_high {
                nh += 1;
                self.high.pop_front()
            } else {
                nl += 1;
                self.low.pop_front()
            };
            if let Some((_, e)) = next {
                out.push(e);
            }
        }
        self.counts.taken_high += nh;
        self.counts.taken_low += nl;
        n
    }

    /// Refuses (and counts as dropped) every later push; what is queued stays to be drained.
    pub fn close(&mut self) {
        self.closed = true;
        self.dead.clear();
    }

    /// Whether [`PriorityQueue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Events queued now.
    pub fn len(&self) -> usize {
        self.high.len() + self.low.len()
    }

    /// `High` events queued now.
    pub fn len_high(&self) -> usize {
        self.high.len()
    }

    /// `Low` events queued now.
    pub fn len_low(&self) -> usize {
        self.low.len()
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.high.is_empty() && self.low.is_empty()
    }

    /// The capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Running totals.
    pub fn counts(&self) -> QueueCounts {
        self.counts
    }
}

/// The queue length at which a producer wakes a polling consumer: three quarters of `capacity`.
pub fn wake_mark(capacity: usize) -> usize {
    (capacity.max(1) * 3).div_ceil(4)
}

/// What one [`EventQueue::drain_into`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Events moved out.
    pub taken: usize,
    /// The queue was closed when drained: nothing more will ever arrive.
    pub closed: bool,
}

/// A [`PriorityQueue`] shared between any number of producers and one async consumer.
///
/// Producers take a short `parking_lot` lock and wake the consumer ([`Notify`]) only on two
/// edges, so at most one push per drain pays for a wake-up (a futex syscall when the consumer's
/// thread is parked; it never blocks the caller):
/// - **idle → busy**: the consumer drained everything and parked ([`EventQueue::wait_idle`]) at
///   least [`EventQueue::min_idle`] ago; the first push after that wakes it at once, so a lone
///   event is not held for a poll interval. Later pushes see the flag cleared and pay one atomic
///   load. The minimum idle time (default [`DEFAULT_MIN_IDLE`]) keeps a flat-out producer from
///   paying a wake-up per event: a push within it of the consumer parking leaves the event to the
///   next push past it, the wake mark, or the poll, so events then go in batches.
/// - **filling**: the queue reaches its *wake mark* (three quarters of the capacity), so that a
///   burst is drained before it overflows even if the consumer polls ([`EventQueue::wait_for`]).
#[derive(Debug)]
pub struct EventQueue {
    inner: Mutex<PriorityQueue>,
    notify: Notify,
    wake_mark: usize,
    /// When the consumer parked in [`EventQueue::wait_idle`] with an empty queue, in ns since
    /// `epoch` plus one; 0 while it is not parked.
    parked_at: AtomicU64,
    epoch: Instant,
    min_idle_ns: u64,
    /// Wake-ups sent by producers (both edges), for tests and tuning.
    wakes: AtomicU64,
    /// The consumer's spare dead list (only the consumer touches it; the lock is uncontended).
    spare: Mutex<Vec<Event>>,
}

impl EventQueue {
    /// An empty queue of `capacity` (at least 1); the wake mark is three quarters of it.
    pub fn new(capacity: usize) -> Self {
        EventQueue {
            inner: Mutex::new(PriorityQueue::new(capacity)),
            notify: Notify::new(),
            wake_mark: wake_mark(capacity),
            parked_at: AtomicU64::new(0),
            epoch: Instant::now(),
            min_idle_ns: DEFAULT_MIN_IDLE.as_nanos() as u64,
            wakes: AtomicU64::new(0),
            spare: Mutex::new(Vec::with_capacity(capacity.clamp(1, 4096))),
        }
    }

    /// Offers one event (never blocks beyond the short lock); returns the class dropped, if any.
    pub fn push(&self, event: Event) -> Option<Priority> {
        let pushed = self.inner.lock().push(event);
        // The dropped event (if any) is freed here, outside the lock.
        drop(pushed.dropped_event);
        // One shared load while the consumer is busy; a clock read only while it is parked.
        let parked = self.parked_at.load(Ordering::SeqCst);
        let idle_edge = parked != 0
            && self.now_ns().saturating_sub(parked) >= self.min_idle_ns
            && self
                .parked_at
                .compare_exchange(parked, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
        if idle_edge || pushed.len == self.wake_mark {
            self.wakes.fetch_add(1, Ordering::Relaxed);
            self.notify.notify_one();
        }
        pushed.dropped
    }

    /// Moves everything queued to `out`, in order, in one lock; frees dropped events after it.
    pub fn drain_into(&self, out: &mut Vec<Event>) -> Drained {
        self.drain_into_max(out, usize::MAX)
    }

    /// [`EventQueue::drain_into`], taking at most the `max` oldest events.
    pub fn drain_into_max(&self, out: &mut Vec<Event>, max: usize) -> Drained {
        let mut spare = self.spare.lock();
        let drained = {
            let mut q = self.inner.lock();
            let taken = q.drain_into_max(out, max);
            q.swap_dead(&mut spare);
            Drained {
                taken,
                closed: q.is_closed(),
            }
        };
        // Frees the dropped events here, on the consumer, keeping the allocation for next time.
        spare.clear();
        drained
    }

    /// Waits until the queue reaches its wake mark or [`EventQueue::close`] is called (may also
    /// return spuriously: callers re-check by draining). Pair it with a timeout: below the wake
    /// mark nobody wakes the consumer ([`EventQueue::wait_for`]).
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// [`EventQueue::wait`], or `poll` elapsed, whichever comes first.
    pub async fn wait_for(&self, poll: std::time::Duration) {
        let _ = tokio::time::timeout(poll, self.notify.notified()).await;
    }

    /// The same queue, where a push wakes a consumer parked in [`EventQueue::wait_idle`] only once
    /// it has been parked `min_idle` (zero: every first push after parking wakes it).
    pub fn with_min_idle(mut self, min_idle: Duration) -> Self {
        self.min_idle_ns = u64::try_from(min_idle.as_nanos()).unwrap_or(u64::MAX);
        self
    }

    /// How long the consumer must have been parked for a push to wake it (the idle edge).
    pub fn min_idle(&self) -> Duration {
        Duration::from_nanos(self.min_idle_ns)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// Parks until a push finds it parked for [`EventQueue::min_idle`] (the idle → busy edge),
    /// the wake mark, [`EventQueue::close`], or `poll` elapsed. Returns at once if something is
    /// queued. For a consumer that has drained everything and wants the next event soon.
    ///
    /// A consumer whose poll ran out with nothing queued stays announced as parked since it
    /// first parked: it has been idle all along, so the next push wakes it (instead of leaving the
    /// event to the next poll because the consumer parked again less than `min_idle` ago).
    pub async fn wait_idle(&self, poll: Duration) {
        // Announce first, then check: a push either sees the flag or is seen by the check.
        let _ =
            self.parked_at
                .compare_exchange(0, self.now_ns(), Ordering::SeqCst, Ordering::SeqCst);
        if !self.is_empty() {
            self.parked_at.store(0, Ordering::SeqCst);
            return;
        }
        let woken = tokio::time::timeout(poll, self.notify.notified())
            .await
            .is_ok();
        if woken || !self.is_empty() {
            self.parked_at.store(0, Ordering::SeqCst);
        }
    }

    /// Whether the consumer is parked in [`EventQueue::wait_idle`] (the next push wakes it).
    pub fn is_parked(&self) -> bool {
        self.parked_at.load(Ordering::SeqCst) != 0
    }

    /// Wake-ups producers have sent so far (idle edges and wake marks).
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// The queue length at which a push wakes the consumer.
    pub fn wake_mark(&self) -> usize {
        self.wake_mark
    }

    /// Closes the queue (later pushes are refused and counted) and wakes the consumer.
    pub fn close(&self) {
        self.inner.lock().close();
        self.notify.notify_one();
    }

    /// Running totals.
    pub fn counts(&self) -> QueueCounts {
        self.inner.lock().counts()
    }

    /// Whether [`EventQueue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.lock().is_closed()
    }

    /// Events queued now.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.inner.lock().is_empty()
    }

    /// Totals and the current length, read together.
    pub fn snapshot(&self) -> (QueueCounts, usize) {
        let q = self.inner.lock();
        (q.counts(), q.len())
    }
}
