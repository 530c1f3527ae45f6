//! The Kafka sink's encoding: the record the driver stores for an envelope is
//! `[id length: u16 LE][id bytes][envelope JSON]`, so the service has the Kafka key without
//! parsing the JSON, and the value is the envelope's exact bytes.

use egress::{Encoder, Reason};
use telemetry::Event;

/// The driver's encoder: frames each envelope with its id.
#[derive(Default)]
pub(crate) struct KafkaEncoder {
    json: Vec<u8>,
}

impl Encoder for KafkaEncoder {
    fn encode(&mut self, event: &Event, out: &mut Vec<u8>) -> Result<(), &'static Reason> {
        self.json.clear();
        event.write_json(&mut self.json);
        let id = event.id();
        if encode(&id, &self.json, out).is_none() {
            tracing::error!(target: "kafka", id_bytes = id.len(),
                "Kafka sink: event id longer than 65,535 bytes; dropped (counted as dropped_oversize)");
            return Err(&Reason::OVERSIZE);
        }
        Ok(())
    }
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
