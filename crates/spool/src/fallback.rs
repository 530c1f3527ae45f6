//! A disk spool with a bounded in-memory fallback, for a sink's writer thread and its sender.
//!
//! The writer appends to the [`Spool`] when it works and to memory when it does not (or when no
//! disk buffer is configured). The sender always reads the oldest records of one source (disk
//! first), and removes what it resolved by position: `Spool::ack(last id)` on disk, "every
//! sequence number up to the last one" in memory. Both are prefixes of their queue, because the
//! sender resolves the parts of a batch strictly in order. The HTTP reporter and the Kafka sink
//! share it.

use crate::{Spool, SpoolError};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;

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
pub struct Batch {
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

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// Drops up to `n` of the oldest records in memory; returns how many went.
    pub fn drop_oldest_mem(&self, n: usize) -> u64 {
        let mut m = self.mem.lock();
        let k = n.min(m.items.len());
        m.items.drain(..k);
        k as u64
    }

    /// Up to `max_records` of the oldest records, their bytes summing to at most `max_bytes` (the
    /// first one is returned even when larger): disk first, memory when the disk has none.
    pub fn peek(&self, max_records: usize, max_bytes: usize) -> Result<Option<Batch>, SpoolError> {
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
                    return Ok(Some(Batch {
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
        Ok((!items.is_empty()).then_some(Batch {
            source: Source::Memory,
            items,
        }))
    }

    /// Removes every record of `source` up to and including key `last`. Returns how many it
    /// removed from memory (events the cap dropped meanwhile are not counted again); `None` for
    /// disk, where the spool does not say.
    pub fn remove_through(&self, source: Source, last: u64) -> Result<Option<u64>, SpoolError> {
        match source {
            Source::Disk => match self.spool() {
                Some(spool) => spool.ack(last).map(|()| None),
                None => Ok(None),
            },
            Source::Memory => {
                let mut m = self.mem.lock();
                let mut n = 0;
                while m.items.front().is_some_and(|i| i.key <= last) {
                    m.items.pop_front();
                    n += 1;
                }
                Ok(Some(n))
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
            Some(last) => {
                spool.ack(last.id)?;
                Ok(records.len() as u64)
            }
            None => Ok(0),
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
        assert_eq!(b.drop_oldest_mem(1), 1);
        assert_eq!(b.peek(10, 1000).unwrap().unwrap().items[0].key, 3);
    }
}
