//! Request body validation: the shape of `POST /v1/metrics`, without re-serializing events.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use telemetry::api_event::{self, ApiEventError};

/// One valid event: its id (unescaped) and its exact JSON bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidEvent {
    /// `id`.
    pub id: String,
    /// The event object as received.
    pub json: Bytes,
}

/// Why a body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// 400: not the expected shape; the message says what is wrong.
    #[error("{0}")]
    Shape(String),
    /// 413: more events than allowed.
    #[error("{got} events in one request; at most {max} are accepted, split the batch")]
    TooManyEvents {
        /// Events in the body.
        got: usize,
        /// The limit.
        max: usize,
    },
}

#[derive(Deserialize)]
struct Top<'a> {
    #[serde(borrow, default)]
    events: Option<&'a RawValue>,
}

fn first(raw: &RawValue) -> u8 {
    raw.get().as_bytes().first().copied().unwrap_or(b' ')
}

fn shape(msg: impl Into<String>) -> Invalid {
    Invalid::Shape(msg.into())
}

/// Validates a body: an object whose `events` is an array of at most `max_events` objects, each
/// with a non-empty string `id`, a string `type` and an object `data`.
pub fn validate(body: &[u8], max_events: usize) -> Result<Vec<ValidEvent>, Invalid> {
    let text = std::str::from_utf8(body).map_err(|e| shape(format!("body is not UTF-8: {e}")))?;
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        return Err(shape(
            "body must be a JSON object {\"app\":..,\"host\":..,\"events\":[..]}",
        ));
    }
    let top: Top =
        serde_json::from_str(text).map_err(|e| shape(format!("body is not valid JSON: {e}")))?;
    let events = top
        .events
        .ok_or_else(|| shape("body has no `events` (an array of events is required)"))?;
    if first(events) != b'[' {
        return Err(shape("`events` must be an array"));
    }
    let list: Vec<&RawValue> = serde_json::from_str(events.get())
        .map_err(|e| shape(format!("`events` is not valid: {e}")))?;
    if list.len() > max_events {
        return Err(Invalid::TooManyEvents {
            got: list.len(),
            max: max_events,
        });
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, raw) in list.into_iter().enumerate() {
        if first(raw) != b'{' {
            return Err(shape(format!("event {i} is not an object")));
        }
        let id = api_event::check(raw.get()).map_err(|e| match e {
            ApiEventError::NotAnObject(why) => shape(format!("event {i}: {why}")),
            ApiEventError::NoId => shape(format!("event {i} {e}")),
            _ => {
                let id = serde_json::from_str::<serde_json::Value>(raw.get())
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                shape(format!("event {i} ({id}) {e}"))
            }
        })?;
        out.push(ValidEvent {
            id,
            json: Bytes::copy_from_slice(raw.get().as_bytes()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_bodies_keep_event_bytes() {
        let ev = r#"{"type":"x","data":{"a": 1.50},"id":"i\u0031","timestamp":"1"}"#;
        let body = format!(r#"{{"app":"scope","host":"h","events":[ {ev} ]}}"#);
        let got = validate(body.as_bytes(), 500).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "i1");
        assert_eq!(&got[0].json[..], ev.as_bytes());
        assert_eq!(validate(br#"{"events":[]}"#, 500).unwrap(), vec![]);
    }

    #[test]
    fn every_bad_shape_has_a_message() {
        let cases: &[(&[u8], &str)] = &[
            (b"[]", "JSON object"),
            (b"nope", "JSON object"),
            (b"{\"events\":", "not valid JSON"),
            (b"{}", "no `events`"),
            (b"{\"events\":{}}", "must be an array"),
            (b"{\"events\":[1]}", "event 0 is not an object"),
            (b"{\"events\":[{\"type\":\"x\",\"data\":{}}]}", "no `id`"),
            (
                b"{\"events\":[{\"id\":\"\",\"type\":\"x\",\"data\":{}}]}",
                "no `id`",
            ),
            (
                b"{\"events\":[{\"id\":7,\"type\":\"x\",\"data\":{}}]}",
                "no `id`",
            ),
            (b"{\"events\":[{\"id\":\"a\",\"data\":{}}]}", "no `type`"),
            (b"{\"events\":[{\"id\":\"a\",\"type\":\"x\"}]}", "no `data`"),
            (
                b"{\"events\":[{\"id\":\"a\",\"type\":\"x\",\"data\":[]}]}",
                "no `data`",
            ),
            (b"\xff", "UTF-8"),
        ];
        for (body, want) in cases {
            match validate(body, 500) {
                Err(Invalid::Shape(m)) => assert!(m.contains(want), "{body:?}: {m}"),
                other => panic!("{body:?}: {other:?}"),
            }
        }
        let many = format!(
            "{{\"events\":[{}]}}",
            [r#"{"id":"a","type":"x","data":{}}"#; 3].join(",")
        );
        assert_eq!(
            validate(many.as_bytes(), 2),
            Err(Invalid::TooManyEvents { got: 3, max: 2 })
        );
    }
}
