//! The buffer between the sink's writer thread and its sender: the disk spool when it works, a
//! bounded in-memory queue when it does not (or when no disk buffer is configured).
//!
//! The buffer itself is the shared [`spool::fallback::Buffer`]. A stored record is
//! `[id length: u16 LE][id bytes][envelope JSON]`, so the sender has the Kafka key without
//! parsing the JSON.

pub(crate) use spool::fallback::{Batch, Buffer};

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
}
