//! A crash-safe, segmented, append-only disk buffer for telemetry awaiting delivery.
//!
//! The buffered-egress driver (the `egress` crate, behind the HTTP metrics reporter and the Kafka
//! sink) appends every event it accepts here, reads batches from the oldest, and acknowledges a
//! batch once its destination took it. Nothing that [`Spool::append`]
//! accepted is lost to a crash of the process, including `kill -9`.
//!
//! # Layout on disk
//!
//! ```text
//! <dir>/00000000000000000000.log   segment: records with ids 0, 1, 2, ... (first id in the name)
//! <dir>/00000000000000004096.log   the last segment is the one being appended to
//! <dir>/ack                        the acknowledged cursor (next unacknowledged id), 16 bytes
//! <dir>/LOCK                       flock(2)ed while a Spool has the directory open
//! ```
//!
//! A record is `[len: u32 LE][crc: u32 LE][payload]`; `crc` is CRC-32 (IEEE, `crc32fast`) over
//! the four length bytes followed by the payload, so a torn or zero-filled tail never checks out.
//! Ids are consecutive inside a segment; between segments they only increase (a gap means records
//! were lost to corruption). The `ack` file is `"SPAK"`, the next unacknowledged id (u64 LE) and a
//! CRC-32 of those 12 bytes; it is replaced atomically (write `ack.tmp`, fsync, rename, fsync the
//! directory), so it is always either the old or the new cursor.
//!
//! # Durability guarantees
//!
//! * When [`Spool::append`] returns `Ok(id)`, the record has been handed to the kernel with one
//!   `pwrite(2)` (no user-space buffering): it survives a crash or `kill -9` of the process.
//! * It survives a power loss or kernel crash once it has been fsynced, which depends on
//!   [`SyncPolicy`]:
//!   * `Group { interval, max_unsynced_bytes }` (the default, 10 ms / 1 MiB): a background
//!     thread fsyncs at most `interval` after the first unsynced append, or at once when
//!     `max_unsynced_bytes` have piled up. One fsync covers every append before it (group
//!     commit), so the loss window on power failure is bounded by `interval` (plus the fsync's
//!     own duration) and appends never wait for the disk.
//!   * `Always`: `append` returns only after the record is fsynced (concurrent appenders share
//!     one fsync).
//!   * `Never`: the spool never fsyncs on its own (the OS writes back when it likes).
//! * [`Spool::sync`] waits until everything appended before the call is fsynced, whatever the
//!   policy.
//! * [`Spool::ack`] is durable when it returns (except under `Never`, where it is only atomic).
//! * After a power loss, records that were never fsynced may be missing from the tail; a
//!   record is never replayed as garbage: recovery on [`Spool::open`] cuts the log at the first
//!   short header, short payload or bad CRC of each segment and truncates the file there (see
//!   [`RecoveryReport`]). Records after a corrupt one *in the same segment* are lost with it,
//!   because their boundaries can no longer be trusted; later segments are kept.
//! * Ids only grow, across restarts too. The one exception is power loss: ids of records that were
//!   never fsynced (and never acknowledged) can be handed out again. An acknowledged id is never
//!   reused, and records are never reordered or duplicated.
//!
//! # Size cap
//!
//! When an append would take the segment files over `max_bytes`, the oldest whole segment files
//! are deleted, acknowledged or not, and their unacknowledged records are counted in
//! [`Spool::dropped_records`] / [`Spool::take_dropped`] so the caller can report them
//! downstream (as a `telemetry_dropped` event). A record bigger than `max_record_bytes` or than
//! the cap is rejected with [`SpoolError::RecordTooLarge`]. A full disk (`ENOSPC`) fails the one
//! append with [`SpoolError::DiskFull`] and leaves the log exactly as before the call (a short
//! write is truncated back, and the next append overwrites from the same offset anyway).
//!
//! # Cost and threads
//!
//! `Spool` is `Send + Sync`; every method takes `&self` and holds one internal mutex briefly.
//! * `append` under `Group`/`Never`: the lock plus one `pwrite` of the framed record (about
//!   0.5 µs median, 4 µs p99 for a 400-byte event); it never waits for an fsync. The kernel can
//!   still stall a write for milliseconds now and then (journal commits, dirty-page throttling;
//!   `trickle-relay bench spool` shows the tail), so keep it off latency-critical threads: the
//!   telemetry sink's queue in front of the reporter absorbs that. Calling it from an async
//!   task directly is acceptable; rolling to a new segment adds a file create every
//!   `segment_bytes`.
//! * `append` under `Always`, `sync`, `ack` and `read_batch` wait on the disk: call them from
//!   `spawn_blocking`. `ack` replaces the cursor file (two fsyncs: ~8 ms on the development VM,
//!   and ~2 ms even under `Never`, since ext4 flushes a file renamed over another), which is
//!   noise at one ack per HTTP request. `read_batch` of 500 events takes well under a
//!   millisecond from the page cache, under the lock.
//!
//! Unix only (`pwrite`, `flock`).
//! * `len`, `bytes`, `dropped_records`, `take_dropped`: a lock and a few additions.
//!
//! # Why a hand-written log and not an embedded database
//!
//! The workload is a FIFO queue: append at the tail, read and delete from the head. A segmented
//! log gives exactly what it needs and nothing it pays for: group commit with a bounded loss
//! window (one fsync for many appends, off the caller's path), a cheap per-record CRC that finds
//! and cuts a torn tail on recovery, and O(1) drop-oldest / reclaim-acknowledged by deleting whole
//! segment files. An embedded B-tree such as redb commits per transaction with an fsync (or
//! gives up durability entirely), rewrites pages and its free list on every insert and delete,
//! and needs compaction to give space back; batching transactions to amortize the fsync means
//! buffering events in memory, which is the loss window this crate exists to remove.
//! Measured once on the development VM's ext4 disk with 400-byte events, one insert per
//! transaction: redb 2.6 with `Durability::Immediate` took 235 inserts/s (fsync-bound, like
//! `SyncPolicy::Always` here at 241/s); with `Durability::None` 3,843 inserts/s, and its file
//! grew to 1 GB for 20,000 events because pages are only reclaimed by a durable commit. This log
//! took about 630,000 appends/s under group commit, each one safe from a process crash.

mod error;
mod format;
mod recovery;
mod spool;

use std::time::Duration;

pub use error::SpoolError;
pub use spool::Spool;

/// How often the spool fsyncs; see the crate docs for what each choice guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fsync before every `append` returns (concurrent appends share one fsync).
    Always,
    /// Group commit: fsync at most `interval` after the first unsynced append, or as soon as
    /// `max_unsynced_bytes` are waiting; `append` itself never waits for the disk.
    Group {
        /// The longest a record stays un-fsynced (the power-loss window).
        interval: Duration,
        /// Start an fsync early once this many bytes are un-fsynced.
        max_unsynced_bytes: u64,
    },
    /// Never fsync on our own; [`Spool::sync`] still forces one.
    Never,
}

impl SyncPolicy {
    /// The default group-commit interval: 10 ms bounds the power-loss window far below the
    /// reporter's 2 s flush interval while capping background fsyncs at 100 per second, which
    /// even a slow disk sustains.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(10);
    /// The default early-fsync threshold of the group policy.
    pub const DEFAULT_MAX_UNSYNCED_BYTES: u64 = 1 << 20;
}

impl Default for SyncPolicy {
    /// Group commit every 10 ms or every 1 MiB.
    fn default() -> Self {
        SyncPolicy::Group {
            interval: SyncPolicy::DEFAULT_INTERVAL,
            max_unsynced_bytes: SyncPolicy::DEFAULT_MAX_UNSYNCED_BYTES,
        }
    }
}

/// Tunables of a [`Spool`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Cap on the total size of the segment files (framing included); the oldest segments are
    /// dropped to stay under it. Default 128 MiB.
    pub max_bytes: u64,
    /// A segment is closed and a new one started once it would grow past this. It is also the
    /// granularity of dropping and of reclaiming acknowledged space. Default 8 MiB.
    pub segment_bytes: u64,
    /// The largest payload accepted. Default 1 MiB (the metrics API takes at most 1,000,000 bytes
    /// per request).
    pub max_record_bytes: usize,
    /// When to fsync. Default: group commit every 10 ms.
    pub sync: SyncPolicy,
}

impl Default for SpoolOptions {
    /// 128 MiB cap in 8 MiB segments, records up to 1 MiB, group commit every 10 ms.
    fn default() -> Self {
        SpoolOptions {
            max_bytes: 128 << 20,
            segment_bytes: 8 << 20,
            max_record_bytes: 1 << 20,
            sync: SyncPolicy::default(),
        }
    }
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its id: increasing, unique, the argument to [`Spool::ack`].
    pub id: u64,
    /// The bytes given to [`Spool::append`].
    pub payload: Vec<u8>,
}

/// What [`Spool::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files kept.
    pub segments: usize,
    /// Unacknowledged records recovered (equal to [`Spool::len`] right after opening).
    pub records: u64,
    /// Bytes cut off the ends of segments: torn tails and everything after a corrupt record.
    pub truncated_bytes: u64,
    /// Records known to be lost to corruption or a torn tail. Exact when a later segment pins the
    /// next id (the gap up to it); a cut tail of the last segment counts as one, since how many
    /// records it held is unknowable. Report it downstream like [`Spool::take_dropped`].
    pub corrupt_records: u64,
    /// The `ack` file was unreadable garbage, so everything still on disk is delivered again
    /// (at-least-once rather than lose anything).
    pub ack_file_invalid: bool,
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} unacknowledged records in {} segments; cut {} bytes ({} records lost to corruption){}",
            self.records,
            self.segments,
            self.truncated_bytes,
            self.corrupt_records,
            if self.ack_file_invalid { "; ack file invalid, redelivering everything" } else { "" }
        )
    }
}
