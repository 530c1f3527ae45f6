//! Channels: the five-segment ring of one channel, and the registry of all channels.

use super::segment::{Append, Segment};
use super::ServerError;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Segments kept per channel (slot = seq % RING), as in the reference server.
pub(crate) const RING: usize = 5;

/// The change-feed channel's name.
pub(crate) const CHANGES: &str = "_changes";

/// Longest channel name accepted at creation.
const MAX_NAME: usize = 256;

/// One channel: its MIME type, its ring of segments and its write head.
pub(crate) struct Channel {
    name: String,
    mime: String,
    state: Mutex<ChanState>,
}

struct ChanState {
    slots: [Option<Arc<Segment>>; RING],
    /// The next sequence number the publisher will write (the write head).
    next: i64,
    /// When the last segment got its first byte (or the channel was created): drives the sweep.
    write_time: Instant,
    closed: bool,
}

/// What a GET found.
pub(crate) enum ForRead {
    /// The segment (existing or precreated), and the write head when the GET arrived.
    Found { seg: Arc<Segment>, latest: i64 },
    /// Neither held nor the write head: answer 470.
    Missing { seq: i64, latest: i64 },
    /// The channel closed under the request.
    Closed { seq: i64 },
}

/// What a POST got to write into.
pub(crate) struct ForWrite {
    pub(crate) seg: Arc<Segment>,
    /// The effective sequence number (`-1` resolved).
    pub(crate) seq: i64,
    /// The writer generation, or `None` when the segment already has data (the body is discarded).
    pub(crate) writer: Option<u64>,
}

fn slot(seq: i64) -> usize {
    // seq is never negative here: callers resolve -1/-2 and reject the rest.
    (seq.rem_euclid(RING as i64)) as usize
}

impl Channel {
    fn new(name: &str, mime: &str) -> Channel {
        Channel {
            name: name.to_string(),
            mime: mime.chars().filter(|c| !c.is_control()).collect(),
            state: Mutex::new(ChanState {
                slots: Default::default(),
                next: 0,
                write_time: Instant::now(),
                closed: false,
            }),
        }
    }

    /// The channel's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The channel's MIME type (may be empty, as in the reference).
    pub(crate) fn mime(&self) -> &str {
        &self.mime
    }

    /// The write head.
    pub(crate) fn next(&self) -> i64 {
        self.state.lock().next
    }

    /// Whether the channel is closed, and the write head.
    pub(crate) fn status(&self) -> (bool, i64) {
        let st = self.state.lock();
        (st.closed, st.next)
    }

    /// The segments in the ring, oldest first.
    pub(crate) fn segments(&self) -> Vec<super::SegmentInfo> {
        let segs: Vec<Arc<Segment>> = self.state.lock().slots.iter().flatten().cloned().collect();
        let mut infos: Vec<super::SegmentInfo> = segs.iter().map(|s| s.info()).collect();
        infos.sort_by_key(|i| i.seq);
        infos
    }

    /// Whether the channel is closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Resolves a GET's seq (-1 next, -2 current), precreating the write head's segment.
    pub(crate) fn for_read(&self, seq: i64) -> ForRead {
        let mut st = self.state.lock();
        let seq = match seq {
            -1 => st.next,
            -2 => (st.next - 1).max(0),
            s => s,
        };
        let latest = st.next;
        if st.closed {
            return ForRead::Closed { seq };
        }
        let i = slot(seq);
        if let Some(seg) = &st.slots[i] {
            if seg.seq() == seq {
                return ForRead::Found {
                    seg: seg.clone(),
                    latest,
                };
            }
        }
        if seq == st.next || (st.next == 0 && seq == 1) {
            // A subscriber preconnecting just ahead of the publisher.
            let seg = Segment::new(seq);
            if let Some(old) = st.slots[i].replace(seg.clone()) {
                old.evict();
            }
            return ForRead::Found { seg, latest };
        }
        ForRead::Missing { seq, latest }
    }

    /// Resolves a POST's seq (-1 = the write head) to the segment it writes; `None` if closed.
    pub(crate) fn for_write(&self, seq: i64, reset: bool) -> Option<ForWrite> {
        let mut st = self.state.lock();
        if st.closed {
            return None;
        }
        let seq = if seq == -1 { st.next } else { seq };
        if reset {
            // A restarted publisher: wake readers stuck on segments its predecessor never finished.
            for seg in st.slots.iter().flatten() {
                if seg.seq() < seq {
                    seg.close();
                }
            }
        }
        let i = slot(seq);
        if let Some(seg) = &st.slots[i] {
            if seg.seq() == seq {
                if let Some(writer) = seg.claim() {
                    return Some(ForWrite {
                        seg: seg.clone(),
                        seq,
                        writer: Some(writer),
                    });
                }
                if !seg.is_closed_empty() {
                    // Already has data: readers keep what they saw; this body is dropped.
                    return Some(ForWrite {
                        seg: seg.clone(),
                        seq,
                        writer: None,
                    });
                }
            }
        }
        let seg = Segment::new(seq);
        let writer = seg.claim();
        if let Some(old) = st.slots[i].replace(seg.clone()) {
            if old.seq() != seq {
                old.evict();
            }
        }
        Some(ForWrite { seg, seq, writer })
    }

    /// The first byte of segment `seq` arrived: it becomes the current segment.
    pub(crate) fn first_byte(&self, seq: i64) {
        let mut st = self.state.lock();
        // Never backwards: segment n+1's first byte may arrive before n's.
        st.next = st.next.max(seq.saturating_add(1));
        st.write_time = Instant::now();
    }

    /// A preconnected POST for `seq` ended without data: move the head past it anyway, so the
    /// publisher's next seq is not refused (as the reference does).
    pub(crate) fn skip_past(&self, seq: i64) {
        let mut st = self.state.lock();
        st.next = st.next.max(seq.saturating_add(1));
        st.write_time = Instant::now();
    }

    /// Closes one segment; false if its slot does not hold `seq`.
    pub(crate) fn close_seq(&self, seq: i64) -> bool {
        let st = self.state.lock();
        match &st.slots[slot(seq)] {
            Some(seg) if seg.seq() == seq => {
                seg.close();
                true
            }
            _ => false,
        }
    }

    /// Closes the channel and every segment in its ring.
    pub(crate) fn close(&self) {
        let segs: Vec<Arc<Segment>> = {
            let mut st = self.state.lock();
            st.closed = true;
            st.slots.iter_mut().filter_map(Option::take).collect()
        };
        for seg in segs {
            seg.close();
        }
    }

    /// Idle for longer than `idle` (no segment started)?
    fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.state.lock().write_time)
    }

    /// Writes one whole segment at the write head (used by the change feed).
    pub(crate) fn publish_whole(&self, data: Bytes) {
        let Some(w) = self.for_write(-1, false) else {
            return;
        };
        let Some(writer) = w.writer else {
            return;
        };
        if let Append::Stored { first: true } = w.seg.append(writer, data) {
            self.first_byte(w.seq);
        }
        w.seg.close();
    }
}

/// Why a channel could not be found or created.
pub(crate) enum Lookup {
    /// It does not exist and this request may not create it.
    NotFound,
    /// Creating it was refused.
    Refused(ServerError),
    /// The server is shutting down.
    ShuttingDown,
}

/// All channels of a server.
pub(crate) struct Registry {
    map: Mutex<HashMap<String, Arc<Channel>>>,
    max_channels: usize,
    changes: bool,
    shutting_down: AtomicBool,
    /// Serial numbers of accepted connections, in accept order (see [`Registry::accepted`]).
    connections: AtomicU64,
    /// Recently deleted channels (locked inside `map`, never the other way round).
    deleted: Mutex<Tombstones>,
    /// The server's counters (`GET /metrics`).
    pub(crate) counters: super::stats::Counters,
}

/// Channels deleted within [`TOMBSTONE_TTL`], each with the last connection serial handed out
/// when it was deleted: a request on a connection that was ready for it before the delete
/// (accepted, or done with its previous answer) may have been on its way (a publisher's
/// preconnected POST that a busy server reads only after the DELETE), so it must not bring the
/// channel back through autocreate.
#[derive(Default)]
struct Tombstones {
    by_name: HashMap<String, u64>,
    /// Oldest first, for expiry.
    order: VecDeque<(Instant, String, u64)>,
}

/// How long a deleted channel refuses autocreate from earlier connections: as long as a new
/// connection may wait before its first request (`FIRST_REQUEST`), so no request that was on its
/// way at the delete is read after the tombstone expired.
pub(crate) const TOMBSTONE_TTL: Duration = super::FIRST_REQUEST;

impl Tombstones {
    fn record(&mut self, name: &str, serial: u64, now: Instant, cap: usize) {
        self.expire(now);
        while self.order.len() >= cap.max(1) {
            self.pop_oldest();
        }
        self.by_name.insert(name.to_string(), serial);
        self.order.push_back((now, name.to_string(), serial));
    }

    /// Whether `name` was deleted after the connection with serial `accepted` was accepted.
    fn covers(&mut self, name: &str, accepted: u64, now: Instant) -> bool {
        self.expire(now);
        self.by_name.get(name).is_some_and(|&at| accepted <= at)
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) >= TOMBSTONE_TTL)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, name, serial)) = self.order.pop_front() {
            // A later delete of the same name replaced this entry: keep that one.
            if self.by_name.get(&name) == Some(&serial) {
                self.by_name.remove(&name);
            }
        }
    }
}

/// Checks a channel name: the characters of one URL path segment that need no escaping.
pub(crate) fn validate_name(name: &str) -> Result<(), ServerError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@".contains(c);
    if name.is_empty() || name.len() > MAX_NAME || name == "." || name == ".." {
        return Err(ServerError::InvalidName(name.to_string()));
    }
    if !name.chars().all(ok_char) {
        return Err(ServerError::InvalidName(name.to_string()));
    }
    Ok(())
}

impl Registry {
    /// A registry; with `changes`, the `_changes` feed channel exists from the start.
    pub(crate) fn new(max_channels: usize, changes: bool) -> Registry {
        let reg = Registry {
            map: Mutex::new(HashMap::new()),
            max_channels,
            changes,
            shutting_down: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            deleted: Mutex::new(Tombstones::default()),
            counters: Default::default(),
        };
        if changes {
            reg.map.lock().insert(
                CHANGES.to_string(),
                Arc::new(Channel::new(CHANGES, "application/json")),
            );
        }
        reg
    }

    /// The channel called `name`, if it exists.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Channel>> {
        self.map.lock().get(name).cloned()
    }

    /// A serial for a connection ready for a request: just accepted (call in accept order), or
    /// done with its previous answer (keep-alive).
    pub(crate) fn ready(&self) -> u64 {
        self.connections.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The channel called `name`, creating it (with `mime`) when `may_create`.
    pub(crate) fn get_or_create(
        &self,
        name: &str,
        mime: &str,
        may_create: bool,
    ) -> Result<Arc<Channel>, Lookup> {
        self.get_or_create_for(name, mime, may_create, None)
    }

    /// [`get_or_create`](Self::get_or_create) for a request that is the first on the connection
    /// with serial `accepted`: such a request does not recreate a channel deleted after that
    /// connection was accepted (within [`TOMBSTONE_TTL`]); it was on its way before the delete.
    pub(crate) fn get_or_create_for(
        &self,
        name: &str,
        mime: &str,
        may_create: bool,
        accepted: Option<u64>,
    ) -> Result<Arc<Channel>, Lookup> {
        let ch = {
            let mut map = self.map.lock();
            if let Some(ch) = map.get(name) {
                return Ok(ch.clone());
            }
            // During shutdown a missing channel was closed by it, not deleted: a 404 would tell
            // clients the stream is over, where a 503 lets them retry against the restarted server.
            if self.shutting_down.load(Ordering::Acquire) {
                return Err(Lookup::ShuttingDown);
            }
            if !may_create {
                return Err(Lookup::NotFound);
            }
            if let Some(accepted) = accepted {
                if self.deleted.lock().covers(name, accepted, Instant::now()) {
                    tracing::debug!(
                        channel = name,
                        "not recreating a channel deleted after this request's connection opened"
                    );
                    return Err(Lookup::NotFound);
                }
            }
            validate_name(name).map_err(Lookup::Refused)?;
            if map.len() >= self.max_channels {
                self.counters
                    .refused_channels
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Lookup::Refused(ServerError::TooManyChannels {
                    limit: self.max_channels,
                }));
            }
            let ch = Arc::new(Channel::new(name, mime));
            map.insert(name.to_string(), ch.clone());
            ch
        };
        tracing::debug!(channel = name, "created channel");
        self.announce("added", name);
        Ok(ch)
    }

    /// Closes and removes a channel (a DELETE); false if it did not exist. Requests already on
    /// their way when it was deleted cannot create it again (see [`Tombstones`]).
    pub(crate) fn close(&self, name: &str) -> bool {
        self.remove(name, true)
    }

    fn remove(&self, name: &str, tombstone: bool) -> bool {
        let ch = {
            let mut map = self.map.lock();
            let Some(ch) = map.remove(name) else {
                return false;
            };
            if tombstone {
                let serial = self.connections.load(Ordering::SeqCst);
                self.deleted
                    .lock()
                    .record(name, serial, Instant::now(), self.max_channels);
            }
            ch
        };
        ch.close();
        tracing::debug!(channel = name, "closed channel");
        self.announce("removed", name);
        true
    }

    /// Closes every channel (except `_`-prefixed ones) idle for longer than `idle`.
    pub(crate) fn sweep(&self, idle: Duration) -> usize {
        let now = Instant::now();
        let stale: Vec<String> = self
            .map
            .lock()
            .values()
            .filter(|c| !c.name().starts_with('_') && c.idle_for(now) > idle)
            .map(|c| c.name().to_string())
            .collect();
        let mut swept = 0;
        for name in stale {
            // Idle, so no request of its publisher is on its way: no tombstone.
            if self.remove(&name, false) {
                tracing::info!(channel = %name, "closed idle channel");
                swept += 1;
            }
        }
        swept
    }

    /// Refuses new channels and closes every channel, waking every waiter.
    pub(crate) fn close_all(&self) -> usize {
        self.shutting_down.store(true, Ordering::Release);
        let all: Vec<Arc<Channel>> = self.map.lock().drain().map(|(_, c)| c).collect();
        for ch in &all {
            ch.close();
        }
        all.len()
    }

    /// Whether `close_all` ran.
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// The counters now, with the number of channels and of connections accepted.
    pub(crate) fn stats(&self) -> super::ServerStats {
        let channels = self.map.lock().len();
        self.counters
            .snapshot(channels, self.connections.load(Ordering::Relaxed))
    }

    /// Names of every channel, sorted.
    pub(crate) fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self.map.lock().keys().cloned().collect();
        names.sort();
        names
    }

    /// Writes `{"added":[name]}` / `{"removed":[name]}` to the change feed.
    fn announce(&self, what: &str, name: &str) {
        if !self.changes || name == CHANGES {
            return;
        }
        let Some(feed) = self.get(CHANGES) else {
            return;
        };
        let body = serde_json::json!({ what: [name] });
        feed.publish_whole(Bytes::from(body.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("abc-DEF_0.9").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"x".repeat(300)).is_err());
    }

    #[test]
    fn a_deleted_channel_is_not_recreated_by_a_connection_accepted_before_the_delete() {
        let reg = Registry::new(10, false);
        let early = reg.ready();
        reg.get_or_create("ch", "", true).ok().unwrap();
        assert!(reg.close("ch"));
        let late = reg.ready();
        assert!(matches!(
            reg.get_or_create_for("ch", "", true, Some(early)),
            Err(Lookup::NotFound)
        ));
        assert!(reg
            .get_or_create_for("other", "", true, Some(early))
            .is_ok());
        assert!(reg.get_or_create_for("ch", "", true, Some(late)).is_ok());
        // Swept (idle) channels leave no tombstone.
        assert!(reg.remove("other", false));
        assert!(reg
            .get_or_create_for("other", "", true, Some(early))
            .is_ok());
    }

    #[test]
    fn tombstones_expire_and_stay_within_their_cap() {
        let mut t = Tombstones::default();
        let now = Instant::now();
        t.record("a", 5, now, 2);
        t.record("b", 6, now, 2);
        t.record("c", 7, now, 2);
        assert_eq!(t.order.len(), 2);
        assert!(!t.covers("a", 1, now), "the oldest went past the cap");
        assert!(t.covers("b", 6, now) && !t.covers("b", 7, now));
        assert!(!t.covers("c", 1, now + TOMBSTONE_TTL), "expired");
        assert!(t.by_name.is_empty() && t.order.is_empty());
    }

    #[test]
    fn ring_evicts_and_reports_latest() {
        let ch = Channel::new("c", "");
        for seq in 0..7 {
            let w = ch.for_write(seq, false).unwrap();
            w.seg.append(w.writer.unwrap(), Bytes::from_static(b"x"));
            ch.first_byte(seq);
            w.seg.close();
        }
        assert!(matches!(
            ch.for_read(0),
            ForRead::Missing { seq: 0, latest: 7 }
        ));
        assert!(matches!(ch.for_read(2), ForRead::Found { latest: 7, .. }));
        assert!(matches!(ch.for_read(-2), ForRead::Found { seg, .. } if seg.seq() == 6));
    }
}
