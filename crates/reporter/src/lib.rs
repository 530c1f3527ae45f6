//! The HTTP metrics reporter: a telemetry [`Sink`] that delivers every event it accepted to
//! `POST /v1/metrics`, at least once, across crashes.
//!
//! # The path of one event
//!
//! ```text
//! emit(event)                      any thread; never blocks, never fails
//!   -> handoff queue (bounded, lock-free; full: dropped and counted as dropped_handoff)
//!   -> writer thread: envelope -> API event (raw slices spliced, `data` byte for byte)
//!        -> Spool::append  (disk; the event is now ACCEPTED)      or, disk unusable,
//!        -> memory queue   (bounded by max_buffer, retried to disk every `disk_retry`)
//!   -> sender thread: read <= 500 events / <= 1,000,000 bytes from the oldest,
//!        body = prefix + events joined by "," + suffix (no re-serialization),
//!        POST, then apply the response contract; a 200 acks (removes) the batch.
//! ```
//!
//! # Durability: what survives what (the loss window)
//!
//! * **Before it is accepted** an event lives only in memory: in the handoff queue, for the
//!   microseconds to milliseconds it takes the writer thread to append it. A `kill -9` in that
//!   window loses it. [`ReporterStats::accepted`] counts events past this point;
//!   [`ReporterStats::handoff_pending`] is the window's current content.
//! * **Accepted on disk** (`Spool::append` returned): the record was written to the kernel with
//!   one `pwrite`, so it survives a crash or `kill -9` of the process. It survives a power loss
//!   or kernel crash once the spool's group commit fsynced it: with the default
//!   [`spool::SyncPolicy`] at most 10 ms (or 1 MiB) after the append. That group-commit interval
//!   is the power-loss window; choose `SyncPolicy::Always` in [`ReporterConfig::spool`] to close
//!   it at the cost of one fsync per event.
//! * **Accepted in memory** (the disk failed: unwritable directory, disk full, directory locked by
//!   another process): kept within `max_buffer`, lost on a crash, moved to disk as soon as the
//!   disk works again. [`ReporterStats::accepted_memory`] counts them; the failure is logged once.
//! * **Removed** only when a 200 covers the event (or by the contract's drops below, or the
//!   buffer cap). The removal (`Spool::ack`) is durable when it returns; a crash between the 200
//!   and the ack re-sends the batch on the next start: duplicates, never losses. The collector
//!   drops duplicates by event id.
//! * On [`Reporter::shutdown`] what could not be sent within the timeout stays on disk; the next
//!   reporter opened on the same directory re-sends it first.
//!
//! # The response contract (`shared/spec/telemetry.md`)
//!
//! | answer | the reporter |
//! | --- | --- |
//! | 2xx | removes the batch, resets the backoff |
//! | 400 | drops the batch, logs the server's message (`dropped_400`) |
//! | 401 | keeps everything, pauses until [`Reporter::set_api_key`] changes the key |
//! | 413 | splits the batch in halves and sends each in turn; a lone event is dropped (`dropped_oversize`) |
//! | 429 | keeps the batch, waits `Retry-After` seconds, else `default_retry_after` (60 s) |
//! | 5xx, network error | keeps the batch, waits 1 s doubling to 60 s (+-20% jitter) |
//! | anything else (3xx, 404...) | as 5xx: keeps and backs off (a misconfigured URL must not lose data) |
//!
//! Batches are resolved strictly in order, so the sender only ever removes a prefix of the
//! buffer. Every outcome is counted in [`ReporterStats`] and logged (target `reporter`).
//!
//! # Gzip rule
//!
//! `SCOPE_METRICS_GZIP` / [`ReporterConfig::gzip`]: `always`, `never`, or `auto` (the default):
//! compress a body of 1 KiB or more with `Content-Encoding: gzip` once the server's latest
//! response carried `Accept-Encoding: gzip` (the collector sends it on every response). The first
//! request therefore always goes uncompressed. A `415` to a gzip body turns compression off for
//! good and the batch is re-sent uncompressed. Limits (500 events, 1,000,000 bytes) always apply
//! to the uncompressed body.
//!
//! # Loss reports
//!
//! Events dropped locally (handoff full, buffer cap, the disk buffer's byte cap or corruption,
//! unsendable or oversized envelopes) are reported downstream as a `telemetry_dropped` event,
//! stored in the same buffer, at most one per `report_interval`, with the counts per reason.

mod buffer;
mod config;
mod sender;
mod shape;
mod stats;
mod writer;

pub use config::{
    default_buffer_path, hostname, ConfigError, GzipMode, ReporterConfig, DEFAULT_URL,
    MAX_BATCH_EVENTS, MAX_BODY_BYTES,
};
pub use shape::{api_event, BodyBuilder, ShapeError};
pub use stats::ReporterStats;

use buffer::Buffer;
use parking_lot::{Condvar, Mutex};
use spool::fallback::{Handoff, Pushed};
use stats::Counters;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};
use telemetry::{Event, Sink, SinkStats};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Why the reporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReporterError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A thread or the HTTP client could not be created.
    #[error("cannot start the metrics reporter: {0}")]
    Start(String),
}

/// What [`Reporter::flush_timeout`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Everything emitted before the call (and since) was delivered or dropped.
    Drained,
    /// Sending is paused by a 401; `left` events wait for a new key.
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

/// State shared by the sink, the writer thread and the sender.
pub(crate) struct Shared {
    config: ReporterConfig,
    handoff: Handoff<Event>,
    counters: Counters,
    buffer: Buffer,
    body: BodyBuilder,
    /// The API key and its generation (bumped by every change).
    api_key: Mutex<(String, u64)>,
    /// Wakes the sender: new data, flush, key change.
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
    fn api_key(&self) -> (String, u64) {
        self.api_key.lock().clone()
    }

    fn key_generation(&self) -> u64 {
        self.api_key.lock().1
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

    fn handoff_pending(&self) -> u64 {
        self.handoff.pending()
    }
}

/// The HTTP metrics reporter sink. See the crate docs.
pub struct Reporter {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("url", &self.shared.config.url)
            .field("buffer_path", &self.shared.config.buffer_path)
            .finish()
    }
}

impl Reporter {
    /// Starts the writer and sender threads. Opens (and recovers) the disk buffer first; a disk
    /// that cannot be used is logged and replaced by memory, never a reason to fail.
    pub fn start(config: ReporterConfig) -> Result<Reporter, ReporterError> {
        config.validate()?;
        let body = BodyBuilder::new(&config.app, &config.host);
        let shared = Arc::new(Shared {
            handoff: Handoff::new(config.handoff_capacity),
            counters: Counters::default(),
            buffer: Buffer::default(),
            body,
            api_key: Mutex::new((config.api_key.clone(), 0)),
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
        let sender = sender::Sender::new(Arc::clone(&shared))
            .map_err(|e| ReporterError::Start(format!("HTTP client: {e}")))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ReporterError::Start(format!("runtime: {e}")))?;
        let mut w = writer::Writer::new(Arc::clone(&shared));
        w.open_disk();
        let writer = std::thread::Builder::new()
            .name("reporter-writer".into())
            .spawn(move || w.run())
            .map_err(|e| ReporterError::Start(format!("writer thread: {e}")))?;
        let _ = shared.writer.set(writer.thread().clone());
        let sender = std::thread::Builder::new()
            .name("reporter-sender".into())
            .spawn(move || runtime.block_on(sender.run()));
        let sender = match sender {
            Ok(h) => h,
            Err(e) => {
                shared.writer_stop.store(true, Relaxed);
                shared.wake_writer();
                let _ = writer.join();
                return Err(ReporterError::Start(format!("sender thread: {e}")));
            }
        };
        let s = &shared.config;
        tracing::info!(target: "reporter", url = %s.url, buffer = ?s.buffer_path, max_buffer = s.max_buffer,
            flush_interval = ?s.flush_interval, "metrics reporter started");
        Ok(Reporter {
            shared,
            threads: Mutex::new(vec![writer, sender]),
        })
    }

    /// Replaces the API key (e.g. reloaded on SIGHUP); resumes sending if a 401 paused it.
    /// Setting the same key again also counts as a change (an operator fixed it server-side).
    pub fn set_api_key(&self, key: impl Into<String>) {
        {
            let mut k = self.shared.api_key.lock();
            k.0 = key.into();
            k.1 += 1;
        }
        self.shared.wake.notify_one();
    }

    /// All counters now.
    pub fn reporter_stats(&self) -> ReporterStats {
        let s = &self.shared;
        let c = &s.counters;
        let disk = s.buffer.disk_len();
        let mem = s.buffer.mem_len();
        ReporterStats {
            emitted: s.handoff.emitted.load(Relaxed),
            accepted: c.accepted.load(Relaxed),
            accepted_memory: c.accepted_memory.load(Relaxed),
            recovered: c.disk.recovered.load(Relaxed),
            handoff_pending: s.handoff_pending(),
            buffered: disk + mem,
            buffered_disk: disk,
            buffered_memory: mem,
            requests: c.requests.load(Relaxed),
            sent: c.sent.load(Relaxed),
            acked: c.acked.load(Relaxed),
            retries: c.retries.load(Relaxed),
            splits_413: c.splits_413.load(Relaxed),
            dropped_handoff: s.handoff.dropped.load(Relaxed),
            dropped_buffer_full: c.dropped_buffer_full.load(Relaxed),
            dropped_spool: c.disk.dropped_spool.load(Relaxed),
            dropped_invalid: c.dropped_invalid.load(Relaxed),
            dropped_oversize: c.dropped_oversize.load(Relaxed),
            dropped_400: c.dropped_400.load(Relaxed),
            status_401: c.status_401.load(Relaxed),
            status_429: c.status_429.load(Relaxed),
            status_5xx: c.status_5xx.load(Relaxed),
            status_other: c.status_other.load(Relaxed),
            network_errors: c.network_errors.load(Relaxed),
            disk_errors: c.disk.disk_errors.load(Relaxed),
            reports: c.reports.load(Relaxed),
            paused: c.paused.load(Relaxed),
            disk_ok: c.disk.disk_ok.load(Relaxed),
            gzip: c.gzip.load(Relaxed),
        }
    }

    /// The disk buffer's directory, if configured.
    pub fn buffer_path(&self) -> Option<&Path> {
        self.shared.config.buffer_path.as_deref()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ReporterConfig {
        &self.shared.config
    }

    /// Tries to deliver everything buffered within `timeout`: sends at once (ignoring the flush
    /// interval, and cutting a backoff wait short once), and returns when nothing is left, when a
    /// 401 paused sending, or at the timeout. Blocks the calling thread: not for hot paths.
    pub fn flush_timeout(&self, timeout: Duration) -> FlushOutcome {
        let s = &self.shared;
        let deadline = Instant::now() + timeout;
        s.flushers.fetch_add(1, Relaxed);
        s.flush_epoch.fetch_add(1, Relaxed);
        s.wake_writer();
        s.wake.notify_one();
        let outcome = loop {
            let left = s.handoff_pending() + s.buffer.len();
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
    pub fn shutdown(&self, timeout: Duration) -> ReporterStats {
        let mut threads = std::mem::take(&mut *self.threads.lock());
        if threads.is_empty() {
            return self.reporter_stats();
        }
        let outcome = self.flush_timeout(timeout);
        self.stop_threads(&mut threads);
        let stats = self.reporter_stats();
        // Closing the spool fsyncs what is left.
        if let Some(spool) = self.shared.buffer.set_spool(None) {
            drop(spool);
        }
        match outcome {
            FlushOutcome::Drained => {
                tracing::info!(target: "reporter", acked = stats.acked, dropped = stats.dropped(), "metrics reporter stopped; everything delivered")
            }
            _ => {
                tracing::warn!(target: "reporter", left_on_disk = stats.buffered_disk, lost_from_memory = stats.buffered_memory,
                acked = stats.acked, dropped = stats.dropped(),
                "metrics reporter stopped with events left; those on disk are sent by the next start")
            }
        }
        stats
    }

    fn stop_threads(&self, threads: &mut Vec<JoinHandle<()>>) {
        let s = &self.shared;
        s.handoff.close();
        s.writer_stop.store(true, Relaxed);
        s.stop.cancel();
        s.wake_writer();
        s.wake.notify_one();
        for t in threads.drain(..) {
            if t.join().is_err() {
                tracing::error!(target: "reporter", "metrics reporter: a worker thread panicked");
            }
        }
    }
}

impl Drop for Reporter {
    /// Stops the threads without waiting to send (the disk keeps what is left).
    fn drop(&mut self) {
        let mut threads = std::mem::take(&mut *self.threads.lock());
        if !threads.is_empty() {
            self.stop_threads(&mut threads);
        }
    }
}

impl Sink for Reporter {
    fn emit(&self, event: Event) {
        let s = &self.shared;
        if s.handoff.push(event) == (Pushed::Dropped { first: true }) {
            tracing::warn!(target: "reporter",
                "metrics reporter: handoff queue full, dropping events (counted as dropped_handoff, reported as telemetry_dropped)");
        }
        s.wake_writer();
    }

    fn stats(&self) -> SinkStats {
        let r = self.reporter_stats();
        SinkStats {
            emitted: r.emitted,
            delivered: r.acked,
            // The reporter does not class its drops by priority: all are counted here.
            dropped_high: r.dropped(),
            dropped_low: 0,
            queued: r.handoff_pending + r.buffered,
            reports: r.reports,
            write_errors: r.status_401
                + r.status_429
                + r.status_5xx
                + r.status_other
                + r.network_errors,
        }
    }

    fn name(&self) -> &'static str {
        "http_reporter"
    }

    /// [`Reporter::flush_timeout`] with the configured `flush_timeout`.
    fn flush(&self) {
        let _ = self.flush_timeout(self.shared.config.flush_timeout);
    }
}
