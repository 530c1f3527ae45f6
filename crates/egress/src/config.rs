//! [`DriverConfig`]: what the driver needs to know about a service, and [`Reason`], why a record
//! may be dropped.

use spool::SpoolOptions;
use std::path::PathBuf;
use std::time::Duration;

/// Where disk buffers live unless configured: `$XDG_STATE_HOME/trickle-relay`, else
/// `~/.local/state/trickle-relay`, else under the temp dir. A state directory rather than the temp
/// dir by preference, because a reboot must not lose buffered events.
pub fn state_dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local").join("state"))
        })
        .unwrap_or_else(std::env::temp_dir);
    base.join("trickle-relay")
}

/// Why records were dropped: a counter (`dropped_<name>` in loss reports) and whether the loss is
/// reported downstream as `telemetry_dropped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reason {
    /// Short name, unique per driver, e.g. `invalid`, `oversize`, `rejected`.
    pub name: &'static str,
    /// Reported downstream: a local loss. False for refusals the destination itself decided (it
    /// knows of them).
    pub reported: bool,
}

impl Reason {
    /// Too large to store or to send, decided locally. The driver uses it for records the disk
    /// buffer refuses as too large; every driver counts it.
    pub const OVERSIZE: Reason = Reason {
        name: "oversize",
        reported: true,
    };
}

/// How many events the buffer holds before the oldest are dropped (counted as
/// `dropped_buffer_full`, reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// Events buffered in all, disk and memory alike: past it the oldest go, in memory first
    /// (lost on a crash anyway, and dropping them needs no disk write, which a full disk could
    /// refuse), then on disk in chunks of 1% of the cap.
    Buffered(usize),
    /// Events in memory only (the disk fallback); the disk buffer is bounded by its byte cap
    /// (`SpoolOptions::max_bytes`).
    Memory(usize),
}

/// The driver's settings. The service's own config builds one.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// The sink's name: [`telemetry::Sink::name`] and the `sink` field of its loss reports, e.g.
    /// `http_reporter`.
    pub sink: &'static str,
    /// The sink in log lines, e.g. `metrics reporter`.
    pub display: &'static str,
    /// The setting that names the disk buffer directory, for error messages.
    pub buffer_setting: &'static str,
    /// The disk buffer directory; `None`: a bounded memory buffer only (lost on a crash).
    pub buffer_path: Option<PathBuf>,
    /// Options of the disk buffer (size cap, sync policy).
    pub spool: SpoolOptions,
    /// The buffer's event cap.
    pub cap: Cap,
    /// Events that may wait between `emit` and the buffer; when full, `emit` drops and counts.
    pub handoff_capacity: usize,
    /// How long after a disk failure the disk is tried again.
    pub disk_retry: Duration,
    /// Least time between two `telemetry_dropped` reports.
    pub report_interval: Duration,
    /// Longest wait before a partial batch is sent; zero: send as soon as anything is buffered.
    pub flush_interval: Duration,
    /// How long [`telemetry::Sink::flush`] tries to deliver what is buffered.
    pub flush_timeout: Duration,
    /// Most records per batch.
    pub max_batch: usize,
    /// Most record bytes per batch (a lone larger record still goes alone).
    pub max_batch_bytes: usize,
    /// First wait after a failure ([`crate::Outcome::Retry`] without a wait); doubles per
    /// consecutive failure.
    pub backoff_base: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
    /// The reasons the encoder and the service drop records for, in the order loss reports list
    /// them ([`Reason::OVERSIZE`] is added when missing).
    pub drops: &'static [Reason],
}

impl DriverConfig {
    /// Checks the ranges the driver relies on; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let cap = match self.cap {
            Cap::Buffered(n) | Cap::Memory(n) => n,
        };
        let checks = [
            (cap == 0, "the buffer cap must be at least 1"),
            (
                self.handoff_capacity == 0,
                "handoff_capacity must be at least 1",
            ),
            (self.max_batch == 0, "max_batch must be at least 1"),
            (
                self.max_batch_bytes == 0,
                "max_batch_bytes must be at least 1",
            ),
            (
                self.backoff_base.is_zero() || self.backoff_max < self.backoff_base,
                "backoff_base must be above 0 and at most backoff_max",
            ),
        ];
        match checks.iter().find(|(bad, _)| *bad) {
            Some((_, why)) => Err(format!("{}: {why}", self.display)),
            None => Ok(()),
        }
    }
}
