//! The buffer between the sink's writer thread and its sender: the disk spool when it works, a
//! bounded in-memory queue when it does not (or when no disk buffer is configured).
//!
//! A stored record is `[id length: u16 LE][id bytes][envelope JSON]`, so the sender has the
//! Kafka key without parsing the JSON. The sender reads the oldest records of one source (disk
//! first) and removes a resolved batch by position: `Spool::ack(last id)` on disk, "every
//! sequence number up to the last one" in memory.

use parking_lot::Mutex;
use spool::{Spool, SpoolError};
use std::collections::VecDeque;
use std::sync::Arc;

/// Which queue a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The disk spool: keys are spool record ids.
    Disk,
    /// The memory fallback: keys are sequence numbers.
    Memory,
}

/// One buffered record and its key (spool id or memory sequence number).
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub key: u64,
    pub bytes: Vec<u8>,
}

/// The oldest records of one source.
#[derive(Debug)]
pub(crate) struct Batch {
    pub source: Source,
    pub items: Vec<Item>,
}

/// Frames `id` and `json` as one stored record into `out` (cleared first). `None` when the id
/// is longer than 65,535 bytes (no real envelope id is).
pub(crate) fn encode(id: &str, json: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let len = u16::try_from(id.len()).ok()?;
    out.clear();
    out.reserve(2 + id.len() + json.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(json);
    Some(())
}

/// Splits a stored record into (key, value). `None` for a record that is not one of ours.
pub(crate) fn decode(record: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u16::from_le_bytes([*record.first()?, *record.get(1)?]) as usize;
    let rest = record.get(2..)?;
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

#[derive(Debug, Default)]
struct Mem {
    items: VecDeque<Item>,
    next_seq: u64,
}

/// Disk spool (optional, installed once it opens) plus memory fallback.
#[derive(Debug, Default)]
pub(crate) struct Buffer {
    spool: Mutex<Option<Arc<Spool>>>,
    mem: Mutex<Mem>,
}

impl Buffer {
    /// The spool, if one is open.
    pub fn spool(&self) -> Option<Arc<Spool>> {
        self.spool.lock().clone()
    }

    /// Installs (or removes) the spool; returns the previous one.
    pub fn set_spool(&self, spool: Option<Arc<Spool>>) -> Option<Arc<Spool>> {
        std::mem::replace(&mut *self.spool.lock(), spool)
    }

    /// Records on disk, not yet acknowledged.
    pub fn disk_len(&self) -> u64 {
        self.spool().map_or(0, |s| s.len())
    }

    /// Records in memory.
    pub fn mem_len(&self) -> u64 {
        self.mem.lock().items.len() as u64
    }

    /// Records buffered in all.
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

    /// Takes the oldest record in memory.
    pub fn pop_mem(&self) -> Option<Item> {
        self.mem.lock().items.pop_front()
    }

    /// Puts an item taken with [`Buffer::pop_mem`] back at the front (a failed move to disk).
    pub fn unpop_mem(&self, item: Item) {
        self.mem.lock().items.push_front(item);
    }

    /// Drops up to `n` of the oldest records in memory; returns how many went.
    pub fn drop_oldest_mem(&self, n: usize) -> u64 {
        let mut m = self.mem.lock();
        let k = n.min(m.items.len());
        m.items.drain(..k);
        k as u64
    }

    /// Up to `max_records` of the oldest records, their bytes summing to at most `max_bytes`
    /// (the first one is returned even when larger): disk first, memory when the disk has none.
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

    /// Removes every record of `source` up to and including key `last`.
    pub fn remove_through(&self, source: Source, last: u64) -> Result<(), SpoolError> {
        match source {
            Source::Disk => match self.spool() {
                Some(spool) => spool.ack(last),
                None => Ok(()),
            },
            Source::Memory => {
                let mut m = self.mem.lock();
                while m.items.front().is_some_and(|i| i.key <= last) {
                    m.items.pop_front();
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let mut out = Vec::new();
        encode("abc", b"{\"id\":\"abc\"}", &mut out).unwrap();
        assert_eq!(decode(&out), Some((&b"abc"[..], &b"{\"id\":\"abc\"}"[..])));
        encode("", b"{}", &mut out).unwrap();
        assert_eq!(decode(&out), Some((&b""[..], &b"{}"[..])));
        assert_eq!(decode(b""), None);
        assert_eq!(decode(b"\x05\x00ab"), None);
        assert!(encode(&"x".repeat(70_000), b"{}", &mut out).is_none());
    }

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
