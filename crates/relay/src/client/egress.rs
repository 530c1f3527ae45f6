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
//! The HTTP metrics reporter buffers on disk beside the seed's buffer file
//! (`SCOPE_METRICS_BUFFER_PATH`), imports what the seed left in that file, and re-sends what a
//! previous run left on disk, on start; its API key
//! comes from a key file or `SCOPE_CLOUD_API_KEY`, and [`reload_api_key_on_sighup`] re-reads it.
//! The Kafka sink does the same with `SCOPE_KAFKA_BUFFER_PATH`.

use anyhow::{bail, Context as _};
use reporter::{Reporter, ReporterConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use telemetry::sinks::{FileSink, LogSink};
use telemetry::{Egress, Sink};

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
    let mut reporter = None;
    let mut http = || -> anyhow::Result<Option<Arc<dyn Sink>>> {
        let r = start_reporter(api_key_file)?;
        let sink = r.sink();
        reporter = Some(r);
        Ok(Some(sink))
    };
    let sink: Option<Arc<dyn Sink>> = match choice {
        EgressChoice::Http => http()?,
        EgressChoice::Kafka => Some(start_kafka()?),
        EgressChoice::Log => Some(Arc::new(LogSink::new())),
        EgressChoice::None => None,
        EgressChoice::File => {
            let Some(path) = file else {
                bail!("--egress file needs --egress-file PATH");
            };
            let sink = FileSink::create(path)
                .with_context(|| format!("cannot open the egress file {}", path.display()))?;
            Some(Arc::new(sink))
        }
        EgressChoice::Auto => match telemetry::select_from_env() {
            Egress::Log => Some(Arc::new(LogSink::new())),
            Egress::HttpReporter => http()?,
            Egress::Kafka => Some(start_kafka()?),
            Egress::None => {
                tracing::info!("no telemetry egress configured (set SCOPE_TELEMETRY_LOG_SINK=1 to log events); relayed events are counted and discarded");
                None
            }
            // Answered above: an opt-out returns before any sink is built.
            Egress::Disabled { .. } => None,
        },
    };
    Ok(EgressSinks { sink, reporter })
}

/// Starts the Kafka sink from the environment (`kafka::KafkaConfig::from_env`): its disk buffer
/// (`SCOPE_KAFKA_BUFFER_PATH`) is produced first if a previous run left events there.
pub fn start_kafka() -> anyhow::Result<Arc<dyn Sink>> {
    let config = kafka::KafkaConfig::from_env().context("invalid Kafka sink settings")?;
    let sink = kafka::KafkaSink::start(config).context("cannot start the Kafka sink")?;
    Ok(sink.sink())
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

    /// `GET /egress`'s answer: the sink's name and counters, and the reporter's own counters.
    pub fn stats_json(&self) -> serde_json::Value {
        serde_json::json!({
            "sink": self.sink.as_ref().map(|s| s.name()),
            "stats": self.sink.as_ref().map(|s| s.stats()),
            "reporter": self.reporter.as_ref().map(|r| r.reporter_stats()),
        })
    }
}
