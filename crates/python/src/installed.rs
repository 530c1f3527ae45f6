//! The module-level API of the seed (`kafka_publisher.py`): one process-wide sink, set with
//! `set_telemetry_sink`, fed by `publish_event` / `publish_raw_event`.
//!
//! The installed sink is either one of this package's sinks (a Rust `telemetry::Sink`: events go
//! to it without building a Python object) or any Python object with an `emit(event)` method (the
//! seed's `TelemetrySink` protocol: it gets the envelope as a dict, on the caller's thread, and
//! an exception it raises is counted and swallowed, as the seed does).
//!
//! The opt-out (`SCOPE_TELEMETRY_DISABLED`, then `DO_NOT_TRACK`, read once) wins over every sink,
//! an explicitly installed one included: an opted-out process publishes and egresses nothing,
//! and counts what it discarded ([`stats`]).
//!
//! [`CurrentSink`] is the egress the events relay re-publishes through: whatever is installed at
//! the moment each relayed envelope arrives, as the seed's `publish_raw_event` looks it up.

use crate::forward::PyForwarder;
use crate::json::{self, EnvelopeArgs};
use crate::sinks;
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use parking_lot::Mutex;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use telemetry::{Egress, Envelope, Event, RawEnvelope, Sink, SinkStats};

/// Where events go.
enum Target {
    /// One of this package's sinks.
    Native(Arc<dyn Sink>),
    /// A Python object with `emit`; the forwarder serves relayed events from Rust threads.
    Python(Arc<PyForwarder>),
}

struct Installed {
    /// The object `set_telemetry_sink` got (returned by `get_telemetry_sink`).
    obj: Py<PyAny>,
    target: Target,
}

static INSTALLED: ArcSwapOption<Installed> = ArcSwapOption::const_empty();

/// Module-wide counters ([`stats`]).
static PUBLISHED: AtomicU64 = AtomicU64::new(0);
static INVALID: AtomicU64 = AtomicU64::new(0);
static NO_SINK: AtomicU64 = AtomicU64::new(0);
static OPTED_OUT: AtomicU64 = AtomicU64::new(0);
static SINK_ERRORS: AtomicU64 = AtomicU64::new(0);

/// The sink `install_default_egress_sink` made, kept so that a second call reuses it (two HTTP
/// reporters on one disk buffer would fight over it).
static DEFAULT: Mutex<Option<(Egress, Py<PyAny>)>> = Mutex::new(None);

fn count_invalid(what: &str, error: &str) {
    let n = INVALID.fetch_add(1, Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::warn!(target: "trickle_relay", error, invalid = n, "{what}: not sent (counted as invalid)");
    }
}

fn count_sink_error(py: Python<'_>, e: PyErr) {
    let n = SINK_ERRORS.fetch_add(1, Relaxed) + 1;
    if n.is_power_of_two() {
        let msg = e.value(py).to_string();
        tracing::warn!(target: "trickle_relay", error = %msg, errors = n,
            "the installed telemetry sink raised in emit(); swallowed (counted)");
    }
}

/// The event `publish_event` would send for these arguments: the fast path's built envelope, or
/// the general path's bytes.
fn build_event(args: &EnvelopeArgs<'_, '_>) -> Result<Event, String> {
    if let Some(fields) = args.fields() {
        return Ok(Event::from(Envelope::new(args.event_type, fields)));
    }
    let mut out = Vec::with_capacity(512);
    let id = uuid::Uuid::new_v4().hyphenated().to_string();
    args.write_json(&id, telemetry::now_ms(), &mut out)?;
    RawEnvelope::parse(Bytes::from(out))
        .map(Event::Raw)
        .map_err(|e| e.to_string())
}

/// A dict as envelope bytes, parsed for forwarding.
pub fn raw_from_dict(event: &Bound<'_, PyAny>) -> Result<RawEnvelope, String> {
    if !event.is_instance_of::<PyDict>() {
        return Err(format!(
            "an envelope must be a dict, not {}",
            event
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ));
    }
    let mut out = Vec::with_capacity(512);
    json::write_json(event, &mut out)?;
    RawEnvelope::parse(Bytes::from(out)).map_err(|e| e.to_string())
}

/// Build the structured event envelope, stamped once (a new uuid4 `id`, the time as a unix-ms
/// string), exactly as `publish_event` sends it.
///
/// Optional fields that are `None` or empty are omitted; `metadata` is merged into `data`, except
/// for the reserved keys (`type`, `client_source`, `timestamp`, `session_id`, `connection_id`,
/// `pipeline_ids`, `user_id`, `error`, `connection_info`), which it cannot override.
///
/// Raises `TypeError` for a value JSON cannot carry (see the package docs).
#[pyfunction]
#[pyo3(signature = (event_type, session_id=None, connection_id=None, pipeline_ids=None,
    user_id=None, error=None, metadata=None, connection_info=None))]
#[allow(clippy::too_many_arguments)]
pub fn build_event_envelope<'py>(
    py: Python<'py>,
    event_type: &str,
    session_id: Option<&Bound<'py, PyAny>>,
    connection_id: Option<&Bound<'py, PyAny>>,
    pipeline_ids: Option<&Bound<'py, PyAny>>,
    user_id: Option<&Bound<'py, PyAny>>,
    error: Option<&Bound<'py, PyAny>>,
    metadata: Option<&Bound<'py, PyAny>>,
    connection_info: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let args = EnvelopeArgs {
        event_type,
        session_id,
        connection_id,
        pipeline_ids,
        user_id,
        error,
        metadata,
        connection_info,
    };
    let event = build_event(&args).map_err(PyTypeError::new_err)?;
    json::loads(py, &event.to_json())
}

/// Publish an event through the installed sink: build the envelope once and hand it over.
///
/// Never blocks and never raises for what the event carries: with no sink installed, or with
/// telemetry opted out (`SCOPE_TELEMETRY_DISABLED`, `DO_NOT_TRACK`), it does nothing (counted in
/// `stats()`); an event JSON cannot carry is counted as invalid and logged. Safe from any thread.
#[pyfunction]
#[pyo3(signature = (event_type, session_id=None, connection_id=None, pipeline_ids=None,
    user_id=None, error=None, metadata=None, connection_info=None))]
#[allow(clippy::too_many_arguments)]
pub fn publish_event<'py>(
    py: Python<'py>,
    event_type: &str,
    session_id: Option<&Bound<'py, PyAny>>,
    connection_id: Option<&Bound<'py, PyAny>>,
    pipeline_ids: Option<&Bound<'py, PyAny>>,
    user_id: Option<&Bound<'py, PyAny>>,
    error: Option<&Bound<'py, PyAny>>,
    metadata: Option<&Bound<'py, PyAny>>,
    connection_info: Option<&Bound<'py, PyAny>>,
) {
    if !telemetry::telemetry_enabled() {
        OPTED_OUT.fetch_add(1, Relaxed);
        return;
    }
    let guard = INSTALLED.load();
    let Some(installed) = guard.as_ref() else {
        NO_SINK.fetch_add(1, Relaxed);
        return;
    };
    let args = EnvelopeArgs {
        event_type,
        session_id,
        connection_id,
        pipeline_ids,
        user_id,
        error,
        metadata,
        connection_info,
    };
    match build_event(&args) {
        Ok(event) => match &installed.target {
            Target::Native(sink) => {
                sink.emit(event);
                PUBLISHED.fetch_add(1, Relaxed);
            }
            Target::Python(_) => {
                let result = json::loads(py, &event.to_json())
                    .and_then(|d| installed.obj.bind(py).call_method1("emit", (d,)));
                match result {
                    Ok(_) => {
                        PUBLISHED.fetch_add(1, Relaxed);
                    }
                    Err(e) => count_sink_error(py, e),
                }
            }
        },
        Err(e) => count_invalid(&format!("publish_event({event_type:?})"), &e),
    }
}

/// Publish an already-built envelope verbatim (the client re-publishing relayed telemetry): its
/// id, timestamps and ids are kept as they are.
///
/// Never raises for the envelope: one that is not a dict with a non-empty string `id`, or that
/// JSON cannot carry, is counted as invalid and logged. A no-op without a sink or when opted out.
#[pyfunction]
pub fn publish_raw_event(py: Python<'_>, event: &Bound<'_, PyAny>) {
    if !telemetry::telemetry_enabled() {
        OPTED_OUT.fetch_add(1, Relaxed);
        return;
    }
    let guard = INSTALLED.load();
    let Some(installed) = guard.as_ref() else {
        NO_SINK.fetch_add(1, Relaxed);
        return;
    };
    match &installed.target {
        Target::Native(sink) => match raw_from_dict(event) {
            Ok(raw) => {
                sink.emit(Event::Raw(raw));
                PUBLISHED.fetch_add(1, Relaxed);
            }
            Err(e) => count_invalid("publish_raw_event", &e),
        },
        Target::Python(_) => match installed.obj.bind(py).call_method1("emit", (event,)) {
            Ok(_) => {
                PUBLISHED.fetch_add(1, Relaxed);
            }
            Err(e) => count_sink_error(py, e),
        },
    }
}

/// Set (or, with `None`, clear) the active telemetry sink: one of this package's sinks, or any
/// object with an `emit(event: dict)` method. Raises `TypeError` for anything else.
#[pyfunction]
#[pyo3(signature = (sink))]
pub fn set_telemetry_sink(py: Python<'_>, sink: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    let Some(sink) = sink else {
        replace(None);
        return Ok(());
    };
    let target = match sinks::native(sink) {
        Some(native) => Target::Native(native),
        None => {
            let emit = sink.getattr("emit").ok().filter(|e| e.is_callable());
            if emit.is_none() {
                return Err(PyTypeError::new_err(format!(
                    "a telemetry sink needs an emit(event) method; {} has none",
                    sink.repr().map(|r| r.to_string()).unwrap_or_default()
                )));
            }
            Target::Python(PyForwarder::new(sink.clone().unbind()))
        }
    };
    replace(Some(Arc::new(Installed {
        obj: sink.clone().unbind(),
        target,
    })));
    let _ = py;
    Ok(())
}

fn replace(new: Option<Arc<Installed>>) {
    if let Some(old) = INSTALLED.swap(new) {
        if let Target::Python(f) = &old.target {
            // Its thread delivers what the relay already queued, then ends.
            f.close();
        }
    }
}

/// The active telemetry sink, or `None`.
#[pyfunction]
pub fn get_telemetry_sink(py: Python<'_>) -> Option<Py<PyAny>> {
    INSTALLED.load().as_ref().map(|i| i.obj.clone_ref(py))
}

/// Whether telemetry is on: false when `SCOPE_TELEMETRY_DISABLED` (or, if that is unset,
/// `DO_NOT_TRACK`) opts out. Read from the environment once, on first use.
#[pyfunction]
pub fn telemetry_enabled() -> bool {
    telemetry::telemetry_enabled()
}

/// Install the default telemetry egress sink, chosen from the environment as the seed does,
/// first match wins: `SCOPE_TELEMETRY_LOG_SINK` → `LogSink`; `SCOPE_CLOUD_API_KEY` (unless
/// `SCOPE_METRICS_ENABLED=false`) → `MetricsReporter`; `KAFKA_BOOTSTRAP_SERVERS` → `KafkaSink`.
///
/// Returns True if a sink was installed. Opted out (`SCOPE_TELEMETRY_DISABLED`, `DO_NOT_TRACK`),
/// nothing configured, or a configured sink that cannot start (logged): False. A second call
/// reinstalls the sink the first one made instead of starting another.
#[pyfunction]
pub fn install_default_egress_sink(py: Python<'_>) -> PyResult<bool> {
    let egress = telemetry::select_from_env();
    let made: PyResult<Py<PyAny>> = {
        let mut default = DEFAULT.lock();
        match (&*default, egress) {
            (_, Egress::Disabled { by }) => {
                tracing::info!(target: "trickle_relay", "telemetry disabled by {by}: no egress sink installed");
                return Ok(false);
            }
            (_, Egress::None) => {
                tracing::info!(target: "trickle_relay", "no telemetry egress configured (SCOPE_TELEMETRY_LOG_SINK, SCOPE_CLOUD_API_KEY, KAFKA_BOOTSTRAP_SERVERS)");
                return Ok(false);
            }
            (Some((kind, obj)), want) if *kind == want => Ok(obj.clone_ref(py)),
            (_, want) => {
                let obj = match want {
                    Egress::Log => Py::new(py, sinks::LogSink::new()).map(Py::into_any),
                    Egress::HttpReporter => sinks::MetricsReporter::from_env(py, None, None)
                        .and_then(|r| Py::new(py, r))
                        .map(Py::into_any),
                    _ => sinks::KafkaSink::from_env(py)
                        .and_then(|k| Py::new(py, k))
                        .map(Py::into_any),
                };
                if let Ok(obj) = &obj {
                    *default = Some((want, obj.clone_ref(py)));
                }
                obj
            }
        }
    };
    match made {
        Ok(obj) => {
            set_telemetry_sink(py, Some(obj.bind(py)))?;
            tracing::info!(target: "trickle_relay", egress = egress.as_str(), "telemetry egress sink installed");
            Ok(true)
        }
        Err(e) => {
            let msg = e.value(py).to_string();
            tracing::error!(target: "trickle_relay", egress = egress.as_str(), error = %msg,
                "cannot start the telemetry egress sink; none installed");
            Ok(false)
        }
    }
}

/// The module's counters: `published` (events handed to a sink), `invalid` (events JSON could
/// not carry, or dicts that are not envelopes), `no_sink` and `opted_out` (discarded),
/// `sink_errors` (exceptions from a Python sink's `emit`), and `sink`: the installed sink's
/// name.
#[pyfunction]
pub fn stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("published", PUBLISHED.load(Relaxed))?;
    d.set_item("invalid", INVALID.load(Relaxed))?;
    d.set_item("no_sink", NO_SINK.load(Relaxed))?;
    d.set_item("opted_out", OPTED_OUT.load(Relaxed))?;
    d.set_item("sink_errors", SINK_ERRORS.load(Relaxed))?;
    let name = match INSTALLED.load().as_ref().map(|i| &i.target) {
        None => None,
        Some(Target::Native(s)) => Some(s.name()),
        Some(Target::Python(_)) => Some("python"),
    };
    d.set_item("sink", name)?;
    Ok(d)
}

/// Checks that `obj` is an envelope dict (for a sink's `emit`), as a Python exception.
pub fn raw_or_raise(obj: &Bound<'_, PyAny>) -> PyResult<RawEnvelope> {
    raw_from_dict(obj).map_err(|e| {
        if obj.is_instance_of::<PyDict>() {
            PyValueError::new_err(e)
        } else {
            PyTypeError::new_err(e)
        }
    })
}

/// The egress of the events relay: each relayed envelope goes to the sink installed when it
/// arrives (see the module docs); counted per outcome.
#[derive(Default)]
pub struct CurrentSink {
    native: AtomicU64,
    python: AtomicU64,
    no_sink: AtomicU64,
    opted_out: AtomicU64,
}

impl CurrentSink {
    /// The counters as a dict: `to_native_sink`, `to_python_sink`, `discarded_no_sink`,
    /// `discarded_opted_out`.
    pub fn stats_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("to_native_sink", self.native.load(Relaxed))?;
        d.set_item("to_python_sink", self.python.load(Relaxed))?;
        d.set_item("discarded_no_sink", self.no_sink.load(Relaxed))?;
        d.set_item("discarded_opted_out", self.opted_out.load(Relaxed))?;
        let sink = INSTALLED.load();
        if let Some(Target::Python(f)) = sink.as_ref().map(|i| &i.target) {
            let s = f.stats();
            let fd = PyDict::new(py);
            fd.set_item("emitted", s.emitted)?;
            fd.set_item("delivered", s.delivered)?;
            fd.set_item("dropped", s.dropped())?;
            fd.set_item("queued", s.queued)?;
            fd.set_item("errors", s.write_errors)?;
            fd.set_item("reports", s.reports)?;
            d.set_item("python_sink", fd)?;
        }
        Ok(d)
    }
}

impl Sink for CurrentSink {
    fn emit(&self, event: Event) {
        if !telemetry::telemetry_enabled() {
            self.opted_out.fetch_add(1, Relaxed);
            return;
        }
        let guard = INSTALLED.load();
        match guard.as_ref().map(|i| &i.target) {
            None => {
                self.no_sink.fetch_add(1, Relaxed);
            }
            Some(Target::Native(sink)) => {
                self.native.fetch_add(1, Relaxed);
                sink.emit(event);
            }
            Some(Target::Python(f)) => {
                self.python.fetch_add(1, Relaxed);
                f.push(event);
            }
        }
    }

    fn stats(&self) -> SinkStats {
        let n = self.native.load(Relaxed) + self.python.load(Relaxed);
        SinkStats {
            emitted: n + self.no_sink.load(Relaxed) + self.opted_out.load(Relaxed),
            delivered: n,
            ..SinkStats::default()
        }
    }

    fn name(&self) -> &'static str {
        "installed"
    }
}
