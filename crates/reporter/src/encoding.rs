//! The reporter's encoding: from an envelope to one event of the metrics API body (the record
//! the driver stores), and from stored events to a body.
//!
//! The API wants `{"type": data.type, "data": {...}, "id": ..., "timestamp": ...}` per event,
//! while an envelope is `{"id", "type": "stream_trace", "timestamp", "data", ...annotations}`.
//! [`api_event`] rewrites one into the other by splicing raw JSON slices: `data` and `id` are
//! copied byte for byte (never re-serialized), and any other top-level member follows verbatim.
//! As the seed maps it (`map_envelope_to_event`): `type` is `data.type`, else the envelope's
//! `type`, else `"unknown"`; a missing `data` is `{}`; `timestamp` is sent as a string (a
//! number's JSON spelling quoted) and left out when empty or zero. It runs once per event, in the writer thread; what is stored on disk is exactly
//! what goes into a body, so building a body ([`BodyBuilder`]) is concatenation only.

use egress::{Encoder, Reason};
use serde_json::value::RawValue;
use telemetry::envelope::{first_byte, Members};
use telemetry::Event;

/// Envelopes that cannot become an API event (see [`ShapeError`]): they would 400 a batch.
pub(crate) const INVALID: Reason = Reason {
    name: "invalid",
    reported: true,
};

/// The driver's encoder: each envelope is stored as its API event, refused when it cannot be one
/// or when it alone is larger than a request may be.
pub(crate) struct ApiEncoder {
    json: Vec<u8>,
    /// The body's bytes around one event.
    overhead: usize,
    max_body_bytes: usize,
    warned_invalid: bool,
}

impl ApiEncoder {
    pub fn new(body: &BodyBuilder, max_body_bytes: usize) -> ApiEncoder {
        ApiEncoder {
            json: Vec::with_capacity(1024),
            overhead: body.overhead(1),
            max_body_bytes,
            warned_invalid: false,
        }
    }
}

impl Encoder for ApiEncoder {
    fn encode(&mut self, event: &Event, out: &mut Vec<u8>) -> Result<(), &'static Reason> {
        self.json.clear();
        event.write_json(&mut self.json);
        if let Err(e) = api_event(&self.json, out) {
            if !self.warned_invalid {
                self.warned_invalid = true;
                tracing::warn!(target: "reporter", id = %event.id(), error = %e,
                    "metrics reporter: dropping an event the metrics API cannot take (counted as dropped_invalid; warned once)");
            }
            return Err(&INVALID);
        }
        if out.len() + self.overhead > self.max_body_bytes {
            tracing::error!(target: "reporter", id = %event.id(), bytes = out.len(), limit = self.max_body_bytes,
                "metrics reporter: event alone is larger than a request may be; dropped (counted as dropped_oversize)");
            return Err(&Reason::OVERSIZE);
        }
        Ok(())
    }
}

/// Why an envelope cannot become an API event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// Not UTF-8 JSON, or not an object.
    #[error("envelope is not a JSON object: {0}")]
    NotAnObject(String),
    /// No string `id`.
    #[error("envelope has no string `id`")]
    NoId,
    /// `data` is not an object.
    #[error("envelope's `data` is not an object")]
    NoData,
}

/// `data.type` as its raw JSON (a string), skipping every other member of `data` unparsed.
#[derive(serde::Deserialize)]
struct DataType<'a> {
    #[serde(rename = "type", borrow, default)]
    ty: Option<&'a RawValue>,
}

/// Appends the API event for `envelope` (an envelope's JSON bytes) to `out`. On error `out` is
/// left as it was.
pub fn api_event(envelope: &[u8], out: &mut Vec<u8>) -> Result<(), ShapeError> {
    let text = std::str::from_utf8(envelope).map_err(|e| ShapeError::NotAnObject(e.to_string()))?;
    let Members(members) =
        serde_json::from_str(text).map_err(|e| ShapeError::NotAnObject(e.to_string()))?;
    let find = |key: &str| {
        members
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    };
    let string = |v: &&RawValue| first_byte(v) == b'"';
    // An empty id cannot be deduplicated (and the collector refuses it): not sendable.
    let id = find("id")
        .filter(|v| string(v) && v.get() != "\"\"")
        .ok_or(ShapeError::NoId)?;
    let data = match find("data") {
        None => "{}",
        Some(v) if first_byte(v) == b'{' => v.get(),
        Some(_) => return Err(ShapeError::NoData),
    };
    // A `data.type` that is not a string is taken as missing: sent, it would have the whole
    // batch refused (the seed sends it as it is).
    let data_type = serde_json::from_str::<DataType>(data)
        .ok()
        .and_then(|d| d.ty)
        .filter(string);
    let ty = data_type
        .or_else(|| find("type").filter(string))
        .map_or("\"unknown\"", |v| v.get());
    out.reserve(envelope.len() + 16);
    out.extend_from_slice(b"{\"type\":");
    out.extend_from_slice(ty.as_bytes());
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b",\"id\":");
    out.extend_from_slice(id.get().as_bytes());
    if let Some(ts) = find("timestamp") {
        let raw = ts.get();
        let zero = raw.parse::<f64>().is_ok_and(|n| n == 0.0);
        match first_byte(ts) {
            b'"' if raw != "\"\"" => {
                out.extend_from_slice(b",\"timestamp\":");
                out.extend_from_slice(raw.as_bytes());
            }
            b'-' | b'0'..=b'9' if !zero => {
                out.extend_from_slice(b",\"timestamp\":\"");
                out.extend_from_slice(raw.as_bytes());
                out.push(b'"');
            }
            _ => {}
        }
    }
    let mut seen: Vec<&str> = Vec::new();
    for (k, v) in members.iter() {
        if matches!(k.as_str(), "type" | "data" | "id" | "timestamp") || seen.contains(&k.as_str())
        {
            continue;
        }
        seen.push(k);
        out.push(b',');
        // Serializing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, k);
        out.push(b':');
        out.extend_from_slice(v.get().as_bytes());
    }
    out.push(b'}');
    Ok(())
}

/// Builds request bodies `{"app":..,"host":..,"events":[e1,e2,...]}` by concatenation.
#[derive(Debug, Clone)]
pub struct BodyBuilder {
    prefix: Vec<u8>,
}

const SUFFIX: &[u8] = b"]}";

impl BodyBuilder {
    /// For this `app` and `host` (JSON-escaped here once).
    pub fn new(app: &str, host: &str) -> BodyBuilder {
        let mut prefix = b"{\"app\":".to_vec();
        let _ = serde_json::to_writer(&mut prefix, app);
        prefix.extend_from_slice(b",\"host\":");
        let _ = serde_json::to_writer(&mut prefix, host);
        prefix.extend_from_slice(b",\"events\":[");
        BodyBuilder { prefix }
    }

    /// Bytes a body adds around its events, separators between `n` events included.
    pub fn overhead(&self, n: usize) -> usize {
        self.prefix.len() + SUFFIX.len() + n.saturating_sub(1)
    }

    /// The body for `events` (each one API event, as stored).
    pub fn build<'a>(&self, events: impl IntoIterator<Item = &'a [u8]>, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.prefix);
        for (i, e) in events.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(e);
        }
        out.extend_from_slice(SUFFIX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn shaped(env: &str) -> Result<String, ShapeError> {
        let mut out = b"keep".to_vec();
        let r = api_event(env.as_bytes(), &mut out);
        assert!(out.starts_with(b"keep"));
        r.map(|()| String::from_utf8(out[4..].to_vec()).unwrap())
    }

    #[test]
    fn data_bytes_are_kept_exactly_and_type_is_lifted() {
        let data = r#"{ "type" : "stream_heartbeat","client_source":"scope","fps_in":29.970000000001, "nested":{"a":[1, 2]},"s":"\u00e9\n"}"#;
        let env = format!(
            r#"{{"id":"abc","type":"stream_trace","timestamp":"1700000000000","data":{data},"producer_note":"kept"}}"#
        );
        let got = shaped(&env).unwrap();
        assert_eq!(
            got,
            format!(
                r#"{{"type":"stream_heartbeat","data":{data},"id":"abc","timestamp":"1700000000000","producer_note":"kept"}}"#
            )
        );
        let v: Value = serde_json::from_str(&got).unwrap();
        assert_eq!(v["data"]["fps_in"], json!(29.970000000001));
    }

    #[test]
    fn envelopes_that_cannot_be_sent_are_refused() {
        assert!(matches!(shaped("[1]"), Err(ShapeError::NotAnObject(_))));
        assert!(matches!(
            shaped("{\"id\":1,\"data\":{\"type\":\"x\"}}"),
            Err(ShapeError::NoId)
        ));
        assert!(matches!(
            shaped("{\"id\":\"\",\"data\":{\"type\":\"x\"}}"),
            Err(ShapeError::NoId)
        ));
        assert!(matches!(
            shaped("{\"id\":\"a\",\"data\":[]}"),
            Err(ShapeError::NoData)
        ));
        assert!(matches!(
            shaped("{\"id\":\"a\",\"data\":{\"type\":\"x\"}"),
            Err(ShapeError::NotAnObject(_))
        ));
        // No timestamp: still an event.
        assert_eq!(
            shaped("{\"id\":\"a\",\"data\":{\"type\":\"x\"}}").unwrap(),
            "{\"type\":\"x\",\"data\":{\"type\":\"x\"},\"id\":\"a\"}"
        );
    }

    #[test]
    fn a_missing_type_or_data_is_mapped_as_the_seed_maps_it() {
        // No data.type: the envelope's type, else "unknown" (the seed's map_envelope_to_event).
        assert_eq!(
            shaped(r#"{"id":"a","type":"stream_trace","data":{"x":1}}"#).unwrap(),
            r#"{"type":"stream_trace","data":{"x":1},"id":"a"}"#
        );
        assert_eq!(
            shaped(r#"{"id":"a","data":{"x":1}}"#).unwrap(),
            r#"{"type":"unknown","data":{"x":1},"id":"a"}"#
        );
        // A data.type that is not a string would have the whole batch refused: taken as missing.
        assert_eq!(
            shaped(r#"{"id":"a","data":{"type":3}}"#).unwrap(),
            r#"{"type":"unknown","data":{"type":3},"id":"a"}"#
        );
        // No data: {}.
        assert_eq!(
            shaped(r#"{"id":"a","type":"t"}"#).unwrap(),
            r#"{"type":"t","data":{},"id":"a"}"#
        );
        // The timestamp is a string: a number's spelling is quoted; empty or zero is left out.
        assert_eq!(
            shaped(r#"{"id":"a","timestamp":1700000000000,"data":{"type":"x"}}"#).unwrap(),
            r#"{"type":"x","data":{"type":"x"},"id":"a","timestamp":"1700000000000"}"#
        );
        for ts in [r#""""#, "0", "null"] {
            let env = format!(r#"{{"id":"a","timestamp":{ts},"data":{{"type":"x"}}}}"#);
            assert_eq!(
                shaped(&env).unwrap(),
                r#"{"type":"x","data":{"type":"x"},"id":"a"}"#,
                "timestamp {ts}"
            );
        }
    }

    #[test]
    fn bodies_are_concatenations_and_overhead_is_exact() {
        let b = BodyBuilder::new("scope", "host \"1\"");
        let events: Vec<&[u8]> = vec![b"{\"a\":1}", b"{\"b\":2}", b"{\"c\":3}"];
        let mut out = Vec::new();
        b.build(events.iter().copied(), &mut out);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"app":"scope","host":"host \"1\"","events":[{"a":1},{"b":2},{"c":3}]})
        );
        let payload: usize = events.iter().map(|e| e.len()).sum();
        assert_eq!(out.len(), payload + b.overhead(3));
        b.build(std::iter::empty(), &mut out);
        assert_eq!(out.len(), b.overhead(0));
    }
}
