//! `EventsRelay`: the client's events loop (`relay::client`) for a Python application.
//!
//! ```text
//! events channel -> relay::client events loop (runtime thread)
//!                     telemetry -> session check, annotation -> CurrentSink (the installed sink)
//!                     any other message (raw line) -> mpsc -> pump task -> inbox (bounded)
//! Python: for msg in relay        <- inbox, json.loads'd; waits with the GIL released
//!         async for msg in relay  <- the same inbox; waits on a socket the pump writes a byte
//!                                    to (loop.add_reader), never blocking the event loop
//! ```
//!
//! Nothing is dropped between the channel and Python: when the inbox is full (Python is not
//! reading), the pump stops taking messages and the events loop waits for it. A message is
//! taken from the inbox only when it is returned, so cancelling an `await anext(relay)` loses
//! nothing. One consumer at a time.

use crate::installed::CurrentSink;
use crate::runtime;
use crate::sinks::{check_url, seconds};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use relay::client::{Client, ClientConfig, ClientReport};
use relay::SessionIds;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use telemetry::Sink;
use tokio::sync::{mpsc, Notify};

/// Messages held for Python before the events loop is made to wait.
const INBOX_CAPACITY: usize = 1024;

/// How long `close()` waits for the runner to end the events channel when the relay has a
/// control channel (closing it tells the runner to stop).
const DEFAULT_DRAIN: Duration = Duration::from_secs(5);

struct Inbox {
    queue: Mutex<VecDeque<Bytes>>,
    /// Set (under the queue lock) once no message can arrive any more.
    ended: AtomicBool,
    ready: Condvar,
    space: Notify,
    /// The async consumer waits for a byte on `wake_rx`: write one on the next push.
    armed: AtomicBool,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
    received: AtomicU64,
}

impl Inbox {
    fn new() -> std::io::Result<Inbox> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Inbox {
            queue: Mutex::new(VecDeque::new()),
            ended: AtomicBool::new(false),
            ready: Condvar::new(),
            space: Notify::new(),
            armed: AtomicBool::new(false),
            wake_tx,
            wake_rx,
            received: AtomicU64::new(0),
        })
    }

    fn wake(&self) {
        self.ready.notify_all();
        if self.armed.swap(false, Ordering::SeqCst) {
            // Full socket buffer: a byte is already there to wake the reader.
            let _ = (&self.wake_tx).write(b"x");
        }
    }

    fn pop(&self) -> Option<Bytes> {
        let line = self.queue.lock().pop_front();
        if line.is_some() {
            self.space.notify_one();
        }
        line
    }

    /// Nothing queued and nothing more to come.
    fn finished(&self) -> bool {
        let q = self.queue.lock();
        q.is_empty() && self.ended.load(Ordering::SeqCst)
    }
}

/// Moves messages from the events loop into the inbox, waiting while it is full.
async fn pump(mut rx: mpsc::Receiver<Bytes>, inbox: Arc<Inbox>) {
    while let Some(line) = rx.recv().await {
        loop {
            let space = inbox.space.notified();
            if inbox.queue.lock().len() < INBOX_CAPACITY {
                break;
            }
            space.await;
        }
        inbox.queue.lock().push_back(line);
        inbox.received.fetch_add(1, Ordering::Relaxed);
        inbox.wake();
    }
    {
        let _q = inbox.queue.lock();
        inbox.ended.store(true, Ordering::SeqCst);
    }
    inbox.wake();
}

/// Run the client's events loop on a Rust thread.
///
/// Reads the trickle events channel at `events_url`. Telemetry (`{"type": "telemetry", ...}`) is
/// checked against `session_id` / `connection_id` (when given, an envelope claiming another
/// session is rejected and counted), annotated as relayed, and re-published through the sink
/// installed with `set_telemetry_sink` at that moment (ours directly; a Python object's `emit`
/// from a forwarder thread). Every other message (`runner_ready`, `stream_started`,
/// `api_response`, `notification`, `logs`, `pong`, `error`, unknown types...) is handed to Python
/// as a dict, in order: iterate the relay (`for msg in relay`, which releases the GIL while it
/// waits) or, in asyncio, `async for msg in relay`.
///
/// With `control_url`, the relay also owns the control channel: it pings the runner every 10 s
/// and `close()` ends the control channel, which tells the runner to stop. Without it, the
/// application writes the control channel itself.
///
/// `stats()` gives the client's counters; `close()` ends it. Raises `ValueError` for a URL that
/// is not `http://` / `https://`.
#[pyclass(frozen, subclass, module = "trickle_relay")]
pub struct EventsRelay {
    client: Mutex<Option<Client>>,
    last_report: Mutex<ClientReport>,
    inbox: Arc<Inbox>,
    egress: Arc<CurrentSink>,
    has_control: bool,
    events_url: String,
}

#[pymethods]
impl EventsRelay {
    #[new]
    #[pyo3(signature = (events_url, control_url=None, session_id=None, connection_id=None))]
    fn new(
        events_url: &str,
        control_url: Option<&str>,
        session_id: Option<String>,
        connection_id: Option<String>,
    ) -> PyResult<Self> {
        check_url("events_url", events_url)?;
        if let Some(c) = control_url {
            check_url("control_url", c)?;
        }
        let handle = runtime::handle()?;
        let inbox = Arc::new(Inbox::new().map_err(|e| {
            PyRuntimeError::new_err(format!("cannot create the relay's wake socket: {e}"))
        })?);
        let (tx, rx) = mpsc::channel(64);
        let mut config = ClientConfig::new(control_url.unwrap_or(""), events_url);
        config.session = SessionIds {
            session_id: session_id.filter(|s| !s.is_empty()),
            connection_id: connection_id.filter(|s| !s.is_empty()),
        };
        config.messages = Some(tx);
        let egress = Arc::new(CurrentSink::default());
        let client = {
            let _in_runtime = handle.enter();
            Client::connect(config, Some(egress.clone() as Arc<dyn Sink>))
        };
        handle.spawn(pump(rx, inbox.clone()));
        Ok(EventsRelay {
            client: Mutex::new(Some(client)),
            last_report: Mutex::new(ClientReport::default()),
            inbox,
            egress,
            has_control: control_url.is_some(),
            events_url: events_url.to_owned(),
        })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next message as a dict; waits (GIL released, Ctrl-C honoured) until one arrives;
    /// `StopIteration` once the channel ended (or `close()`) and every message was returned.
    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        loop {
            if let Some(line) = self.inbox.pop() {
                return crate::json::loads(py, &line).map(Some);
            }
            if self.inbox.finished() {
                return Ok(None);
            }
            let inbox = self.inbox.clone();
            py.allow_threads(move || {
                let mut q = inbox.queue.lock();
                if q.is_empty() && !inbox.ended.load(Ordering::SeqCst) {
                    inbox.ready.wait_for(&mut q, Duration::from_millis(100));
                }
            });
            py.check_signals()?;
        }
    }

    /// The next message if one is queued now, else `None` (for `__anext__`).
    fn _try_next<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        match self.inbox.pop() {
            Some(line) => crate::json::loads(py, &line).map(Some),
            None => Ok(None),
        }
    }

    /// True once nothing is queued and nothing more can arrive.
    fn _finished(&self) -> bool {
        self.inbox.finished()
    }

    /// The socket to watch for readability (`loop.add_reader`) after `_arm()`.
    fn _wake_fd(&self) -> i32 {
        self.inbox.wake_rx.as_raw_fd()
    }

    /// Ask for a byte on the wake socket with the next message (or the end).
    fn _arm(&self) {
        self.inbox.armed.store(true, Ordering::SeqCst);
    }

    /// Empty the wake socket.
    fn _drain_wake(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.inbox.wake_rx).read(&mut buf), Ok(n) if n > 0) {}
    }

    /// The client's counters (`telemetry_received`, `relayed`, `rejected_foreign`,
    /// `rejected_invalid`, `dropped_reported`: drops the runner reported, `bad_lines`,
    /// `unknown_messages`, `events_reconnects`, ..., `latency_ms`), plus `messages_received` /
    /// `messages_pending` (messages for Python) and `egress` (where relayed envelopes went).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let report = match self.client.lock().as_ref() {
            Some(c) => c.report(),
            None => self.last_report.lock().clone(),
        };
        let bytes =
            serde_json::to_vec(&report).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let d = crate::json::loads(py, &bytes)?.downcast_into::<PyDict>()?;
        d.set_item(
            "messages_received",
            self.inbox.received.load(Ordering::Relaxed),
        )?;
        d.set_item("messages_pending", self.inbox.queue.lock().len())?;
        d.set_item("egress", self.egress.stats_dict(py)?)?;
        d.set_item("events_ended", self.inbox.ended.load(Ordering::SeqCst))?;
        Ok(d)
    }

    /// End the relay: close the control channel (if the relay has one, which tells the runner to
    /// stop), wait at most `timeout` seconds for the events channel to end (default: 5 with a
    /// control channel, 0 without), then stop reading. Messages already received can still be
    /// iterated. Returns the final `stats()`. Idempotent.
    #[pyo3(signature = (timeout=None))]
    fn close<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyDict>> {
        let drain = match timeout {
            Some(t) => seconds(t)?,
            None if self.has_control => DEFAULT_DRAIN,
            None => Duration::ZERO,
        };
        let client = self.client.lock().take();
        if let Some(client) = client {
            let report = runtime::block_on(py, client.close(drain))?;
            *self.last_report.lock() = report;
        }
        self.stats(py)
    }

    /// The events channel URL.
    #[getter]
    fn events_url(&self) -> &str {
        &self.events_url
    }

    fn __repr__(&self) -> String {
        format!("EventsRelay({:?})", self.events_url)
    }
}

impl Drop for EventsRelay {
    fn drop(&mut self) {
        // Never left running unseen: a relay dropped without close() stops reading.
        if let Some(client) = self.client.lock().take() {
            if let Ok(handle) = runtime::handle() {
                handle.spawn(client.close(Duration::ZERO));
            }
        }
    }
}
