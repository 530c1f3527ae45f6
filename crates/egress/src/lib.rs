//! The buffered-egress driver: everything a telemetry destination needs between `emit` and "the
//! destination has it", written once, with the destination itself a small [`Service`].
//!
//! The HTTP metrics reporter (`reporter`) and the Kafka sink (`kafka`) are two services of this
//! driver; a third destination (an OTLP exporter, a file shipper) is a third service, not a third
//! copy of the machinery. The split follows Vector's sinks: one driver, and per destination a
//! config, an encoder and a service.
//!
//! # The path of one event
//!
//! ```text
//! Driver::emit(event)              any thread; never blocks, never fails
//!   -> handoff queue (bounded, lock-free; full: dropped, counted as dropped_handoff)
//!   -> writer thread: Encoder::encode(event) -> the record to store   (or dropped with a reason)
//!        -> Spool::append  (disk; the event is now ACCEPTED)      or, disk unusable,
//!        -> memory queue   (bounded by the cap, moved to disk when the disk works again)
//!   -> sender thread: the oldest <= max_batch records / <= max_batch_bytes, of one source,
//!        -> Service::send(batch) -> Outcome:
//!             Delivered          remove the batch from the buffer, reset the backoff
//!             Dropped(reason)    remove it, count every record under `reason`
//!             Retry(None)        keep it, wait the backoff (base doubling to max, +-20% jitter)
//!             Retry(Some(wait))  keep it, wait `wait` (a Retry-After)
//!             Split              send it in halves, one after the other
//!             Pause              keep everything, send nothing until Driver::resume
//! ```
//!
//! A service may also resolve records one by one ([`Batch::deliver`], [`Batch::drop_record`]):
//! the Kafka service does, since the broker acknowledges each record. The driver then keeps the
//! batch and sends only what is still pending; it removes the batch from the buffer once every
//! record in it is resolved. Batches are resolved strictly in order, so the buffer only ever loses
//! a prefix.
//!
//! # What is promised
//!
//! * **Nothing accepted is lost** while the destination is down, however long: records wait in
//!   the disk buffer (capped, see [`Cap`]; the oldest are dropped past it, counted and reported)
//!   and are sent when it returns. Accepted on disk means written to the kernel by one `pwrite`:
//!   it survives `kill -9`, and a power loss once the spool's group commit fsynced it (10 ms).
//! * **Nothing is sent twice** within one run, except where the service says so: a record is
//!   sent again only after the service answered `Retry` for it (it may have arrived anyway: a
//!   timeout, a broker that stored it before the cut).
//! * **Across a crash it is at-least-once**: a batch is removed only after it is resolved, so a
//!   crash between the destination taking it and the removal sends it again on the next start
//!   (so does a crash in the middle of a batch a service resolved record by record).
//! * **Every drop is counted** ([`DriverStats`]) and every local one is reported downstream: the
//!   writer stores a `telemetry_dropped` event (at most one per `report_interval`, and one when
//!   closing) with the counts per reason since the last one. Drops the destination decided
//!   ([`Reason::reported`] false, e.g. an HTTP 400) are counted but not reported: the destination
//!   knows them.
//! * `emit` never blocks: a full handoff queue drops (counted, reported).
//!
//! # Flush and shutdown
//!
//! [`Driver::flush_timeout`] sends at once (ignoring the flush interval, cutting one backoff wait
//! short) and returns when nothing is left, when sending is paused, or at the timeout.
//! [`Driver::shutdown`] flushes, then stops the writer (which stores what is still in the handoff
//! queue first) and the sender; what is left stays on disk for the next start, which sends it
//! first.

mod batch;
mod buffer;
mod config;
mod handoff;
mod sender;
mod stats;
mod writer;

pub use batch::Batch;
pub use config::{state_dir, Cap, DriverConfig, Reason};
pub use stats::{DriverStats, MAX_REASONS};
#[doc(hidden)]
pub use telemetry;
/// The telemetry sink contract the driver implements (for [`deref_driver!`]).
pub use telemetry::Sink;

use buffer::Buffer;
use handoff::{Handoff, Pushed};
use parking_lot::{Condvar, Mutex};
use stats::Counters;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};
use telemetry::{Event, SinkStats};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Gives a service's types the driver's side of them, through a field named `driver`:
/// `deref_driver!(handle MySink)` makes `MySink` (with `driver: Arc<Driver>`) a telemetry `Sink`
/// that is its driver, dereferencing to the [`Driver`] (`flush_timeout`, `resume`...), and adds
/// `MySink::sink()`, the driver as an `Arc<dyn Sink>`; `deref_driver!(stats MyStats)` makes
/// `MyStats` (with `driver: DriverStats`) dereference to its [`DriverStats`].
#[macro_export]
macro_rules! deref_driver {
    (handle $t:ty) => {
        impl ::std::ops::Deref for $t {
            type Target = $crate::Driver;

            fn deref(&self) -> &$crate::Driver {
                &self.driver
            }
        }

        impl $t {
            /// The driver as a telemetry sink of its own, to hand out as an `Arc<dyn Sink>`.
            pub fn sink(&self) -> ::std::sync::Arc<dyn $crate::Sink> {
                self.driver.clone()
            }
        }

        impl $crate::Sink for $t {
            fn emit(&self, event: $crate::telemetry::Event) {
                $crate::Sink::emit(&*self.driver, event)
            }

            fn stats(&self) -> $crate::telemetry::SinkStats {
                $crate::Sink::stats(&*self.driver)
            }

            fn name(&self) -> &'static str {
                $crate::Sink::name(&*self.driver)
            }

            fn flush(&self) {
                $crate::Sink::flush(&*self.driver)
            }
        }
    };
    (stats $t:ty) => {
        impl ::std::ops::Deref for $t {
            type Target = $crate::DriverStats;

            fn deref(&self) -> &$crate::DriverStats {
                &self.driver
            }
        }
    };
}

/// What one [`Service::send`] came to, for the records of the batch still pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The destination took them.
    Delivered,
    /// The destination refused them for good: dropped, counted under the reason.
    Dropped(&'static Reason),
    /// Keep them and send again: after `Some(wait)` (e.g. a `Retry-After`; zero: at once), or
    /// after the driver's backoff (`None`, for failures: base doubling to max, with jitter).
    Retry(Option<Duration>),
    /// The batch is too large for one request: send it in halves, one after the other. A service
    /// answers `Dropped` for a lone record instead (the driver retries a lone record it is asked
    /// to split).
    Split,
    /// Keep everything and send nothing until [`Driver::resume`] (e.g. the API key was refused).
    Pause,
}

/// Turns an event into the record the driver stores and later hands to the [`Service`]. Runs on
/// the writer thread.
pub trait Encoder: Send + 'static {
    /// Appends the record for `event` to `out` (empty on entry). An error drops the event, counted
    /// under that reason (the encoder logs why).
    fn encode(&mut self, event: &Event, out: &mut Vec<u8>) -> Result<(), &'static Reason>;
}

/// One destination: sends a batch of records and classifies the answer. Runs on the sender
/// thread, inside a single-threaded tokio runtime of its own (blocking in `send` is allowed: it
/// stalls nobody else, but should check [`Cx::stopping`] in long waits).
pub trait Service: Send + 'static {
    /// Sends the pending records of `batch` ([`Batch::pending`]) and says what became of them.
    /// Records resolved one by one with [`Batch::deliver`] / [`Batch::drop_record`] are not
    /// covered by the returned outcome.
    fn send(&mut self, batch: &mut Batch, cx: &Cx<'_>) -> impl Future<Output = Outcome>;
}

/// What a [`Service`] may ask of the driver while it sends.
pub struct Cx<'a> {
    shared: &'a Shared,
    retry: bool,
}

impl Cx<'_> {
    /// The driver is stopping: give up waiting (answer `Retry`; the batch stays buffered).
    pub fn stopping(&self) -> bool {
        self.shared.stop.is_cancelled()
    }

    /// This batch (or its head) failed before and is being sent again.
    pub fn is_retry(&self) -> bool {
        self.retry
    }

    /// Counts failed writes to the destination (each may cover several records): the
    /// `write_errors` of [`SinkStats`].
    pub fn write_errors(&self, n: u64) {
        self.shared.counters.write_errors.fetch_add(n, Relaxed);
    }

    /// Records buffered now (for log lines).
    pub fn buffered(&self) -> u64 {
        self.shared.buffer.len()
    }
}

/// What [`Driver::flush_timeout`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Everything emitted before the call (and since) was delivered or dropped.
    Drained,
    /// Sending is paused (see [`Outcome::Pause`]); `left` events wait for [`Driver::resume`].
    Paused {
        /// Events still buffered.
        left: u64,
    },
    /// The timeout passed with `left` events still buffered (kept; on disk when it works).
    TimedOut {
        /// Events still buffered.
        left: u64,
    },
}

/// Why the driver could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error("invalid egress setting: {0}")]
    Config(String),
    /// A thread or the sender's runtime could not be created.
    #[error("cannot start the {sink}: {what}")]
    Start {
        /// The sink's display name.
        sink: &'static str,
        /// What failed.
        what: String,
    },
}

/// State shared by `emit`, the writer thread, the sender and flush callers.
pub(crate) struct Shared {
    config: DriverConfig,
    /// Every reason a record can be dropped for, beyond the driver's own (handoff, buffer cap,
    /// spool cap): the service's and [`Reason::OVERSIZE`]. Indexes `counters.drops`.
    reasons: Vec<&'static Reason>,
    handoff: Handoff<Event>,
    buffer: Buffer,
    counters: Counters,
    /// Bumped by [`Driver::resume`]: a pause lasts while it is unchanged.
    generation: AtomicU64,
    /// Wakes the sender: new data, flush, resume, stop.
    wake: Notify,
    /// Stops the sender.
    stop: CancellationToken,
    /// Stops the writer once the handoff queue is empty.
    writer_stop: AtomicBool,
    writer: OnceLock<Thread>,
    /// Callers waiting in `flush` now.
    flushers: AtomicUsize,
    /// Bumped by every `flush`, to cut one backoff wait short.
    flush_epoch: AtomicU64,
    progress_lock: Mutex<()>,
    progress_cv: Condvar,
}

impl Shared {
    /// Counts `n` records dropped for `reason`.
    fn count_drop(&self, reason: &Reason, n: u64) {
        match self.reasons.iter().position(|r| r.name == reason.name) {
            Some(i) => {
                self.counters.drops[i].fetch_add(n, Relaxed);
            }
            None => {
                // A reason the service did not declare: still counted, under the closest one.
                tracing::error!(target: "egress", sink = self.config.display, reason = reason.name,
                    "undeclared drop reason; counted as oversize");
                self.count_drop(&Reason::OVERSIZE, n);
            }
        }
    }

    /// Wakes `flush` waiters to re-check.
    fn progress(&self) {
        let _g = self.progress_lock.lock();
        self.progress_cv.notify_all();
    }

    fn wake_writer(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }
}

/// The driver: a telemetry [`Sink`] over a service. See the crate docs.
pub struct Driver {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.shared.config;
        f.debug_struct("Driver")
            .field("sink", &c.sink)
            .field("buffer_path", &c.buffer_path)
            .finish()
    }
}

impl Driver {
    /// Opens (and recovers) the disk buffer, then starts the writer thread (with `encoder`) and
    /// the sender thread (with `service`). A disk buffer that cannot be used is logged and
    /// replaced by memory, never a reason to fail.
    pub fn start<E: Encoder, S: Service>(
        config: DriverConfig,
        encoder: E,
        service: S,
    ) -> Result<Driver, StartError> {
        config.validate().map_err(StartError::Config)?;
        let mut reasons: Vec<&'static Reason> = config.drops.iter().collect();
        if !reasons.iter().any(|r| r.name == Reason::OVERSIZE.name) {
            reasons.push(&Reason::OVERSIZE);
        }
        if reasons.len() > MAX_REASONS {
            return Err(StartError::Config(format!(
                "{}: more than {MAX_REASONS} drop reasons",
                config.display
            )));
        }
        let display = config.display;
        let shared = Arc::new(Shared {
            handoff: Handoff::new(config.handoff_capacity),
            buffer: Buffer::default(),
            counters: Counters::new(reasons.len()),
            reasons,
            generation: AtomicU64::new(0),
            wake: Notify::new(),
            stop: CancellationToken::new(),
            writer_stop: AtomicBool::new(false),
            writer: OnceLock::new(),
            flushers: AtomicUsize::new(0),
            flush_epoch: AtomicU64::new(0),
            progress_lock: Mutex::new(()),
            progress_cv: Condvar::new(),
            config,
        });
        let failed = |what: String| StartError::Start {
            sink: display,
            what,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed(format!("runtime: {e}")))?;
        let mut w = writer::Writer::new(Arc::clone(&shared), encoder);
        w.open_disk();
        let writer = std::thread::Builder::new()
            .name(format!("{}-writer", shared.config.sink))
            .spawn(move || w.run())
            .map_err(|e| failed(format!("writer thread: {e}")))?;
        let _ = shared.writer.set(writer.thread().clone());
        let s = sender::Sender::new(Arc::clone(&shared), service);
        let sender = std::thread::Builder::new()
            .name(format!("{}-sender", shared.config.sink))
            .spawn(move || runtime.block_on(s.run()));
        let sender = match sender {
            Ok(h) => h,
            Err(e) => {
                shared.writer_stop.store(true, Relaxed);
                shared.wake_writer();
                let _ = writer.join();
                return Err(failed(format!("sender thread: {e}")));
            }
        };
        Ok(Driver {
            shared,
            threads: Mutex::new(vec![writer, sender]),
        })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &DriverConfig {
        &self.shared.config
    }

    /// All counters now.
    pub fn driver_stats(&self) -> DriverStats {
        stats::snapshot(&self.shared)
    }

    /// Ends a pause ([`Outcome::Pause`]): the service was reconfigured (e.g. a new API key), so
    /// sending resumes. Calling it while not paused is harmless.
    pub fn resume(&self) {
        self.shared.generation.fetch_add(1, Relaxed);
        self.shared.wake.notify_one();
    }

    /// Tries to deliver everything buffered within `timeout`: sends at once (ignoring the flush
    /// interval, and cutting a backoff wait short once), and returns when nothing is left, when
    /// sending is paused, or at the timeout. Blocks the calling thread: not for hot paths.
    pub fn flush_timeout(&self, timeout: Duration) -> FlushOutcome {
        let s = &self.shared;
        let deadline = Instant::now() + timeout;
        s.flushers.fetch_add(1, Relaxed);
        s.flush_epoch.fetch_add(1, Relaxed);
        s.wake_writer();
        s.wake.notify_one();
        let outcome = loop {
            let left = s.handoff.pending() + s.buffer.len();
            if left == 0 {
                break FlushOutcome::Drained;
            }
            if s.counters.paused.load(Relaxed) {
                break FlushOutcome::Paused { left };
            }
            let now = Instant::now();
            if now >= deadline {
                break FlushOutcome::TimedOut { left };
            }
            let mut g = s.progress_lock.lock();
            s.progress_cv
                .wait_until(&mut g, (now + Duration::from_millis(50)).min(deadline));
        };
        s.flushers.fetch_sub(1, Relaxed);
        outcome
    }

    /// Flushes for up to `timeout`, then stops both threads; what is left stays on disk for the
    /// next start (in memory: lost, and logged). Later `emit`s are dropped and counted.
    /// Idempotent; returns the final counters.
    pub fn shutdown(&self, timeout: Duration) -> DriverStats {
        let mut threads = std::mem::take(&mut *self.threads.lock());
        if threads.is_empty() {
            return self.driver_stats();
        }
        let outcome = self.flush_timeout(timeout);
        self.stop_threads(&mut threads);
        let stats = self.driver_stats();
        // Closing the spool fsyncs what is left.
        drop(self.shared.buffer.set_spool(None));
        let name = self.shared.config.display;
        match outcome {
            FlushOutcome::Drained => tracing::info!(target: "egress", delivered = stats.delivered,
                dropped = stats.dropped(), "{name} stopped; everything delivered"),
            _ => tracing::warn!(target: "egress", left_on_disk = stats.buffered_disk,
                lost_from_memory = stats.buffered_memory, delivered = stats.delivered,
                dropped = stats.dropped(),
                "{name} stopped with events left; those on disk are sent by the next start"),
        }
        stats
    }

    /// Stops the writer (once it stored what the handoff queue holds, so nothing emitted before
    /// is lost), then the sender, and joins both.
    fn stop_threads(&self, threads: &mut Vec<JoinHandle<()>>) {
        let s = &self.shared;
        s.handoff.close();
        s.writer_stop.store(true, Relaxed);
        s.wake_writer();
        if let Some(w) = threads.first() {
            while !w.is_finished() {
                s.wake_writer();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        s.stop.cancel();
        s.wake.notify_one();
        for t in threads.drain(..) {
            if t.join().is_err() {
                tracing::error!(target: "egress", sink = s.config.display, "a worker thread panicked");
            }
        }
    }
}

impl Drop for Driver {
    /// Stops the threads without waiting to send (the disk keeps what is left).
    fn drop(&mut self) {
        let mut threads = std::mem::take(&mut *self.threads.lock());
        if !threads.is_empty() {
            self.stop_threads(&mut threads);
        }
    }
}

impl Sink for Driver {
    fn emit(&self, event: Event) {
        let s = &self.shared;
        if s.handoff.push(event) == (Pushed::Dropped { first: true }) {
            tracing::warn!(target: "egress", sink = s.config.display,
                "{}: handoff queue full, dropping events (counted as dropped_handoff, reported as telemetry_dropped)",
                s.config.display);
        }
        s.wake_writer();
    }

    fn stats(&self) -> SinkStats {
        let d = self.driver_stats();
        SinkStats {
            emitted: d.emitted,
            delivered: d.delivered,
            // Drops are not classed by priority here: all are counted as high.
            dropped_high: d.dropped(),
            dropped_low: 0,
            queued: d.handoff_pending + d.buffered,
            reports: d.reports,
            write_errors: d.write_errors,
        }
    }

    fn name(&self) -> &'static str {
        self.shared.config.sink
    }

    /// [`Driver::flush_timeout`] with the configured `flush_timeout`.
    fn flush(&self) {
        let timeout = self.shared.config.flush_timeout;
        if let FlushOutcome::TimedOut { left } = self.flush_timeout(timeout) {
            tracing::warn!(target: "egress", sink = self.shared.config.display, left, ?timeout,
                "flush timed out; the rest stays buffered");
        }
    }
}
