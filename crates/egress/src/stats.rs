//! The driver's counters: every outcome of every record.

use crate::buffer::DiskCounters;
use crate::Shared;
use serde::Serialize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};

/// Live counters, shared by `emit`, the writer thread and the sender.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub accepted: AtomicU64,
    pub accepted_memory: AtomicU64,
    pub delivered: AtomicU64,
    pub retries: AtomicU64,
    pub write_errors: AtomicU64,
    pub dropped_buffer_full: AtomicU64,
    /// By reason, indexed like `Shared::reasons`.
    pub drops: Vec<AtomicU64>,
    pub reports: AtomicU64,
    pub paused: AtomicBool,
    /// The disk buffer's: recovered, dropped_spool, disk_errors, disk_ok.
    pub disk: DiskCounters,
}

impl Counters {
    pub fn new(reasons: usize) -> Counters {
        Counters {
            drops: (0..reasons).map(|_| AtomicU64::new(0)).collect(),
            ..Counters::default()
        }
    }
}

/// The most drop reasons a service may declare (with [`crate::Reason::OVERSIZE`]).
pub const MAX_REASONS: usize = 8;

/// A point-in-time copy of the driver's counters (all monotonic except the "now" gauges).
/// Invariant, exact once idle: `emitted + reports + recovered == delivered + dropped() + buffered
/// + handoff_pending`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DriverStats {
    /// Events handed to `emit`.
    pub emitted: u64,
    /// Events stored in the buffer (disk, or memory when the disk is unusable): from here on only
    /// a resolution by the service or the cap removes them.
    pub accepted: u64,
    /// Of `accepted`, those stored in memory because the disk was unusable (lost on a crash).
    pub accepted_memory: u64,
    /// Events found on disk at start, left by a previous run (sent first).
    pub recovered: u64,
    /// Now: events between `emit` and the buffer.
    pub handoff_pending: u64,
    /// Now: events buffered and not yet resolved.
    pub buffered: u64,
    /// Now: of `buffered`, on disk.
    pub buffered_disk: u64,
    /// Now: of `buffered`, in memory.
    pub buffered_memory: u64,
    /// Now: bytes of the disk buffer's segment files (framing included; what its byte cap caps).
    pub buffered_disk_bytes: u64,
    /// Events the destination took (removed from the buffer).
    pub delivered: u64,
    /// Sends of a batch (or its head) that failed before.
    pub retries: u64,
    /// Failed writes to the destination, as the service counts them.
    pub write_errors: u64,
    /// Dropped by `emit`: the handoff queue was full, or the driver had shut down.
    pub dropped_handoff: u64,
    /// Dropped to keep under the cap (oldest first).
    pub dropped_buffer_full: u64,
    /// Dropped by the disk buffer: its byte cap, or cut as corrupt (torn by a crash).
    pub dropped_spool: u64,
    /// Dropped by the encoder or the service (and records too large for the disk buffer), by
    /// reason name (unused entries: `("", 0)`); see [`DriverStats::dropped_by`].
    pub drops: [(&'static str, u64); MAX_REASONS],
    /// Failed disk operations (open, append, read, ack).
    pub disk_errors: u64,
    /// `telemetry_dropped` reports the driver stored about its own drops.
    pub reports: u64,
    /// Now: paused ([`crate::Outcome::Pause`]) until [`crate::Driver::resume`].
    pub paused: bool,
    /// Now: the disk buffer is in use (false: memory fallback, or none configured).
    pub disk_ok: bool,
}

impl DriverStats {
    /// Events dropped for the reason named `name`.
    pub fn dropped_by(&self, name: &str) -> u64 {
        self.drops
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    }

    /// Every event dropped, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_handoff
            + self.dropped_buffer_full
            + self.dropped_spool
            + self.drops.iter().map(|(_, v)| v).sum::<u64>()
    }
}

pub(crate) fn snapshot(s: &Shared) -> DriverStats {
    let c = &s.counters;
    let disk = s.buffer.disk_len();
    let mem = s.buffer.mem_len();
    DriverStats {
        emitted: s.handoff.emitted.load(Relaxed),
        accepted: c.accepted.load(Relaxed),
        accepted_memory: c.accepted_memory.load(Relaxed),
        recovered: c.disk.recovered.load(Relaxed),
        handoff_pending: s.handoff.pending(),
        buffered: disk + mem,
        buffered_disk: disk,
        buffered_memory: mem,
        buffered_disk_bytes: s.buffer.spool().map_or(0, |sp| sp.bytes()),
        delivered: c.delivered.load(Relaxed),
        retries: c.retries.load(Relaxed),
        write_errors: c.write_errors.load(Relaxed),
        dropped_handoff: s.handoff.dropped.load(Relaxed),
        dropped_buffer_full: c.dropped_buffer_full.load(Relaxed),
        dropped_spool: c.disk.dropped_spool.load(Relaxed),
        drops: std::array::from_fn(|i| match (s.reasons.get(i), c.drops.get(i)) {
            (Some(r), Some(n)) => (r.name, n.load(Relaxed)),
            _ => ("", 0),
        }),
        disk_errors: c.disk.disk_errors.load(Relaxed),
        reports: c.reports.load(Relaxed),
        paused: c.paused.load(Relaxed),
        disk_ok: c.disk.disk_ok.load(Relaxed),
    }
}
