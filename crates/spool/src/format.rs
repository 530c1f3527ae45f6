//! On-disk formats: record framing, segment file names and the `ack` file.
//!
//! A record is `[len: u32 LE][crc: u32 LE][payload: len bytes]`, where `crc` is CRC-32 (IEEE,
//! `crc32fast`) over the four length bytes followed by the payload. Covering the length means a
//! zero-filled tail (what some filesystems leave after a power loss) never checks out: the CRC of
//! four zero bytes is not zero.

use std::path::{Path, PathBuf};

/// Bytes of framing before each payload.
pub(crate) const HEADER_LEN: u64 = 8;

/// Name of the acknowledged-cursor file.
pub(crate) const ACK_FILE: &str = "ack";
/// Name of the temporary file the cursor is written to before the atomic rename.
pub(crate) const ACK_TMP_FILE: &str = "ack.tmp";
/// Name of the lock file that keeps two processes out of one directory.
pub(crate) const LOCK_FILE: &str = "LOCK";

/// Magic at the start of the `ack` file, so a stray file is never read as a cursor.
const ACK_MAGIC: &[u8; 4] = b"SPAK";
/// Size of the `ack` file: magic, next unacknowledged id (u64 LE), CRC-32 of the first 12 bytes.
pub(crate) const ACK_LEN: usize = 16;

/// The CRC stored in a record's header.
pub(crate) fn record_crc(len_bytes: [u8; 4], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len_bytes);
    h.update(payload);
    h.finalize()
}

/// Frames `payload` into `out` (cleared first), ready for one write.
pub(crate) fn encode_record(payload: &[u8], out: &mut Vec<u8>) {
    // The caller has checked that the payload fits in u32.
    let len_bytes = (payload.len() as u32).to_le_bytes();
    out.clear();
    out.reserve(HEADER_LEN as usize + payload.len());
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&record_crc(len_bytes, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Splits a header into (payload length, stored CRC).
pub(crate) fn decode_header(h: &[u8; 8]) -> (u32, u32) {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    (len, crc)
}

/// `00000000000000000042.log`: the first record id, zero-padded so names sort by id.
pub(crate) fn segment_name(first_id: u64) -> String {
    format!("{first_id:020}.log")
}

/// The path of the segment that starts at `first_id`.
pub(crate) fn segment_path(dir: &Path, first_id: u64) -> PathBuf {
    dir.join(segment_name(first_id))
}

/// Parses a segment file name back into its first id; `None` for any other file.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The bytes of the `ack` file for cursor `next_unacked`.
pub(crate) fn encode_ack(next_unacked: u64) -> [u8; ACK_LEN] {
    let mut out = [0u8; ACK_LEN];
    out[..4].copy_from_slice(ACK_MAGIC);
    out[4..12].copy_from_slice(&next_unacked.to_le_bytes());
    let crc = crc32fast::hash(&out[..12]);
    out[12..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The cursor stored in an `ack` file, or `None` when the bytes are not a valid cursor.
pub(crate) fn decode_ack(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != ACK_LEN || &bytes[..4] != ACK_MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if crc32fast::hash(&bytes[..12]) != crc {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[4..12]);
    Some(u64::from_le_bytes(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_sort() {
        assert_eq!(segment_name(42), "00000000000000000042.log");
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name("42.log"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.log"), None);
        assert_eq!(parse_segment_name("ack"), None);
        assert!(segment_name(9) < segment_name(10));
    }

    #[test]
    fn ack_round_trips_and_rejects_damage() {
        let bytes = encode_ack(123_456);
        assert_eq!(decode_ack(&bytes), Some(123_456));
        for i in 0..ACK_LEN {
            let mut bad = bytes;
            bad[i] ^= 0x01;
            assert_eq!(decode_ack(&bad), None, "flipped byte {i} accepted");
        }
        assert_eq!(decode_ack(&bytes[..15]), None);
    }

    #[test]
    fn zero_filled_header_never_checks_out() {
        assert_ne!(record_crc([0; 4], &[]), 0);
    }
}
