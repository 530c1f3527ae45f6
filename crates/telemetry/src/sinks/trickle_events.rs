//! [`TrickleEventsSink`]: the runner's sink, onto the session's trickle events channel.
//!
//! `emit` puts the event in a bounded two-class queue ([`crate::queue`]) and returns; a drain task
//! takes everything queued per wake-up, serializes it off the caller's thread, and writes it as one
//! batch of `{"type":"telemetry","seq":N,"event":<envelope>}` lines to the events writer (one
//! pre-joined chunk per batch). While events trickle in (its batches are small), the drain parks when it
//! has drained everything, and the first event after that wakes it at once (the idle → busy edge,
//! [`EventQueue::wait_idle`]): a lone event is written at once instead of after a poll interval.
//! In a flood (large batches) it polls instead, so a fast producer pays no wake-up per batch;
//! a filling queue (the wake mark) wakes it in both modes. The drain polls every
//! [`TrickleEventsConfig::poll_interval`] (or, once idle, every
//! [`TrickleEventsConfig::max_poll_interval`] when that is set), for loss reports.
//!
//! **Loss is reported, not just logged.** The sink counts every drop (queue eviction, failed write,
//! emit after shutdown, and lines its output lost after taking them, [`LineOutput::lines_lost`],
//! folded in at each wake-up). Whenever drops happened since the last report, the drain task writes a
//! `High`-priority `telemetry_dropped` envelope into the channel (at most one per
//! [`TrickleEventsConfig::report_interval`], and always a final one on shutdown), built with the
//! session's ids, with metadata `dropped` (this window), `dropped_high`, `dropped_low`,
//! `window_start_ms`, `window_end_ms`, `sink` (`"trickle_events"`) and `dropped_total`. Reports go
//! straight to the writer, not through the queue, so they are never themselves evicted; a report
//! whose write fails is folded into the next one. Hence the `dropped` values the client receives sum
//! to what the sink counted (drops after the final report, i.e. emits after shutdown, excepted).
//!
//! **Every event line is numbered.** `seq` counts the events this sink handed to the writer, from 1,
//! without a hole (a line the writer refused is dropped and counted, and its number is reused), so
//! a reader that sees `seq` jump knows exactly how many lines it did not receive: lost in transit,
//! not dropped here. Loss reports are not numbered (they are not events); each carries
//! `report_seq` (1, 2, ...) and the `seq_from`..`seq_to` range of event lines written in its
//! window, and `dropped_total` is cumulative, so a reader that misses a report still gets its
//! count from the next one. `lost_downstream_total` says how much of `dropped_total` is lines the
//! writer lost after taking them (a failed segment; an upper bound, other lines included): a
//! reader that follows `seq` counts those events as gaps instead. [`TrickleEventsSink::transit`] gives the totals the runner announces
//! when it closes the channel (`telemetry_end`).
//!
//! **Flow control.** With [`TrickleEventsConfig::flow_segment_bytes`] set, the client's reports of
//! what it has read ([`TrickleEventsSink::client_read`]) give the drain its credit
//! ([`crate::flow`]): it never has more than 2.5 segments written and not yet read, and while it is
//! held its queue sheds heartbeats first (counted and reported as any drop) instead of the client
//! losing whole segments in transit. That holds while closing too: what is queued at
//! [`TrickleEventsSink::close`] goes out as the client reads it, until
//! [`TrickleEventsConfig::flow_close_wait`] has passed or [`TrickleEventsSink::release_flow`] is
//! called (the client is gone), after which the rest is written at once.

use crate::envelope::{now_ms, Envelope, Event, Fields};
use crate::flow::{FlowControl, Limit, Tokens};
use crate::output::LineOutput;
use crate::priority::Priority;
use crate::queue::{EventQueue, DEFAULT_CAPACITY, DEFAULT_MIN_IDLE};
use crate::sink::{Sink, SinkStats};
use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// The segment size flow control assumes when none is configured (the trickle writer's default).
const DEFAULT_FLOW_SEGMENT: usize = 1 << 20;

/// The sink's name, also the `sink` field of its loss reports.
pub const SINK_NAME: &str = "trickle_events";

/// What begins a loss report's line (reports are not numbered).
const LINE_PREFIX: &[u8] = br#"{"type":"telemetry","event":"#;

/// What begins an event's line, before its `seq`.
const SEQ_PREFIX: &[u8] = br#"{"type":"telemetry","seq":"#;

/// A batch this small means events trickle in (10,000 events/s gives ~10 per 1 ms poll): the
/// drain then parks for the idle wake-up (the next event is written at once). Larger batches mean
/// a flood (a flat-out producer fills ≥ 50 µs × its rate): the drain polls instead.
const SMALL_BATCH: usize = 32;

/// The session whose events channel this sink writes to; stamped on loss reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionContext {
    /// The session id (`data.session_id` of loss reports).
    pub session_id: Option<String>,
    /// The connection id (`data.connection_id` of loss reports).
    pub connection_id: Option<String>,
}

/// Tuning of a [`TrickleEventsSink`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrickleEventsConfig {
    /// Queue capacity shared by both priority classes (default 256, the seed's).
    pub capacity: usize,
    /// Minimum time between two loss reports (default 250 ms); shutdown always reports.
    pub report_interval: Duration,
    /// How often the drain looks for queued events (default 1 ms) when nothing woke it. The first
    /// event after an idle spell wakes the drain itself, so this bounds only the wait after a
    /// failed write and the timing of loss reports.
    pub poll_interval: Duration,
    /// When set, an idle drain (two empty polls in a row) polls only this often: events still
    /// wake it at once, so this bounds only how soon its output's later losses
    /// ([`LineOutput::lines_lost`]) are counted. Thousands of idle sinks in one process (many
    /// sessions) then cost a few wake-ups a second each instead of a thousand.
    /// Default `None`: a fixed `poll_interval` (about 1,000 cheap timer wake-ups a second).
    pub max_poll_interval: Option<Duration>,
    /// How long the drain must have been idle for an event to wake it at once (default 50 µs,
    /// [`crate::queue::DEFAULT_MIN_IDLE`]); an event sooner than that waits for the next one,
    /// the wake mark or the poll. Zero wakes it for every first event (a syscall per event for a
    /// producer that outpaces the drain).
    pub min_idle: Duration,
    /// Flow control: the events writer's segment size (what the trickle server's window is made
    /// of). `None` (the default): the client's reports are recorded but never limit the drain.
    pub flow_segment_bytes: Option<usize>,
    /// Once closed, how long flow control still holds the drain to the client's reading (what is
    /// queued goes out as the client reads it); after that the rest is written at once.
    /// Default 10 s.
    pub flow_close_wait: Duration,
}

impl Default for TrickleEventsConfig {
    fn default() -> Self {
        TrickleEventsConfig {
            capacity: DEFAULT_CAPACITY,
            report_interval: Duration::from_millis(250),
            poll_interval: Duration::from_millis(1),
            max_poll_interval: None,
            min_idle: DEFAULT_MIN_IDLE,
            flow_segment_bytes: None,
            flow_close_wait: Duration::from_secs(10),
        }
    }
}

/// What the sink has written so far, for the runner's `telemetry_end`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransitTotals {
    /// The `seq` of the last event line written (0: none).
    pub last_seq: u64,
    /// Loss reports written (`report_seq` of the last one).
    pub reports: u64,
    /// Drops counted so far (the `dropped_total` a report written now would carry).
    pub dropped_total: u64,
    /// Of them, lines the writer lost after taking them (`lost_downstream_total`): a reader that
    /// follows `seq` sees those events as gaps instead.
    pub lost_downstream: u64,
}

/// Spawning needs a Tokio runtime for the drain task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("TrickleEventsSink::spawn needs a Tokio runtime: call it from within one, or use spawn_on")]
pub struct NoRuntime;

/// Moves `n` events lost after delivery from `delivered` to the (low) drops.
fn move_lost(c: &Counters, n: u64) {
    // Only events counted delivered can be lost after it; never below zero.
    let moved = c
        .delivered
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
            Some(d.saturating_sub(n))
        })
        .map_or(0, |before| before.min(n));
    c.write_dropped_low.fetch_add(moved, Ordering::Relaxed);
    // Their lines were numbered: a reader following `seq` sees them as gaps, not drops.
    c.lost_downstream.fetch_add(moved, Ordering::Relaxed);
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    write_dropped_high: AtomicU64,
    write_dropped_low: AtomicU64,
    in_flight: AtomicU64,
    reports: AtomicU64,
    write_errors: AtomicU64,
    /// Of the drops, lines the writer lost after taking them ([`TrickleEventsSink::count_lost_downstream`]).
    lost_downstream: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    queue: EventQueue,
    counters: Counters,
    /// `seq` of the last event line written.
    last_seq: AtomicU64,
    /// The client's reading, as it reported it.
    flow: Mutex<FlowControl>,
    /// Whether reports limit the drain.
    flow_enabled: bool,
    /// Flow control lifted for good ([`TrickleEventsSink::release_flow`]).
    flow_released: std::sync::atomic::AtomicBool,
    /// The budget now, events/s × 1000 (`u64::MAX`: none).
    budget_milli: AtomicU64,
}

impl Shared {
    fn lost_downstream(&self) -> u64 {
        self.counters.lost_downstream.load(Ordering::Relaxed)
    }

    /// (dropped_high, dropped_low) counted so far, all causes.
    fn drop_totals(&self) -> (u64, u64) {
        let q = self.queue.counts();
        let c = &self.counters;
        (
            q.dropped_high + c.write_dropped_high.load(Ordering::Relaxed),
            q.dropped_low + c.write_dropped_low.load(Ordering::Relaxed),
        )
    }
}

/// The runner's sink: bounded queue plus a drain task writing to the session's events channel.
#[derive(Debug)]
pub struct TrickleEventsSink {
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl TrickleEventsSink {
    /// Starts the sink and its drain task on the current Tokio runtime, with `capacity` and the
    /// default report interval.
    pub fn spawn<O: LineOutput>(
        output: O,
        session: SessionContext,
        capacity: usize,
    ) -> Result<Arc<TrickleEventsSink>, NoRuntime> {
        let handle = Handle::try_current().map_err(|_| NoRuntime)?;
        let config = TrickleEventsConfig {
            capacity,
            ..TrickleEventsConfig::default()
        };
        Ok(TrickleEventsSink::spawn_on(
            &handle, output, session, config,
        ))
    }

    /// Starts the sink with its drain task on `handle`.
    pub fn spawn_on<O: LineOutput>(
        handle: &Handle,
        output: O,
        session: SessionContext,
        config: TrickleEventsConfig,
    ) -> Arc<TrickleEventsSink> {
        let shared = Arc::new(Shared {
            queue: EventQueue::new(config.capacity).with_min_idle(config.min_idle),
            counters: Counters::default(),
            last_seq: AtomicU64::new(0),
            flow: Mutex::new(FlowControl::new(
                config.flow_segment_bytes.unwrap_or(DEFAULT_FLOW_SEGMENT),
            )),
            flow_enabled: config.flow_segment_bytes.is_some(),
            flow_released: std::sync::atomic::AtomicBool::new(false),
            budget_milli: AtomicU64::new(u64::MAX),
        });
        let task = handle.spawn(drain(Arc::clone(&shared), output, session, config));
        Arc::new(TrickleEventsSink {
            shared,
            task: Mutex::new(Some(task)),
        })
    }

    /// Stops accepting events (later emits are dropped and counted); the drain task writes what
    /// is queued, a final loss report if needed, and ends. Does not wait: see [`Self::shutdown`].
    pub fn close(&self) {
        self.shared.queue.close();
    }

    /// Counts `n` events lost after the sink handed them on (the events of an events segment
    /// that failed, [`trickle::jsonl::WriterStats::counted_lost`]): they move from `delivered`
    /// to the drops (as low priority: their class is unknown), so `emitted = delivered + dropped
    /// + queued` still holds, and the next `telemetry_dropped` reports them.
    pub fn count_lost_downstream(&self, n: u64) {
        move_lost(&self.shared.counters, n);
    }

    /// The client has read every event line up to `read_seq` (its `telemetry_flow` report).
    pub fn client_read(&self, read_seq: u64) {
        self.shared
            .flow
            .lock()
            .client_read(Instant::now(), read_seq);
    }

    /// Lifts flow control for good: nobody will report reading any more (the client's control
    /// channel ended), so what is queued is written at once.
    pub fn release_flow(&self) {
        self.shared.flow_released.store(true, Ordering::Relaxed);
    }

    /// The client's lag: bytes of lines written and not known read (0 before its first report).
    pub fn client_lag_bytes(&self) -> u64 {
        self.shared.flow.lock().lag_bytes()
    }

    /// The last `seq` the client reported having read, if it ever reported.
    pub fn client_read_seq(&self) -> Option<u64> {
        self.shared.flow.lock().read_seq()
    }

    /// The events budget in force now (events per second): `Some(0.0)` while the drain is held
    /// until the client reports, [`crate::flow::MIN_BUDGET`] for a silent client, `None` while it
    /// may write.
    pub fn budget(&self) -> Option<f64> {
        match self.shared.budget_milli.load(Ordering::Relaxed) {
            u64::MAX => None,
            m => Some(m as f64 / 1000.0),
        }
    }

    /// What has been written so far: last `seq`, reports, drops (after [`Self::shutdown`], final).
    pub fn transit(&self) -> TransitTotals {
        let (high, low) = self.shared.drop_totals();
        TransitTotals {
            last_seq: self.shared.last_seq.load(Ordering::Relaxed),
            reports: self.shared.counters.reports.load(Ordering::Relaxed),
            dropped_total: high + low,
            lost_downstream: self.shared.counters.lost_downstream.load(Ordering::Relaxed),
        }
    }

    /// [`Self::close`], then waits for the drain task to finish; returns the final totals.
    pub async fn shutdown(&self) -> SinkStats {
        self.close();
        let task = self.task.lock().take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::error!(target: "telemetry", error = %e, "telemetry drain task failed");
            }
        }
        self.stats()
    }
}

impl Drop for TrickleEventsSink {
    fn drop(&mut self) {
        // The drain task owns the rest: it writes what is queued and ends.
        self.shared.queue.close();
    }
}

impl Sink for TrickleEventsSink {
    fn emit(&self, event: Event) {
        self.shared.queue.push(event);
    }

    fn stats(&self) -> SinkStats {
        let (q, len) = self.shared.queue.snapshot();
        let c = &self.shared.counters;
        SinkStats {
            emitted: q.pushed(),
            delivered: c.delivered.load(Ordering::Relaxed),
            dropped_high: q.dropped_high + c.write_dropped_high.load(Ordering::Relaxed),
            dropped_low: q.dropped_low + c.write_dropped_low.load(Ordering::Relaxed),
            queued: len as u64 + c.in_flight.load(Ordering::Relaxed),
            reports: c.reports.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
        }
    }

    fn name(&self) -> &'static str {
        SINK_NAME
    }
}

/// Loss-report bookkeeping of one drain task.
struct Reporter {
    session: SessionContext,
    interval: Duration,
    /// Drops already reported (high, low).
    reported: (u64, u64),
    window_start_ms: u64,
    /// First event `seq` of the window the next report covers.
    seq_from: u64,
    /// Reports written so far.
    written: u64,
    /// Last report written or attempted (a failing writer must not be retried in a tight loop).
    last_report: Option<Instant>,
}

impl Reporter {
    fn due(&self, totals: (u64, u64), closing: bool) -> bool {
        totals != self.reported
            && (closing
                || self
                    .last_report
                    .is_none_or(|t| t.elapsed() >= self.interval))
    }

    /// Time until a pending report is due (None: nothing pending).
    fn wait_for(&self, totals: (u64, u64)) -> Option<Duration> {
        if totals == self.reported {
            return None;
        }
        Some(self.last_report.map_or(Duration::ZERO, |t| {
            self.interval.saturating_sub(t.elapsed())
        }))
    }

    /// The report of drops since the last one; `seq_to` is the last event line ahead of it,
    /// `lost_downstream` the writer's lost lines so far.
    fn build(&self, totals: (u64, u64), seq_to: u64, lost_downstream: u64) -> (Envelope, u64) {
        let high = totals.0 - self.reported.0;
        let low = totals.1 - self.reported.1;
        let end_ms = now_ms();
        let mut fields = Fields::new();
        if let Some(s) = &self.session.session_id {
            fields = fields.session_id(s.as_str());
        }
        if let Some(c) = &self.session.connection_id {
            fields = fields.connection_id(c.as_str());
        }
        let fields = fields
            .meta("dropped", high + low)
            .meta("dropped_high", high)
            .meta("dropped_low", low)
            .meta("window_start_ms", self.window_start_ms)
            .meta("window_end_ms", end_ms)
            .meta("sink", SINK_NAME)
            .meta("dropped_total", totals.0 + totals.1)
            .meta("report_seq", self.written + 1)
            .meta("seq_from", self.seq_from)
            .meta("seq_to", seq_to)
            .meta("lost_downstream_total", lost_downstream);
        (Envelope::new("telemetry_dropped", fields), end_ms)
    }
}

/// Appends one event line (`{"type":"telemetry","seq":N,"event":E}` and `\n`); returns the
/// `\n`'s index.
fn write_line(buf: &mut Vec<u8>, seq: u64, event: &Event) -> usize {
    buf.extend_from_slice(SEQ_PREFIX);
    buf.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    buf.extend_from_slice(br#","event":"#);
    event.write_json(buf);
    buf.extend_from_slice(b"}\n");
    buf.len() - 1
}

/// Appends one loss report's line (`{"type":"telemetry","event":E}`, not numbered); returns the
/// `\n`'s index.
fn write_report_line(buf: &mut Vec<u8>, envelope: &Envelope) -> usize {
    buf.extend_from_slice(LINE_PREFIX);
    envelope.write_json(buf);
    buf.extend_from_slice(b"}\n");
    buf.len() - 1
}

/// Logs the flow control's state every 100 ms at debug level (target `telemetry::flow`), for
/// tracing a run: the client's position against the writer's, the credit, the queue, the drops.
#[derive(Default)]
struct FlowTrace {
    last: Option<Instant>,
}

impl FlowTrace {
    fn maybe_log(&mut self, now: Instant, shared: &Shared, last_seq: u64, limit: Limit) {
        if !tracing::enabled!(target: "telemetry::flow", tracing::Level::DEBUG)
            || self
                .last
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        let (read_seq, lag_bytes) = {
            let f = shared.flow.lock();
            (f.read_seq(), f.lag_bytes())
        };
        let (high, low) = shared.drop_totals();
        tracing::debug!(target: "telemetry::flow",
            last_seq,
            read_seq = read_seq.unwrap_or(0),
            lag_bytes,
            queued = shared.queue.len(),
            dropped_high = high,
            dropped_low = low,
            limit = ?limit,
            "flow");
    }
}

/// Flow control learns where every this many lines of a batch end (see [`FlowControl::wrote`]).
const FLOW_STEP: usize = 64;

/// Mean size of the event lines written so far (512 before the first).
fn mean_written(bytes: u64, next_seq: u64) -> usize {
    match next_seq - 1 {
        0 => 512,
        lines => (bytes / lines) as usize,
    }
}

/// Bytes to reserve for a batch of `n` lines averaging `mean` bytes (a little headroom, so the
/// buffer is allocated once: a heartbeat line is ~490 B, and a reallocation copies the batch).
fn batch_capacity(n: usize, mean: usize) -> usize {
    n * (mean + mean / 8 + 16) + 1024
}

async fn drain<O: LineOutput>(
    shared: Arc<Shared>,
    mut output: O,
    session: SessionContext,
    config: TrickleEventsConfig,
) {
    let min_poll = config.poll_interval.max(Duration::from_micros(100));
    let max_poll = config.max_poll_interval.unwrap_or(min_poll).max(min_poll);
    // Polls in a row that found nothing (and wrote no report).
    let mut empty_polls = 0u32;
    let mut reporter = Reporter {
        session,
        interval: config.report_interval,
        reported: (0, 0),
        window_start_ms: now_ms(),
        seq_from: 1,
        written: 0,
        last_report: None,
    };
    let mut batch: Vec<Event> = Vec::new();
    let mut ends: Vec<usize> = Vec::new();
    // Mean line length of the last batch (sizes the next buffer); a heartbeat line is ~490 B.
    let mut mean_line = 512usize;
    // The longest event line of the last batch: flow control's size of the next lines.
    let mut longest_line = 0usize;
    let mut warned_drop = false;
    // The last write failed: wait out the poll interval instead of retrying on every event.
    let mut failed_last = false;
    // Size of the last non-empty batch: a trickle (small batches) arms the idle wake-up; a flood
    // (large batches) polls, so a fast producer never pays a wake-up (and a preemption) per batch.
    let mut last_batch = 0usize;
    // The output's lost lines already counted as drops (outputs other than the events writer).
    let mut lost_counted = 0u64;
    // The `seq` of the next event line.
    let mut next_seq: u64 = 1;
    let mut tokens = Tokens::new(Instant::now());
    // Bytes of the event lines written so far: flow control turns its credit into lines with
    // the larger of their mean and the last batch's longest (a batch of larger events costs more).
    let mut written_bytes: u64 = 0;
    // When the drain first saw the queue closed: flow control holds for `flow_close_wait` more.
    let mut closed_at: Option<Instant> = None;
    let mut trace = FlowTrace::default();
    loop {
        let now = Instant::now();
        if closed_at.is_none() && shared.queue.is_closed() {
            closed_at = Some(now);
        }
        let released = shared.flow_released.load(Ordering::Relaxed)
            || closed_at
                .is_some_and(|t| now.saturating_duration_since(t) >= config.flow_close_wait);
        // The credit the client's reading leaves (closing too: what is queued goes out as the
        // client reads it, not all at once past its window).
        let line_bytes = mean_written(written_bytes, next_seq).max(longest_line);
        let limit = if shared.flow_enabled && !released {
            shared.flow.lock().limit(now, line_bytes)
        } else {
            Limit::None
        };
        let budget = match limit {
            Limit::Rate(b) => Some(b),
            Limit::Lines(0) => Some(0.0),
            Limit::None | Limit::Lines(_) => None,
        };
        shared.budget_milli.store(
            budget.map_or(u64::MAX, |b| (b * 1000.0) as u64),
            Ordering::Relaxed,
        );
        let drained = match limit {
            Limit::None => shared.queue.drain_into(&mut batch),
            Limit::Lines(n) => shared.queue.drain_into_max(&mut batch, n),
            Limit::Rate(b) => {
                // Never past the trickle's end, whatever the bucket holds.
                let room = shared.flow.lock().trickle_lines(line_bytes);
                let allowed = tokens.take(now, b).min(room);
                let d = shared.queue.drain_into_max(&mut batch, allowed);
                tokens.give_back(allowed - d.taken);
                d
            }
        };
        // Held: the limit, not the queue running dry, ended this batch, and events wait (the
        // queue sheds heartbeats meanwhile).
        let held = match limit {
            Limit::None => false,
            Limit::Lines(n) => drained.taken >= n && !shared.queue.is_empty(),
            Limit::Rate(_) => !shared.queue.is_empty(),
        };
        if shared.flow_enabled {
            trace.maybe_log(now, &shared, next_seq - 1, limit);
        }
        let lost = output.lines_lost();
        if lost > lost_counted {
            // Their class is unknown: counted as low priority, reported with the sink's own drops.
            let n = lost - lost_counted;
            lost_counted = lost;
            move_lost(&shared.counters, n);
            tracing::warn!(target: "telemetry", lines = n,
                "events lines lost in failed segments; reported as telemetry_dropped");
        }
        // Closed and empty: nothing more will ever arrive (closed while held to a budget, the
        // rest is drained by the next turn, which has none).
        let finished = drained.closed && shared.queue.is_empty();
        let totals = shared.drop_totals();
        if totals != (0, 0) && !warned_drop {
            warned_drop = true;
            tracing::warn!(target: "telemetry",
                "telemetry events queue overflowed: dropping events (counted, reported as telemetry_dropped)");
        }
        let n = batch.len();
        let report = reporter
            .due(totals, finished)
            .then(|| reporter.build(totals, next_seq + n as u64 - 1, shared.lost_downstream()));

        // Poll fast while events flow. After the first empty poll, one more short wait catches an
        // event pushed just as the drain parked (sooner than min_idle, which does not wake it);
        // after the second the drain is idle: pushes wake it, and it polls only every max_poll.
        empty_polls = if batch.is_empty() {
            empty_polls.saturating_add(1)
        } else {
            0
        };
        let poll = if empty_polls <= 1 { min_poll } else { max_poll };
        if empty_polls >= 2 {
            // A flood that stopped: back to the idle wake-up, so a lone event is not held a poll.
            last_batch = 0;
        }
        if !batch.is_empty() || report.is_some() {
            shared.counters.in_flight.store(n as u64, Ordering::Relaxed);
            // One buffer per batch, framed here and handed over whole (no per-line copy or send).
            let mut buf = Vec::with_capacity(batch_capacity(n + 1, mean_line));
            ends.clear();
            let mut start = 0;
            longest_line = 0;
            for (i, event) in batch.iter().enumerate() {
                let end = write_line(&mut buf, next_seq + i as u64, event);
                longest_line = longest_line.max(end + 1 - start);
                start = end + 1;
                ends.push(end);
            }
            if let Some(mean) = buf.len().checked_div(n) {
                mean_line = mean;
                last_batch = n;
            }
            if let Some((envelope, _)) = &report {
                ends.push(write_report_line(&mut buf, envelope));
            }
            // The events are counted lines: the output tells later which of them arrived.
            let result = output
                .write_joined_counted(Bytes::from(buf), &ends, n)
                .await;
            let failed = result.is_err();
            failed_last = failed;
            let written = match result {
                Ok(()) => ends.len(),
                Err(e) => {
                    let errors = shared.counters.write_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if errors.is_power_of_two() {
                        tracing::warn!(target: "telemetry", error = %e, errors,
                            "cannot write telemetry to the events channel; events dropped (counted)");
                    }
                    e.written.min(ends.len())
                }
            };
            let delivered = written.min(n);
            let event_bytes = match delivered {
                0 => 0,
                d => ends[d - 1] as u64 + 1,
            };
            written_bytes += event_bytes;
            // Numbers stay without a hole: those of lines the writer refused are used again.
            next_seq += delivered as u64;
            shared.last_seq.store(next_seq - 1, Ordering::Relaxed);
            // What the client must read before the credit comes back: every line written,
            // the loss report included.
            let batch_bytes = match written {
                0 => 0,
                w => ends[w - 1] as u64 + 1,
            };
            {
                // Every FLOW_STEP lines a point, so a client reading inside a large batch
                // gets its credit back as it reads, not at the batch's end.
                let mut flow = shared.flow.lock();
                let first = next_seq - delivered as u64;
                let mut done = 0u64;
                for i in (FLOW_STEP - 1..delivered.saturating_sub(1)).step_by(FLOW_STEP) {
                    let end = ends[i] as u64 + 1;
                    flow.wrote(first + i as u64, end - done);
                    done = end;
                }
                flow.wrote(next_seq - 1, batch_bytes.max(event_bytes) - done);
            }
            shared
                .counters
                .delivered
                .fetch_add(delivered as u64, Ordering::Relaxed);
            for event in &batch[delivered..] {
                let counter = match event.priority() {
                    Priority::High => &shared.counters.write_dropped_high,
                    Priority::Low => &shared.counters.write_dropped_low,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            if let Some((_, end_ms)) = report {
                reporter.last_report = Some(Instant::now());
                if written > n {
                    shared.counters.reports.fetch_add(1, Ordering::Relaxed);
                    reporter.reported = totals;
                    reporter.window_start_ms = end_ms;
                    reporter.written += 1;
                    reporter.seq_from = next_seq;
                }
            }
            shared.counters.in_flight.store(0, Ordering::Relaxed);
            batch.clear();
            // After a failed write, wait a poll interval rather than retrying a broken writer at once.
            // Held, wait for credit (below) rather than drain again at once.
            if !finished && !failed && !held {
                continue;
            }
        }
        if finished {
            // Nothing more can be queued. One last report if this batch's write failures added drops.
            let totals = shared.drop_totals();
            if totals != reporter.reported && reporter.due(totals, true) {
                let (envelope, _) = reporter.build(totals, next_seq - 1, shared.lost_downstream());
                let mut buf = Vec::with_capacity(512);
                let end = write_report_line(&mut buf, &envelope);
                if output.write_joined(Bytes::from(buf), &[end]).await.is_ok() {
                    shared.counters.reports.fetch_add(1, Ordering::Relaxed);
                }
            }
            break;
        }
        let wait = reporter.wait_for(totals).map_or(poll, |d| d.min(poll));
        if held {
            // Held with events waiting: sleep until the next token, or a poll interval for the
            // client's next report (not the queue's wake-up, which a full queue fires at once).
            let next = match budget {
                Some(b) if b > 0.0 => tokens.until_next(b),
                _ => min_poll,
            };
            tokio::time::sleep(next.min(wait).max(Duration::from_micros(100))).await;
        } else if failed_last || last_batch > SMALL_BATCH {
            // After a failed write, wait the interval out rather than retry per event; in a
            // flood, poll (the wake mark still wakes the drain before the queue overflows).
            shared.queue.wait_for(wait).await;
        } else {
            // Idle: the next event wakes the drain at once (one wake-up per idle spell).
            shared.queue.wait_idle(wait).await;
        }
    }
}
