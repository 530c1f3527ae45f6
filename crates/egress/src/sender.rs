//! The sender: reads batches from the buffer, hands them to the service, and applies what it
//! answered: remove, drop, retry after a backoff or a given wait, split, pause.
//!
//! It runs on its own thread with its own single-threaded tokio runtime, so the driver works
//! whatever runtime (if any) its caller uses, and its blocking disk reads and acks (fsyncs) never
//! stall anyone else's tasks.

use crate::batch::{Batch, State};
use crate::{Cx, Outcome, Service, Shared};
use rand::Rng;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long the sender waits for work when it sends without a flush interval.
const IDLE: Duration = Duration::from_millis(200);

pub(crate) struct Sender<S> {
    shared: Arc<Shared>,
    service: S,
    /// The current batch, split by `Outcome::Split`; the front part is sent next.
    parts: VecDeque<Batch>,
    /// The front part failed before and is being sent again.
    retrying: bool,
    /// Consecutive failures (the backoff exponent).
    failures: u32,
    /// No send before this (backoff or a service's wait).
    not_before: Option<Instant>,
    /// Paused by the service while the resume generation was this.
    paused_gen: Option<u64>,
    /// When the last batch was taken, for the flush interval.
    last_batch: Instant,
}

impl<S: Service> Sender<S> {
    pub fn new(shared: Arc<Shared>, service: S) -> Sender<S> {
        Sender {
            shared,
            service,
            parts: VecDeque::new(),
            retrying: false,
            failures: 0,
            not_before: None,
            paused_gen: None,
            last_batch: Instant::now(),
        }
    }

    /// Waits for a wake-up (new data, flush, resume, stop) or `until`.
    async fn wait(&self, until: Option<Instant>) {
        let s = &self.shared;
        match until {
            Some(t) => {
                tokio::select! {
                    _ = s.wake.notified() => {}
                    _ = s.stop.cancelled() => {}
                    _ = tokio::time::sleep_until(t) => {}
                }
            }
            None => {
                tokio::select! {
                    _ = s.wake.notified() => {}
                    _ = s.stop.cancelled() => {}
                }
            }
        }
    }

    pub async fn run(mut self) {
        let s = Arc::clone(&self.shared);
        let interval = s.config.flush_interval;
        let idle = if interval.is_zero() { IDLE } else { interval };
        // A flush cuts a backoff short once: the epoch it was cut for.
        let mut cut_for_epoch = s.flush_epoch.load(Relaxed);
        loop {
            if s.stop.is_cancelled() {
                return;
            }
            if let Some(g) = self.paused_gen {
                if s.generation.load(Relaxed) == g {
                    self.wait(None).await;
                    continue;
                }
                self.paused_gen = None;
                s.counters.paused.store(false, Relaxed);
                tracing::info!(target: "egress", sink = s.config.display, "{}: reconfigured; resuming sending", s.config.display);
            }
            if let Some(t) = self.not_before {
                let epoch = s.flush_epoch.load(Relaxed);
                let flush_cut = s.flushers.load(Relaxed) > 0 && epoch != cut_for_epoch;
                if Instant::now() < t && !flush_cut {
                    self.wait(Some(t)).await;
                    continue;
                }
                cut_for_epoch = epoch;
                self.not_before = None;
            }
            if self.parts.is_empty() {
                let force = s.flushers.load(Relaxed) > 0;
                let available = s.buffer.len();
                let due = self.last_batch.elapsed() >= interval;
                if available == 0 {
                    self.last_batch = Instant::now();
                    self.wait(Some(Instant::now() + idle)).await;
                    continue;
                }
                if !(force || due || self.retrying || available >= s.config.max_batch as u64) {
                    self.wait(Some(self.last_batch + interval)).await;
                    continue;
                }
                match s.buffer.peek(s.config.max_batch, s.config.max_batch_bytes) {
                    Ok(Some(oldest)) => self.parts.push_back(Batch::new(oldest)),
                    Ok(None) => {
                        self.wait(Some(Instant::now() + idle)).await;
                        continue;
                    }
                    Err(e) => {
                        s.counters.disk.disk_errors.fetch_add(1, Relaxed);
                        tracing::error!(target: "egress", sink = s.config.display, error = %e,
                            "{}: cannot read the disk buffer; retrying", s.config.display);
                        self.not_before = Some(Instant::now() + s.config.backoff_base);
                        continue;
                    }
                }
                self.last_batch = Instant::now();
            }
            self.send_front().await;
            s.progress();
        }
    }

    /// Sends the front part and applies the answer.
    async fn send_front(&mut self) {
        let s = Arc::clone(&self.shared);
        let generation = s.generation.load(Relaxed);
        if self.retrying {
            s.counters.retries.fetch_add(1, Relaxed);
        }
        let cx = Cx {
            shared: &s,
            retry: self.retrying,
        };
        let Some(part) = self.parts.front_mut() else {
            return;
        };
        let outcome = tokio::select! {
            o = self.service.send(part, &cx) => o,
            _ = s.stop.cancelled() => return,
        };
        match outcome {
            Outcome::Delivered => {
                part.resolve_pending(State::Delivered);
                self.failures = 0;
                self.resolve_front().await;
            }
            Outcome::Dropped(reason) => {
                part.resolve_pending(State::Dropped(reason));
                self.resolve_front().await;
            }
            Outcome::Retry(after) => {
                if part.pending_count() == 0 {
                    // The service resolved every record itself.
                    self.failures = 0;
                    self.resolve_front().await;
                    return;
                }
                // Partial progress: send the rest of this batch again. None: forget the in-hand
                // parts, so the retry re-reads the buffer's head (events the cap dropped
                // meanwhile are then not sent, and not counted twice).
                if !part.progressed() {
                    self.parts.clear();
                }
                self.retrying = true;
                let wait = match after {
                    Some(d) => d,
                    None => self.backoff(),
                };
                self.not_before = Some(Instant::now() + wait);
                tracing::debug!(target: "egress", sink = s.config.display, retry_in = ?wait, "keeping the batch for a retry");
            }
            Outcome::Split if part.len() > 1 => {
                self.retrying = false;
                let back = part.split_off_back();
                self.parts.insert(1, back);
            }
            Outcome::Split => {
                tracing::error!(target: "egress", sink = s.config.display, "the service asked to split a single record; retrying it");
                self.retrying = true;
                let wait = self.backoff();
                self.not_before = Some(Instant::now() + wait);
            }
            Outcome::Pause => {
                self.parts.clear();
                self.retrying = true;
                self.paused_gen = Some(generation);
                s.counters.paused.store(true, Relaxed);
            }
        }
    }

    /// Removes the resolved front part from the buffer and counts what became of its records.
    /// A failed removal is retried (not removing would send the batch again: duplicates).
    async fn resolve_front(&mut self) {
        let s = Arc::clone(&self.shared);
        let Some(part) = self.parts.pop_front() else {
            return;
        };
        self.retrying = false;
        let removed = loop {
            match s.buffer.remove_through(part.source(), part.last_key()) {
                Ok(removed) => break removed,
                Err(e) => {
                    s.counters.disk.disk_errors.fetch_add(1, Relaxed);
                    tracing::error!(target: "egress", sink = s.config.display, error = %e, events = part.len(),
                        "{}: cannot record a resolved batch in the disk buffer; retrying", s.config.display);
                    self.wait(Some(Instant::now() + s.config.backoff_base))
                        .await;
                    if s.stop.is_cancelled() {
                        // It stays on disk and is sent again by the next start.
                        return;
                    }
                }
            }
        };
        // The cap may have dropped the oldest records of the batch meanwhile (counted as
        // dropped_buffer_full then): each record is counted once, so those are skipped here.
        let missing = part.len().saturating_sub(removed as usize);
        let mut delivered = 0u64;
        for state in part.states().iter().skip(missing) {
            match state {
                State::Delivered => delivered += 1,
                State::Dropped(reason) => s.count_drop(reason, 1),
                State::Pending => {}
            }
        }
        s.counters.delivered.fetch_add(delivered, Relaxed);
    }

    /// The wait after a failure: base doubling per consecutive failure to max, with jitter.
    fn backoff(&mut self) -> Duration {
        let cfg = &self.shared.config;
        let exp = self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        let base = cfg
            .backoff_base
            .saturating_mul(1u32 << exp)
            .min(cfg.backoff_max);
        // +-20% jitter, so many clients do not retry in lockstep; never beyond the cap.
        let factor = rand::thread_rng().gen_range(0.8..1.2);
        base.mul_f64(factor).min(cfg.backoff_max)
    }
}
