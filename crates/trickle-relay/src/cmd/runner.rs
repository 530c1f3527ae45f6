//! `trickle-relay runner`: the runner role, as its own process.

use anyhow::{bail, Context as _};
use relay::runner::{self, RunnerConfig};
use relay::SessionIds;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Arguments of `trickle-relay runner`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The control channel to subscribe to (client to runner), e.g. http://127.0.0.1:2939/abc-control.
    #[arg(long, env = "TRICKLE_CONTROL_URL")]
    pub control_url: String,
    /// The events channel to publish to (runner to client).
    #[arg(long, env = "TRICKLE_EVENTS_URL")]
    pub events_url: String,
    /// Session id stamped on every event (else taken from `start_stream` params).
    #[arg(long, env = "SCOPE_SESSION_ID")]
    pub session_id: Option<String>,
    /// Connection id stamped on every event (else taken from `start_stream` params).
    #[arg(long, env = "SCOPE_CONNECTION_ID")]
    pub connection_id: Option<String>,
    /// Job id reported in `runner_ready`.
    #[arg(long, env = "RUNNER_JOB_ID")]
    pub runner_job_id: Option<String>,
    /// Telemetry queue capacity; beyond it heartbeats are shed first, and every drop is reported.
    #[arg(long, default_value_t = 256)]
    pub queue_capacity: usize,
    /// Lines the events writer holds while the events channel cannot be written (a trickle
    /// server outage); past them the telemetry queue (--queue-capacity) sheds heartbeats first,
    /// counting every drop.
    #[arg(long, default_value_t = 8192, value_name = "LINES")]
    pub events_queue_lines: usize,
    /// Size at which the events writer starts a new segment. The server keeps the last 5, so a
    /// client may fall 5 times this behind before it loses segments; Scope's Python reader aborts
    /// on a segment over 5 MiB, so stay below that.
    #[arg(long, default_value_t = relay::runner::DEFAULT_EVENTS_SEGMENT_BYTES, value_name = "BYTES")]
    pub events_segment_bytes: usize,
    /// Interval of `stream_heartbeat` while a stream runs, in milliseconds (the seed: 10 s).
    #[arg(long, default_value_t = 10_000)]
    pub heartbeat_ms: u64,
    /// Where `start_stream` creates the media channels (the trickle server's base URL, which must
    /// allow channel creation: `serve --autocreate`); default: the control channel's server and
    /// base path.
    #[arg(long)]
    pub media_base_url: Option<String>,
    /// Serve the loopback ingest endpoint (POST /v1/events) here, for local processes.
    #[arg(long)]
    pub ingest: Option<SocketAddr>,
    /// Do not forward this process's log lines to the client.
    #[arg(long)]
    pub no_forward_logs: bool,
    /// This runner restarted: its first events segment resets the channel's older segments.
    #[arg(long)]
    pub reset: bool,
    /// Also write every envelope the runner emits, as JSON lines, to this file (an audit record).
    #[arg(long)]
    pub emitted_file: Option<PathBuf>,
    /// Write the final counters as JSON to this file on exit.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Ride out a trickle server outage (killed, restarting, unreachable) of up to this many
    /// seconds: both channels keep reconnecting (backoff 100 ms doubling to 2 s) and resume where
    /// they broke off; nothing is lost uncounted. 0: give up after the reference clients' retries
    /// (~2.5 s) and end the session.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub reconnect_secs: f64,
    /// Do not hold the telemetry to the client's reading: write as fast as events come, even when
    /// the client falls so far behind that it loses segments in transit (it counts them, and
    /// reports them downstream as telemetry_lost_in_transit). For comparisons and tests.
    #[arg(long)]
    pub no_flow_control: bool,
    /// At the end, hold the queued telemetry to the client's reading for up to this long (then
    /// write the rest at once), then wait up to this long for a client that reports its reading
    /// to read the last event line before the events channel is deleted.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub close_wait_secs: f64,
    /// Serve `GET /metrics` (Prometheus text format) on this address; off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: super::TrickleTlsArgs,
}

/// Runs the runner until the control channel ends or Ctrl-C / SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let started_at = Instant::now();
    let control_url = args.control_url.clone();
    let mut config = RunnerConfig::new(args.control_url, args.events_url);
    config.session = SessionIds {
        session_id: args.session_id,
        connection_id: args.connection_id,
    };
    config.runner_job_id = args.runner_job_id;
    config.queue_capacity = args.queue_capacity.max(1);
    config.events_queue_lines = args.events_queue_lines.max(1);
    config.events_segment_bytes = args.events_segment_bytes.max(1);
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_ms.max(1));
    config.media_base_url = args.media_base_url;
    config.ingest = args.ingest;
    config.forward_logs = !args.no_forward_logs;
    config.reset_events = args.reset;
    config.reconnect_window = Duration::try_from_secs_f64(args.reconnect_secs)
        .context("--reconnect-secs takes a number of seconds >= 0, e.g. 60")?;
    config.started_at = started_at;
    config.trickle_tls = args.tls.client_tls()?;
    config.flow_control = !args.no_flow_control;
    config.close_wait = Duration::try_from_secs_f64(args.close_wait_secs)
        .context("--close-wait-secs takes a number of seconds >= 0, e.g. 10")?;
    let emitted_copy = match &args.emitted_file {
        Some(path) => Some(std::sync::Arc::new(
            telemetry::sinks::FileSink::create(path)
                .with_context(|| format!("cannot open --emitted-file {}", path.display()))?,
        )),
        None => None,
    };
    config.emitted_copy = emitted_copy
        .clone()
        .map(|s| s as std::sync::Arc<dyn telemetry::Sink>);
    let shutdown = CancellationToken::new();
    super::cancel_on_signal(shutdown.clone());
    if let Some(addr) = args.metrics_listen {
        let probe = relay::runner::RunnerProbe::default();
        config.probe = Some(probe.clone());
        let exported = metrics::Metrics::new().with(metrics::runner(probe));
        let bound = metrics::serve(addr, exported, shutdown.clone()).await?;
        logging::say!("runner: metrics at http://{bound}/metrics");
    }
    let report = runner::run(config, shutdown).await?;
    if let Some(copy) = &emitted_copy {
        copy.flush().context("cannot flush --emitted-file")?;
    }
    print_summary(&report);
    if let Some(path) = args.report {
        let telemetry = report.telemetry();
        let json = serde_json::json!({
            "control_messages": report.control_messages,
            "bad_control_lines": report.bad_control_lines,
            "telemetry": telemetry,
            "emitted": telemetry.emitted,
            "delivered": telemetry.delivered,
            "dropped": telemetry.dropped,
            "queued": telemetry.queued,
            "dropped_high": report.sink.dropped_high,
            "dropped_low": report.sink.dropped_low,
            "lost_in_failed_segments": report.lost_in_failed_segments(),
            "control_missing": report.control_missing,
            "log_lines": report.log_lines,
            "events_lines_lost": report.events.lines_lost,
            "events_segments_failed": report.events.segments_failed,
            "events_reconnects": report.events_publisher.reconnects,
            "events_retries": report.events_publisher.retries,
            "control_reconnects": report.control.reconnects,
            "control_resumed_segments": report.control.resumed_segments,
            "control_broken_segments": report.control.broken_segments,
            "media_segments": report.media.segments,
            "media_bytes": report.media.bytes,
            "media_failures": report.media.failures,
            "last_seq": report.transit.last_seq,
            "loss_reports": report.transit.reports,
            "lost_downstream": report.transit.lost_downstream,
            "client_read_seq": report.client_read_seq,
        });
        std::fs::write(&path, json.to_string())
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    if report.control_missing {
        bail!(
            "the control channel {control_url} does not exist (HTTP 404), so this runner had nothing \
             to answer. Create the session's channels before starting the runner: start the client \
             with --create-channels (on a server run with `serve --autocreate`), or create them on \
             your trickle server as an orchestrator does"
        );
    }
    Ok(())
}

/// The summary on stderr: one accounting line for the telemetry, then what else happened.
fn print_summary(report: &runner::RunnerReport) {
    let t = report.telemetry();
    let mut drops = Vec::new();
    let lost = report.lost_in_failed_segments();
    if lost > 0 {
        drops.push(format!("{lost} lost in failed events segments"));
    }
    let shed = t.dropped.saturating_sub(lost);
    if shed > 0 {
        drops.push(format!("{shed} shed by the full queue or a failed write"));
    }
    let drops = if drops.is_empty() {
        String::new()
    } else {
        format!(" (dropped: {})", drops.join(", "))
    };
    logging::say!("runner: telemetry {t}{drops}");
    logging::say!(
        "runner: {} control messages ({} bad lines skipped); {} log lines forwarded; last event seq {}, the client read to {}",
        report.control_messages,
        report.bad_control_lines,
        report.log_lines,
        report.transit.last_seq,
        report
            .client_read_seq
            .map_or("- (it never reported)".to_string(), |s| s.to_string()),
    );
    if report.events_publisher.reconnects + report.control.reconnects > 0 {
        logging::say!(
            "runner: reconnected after trickle server outages: events {} time(s), control {} time(s)",
            report.events_publisher.reconnects, report.control.reconnects
        );
    }
}
