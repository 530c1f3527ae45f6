//! One segment: an append-only list of shared `Bytes` chunks that readers stream while it grows.
//!
//! Chunks are never copied between readers: each reader clones the `Bytes` handles (a reference
//! count bump) and writes them straight to its socket.

use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// One segment of a channel.
pub(crate) struct Segment {
    seq: i64,
    state: Mutex<State>,
    /// Woken on every append and on close: readers wait on it.
    data: Notify,
    /// Woken only on close: writers wait on it without being woken by their own appends.
    closed_notify: Notify,
    closed: AtomicBool,
    /// Requests holding it now (see [`super::SegmentInfo`]): GETs, and POSTs with the right to write.
    readers: AtomicUsize,
    writers: AtomicUsize,
}

/// One request counted on a segment for as long as it lives.
pub(crate) struct Holding<'a>(&'a AtomicUsize);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct State {
    chunks: Vec<Bytes>,
    len: u64,
    closed: bool,
    /// Evicted from the ring: its data is dropped so a slow reader cannot pin it.
    evicted: bool,
    /// Generation of the writer allowed to append (bumped when a POST claims the segment).
    writer: u64,
}

/// What a reader found when it looked for data past its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Read {
    /// New chunks were copied out.
    Data,
    /// Nothing new yet; wait for a notification.
    Wait,
    /// The segment is closed and the reader has everything.
    Eof,
    /// The segment fell out of the ring and its data is gone.
    Evicted,
}

/// Result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Append {
    /// Stored; `first` is true when these are the segment's first bytes.
    Stored { first: bool },
    /// The segment was closed (deleted, reset, evicted, channel gone): the bytes were dropped.
    Closed,
    /// Another POST claimed the segment before this writer's first byte: the bytes were dropped.
    Superseded,
}

impl Segment {
    /// A new, empty, open segment.
    pub(crate) fn new(seq: i64) -> Arc<Segment> {
        Arc::new(Segment {
            seq,
            state: Mutex::new(State::default()),
            data: Notify::new(),
            closed_notify: Notify::new(),
            closed: AtomicBool::new(false),
            readers: AtomicUsize::new(0),
            writers: AtomicUsize::new(0),
        })
    }

    /// Counts a GET streaming (or waiting for) this segment until the guard drops.
    pub(crate) fn reading(&self) -> Holding<'_> {
        self.readers.fetch_add(1, Ordering::Relaxed);
        Holding(&self.readers)
    }

    /// Counts a POST writing (or preconnected to) this segment until the guard drops.
    pub(crate) fn writing(&self) -> Holding<'_> {
        self.writers.fetch_add(1, Ordering::Relaxed);
        Holding(&self.writers)
    }

    /// What the segment holds and who holds it, now.
    pub(crate) fn info(&self) -> super::SegmentInfo {
        let st = self.state.lock();
        super::SegmentInfo {
            seq: self.seq,
            readers: self.readers.load(Ordering::Relaxed),
            writers: self.writers.load(Ordering::Relaxed),
            bytes: st.len,
            closed: st.closed,
        }
    }

    /// The sequence number of this segment.
    pub(crate) fn seq(&self) -> i64 {
        self.seq
    }

    /// Bytes stored so far.
    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.state.lock().len
    }

    /// Whether the segment is closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Lets a POST write this segment if it has no data and is open; returns its writer generation.
    /// A later claim supersedes an earlier writer that has not sent a byte (a retried POST).
    pub(crate) fn claim(&self) -> Option<u64> {
        let mut st = self.state.lock();
        if st.closed || st.len > 0 {
            return None;
        }
        st.writer += 1;
        Some(st.writer)
    }

    /// Closed without data: a new POST may replace it.
    pub(crate) fn is_closed_empty(&self) -> bool {
        let st = self.state.lock();
        st.closed && st.len == 0
    }

    /// Appends a chunk on behalf of writer `writer`.
    pub(crate) fn append(&self, writer: u64, chunk: Bytes) -> Append {
        let first;
        {
            let mut st = self.state.lock();
            if st.closed {
                return Append::Closed;
            }
            if st.writer != writer {
                return Append::Superseded;
            }
            first = st.len == 0;
            st.len += chunk.len() as u64;
            st.chunks.push(chunk);
        }
        self.data.notify_waiters();
        Append::Stored { first }
    }

    /// Closes the segment: readers drain what it holds and finish, waiting writers wake.
    pub(crate) fn close(&self) {
        {
            let mut st = self.state.lock();
            if st.closed {
                return;
            }
            st.closed = true;
        }
        self.closed.store(true, Ordering::Release);
        self.data.notify_waiters();
        self.closed_notify.notify_waiters();
    }

    /// Closes the segment and drops its data, so that memory stays bounded by the ring.
    pub(crate) fn evict(&self) {
        {
            let mut st = self.state.lock();
            st.evicted = true;
            st.closed = true;
            st.chunks = Vec::new();
        }
        self.closed.store(true, Ordering::Release);
        self.data.notify_waiters();
        self.closed_notify.notify_waiters();
    }

    /// Copies up to `max` chunk handles starting at chunk index `pos` into `out`.
    pub(crate) fn read_from(&self, pos: usize, out: &mut Vec<Bytes>, max: usize) -> Read {
        let st = self.state.lock();
        if st.evicted {
            return Read::Evicted;
        }
        if pos < st.chunks.len() {
            let end = st.chunks.len().min(pos + max);
            out.extend(st.chunks[pos..end].iter().cloned());
            return Read::Data;
        }
        if st.closed {
            Read::Eof
        } else {
            Read::Wait
        }
    }

    /// Whether a reader at chunk index `pos` has something to do (data, close or eviction).
    pub(crate) fn has_news(&self, pos: usize) -> bool {
        let st = self.state.lock();
        st.evicted || st.closed || pos < st.chunks.len()
    }

    /// A future woken on the next append or close; `enable` it before checking `has_news`.
    pub(crate) fn data_notified(&self) -> Notified<'_> {
        self.data.notified()
    }

    /// Resolves once the segment is closed.
    pub(crate) async fn wait_closed(&self) {
        loop {
            let notified = self.closed_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_close() {
        let s = Segment::new(3);
        let w = s.claim().unwrap();
        assert_eq!(
            s.append(w, Bytes::from_static(b"ab")),
            Append::Stored { first: true }
        );
        assert_eq!(
            s.append(w, Bytes::from_static(b"c")),
            Append::Stored { first: false }
        );
        let mut out = Vec::new();
        assert_eq!(s.read_from(0, &mut out, 1), Read::Data);
        assert_eq!(out, vec![Bytes::from_static(b"ab")]);
        assert_eq!(s.read_from(2, &mut out, 8), Read::Wait);
        s.close();
        assert_eq!(s.read_from(2, &mut out, 8), Read::Eof);
        assert_eq!(s.append(w, Bytes::from_static(b"d")), Append::Closed);
        assert_eq!(s.len(), 3);
        assert!(s.claim().is_none());
    }

    #[test]
    fn later_claim_supersedes_idle_writer() {
        let s = Segment::new(0);
        let a = s.claim().unwrap();
        let b = s.claim().unwrap();
        assert_eq!(s.append(a, Bytes::from_static(b"x")), Append::Superseded);
        assert_eq!(
            s.append(b, Bytes::from_static(b"y")),
            Append::Stored { first: true }
        );
        assert!(
            s.claim().is_none(),
            "a segment with data is never re-claimed"
        );
    }

    #[test]
    fn evict_drops_data() {
        let s = Segment::new(0);
        let w = s.claim().unwrap();
        s.append(w, Bytes::from_static(b"x"));
        s.evict();
        let mut out = Vec::new();
        assert_eq!(s.read_from(0, &mut out, 8), Read::Evicted);
        assert!(out.is_empty());
    }
}
