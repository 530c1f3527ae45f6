//! The sink classes: this project's Rust sinks, each wrapped for Python.
//!
//! Every class has `emit(event: dict)` (the seed's `TelemetrySink` protocol; never blocks),
//! `stats() -> dict`, and, where there is something to flush, `close(timeout=5.0) -> dict` (the
//! final counters). Installed with `set_telemetry_sink`, `publish_event` hands them envelopes
//! without building a Python dict at all.

use crate::installed::raw_or_raise;
use crate::runtime;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use serde::Serialize;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use telemetry::sinks::{SessionContext, TrickleEventsConfig};
use telemetry::{Event, Sink};
use trickle::jsonl::{JsonlWriter, JsonlWriterOptions};
use trickle::publisher::{Publisher, PublisherOptions};

/// `serde` value as a Python dict (through JSON: the counters are plain numbers and strings).
fn to_py<'py, T: Serialize>(py: Python<'py>, v: &T) -> PyResult<Bound<'py, PyAny>> {
    let bytes = serde_json::to_vec(v).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    crate::json::loads(py, &bytes)
}

/// A timeout in seconds (a non-negative, finite number), as a `Duration`.
pub fn seconds(timeout: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(timeout).map_err(|_| {
        PyValueError::new_err(format!(
            "timeout must be a finite number of seconds >= 0, got {timeout}"
        ))
    })
}

/// Checks an `http://` / `https://` URL with a host.
pub fn check_url(what: &str, url: &str) -> PyResult<()> {
    let ok = url.parse::<http::Uri>().ok().is_some_and(|u| {
        matches!(u.scheme_str(), Some("http") | Some("https"))
            && u.host().is_some_and(|h| !h.is_empty())
    });
    if ok {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!(
            "{what} must be an http:// or https:// URL with a host, got {url:?}"
        )))
    }
}

/// Hands a dict to a Rust sink, unless telemetry is opted out.
fn emit_dict(sink: &dyn Sink, event: &Bound<'_, PyAny>) -> PyResult<()> {
    let raw = raw_or_raise(event)?;
    if telemetry::telemetry_enabled() {
        sink.emit(Event::Raw(raw));
    }
    Ok(())
}

/// The Rust sink behind a Python object, when it is one of the classes here.
pub fn native(obj: &Bound<'_, PyAny>) -> Option<Arc<dyn Sink>> {
    if let Ok(s) = obj.downcast::<TrickleEventsSink>() {
        return Some(s.get().sink.clone());
    }
    if let Ok(s) = obj.downcast::<LogSink>() {
        return Some(s.get().sink.clone());
    }
    if let Ok(s) = obj.downcast::<MetricsReporter>() {
        return Some(s.get().reporter.clone());
    }
    if let Ok(s) = obj.downcast::<KafkaSink>() {
        return Some(s.get().sink.clone());
    }
    None
}

/// Forward telemetry onto a trickle events channel (the runner's sink).
///
/// `emit` puts the envelope in a bounded queue (`maxsize`, 256 by default) and returns at once;
/// a drain task on a Rust thread writes `{"type": "telemetry", "seq": N, "event": {...}}` lines
/// (numbered from 1, so a reader can count lines lost in transit; Scope's client ignores `seq`)
/// to the channel at `events_url` (no asyncio loop needed). When the queue is full, heartbeats are
/// dropped before lifecycle and error events; every drop is counted and reported downstream as
/// a `telemetry_dropped` event (stamped with `session_id` / `connection_id` when given).
///
/// `close(timeout=5.0)` stops taking events, writes what is queued and a final loss report,
/// ends the channel (so that the reader sees its end), and returns the final `stats()`.
#[pyclass(frozen, module = "trickle_relay")]
pub struct TrickleEventsSink {
    sink: Arc<telemetry::sinks::TrickleEventsSink>,
    writer: JsonlWriter,
    fold: tokio::task::AbortHandle,
    url: String,
    maxsize: usize,
}

#[pymethods]
impl TrickleEventsSink {
    #[new]
    // 256: the seed's DEFAULT_QUEUE_MAXSIZE (`telemetry::queue::DEFAULT_CAPACITY`), written out
    // so that `help()` shows it.
    #[pyo3(signature = (events_url, maxsize=256, *, session_id=None, connection_id=None))]
    fn new(
        events_url: &str,
        maxsize: i64,
        session_id: Option<String>,
        connection_id: Option<String>,
    ) -> PyResult<Self> {
        check_url("events_url", events_url)?;
        let maxsize = usize::try_from(maxsize)
            .ok()
            .filter(|m| *m >= 1)
            .ok_or_else(|| PyValueError::new_err(format!("maxsize must be >= 1, got {maxsize}")))?;
        let handle = runtime::handle()?;
        let _in_runtime = handle.enter();
        let publisher = Publisher::new(
            events_url,
            PublisherOptions {
                content_type: "application/jsonl".into(),
                reconnect_window: relay::runner::DEFAULT_RECONNECT_WINDOW,
                ..PublisherOptions::default()
            },
        );
        // The runner's segment size: a reader may fall 20 MiB behind before it loses segments.
        let writer = JsonlWriter::new(
            publisher,
            JsonlWriterOptions {
                max_segment_bytes: relay::runner::DEFAULT_EVENTS_SEGMENT_BYTES,
                ..JsonlWriterOptions::default()
            },
        );
        let sink = telemetry::sinks::TrickleEventsSink::spawn_on(
            &handle,
            writer.clone(),
            SessionContext {
                session_id: session_id.filter(|s| !s.is_empty()),
                connection_id: connection_id.filter(|s| !s.is_empty()),
            },
            TrickleEventsConfig {
                capacity: maxsize,
                ..TrickleEventsConfig::default()
            },
        );
        let fold = handle
            .spawn(relay::runner::fold_lost_lines(
                writer.clone(),
                sink.clone(),
                Arc::new(AtomicU64::new(0)),
            ))
            .abort_handle();
        Ok(TrickleEventsSink {
            sink,
            writer,
            fold,
            url: events_url.to_owned(),
            maxsize,
        })
    }

    /// Queue one envelope dict for the channel. Never blocks. Raises `TypeError` / `ValueError`
    /// if `event` is not an envelope (a dict with a non-empty string `id`).
    fn emit(&self, event: &Bound<'_, PyAny>) -> PyResult<()> {
        emit_dict(self.sink.as_ref(), event)
    }

    /// Counters: `emitted`, `delivered` (written to the channel; events of a segment that then
    /// failed move to the drops), `dropped_high`, `dropped_low`, `queued`, `reports` (loss reports
    /// written), `write_errors`, and `lines_lost` (lines the channel failed to take after they
    /// were written, events or not; the events among them are reported downstream too), so
    /// `emitted = delivered + dropped_high + dropped_low + queued`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let d = to_py(py, &self.sink.stats())?;
        d.set_item("lines_lost", self.writer.stats().lines_lost)?;
        Ok(d)
    }

    /// Stop taking events, deliver what is queued and the final loss report, and end the
    /// channel (`end_channel=False`: leave it open, e.g. for the application's own writer; what
    /// was queued is still written); wait at most `timeout` seconds (the GIL is released
    /// meanwhile). Returns the final `stats()`, plus `timed_out` and, if the channel could not
    /// take everything, `channel_error`.
    ///
    /// Ending the channel deletes it on the server: a reader still more than a segment behind
    /// then misses the rest (trickle's semantics; the reader counts the segments it lost).
    #[pyo3(signature = (timeout=5.0, *, end_channel=true))]
    fn close<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
        end_channel: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let limit = seconds(timeout)?;
        let (sink, writer, fold) = (self.sink.clone(), self.writer.clone(), self.fold.clone());
        let outcome = runtime::block_on(py, async move {
            let done = tokio::time::timeout(limit, async {
                sink.shutdown().await;
                let result = if end_channel {
                    writer.close().await
                } else {
                    writer.flush().await
                };
                result.err().map(|e| e.to_string())
            })
            .await;
            fold.abort();
            done
        })?;
        // Past the timeout the queue is closed all the same: later emits are dropped, counted.
        self.sink.close();
        let d = self.stats(py)?;
        d.set_item("timed_out", outcome.is_err())?;
        if let Ok(Some(e)) = outcome {
            d.set_item("channel_error", e)?;
        }
        Ok(d)
    }

    /// The events channel URL.
    #[getter]
    fn events_url(&self) -> &str {
        &self.url
    }

    /// The queue capacity.
    #[getter]
    fn maxsize(&self) -> usize {
        self.maxsize
    }

    fn __repr__(&self) -> String {
        format!(
            "TrickleEventsSink({:?}, maxsize={})",
            self.url, self.maxsize
        )
    }
}

impl Drop for TrickleEventsSink {
    fn drop(&mut self) {
        // The drain task writes what is queued and ends (the sink's own Drop closes the queue).
        self.fold.abort();
    }
}

/// Log each event as one line, `TELEMETRY type=... id=... session=... connection=...
/// relayed_via=...`, to the Python logger `trickle_relay.telemetry` (level INFO): for checking
/// a relay without a broker (`SCOPE_TELEMETRY_LOG_SINK`).
#[pyclass(frozen, module = "trickle_relay")]
pub struct LogSink {
    sink: Arc<telemetry::sinks::LogSink>,
}

impl LogSink {
    /// A log sink.
    pub fn new() -> LogSink {
        LogSink {
            sink: Arc::new(telemetry::sinks::LogSink::new()),
        }
    }
}

#[pymethods]
impl LogSink {
    #[new]
    fn py_new() -> Self {
        LogSink::new()
    }

    /// Log one envelope dict. Raises `TypeError` / `ValueError` if it is not an envelope.
    fn emit(&self, event: &Bound<'_, PyAny>) -> PyResult<()> {
        emit_dict(self.sink.as_ref(), event)
    }

    /// Counters: `emitted`, `delivered`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.sink.stats())
    }

    fn __repr__(&self) -> &'static str {
        "LogSink()"
    }
}

/// The crash-safe HTTP metrics reporter: batches envelopes to `POST /v1/metrics`.
///
/// Configured from the seed's environment variables (`DAYDREAM_METRICS_URL`,
/// `SCOPE_CLOUD_API_KEY`, `SCOPE_METRICS_FLUSH_INTERVAL_MS`, `SCOPE_METRICS_MAX_BATCH`,
/// `SCOPE_METRICS_MAX_BUFFER`, `SCOPE_METRICS_BUFFER_PATH`, ...); `api_key` and `url` override
/// theirs. Every event it accepted is on disk (the buffer path) until a 200 covers it, so a
/// crash or `kill -9` loses nothing accepted; the next reporter on the same path sends it.
/// Raises `ValueError` for an unusable configuration (no key, a bad URL).
#[pyclass(frozen, module = "trickle_relay")]
pub struct MetricsReporter {
    reporter: Arc<reporter::Reporter>,
}

impl MetricsReporter {
    /// Starts a reporter from the environment, with `api_key` / `url` overriding it.
    pub fn from_env(
        py: Python<'_>,
        api_key: Option<String>,
        url: Option<String>,
    ) -> PyResult<MetricsReporter> {
        let mut config = reporter::ReporterConfig::from_env().map_err(|e| {
            PyValueError::new_err(format!("invalid metrics reporter settings: {e}"))
        })?;
        if let Some(k) = api_key {
            config.api_key = k;
        }
        if let Some(u) = url {
            check_url("url", &u)?;
            config.url = u;
        }
        if config.api_key.trim().is_empty() {
            return Err(PyValueError::new_err(
                "MetricsReporter needs an API key: pass api_key= or set SCOPE_CLOUD_API_KEY",
            ));
        }
        let reporter = py
            .allow_threads(|| reporter::Reporter::start(config))
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(MetricsReporter {
            reporter: Arc::new(reporter),
        })
    }
}

#[pymethods]
impl MetricsReporter {
    #[new]
    #[pyo3(signature = (api_key=None, url=None))]
    fn py_new(py: Python<'_>, api_key: Option<String>, url: Option<String>) -> PyResult<Self> {
        MetricsReporter::from_env(py, api_key, url)
    }

    /// Queue one envelope dict for the metrics API. Never blocks. Raises `TypeError` /
    /// `ValueError` if it is not an envelope.
    fn emit(&self, event: &Bound<'_, PyAny>) -> PyResult<()> {
        emit_dict(self.reporter.as_ref(), event)
    }

    /// Every counter of the reporter (`accepted`, `acked`, `buffered`, `dropped_*`, `status_*`,
    /// `paused`, ...).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.reporter.reporter_stats())
    }

    /// Replace the API key; resumes sending if a 401 paused it.
    fn update_api_key(&self, api_key: String) {
        self.reporter.set_api_key(api_key);
    }

    /// Send what is buffered now; wait at most `timeout` seconds (GIL released). Returns
    /// `"drained"`, `"paused"` (a 401 stopped sending) or `"timed_out"`.
    #[pyo3(signature = (timeout=5.0))]
    fn flush(&self, py: Python<'_>, timeout: f64) -> PyResult<&'static str> {
        let limit = seconds(timeout)?;
        let r = self.reporter.clone();
        Ok(match py.allow_threads(move || r.flush_timeout(limit)) {
            reporter::FlushOutcome::Drained => "drained",
            reporter::FlushOutcome::Paused { .. } => "paused",
            reporter::FlushOutcome::TimedOut { .. } => "timed_out",
        })
    }

    /// Flush for at most `timeout` seconds, then stop; what is left stays on disk for the next
    /// reporter. Returns the final `stats()`. Later emits are dropped and counted.
    #[pyo3(signature = (timeout=5.0))]
    fn close<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let limit = seconds(timeout)?;
        let r = self.reporter.clone();
        let stats = py.allow_threads(move || r.shutdown(limit));
        to_py(py, &stats)
    }

    fn __repr__(&self) -> String {
        format!("MetricsReporter(url={:?})", self.reporter.config().url)
    }
}

/// The Kafka sink: envelopes to `KAFKA_TOPIC` (default `scope-events`), keyed by id, through a
/// disk buffer and an idempotent producer.
///
/// Configured from the seed's environment variables (`KAFKA_BOOTSTRAP_SERVERS`, `KAFKA_TOPIC`,
/// `KAFKA_SASL_USERNAME` / `KAFKA_SASL_PASSWORD`, `SCOPE_KAFKA_BUFFER_PATH`, ...). Raises
/// `ValueError` for an unusable configuration.
#[pyclass(frozen, module = "trickle_relay")]
pub struct KafkaSink {
    sink: Arc<kafka::KafkaSink>,
}

impl KafkaSink {
    /// Starts the sink from the environment.
    pub fn from_env(py: Python<'_>) -> PyResult<KafkaSink> {
        let config = kafka::KafkaConfig::from_env()
            .map_err(|e| PyValueError::new_err(format!("invalid Kafka sink settings: {e}")))?;
        let sink = py
            .allow_threads(|| kafka::KafkaSink::start(config))
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the Kafka sink: {e}")))?;
        Ok(KafkaSink {
            sink: Arc::new(sink),
        })
    }
}

#[pymethods]
impl KafkaSink {
    #[new]
    fn py_new(py: Python<'_>) -> PyResult<Self> {
        KafkaSink::from_env(py)
    }

    /// Queue one envelope dict for Kafka. Never blocks. Raises `TypeError` / `ValueError` if it
    /// is not an envelope.
    fn emit(&self, event: &Bound<'_, PyAny>) -> PyResult<()> {
        emit_dict(self.sink.as_ref(), event)
    }

    /// Every counter of the sink (`accepted`, `delivered`, `buffered`, `dropped_*`, ...).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.sink.kafka_stats())
    }

    /// Flush for at most `timeout` seconds, then stop; what is left stays on disk for the next
    /// sink. Returns the final `stats()`.
    #[pyo3(signature = (timeout=5.0))]
    fn close<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let limit = seconds(timeout)?;
        let s = self.sink.clone();
        let stats = py.allow_threads(move || s.shutdown(limit));
        to_py(py, &stats)
    }

    fn __repr__(&self) -> String {
        format!("KafkaSink({})", self.sink.config().describe())
    }
}
