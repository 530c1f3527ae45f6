//! The client's egress: which sink relayed telemetry goes to, built from a choice and the seed's
//! environment variables.
//!
//! [`open`] turns an [`EgressChoice`] into a running sink: `auto` follows the environment in the
//! spec's order (`SCOPE_TELEMETRY_LOG_SINK`, then `SCOPE_CLOUD_API_KEY`, then
//! `KAFKA_BOOTSTRAP_SERVERS`, see [`telemetry::select_from_env`]), honouring
//! `SCOPE_TELEMETRY_DISABLED` / `DO_NOT_TRACK`.
//!
//! **The opt-out wins over every choice.** With `SCOPE_TELEMETRY_DISABLED` or `DO_NOT_TRACK` set
//! (precedence in `telemetry::egress`), [`open`] builds no sink whatever the choice: no file is
//! opened, no reporter or Kafka producer starts (so nothing a previous run left on disk is sent
//! either). It says once which variable turned telemetry off; the client still relays control and
//! counts every envelope it discards (`ClientReport::discarded`).
//!
//! **Draining at exit.** [`EgressSinks::drain`] keeps a buffered egress (the reporter, the Kafka
//! sink) sending for a bounded time once the session is over, reporting progress, and stops early
//! when told to; what is still buffered then stays on disk, where the next start sends it first
//! ([`Drained`] says exactly how many and where).
//!
//! The HTTP metrics reporter buffers on disk beside the seed's buffer file
//! (`SCOPE_METRICS_BUFFER_PATH`), imports what the seed left in that file, and re-sends what a
//! previous run left on disk, on start; its API key
//! comes from a key file or `SCOPE_CLOUD_API_KEY`, and [`reload_api_key_on_sighup`] re-reads it.
//! The Kafka sink does the same with `SCOPE_KAFKA_BUFFER_PATH`.

use crate::accounting::Accounting;
use anyhow::{bail, Context as _};
use egress::{Driver, DriverStats, FlushOutcome};
use reporter::{Reporter, ReporterConfig};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::sinks::{FileSink, LogSink};
use telemetry::{Egress, Sink};
use tokio_util::sync::CancellationToken;

/// Where relayed telemetry goes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EgressChoice {
    /// From the environment, in the spec's order.
    Auto,
    /// One `TELEMETRY ...` log line per event.
    Log,
    /// Each envelope's exact JSON, one per line, appended to `--egress-file`.
    File,
    /// The HTTP metrics reporter (`DAYDREAM_METRICS_URL`, `SCOPE_CLOUD_API_KEY`, `SCOPE_METRICS_*`).
    Http,
    /// The Kafka sink (`KAFKA_BOOTSTRAP_SERVERS`, `KAFKA_TOPIC`, `KAFKA_SASL_*`, `SCOPE_KAFKA_*`).
    Kafka,
    /// Count and discard.
    None,
}

impl EgressChoice {
    /// The flag value, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            EgressChoice::Auto => "auto",
            EgressChoice::Log => "log",
            EgressChoice::File => "file",
            EgressChoice::Http => "http",
            EgressChoice::Kafka => "kafka",
            EgressChoice::None => "none",
        }
    }
}

/// The running egress: the sink (none: count and discard) and, when it is the HTTP reporter, the
/// reporter itself (for its key reload, its counters and its shutdown).
#[derive(Clone, Default)]
pub struct EgressSinks {
    /// Where relayed telemetry goes.
    pub sink: Option<Arc<dyn Sink>>,
    /// The HTTP metrics reporter, when it is the sink.
    pub reporter: Option<Arc<Reporter>>,
    /// The buffered-egress driver under the sink (the reporter's or the Kafka sink's), for its
    /// flush, shutdown and full counters.
    pub driver: Option<DriverHandle>,
    /// The Kafka sink, when it is the sink (for its producer's counters).
    pub kafka: Option<Arc<kafka::KafkaSink>>,
}

/// A handle that reaches a buffered-egress driver (a `Reporter`, a `KafkaSink`).
pub type DriverHandle = Arc<dyn Deref<Target = Driver> + Send + Sync>;

/// How [`EgressSinks::drain`] ended, and what it left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drained {
    /// Why it stopped sending.
    pub stop: DrainStop,
    /// Events left in the disk buffer, sent first by the next start on the same buffer path.
    pub left_on_disk: u64,
    /// Events left in memory (the disk was unusable): lost at exit.
    pub left_in_memory: u64,
    /// The disk buffer's directory, and the setting that names it.
    pub buffer: Option<(PathBuf, &'static str)>,
    /// What became of the telemetry handed to the egress, once it stopped (`None`: no egress).
    pub telemetry: Option<Accounting>,
}

/// Why a drain stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DrainStop {
    /// Everything was delivered (or there was nothing to drain: an unbuffered sink, or none).
    #[default]
    Delivered,
    /// The destination paused sending (e.g. it refused the API key).
    Paused,
    /// The time allowed ran out.
    TimedOut,
    /// Told to stop (a second signal).
    Stopped,
}

/// One progress report of [`EgressSinks::drain`], about once a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainProgress {
    /// Events still to deliver.
    pub left: u64,
    /// Events delivered since the previous report.
    pub delivered: u64,
    /// Time left of the drain.
    pub remaining: Duration,
}

/// Starts the egress `choice` names (`file`: the path of [`EgressChoice::File`]; `api_key_file`:
/// the reporter's key, instead of `SCOPE_CLOUD_API_KEY`).
pub fn open(
    choice: EgressChoice,
    file: Option<&Path>,
    api_key_file: Option<&Path>,
) -> anyhow::Result<EgressSinks> {
    if let Some(by) = telemetry::egress::opted_out_by(|k| std::env::var(k).ok()) {
        tracing::warn!(
            "telemetry disabled by {by}: relayed telemetry is counted and discarded, whatever --egress says ({}); control messages are still relayed",
            choice.as_str()
        );
        telemetry::set_telemetry_enabled(false);
        return Ok(EgressSinks::default());
    }
    let http = || -> anyhow::Result<EgressSinks> {
        let r = start_reporter(api_key_file)?;
        Ok(EgressSinks {
            sink: Some(r.sink()),
            driver: Some(r.clone()),
            reporter: Some(r),
            kafka: None,
        })
    };
    let kafka = || -> anyhow::Result<EgressSinks> {
        let k = Arc::new(start_kafka_sink()?);
        Ok(EgressSinks {
            sink: Some(k.sink()),
            driver: Some(k.clone()),
            reporter: None,
            kafka: Some(k),
        })
    };
    let plain = |sink: Arc<dyn Sink>| EgressSinks {
        sink: Some(sink),
        ..EgressSinks::default()
    };
    Ok(match choice {
        EgressChoice::Http => http()?,
        EgressChoice::Kafka => kafka()?,
        EgressChoice::Log => plain(Arc::new(LogSink::new())),
        EgressChoice::None => EgressSinks::default(),
        EgressChoice::File => {
            let Some(path) = file else {
                bail!("--egress file needs --egress-file PATH");
            };
            let sink = FileSink::create(path)
                .with_context(|| format!("cannot open the egress file {}", path.display()))?;
            plain(Arc::new(sink))
        }
        EgressChoice::Auto => match telemetry::select_from_env() {
            Egress::Log => plain(Arc::new(LogSink::new())),
            Egress::HttpReporter => http()?,
            Egress::Kafka => kafka()?,
            Egress::None => {
                tracing::info!("no telemetry egress configured (set SCOPE_TELEMETRY_LOG_SINK=1 to log events); relayed events are counted and discarded");
                EgressSinks::default()
            }
            // Answered above: an opt-out returns before any sink is built.
            Egress::Disabled { .. } => EgressSinks::default(),
        },
    })
}

/// Starts the Kafka sink from the environment (`kafka::KafkaConfig::from_env`): its disk buffer
/// (`SCOPE_KAFKA_BUFFER_PATH`) is produced first if a previous run left events there.
pub fn start_kafka() -> anyhow::Result<Arc<dyn Sink>> {
    Ok(start_kafka_sink()?.sink())
}

fn start_kafka_sink() -> anyhow::Result<kafka::KafkaSink> {
    let config = kafka::KafkaConfig::from_env().context("invalid Kafka sink settings")?;
    kafka::KafkaSink::start(config).context("cannot start the Kafka sink")
}

/// Starts the HTTP metrics reporter from the environment (`ReporterConfig::from_env`), with the
/// key from `api_key_file` when given.
pub fn start_reporter(api_key_file: Option<&Path>) -> anyhow::Result<Arc<Reporter>> {
    let mut config = ReporterConfig::from_env().context("invalid metrics reporter settings")?;
    if let Some(path) = api_key_file {
        config.api_key = read_api_key(path)?;
    }
    if config.api_key.trim().is_empty() {
        bail!("the HTTP metrics reporter needs an API key: set SCOPE_CLOUD_API_KEY or pass --api-key-file FILE");
    }
    let reporter = Reporter::start(config).context("cannot start the HTTP metrics reporter")?;
    Ok(Arc::new(reporter))
}

/// The first non-empty line of `path`, trimmed.
fn read_api_key(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the API key file {}", path.display()))?;
    match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(k) => Ok(k.to_owned()),
        None => bail!(
            "the API key file {} is empty; write the key on its first line",
            path.display()
        ),
    }
}

/// On SIGHUP, re-reads the API key (from `file`, else `SCOPE_CLOUD_API_KEY`) into the reporter;
/// a reporter paused by a 401 resumes with it. Call from within a tokio runtime.
pub fn reload_api_key_on_sighup(reporter: Arc<Reporter>, file: Option<PathBuf>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; the API key will not be reloaded");
            return;
        };
        while hup.recv().await.is_some() {
            let key = match &file {
                Some(path) => read_api_key(path),
                None => std::env::var("SCOPE_CLOUD_API_KEY")
                    .map(|k| k.trim().to_owned())
                    .ok()
                    .filter(|k| !k.is_empty())
                    .context("SCOPE_CLOUD_API_KEY is not set"),
            };
            match key {
                Ok(k) => {
                    reporter.set_api_key(k);
                    tracing::info!("SIGHUP: metrics API key reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "SIGHUP: metrics API key NOT reloaded")
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (reporter, file);
}

impl EgressSinks {
    /// Delivers what the sink still holds before its counters are read: the reporter sends what
    /// is buffered (within its flush timeout; the rest stays on disk for the next start), another
    /// sink flushes (the Kafka sink waits for its outstanding deliveries).
    pub async fn finish(&self) {
        if let Some(r) = self.reporter.clone() {
            let timeout = r.config().flush_timeout;
            let _ = tokio::task::spawn_blocking(move || r.shutdown(timeout)).await;
        } else if let Some(sink) = self.sink.clone() {
            let _ = tokio::task::spawn_blocking(move || sink.flush()).await;
        }
    }

    /// Keeps sending what a buffered egress holds for up to `limit` (the session is over; the
    /// machine may go away), calling `progress` about once a second, until everything is
    /// delivered, the destination pauses, the time is up, or `stop` fires (heard at once). Then
    /// stops the driver: what it still holds (the handoff queue included) is on disk for the
    /// next start. An unbuffered sink is flushed; no sink, nothing to do. Rate limits are kept:
    /// one flush for the whole drain, so a `Retry-After` is cut short at most once.
    pub async fn drain(
        &self,
        limit: Duration,
        stop: CancellationToken,
        progress: impl Fn(DrainProgress),
    ) -> Drained {
        let Some(driver) = self.driver.clone() else {
            self.finish().await;
            return Drained {
                telemetry: self.accounting(),
                ..Drained::default()
            };
        };
        let started = Instant::now();
        let mut flushing = {
            let driver = driver.clone();
            tokio::task::spawn_blocking(move || driver.flush_timeout(limit))
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut delivered_before = driver.driver_stats().delivered;
        let stop_reason = loop {
            tokio::select! {
                flushed = &mut flushing => break match flushed {
                    Ok(FlushOutcome::Drained) => DrainStop::Delivered,
                    Ok(FlushOutcome::Paused { .. }) => DrainStop::Paused,
                    Ok(FlushOutcome::TimedOut { .. }) => DrainStop::TimedOut,
                    Err(_) => DrainStop::Stopped,
                },
                _ = stop.cancelled() => break DrainStop::Stopped,
                _ = tick.tick() => {
                    let d = driver.driver_stats();
                    progress(DrainProgress {
                        left: d.handoff_pending + d.buffered,
                        delivered: d.delivered.saturating_sub(delivered_before),
                        remaining: limit.saturating_sub(started.elapsed()),
                    });
                    delivered_before = d.delivered;
                }
            }
        };
        // Stores what the handoff queue holds, fsyncs the spool, stops both threads (an
        // unfinished flush then returns at once).
        let stopping = driver.clone();
        let stats = tokio::task::spawn_blocking(move || stopping.shutdown(Duration::ZERO)).await;
        if !flushing.is_finished() {
            let _ = flushing.await;
        }
        let stats = match stats {
            Ok(stats) => stats,
            Err(e) => {
                tracing::error!(error = %e, "stopping the egress failed; what is buffered stays on disk");
                driver.driver_stats()
            }
        };
        let config = driver.config();
        Drained {
            stop: stop_reason,
            left_on_disk: stats.buffered_disk,
            left_in_memory: stats.buffered_memory,
            buffer: config
                .buffer_path
                .clone()
                .map(|p| (p, config.buffer_setting)),
            telemetry: Some(driver_accounting(&stats)),
        }
    }

    /// What became of the telemetry handed to the egress (see [`crate::accounting`]): for a
    /// buffered egress, what a previous run left on disk and the egress's own loss reports are
    /// taken in too. `None` without an egress (everything relayed was discarded).
    pub fn accounting(&self) -> Option<Accounting> {
        if let Some(d) = &self.driver {
            return Some(driver_accounting(&d.driver_stats()));
        }
        self.sink.as_ref().map(|s| Accounting::of_sink(&s.stats()))
    }

    /// `GET /egress`'s answer: the sink's name and counters, and the reporter's own counters.
    pub fn stats_json(&self) -> serde_json::Value {
        serde_json::json!({
            "sink": self.sink.as_ref().map(|s| s.name()),
            "stats": self.sink.as_ref().map(|s| s.stats()),
            "reporter": self.reporter.as_ref().map(|r| r.reporter_stats()),
            "kafka": self.kafka.as_ref().map(|k| k.kafka_stats()),
        })
    }
}

/// A buffered egress's accounting: it takes in what was emitted, what a previous run left on
/// disk and its own loss reports.
fn driver_accounting(d: &DriverStats) -> Accounting {
    Accounting {
        emitted: d.emitted + d.recovered + d.reports,
        delivered: d.delivered,
        dropped: d.dropped(),
        queued: d.handoff_pending + d.buffered,
    }
}
