//! One event of the metrics API (`POST /v1/metrics`): `{"type": "...", "data": {...}, "id":
//! "...", "timestamp": "..."}`. The reporter builds them from envelopes, the seed's reporter leaves
//! them in its buffer file, the collector accepts them: [`check`] is what all three agree an event
//! must be to be taken (the collector refuses a whole request for one that is not).

use crate::envelope::first_byte;
use serde::Deserialize;
use serde_json::value::RawValue;

/// What keeps a JSON text from being a metrics API event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiEventError {
    /// Not a JSON object.
    #[error("is not an object: {0}")]
    NotAnObject(String),
    /// No non-empty string `id`.
    #[error("has no `id` (a non-empty string is required)")]
    NoId,
    /// No string `type`.
    #[error("has no `type` (a string is required)")]
    NoType,
    /// No object `data`.
    #[error("has no `data` (an object is required)")]
    NoData,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(rename = "type", borrow, default)]
    ty: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// Checks `event` (one event's JSON text) and returns its `id`, unescaped.
pub fn check(event: &str) -> Result<String, ApiEventError> {
    if !event.trim_start().starts_with('{') {
        return Err(ApiEventError::NotAnObject("not `{`".into()));
    }
    let f: Fields =
        serde_json::from_str(event).map_err(|e| ApiEventError::NotAnObject(e.to_string()))?;
    let id =
        f.id.filter(|v| first_byte(v) == b'"')
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
            .filter(|s| !s.is_empty())
            .ok_or(ApiEventError::NoId)?;
    if f.ty.is_none_or(|v| first_byte(v) != b'"') {
        return Err(ApiEventError::NoType);
    }
    if f.data.is_none_or(|v| first_byte(v) != b'{') {
        return Err(ApiEventError::NoData);
    }
    Ok(id)
}
