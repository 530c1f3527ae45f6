//! The writer thread: moves events from the handoff queue into the buffer (disk, else memory),
//! enforces the event cap, falls back to memory and back to disk, and reports local drops as
//! `telemetry_dropped` events through the same buffer.

use crate::shape;
use crate::Shared;
use spool::fallback::Disk;
use spool::{Spool, SpoolError};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::{now_ms, Envelope, Event, Fields};

/// How long the writer sleeps when there is nothing to do (it is woken by `emit`).
const IDLE: Duration = Duration::from_millis(100);

/// Snapshot of the local drop counters, to report only what is new.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Drops {
    handoff: u64,
    buffer_full: u64,
    spool: u64,
    invalid: u64,
    oversize: u64,
}

impl Drops {
    fn now(shared: &Shared) -> Drops {
        let c = &shared.counters;
        Drops {
            handoff: shared.handoff.dropped.load(Relaxed),
            buffer_full: c.dropped_buffer_full.load(Relaxed),
            spool: c.disk.dropped_spool.load(Relaxed),
            invalid: c.dropped_invalid.load(Relaxed),
            oversize: c.dropped_oversize_local.load(Relaxed),
        }
    }

    fn total(&self) -> u64 {
        self.handoff + self.buffer_full + self.spool + self.invalid + self.oversize
    }
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    /// The spool, its failures and retries.
    disk: Disk,
    /// Whether the buffer cap is being hit (to warn once per episode).
    capping: bool,
    /// Storing a loss report (its room is already made).
    reporting: bool,
    warned_invalid: bool,
    json: Vec<u8>,
    api: Vec<u8>,
    reported: Drops,
    window_start_ms: u64,
    last_report: Option<Instant>,
}

impl Writer {
    pub fn new(shared: Arc<Shared>) -> Writer {
        let c = &shared.config;
        let disk = Disk::new(
            "metrics reporter",
            "SCOPE_METRICS_BUFFER_PATH",
            c.buffer_path.clone(),
            c.spool.clone(),
            c.disk_retry,
        );
        Writer {
            shared,
            disk,
            capping: false,
            reporting: false,
            warned_invalid: false,
            json: Vec::with_capacity(1024),
            api: Vec::with_capacity(1024),
            reported: Drops::default(),
            window_start_ms: now_ms(),
            last_report: None,
        }
    }

    /// The writer thread's loop; returns once stopped and the handoff queue is empty.
    pub fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        loop {
            let mut n = 0u64;
            while let Some(event) = shared.handoff.pop() {
                self.store_event(&event);
                shared.handoff.done();
                n += 1;
                // Every 512 events, so a long burst does not wait for the loop's end.
                if n & 511 == 0 {
                    self.poke_sender();
                }
            }
            self.take_spool_drops();
            let stopping = shared.writer_stop.load(Relaxed) && shared.handoff.is_empty();
            self.maybe_report(stopping);
            if n > 0 || stopping {
                self.poke_sender();
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
    pub fn open_disk(&mut self) {
        let _ = self.disk();
    }

    fn poke_sender(&self) {
        let s = &self.shared;
        if s.flushers.load(Relaxed) > 0 || s.buffer.len() >= s.config.max_batch as u64 {
            s.wake.notify_one();
        }
    }

    fn store_event(&mut self, event: &Event) {
        self.json.clear();
        event.write_json(&mut self.json);
        self.api.clear();
        if let Err(e) = shape::api_event(&self.json, &mut self.api) {
            self.shared.counters.dropped_invalid.fetch_add(1, Relaxed);
            if !self.warned_invalid {
                self.warned_invalid = true;
                tracing::warn!(target: "reporter", id = %event.id(), error = %e,
                    "metrics reporter: dropping an event the metrics API cannot take (counted as dropped_invalid; warned once)");
            }
            return;
        }
        let limit = self.shared.config.max_body_bytes;
        if self.api.len() + self.shared.body.overhead(1) > limit {
            self.shared.counters.dropped_oversize.fetch_add(1, Relaxed);
            self.shared
                .counters
                .dropped_oversize_local
                .fetch_add(1, Relaxed);
            tracing::error!(target: "reporter", id = %event.id(), bytes = self.api.len(), limit,
                "metrics reporter: event alone is larger than a request may be; dropped (counted as dropped_oversize)");
            return;
        }
        let api = std::mem::take(&mut self.api);
        self.store(&api);
        self.api = api;
    }

    /// Stores one API event: the cap first, then disk, else memory.
    fn store(&mut self, bytes: &[u8]) {
        let s = Arc::clone(&self.shared);
        let c = &s.counters;
        let cap = s.config.max_buffer as u64;
        if self.reporting {
            // A loss report made its room already (see `maybe_report`).
        } else if s.buffer.len() >= cap {
            self.make_room(cap);
        } else if self.capping && s.buffer.len() < cap * 9 / 10 {
            self.capping = false;
        }
        if let Some(spool) = self.disk() {
            match spool.append(bytes) {
                Ok(_) => {
                    c.accepted.fetch_add(1, Relaxed);
                    return;
                }
                Err(SpoolError::RecordTooLarge { len, max }) => {
                    c.dropped_oversize.fetch_add(1, Relaxed);
                    c.dropped_oversize_local.fetch_add(1, Relaxed);
                    tracing::error!(target: "reporter", len, max,
                        "metrics reporter: event larger than the disk buffer takes; dropped (counted as dropped_oversize)");
                    return;
                }
                Err(e) => self.disk_failed(&e),
            }
        }
        s.buffer.push_mem(bytes.to_vec());
        c.accepted.fetch_add(1, Relaxed);
        c.accepted_memory.fetch_add(1, Relaxed);
    }

    /// The spool to append to, or `None` to use memory (see [`Disk::spool`]).
    fn disk(&mut self) -> Option<Arc<Spool>> {
        let s = Arc::clone(&self.shared);
        // The sender may have nothing else to do: tell it there is work on disk.
        self.disk
            .spool(&s.buffer, &s.counters.disk, || s.wake.notify_one())
    }

    fn disk_failed(&mut self, e: &SpoolError) {
        self.disk.failed(e, &self.shared.counters.disk);
    }

    fn take_spool_drops(&mut self) {
        Disk::take_spool_drops(&self.shared.buffer, &self.shared.counters.disk);
    }

    /// Enqueues a `telemetry_dropped` event for local drops since the last one, at most one per
    /// `report_interval` (and a final one when closing).
    fn maybe_report(&mut self, closing: bool) {
        let now = Drops::now(&self.shared);
        if now == self.reported {
            return;
        }
        let interval = self.shared.config.report_interval;
        if !closing && self.last_report.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        // Make room before counting, so the report's own displacement of an old event is in
        // this report rather than triggering another one (no report cycle at the cap).
        let cap = self.shared.config.max_buffer as u64;
        if self.shared.buffer.len() >= cap {
            self.make_room(cap);
        }
        let now = Drops::now(&self.shared);
        let prev = self.reported;
        let end_ms = now_ms();
        let fields = Fields::new()
            .meta("dropped", now.total() - prev.total())
            .meta("dropped_handoff", now.handoff - prev.handoff)
            .meta("dropped_buffer_full", now.buffer_full - prev.buffer_full)
            .meta("dropped_spool", now.spool - prev.spool)
            .meta("dropped_invalid", now.invalid - prev.invalid)
            .meta("dropped_oversize", now.oversize - prev.oversize)
            .meta("window_start_ms", self.window_start_ms)
            .meta("window_end_ms", end_ms)
            .meta("sink", "http_reporter")
            .meta("dropped_total", now.total());
        self.reported = now;
        self.window_start_ms = end_ms;
        self.last_report = Some(Instant::now());
        self.shared.counters.reports.fetch_add(1, Relaxed);
        tracing::warn!(target: "reporter", dropped = now.total() - prev.total(), dropped_total = now.total(),
            "metrics reporter: events were dropped locally; reporting them downstream as telemetry_dropped");
        self.reporting = true;
        self.store_event(&Event::Built(Box::new(Envelope::new(
            "telemetry_dropped",
            fields,
        ))));
        self.reporting = false;
    }

    /// Drops the oldest events (in memory first, see `dropped_buffer_full`) to get under `cap`.
    /// On disk in chunks of 1% of the cap: each drop is an `ack` (two fsyncs), which must not be
    /// paid per event.
    fn make_room(&mut self, cap: u64) {
        let s = Arc::clone(&self.shared);
        let chunk = if s.buffer.mem_len() > 0 {
            1
        } else {
            (cap as usize / 100).max(1)
        };
        match s.buffer.drop_oldest(chunk) {
            Ok(n) => {
                s.counters.dropped_buffer_full.fetch_add(n, Relaxed);
                if !self.capping {
                    self.capping = true;
                    tracing::warn!(target: "reporter", max_buffer = cap,
                        "metrics reporter: buffer full, dropping the oldest events in memory, else on disk (counted as dropped_buffer_full, reported as telemetry_dropped)");
                }
            }
            Err(e) => self.disk_failed(&e),
        }
    }
}
