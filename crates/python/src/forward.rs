//! [`PyForwarder`]: hands events from Rust threads (the events relay) to a Python sink object.
//!
//! The relay's events loop must never wait for the GIL, so it only pushes each envelope into a
//! bounded two-class queue (`telemetry::queue::EventQueue`, heartbeats shed first) and returns.
//! One thread per Python sink drains the queue, takes the GIL once per batch, and calls
//! `sink.emit(envelope)` for each, the envelope being `json.loads` of its exact bytes. An
//! exception from `emit` is counted and logged (the first, then every power of two), as the seed
//! swallows them.
//!
//! Drops (queue full, or pushed after the sink was replaced) are counted, and reported to the
//! Python sink itself as a `telemetry_dropped` envelope (metadata `dropped`, `dropped_high`,
//! `dropped_low`, `sink: "python"`, `dropped_total`) after the batch that follows them, so the
//! sink sees its own losses as the trickle sink's reader does.

use crate::runtime;
use parking_lot::Mutex;
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;
use telemetry::queue::EventQueue;
use telemetry::{Envelope, Event, Fields, SinkStats};

/// Events queued for a Python sink before the oldest low-priority ones are dropped.
pub const FORWARD_CAPACITY: usize = 4096;

/// Every live forwarder, so that [`close_all`] can stop them before the interpreter exits.
static ALL: Mutex<Vec<Weak<PyForwarder>>> = Mutex::new(Vec::new());

/// A Python sink object fed from Rust threads. See the module docs.
pub struct PyForwarder {
    sink: Py<PyAny>,
    queue: EventQueue,
    delivered: AtomicU64,
    errors: AtomicU64,
    reports: AtomicU64,
    /// Events taken from the queue and not yet handed to the sink.
    in_flight: AtomicU64,
    closed: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl PyForwarder {
    /// A forwarder to `sink`; its thread starts with the first event.
    pub fn new(sink: Py<PyAny>) -> Arc<PyForwarder> {
        let f = Arc::new(PyForwarder {
            sink,
            queue: EventQueue::new(FORWARD_CAPACITY),
            delivered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            reports: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let mut all = ALL.lock();
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&f));
        f
    }

    /// Queues one event (never blocks; a full queue drops and counts).
    pub fn push(self: &Arc<Self>, event: Event) {
        self.queue.push(event);
        let mut thread = self.thread.lock();
        // After close the push above was refused (counted): no new thread.
        if thread.is_none() && !self.closed.load(Relaxed) {
            let me = Arc::clone(self);
            match std::thread::Builder::new()
                .name("trickle-relay-pysink".into())
                .spawn(move || me.run())
            {
                Ok(h) => *thread = Some(h),
                Err(e) => {
                    tracing::error!(target: "trickle_relay", error = %e, "cannot start the Python sink thread; relayed events are dropped (counted)");
                    self.queue.close();
                }
            }
        }
    }

    /// Stops taking events; the thread delivers what is queued, then ends.
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
        self.queue.close();
    }

    /// Running totals.
    pub fn stats(&self) -> SinkStats {
        let (q, len) = self.queue.snapshot();
        SinkStats {
            emitted: q.pushed(),
            delivered: self.delivered.load(Relaxed),
            dropped_high: q.dropped_high,
            dropped_low: q.dropped_low,
            queued: len as u64 + self.in_flight.load(Relaxed),
            reports: self.reports.load(Relaxed),
            write_errors: self.errors.load(Relaxed),
        }
    }

    fn run(self: Arc<Self>) {
        let Ok(handle) = runtime::handle() else {
            self.queue.close();
            return;
        };
        let mut batch = Vec::new();
        let mut reported = 0u64;
        loop {
            let drained = self.queue.drain_into(&mut batch);
            let dropped = self.queue.counts();
            let report = (dropped.dropped() > reported).then(|| {
                let (high, low) = (dropped.dropped_high, dropped.dropped_low);
                let fields = Fields::new()
                    .meta("dropped", dropped.dropped() - reported)
                    .meta("dropped_high", high)
                    .meta("dropped_low", low)
                    .meta("sink", "python")
                    .meta("dropped_total", dropped.dropped());
                Event::from(Envelope::new("telemetry_dropped", fields))
            });
            if !batch.is_empty() || report.is_some() {
                self.in_flight.store(batch.len() as u64, Relaxed);
                Python::with_gil(|py| {
                    for event in batch.drain(..) {
                        if self.deliver(py, &event) {
                            self.delivered.fetch_add(1, Relaxed);
                        }
                        self.in_flight.fetch_sub(1, Relaxed);
                    }
                    if let Some(report) = &report {
                        if self.deliver(py, report) {
                            self.reports.fetch_add(1, Relaxed);
                        }
                    }
                });
                reported = dropped.dropped();
            }
            if drained.closed {
                break;
            }
            handle.block_on(self.queue.wait_idle(Duration::from_millis(100)));
        }
    }

    /// `sink.emit(json.loads(bytes))`; false (counted, logged) when it raised.
    fn deliver(&self, py: Python<'_>, event: &Event) -> bool {
        let result = crate::json::loads(py, &event.to_json())
            .and_then(|d| self.sink.bind(py).call_method1("emit", (d,)));
        match result {
            Ok(_) => true,
            Err(e) => {
                let n = self.errors.fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(target: "trickle_relay", error = %e, errors = n,
                        "the installed Python telemetry sink raised in emit(); event not delivered");
                }
                false
            }
        }
    }

    fn join(&self) {
        let thread = self.thread.lock().take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// Closes every forwarder and waits for their threads (which need the GIL: released here).
pub fn close_all(py: Python<'_>) {
    let all: Vec<Arc<PyForwarder>> = ALL.lock().iter().filter_map(Weak::upgrade).collect();
    for f in &all {
        f.close();
    }
    py.allow_threads(|| {
        for f in &all {
            f.join();
        }
    });
}
