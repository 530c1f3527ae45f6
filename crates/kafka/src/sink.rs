//! [`KafkaSink`]: the telemetry sink that produces every envelope to Kafka, over a crash-safe
//! disk buffer. See the crate docs for the path of an event and the delivery guarantees.

use crate::buffer::{self, Batch, Buffer};
use crate::config::{ConfigError, KafkaConfig};
use crate::producer::{self, BrokerHealth, Report, SinkContext};
use parking_lot::{Condvar, Mutex};
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use serde::Serialize;
use spool::fallback::{Disk, DiskCounters, Handoff, Pushed};
use spool::{Spool, SpoolError};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};
use telemetry::{now_ms, Envelope, Event, Fields, Sink, SinkStats};

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// librdkafka refused the producer configuration (e.g. SASL_SSL without SSL support).
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[source] KafkaError),
    /// A worker thread could not be started.
    #[error("cannot start the Kafka sink: {0}")]
    Start(String),
}

/// What [`KafkaSink::flush_timeout`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Everything emitted before the call (and since) was delivered or dropped.
    Drained,
    /// The timeout passed with `left` events still buffered (kept, on disk when it works).
    TimedOut {
        /// Events still buffered.
        left: u64,
    },
}

/// Counters of a [`KafkaSink`]. Invariant: `emitted + recovered + reports == delivered +
/// dropped() + buffered + handoff_pending` (exact once idle; a loss report is an event the sink
/// stores itself).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KafkaStats {
    /// Events handed to `emit`.
    pub emitted: u64,
    /// Events stored in the buffer (disk or memory): from here on, only a delivery report or a
    /// counted drop removes them.
    pub accepted: u64,
    /// Of `accepted`, those kept in memory because the disk buffer was off or failing.
    pub accepted_memory: u64,
    /// Events a previous run left in the disk buffer, found at start (and sent first).
    pub recovered: u64,
    /// Events between `emit` and the buffer now.
    pub handoff_pending: u64,
    /// Events buffered now (disk + memory), including those being produced.
    pub buffered: u64,
    /// Of `buffered`, on disk.
    pub buffered_disk: u64,
    /// Of `buffered`, in memory.
    pub buffered_memory: u64,
    /// Records handed to librdkafka (a retried record counts again).
    pub produced: u64,
    /// Records the broker acknowledged (delivery reports without error).
    pub delivered: u64,
    /// Delivery reports with an error (the record is retried, unless it is `dropped_rejected`).
    pub delivery_failures: u64,
    /// Of `delivery_failures`, those that timed out (`message.timeout.ms`, during an outage
    /// longer than it): the broker may have written the record before the cut, and it is
    /// produced again, so it may be in the topic twice (consumers dedup by key = envelope id).
    pub timed_out: u64,
    /// Rounds of re-producing failed records after a backoff.
    pub retries: u64,
    /// Producers replaced (before each retry round, and after a fatal error).
    pub producer_restarts: u64,
    /// Error events from librdkafka (broker unreachable and the like).
    pub broker_errors: u64,
    /// Dropped: the handoff queue was full, or `emit` came after shutdown.
    pub dropped_handoff: u64,
    /// Dropped: the memory buffer was full (oldest first).
    pub dropped_buffer_full: u64,
    /// Dropped by the disk buffer: its size cap (oldest segments) or corruption found on disk.
    pub dropped_spool: u64,
    /// Dropped: too large for the disk buffer, or an id longer than 65,535 bytes.
    pub dropped_oversize: u64,
    /// Dropped: refused for good by librdkafka or the broker (message too large, invalid).
    pub dropped_rejected: u64,
    /// Failed disk operations (the memory buffer takes over meanwhile).
    pub disk_errors: u64,
    /// `telemetry_dropped` loss reports the sink stored itself.
    pub reports: u64,
    /// Whether the disk buffer is in use now.
    pub disk_ok: bool,
}

impl KafkaStats {
    /// Every drop.
    pub fn dropped(&self) -> u64 {
        self.dropped_handoff
            + self.dropped_buffer_full
            + self.dropped_spool
            + self.dropped_oversize
            + self.dropped_rejected
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    accepted_memory: AtomicU64,
    produced: AtomicU64,
    delivered: AtomicU64,
    delivery_failures: AtomicU64,
    timed_out: AtomicU64,
    retries: AtomicU64,
    producer_restarts: AtomicU64,
    dropped_buffer_full: AtomicU64,
    dropped_oversize: AtomicU64,
    dropped_rejected: AtomicU64,
    reports: AtomicU64,
    /// The disk buffer's: recovered, dropped_spool, disk_errors, disk_ok.
    disk: DiskCounters,
}

/// State shared by the sink, the writer thread and the sender thread.
struct Shared {
    config: KafkaConfig,
    handoff: Handoff<Event>,
    counters: Counters,
    health: Arc<BrokerHealth>,
    buffer: Buffer,
    /// Stops the writer once the handoff queue is empty.
    writer_stop: AtomicBool,
    /// Stops the sender at once (what is not acknowledged stays buffered).
    sender_stop: AtomicBool,
    writer: OnceLock<Thread>,
    /// Wakes the sender: new data, flush, stop.
    wake_flag: Mutex<bool>,
    wake_cv: Condvar,
    /// Callers waiting in `flush` now.
    flushers: AtomicUsize,
    /// Bumped by every `flush`, to cut one backoff wait short.
    flush_epoch: AtomicU64,
    progress_lock: Mutex<()>,
    progress_cv: Condvar,
}

impl Shared {
    fn wake_sender(&self) {
        *self.wake_flag.lock() = true;
        self.wake_cv.notify_one();
    }

    /// Waits up to `timeout` for [`Shared::wake_sender`]; true when woken.
    fn wait_wake(&self, timeout: Duration) -> bool {
        let mut woken = self.wake_flag.lock();
        if !*woken {
            self.wake_cv.wait_for(&mut woken, timeout);
        }
        std::mem::take(&mut *woken)
    }

    fn wake_writer(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }

    /// Wakes `flush` waiters to re-check.
    fn progress(&self) {
        let _g = self.progress_lock.lock();
        self.progress_cv.notify_all();
    }

    fn handoff_pending(&self) -> u64 {
        self.handoff.pending()
    }
}

/// The Kafka telemetry sink: key = envelope id, value = the envelope's exact JSON bytes, on an
/// idempotent producer, over a disk buffer. See the crate docs.
pub struct KafkaSink {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("kafka", &self.shared.config.describe())
            .field("buffer_path", &self.shared.config.buffer_path)
            .finish()
    }
}

impl KafkaSink {
    /// Opens (and recovers) the disk buffer, creates the producer and starts the writer and
    /// sender threads. A broker that is down is not an error (events wait in the buffer); a
    /// configuration librdkafka refuses is. A disk buffer that cannot be opened is logged and
    /// replaced by memory, never a reason to fail.
    pub fn start(config: KafkaConfig) -> Result<KafkaSink, KafkaSinkError> {
        config.validate()?;
        let health = Arc::new(BrokerHealth::default());
        let shared = Arc::new(Shared {
            handoff: Handoff::new(config.handoff_capacity),
            counters: Counters::default(),
            health,
            buffer: Buffer::default(),
            writer_stop: AtomicBool::new(false),
            sender_stop: AtomicBool::new(false),
            writer: OnceLock::new(),
            wake_flag: Mutex::new(false),
            wake_cv: Condvar::new(),
            flushers: AtomicUsize::new(0),
            flush_epoch: AtomicU64::new(0),
            progress_lock: Mutex::new(()),
            progress_cv: Condvar::new(),
            config,
        });
        let sender = SenderLoop::new(Arc::clone(&shared))?;
        let mut w = Writer::new(Arc::clone(&shared));
        w.open_disk();
        let writer = std::thread::Builder::new()
            .name("kafka-writer".into())
            .spawn(move || w.run())
            .map_err(|e| KafkaSinkError::Start(format!("writer thread: {e}")))?;
        let _ = shared.writer.set(writer.thread().clone());
        let sender = std::thread::Builder::new()
            .name("kafka-sender".into())
            .spawn(move || sender.run());
        let sender = match sender {
            Ok(h) => h,
            Err(e) => {
                shared.writer_stop.store(true, Relaxed);
                shared.wake_writer();
                let _ = writer.join();
                return Err(KafkaSinkError::Start(format!("sender thread: {e}")));
            }
        };
        let c = &shared.config;
        tracing::info!(target: "kafka", kafka = %c.describe(), buffer = ?c.buffer_path, "Kafka sink started");
        Ok(KafkaSink {
            shared,
            threads: Mutex::new(vec![writer, sender]),
        })
    }

    /// All counters now.
    pub fn kafka_stats(&self) -> KafkaStats {
        let s = &self.shared;
        let c = &s.counters;
        let disk = s.buffer.disk_len();
        let mem = s.buffer.mem_len();
        KafkaStats {
            emitted: s.handoff.emitted.load(Relaxed),
            accepted: c.accepted.load(Relaxed),
            accepted_memory: c.accepted_memory.load(Relaxed),
            recovered: c.disk.recovered.load(Relaxed),
            handoff_pending: s.handoff_pending(),
            buffered: disk + mem,
            buffered_disk: disk,
            buffered_memory: mem,
            produced: c.produced.load(Relaxed),
            delivered: c.delivered.load(Relaxed),
            delivery_failures: c.delivery_failures.load(Relaxed),
            timed_out: c.timed_out.load(Relaxed),
            retries: c.retries.load(Relaxed),
            producer_restarts: c.producer_restarts.load(Relaxed),
            broker_errors: s.health.errors.load(Relaxed),
            dropped_handoff: s.handoff.dropped.load(Relaxed),
            dropped_buffer_full: c.dropped_buffer_full.load(Relaxed),
            dropped_spool: c.disk.dropped_spool.load(Relaxed),
            dropped_oversize: c.dropped_oversize.load(Relaxed),
            dropped_rejected: c.dropped_rejected.load(Relaxed),
            disk_errors: c.disk.disk_errors.load(Relaxed),
            reports: c.reports.load(Relaxed),
            disk_ok: c.disk.disk_ok.load(Relaxed),
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &KafkaConfig {
        &self.shared.config
    }

    /// Waits until everything emitted so far is delivered (or dropped), at most `timeout`; cuts
    /// a retry backoff short once. Blocks the calling thread: not for hot paths.
    pub fn flush_timeout(&self, timeout: Duration) -> FlushOutcome {
        let s = &self.shared;
        let deadline = Instant::now() + timeout;
        s.flushers.fetch_add(1, Relaxed);
        s.flush_epoch.fetch_add(1, Relaxed);
        s.wake_writer();
        s.wake_sender();
        let outcome = loop {
            let left = s.handoff_pending() + s.buffer.len();
            if left == 0 {
                break FlushOutcome::Drained;
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
    pub fn shutdown(&self, timeout: Duration) -> KafkaStats {
        let mut threads = std::mem::take(&mut *self.threads.lock());
        if threads.is_empty() {
            return self.kafka_stats();
        }
        let outcome = self.flush_timeout(timeout);
        self.stop_threads(&mut threads);
        let stats = self.kafka_stats();
        // Closing the spool fsyncs what is left.
        drop(self.shared.buffer.set_spool(None));
        match outcome {
            FlushOutcome::Drained => tracing::info!(target: "kafka", delivered = stats.delivered,
                dropped = stats.dropped(), "Kafka sink stopped; everything delivered"),
            FlushOutcome::TimedOut { .. } => tracing::warn!(target: "kafka",
                left_on_disk = stats.buffered_disk, lost_from_memory = stats.buffered_memory,
                delivered = stats.delivered, dropped = stats.dropped(),
                "Kafka sink stopped with events left; those on disk are sent by the next start"),
        }
        stats
    }

    fn stop_threads(&self, threads: &mut Vec<JoinHandle<()>>) {
        let s = &self.shared;
        s.handoff.close();
        s.writer_stop.store(true, Relaxed);
        s.wake_writer();
        // The writer finishes the handoff queue first, so nothing emitted before is lost.
        if let Some(w) = threads.first() {
            while !w.is_finished() {
                s.wake_writer();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        s.sender_stop.store(true, Relaxed);
        s.wake_sender();
        for t in threads.drain(..) {
            if t.join().is_err() {
                tracing::error!(target: "kafka", "Kafka sink: a worker thread panicked");
            }
        }
    }
}

impl Drop for KafkaSink {
    /// Stops the threads without waiting for deliveries (the disk keeps what is left).
    fn drop(&mut self) {
        let mut threads = std::mem::take(&mut *self.threads.lock());
        if !threads.is_empty() {
            self.stop_threads(&mut threads);
        }
    }
}

impl Sink for KafkaSink {
    fn emit(&self, event: Event) {
        let s = &self.shared;
        if s.handoff.push(event) == (Pushed::Dropped { first: true }) {
            tracing::warn!(target: "kafka",
                "Kafka sink: handoff queue full, dropping events (counted as dropped_handoff, reported as telemetry_dropped)");
        }
        s.wake_writer();
    }

    fn stats(&self) -> SinkStats {
        let k = self.kafka_stats();
        SinkStats {
            emitted: k.emitted,
            delivered: k.delivered,
            // Drops are not classed by priority here: all are counted as high.
            dropped_high: k.dropped(),
            dropped_low: 0,
            queued: k.handoff_pending + k.buffered,
            reports: k.reports,
            write_errors: k.delivery_failures,
        }
    }

    fn name(&self) -> &'static str {
        "kafka"
    }

    /// [`KafkaSink::flush_timeout`] with the configured `flush_timeout`.
    fn flush(&self) {
        if let FlushOutcome::TimedOut { left } =
            self.flush_timeout(self.shared.config.flush_timeout)
        {
            tracing::warn!(target: "kafka", left, timeout = ?self.shared.config.flush_timeout,
                "Kafka sink: flush timed out; the rest stays buffered");
        }
    }
}

// ------------------------------------------------------------------------------------------
// The writer thread.
// ------------------------------------------------------------------------------------------

/// How long the writer sleeps when there is nothing to do (it is woken by `emit`).
const IDLE: Duration = Duration::from_millis(100);

/// Snapshot of the local drop counters, to report only what is new.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Drops {
    handoff: u64,
    buffer_full: u64,
    spool: u64,
    oversize: u64,
    rejected: u64,
}

impl Drops {
    fn now(shared: &Shared) -> Drops {
        let c = &shared.counters;
        Drops {
            handoff: shared.handoff.dropped.load(Relaxed),
            buffer_full: c.dropped_buffer_full.load(Relaxed),
            spool: c.disk.dropped_spool.load(Relaxed),
            oversize: c.dropped_oversize.load(Relaxed),
            rejected: c.dropped_rejected.load(Relaxed),
        }
    }

    fn total(&self) -> u64 {
        self.handoff + self.buffer_full + self.spool + self.oversize + self.rejected
    }
}

/// Moves events from the handoff queue into the buffer (disk, else memory), and reports local
/// drops as `telemetry_dropped` events through the same buffer.
struct Writer {
    shared: Arc<Shared>,
    /// The spool, its failures and retries.
    disk: Disk,
    /// Whether the memory cap is being hit (to warn once per episode).
    capping: bool,
    json: Vec<u8>,
    record: Vec<u8>,
    reported: Drops,
    window_start_ms: u64,
    last_report: Option<Instant>,
}

impl Writer {
    fn new(shared: Arc<Shared>) -> Writer {
        let c = &shared.config;
        let disk = Disk::new(
            "Kafka sink",
            "SCOPE_KAFKA_BUFFER_PATH",
            c.buffer_path.clone(),
            c.spool.clone(),
            c.disk_retry,
        );
        Writer {
            shared,
            disk,
            capping: false,
            json: Vec::with_capacity(1024),
            record: Vec::with_capacity(1024),
            reported: Drops::default(),
            window_start_ms: now_ms(),
            last_report: None,
        }
    }

    /// The writer thread's loop; returns once stopped and the handoff queue is empty.
    fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        loop {
            let mut n = 0u64;
            while let Some(event) = shared.handoff.pop() {
                self.store_event(&event);
                shared.handoff.done();
                n += 1;
                if n.is_multiple_of(1024) {
                    shared.wake_sender();
                }
            }
            self.take_spool_drops();
            let stopping = shared.writer_stop.load(Relaxed) && shared.handoff.is_empty();
            self.maybe_report(stopping);
            if n > 0 || stopping {
                shared.wake_sender();
                shared.progress();
            }
            if stopping {
                return;
            }
            if self.disk.failing() && shared.buffer.mem_len() > 0 {
                // Retry the disk when due even if nothing new arrives, to move memory to disk.
                let _ = self.disk();
            }
            std::thread::park_timeout(IDLE);
        }
    }

    /// Opens the spool now (at start), so recovery is logged and counted before anything else.
    fn open_disk(&mut self) {
        let _ = self.disk();
    }

    fn store_event(&mut self, event: &Event) {
        self.json.clear();
        event.write_json(&mut self.json);
        let id = event.id();
        let mut record = std::mem::take(&mut self.record);
        if buffer::encode(&id, &self.json, &mut record).is_none() {
            self.shared.counters.dropped_oversize.fetch_add(1, Relaxed);
            tracing::error!(target: "kafka", id_bytes = id.len(),
                "Kafka sink: event id longer than 65,535 bytes; dropped (counted as dropped_oversize)");
        } else {
            self.store(&record);
        }
        self.record = record;
    }

    /// Stores one framed record: disk, else memory (capped, oldest dropped first).
    fn store(&mut self, bytes: &[u8]) {
        let s = Arc::clone(&self.shared);
        let c = &s.counters;
        if let Some(spool) = self.disk() {
            match spool.append(bytes) {
                Ok(_) => {
                    c.accepted.fetch_add(1, Relaxed);
                    return;
                }
                Err(SpoolError::RecordTooLarge { len, max }) => {
                    c.dropped_oversize.fetch_add(1, Relaxed);
                    tracing::error!(target: "kafka", len, max,
                        "Kafka sink: event larger than the disk buffer takes; dropped (counted as dropped_oversize)");
                    return;
                }
                Err(e) => self.disk_failed(&e),
            }
        }
        let cap = s.config.max_memory_buffer as u64;
        if s.buffer.mem_len() >= cap {
            let n = s.buffer.drop_oldest_mem(1);
            c.dropped_buffer_full.fetch_add(n, Relaxed);
            if !self.capping {
                self.capping = true;
                tracing::warn!(target: "kafka", max = cap,
                    "Kafka sink: memory buffer full, dropping the oldest events (counted as dropped_buffer_full)");
            }
        } else if self.capping && s.buffer.mem_len() < cap * 9 / 10 {
            self.capping = false;
        }
        s.buffer.push_mem(bytes.to_vec());
        c.accepted.fetch_add(1, Relaxed);
        c.accepted_memory.fetch_add(1, Relaxed);
    }

    /// The spool to append to, or `None` to use memory (see [`Disk::spool`]).
    fn disk(&mut self) -> Option<Arc<Spool>> {
        let s = Arc::clone(&self.shared);
        self.disk
            .spool(&s.buffer, &s.counters.disk, || s.wake_sender())
    }

    fn disk_failed(&mut self, e: &SpoolError) {
        self.disk.failed(e, &self.shared.counters.disk);
    }

    fn take_spool_drops(&mut self) {
        Disk::take_spool_drops(&self.shared.buffer, &self.shared.counters.disk);
    }

    /// Stores a `telemetry_dropped` event for local drops since the last one, at most one per
    /// `report_interval` (and a final one when closing).
    fn maybe_report(&mut self, closing: bool) {
        let c = &self.shared.counters;
        let now = Drops::now(&self.shared);
        if now == self.reported {
            return;
        }
        let interval = self.shared.config.report_interval;
        if !closing && self.last_report.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        let prev = self.reported;
        let end_ms = now_ms();
        let fields = Fields::new()
            .meta("dropped", now.total() - prev.total())
            .meta("dropped_handoff", now.handoff - prev.handoff)
            .meta("dropped_buffer_full", now.buffer_full - prev.buffer_full)
            .meta("dropped_spool", now.spool - prev.spool)
            .meta("dropped_oversize", now.oversize - prev.oversize)
            .meta("dropped_rejected", now.rejected - prev.rejected)
            .meta("window_start_ms", self.window_start_ms)
            .meta("window_end_ms", end_ms)
            .meta("sink", "kafka")
            .meta("dropped_total", now.total());
        self.reported = now;
        self.window_start_ms = end_ms;
        self.last_report = Some(Instant::now());
        c.reports.fetch_add(1, Relaxed);
        tracing::warn!(target: "kafka", dropped = now.total() - prev.total(), dropped_total = now.total(),
            "Kafka sink: events were dropped; reporting them downstream as telemetry_dropped");
        self.store_event(&Event::Built(Box::new(Envelope::new(
            "telemetry_dropped",
            fields,
        ))));
    }
}

// ------------------------------------------------------------------------------------------
// The sender thread.
// ------------------------------------------------------------------------------------------

/// Where one record of the current batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// To be produced (first time, or again after a failed delivery).
    Todo,
    /// Handed to librdkafka; its delivery report is awaited.
    InFlight,
    /// Failed; produced again after the backoff.
    Failed,
    /// Done: delivered, or dropped for good (counted).
    Resolved,
}

type SinkProducer = ThreadedProducer<SinkContext>;

/// Reads batches from the buffer, produces them, and removes a batch once every record of it is
/// delivered (or dropped for good). One batch at a time, so the buffer only ever loses a prefix.
struct SenderLoop {
    shared: Arc<Shared>,
    producer: SinkProducer,
    reports: mpsc::Receiver<Report>,
    backoff: Duration,
}

impl SenderLoop {
    fn new(shared: Arc<Shared>) -> Result<SenderLoop, KafkaSinkError> {
        let (producer, reports) = Self::make_producer(&shared)?;
        let backoff = shared.config.backoff_base;
        Ok(SenderLoop {
            shared,
            producer,
            reports,
            backoff,
        })
    }

    fn make_producer(
        shared: &Shared,
    ) -> Result<(SinkProducer, mpsc::Receiver<Report>), KafkaSinkError> {
        let (tx, rx) = mpsc::channel();
        let ctx = SinkContext {
            health: Arc::clone(&shared.health),
            reports: tx,
        };
        let producer =
            ThreadedProducer::from_config_and_context(&shared.config.producer_config(), ctx)
                .map_err(KafkaSinkError::Producer)?;
        Ok((producer, rx))
    }

    fn stopping(&self) -> bool {
        self.shared.sender_stop.load(Relaxed)
    }

    fn run(mut self) {
        let s = Arc::clone(&self.shared);
        let (max_events, max_bytes) = (s.config.batch_max_events, s.config.batch_max_bytes);
        while !self.stopping() {
            match s.buffer.peek(max_events, max_bytes) {
                Ok(Some(batch)) => self.send_batch(batch),
                Ok(None) => {
                    s.wait_wake(Duration::from_millis(200));
                }
                Err(e) => {
                    s.counters.disk.disk_errors.fetch_add(1, Relaxed);
                    tracing::error!(target: "kafka", error = %e, "Kafka sink: cannot read the disk buffer; retrying");
                    s.wait_wake(Duration::from_secs(1));
                }
            }
        }
        // What librdkafka still holds is purged when the producer drops; it stays buffered.
    }

    /// Produces `batch` until every record is resolved, then removes it from the buffer.
    /// Returns early (nothing removed) when the sink stops.
    fn send_batch(&mut self, batch: Batch) {
        let s = Arc::clone(&self.shared);
        let n = batch.items.len();
        let mut slots = vec![Slot::Todo; n];
        let mut unresolved = n;
        loop {
            self.produce_todo(&batch, &mut slots, &mut unresolved);
            self.await_in_flight(&mut slots, &mut unresolved);
            if self.stopping() {
                return;
            }
            if unresolved == 0 {
                break;
            }
            // Some deliveries failed: wait, then produce those again.
            s.counters.retries.fetch_add(1, Relaxed);
            let failed = slots.iter().filter(|x| **x == Slot::Failed).count();
            tracing::debug!(target: "kafka", failed, backoff = ?self.backoff, "Kafka sink: retrying failed deliveries");
            self.sleep_backoff();
            if self.stopping() {
                return;
            }
            self.replace_producer(&mut slots);
            for slot in slots.iter_mut().filter(|x| **x == Slot::Failed) {
                *slot = Slot::Todo;
            }
        }
        let last = batch.items.last().map_or(0, |i| i.key);
        loop {
            match s.buffer.remove_through(batch.source, last) {
                Ok(_) => break,
                Err(e) => {
                    // Not removing means producing the batch again later: duplicates, not loss.
                    s.counters.disk.disk_errors.fetch_add(1, Relaxed);
                    tracing::error!(target: "kafka", error = %e, "Kafka sink: cannot acknowledge a delivered batch on disk; retrying");
                    if self.stopping() {
                        return;
                    }
                    s.wait_wake(Duration::from_secs(1));
                }
            }
        }
        self.backoff = s.config.backoff_base;
        s.progress();
    }

    fn produce_todo(&mut self, batch: &Batch, slots: &mut [Slot], unresolved: &mut usize) {
        let s = Arc::clone(&self.shared);
        let topic = s.config.topic.as_str();
        for idx in 0..slots.len() {
            if slots[idx] != Slot::Todo {
                continue;
            }
            let Some((key, value)) = buffer::decode(&batch.items[idx].bytes) else {
                // Not a record this sink wrote (a foreign file in the buffer directory).
                slots[idx] = Slot::Resolved;
                *unresolved -= 1;
                s.counters.dropped_rejected.fetch_add(1, Relaxed);
                tracing::error!(target: "kafka", "Kafka sink: unreadable record in the disk buffer; dropped");
                continue;
            };
            loop {
                let record = BaseRecord::with_opaque_to(topic, idx)
                    .key(key)
                    .payload(value);
                match self.producer.send(record) {
                    Ok(()) => {
                        slots[idx] = Slot::InFlight;
                        s.counters.produced.fetch_add(1, Relaxed);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        // librdkafka's queue is full: take delivery reports until it has room.
                        self.take_reports(slots, unresolved, Duration::from_millis(50));
                        if self.stopping() {
                            return;
                        }
                    }
                    Err((e, _)) if producer::permanent(&e) => {
                        slots[idx] = Slot::Resolved;
                        *unresolved -= 1;
                        s.counters.dropped_rejected.fetch_add(1, Relaxed);
                        tracing::error!(target: "kafka", error = %e, bytes = value.len(),
                            "Kafka sink: event refused by the producer for good; dropped (counted as dropped_rejected)");
                        break;
                    }
                    Err((e, _)) => {
                        slots[idx] = Slot::Failed;
                        s.counters.delivery_failures.fetch_add(1, Relaxed);
                        tracing::debug!(target: "kafka", error = %e, "Kafka sink: produce failed; will retry");
                        break;
                    }
                }
            }
        }
    }

    /// Takes delivery reports until nothing of the batch is in flight (or the sink stops, or the
    /// producer has a fatal error).
    fn await_in_flight(&mut self, slots: &mut [Slot], unresolved: &mut usize) {
        while slots.contains(&Slot::InFlight) {
            if self.stopping() || self.shared.health.fatal.load(Relaxed) {
                return;
            }
            self.take_reports(slots, unresolved, Duration::from_millis(100));
        }
    }

    fn take_reports(&mut self, slots: &mut [Slot], unresolved: &mut usize, wait: Duration) {
        let first = match self.reports.recv_timeout(wait) {
            Ok(r) => r,
            Err(_) => return,
        };
        let mut next = Some(first);
        while let Some(r) = next {
            self.apply(r, slots, unresolved);
            next = self.reports.try_recv().ok();
        }
    }

    fn apply(&mut self, r: Report, slots: &mut [Slot], unresolved: &mut usize) {
        let s = &self.shared;
        let Some(slot) = slots.get_mut(r.idx) else {
            return;
        };
        if *slot != Slot::InFlight {
            return;
        }
        match r.result {
            Ok(_) => {
                *slot = Slot::Resolved;
                *unresolved -= 1;
                s.counters.delivered.fetch_add(1, Relaxed);
                if s.health.recovered() {
                    tracing::info!(target: "kafka", "Kafka sink: deliveries succeed again");
                }
            }
            Err(e) if producer::permanent(&e) => {
                *slot = Slot::Resolved;
                *unresolved -= 1;
                s.counters.dropped_rejected.fetch_add(1, Relaxed);
                tracing::error!(target: "kafka", error = %e,
                    "Kafka sink: event refused by the broker for good; dropped (counted as dropped_rejected)");
            }
            Err(e) => {
                *slot = Slot::Failed;
                s.counters.delivery_failures.fetch_add(1, Relaxed);
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut)
                    && s.counters.timed_out.fetch_add(1, Relaxed) == 0
                {
                    tracing::warn!(target: "kafka", error = %e, timeout = ?s.config.message_timeout,
                        "Kafka sink: deliveries timed out (outage longer than SCOPE_KAFKA_MESSAGE_TIMEOUT_MS); producing them again: \
                         records the broker wrote before the cut may appear twice (same key = envelope id; counted as timed_out; warned once)");
                }
                tracing::debug!(target: "kafka", error = %e, "Kafka sink: delivery failed; will retry");
            }
        }
    }

    /// Sleeps the current backoff (doubling it for next time), cut short by a stop or a new
    /// `flush` call.
    fn sleep_backoff(&mut self) {
        let s = &self.shared;
        let epoch = s.flush_epoch.load(Relaxed);
        let until = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(s.config.backoff_max);
        while Instant::now() < until {
            if self.stopping() || s.flush_epoch.load(Relaxed) != epoch {
                return;
            }
            s.wait_wake(
                Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())),
            );
        }
    }

    /// Replaces the producer before a retry round: a fresh idempotent producer gets a new
    /// producer id from the broker, which clears whatever state the old one was stuck in (a
    /// broker that lost its producer state answers `UNKNOWN_PRODUCER_ID` to the old id forever;
    /// a fatal error disables a producer for good). Records still in flight (only after a fatal
    /// error) are purged with it and produced again.
    fn replace_producer(&mut self, slots: &mut [Slot]) {
        let s = Arc::clone(&self.shared);
        let fatal = s.health.fatal.load(Relaxed) || self.producer.client().fatal_error().is_some();
        match Self::make_producer(&s) {
            Ok((producer, reports)) => {
                self.producer = producer;
                self.reports = reports;
                s.health.fatal.store(false, Relaxed);
                s.counters.producer_restarts.fetch_add(1, Relaxed);
                for slot in slots.iter_mut().filter(|x| **x == Slot::InFlight) {
                    *slot = Slot::Failed;
                }
                if fatal {
                    tracing::warn!(target: "kafka", "Kafka sink: producer replaced after a fatal error");
                }
            }
            Err(e) => {
                tracing::error!(target: "kafka", error = %e, "Kafka sink: cannot replace the producer; retrying");
            }
        }
    }
}
