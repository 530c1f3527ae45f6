//! The reporter's counters: every outcome of every event and every request.

use serde::Serialize;
use spool::fallback::DiskCounters;
use std::sync::atomic::{AtomicBool, AtomicU64};

/// Live counters, shared by `emit`, the writer thread and the sender.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub accepted: AtomicU64,
    pub accepted_memory: AtomicU64,
    pub requests: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub retries: AtomicU64,
    pub splits_413: AtomicU64,
    pub dropped_buffer_full: AtomicU64,
    pub dropped_invalid: AtomicU64,
    pub dropped_oversize: AtomicU64,
    pub dropped_oversize_local: AtomicU64,
    pub dropped_400: AtomicU64,
    pub status_401: AtomicU64,
    pub status_429: AtomicU64,
    pub status_5xx: AtomicU64,
    pub status_other: AtomicU64,
    pub network_errors: AtomicU64,
    pub reports: AtomicU64,
    pub paused: AtomicBool,
    /// The disk buffer's: recovered, dropped_spool, disk_errors, disk_ok.
    pub disk: DiskCounters,
    pub gzip: AtomicBool,
}

/// A point-in-time copy of the reporter's counters (all monotonic except the "now" gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReporterStats {
    /// Events handed to `emit`.
    pub emitted: u64,
    /// Events stored in the buffer (disk, or memory when the disk is unusable): from here on
    /// only a 200, a 400, a 413 on a lone event or the buffer cap removes them.
    pub accepted: u64,
    /// Of `accepted`, those stored in memory because the disk was unusable (lost on a crash).
    pub accepted_memory: u64,
    /// Events found on disk at start, left by a previous run (re-sent).
    pub recovered: u64,
    /// Now: events between `emit` and the buffer.
    pub handoff_pending: u64,
    /// Now: events buffered and not yet acknowledged by a 200.
    pub buffered: u64,
    /// Now: of `buffered`, on disk.
    pub buffered_disk: u64,
    /// Now: of `buffered`, in memory.
    pub buffered_memory: u64,
    /// Requests made.
    pub requests: u64,
    /// Events in those requests (an event re-sent counts again).
    pub sent: u64,
    /// Events removed from the buffer by a 200.
    pub acked: u64,
    /// Requests that re-sent events a previous request failed to deliver.
    pub retries: u64,
    /// Batches split in halves after a 413.
    pub splits_413: u64,
    /// Events dropped by `emit` because the handoff queue was full (or the reporter closed).
    pub dropped_handoff: u64,
    /// Events dropped because `max_buffer` events were buffered: the oldest in memory first (they
    /// would be lost on a crash anyway, and dropping them needs no disk write, which a full disk
    /// could refuse), then the oldest on disk.
    pub dropped_buffer_full: u64,
    /// Events dropped by the disk buffer: its byte cap, or cut as corrupt (torn by a crash).
    pub dropped_spool: u64,
    /// Events that are not sendable envelopes (no string id, no object data, no data.type).
    pub dropped_invalid: u64,
    /// Events too large for any request: refused at store time, or alone answered 413.
    pub dropped_oversize: u64,
    /// Events in batches answered 400 (malformed), dropped.
    pub dropped_400: u64,
    /// 401 answers (sending pauses until the API key changes).
    pub status_401: u64,
    /// 429 answers.
    pub status_429: u64,
    /// 5xx answers.
    pub status_5xx: u64,
    /// Other unexpected answers (3xx, other 4xx): kept and retried with backoff.
    pub status_other: u64,
    /// Requests that failed without an answer (connect, timeout, reset).
    pub network_errors: u64,
    /// Failed disk operations (append, ack, open).
    pub disk_errors: u64,
    /// `telemetry_dropped` reports the reporter enqueued about its own local drops.
    pub reports: u64,
    /// Now: paused by a 401 until the key changes.
    pub paused: bool,
    /// Now: the disk buffer is in use (false: memory fallback, or disabled).
    pub disk_ok: bool,
    /// Now: request bodies are gzip-compressed.
    pub gzip: bool,
}

impl ReporterStats {
    /// Every event dropped, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_handoff
            + self.dropped_buffer_full
            + self.dropped_spool
            + self.dropped_invalid
            + self.dropped_oversize
            + self.dropped_400
    }
}
