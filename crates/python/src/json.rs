//! Python objects to envelopes and JSON bytes, and JSON bytes back to Python objects.
//!
//! **Building an envelope from `publish_event`'s arguments** takes one of two paths, which write
//! the same bytes for the same input (the spec's shape, `shared/spec/telemetry.md`):
//! - *fast* ([`EnvelopeArgs::fields`]): string ids, a list of string pipeline ids, the seed's
//!   four-field `error`, and metadata whose values are scalars or lists of them become a
//!   [`telemetry::Fields`]; the envelope is stamped (`telemetry::Envelope::new`) and serialized
//!   later, off the caller's thread. This is every event the seed application emits per frame.
//! - *general* ([`EnvelopeArgs::write_json`]): anything else (a `connection_info` dict, nested
//!   metadata, ids that are not strings) is written to JSON bytes on the caller's thread, keys in
//!   the caller's order at every level, and forwarded as a `telemetry::RawEnvelope`.
//!
//! Both follow the seed's truthiness (`if session_id:`): `None`, `""`, `[]` and `{}` are omitted.
//! Metadata may not set the nine reserved `data` keys (`telemetry::RESERVED_DATA_KEYS`): such
//! entries are ignored, as the Rust builder does.
//!
//! **JSON written from Python objects** ([`write_json`]) follows `json.dumps(obj,
//! separators=(",", ":"), ensure_ascii=False)`: `dict` (keys `str`, or `int`/`bool`/`None`
//! written as their JSON text, as `json.dumps` does), `list`, `tuple`, `str`, `int` (within 64
//! bits), `float`, `bool`, `None`. Two differences: a non-finite float (NaN, infinity) is written
//! `null` (the JSON Python writes for it, `NaN`, is not JSON and would be rejected by every later
//! hop), and a float's exponent is written without `+` or leading zeros (`1e20`, not `1e+20`: the
//! same number). Anything else (a `set`, `bytes`, an arbitrary object, nesting deeper than 64
//! levels, which also catches a container that holds itself) is an error naming the type.
//!
//! **Back to Python** ([`loads`]): Python's own `json.loads`, so a dict handed to Python is
//! exactly what `json.loads` makes of the bytes on the wire (keys in wire order).

use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::Value;
use std::borrow::Cow;
use telemetry::envelope::is_reserved_data_key;
use telemetry::{ErrorInfo, Fields};

/// Deepest nesting [`write_json`] follows.
const MAX_DEPTH: usize = 64;

static LOADS: GILOnceCell<Py<PyAny>> = GILOnceCell::new();

/// `json.loads(bytes)`.
pub fn loads<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let loads = LOADS.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        Ok(py.import("json")?.getattr("loads")?.unbind())
    })?;
    loads
        .bind(py)
        .call1((pyo3::types::PyBytes::new(py, bytes),))
}

/// Appends `s` as a JSON string.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // Writing a `&str` to a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Appends `obj` as JSON (see the module docs for what is accepted).
pub fn write_json(obj: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Result<(), String> {
    write_at(obj, out, 0)
}

fn write_at(obj: &Bound<'_, PyAny>, out: &mut Vec<u8>, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "nested deeper than {MAX_DEPTH} levels (or a container holds itself)"
        ));
    }
    if obj.is_none() {
        out.extend_from_slice(b"null");
    } else if let Ok(s) = obj.downcast::<PyString>() {
        write_str(out, &s.to_cow().map_err(|e| e.to_string())?);
    } else if let Ok(b) = obj.downcast::<PyBool>() {
        out.extend_from_slice(if b.is_true() { b"true" } else { b"false" });
    } else if let Ok(i) = obj.downcast::<PyInt>() {
        write_int(i, out)?;
    } else if let Ok(f) = obj.downcast::<PyFloat>() {
        // serde_json writes a non-finite float as `null`.
        let _ = serde_json::to_writer(&mut *out, &f.value());
    } else if let Ok(d) = obj.downcast::<PyDict>() {
        out.push(b'{');
        for (i, (k, v)) in d.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_key(&k, out)?;
            out.push(b':');
            write_at(&v, out, depth + 1)?;
        }
        out.push(b'}');
    } else if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        out.push(b'[');
        for (i, v) in obj.try_iter().map_err(|e| e.to_string())?.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_at(&v.map_err(|e| e.to_string())?, out, depth + 1)?;
        }
        out.push(b']');
    } else {
        return Err(format!("{} is not JSON serializable", type_name(obj)));
    }
    Ok(())
}

fn write_int(i: &Bound<'_, PyInt>, out: &mut Vec<u8>) -> Result<(), String> {
    let mut buf = itoa_buf(i)?;
    out.append(&mut buf);
    Ok(())
}

fn itoa_buf(i: &Bound<'_, PyInt>) -> Result<Vec<u8>, String> {
    if let Ok(v) = i.extract::<i64>() {
        return Ok(v.to_string().into_bytes());
    }
    if let Ok(v) = i.extract::<u64>() {
        return Ok(v.to_string().into_bytes());
    }
    Err("an integer outside 64 bits is not supported in telemetry".into())
}

/// A dict key as `json.dumps` writes it: `str` as is; `int`, `bool`, `None` as their JSON text.
fn write_key(k: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Result<(), String> {
    if let Ok(s) = k.downcast::<PyString>() {
        write_str(out, &s.to_cow().map_err(|e| e.to_string())?);
    } else if let Ok(b) = k.downcast::<PyBool>() {
        out.extend_from_slice(if b.is_true() {
            b"\"true\""
        } else {
            b"\"false\""
        });
    } else if let Ok(i) = k.downcast::<PyInt>() {
        out.push(b'"');
        out.append(&mut itoa_buf(i)?);
        out.push(b'"');
    } else if k.is_none() {
        out.extend_from_slice(b"\"null\"");
    } else {
        return Err(format!(
            "dict keys must be str, int, bool or None, not {}",
            type_name(k)
        ));
    }
    Ok(())
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

/// A scalar, or a list of them (nested lists allowed), as a `Value`; `None` for anything the
/// fast path leaves to the general one (dicts: their key order must be kept).
fn flat_value(obj: &Bound<'_, PyAny>, depth: usize) -> Option<Value> {
    if obj.is_none() {
        Some(Value::Null)
    } else if let Ok(s) = obj.downcast::<PyString>() {
        s.to_str().ok().map(|s| Value::String(s.to_owned()))
    } else if let Ok(b) = obj.downcast::<PyBool>() {
        Some(Value::Bool(b.is_true()))
    } else if let Ok(i) = obj.downcast::<PyInt>() {
        if let Ok(v) = i.extract::<i64>() {
            Some(v.into())
        } else {
            i.extract::<u64>().ok().map(Value::from)
        }
    } else if let Ok(f) = obj.downcast::<PyFloat>() {
        // Non-finite: `null`, as the general path writes it.
        Some(serde_json::Number::from_f64(f.value()).map_or(Value::Null, Value::Number))
    } else if depth < MAX_DEPTH {
        let items: Vec<Bound<'_, PyAny>> = if let Ok(l) = obj.downcast::<PyList>() {
            l.iter().collect()
        } else if let Ok(t) = obj.downcast::<PyTuple>() {
            t.iter().collect()
        } else {
            return None;
        };
        items
            .iter()
            .map(|v| flat_value(v, depth + 1))
            .collect::<Option<Vec<_>>>()
            .map(Value::Array)
    } else {
        None
    }
}

/// `publish_event`'s arguments (all but `event_type` optional, `None` when not given).
pub struct EnvelopeArgs<'a, 'py> {
    /// `data.type`.
    pub event_type: &'a str,
    /// `data.session_id`.
    pub session_id: Option<&'a Bound<'py, PyAny>>,
    /// `data.connection_id`.
    pub connection_id: Option<&'a Bound<'py, PyAny>>,
    /// `data.pipeline_ids`.
    pub pipeline_ids: Option<&'a Bound<'py, PyAny>>,
    /// `data.user_id`.
    pub user_id: Option<&'a Bound<'py, PyAny>>,
    /// `data.error`.
    pub error: Option<&'a Bound<'py, PyAny>>,
    /// Merged into `data`.
    pub metadata: Option<&'a Bound<'py, PyAny>>,
    /// `data.connection_info`.
    pub connection_info: Option<&'a Bound<'py, PyAny>>,
}

/// `Some(obj)` when it is given and truthy (the seed's `if x:`); an error from `__bool__` is
/// taken as truthy so that the general path reports the value itself.
fn given<'a, 'py>(obj: Option<&'a Bound<'py, PyAny>>) -> Option<&'a Bound<'py, PyAny>> {
    obj.filter(|o| !o.is_none() && o.is_truthy().unwrap_or(true))
}

/// A truthy `str` as `&str`; `Err(())` when given but not a `str` (general path).
fn opt_str<'a>(obj: Option<&'a Bound<'_, PyAny>>) -> Result<Option<Cow<'a, str>>, ()> {
    match given(obj) {
        None => Ok(None),
        Some(o) => match o.downcast::<PyString>() {
            Ok(s) => s.to_cow().map(Some).map_err(|_| ()),
            Err(_) => Err(()),
        },
    }
}

/// The seed's error dict, exactly `{error_type, message, exception_type, recoverable}` in that
/// order with those types: what `ErrorInfo` writes.
fn error_info(obj: &Bound<'_, PyAny>) -> Option<ErrorInfo> {
    let d = obj.downcast::<PyDict>().ok()?;
    if d.len() != 4 {
        return None;
    }
    let keys = ["error_type", "message", "exception_type", "recoverable"];
    let mut strs: [Option<String>; 3] = [None, None, None];
    let mut recoverable = None;
    for (i, (k, v)) in d.iter().enumerate() {
        if k.downcast::<PyString>().ok()?.to_str().ok()? != keys[i] {
            return None;
        }
        if i < 3 {
            strs[i] = Some(v.downcast::<PyString>().ok()?.to_str().ok()?.to_owned());
        } else {
            recoverable = Some(v.downcast::<PyBool>().ok()?.is_true());
        }
    }
    let [t, m, e] = strs;
    Some(ErrorInfo::new(t?, m?, e?, recoverable?))
}

impl EnvelopeArgs<'_, '_> {
    /// The fast path's fields, or `None` when the general path must write this event.
    pub fn fields(&self) -> Option<Fields> {
        let mut f = Fields::new();
        if let Some(s) = opt_str(self.session_id).ok()? {
            f = f.session_id(s);
        }
        if let Some(s) = opt_str(self.connection_id).ok()? {
            f = f.connection_id(s);
        }
        if let Some(s) = opt_str(self.user_id).ok()? {
            f = f.user_id(s);
        }
        if let Some(ids) = given(self.pipeline_ids) {
            let list: Vec<String> = if let Ok(l) = ids.downcast::<PyList>() {
                l.iter()
                    .map(|v| Some(v.downcast::<PyString>().ok()?.to_str().ok()?.to_owned()))
                    .collect::<Option<_>>()?
            } else {
                return None;
            };
            f = f.pipeline_ids(list);
        }
        if let Some(e) = given(self.error) {
            f = f.error(error_info(e)?);
        }
        if given(self.connection_info).is_some() {
            return None;
        }
        if let Some(m) = given(self.metadata) {
            let d = m.downcast::<PyDict>().ok()?;
            for (k, v) in d.iter() {
                let key = k.downcast::<PyString>().ok()?.to_str().ok()?;
                if is_reserved_data_key(key) {
                    continue;
                }
                f.insert_meta(Cow::Owned(key.to_owned()), flat_value(&v, 0)?);
            }
        }
        Some(f)
    }

    /// The whole envelope as JSON bytes, stamped with `id` and `timestamp_ms` (general path).
    pub fn write_json(&self, id: &str, timestamp_ms: u64, out: &mut Vec<u8>) -> Result<(), String> {
        let ts = timestamp_ms.to_string();
        out.extend_from_slice(b"{\"id\":");
        write_str(out, id);
        out.extend_from_slice(b",\"type\":\"stream_trace\",\"timestamp\":\"");
        out.extend_from_slice(ts.as_bytes());
        out.extend_from_slice(b"\",\"data\":{\"type\":");
        write_str(out, self.event_type);
        out.extend_from_slice(b",\"client_source\":\"scope\",\"timestamp\":\"");
        out.extend_from_slice(ts.as_bytes());
        out.push(b'"');
        let named = [
            ("session_id", self.session_id),
            ("connection_id", self.connection_id),
            ("pipeline_ids", self.pipeline_ids),
            ("user_id", self.user_id),
            ("error", self.error),
            ("connection_info", self.connection_info),
        ];
        for (key, value) in named {
            if let Some(v) = given(value) {
                out.push(b',');
                write_str(out, key);
                out.push(b':');
                write_json(v, out).map_err(|e| format!("{key}: {e}"))?;
            }
        }
        if let Some(m) = given(self.metadata) {
            let d = m
                .downcast::<PyDict>()
                .map_err(|_| format!("metadata must be a dict, not {}", type_name(m)))?;
            for (k, v) in d.iter() {
                let key = k
                    .downcast::<PyString>()
                    .map_err(|_| format!("metadata keys must be str, not {}", type_name(&k)))?;
                let key = key.to_cow().map_err(|e| e.to_string())?;
                if is_reserved_data_key(&key) {
                    continue;
                }
                out.push(b',');
                write_str(out, &key);
                out.push(b':');
                write_json(&v, out).map_err(|e| format!("metadata[{key:?}]: {e}"))?;
            }
        }
        out.extend_from_slice(b"}}");
        Ok(())
    }
}
