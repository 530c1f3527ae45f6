//! The writer thread: moves events from the handoff queue into the buffer (disk, else memory)
//! through the service's encoder, keeps the buffer under its cap, falls back to memory and back
//! to disk, and reports local drops as `telemetry_dropped` events through the same buffer.

use crate::buffer::Disk;
use crate::{Cap, Encoder, Reason, Shared};
use spool::{Spool, SpoolError};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::{now_ms, Envelope, Event, Fields};

/// How long the writer sleeps when there is nothing to do (it is woken by `emit`).
const IDLE: Duration = Duration::from_millis(100);

pub(crate) struct Writer<E> {
    shared: Arc<Shared>,
    encoder: E,
    /// The spool, its failures and retries.
    disk: Disk,
    /// Whether the cap is being hit (to warn once per episode).
    capping: bool,
    /// Storing a loss report (its room is already made).
    reporting: bool,
    record: Vec<u8>,
    /// The reported drop counters at the last report: handoff, buffer cap, spool, then the
    /// reported reasons.
    reported: Vec<u64>,
    window_start_ms: u64,
    last_report: Option<Instant>,
}

impl<E: Encoder> Writer<E> {
    pub fn new(shared: Arc<Shared>, encoder: E) -> Writer<E> {
        let c = &shared.config;
        let disk = Disk::new(
            c.display,
            c.buffer_setting,
            c.buffer_path.clone(),
            c.spool.clone(),
            c.disk_retry,
        );
        let reported = vec![0; 3 + shared.reasons.len()];
        Writer {
            shared,
            encoder,
            disk,
            capping: false,
            reporting: false,
            record: Vec::with_capacity(1024),
            reported,
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
                if n.is_multiple_of(512) {
                    self.poke_sender();
                }
            }
            Disk::take_spool_drops(&shared.buffer, &shared.counters.disk);
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

    /// Wakes the sender when it has something to do now: a flush waits, a full batch is
    /// buffered, or it sends without waiting for a flush interval.
    fn poke_sender(&self) {
        let s = &self.shared;
        if s.flushers.load(Relaxed) > 0
            || s.config.flush_interval.is_zero()
            || s.buffer.len() >= s.config.max_batch as u64
        {
            s.wake.notify_one();
        }
    }

    fn store_event(&mut self, event: &Event) {
        let mut record = std::mem::take(&mut self.record);
        record.clear();
        match self.encoder.encode(event, &mut record) {
            Ok(()) => self.store(&record),
            Err(reason) => self.shared.count_drop(reason, 1),
        }
        self.record = record;
    }

    /// Stores one record: disk, else memory, within the cap.
    fn store(&mut self, bytes: &[u8]) {
        let s = Arc::clone(&self.shared);
        let c = &s.counters;
        if matches!(s.config.cap, Cap::Buffered(_)) {
            self.keep_under_cap();
        }
        if let Some(spool) = self.disk() {
            match spool.append(bytes) {
                Ok(_) => {
                    c.accepted.fetch_add(1, Relaxed);
                    return;
                }
                Err(SpoolError::RecordTooLarge { len, max }) => {
                    s.count_drop(&Reason::OVERSIZE, 1);
                    tracing::error!(target: "egress", sink = s.config.display, len, max,
                        "{}: event larger than the disk buffer takes; dropped (counted as dropped_oversize)", s.config.display);
                    return;
                }
                Err(e) => self.disk.failed(&e, &s.counters.disk),
            }
        }
        if matches!(s.config.cap, Cap::Memory(_)) {
            self.keep_under_cap();
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

    /// What the cap counts now, and the cap.
    fn cap_usage(&self) -> (u64, u64) {
        let b = &self.shared.buffer;
        match self.shared.config.cap {
            Cap::Buffered(cap) => (b.len(), cap as u64),
            Cap::Memory(cap) => (b.mem_len(), cap as u64),
        }
    }

    /// Makes room for one more record when at the cap (not for a loss report: it made its room
    /// before counting, see `maybe_report`).
    fn keep_under_cap(&mut self) {
        if self.reporting {
            return;
        }
        let (n, cap) = self.cap_usage();
        if n >= cap {
            self.make_room(cap);
        } else if self.capping && n < cap * 9 / 10 {
            self.capping = false;
        }
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
                    tracing::warn!(target: "egress", sink = s.config.display, cap,
                        "{}: buffer full, dropping the oldest events (counted as dropped_buffer_full, reported as telemetry_dropped)",
                        s.config.display);
                }
            }
            Err(e) => self.disk.failed(&e, &s.counters.disk),
        }
    }

    /// The reported drop counters now: handoff, buffer cap, spool, then the reported reasons.
    fn reported_now(&self) -> Vec<u64> {
        let s = &self.shared;
        let c = &s.counters;
        let mut v = vec![
            s.handoff.dropped.load(Relaxed),
            c.dropped_buffer_full.load(Relaxed),
            c.disk.dropped_spool.load(Relaxed),
        ];
        for (r, n) in s.reasons.iter().zip(&c.drops) {
            v.push(if r.reported { n.load(Relaxed) } else { 0 });
        }
        v
    }

    /// Stores a `telemetry_dropped` event for local drops since the last one, at most one per
    /// `report_interval` (and a final one when closing).
    fn maybe_report(&mut self, closing: bool) {
        if self.reported_now() == self.reported {
            return;
        }
        let interval = self.shared.config.report_interval;
        if !closing && self.last_report.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        // Make room before counting, so the report's own displacement of an old event is in
        // this report rather than triggering another one (no report cycle at the cap).
        let (n, cap) = self.cap_usage();
        if n >= cap {
            self.make_room(cap);
        }
        let now = self.reported_now();
        let delta: Vec<u64> = now.iter().zip(&self.reported).map(|(a, b)| a - b).collect();
        let total: u64 = now.iter().sum();
        let end_ms = now_ms();
        let s = Arc::clone(&self.shared);
        let mut fields = Fields::new()
            .meta("dropped", delta.iter().sum::<u64>())
            .meta("dropped_handoff", delta[0])
            .meta("dropped_buffer_full", delta[1])
            .meta("dropped_spool", delta[2]);
        for (r, d) in s.reasons.iter().zip(&delta[3..]) {
            if r.reported {
                fields = fields.meta(format!("dropped_{}", r.name), *d);
            }
        }
        let fields = fields
            .meta("window_start_ms", self.window_start_ms)
            .meta("window_end_ms", end_ms)
            .meta("sink", s.config.sink)
            .meta("dropped_total", total);
        tracing::warn!(target: "egress", sink = s.config.display, dropped = delta.iter().sum::<u64>(), dropped_total = total,
            "{}: events were dropped; reporting them downstream as telemetry_dropped", s.config.display);
        self.reported = now;
        self.window_start_ms = end_ms;
        self.last_report = Some(Instant::now());
        s.counters.reports.fetch_add(1, Relaxed);
        self.reporting = true;
        self.store_event(&Event::Built(Box::new(Envelope::new(
            "telemetry_dropped",
            fields,
        ))));
        self.reporting = false;
    }
}
