//! The HTTP metrics reporter: a telemetry sink that delivers every event it accepted to
//! `POST /v1/metrics`, at least once, across crashes.
//!
//! It is one service of the buffered-egress driver ([`egress`]), which owns the handoff, the
//! disk buffer with its memory fallback, batching, retries and loss reports. This crate is the
//! part that is about the metrics API, in one file each:
//! - `config`: the seed's `SCOPE_METRICS_*` settings ([`ReporterConfig`]);
//! - `encoding`: an envelope becomes the API event the driver stores (mapped as the seed maps
//!   it), bodies by concatenation;
//! - `service`: one POST per batch, and its answer classified by the response contract below;
//! - `seed`: the seed's buffer file (`SCOPE_METRICS_BUFFER_PATH`), imported once at start.
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
//! [`Reporter`] dereferences to its [`Driver`]: `emit`, `flush_timeout` and the telemetry
//! `Sink` methods are the driver's; [`Reporter::sink`] gives it as an `Arc<dyn Sink>`.
//!
//! # Durability: what survives what (the loss window)
//!
//! * **Before it is accepted** an event lives only in memory: in the handoff queue, for the
//!   microseconds to milliseconds it takes the writer thread to append it. A `kill -9` in that
//!   window loses it. [`egress::DriverStats::accepted`] counts events past this point;
//!   [`egress::DriverStats::handoff_pending`] is the window's current content.
//! * **Accepted on disk** (`Spool::append` returned): the record was written to the kernel with
//!   one `pwrite`, so it survives a crash or `kill -9` of the process. It survives a power loss
//!   or kernel crash once the spool's group commit fsynced it: with the default
//!   [`spool::SyncPolicy`] at most 10 ms (or 1 MiB) after the append. That group-commit interval
//!   is the power-loss window; choose `SyncPolicy::Always` in [`ReporterConfig::spool`] to close
//!   it at the cost of one fsync per event.
//! * **Accepted in memory** (the disk failed: unwritable directory, disk full, directory locked by
//!   another process): kept within `max_buffer`, lost on a crash, moved to disk as soon as the
//!   disk works again. [`egress::DriverStats::accepted_memory`] counts them; the failure is logged once.
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
//! | 5xx, network error (a refused TLS certificate too, logged as one) | keeps the batch, waits 1 s doubling to 60 s (+-20% jitter) |
//! | anything else (3xx, 404...) | as 5xx: keeps and backs off (a misconfigured URL must not lose data) |
//!
//! An `https://` endpoint is verified against the system's roots plus, with
//! `SCOPE_METRICS_CA_FILE` ([`ReporterConfig::ca_file`]), the certificates of that PEM file.
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

mod config;
mod encoding;
mod seed;
mod service;
mod stats;

pub use config::{
    default_buffer_path, hostname, seed_default_buffer_file, spool_beside, ConfigError, GzipMode,
    ReporterConfig, DEFAULT_URL, MAX_BATCH_EVENTS, MAX_BODY_BYTES,
};
pub use egress::FlushOutcome;
pub use encoding::{api_event, BodyBuilder, ShapeError};
pub use stats::ReporterStats;

use egress::{Cap, Driver, DriverConfig, Reason};
use parking_lot::Mutex;
use stats::HttpCounters;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

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

/// Every reason the reporter drops an event for, in the order loss reports list them.
const DROPS: &[Reason] = &[
    encoding::INVALID,
    Reason::OVERSIZE,
    service::REFUSED_400,
    service::REFUSED_413,
];

/// What the service shares with the reporter's handle: the settings, the key, the counters.
pub(crate) struct Http {
    config: ReporterConfig,
    /// The Bearer token; replaced by [`Reporter::set_api_key`].
    api_key: Mutex<String>,
    counters: HttpCounters,
    /// What was imported from the seed's buffer file at start.
    seed: seed::Imported,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config's own Debug hides the key; the live key is left out.
        self.config.fmt(f)
    }
}

/// The HTTP metrics reporter sink. See the crate docs.
#[derive(Debug)]
pub struct Reporter {
    driver: Arc<Driver>,
    http: Arc<Http>,
}

egress::deref_driver!(handle Reporter);

impl Reporter {
    /// Starts the driver with the metrics API service. Opens (and recovers) the disk buffer
    /// first; a disk that cannot be used is logged and replaced by memory, never a reason to fail.
    pub fn start(config: ReporterConfig) -> Result<Reporter, ReporterError> {
        config.validate()?;
        let body = BodyBuilder::new(&config.app, &config.host);
        let driver_config = DriverConfig {
            sink: "http_reporter",
            display: "metrics reporter",
            buffer_setting: "SCOPE_METRICS_BUFFER_PATH",
            buffer_path: config.buffer_path.clone(),
            spool: config.spool.clone(),
            cap: Cap::Buffered(config.max_buffer),
            handoff_capacity: config.handoff_capacity,
            disk_retry: config.disk_retry,
            report_interval: config.report_interval,
            flush_interval: config.flush_interval,
            flush_timeout: config.flush_timeout,
            max_batch: config.max_batch,
            max_batch_bytes: config
                .max_body_bytes
                .saturating_sub(body.overhead(config.max_batch))
                .max(1),
            backoff_base: config.backoff_base,
            backoff_max: config.backoff_max,
            drops: DROPS,
        };
        let encoder = encoding::ApiEncoder::new(&body, config.max_body_bytes);
        // Before the driver opens (and locks) the disk buffer, which then sends these first.
        let seed = seed::import(
            &config,
            config.max_body_bytes.saturating_sub(body.overhead(1)),
        );
        let http = Arc::new(Http {
            api_key: Mutex::new(config.api_key.clone()),
            counters: HttpCounters::default(),
            seed,
            config,
        });
        let extra_roots = match &http.config.ca_file {
            Some(path) => tls::load_ca(path).map_err(|e| {
                ReporterError::Config(ConfigError::Invalid(format!("SCOPE_METRICS_CA_FILE: {e}")))
            })?,
            None => Vec::new(),
        };
        let service = service::HttpService::new(Arc::clone(&http), body, &extra_roots)
            .map_err(|e| ReporterError::Start(format!("HTTP client: {e}")))?;
        let driver = Driver::start(driver_config, encoder, service)
            .map_err(|e| ReporterError::Start(e.to_string()))?;
        let c = &http.config;
        tracing::info!(target: "reporter", url = %c.url, buffer = ?c.buffer_path, max_buffer = c.max_buffer,
            flush_interval = ?c.flush_interval, "metrics reporter started");
        Ok(Reporter {
            driver: Arc::new(driver),
            http,
        })
    }

    /// Replaces the API key (e.g. reloaded on SIGHUP); resumes sending if a 401 paused it.
    /// Setting the same key again also counts as a change (an operator fixed it server-side).
    pub fn set_api_key(&self, key: impl Into<String>) {
        *self.http.api_key.lock() = key.into();
        self.driver.resume();
    }

    /// All counters now.
    pub fn reporter_stats(&self) -> ReporterStats {
        ReporterStats::new(self.driver.driver_stats(), &self.http)
    }

    /// The disk buffer's directory, if configured.
    pub fn buffer_path(&self) -> Option<&Path> {
        self.http.config.buffer_path.as_deref()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ReporterConfig {
        &self.http.config
    }

    /// Flushes for up to `timeout`, then stops; what is left stays on disk for the next start
    /// (see [`Driver::shutdown`]). Idempotent; returns the final counters.
    pub fn shutdown(&self, timeout: Duration) -> ReporterStats {
        ReporterStats::new(self.driver.shutdown(timeout), &self.http)
    }
}
