//! Rust log records (`tracing`) into Python's `logging`, without a Rust thread ever waiting for
//! the GIL where it logs.
//!
//! A `tracing` layer formats each record (message, then `key=value` fields) and pushes it into a
//! bounded lock-free queue; one thread takes the GIL per batch and calls
//! `logging.getLogger(name).log(level, "%s", message)`, where `name` is `trickle_relay.` plus
//! the record's target with `::` as `.` (the log sink's lines go to `trickle_relay.telemetry`).
//! A full queue drops the record and counts it; the count is logged with the next batch.
//!
//! Records below `TRICKLE_RELAY_LOG` (an `EnvFilter` directive, default `info`) are never
//! formatted. If the process already has a `tracing` subscriber, it is kept and this bridge is
//! not installed.

use crossbeam_queue::ArrayQueue;
use parking_lot::{Condvar, Mutex};
use pyo3::prelude::*;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{EnvFilter, Layer};

const CAPACITY: usize = 4096;

struct Record {
    level: Level,
    target: String,
    message: String,
}

struct Bridge {
    queue: ArrayQueue<Record>,
    dropped: AtomicU64,
    stopped: AtomicBool,
    lock: Mutex<()>,
    ready: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

static BRIDGE: OnceLock<Arc<Bridge>> = OnceLock::new();

/// Installs the bridge as the process's `tracing` subscriber (once; kept if one exists).
pub fn install(_py: Python<'_>) -> PyResult<()> {
    if BRIDGE.get().is_some() {
        return Ok(());
    }
    let bridge = Arc::new(Bridge {
        queue: ArrayQueue::new(CAPACITY),
        dropped: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
        lock: Mutex::new(()),
        ready: Condvar::new(),
        thread: Mutex::new(None),
    });
    let filter =
        EnvFilter::try_from_env("TRICKLE_RELAY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(ToPython(bridge.clone()));
    if tracing::subscriber::set_global_default(subscriber).is_ok() {
        let _ = BRIDGE.set(bridge);
    }
    Ok(())
}

/// Stops the thread (it delivers what is queued first). Later records are dropped.
pub fn stop(py: Python<'_>) {
    let Some(bridge) = BRIDGE.get() else {
        return;
    };
    bridge.stopped.store(true, Relaxed);
    bridge.ready.notify_all();
    let thread = bridge.thread.lock().take();
    if let Some(t) = thread {
        py.allow_threads(|| {
            let _ = t.join();
        });
    }
}

struct ToPython(Arc<Bridge>);

struct Fields<'a> {
    message: &'a mut String,
    rest: String,
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={:?}", field.name(), value);
        }
    }
}

impl<S: Subscriber> Layer<S> for ToPython {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let bridge = &self.0;
        if bridge.stopped.load(Relaxed) {
            return;
        }
        let mut message = String::new();
        let mut fields = Fields {
            message: &mut message,
            rest: String::new(),
        };
        event.record(&mut fields);
        let rest = fields.rest;
        message.push_str(&rest);
        let record = Record {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            message,
        };
        if bridge.queue.push(record).is_err() {
            bridge.dropped.fetch_add(1, Relaxed);
            return;
        }
        start_thread(bridge);
        bridge.ready.notify_one();
    }
}

fn start_thread(bridge: &Arc<Bridge>) {
    let mut thread = bridge.thread.lock();
    if thread.is_some() || bridge.stopped.load(Relaxed) {
        return;
    }
    let b = bridge.clone();
    // No thread: the records wait in the queue (and are dropped, counted, once it is full).
    *thread = std::thread::Builder::new()
        .name("trickle-relay-log".into())
        .spawn(move || run(b))
        .ok();
}

fn level_number(level: Level) -> i32 {
    match level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        _ => 10,
    }
}

fn run(bridge: Arc<Bridge>) {
    let mut reported = 0u64;
    loop {
        if bridge.queue.is_empty() {
            if bridge.stopped.load(Relaxed) {
                return;
            }
            let mut g = bridge.lock.lock();
            bridge.ready.wait_for(&mut g, Duration::from_millis(200));
            continue;
        }
        let dropped = bridge.dropped.load(Relaxed);
        Python::with_gil(|py| {
            let Ok(logging) = py.import("logging") else {
                return;
            };
            let mut n = 0;
            while let Some(r) = bridge.queue.pop() {
                let name = format!("trickle_relay.{}", r.target.replace("::", "."));
                let name = name.trim_end_matches(".trickle_relay");
                if let Ok(logger) = logging.call_method1("getLogger", (name,)) {
                    let _ = logger.call_method1("log", (level_number(r.level), "%s", r.message));
                }
                n += 1;
                if n >= 256 {
                    break;
                }
            }
            if dropped > reported {
                if let Ok(logger) = logging.call_method1("getLogger", ("trickle_relay",)) {
                    let msg = format!(
                        "{} log records dropped (the log queue was full)",
                        dropped - reported
                    );
                    let _ = logger.call_method1("log", (30, "%s", msg));
                }
            }
        });
        reported = dropped;
    }
}
