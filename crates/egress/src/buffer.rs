//! The driver's buffer: the disk spool with a bounded in-memory fallback, between the writer
//! thread and the sender.
//!
//! The writer appends to the [`Spool`] when it works and to memory when it does not (or when no
//! disk buffer is configured). The sender always reads the oldest records of one source (disk
//! first), and removes what it resolved by position: `Spool::ack(last id)` on disk, "every
//! sequence number up to the last one" in memory. Both are prefixes of their queue, because the
//! sender resolves the parts of a batch strictly in order. [`Disk`] decides when to use the
//! spool, when to retry it after a failure, and moves memory back to it.

use parking_lot::Mutex;
use spool::{Spool, SpoolError, SpoolOptions};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which queue a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The disk spool: keys are spool record ids.
    Disk,
    /// The memory fallback: keys are sequence numbers.
    Memory,
}

/// One buffered record and its key (spool id or memory sequence number).
#[derive(Debug, Clone)]
pub struct Item {
    /// Spool record id, or memory sequence number.
    pub key: u64,
    /// The record.
    pub bytes: Vec<u8>,
}

/// The oldest records of one source.
#[derive(Debug)]
pub struct Oldest {
    /// The queue the items came from.
    pub source: Source,
    /// The items, oldest first.
    pub items: Vec<Item>,
}

#[derive(Debug, Default)]
struct Mem {
    items: VecDeque<Item>,
    next_seq: u64,
}

/// Disk spool (optional, swappable when reopened) plus memory fallback.
#[derive(Debug, Default)]
pub struct Buffer {
    spool: Mutex<Option<Arc<Spool>>>,
    mem: Mutex<Mem>,
}

impl Buffer {
    /// The spool, if one is open.
    pub fn spool(&self) -> Option<Arc<Spool>> {
        self.spool.lock().clone()
    }

    /// Installs (or removes) the spool.
    pub fn set_spool(&self, spool: Option<Arc<Spool>>) -> Option<Arc<Spool>> {
        std::mem::replace(&mut *self.spool.lock(), spool)
    }

    /// Events on disk, not yet acknowledged.
    pub fn disk_len(&self) -> u64 {
        self.spool().map_or(0, |s| s.len())
    }

    /// Events in memory.
    pub fn mem_len(&self) -> u64 {
        self.mem.lock().items.len() as u64
    }

    /// Events buffered in all.
    pub fn len(&self) -> u64 {
        self.disk_len() + self.mem_len()
    }

    /// Stores `bytes` in memory.
    pub fn push_mem(&self, bytes: Vec<u8>) {
        let mut m = self.mem.lock();
        let key = m.next_seq;
        m.next_seq += 1;
        m.items.push_back(Item { key, bytes });
    }

    /// Puts an item taken with [`Buffer::pop_mem`] back at the front (a failed move to disk).
    pub fn unpop_mem(&self, item: Item) {
        self.mem.lock().items.push_front(item);
    }

    /// Takes the oldest record in memory.
    pub fn pop_mem(&self) -> Option<Item> {
        self.mem.lock().items.pop_front()
    }

    /// Up to `max_records` of the oldest records, their bytes summing to at most `max_bytes` (the
    /// first one is returned even when larger): disk first, memory when the disk has none.
    pub fn peek(&self, max_records: usize, max_bytes: usize) -> Result<Option<Oldest>, SpoolError> {
        if let Some(spool) = self.spool() {
            if !spool.is_empty() {
                let records = spool.read_batch(max_records, max_bytes)?;
                if !records.is_empty() {
                    let items = records
                        .into_iter()
                        .map(|r| Item {
                            key: r.id,
                            bytes: r.payload,
                        })
                        .collect();
                    return Ok(Some(Oldest {
                        source: Source::Disk,
                        items,
                    }));
                }
            }
        }
        let m = self.mem.lock();
        let mut items = Vec::new();
        let mut bytes = 0;
        for item in m.items.iter().take(max_records) {
            if !items.is_empty() && bytes + item.bytes.len() > max_bytes {
                break;
            }
            bytes += item.bytes.len();
            items.push(item.clone());
        }
        Ok((!items.is_empty()).then_some(Oldest {
            source: Source::Memory,
            items,
        }))
    }

    /// Removes every record of `source` up to and including key `last`. Returns how many it
    /// removed (records the cap dropped meanwhile are not counted again).
    pub fn remove_through(&self, source: Source, last: u64) -> Result<u64, SpoolError> {
        match source {
            Source::Disk => match self.spool() {
                Some(spool) => spool.ack(last),
                None => Ok(0),
            },
            Source::Memory => {
                let mut m = self.mem.lock();
                let mut n = 0;
                while m.items.front().is_some_and(|i| i.key <= last) {
                    m.items.pop_front();
                    n += 1;
                }
                Ok(n)
            }
        }
    }

    /// Drops up to `n` of the oldest records (memory first, else disk); returns how many went.
    pub fn drop_oldest(&self, n: usize) -> Result<u64, SpoolError> {
        {
            let mut m = self.mem.lock();
            if !m.items.is_empty() {
                let k = n.min(m.items.len());
                m.items.drain(..k);
                return Ok(k as u64);
            }
        }
        let Some(spool) = self.spool() else {
            return Ok(0);
        };
        let records = spool.read_batch(n, usize::MAX)?;
        match records.last() {
            // Counts only what this ack removed: the sender may have removed some meanwhile.
            Some(last) => spool.ack(last.id),
            None => Ok(0),
        }
    }
}

/// The disk buffer's counters, kept by [`Disk`] (and the sender, for failed reads and acks).
#[derive(Debug, Default)]
pub struct DiskCounters {
    /// Records a previous run left on disk, found at open.
    pub recovered: AtomicU64,
    /// Records the spool dropped: its byte cap, or corruption found at open.
    pub dropped_spool: AtomicU64,
    /// Failed disk operations (open, append, read, ack).
    pub disk_errors: AtomicU64,
    /// Now: the spool is in use (false: memory fallback, or no disk buffer configured).
    pub disk_ok: AtomicBool,
}

/// The writer thread's side of the disk: opens the spool (recovering it), falls back to memory
/// when the disk fails, retries it every `retry`, and moves memory to disk on the way back.
#[derive(Debug)]
pub struct Disk {
    /// Names the sink in logs ("metrics reporter", "Kafka sink").
    sink: &'static str,
    /// The setting that names the directory, for error messages.
    setting: &'static str,
    path: Option<PathBuf>,
    options: SpoolOptions,
    retry: Duration,
    /// Set while the disk is considered unusable: when it failed last.
    failed_at: Option<Instant>,
}

impl Disk {
    /// No spool opened yet; `path` `None` means memory only.
    pub fn new(
        sink: &'static str,
        setting: &'static str,
        path: Option<PathBuf>,
        options: SpoolOptions,
        retry: Duration,
    ) -> Disk {
        Disk {
            sink,
            setting,
            path,
            options,
            retry,
            failed_at: None,
        }
    }

    /// Whether the disk failed and memory is in use.
    pub fn failing(&self) -> bool {
        self.failed_at.is_some()
    }

    /// The spool to append to, or `None` to use memory: none configured, or failed and not yet
    /// due for a retry. Opening it (at start or after a failure) recovers what a previous run
    /// left and calls `opened`. On the way back from a failure, memory is moved to disk first (so
    /// it keeps its place ahead of newer events).
    pub fn spool(
        &mut self,
        buffer: &Buffer,
        c: &DiskCounters,
        opened: impl FnOnce(),
    ) -> Option<Arc<Spool>> {
        let path = self.path.as_ref()?;
        if self.failed_at.is_some_and(|at| at.elapsed() < self.retry) {
            return None;
        }
        let spool = match buffer.spool() {
            Some(spool) => spool,
            None => match Spool::open(path, self.options.clone()) {
                Ok((spool, report)) => {
                    c.recovered.fetch_add(report.records, Relaxed);
                    c.dropped_spool.fetch_add(report.corrupt_records, Relaxed);
                    if report.records > 0
                        || report.corrupt_records > 0
                        || report.truncated_bytes > 0
                    {
                        tracing::info!(target: "spool", sink = self.sink, dir = %path.display(),
                            "{}: disk buffer recovered: {report}; sending what a previous run left first", self.sink);
                    }
                    let spool = Arc::new(spool);
                    buffer.set_spool(Some(Arc::clone(&spool)));
                    opened();
                    spool
                }
                Err(e) => {
                    self.failed(&e, c);
                    return None;
                }
            },
        };
        if self.failed_at.is_some() || buffer.mem_len() > 0 {
            let mut moved = 0u64;
            while let Some(item) = buffer.pop_mem() {
                if let Err(e) = spool.append(&item.bytes) {
                    buffer.unpop_mem(item);
                    self.failed(&e, c);
                    return None;
                }
                moved += 1;
            }
            if self.failed_at.take().is_some() {
                let dir = self.path.as_ref().map(|p| p.display().to_string());
                tracing::info!(target: "spool", sink = self.sink, dir, moved,
                    "{}: disk buffer usable again; moved the events kept in memory to disk", self.sink);
            }
        }
        c.disk_ok.store(true, Relaxed);
        Some(spool)
    }

    /// Records a disk failure: memory from now until the next retry. Logged once per episode.
    pub fn failed(&mut self, e: &SpoolError, c: &DiskCounters) {
        c.disk_errors.fetch_add(1, Relaxed);
        c.disk_ok.store(false, Relaxed);
        if self.failed_at.is_none() {
            tracing::error!(target: "spool", sink = self.sink, error = %e, retry_in = ?self.retry,
                "{}: disk buffer unusable; keeping events in memory (lost if the process crashes, capped) and retrying the disk; \
                 to fix: free space, or point {} at a writable directory (empty: memory only)", self.sink, self.setting);
        } else {
            tracing::debug!(target: "spool", sink = self.sink, error = %e, "{}: disk buffer still unusable", self.sink);
        }
        self.failed_at = Some(Instant::now());
    }

    /// Adds what the spool dropped since the last call (its byte cap) to `dropped_spool`.
    pub fn take_spool_drops(buffer: &Buffer, c: &DiskCounters) {
        if let Some(spool) = buffer.spool() {
            let n = spool.take_dropped();
            if n > 0 {
                c.dropped_spool.fetch_add(n, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_batches_respect_limits_and_remove_by_key() {
        let b = Buffer::default();
        for i in 0..5u8 {
            b.push_mem(vec![i; 10]);
        }
        let batch = b.peek(3, 1000).unwrap().unwrap();
        assert_eq!(batch.source, Source::Memory);
        assert_eq!(batch.items.len(), 3);
        let batch = b.peek(10, 25).unwrap().unwrap();
        assert_eq!(batch.items.len(), 2);
        b.remove_through(Source::Memory, 1).unwrap();
        assert_eq!(b.mem_len(), 3);
        assert_eq!(b.drop_oldest(1).unwrap(), 1);
        assert_eq!(b.peek(10, 1000).unwrap().unwrap().items[0].key, 3);
    }

    #[test]
    fn an_unusable_directory_falls_back_then_moves_memory_to_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let blocker = tmp.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let b = Buffer::default();
        let c = DiskCounters::default();
        let mut disk = Disk::new(
            "test sink",
            "TEST_BUFFER_PATH",
            Some(blocker.join("dir")),
            SpoolOptions::default(),
            Duration::ZERO,
        );
        assert!(disk.spool(&b, &c, || {}).is_none());
        assert!(disk.failing());
        assert_eq!(c.disk_errors.load(Relaxed), 1);
        b.push_mem(b"one".to_vec());
        b.push_mem(b"two".to_vec());
        std::fs::remove_file(&blocker).unwrap();
        let mut opened = false;
        let spool = disk.spool(&b, &c, || opened = true).unwrap();
        assert!(opened && !disk.failing() && c.disk_ok.load(Relaxed));
        assert_eq!((b.mem_len(), spool.len()), (0, 2));
        assert_eq!(b.peek(10, 1000).unwrap().unwrap().items[0].bytes, b"one");
    }
}
