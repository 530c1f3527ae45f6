//! Deduplication by event id over a window, so at-least-once delivery becomes exactly-once
//! downstream.
//!
//! An id is remembered once the output durably has its event (committed), for `ttl` and among the
//! latest `capacity` ids, whichever forgets first. While a request is writing an event, its id is
//! *pending*: a concurrent request carrying the same id waits for that write to finish, then
//! counts a duplicate (the write succeeded) or writes the event itself (it failed). So an event
//! is never dropped as a duplicate of a write that did not happen, and never written twice within
//! the window.
//!
//! Ids are stored as 128-bit SipHash digests under per-process random keys (32 bytes an entry,
//! whatever the id's length); a false "duplicate" needs a 128-bit collision.

use parking_lot::Mutex;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

type Digest = u128;

enum Entry {
    Committed,
    /// Being written by request `owner`; the receiver resolves when it finishes.
    Pending {
        owner: u64,
        done: watch::Receiver<bool>,
    },
}

struct Inner {
    map: HashMap<Digest, Entry>,
    /// Committed ids, oldest first, for eviction.
    order: VecDeque<(Digest, Instant)>,
}

/// The dedup window.
pub struct Dedup {
    k1: RandomState,
    k2: RandomState,
    capacity: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
    next_owner: AtomicU64,
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedup")
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .field("len", &self.len())
            .finish()
    }
}

/// How one id was classified by [`Dedup::reserve`].
pub enum Verdict {
    /// New: reserved for this request; write it.
    Fresh,
    /// Already committed (or earlier in this same request): skip it.
    Duplicate,
    /// Another request is writing it now: wait on this, then classify again.
    Wait(watch::Receiver<bool>),
}

/// Ids a request reserved. Commit after the output has them; dropping it uncommitted releases
/// them (so a failed or abandoned request never blocks or hides an event).
pub struct Reservation<'a> {
    dedup: &'a Dedup,
    owner: u64,
    ids: Vec<Digest>,
    done: Option<watch::Sender<bool>>,
}

impl Dedup {
    /// A window of the last `capacity` ids, each kept at most `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Dedup {
        Dedup {
            k1: RandomState::new(),
            k2: RandomState::new(),
            capacity: capacity.max(1),
            ttl,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            next_owner: AtomicU64::new(1),
        }
    }

    fn digest(&self, id: &str) -> Digest {
        (u128::from(self.k1.hash_one(id)) << 64) | u128::from(self.k2.hash_one(id))
    }

    /// Ids remembered now (committed and pending).
    pub fn len(&self) -> usize {
        self.inner.lock().map.len()
    }

    /// Nothing remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts a reservation for one request.
    pub fn reservation(&self) -> Reservation<'_> {
        Reservation {
            dedup: self,
            owner: self.next_owner.fetch_add(1, Ordering::Relaxed),
            ids: Vec::new(),
            done: None,
        }
    }

    /// Remembers `ids` as committed (seeding the window from an output's tail at start).
    pub fn seed<'i>(&self, ids: impl IntoIterator<Item = &'i str>) -> usize {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let mut n = 0;
        for id in ids {
            let d = self.digest(id);
            if inner.map.insert(d, Entry::Committed).is_none() {
                inner.order.push_back((d, now));
                n += 1;
            }
        }
        self.evict(&mut inner, now);
        n
    }

    fn evict(&self, inner: &mut Inner, now: Instant) {
        while let Some(&(d, at)) = inner.order.front() {
            let expired = now.saturating_duration_since(at) >= self.ttl;
            if inner.order.len() <= self.capacity && !expired {
                break;
            }
            inner.order.pop_front();
            if matches!(inner.map.get(&d), Some(Entry::Committed)) {
                inner.map.remove(&d);
            }
        }
    }
}

impl Reservation<'_> {
    /// Classifies `id` for this request, reserving it when fresh.
    pub fn reserve(&mut self, id: &str) -> Verdict {
        let dedup = self.dedup;
        let d = dedup.digest(id);
        let now = Instant::now();
        let mut inner = dedup.inner.lock();
        // Expired ids must not count as duplicates even if eviction has not run yet.
        dedup.evict(&mut inner, now);
        match inner.map.get(&d) {
            Some(Entry::Committed) => Verdict::Duplicate,
            Some(Entry::Pending { owner, .. }) if *owner == self.owner => Verdict::Duplicate,
            Some(Entry::Pending { done, .. }) => Verdict::Wait(done.clone()),
            None => {
                let done = self
                    .done
                    .get_or_insert_with(|| watch::channel(false).0)
                    .subscribe();
                inner.map.insert(
                    d,
                    Entry::Pending {
                        owner: self.owner,
                        done,
                    },
                );
                self.ids.push(d);
                Verdict::Fresh
            }
        }
    }

    /// The output has every reserved event: remember them, and wake waiters.
    pub fn commit(mut self) {
        let dedup = self.dedup;
        let now = Instant::now();
        {
            let mut inner = dedup.inner.lock();
            for d in self.ids.drain(..) {
                inner.map.insert(d, Entry::Committed);
                inner.order.push_back((d, now));
            }
            dedup.evict(&mut inner, now);
        }
        if let Some(tx) = self.done.take() {
            let _ = tx.send(true);
        }
    }
}

impl Drop for Reservation<'_> {
    /// Uncommitted: forget the reserved ids and wake waiters so they write the events themselves.
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let mut inner = self.dedup.inner.lock();
        for d in self.ids.drain(..) {
            if matches!(inner.map.get(&d), Some(Entry::Pending { owner, .. }) if *owner == self.owner)
            {
                inner.map.remove(&d);
            }
        }
        drop(inner);
        if let Some(tx) = self.done.take() {
            let _ = tx.send(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_ids_are_duplicates_until_evicted() {
        let d = Dedup::new(3, Duration::from_secs(3600));
        let mut r = d.reservation();
        assert!(matches!(r.reserve("a"), Verdict::Fresh));
        assert!(
            matches!(r.reserve("a"), Verdict::Duplicate),
            "twice in one request"
        );
        assert!(matches!(r.reserve("b"), Verdict::Fresh));
        r.commit();
        let mut r = d.reservation();
        assert!(matches!(r.reserve("a"), Verdict::Duplicate));
        assert!(matches!(r.reserve("c"), Verdict::Fresh));
        assert!(matches!(r.reserve("d"), Verdict::Fresh));
        r.commit();
        // Capacity 3: "a" fell out.
        let mut r = d.reservation();
        assert!(matches!(r.reserve("a"), Verdict::Fresh));
        assert!(matches!(r.reserve("d"), Verdict::Duplicate));
    }

    #[test]
    fn ttl_forgets() {
        let d = Dedup::new(100, Duration::from_millis(30));
        d.seed(["x"]);
        assert!(matches!(d.reservation().reserve("x"), Verdict::Duplicate));
        std::thread::sleep(Duration::from_millis(40));
        assert!(matches!(d.reservation().reserve("x"), Verdict::Fresh));
    }

    #[tokio::test]
    async fn a_concurrent_writer_is_waited_for_and_a_failed_one_releases() {
        let d = Dedup::new(100, Duration::from_secs(60));
        let mut first = d.reservation();
        assert!(matches!(first.reserve("e"), Verdict::Fresh));
        let mut second = d.reservation();
        let Verdict::Wait(mut rx) = second.reserve("e") else {
            panic!("must wait")
        };
        drop(first); // the write failed
        let _ = rx.wait_for(|v| *v).await;
        assert!(
            matches!(second.reserve("e"), Verdict::Fresh),
            "released to the waiter"
        );
        second.commit();
        let mut third = d.reservation();
        assert!(matches!(third.reserve("e"), Verdict::Duplicate));
    }
}
