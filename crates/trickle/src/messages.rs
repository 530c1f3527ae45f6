//! Typed messages of the two JSONL channels (see `docs/telemetry.md`).
//!
//! - [`ControlMessage`]: the control channel, client to runner.
//! - [`EventMessage`]: the events channel, runner to client.
//!
//! Both are objects tagged by `type`. Decoding is lenient where that keeps data: unknown types are
//! preserved as [`ControlMessage::Unknown`] / [`EventMessage::Unknown`] (never rejected), and extra
//! fields on known types are kept in each variant's `extra` map, so a hop can forward what it does not
//! understand. A known type whose fields have the wrong shape (e.g. `telemetry` without `event`) is a
//! decoding error.
//!
//! The envelope of a `telemetry` message is kept as the exact original bytes
//! ([`serde_json::value::RawValue`]): it is forwarded byte for byte, never re-encoded.
//!
//! Encoding is deterministic: `type` first, then the variant's fields in declaration order, then the
//! extra fields sorted by key. Hence serialize → parse → serialize yields identical bytes.

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};
use std::fmt;

/// Extra (unrecognised) fields of a known message type, kept so a hop forwards them unchanged.
pub type Extra = Map<String, Value>;

// ---------------------------------------------------------------------------------------------
// Control channel
// ---------------------------------------------------------------------------------------------

/// A message on the control channel (client to runner).
#[derive(Debug, Clone, PartialEq)]
pub enum ControlMessage {
    /// `start_stream`: start the stream with `params`.
    StartStream(StartStream),
    /// `stop_stream`: stop the stream.
    StopStream(StopStream),
    /// `parameters`: update the pipeline parameters.
    Parameters(Parameters),
    /// `api`: proxy an HTTP API call to the runner's embedded app.
    Api(ApiRequest),
    /// `ping`: liveness probe (every 10 s); the runner answers `pong`.
    Ping(Ping),
    /// Any other `type` (or none): kept as the whole object, `type` included.
    Unknown(Map<String, Value>),
}

/// Fields of `start_stream`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartStream {
    /// Correlates the runner's `stream_started` / `error` answer.
    pub request_id: String,
    /// Stream parameters, passed through to the pipeline.
    #[serde(default)]
    pub params: Value,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Fields of `stop_stream`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StopStream {
    /// Correlates the answer, when the client wants one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Fields of `parameters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parameters {
    /// The new parameters.
    #[serde(default)]
    pub params: Value,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Fields of `api`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiRequest {
    /// Correlates the runner's `api_response`.
    pub request_id: String,
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Request path, e.g. `/api/v1/pipeline/status`.
    pub path: String,
    /// Request body, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Fields of `ping` (and of `pong`, which echoes the ping's timestamp).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ping {
    /// Sender's clock; a `Number` so that an integer stays an integer when echoed.
    pub timestamp: Number,
    /// Correlates the answer, when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

impl ControlMessage {
    /// The wire `type` of this message (for `Unknown`, its `type` field if it is a string).
    pub fn type_name(&self) -> &str {
        match self {
            ControlMessage::StartStream(_) => "start_stream",
            ControlMessage::StopStream(_) => "stop_stream",
            ControlMessage::Parameters(_) => "parameters",
            ControlMessage::Api(_) => "api",
            ControlMessage::Ping(_) => "ping",
            ControlMessage::Unknown(m) => unknown_type(m),
        }
    }

    /// The `request_id`, for the types that carry one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            ControlMessage::StartStream(m) => Some(&m.request_id),
            ControlMessage::StopStream(m) => m.request_id.as_deref(),
            ControlMessage::Api(m) => Some(&m.request_id),
            ControlMessage::Ping(m) => m.request_id.as_deref(),
            ControlMessage::Parameters(_) => None,
            ControlMessage::Unknown(m) => m.get("request_id").and_then(Value::as_str),
        }
    }
}

impl Serialize for ControlMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ControlMessage::StartStream(m) => tagged("start_stream", m).serialize(s),
            ControlMessage::StopStream(m) => tagged("stop_stream", m).serialize(s),
            ControlMessage::Parameters(m) => tagged("parameters", m).serialize(s),
            ControlMessage::Api(m) => tagged("api", m).serialize(s),
            ControlMessage::Ping(m) => tagged("ping", m).serialize(s),
            ControlMessage::Unknown(m) => m.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ControlMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fields = d.deserialize_map(RawFields)?;
        control_from_fields(fields).map_err(de::Error::custom)
    }
}

fn control_from_fields(fields: Vec<(String, Box<RawValue>)>) -> Result<ControlMessage, String> {
    let ty = type_of(&fields);
    let msg = match ty.as_deref() {
        Some("start_stream") => ControlMessage::StartStream(known("start_stream", fields)?),
        Some("stop_stream") => ControlMessage::StopStream(known("stop_stream", fields)?),
        Some("parameters") => ControlMessage::Parameters(known("parameters", fields)?),
        Some("api") => ControlMessage::Api(known("api", fields)?),
        Some("ping") => ControlMessage::Ping(known("ping", fields)?),
        _ => ControlMessage::Unknown(to_map(fields, false)?),
    };
    Ok(msg)
}

// ---------------------------------------------------------------------------------------------
// Events channel
// ---------------------------------------------------------------------------------------------

/// A message on the events channel (runner to client).
#[derive(Debug, Clone, PartialEq)]
pub enum EventMessage {
    /// `telemetry`: one envelope, to re-publish through the egress sink verbatim.
    Telemetry(Telemetry),
    /// `runner_ready`: the runner finished its cold start.
    RunnerReady(RunnerReady),
    /// `notification`: re-broadcast `payload` to local listeners.
    Notification(Notification),
    /// `logs`: a batch of runner log lines.
    Logs(Logs),
    /// `pong`: answer to a `ping`, echoing its timestamp.
    Pong(Ping),
    /// `api_response`: completes the pending `api` request with that id.
    ApiResponse(Response),
    /// `stream_started`: completes the pending `start_stream` request.
    StreamStarted(Response),
    /// `error`: completes the pending request with that id as failed.
    Error(Response),
    /// `stream_stopped`: informational.
    StreamStopped(Info),
    /// `parameters_ack`: informational.
    ParametersAck(Info),
    /// Any other `type` (or none): kept as the whole object, `type` included.
    Unknown(Map<String, Value>),
}

/// Fields of `telemetry`.
#[derive(Debug, Clone, Serialize)]
pub struct Telemetry {
    /// The envelope, exactly as it was received (byte for byte).
    pub event: Box<RawValue>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

impl PartialEq for Telemetry {
    fn eq(&self, other: &Self) -> bool {
        self.event.get() == other.event.get() && self.extra == other.extra
    }
}

/// Fields of `runner_ready`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunnerReady {
    /// The runner's job id (absent or null when the runner has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_job_id: Option<String>,
    /// The runner's cold start, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_ms: Option<Number>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Fields of `notification`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// The notification, re-broadcast as is.
    #[serde(default)]
    pub payload: Value,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Fields of `logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logs {
    /// Formatted log lines (batches of at most 50).
    #[serde(default)]
    pub lines: Vec<String>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Fields of the answers that complete a pending request (`api_response`, `stream_started`, `error`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Response {
    /// The id of the request this answers (absent on an error not tied to a request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Everything else (status, body, error message...), kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Fields of informational messages (`stream_stopped`, `parameters_ack`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Info {
    /// All fields but `type`, kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

impl EventMessage {
    /// A `telemetry` message carrying `event` verbatim.
    pub fn telemetry(event: Box<RawValue>) -> Self {
        EventMessage::Telemetry(Telemetry {
            event,
            extra: Extra::new(),
        })
    }

    /// The wire `type` of this message (for `Unknown`, its `type` field if it is a string).
    pub fn type_name(&self) -> &str {
        match self {
            EventMessage::Telemetry(_) => "telemetry",
            EventMessage::RunnerReady(_) => "runner_ready",
            EventMessage::Notification(_) => "notification",
            EventMessage::Logs(_) => "logs",
            EventMessage::Pong(_) => "pong",
            EventMessage::ApiResponse(_) => "api_response",
            EventMessage::StreamStarted(_) => "stream_started",
            EventMessage::Error(_) => "error",
            EventMessage::StreamStopped(_) => "stream_stopped",
            EventMessage::ParametersAck(_) => "parameters_ack",
            EventMessage::Unknown(m) => unknown_type(m),
        }
    }

    /// The `request_id`, for the types that carry one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            EventMessage::ApiResponse(r)
            | EventMessage::StreamStarted(r)
            | EventMessage::Error(r) => r.request_id.as_deref(),
            EventMessage::Pong(p) => p.request_id.as_deref(),
            EventMessage::StreamStopped(i) | EventMessage::ParametersAck(i) => {
                i.extra.get("request_id").and_then(Value::as_str)
            }
            EventMessage::Unknown(m) => m.get("request_id").and_then(Value::as_str),
            _ => None,
        }
    }
}

impl Serialize for EventMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EventMessage::Telemetry(m) => tagged("telemetry", m).serialize(s),
            EventMessage::RunnerReady(m) => tagged("runner_ready", m).serialize(s),
            EventMessage::Notification(m) => tagged("notification", m).serialize(s),
            EventMessage::Logs(m) => tagged("logs", m).serialize(s),
            EventMessage::Pong(m) => tagged("pong", m).serialize(s),
            EventMessage::ApiResponse(m) => tagged("api_response", m).serialize(s),
            EventMessage::StreamStarted(m) => tagged("stream_started", m).serialize(s),
            EventMessage::Error(m) => tagged("error", m).serialize(s),
            EventMessage::StreamStopped(m) => tagged("stream_stopped", m).serialize(s),
            EventMessage::ParametersAck(m) => tagged("parameters_ack", m).serialize(s),
            EventMessage::Unknown(m) => m.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for EventMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fields = d.deserialize_map(RawFields)?;
        event_from_fields(fields).map_err(de::Error::custom)
    }
}

fn event_from_fields(fields: Vec<(String, Box<RawValue>)>) -> Result<EventMessage, String> {
    let ty = type_of(&fields);
    let msg = match ty.as_deref() {
        Some("telemetry") => EventMessage::Telemetry(telemetry_from_fields(fields)?),
        Some("runner_ready") => EventMessage::RunnerReady(known("runner_ready", fields)?),
        Some("notification") => EventMessage::Notification(known("notification", fields)?),
        Some("logs") => EventMessage::Logs(known("logs", fields)?),
        Some("pong") => EventMessage::Pong(known("pong", fields)?),
        Some("api_response") => EventMessage::ApiResponse(known("api_response", fields)?),
        Some("stream_started") => EventMessage::StreamStarted(known("stream_started", fields)?),
        Some("error") => EventMessage::Error(known("error", fields)?),
        Some("stream_stopped") => EventMessage::StreamStopped(known("stream_stopped", fields)?),
        Some("parameters_ack") => EventMessage::ParametersAck(known("parameters_ack", fields)?),
        _ => EventMessage::Unknown(to_map(fields, false)?),
    };
    Ok(msg)
}

/// `event` is moved as raw bytes, never parsed into a `Value`: that is what keeps it byte-exact.
fn telemetry_from_fields(fields: Vec<(String, Box<RawValue>)>) -> Result<Telemetry, String> {
    let mut event = None;
    let mut extra = Extra::new();
    for (k, v) in fields {
        match k.as_str() {
            "type" => {}
            "event" => event = Some(v),
            _ => {
                let value = serde_json::from_str(v.get()).map_err(|e| e.to_string())?;
                extra.insert(k, value);
            }
        }
    }
    let event = event.ok_or_else(|| "telemetry message without `event`".to_string())?;
    Ok(Telemetry { event, extra })
}

// ---------------------------------------------------------------------------------------------
// Shared machinery
// ---------------------------------------------------------------------------------------------

/// `type` first, then the body's own fields: serialization order is fixed, so output is stable.
#[derive(Serialize)]
struct Tagged<'a, T: Serialize> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(flatten)]
    body: &'a T,
}

fn tagged<'a, T: Serialize>(ty: &'a str, body: &'a T) -> Tagged<'a, T> {
    Tagged { ty, body }
}

fn unknown_type(m: &Map<String, Value>) -> &str {
    m.get("type").and_then(Value::as_str).unwrap_or("")
}

/// The object's fields, each as raw JSON: a single pass that keeps every value's original bytes.
struct RawFields;

impl<'de> Visitor<'de> for RawFields {
    type Value = Vec<(String, Box<RawValue>)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4));
        while let Some(k) = map.next_key::<String>()? {
            let v: Box<RawValue> = map.next_value()?;
            out.push((k, v));
        }
        Ok(out)
    }
}

/// The value of the last `type` field, when it is a string (JSON objects: the last duplicate wins).
fn type_of(fields: &[(String, Box<RawValue>)]) -> Option<String> {
    fields
        .iter()
        .rev()
        .find(|(k, _)| k == "type")
        .and_then(|(_, v)| serde_json::from_str::<String>(v.get()).ok())
}

fn to_map(
    fields: Vec<(String, Box<RawValue>)>,
    skip_type: bool,
) -> Result<Map<String, Value>, String> {
    let mut map = Map::new();
    for (k, v) in fields {
        if skip_type && k == "type" {
            continue;
        }
        let value = serde_json::from_str(v.get()).map_err(|e| e.to_string())?;
        map.insert(k, value);
    }
    Ok(map)
}

fn known<T: serde::de::DeserializeOwned>(
    ty: &str,
    fields: Vec<(String, Box<RawValue>)>,
) -> Result<T, String> {
    let map = to_map(fields, true)?;
    serde_json::from_value(Value::Object(map)).map_err(|e| format!("invalid `{ty}` message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Case<T> = (&'static str, fn(&T) -> bool);

    /// serialize → parse → serialize must give identical bytes, and parse must pick `variant`.
    fn round_trip<T>(line: &str, check: impl Fn(&T) -> bool) -> String
    where
        T: Serialize + serde::de::DeserializeOwned + fmt::Debug,
    {
        let first: T = serde_json::from_str(line).unwrap();
        assert!(check(&first), "wrong variant for {line}: {first:?}");
        let a = serde_json::to_string(&first).unwrap();
        let second: T = serde_json::from_str(&a).unwrap();
        let b = serde_json::to_string(&second).unwrap();
        assert_eq!(a, b, "unstable encoding for {line}");
        a
    }

    #[test]
    fn control_messages_round_trip() {
        let cases: &[Case<ControlMessage>] = &[
            (
                r#"{"type":"start_stream","request_id":"r1","params":{"prompt":"cat","seed":4}}"#,
                |m| matches!(m, ControlMessage::StartStream(s) if s.request_id == "r1"),
            ),
            (
                r#"{"type":"stop_stream"}"#,
                |m| matches!(m, ControlMessage::StopStream(s) if s.request_id.is_none()),
            ),
            (
                r#"{"type":"stop_stream","request_id":"r2"}"#,
                |m| matches!(m, ControlMessage::StopStream(s) if s.request_id.as_deref() == Some("r2")),
            ),
            (r#"{"type":"parameters","params":{"noise":0.5}}"#, |m| {
                matches!(m, ControlMessage::Parameters(_))
            }),
            (
                r#"{"type":"api","request_id":"r3","method":"POST","path":"/api/v1/x","body":{"a":[1,2]}}"#,
                |m| matches!(m, ControlMessage::Api(a) if a.method == "POST" && a.body.is_some()),
            ),
            (
                r#"{"type":"api","request_id":"r4","method":"GET","path":"/h"}"#,
                |m| matches!(m, ControlMessage::Api(a) if a.body.is_none()),
            ),
            (r#"{"type":"ping","timestamp":1717171717.25}"#, |m| {
                matches!(m, ControlMessage::Ping(_))
            }),
            (
                r#"{"type":"ping","timestamp":1717171717250,"request_id":"p"}"#,
                |m| matches!(m, ControlMessage::Ping(p) if p.timestamp.is_u64()),
            ),
            (r#"{"type":"future_thing","x":1}"#, |m| {
                matches!(m, ControlMessage::Unknown(_))
            }),
            (r#"{"no_type":true}"#, |m| {
                matches!(m, ControlMessage::Unknown(_))
            }),
        ];
        for (line, check) in cases {
            round_trip::<ControlMessage>(line, check);
        }
    }

    #[test]
    fn event_messages_round_trip() {
        let cases: &[Case<EventMessage>] = &[
            (
                r#"{"type":"telemetry","event":{"id":"a","type":"stream_trace","timestamp":"1","data":{"type":"x"}}}"#,
                |m| matches!(m, EventMessage::Telemetry(_)),
            ),
            (
                r#"{"type":"runner_ready","runner_job_id":"j","startup_ms":1234}"#,
                |m| matches!(m, EventMessage::RunnerReady(r) if r.runner_job_id.as_deref() == Some("j")),
            ),
            (r#"{"type":"notification","payload":{"k":"v"}}"#, |m| {
                matches!(m, EventMessage::Notification(_))
            }),
            (
                r#"{"type":"logs","lines":["a - ERROR - b","c"]}"#,
                |m| matches!(m, EventMessage::Logs(l) if l.lines.len() == 2),
            ),
            (r#"{"type":"pong","timestamp":12.5}"#, |m| {
                matches!(m, EventMessage::Pong(_))
            }),
            (
                r#"{"type":"api_response","request_id":"r","status":200,"body":{"ok":true}}"#,
                |m| matches!(m, EventMessage::ApiResponse(r) if r.extra.contains_key("status")),
            ),
            (r#"{"type":"stream_started","request_id":"r"}"#, |m| {
                matches!(m, EventMessage::StreamStarted(_))
            }),
            (r#"{"type":"error","request_id":"r","error":"boom"}"#, |m| {
                matches!(m, EventMessage::Error(_))
            }),
            (
                r#"{"type":"error","error":"no request"}"#,
                |m| matches!(m, EventMessage::Error(r) if r.request_id.is_none()),
            ),
            (r#"{"type":"stream_stopped"}"#, |m| {
                matches!(m, EventMessage::StreamStopped(_))
            }),
            (r#"{"type":"parameters_ack","params":{"a":1}}"#, |m| {
                matches!(m, EventMessage::ParametersAck(_))
            }),
            (
                r#"{"type":"brand_new","nested":{"b":[1,{"c":null}]},"a":"z"}"#,
                |m| matches!(m, EventMessage::Unknown(u) if u.len() == 3),
            ),
        ];
        for (line, check) in cases {
            round_trip::<EventMessage>(line, check);
        }
    }

    #[test]
    fn telemetry_event_is_kept_byte_for_byte() {
        // Whitespace, key order, escapes and number spellings that a re-encode would change.
        let event = r#"{ "id":"e1", "type" : "stream_trace","timestamp":"17","data":{"z":1.50,"a":"\u00e9\n","n":1e3} }"#;
        let line = format!(r#"{{"type":"telemetry","event":{event},"hop":"x"}}"#);
        let msg: EventMessage = serde_json::from_str(&line).unwrap();
        let EventMessage::Telemetry(t) = &msg else {
            panic!("not telemetry: {msg:?}")
        };
        assert_eq!(t.event.get(), event);
        assert_eq!(t.extra.get("hop"), Some(&Value::String("x".into())));
        let out = serde_json::to_string(&msg).unwrap();
        assert_eq!(
            out,
            format!(r#"{{"type":"telemetry","event":{event},"hop":"x"}}"#)
        );
        // And through the line decoder used by the JSONL reader.
        let again: EventMessage = crate::jsonl::decode_line(out.as_bytes(), 1 << 20).unwrap();
        assert_eq!(again, msg);
    }

    #[test]
    fn extra_fields_on_known_types_are_preserved() {
        let line = r#"{"type":"start_stream","request_id":"r","params":{},"zeta":[1],"alpha":"a"}"#;
        let m: ControlMessage = serde_json::from_str(line).unwrap();
        let ControlMessage::StartStream(s) = &m else {
            panic!("{m:?}")
        };
        assert_eq!(s.extra.len(), 2);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"start_stream","request_id":"r","params":{},"alpha":"a","zeta":[1]}"#
        );
    }

    #[test]
    fn unknown_types_keep_every_field() {
        let line = r#"{"type":"v2_event","b":2,"a":{"deep":[true,null,"s"]}}"#;
        let m: EventMessage = serde_json::from_str(line).unwrap();
        assert_eq!(m.type_name(), "v2_event");
        let v: Value = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        let orig: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v, orig);
    }

    #[test]
    fn malformed_known_types_are_errors_not_panics() {
        for line in [
            r#"{"type":"telemetry"}"#,
            r#"{"type":"logs","lines":"not a list"}"#,
            r#"{"type":"pong","timestamp":"soon"}"#,
            r#"[1,2]"#,
            r#""x""#,
            r#"{"type":"telemetry","event":"#,
        ] {
            assert!(
                serde_json::from_str::<EventMessage>(line).is_err(),
                "{line}"
            );
        }
        for line in [
            r#"{"type":"api","request_id":"r"}"#,
            r#"{"type":"ping","timestamp":"soon"}"#,
            r#"{"type":"start_stream"}"#,
            r#"null"#,
        ] {
            assert!(
                serde_json::from_str::<ControlMessage>(line).is_err(),
                "{line}"
            );
        }
    }

    #[test]
    fn helpers_report_type_and_request_id() {
        let m: EventMessage =
            serde_json::from_str(r#"{"type":"api_response","request_id":"q"}"#).unwrap();
        assert_eq!((m.type_name(), m.request_id()), ("api_response", Some("q")));
        let c: ControlMessage =
            serde_json::from_str(r#"{"type":"api","request_id":"q2","method":"GET","path":"/"}"#)
                .unwrap();
        assert_eq!((c.type_name(), c.request_id()), ("api", Some("q2")));
        let raw = RawValue::from_string(r#"{"id":"x"}"#.to_string()).unwrap();
        assert_eq!(
            serde_json::to_string(&EventMessage::telemetry(raw)).unwrap(),
            r#"{"type":"telemetry","event":{"id":"x"}}"#
        );
    }
}
