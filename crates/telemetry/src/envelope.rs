//! The telemetry envelope: built once where the event happens ([`Envelope`]), forwarded verbatim
//! everywhere after ([`RawEnvelope`]).
//!
//! Wire shape (`docs/telemetry.md`):
//!
//! ```json
//! {"id":"<uuid v4>","type":"stream_trace","timestamp":"<unix ms>",
//!  "data":{"type":"<event type>","client_source":"scope","timestamp":"<same ms>",
//!          "session_id":"..","connection_id":"..","pipeline_ids":[".."],"user_id":"..",
//!          "error":{"error_type":"..","message":"..","exception_type":"..","recoverable":false},
//!          "connection_info":{..},"<metadata key>":<value>, ..}}
//! ```
//!
//! Optional fields are omitted when empty (absent, empty string, empty list, empty object), as the
//! seed's `if session_id: ...` does. Metadata keys follow, in insertion order; a later entry with the
//! same key replaces the earlier one (the seed's `dict.update`).
//!
//! **Reserved keys.** Metadata may not set any of [`RESERVED_DATA_KEYS`]: the three the spec names
//! (`type`, `client_source`, `timestamp`) and also the six structural fields (`session_id`,
//! `connection_id`, `pipeline_ids`, `user_id`, `error`, `connection_info`). The structural fields
//! have typed setters on [`Fields`]; letting metadata set them too would let a metric silently
//! re-attribute an event to another session, and sinks read `session_id` to route. A metadata entry
//! with a reserved key is ignored.
//!
//! **Cost.** [`Envelope::new`] stamps the id (uuid v4, fast RNG) and the time and moves the
//! [`Fields`] in; it does not serialize. The JSON is written later by the sink's drain
//! ([`Envelope::write_json`]), off the caller's thread.

use crate::priority::Priority;
use bytes::Bytes;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// Top-level `type` of every envelope.
pub const ENVELOPE_TYPE: &str = "stream_trace";
/// `data.client_source` of every envelope built here.
pub const CLIENT_SOURCE: &str = "scope";
/// Keys of `data` that metadata can never set (see the module docs for why all nine).
pub const RESERVED_DATA_KEYS: [&str; 9] = [
    "type",
    "client_source",
    "timestamp",
    "session_id",
    "connection_id",
    "pipeline_ids",
    "user_id",
    "error",
    "connection_info",
];
/// The annotation (a key of `data`) naming how the client received a forwarded envelope.
pub const RELAYED_VIA: &str = "relayed_via";
/// The annotation (a key of `data`) with the unix ms, as a decimal string, when the client
/// received a forwarded envelope.
pub const RELAY_RECEIVED_TIMESTAMP: &str = "relay_received_timestamp";

/// Event types the seed application emits, kept as `&'static str` so stamping them allocates nothing.
const KNOWN_EVENT_TYPES: [&str; 18] = [
    "stream_heartbeat",
    "session_created",
    "session_closed",
    "stream_started",
    "stream_stopped",
    "playback_ready",
    "pipeline_load_start",
    "pipeline_loaded",
    "pipeline_unloaded",
    "error",
    "runner_ready",
    "media_input_loop_failed",
    "media_output_loop_failed",
    "media_audio_output_loop_failed",
    "telemetry_dropped",
    "notification",
    "logs",
    "pong",
];

/// Whether `key` is one metadata may not set.
pub fn is_reserved_data_key(key: &str) -> bool {
    // A `match` compiles to a length switch plus one compare: cheaper than scanning the list.
    matches!(
        key,
        "type"
            | "client_source"
            | "timestamp"
            | "session_id"
            | "connection_id"
            | "pipeline_ids"
            | "user_id"
            | "error"
            | "connection_info"
    )
}

/// `data.error`: what went wrong, in the seed's four fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorInfo {
    /// Machine-readable kind, e.g. `pipeline_load_failed`.
    pub error_type: String,
    /// Human-readable message (`str(exc)` in the seed).
    pub message: String,
    /// The exception's class name in the seed; a Rust error's type name here.
    pub exception_type: String,
    /// Whether the session can go on.
    pub recoverable: bool,
}

impl ErrorInfo {
    /// All four fields, as the seed always sends them.
    pub fn new(
        error_type: impl Into<String>,
        message: impl Into<String>,
        exception_type: impl Into<String>,
        recoverable: bool,
    ) -> Self {
        ErrorInfo {
            error_type: error_type.into(),
            message: message.into(),
            exception_type: exception_type.into(),
            recoverable,
        }
    }
}

/// The caller-supplied part of an envelope, builder style:
/// `Fields::new().session_id(s).meta("fps_in", 29.97)`.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    session_id: Option<String>,
    connection_id: Option<String>,
    pipeline_ids: Vec<String>,
    user_id: Option<String>,
    error: Option<Box<ErrorInfo>>,
    connection_info: Option<Value>,
    metadata: Vec<(Cow<'static, str>, Value)>,
}

/// Equal when they serialize the same (metadata compared as merged, duplicates resolved).
impl PartialEq for Fields {
    fn eq(&self, other: &Self) -> bool {
        self.session_id == other.session_id
            && self.connection_id == other.connection_id
            && self.pipeline_ids == other.pipeline_ids
            && self.user_id == other.user_id
            && self.error == other.error
            && self.connection_info == other.connection_info
            && self.metadata().eq(other.metadata())
    }
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

impl Fields {
    /// No fields set.
    pub fn new() -> Self {
        Fields::default()
    }

    /// `data.session_id` (omitted when empty).
    pub fn session_id(mut self, id: impl Into<String>) -> Self {
        self.session_id = non_empty(id.into());
        self
    }

    /// `data.connection_id` (omitted when empty).
    pub fn connection_id(mut self, id: impl Into<String>) -> Self {
        self.connection_id = non_empty(id.into());
        self
    }

    /// `data.pipeline_ids` (omitted when empty).
    pub fn pipeline_ids<I, S>(mut self, ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.pipeline_ids = ids.into_iter().map(Into::into).collect();
        self
    }

    /// `data.user_id` (omitted when empty).
    pub fn user_id(mut self, id: impl Into<String>) -> Self {
        self.user_id = non_empty(id.into());
        self
    }

    /// `data.error`.
    pub fn error(mut self, error: ErrorInfo) -> Self {
        self.error = Some(Box::new(error));
        self
    }

    /// `data.connection_info` (omitted when null or an empty object), e.g. `{"gpu_type": "H100"}`.
    pub fn connection_info(mut self, info: Value) -> Self {
        self.connection_info = match &info {
            Value::Null => None,
            Value::Object(m) if m.is_empty() => None,
            _ => Some(info),
        };
        self
    }

    /// One metadata entry, merged into `data`. A reserved key ([`RESERVED_DATA_KEYS`]) is ignored;
    /// setting a key again replaces its value in place (last write wins, like the seed's
    /// `dict.update`): it appears once, where it was first set.
    pub fn meta(mut self, key: impl Into<Cow<'static, str>>, value: impl Into<Value>) -> Self {
        self.insert_meta(key.into(), value.into());
        self
    }

    /// [`Fields::meta`] on a borrowed builder, for loops.
    pub fn insert_meta(&mut self, key: Cow<'static, str>, value: Value) {
        if is_reserved_data_key(&key) {
            tracing::debug!(target: "telemetry", key = %key, "metadata key is reserved; ignored");
            return;
        }
        if self.metadata.capacity() == 0 {
            // One allocation for a typical event (the seed's heartbeat has 8-10 entries).
            self.metadata.reserve_exact(12);
        }
        // Duplicates are resolved when read or serialized (off the caller's thread), not here.
        self.metadata.push((key, value));
    }

    /// The session id, if set.
    pub fn get_session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }

    /// The connection id, if set.
    pub fn get_connection_id(&self) -> Option<&str> {
        self.connection_id.as_deref()
    }

    /// A metadata value by key.
    pub fn get_meta(&self, key: &str) -> Option<&Value> {
        self.metadata
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Metadata entries, each key once: at the position it was first set, with the value it was
    /// last set to (the seed's `dict.update` semantics).
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &Value)> {
        let m = &self.metadata;
        m.iter().enumerate().filter_map(move |(i, (k, v))| {
            if m[..i].iter().any(|(earlier, _)| earlier == k) {
                return None;
            }
            let last = m[i + 1..].iter().rev().find(|(later, _)| later == k);
            Some((k.as_ref(), last.map_or(v, |(_, lv)| lv)))
        })
    }
}

/// An envelope built here: stamped once (id, time), serialized later by whoever delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    id: Uuid,
    timestamp_ms: u64,
    event_type: Cow<'static, str>,
    priority: Priority,
    fields: Fields,
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn intern_event_type(event_type: &str) -> Cow<'static, str> {
    match KNOWN_EVENT_TYPES.iter().find(|t| **t == event_type) {
        Some(t) => Cow::Borrowed(t),
        None => Cow::Owned(event_type.to_owned()),
    }
}

impl Envelope {
    /// Stamps a new envelope now: a fresh uuid v4 and the current unix time in ms.
    pub fn new(event_type: &str, fields: Fields) -> Self {
        Envelope::with_stamp(Uuid::new_v4(), now_ms(), event_type, fields)
    }

    /// An envelope with a given id and time (replaying, tests).
    pub fn with_stamp(id: Uuid, timestamp_ms: u64, event_type: &str, fields: Fields) -> Self {
        let event_type = intern_event_type(event_type);
        let priority = Priority::of(&event_type);
        Envelope {
            id,
            timestamp_ms,
            event_type,
            priority,
            fields,
        }
    }

    /// The envelope id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Unix time in ms (`timestamp` and `data.timestamp`).
    pub fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }

    /// `data.type`.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The priority class of `data.type`.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// The caller-supplied fields.
    pub fn fields(&self) -> &Fields {
        &self.fields
    }

    /// Appends the envelope's JSON (one object, no newline) to `out`.
    ///
    /// Written by hand (fixed parts as literals, strings escaped by `serde_json`): about twice as
    /// fast as the generic `Serialize` path, byte-identical to it (tested), and it is the drain's
    /// hot loop.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut ts_buf = itoa::Buffer::new();
        let ts = ts_buf.format(self.timestamp_ms).as_bytes();
        let mut id_buf = [0u8; 36];
        let id = self.id.hyphenated().encode_lower(&mut id_buf).as_bytes();
        let f = &self.fields;
        out.reserve(256 + f.metadata.len() * 32);
        out.extend_from_slice(b"{\"id\":\"");
        out.extend_from_slice(id);
        out.extend_from_slice(b"\",\"type\":\"stream_trace\",\"timestamp\":\"");
        out.extend_from_slice(ts);
        out.extend_from_slice(b"\",\"data\":{\"type\":");
        str_into(out, self.event_type.as_ref());
        out.extend_from_slice(b",\"client_source\":\"scope\",\"timestamp\":\"");
        out.extend_from_slice(ts);
        out.push(b'"');
        if let Some(v) = &f.session_id {
            out.extend_from_slice(b",\"session_id\":");
            str_into(out, v);
        }
        if let Some(v) = &f.connection_id {
            out.extend_from_slice(b",\"connection_id\":");
            str_into(out, v);
        }
        if !f.pipeline_ids.is_empty() {
            out.extend_from_slice(b",\"pipeline_ids\":");
            out.push(b'[');
            for (i, id) in f.pipeline_ids.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                str_into(out, id);
            }
            out.push(b']');
        }
        if let Some(v) = &f.user_id {
            out.extend_from_slice(b",\"user_id\":");
            str_into(out, v);
        }
        if let Some(v) = &f.error {
            out.extend_from_slice(b",\"error\":");
            json_into(out, v.as_ref());
        }
        if let Some(v) = &f.connection_info {
            out.extend_from_slice(b",\"connection_info\":");
            json_into(out, v);
        }
        for (k, v) in f.metadata() {
            out.push(b',');
            str_into(out, k);
            out.push(b':');
            value_into(out, v);
        }
        out.extend_from_slice(b"}}");
    }

    /// The envelope's JSON as bytes.
    pub fn to_json(&self) -> Bytes {
        let mut out = Vec::with_capacity(384);
        self.write_json(&mut out);
        Bytes::from(out)
    }
}

/// Appends `s` as a JSON string, byte-identical to `serde_json` (which escapes only `"`, `\\`
/// and control characters): a string with none of those, the common case for keys and ids, is
/// copied as is instead of going through the escaper byte by byte.
fn str_into(out: &mut Vec<u8>, s: &str) {
    // No early exit: a branch-free fold that the compiler vectorizes (strings here are short).
    let plain = !s.bytes().fold(false, |bad, b| {
        bad | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        json_into(out, s);
    }
}

/// Appends a metadata value as JSON (byte-identical to `serde_json`): strings, integers, booleans
/// and null directly; floats, arrays and objects through `serde_json`.
fn value_into(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::String(s) => str_into(out, s),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Null => out.extend_from_slice(b"null"),
        Value::Number(n) if n.is_u64() || n.is_i64() => {
            let mut buf = itoa::Buffer::new();
            let text = match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => buf.format(u),
                (None, Some(i)) => buf.format(i),
                (None, None) => return json_into(out, v),
            };
            out.extend_from_slice(text.as_bytes());
        }
        _ => json_into(out, v),
    }
}

/// Appends `v` as JSON. Cannot fail for the types used here (strings, string-keyed `Value`s,
/// plain structs); if it ever did, `null` keeps the surrounding object valid.
fn json_into<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let start = out.len();
    if let Err(e) = serde_json::to_writer(&mut *out, v) {
        out.truncate(start);
        out.extend_from_slice(b"null");
        tracing::error!(target: "telemetry", error = %e, "cannot serialize an envelope field");
    }
}

/// `data`, for the generic `Serialize` impl (which `write_json` matches byte for byte).
struct Data<'a>(&'a Envelope, &'a str);

impl Serialize for Data<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (e, ts) = (self.0, self.1);
        let f = &e.fields;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("type", e.event_type.as_ref())?;
        m.serialize_entry("client_source", CLIENT_SOURCE)?;
        m.serialize_entry("timestamp", ts)?;
        if let Some(v) = &f.session_id {
            m.serialize_entry("session_id", v)?;
        }
        if let Some(v) = &f.connection_id {
            m.serialize_entry("connection_id", v)?;
        }
        if !f.pipeline_ids.is_empty() {
            m.serialize_entry("pipeline_ids", &f.pipeline_ids)?;
        }
        if let Some(v) = &f.user_id {
            m.serialize_entry("user_id", v)?;
        }
        if let Some(v) = &f.error {
            m.serialize_entry("error", v.as_ref())?;
        }
        if let Some(v) = &f.connection_info {
            m.serialize_entry("connection_info", v)?;
        }
        for (k, v) in f.metadata() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl Serialize for Envelope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut ts_buf = itoa::Buffer::new();
        let ts = ts_buf.format(self.timestamp_ms);
        let mut id_buf = [0u8; 36];
        let id = self.id.hyphenated().encode_lower(&mut id_buf);
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("id", id)?;
        m.serialize_entry("type", ENVELOPE_TYPE)?;
        m.serialize_entry("timestamp", ts)?;
        m.serialize_entry("data", &Data(self, ts))?;
        m.end()
    }
}

/// Why bytes are not a forwardable envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Not valid JSON, or JSON that is not one object.
    #[error("not a telemetry envelope: {0}")]
    Invalid(String),
    /// A JSON object without a non-empty string `id`.
    #[error("telemetry envelope has no `id` (a non-empty string is required to forward it)")]
    MissingId,
    /// A key that must be unique appears twice.
    #[error("telemetry envelope has `{0}` twice")]
    DuplicateKey(&'static str),
    /// An annotation key that is not usable.
    #[error("annotation key `{0}` already present in the envelope")]
    AnnotationExists(String),
}

/// A routed string field of a [`RawEnvelope`]: where it lies in the bytes (the common case, a JSON
/// string without escapes: no allocation), or its unescaped text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Text {
    #[default]
    Absent,
    /// `bytes[start..start + len]`, UTF-8 (the whole envelope was validated once).
    Span(u32, u32),
    /// Unescaped (or a number's text).
    Owned(Box<str>),
}

impl Text {
    fn get<'a>(&'a self, bytes: &'a [u8]) -> Option<&'a str> {
        match self {
            Text::Absent => None,
            Text::Span(start, len) => {
                let (start, len) = (*start as usize, *len as usize);
                // Validated in `parse`; re-checking a short field is cheap and keeps this safe.
                bytes
                    .get(start..start + len)
                    .and_then(|b| std::str::from_utf8(b).ok())
            }
            Text::Owned(s) => Some(s),
        }
    }
}

/// Where the text being parsed lies in memory, to turn borrowed strings into [`Text::Span`]s.
#[derive(Clone, Copy)]
struct Src {
    base: usize,
    len: usize,
}

impl Src {
    fn text(self, v: &str) -> Text {
        let at = (v.as_ptr() as usize).wrapping_sub(self.base);
        match (u32::try_from(at), u32::try_from(v.len())) {
            (Ok(start), Ok(len)) if at.checked_add(v.len()).is_some_and(|end| end <= self.len) => {
                Text::Span(start, len)
            }
            _ => Text::Owned(v.into()),
        }
    }
}

/// What routing needs of a parsed envelope: its fields (as found by the parse) and its class.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawMeta {
    fields: Top,
    priority: Priority,
}

/// A forwarded envelope: the exact original JSON bytes plus the few fields sinks need.
///
/// It serializes to exactly its bytes. A hop only *adds* annotations ([`RawEnvelope::annotate`]),
/// by inserting `,"key":"value"` before the final `}`, so every original byte survives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEnvelope {
    bytes: Bytes,
    meta: Box<RawMeta>,
}

impl RawEnvelope {
    /// Parses untrusted bytes. Never panics; rejects anything but one JSON object with a non-empty
    /// string `id`. Other fields are optional: a missing or non-string `data.type` is read as absent.
    ///
    /// Cost: one UTF-8 pass over the whole envelope (the only one: the JSONL reader leaves it to
    /// this parse), one JSON pass that keeps the routing fields as positions in the bytes (no
    /// allocation unless a field has escapes), one allocation for the routing metadata.
    pub fn parse(bytes: Bytes) -> Result<RawEnvelope, EnvelopeError> {
        // Validated once here; the parser then trusts the text (skipped values are covered too).
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t,
            Err(e) => return Err(EnvelopeError::Invalid(format!("not UTF-8: {e}"))),
        };
        let meta = {
            let src = Src {
                base: text.as_ptr() as usize,
                len: text.len(),
            };
            let mut de = serde_json::Deserializer::from_str(text);
            let top = de
                .deserialize_map(TopVisitor { src })
                .map_err(|e| EnvelopeError::Invalid(e.to_string()))?;
            de.end()
                .map_err(|e| EnvelopeError::Invalid(e.to_string()))?;
            let fields = top?;
            if fields.id.get(&bytes).is_none_or(str::is_empty) {
                return Err(EnvelopeError::MissingId);
            }
            let priority = Priority::of_opt(fields.event_type.get(&bytes));
            RawMeta { fields, priority }
        };
        Ok(RawEnvelope {
            bytes,
            meta: Box::new(meta),
        })
    }

    /// Parses the `event` of a `telemetry` message as decoded by `trickle::messages` (no copy).
    pub fn from_raw_value(raw: Box<RawValue>) -> Result<RawEnvelope, EnvelopeError> {
        let s: Box<str> = raw.into();
        RawEnvelope::parse(Bytes::from(s.into_boxed_bytes()))
    }

    /// The exact bytes (original plus annotations).
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The exact bytes, owned.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// `id`.
    pub fn id(&self) -> &str {
        self.meta.fields.id.get(&self.bytes).unwrap_or_default()
    }

    /// `timestamp` as written by the origin (a number is given as its JSON text).
    pub fn timestamp(&self) -> Option<&str> {
        self.meta.fields.timestamp.get(&self.bytes)
    }

    /// `data.type`, if it is a string.
    pub fn event_type(&self) -> Option<&str> {
        self.meta.fields.event_type.get(&self.bytes)
    }

    /// `data.session_id`, if it is a string.
    pub fn session_id(&self) -> Option<&str> {
        self.meta.fields.session_id.get(&self.bytes)
    }

    /// `data.connection_id`, if it is a string.
    pub fn connection_id(&self) -> Option<&str> {
        self.meta.fields.connection_id.get(&self.bytes)
    }

    /// `data.relayed_via` (the client's annotation), if it is a string.
    pub fn relayed_via(&self) -> Option<&str> {
        self.meta.fields.relayed_via.get(&self.bytes)
    }

    /// `data.relay_received_timestamp` (the client's annotation), as written.
    pub fn relay_received_timestamp(&self) -> Option<&str> {
        self.meta.fields.relay_received.get(&self.bytes)
    }

    /// The priority class of `data.type` (High when absent).
    pub fn priority(&self) -> Priority {
        self.meta.priority
    }

    /// [`RawEnvelope::annotate_relay`] received now.
    pub fn annotate_relayed_via(&mut self, via: &str) -> bool {
        self.annotate_relay(via, now_ms())
    }

    /// Adds the client's two annotations **inside `data`**, as the seed's client does:
    /// `"relayed_via": via` and `"relay_received_timestamp": "<received_ms>"`, spliced in before
    /// `data`'s closing brace so every other byte stays as it was (no re-serialization).
    ///
    /// An annotation already in `data` is kept, never duplicated (a second hop keeps the first
    /// hop's). An envelope without `data` gets `"data":{..the two..}` appended as a top-level
    /// member; one whose `data` is not an object cannot carry them and is left as it is. Returns
    /// whether anything was added.
    pub fn annotate_relay(&mut self, via: &str, received_ms: u64) -> bool {
        let f = &self.meta.fields;
        let (add_via, add_ts) = (!f.has_relayed_via, !f.has_relay_received);
        if !(add_via || add_ts) || f.data == DataKind::Other {
            return false;
        }
        let mut ts_buf = itoa::Buffer::new();
        let ts = ts_buf.format(received_ms);
        let mut members = Vec::with_capacity(via.len() + 64);
        if add_via {
            str_into(&mut members, RELAYED_VIA);
            members.push(b':');
            str_into(&mut members, via);
        }
        if add_ts {
            if add_via {
                members.push(b',');
            }
            str_into(&mut members, RELAY_RECEIVED_TIMESTAMP);
            members.extend_from_slice(b":\"");
            members.extend_from_slice(ts.as_bytes());
            members.push(b'"');
        }
        let at = match f.data {
            DataKind::Object => match data_object_close(&self.bytes) {
                Some((close, empty)) => {
                    if !empty {
                        members.insert(0, b',');
                    }
                    close
                }
                // Unreachable for a parsed envelope; leave it untouched rather than guess.
                None => return false,
            },
            DataKind::Absent => {
                let mut wrapped = Vec::with_capacity(members.len() + 10);
                wrapped.extend_from_slice(b",\"data\":{");
                wrapped.extend_from_slice(&members);
                wrapped.push(b'}');
                members = wrapped;
                final_brace(&self.bytes)
            }
            DataKind::Other => return false,
        };
        self.splice(at, &members);
        let f = &mut self.meta.fields;
        if add_via {
            f.has_relayed_via = true;
            f.relayed_via = Text::Owned(via.into());
        }
        if add_ts {
            f.has_relay_received = true;
            f.relay_received = Text::Owned(ts.into());
        }
        f.data = DataKind::Object;
        true
    }

    /// Adds a top-level annotation `key: value`. Fails if `key` is already a top-level key (the
    /// original is never changed, and a duplicate key would make the JSON ambiguous).
    pub fn annotate(&mut self, key: &str, value: &Value) -> Result<(), EnvelopeError> {
        if top_level_has_key(&self.bytes, key) {
            return Err(EnvelopeError::AnnotationExists(key.to_owned()));
        }
        self.insert_member(key, value);
        Ok(())
    }

    /// Inserts `,"key":value` before the final `}` (parse guaranteed an object with an `id`, so
    /// there is a final `}` and at least one member before it).
    fn insert_member<V: Serialize + ?Sized>(&mut self, key: &str, value: &V) {
        let mut member = Vec::with_capacity(key.len() + 48);
        member.push(b',');
        json_into(&mut member, key);
        member.push(b':');
        json_into(&mut member, value);
        self.splice(final_brace(&self.bytes), &member);
    }

    /// Inserts `insert` at byte `at`, moving the routed fields that lie after it.
    fn splice(&mut self, at: usize, insert: &[u8]) {
        let b = &self.bytes;
        let at = at.min(b.len());
        // One buffer, one copy of the original: `Bytes::from(Vec)` takes it without copying.
        let mut out = Vec::with_capacity(b.len() + insert.len());
        out.extend_from_slice(&b[..at]);
        out.extend_from_slice(insert);
        out.extend_from_slice(&b[at..]);
        self.bytes = Bytes::from(out);
        self.meta.fields.shift(at, insert.len());
    }

    /// Appends the exact bytes to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.bytes);
    }
}

/// Whether the JSON object in `bytes` has `key` at top level (only called on parsed envelopes).
fn top_level_has_key(bytes: &[u8], key: &str) -> bool {
    struct KeyFinder<'k>(&'k str);
    impl<'de> Visitor<'de> for KeyFinder<'_> {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut found = false;
            while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                found |= k == self.0;
                map.next_value::<IgnoredAny>()?;
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.deserialize_map(KeyFinder(key)).unwrap_or(false)
}

/// The position of the final `}` of a parsed envelope (trailing whitespace skipped).
fn final_brace(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .rposition(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        .unwrap_or(0)
}

/// In a parsed envelope whose `data` is an object: the position of `data`'s closing `}` and
/// whether the object is empty. A byte scan (strings and nesting tracked), far cheaper than a
/// parse; `None` only on input that was not validated JSON.
fn data_object_close(bytes: &[u8]) -> Option<(usize, bool)> {
    let ws = |c: u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r');
    let skip_ws = |mut i: usize| {
        while i < bytes.len() && ws(bytes[i]) {
            i += 1;
        }
        i
    };
    // The end (exclusive) of the string starting at `i` (a `"`).
    let string_end = |mut i: usize| -> Option<usize> {
        i += 1;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => return Some(i + 1),
                _ => i += 1,
            }
        }
        None
    };
    // The end (exclusive) of the value starting at `i`.
    let value_end = |mut i: usize| -> Option<usize> {
        match bytes.get(i)? {
            b'"' => string_end(i),
            b'{' | b'[' => {
                let mut depth = 0usize;
                while i < bytes.len() {
                    match bytes[i] {
                        b'"' => {
                            i = string_end(i)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(i + 1);
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
                None
            }
            _ => {
                while i < bytes.len() && !matches!(bytes[i], b',' | b'}' | b']') && !ws(bytes[i]) {
                    i += 1;
                }
                Some(i)
            }
        }
    };
    let mut i = skip_ws(0);
    if bytes.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(i);
        if bytes.get(i)? != &b'"' {
            return None;
        }
        let key_end = string_end(i)?;
        let key = &bytes[i..key_end];
        let is_data = key == b"\"data\""
            || (key.contains(&b'\\')
                && serde_json::from_slice::<Cow<'_, str>>(key).is_ok_and(|k| k == "data"));
        i = skip_ws(key_end);
        if bytes.get(i)? != &b':' {
            return None;
        }
        i = skip_ws(i + 1);
        let end = value_end(i)?;
        if is_data {
            if bytes[i] != b'{' {
                return None;
            }
            let close = end - 1;
            let last = bytes[i + 1..close].iter().rposition(|c| !ws(*c));
            return Some((close, last.is_none()));
        }
        i = skip_ws(end);
        match bytes.get(i)? {
            b',' => i += 1,
            _ => return None,
        }
    }
}

/// The envelope fields routing reads, as positions in its bytes where possible.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Top {
    id: Text,
    timestamp: Text,
    event_type: Text,
    session_id: Text,
    connection_id: Text,
    /// `data.relayed_via`, if a string.
    relayed_via: Text,
    /// `data.relay_received_timestamp`, if a string (or number).
    relay_received: Text,
    /// `data` has a `relayed_via` key (even if its value is not a string).
    has_relayed_via: bool,
    /// `data` has a `relay_received_timestamp` key (whatever its value).
    has_relay_received: bool,
    /// What `data` is.
    data: DataKind,
}

impl Top {
    /// Moves every span that starts at or after `at` by `by` bytes (after an insertion at `at`).
    fn shift(&mut self, at: usize, by: usize) {
        for t in [
            &mut self.id,
            &mut self.timestamp,
            &mut self.event_type,
            &mut self.session_id,
            &mut self.connection_id,
            &mut self.relayed_via,
            &mut self.relay_received,
        ] {
            if let Text::Span(start, _) = t {
                if *start as usize >= at {
                    match u32::try_from(*start as usize + by) {
                        Ok(moved) => *start = moved,
                        // Past 4 GiB: cannot happen under the size limits; drop the span, not lie.
                        Err(_) => *t = Text::Absent,
                    }
                }
            }
        }
    }
}

/// Whether an envelope has a `data` member, and whether it is an object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum DataKind {
    /// No `data` key.
    #[default]
    Absent,
    /// `data` is a JSON object.
    Object,
    /// `data` is something else (a string, an array...).
    Other,
}

/// Top-level keys of interest; everything else is skipped without allocating.
enum TopKey {
    Id,
    Timestamp,
    Data,
    Other,
}

impl<'de> de::Deserialize<'de> for TopKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TopKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TopKey, E> {
                Ok(match v {
                    "id" => TopKey::Id,
                    "timestamp" => TopKey::Timestamp,
                    "data" => TopKey::Data,
                    _ => TopKey::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

enum DataKey {
    Type,
    SessionId,
    ConnectionId,
    RelayedVia,
    RelayReceived,
    Other,
}

impl<'de> de::Deserialize<'de> for DataKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DataKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DataKey, E> {
                Ok(match v {
                    "type" => DataKey::Type,
                    "session_id" => DataKey::SessionId,
                    "connection_id" => DataKey::ConnectionId,
                    RELAYED_VIA => DataKey::RelayedVia,
                    RELAY_RECEIVED_TIMESTAMP => DataKey::RelayReceived,
                    _ => DataKey::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// A value read leniently: a string is kept (as a span of the input when it has no escapes), a
/// number is kept as its text (`timestamp` only), anything else is skipped and read as absent.
struct Lenient {
    numbers: bool,
    src: Src,
}

impl<'de> DeserializeSeed<'de> for Lenient {
    type Value = Text;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Text, D::Error> {
        d.deserialize_any(self)
    }
}

impl Lenient {
    fn number(&self, text: impl fmt::Display) -> Text {
        if self.numbers {
            Text::Owned(text.to_string().into())
        } else {
            Text::Absent
        }
    }
}

impl<'de> Visitor<'de> for Lenient {
    type Value = Text;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(self.src.text(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Text::Owned(v.into()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Text::Owned(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(self.number(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(self.number(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(self.number(v))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Text::Absent)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Text::Absent)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Text::Absent)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Text::Absent)
    }
}

/// `data`: an object yields its routed fields and annotations; any other value yields none.
#[derive(Default)]
struct DataFields {
    is_object: bool,
    event_type: Text,
    session_id: Text,
    connection_id: Text,
    relayed_via: Text,
    relay_received: Text,
    has_relayed_via: bool,
    has_relay_received: bool,
}

struct DataVisitor {
    src: Src,
}

impl<'de> DeserializeSeed<'de> for DataVisitor {
    type Value = Result<DataFields, EnvelopeError>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DataVisitor {
    type Value = Result<DataFields, EnvelopeError>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = DataFields {
            is_object: true,
            ..DataFields::default()
        };
        let (mut t, mut s, mut c) = (false, false, false);
        while let Some(key) = map.next_key::<DataKey>()? {
            let text = Lenient {
                numbers: false,
                src: self.src,
            };
            let (slot, seen, name) = match key {
                // Annotations: the first one counts; a repeat is skipped, never an error.
                DataKey::RelayedVia | DataKey::RelayReceived => {
                    let (slot, has) = match key {
                        DataKey::RelayedVia => (&mut out.relayed_via, &mut out.has_relayed_via),
                        _ => (&mut out.relay_received, &mut out.has_relay_received),
                    };
                    if *has {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        *has = true;
                        *slot = map.next_value_seed(Lenient {
                            numbers: matches!(key, DataKey::RelayReceived),
                            src: self.src,
                        })?;
                    }
                    continue;
                }
                DataKey::Type => (&mut out.event_type, &mut t, "data.type"),
                DataKey::SessionId => (&mut out.session_id, &mut s, "data.session_id"),
                DataKey::ConnectionId => (&mut out.connection_id, &mut c, "data.connection_id"),
                DataKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if *seen {
                map.next_value::<IgnoredAny>()?;
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                return Ok(Err(EnvelopeError::DuplicateKey(name)));
            }
            *seen = true;
            *slot = map.next_value_seed(text)?;
        }
        Ok(Ok(out))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Ok(DataFields::default()))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Ok(DataFields::default()))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Ok(DataFields::default()))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Ok(DataFields::default()))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Ok(DataFields::default()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Ok(DataFields::default()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Ok(DataFields::default()))
    }
}

struct TopVisitor {
    src: Src,
}

impl TopVisitor {
    fn lenient(&self, numbers: bool) -> Lenient {
        Lenient {
            numbers,
            src: self.src,
        }
    }
}

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Result<Top, EnvelopeError>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object (a telemetry envelope)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut top = Top::default();
        let (mut id, mut ts, mut data) = (false, false, false);
        let mut dup: Option<&'static str> = None;
        while let Some(key) = map.next_key::<TopKey>()? {
            let (seen, name) = match key {
                TopKey::Id => (&mut id, "id"),
                TopKey::Timestamp => (&mut ts, "timestamp"),
                TopKey::Data => (&mut data, "data"),
                TopKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if *seen || dup.is_some() {
                // Keep reading so that invalid JSON later on is still reported as invalid.
                dup.get_or_insert(name);
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            *seen = true;
            match key {
                TopKey::Id => top.id = map.next_value_seed(self.lenient(false))?,
                TopKey::Timestamp => top.timestamp = map.next_value_seed(self.lenient(true))?,
                TopKey::Data => match map.next_value_seed(DataVisitor { src: self.src })? {
                    Ok(d) => {
                        top.data = if d.is_object {
                            DataKind::Object
                        } else {
                            DataKind::Other
                        };
                        top.event_type = d.event_type;
                        top.session_id = d.session_id;
                        top.connection_id = d.connection_id;
                        top.relayed_via = d.relayed_via;
                        top.relay_received = d.relay_received;
                        top.has_relayed_via = d.has_relayed_via;
                        top.has_relay_received = d.has_relay_received;
                    }
                    Err(e) => {
                        dup.get_or_insert(match e {
                            EnvelopeError::DuplicateKey(n) => n,
                            _ => "data",
                        });
                    }
                },
                TopKey::Other => {}
            }
        }
        Ok(match dup {
            Some(name) => Err(EnvelopeError::DuplicateKey(name)),
            None => Ok(top),
        })
    }
}

/// One telemetry event on its way through a sink: built here, or forwarded verbatim.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Built by [`crate::publish_event`] on this process.
    Built(Box<Envelope>),
    /// Received from another hop; forwarded byte for byte.
    Raw(RawEnvelope),
}

impl From<Envelope> for Event {
    fn from(e: Envelope) -> Self {
        Event::Built(Box::new(e))
    }
}

impl From<RawEnvelope> for Event {
    fn from(e: RawEnvelope) -> Self {
        Event::Raw(e)
    }
}

impl Event {
    /// The envelope id, as written on the wire.
    pub fn id(&self) -> Cow<'_, str> {
        match self {
            Event::Built(e) => Cow::Owned(e.id.hyphenated().to_string()),
            Event::Raw(r) => Cow::Borrowed(r.id()),
        }
    }

    /// `data.type` (absent only on a forwarded envelope that lacks it).
    pub fn event_type(&self) -> Option<&str> {
        match self {
            Event::Built(e) => Some(e.event_type()),
            Event::Raw(r) => r.event_type(),
        }
    }

    /// `data.session_id`.
    pub fn session_id(&self) -> Option<&str> {
        match self {
            Event::Built(e) => e.fields.get_session_id(),
            Event::Raw(r) => r.session_id(),
        }
    }

    /// `data.connection_id`.
    pub fn connection_id(&self) -> Option<&str> {
        match self {
            Event::Built(e) => e.fields.get_connection_id(),
            Event::Raw(r) => r.connection_id(),
        }
    }

    /// `data.relayed_via`: the client's annotation on a forwarded envelope (on one built here,
    /// only if its metadata set it).
    pub fn relayed_via(&self) -> Option<&str> {
        match self {
            Event::Built(e) => e.fields.get_meta(RELAYED_VIA).and_then(Value::as_str),
            Event::Raw(r) => r.relayed_via(),
        }
    }

    /// `timestamp`, as on the wire.
    pub fn timestamp(&self) -> Option<Cow<'_, str>> {
        match self {
            Event::Built(e) => Some(Cow::Owned(e.timestamp_ms.to_string())),
            Event::Raw(r) => r.timestamp().map(Cow::Borrowed),
        }
    }

    /// The priority class.
    pub fn priority(&self) -> Priority {
        match self {
            Event::Built(e) => e.priority,
            Event::Raw(r) => r.priority(),
        }
    }

    /// Appends the envelope JSON (one object, no newline) to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Event::Built(e) => e.write_json(out),
            Event::Raw(r) => r.write_json(out),
        }
    }

    /// The envelope JSON (a forwarded one: its exact bytes, without copying).
    pub fn to_json(&self) -> Bytes {
        match self {
            Event::Built(e) => e.to_json(),
            Event::Raw(r) => r.bytes.clone(),
        }
    }
}

/// Top-level members of a JSON object in order, values as raw JSON slices of the input: for
/// reshaping an envelope (API event <-> envelope) by splicing bytes, without re-encoding values.
pub struct Members<'a>(pub Vec<(String, &'a RawValue)>);

impl<'de> de::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(6);
                while let Some(k) = map.next_key::<String>()? {
                    let v: &'de RawValue = map.next_value()?;
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The first byte of a raw JSON value (`"` for a string, `{` for an object): its kind.
pub fn first_byte(raw: &RawValue) -> u8 {
    raw.get().as_bytes().first().copied().unwrap_or(b' ')
}
