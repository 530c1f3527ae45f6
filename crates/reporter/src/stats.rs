//! The reporter's counters: every outcome of every event (kept by the driver) and every request
//! (kept by the service).

use crate::encoding::INVALID;
use crate::service::{REFUSED_400, REFUSED_413};
use egress::{DriverStats, Reason};
use serde::Serialize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};

/// The service's own counters (the driver keeps the rest).
#[derive(Debug, Default)]
pub(crate) struct HttpCounters {
    pub requests: AtomicU64,
    pub sent: AtomicU64,
    pub splits_413: AtomicU64,
    pub status_2xx: AtomicU64,
    pub status_400: AtomicU64,
    pub status_413: AtomicU64,
    pub status_401: AtomicU64,
    pub status_429: AtomicU64,
    pub status_5xx: AtomicU64,
    pub status_other: AtomicU64,
    pub network_errors: AtomicU64,
    pub gzip: AtomicBool,
}

/// A point-in-time copy of the reporter's counters: the driver's (events emitted, accepted,
/// buffered, dropped..., reached through `Deref`: `stats.buffered`, `stats.dropped()`) and the
/// service's (requests and answers). All monotonic except the "now" gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReporterStats {
    /// The driver's counters.
    #[serde(flatten)]
    pub driver: DriverStats,
    /// Requests made.
    pub requests: u64,
    /// Events in those requests (an event re-sent counts again).
    pub sent: u64,
    /// Events removed from the buffer by a 200 (the driver's `delivered`).
    pub acked: u64,
    /// Batches split in halves after a 413.
    pub splits_413: u64,
    /// Events that are not sendable envelopes (no string id, no object data).
    pub dropped_invalid: u64,
    /// Events too large for any request: refused at store time, or alone answered 413.
    pub dropped_oversize: u64,
    /// Events in batches answered 400 (malformed), dropped.
    pub dropped_400: u64,
    /// 2xx answers (the batch delivered).
    pub status_2xx: u64,
    /// 400 answers (the batch malformed, dropped).
    pub status_400: u64,
    /// 413 answers (the batch split, or a lone event dropped).
    pub status_413: u64,
    /// 401 answers (sending pauses until the API key changes).
    pub status_401: u64,
    /// 429 answers.
    pub status_429: u64,
    /// 5xx answers.
    pub status_5xx: u64,
    /// Other unexpected answers (3xx, other 4xx): kept and retried with backoff.
    pub status_other: u64,
    /// Requests that failed without an answer (connect, timeout, reset).
    pub network_errors: u64,
    /// Now: request bodies are gzip-compressed.
    pub gzip: bool,
    /// Events imported at start from the seed's buffer file (`SCOPE_METRICS_BUFFER_PATH`); they
    /// are also in `recovered`.
    pub seed_imported: u64,
    /// Lines of the seed's buffer file skipped at start: not a sendable API event.
    pub seed_skipped: u64,
}

egress::deref_driver!(stats ReporterStats);

impl ReporterStats {
    /// The driver's counters and the service's, as one.
    pub(crate) fn new(driver: DriverStats, http: &crate::Http) -> ReporterStats {
        let c = &http.counters;
        let by = |r: &Reason| driver.dropped_by(r.name);
        ReporterStats {
            requests: c.requests.load(Relaxed),
            sent: c.sent.load(Relaxed),
            acked: driver.delivered,
            splits_413: c.splits_413.load(Relaxed),
            dropped_invalid: by(&INVALID),
            dropped_oversize: by(&Reason::OVERSIZE) + by(&REFUSED_413),
            dropped_400: by(&REFUSED_400),
            status_2xx: c.status_2xx.load(Relaxed),
            status_400: c.status_400.load(Relaxed),
            status_413: c.status_413.load(Relaxed),
            status_401: c.status_401.load(Relaxed),
            status_429: c.status_429.load(Relaxed),
            status_5xx: c.status_5xx.load(Relaxed),
            status_other: c.status_other.load(Relaxed),
            network_errors: c.network_errors.load(Relaxed),
            gzip: c.gzip.load(Relaxed),
            seed_imported: http.seed.events,
            seed_skipped: http.seed.skipped,
            driver,
        }
    }
}
