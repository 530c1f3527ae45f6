//! The reporter's encoding: from an envelope to one event of the metrics API body (the record
//! the driver stores), and from stored events to a body.
//!
//! The API wants `{"type": data.type, "data": {...}, "id": ..., "timestamp": ...}` per event,
//! while an envelope is `{"id", "type": "stream_trace", "timestamp", "data", ...annotations}`.
//! [`api_event`] rewrites one into the other by splicing raw JSON slices: `data`, `id` and
//! `timestamp` are copied byte for byte (never re-serialized), `type` is the raw `data.type`
//! string, and any other top-level member (the client's `relayed_via` annotation) follows
//! verbatim. It runs once per event, in the writer thread; what is stored on disk is exactly
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
    /// No object `data`.
    #[error("envelope has no object `data`")]
    NoData,
    /// `data.type` missing or not a string.
    #[error("envelope's `data.type` is missing or not a string")]
    NoType,
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
    let id = find("id")
        .filter(|v| first_byte(v) == b'"')
        .ok_or(ShapeError::NoId)?;
    let data = find("data")
        .filter(|v| first_byte(v) == b'{')
        .ok_or(ShapeError::NoData)?;
    let ty = serde_json::from_str::<DataType>(data.get())
        .ok()
        .and_then(|d| d.ty)
        .filter(|v| first_byte(v) == b'"')
        .ok_or(ShapeError::NoType)?;
    out.reserve(envelope.len() + 16);
    out.extend_from_slice(b"{\"type\":");
    out.extend_from_slice(ty.get().as_bytes());
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data.get().as_bytes());
    out.extend_from_slice(b",\"id\":");
    out.extend_from_slice(id.get().as_bytes());
    if let Some(ts) = find("timestamp") {
        out.extend_from_slice(b",\"timestamp\":");
        out.extend_from_slice(ts.get().as_bytes());
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
            r#"{{"id":"abc","type":"stream_trace","timestamp":"1700000000000","data":{data},"relayed_via":"trickle"}}"#
        );
        let got = shaped(&env).unwrap();
        assert_eq!(
            got,
            format!(
                r#"{{"type":"stream_heartbeat","data":{data},"id":"abc","timestamp":"1700000000000","relayed_via":"trickle"}}"#
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
        assert!(matches!(shaped("{\"id\":\"a\"}"), Err(ShapeError::NoData)));
        assert!(matches!(
            shaped("{\"id\":\"a\",\"data\":[]}"),
            Err(ShapeError::NoData)
        ));
        assert!(matches!(
            shaped("{\"id\":\"a\",\"data\":{}}"),
            Err(ShapeError::NoType)
        ));
        assert!(matches!(
            shaped("{\"id\":\"a\",\"data\":{\"type\":3}}"),
            Err(ShapeError::NoType)
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
