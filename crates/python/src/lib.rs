//! The `trickle_relay` Python package's native module (`trickle_relay._native`): the seed
//! application's telemetry API, same names and semantics, with this project's Rust core
//! underneath.
//!
//! # What Python sees, and what runs where
//!
//! ```text
//! Python thread                          Rust (no GIL)
//! publish_event("stream_heartbeat", ..)
//!   -> arguments read into telemetry::Fields (GIL held: Python objects are read)
//!   -> installed sink is one of ours?  yes: Sink::emit (a bounded, non-blocking push)
//!                                              -> drain task on the package's Tokio runtime
//!                                                 -> trickle events channel / HTTP / Kafka
//!                                      no (a Python object with emit): sink.emit(envelope dict)
//!
//! EventsRelay(events_url)                 events loop (relay::client) on the runtime
//!   for msg in relay / async for msg ..   <- every non-telemetry message, as a dict
//!                                            telemetry -> check session, annotate
//!                                              -> the sink installed *now* (ours: direct;
//!                                                 a Python object: a forwarder thread)
//! ```
//!
//! Module layout, one concern each:
//! - [`runtime`]: the one Tokio runtime every background task of the package runs on.
//! - [`json`]: Python objects to JSON bytes and `telemetry::Fields`, and JSON back to dicts.
//! - [`sinks`]: the sink classes (`TrickleEventsSink`, `LogSink`, `MetricsReporter`, `KafkaSink`).
//! - [`installed`]: `set_telemetry_sink`, `publish_event` and the rest of the module-level API,
//!   and the egress the events relay re-publishes through.
//! - [`forward`]: hands events to a Python sink object from Rust threads.
//! - [`events`]: `EventsRelay`, the client's events loop.
//! - [`logbridge`]: Rust log records (`tracing`) into Python's `logging`.
//! - [`testing`]: an in-process trickle server for tests and local runs.
//!
//! # The GIL
//!
//! Every wait (closing a sink, waiting for a message, connecting) releases the GIL
//! (`py.allow_threads`); background work never takes it except to call Python code (a Python
//! sink's `emit`, `logging`). `emit` on one of our sinks is a bounded push into a queue, so the GIL
//! is kept across it: releasing and re-taking it would cost more than the push.

#![warn(missing_docs)]

use pyo3::prelude::*;

mod events;
mod forward;
mod installed;
mod json;
mod logbridge;
mod runtime;
mod sinks;
mod testing;

/// Stops every background thread that calls into Python, before the interpreter goes away.
#[pyfunction]
fn _shutdown(py: Python<'_>) {
    forward::close_all(py);
    logbridge::stop(py);
}

/// The native module. Python code imports `trickle_relay`, which re-exports all of this.
#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    logbridge::install(m.py())?;
    m.add_function(wrap_pyfunction!(installed::build_event_envelope, m)?)?;
    m.add_function(wrap_pyfunction!(installed::publish_event, m)?)?;
    m.add_function(wrap_pyfunction!(installed::publish_raw_event, m)?)?;
    m.add_function(wrap_pyfunction!(installed::set_telemetry_sink, m)?)?;
    m.add_function(wrap_pyfunction!(installed::get_telemetry_sink, m)?)?;
    m.add_function(wrap_pyfunction!(installed::install_default_egress_sink, m)?)?;
    m.add_function(wrap_pyfunction!(installed::telemetry_enabled, m)?)?;
    m.add_function(wrap_pyfunction!(installed::stats, m)?)?;
    m.add_function(wrap_pyfunction!(_shutdown, m)?)?;
    m.add_class::<sinks::TrickleEventsSink>()?;
    m.add_class::<sinks::LogSink>()?;
    m.add_class::<sinks::MetricsReporter>()?;
    m.add_class::<sinks::KafkaSink>()?;
    m.add_class::<events::EventsRelay>()?;
    m.add_class::<testing::TrickleServer>()?;
    m.add("DEFAULT_QUEUE_MAXSIZE", telemetry::queue::DEFAULT_CAPACITY)?;
    Ok(())
}
