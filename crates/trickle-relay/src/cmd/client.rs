//! `trickle-relay client`: the client role, as its own process.
//!
//! Egress is chosen by `--egress` (see [`relay::client::egress`]); `auto` (the default) follows
//! the seed's environment variables. The HTTP reporter's API key comes from `--api-key-file` or
//! `SCOPE_CLOUD_API_KEY` and is re-read on SIGHUP. With `--http`, `GET /egress` serves the egress
//! sink's counters.

use anyhow::{bail, Context as _};
use relay::accounting::Accounting;
use relay::client::egress::{self, DrainStop, Drained, EgressChoice, EgressSinks};
use relay::client::{http, Client, ClientConfig, ClientReport};
use relay::logtail::LogTail;
use relay::SessionIds;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Arguments of `trickle-relay client`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The control channel to publish to (client to runner).
    #[arg(long, env = "TRICKLE_CONTROL_URL")]
    pub control_url: String,
    /// The events channel to subscribe to (runner to client).
    #[arg(long, env = "TRICKLE_EVENTS_URL")]
    pub events_url: String,
    /// This session's id: telemetry claiming another is rejected and counted.
    #[arg(long, env = "SCOPE_SESSION_ID")]
    pub session_id: Option<String>,
    /// This session's connection id: telemetry claiming another is rejected and counted.
    #[arg(long, env = "SCOPE_CONNECTION_ID")]
    pub connection_id: Option<String>,
    /// Serve `GET /api/v1/logs/tail`, `GET /health`, `GET /egress` and `GET /metrics`
    /// (Prometheus text format) here.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Where relayed telemetry goes.
    #[arg(long, value_enum, default_value_t = EgressChoice::Auto)]
    pub egress: EgressChoice,
    /// The file of `--egress file`.
    #[arg(long, required_if_eq("egress", "file"))]
    pub egress_file: Option<PathBuf>,
    /// The HTTP reporter's API key, read from this file (first non-empty line) instead of
    /// `SCOPE_CLOUD_API_KEY`; re-read on SIGHUP.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Create both channels first (POST to each URL; the server must allow autocreate).
    #[arg(long)]
    pub create_channels: bool,
    /// Start a stream once the runner is ready, with these params (JSON object).
    #[arg(long)]
    pub start_stream: Option<String>,
    /// Stop after this many seconds (else run until Ctrl-C / SIGTERM or the events channel ends).
    #[arg(long)]
    pub duration_secs: Option<f64>,
    /// Largest event line accepted on the events channel, in bytes.
    #[arg(long, default_value_t = 5 * 1024 * 1024)]
    pub max_event_bytes: usize,
    /// Write the final counters as JSON to this file on exit.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Once the session is over (the events channel ended, SIGTERM, Ctrl-C, --duration-secs),
    /// keep sending what the HTTP reporter or Kafka sink still holds for up to this many seconds,
    /// with progress on stderr; then exit, saying what is left on disk and where (the next start
    /// sends it first). A second SIGTERM or Ctrl-C exits at once, keeping it on disk.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub drain_secs: f64,
    /// Ride out a trickle server outage (killed, restarting, unreachable) of up to this many
    /// seconds: both channels keep reconnecting (backoff 100 ms doubling to 2 s) and resume where
    /// they broke off; nothing is lost uncounted. 0: give up after the reference clients' retries
    /// (~2.5 s) and end the session.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub reconnect_secs: f64,
    #[command(flatten)]
    pub tls: super::TrickleTlsArgs,
}

/// Runs the client until Ctrl-C / SIGTERM, `--duration-secs`, or the end of the events channel,
/// then drains the egress for up to `--drain-secs` (a second signal stops that at once).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let drain = Duration::try_from_secs_f64(args.drain_secs)
        .context("--drain-secs takes a number of seconds >= 0, e.g. 30")?;
    let egress = egress::open(
        args.egress,
        args.egress_file.as_deref(),
        args.api_key_file.as_deref(),
    )?;
    if let Some(r) = &egress.reporter {
        egress::reload_api_key_on_sighup(r.clone(), args.api_key_file.clone());
    }
    let trickle_tls = args.tls.client_tls()?;
    if args.create_channels {
        relay::client::create_channel_with(&args.control_url, &trickle_tls).await?;
        relay::client::create_channel_with(&args.events_url, &trickle_tls).await?;
    }
    let events_url = args.events_url.clone();
    let mut config = ClientConfig::new(args.control_url, args.events_url);
    config.session = SessionIds {
        session_id: args.session_id,
        connection_id: args.connection_id,
    };
    config.max_event_bytes = args.max_event_bytes;
    config.reconnect_window = Duration::try_from_secs_f64(args.reconnect_secs)
        .context("--reconnect-secs takes a number of seconds >= 0, e.g. 60")?;
    config.trickle_tls = trickle_tls;
    let client = Arc::new(Client::connect(config, egress.sink.clone()));

    let signals = super::Signals::install();
    let stop_http = CancellationToken::new();
    if let Some(addr) = args.http {
        serve_http(addr, client.clone(), egress.clone(), stop_http.clone()).await?;
    }
    if let Some(params) = &args.start_stream {
        let params: Value = serde_json::from_str(params).context(
            "--start-stream takes a JSON object, e.g. '{\"pipeline_id\":\"passthrough\"}'",
        )?;
        let ready = tokio::select! {
            ready = client.wait_ready(Duration::from_secs(30)) => ready,
            _ = until_events_end(&client) => None,
        };
        if let Some(refused) = client.tls_refused() {
            anyhow::bail!("the events channel cannot be read: {refused}");
        }
        if ready.is_none() {
            tracing::warn!("no runner_ready within 30 s; starting the stream anyway");
        }
        client
            .start_stream(params)
            .await
            .context("start_stream failed")?;
    }
    let deadline = args.duration_secs.map(Duration::from_secs_f64);
    let watch = client.clone();
    let ended = async move { until_events_end(&watch).await };
    tokio::select! {
        _ = signals.reached(1) => {}
        _ = ended => {}
        _ = async { match deadline { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => {}
    }
    // From here on, the next signal means "exit now" (what is buffered stays on disk).
    let exit_now = signals.count() + 1;
    if args.start_stream.is_some() && !client.events_ended() {
        if let Err(e) = client.stop_stream().await {
            tracing::warn!(error = %e, "stop_stream failed");
        }
    }
    let missing = client.events_missing();
    let refused = client.tls_refused();
    let counters = client.reporter();
    let client =
        Arc::try_unwrap(client).map_err(|_| anyhow::anyhow!("client still in use at shutdown"))?;
    // Closing waits up to 10 s for the runner to finish the events channel.
    let report = tokio::select! {
        report = client.close(Duration::from_secs(10)) => report,
        _ = signals.reached(exit_now) => counters(),
    };
    let stop = CancellationToken::new();
    let stop_on_signal = {
        let (stop, signals) = (stop.clone(), signals.clone());
        tokio::spawn(async move {
            signals.reached(exit_now).await;
            stop.cancel();
        })
    };
    // Said only when there is something to send: an egress that kept up exits at once, quietly.
    let pending = egress.driver.as_ref().map_or(0, |d| {
        let s = d.driver_stats();
        s.handoff_pending + s.buffered
    });
    if pending > 0 && !stop.is_cancelled() && !drain.is_zero() {
        logging::say!(
            "client: session over; sending the {pending} events the egress holds for up to {} s (--drain-secs); SIGTERM or Ctrl-C again exits now, keeping them on disk",
            drain.as_secs_f64()
        );
    }
    let drained = egress
        .drain(drain, stop, |p| {
            logging::say!(
                "client: draining: {} events left, {} delivered in the last second, {:.0} s to go",
                p.left,
                p.delivered,
                p.remaining.as_secs_f64()
            );
        })
        .await;
    stop_on_signal.abort();
    stop_http.cancel();
    let telemetry = drained.telemetry;
    print_summary(&report, telemetry.as_ref(), &egress, &drained);
    if let Some(path) = args.report {
        let mut json = serde_json::to_value(&report)?;
        if let Some(obj) = json.as_object_mut() {
            // No egress sink (none configured, or opted out): nothing egressed.
            let t = telemetry.unwrap_or_default();
            obj.insert("telemetry".into(), serde_json::to_value(telemetry)?);
            obj.insert("egressed".into(), t.delivered.into());
            obj.insert("egress_dropped".into(), t.dropped.into());
            obj.insert("egress_queued".into(), t.queued.into());
            obj.insert("left_on_disk".into(), drained.left_on_disk.into());
            obj.insert(
                "buffer_path".into(),
                drained
                    .buffer
                    .as_ref()
                    .map(|(p, _)| p.display().to_string())
                    .into(),
            );
        }
        std::fs::write(&path, json.to_string())
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    if let Some(refused) = refused {
        bail!("the events channel cannot be read: {refused}");
    }
    if missing {
        bail!(
            "the events channel {events_url} does not exist (HTTP 404), so there was nothing to \
             relay. Create the session's channels first: run this client with --create-channels (on \
             a server run with `serve --autocreate`), or create them on your trickle server as an \
             orchestrator does; then start the runner"
        );
    }
    Ok(())
}

/// Resolves once the client's events channel has ended.
async fn until_events_end(client: &Client) {
    while !client.events_ended() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn serve_http(
    addr: SocketAddr,
    client: Arc<Client>,
    egress: EgressSinks,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --http"))?;
    logging::say!(
        "client: logs at http://{}/api/v1/logs/tail",
        listener.local_addr()?
    );
    let exported = metrics::Metrics::new().with(metrics::client(&client, egress.clone()));
    let accounting = egress.clone();
    let state = http::HttpState {
        tail: LogTail::global().clone(),
        report: client.reporter(),
        telemetry: Arc::new(move || accounting.accounting()),
    };
    // `GET /egress`: the egress sink's counters (and the HTTP reporter's, when it is the egress).
    let egress_route = axum::Router::new().route(
        "/egress",
        axum::routing::get(move || std::future::ready(axum::Json(egress.stats_json()))),
    );
    tokio::spawn(async move {
        let served = axum::serve(
            listener,
            http::router(state)
                .merge(egress_route)
                .merge(exported.router()),
        )
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "client HTTP endpoint stopped");
        }
    });
    Ok(())
}

fn print_summary(
    report: &ClientReport,
    telemetry: Option<&Accounting>,
    egress: &EgressSinks,
    drained: &Drained,
) {
    logging::say!(
        "client: telemetry received {}: relayed {}, rejected {} (foreign session) + {} (invalid); runner-reported drops {}, bad lines {}",
        report.telemetry_received,
        report.relayed,
        report.rejected_foreign,
        report.rejected_invalid,
        report.dropped_reported,
        report.bad_lines
    );
    if report.read_seq > 0 {
        logging::say!(
            "client: the runner numbers its lines: read to seq {}; lost in transit {} in {} gap(s) (reported downstream as telemetry_lost_in_transit); runner restarts {}; runner ended {}",
            report.read_seq,
            report.lost_in_transit,
            report.transit_gaps,
            report.runner_restarts,
            report.runner_ended
        );
    }
    let name = egress.sink.as_ref().map_or("none", |s| s.name());
    match telemetry {
        Some(t) => logging::say!("client: egress {name}: {t}"),
        None => logging::say!(
            "client: no egress: {} relayed envelopes discarded (counted)",
            report.discarded
        ),
    }
    match drained.stop {
        DrainStop::Delivered => {}
        DrainStop::Paused => {
            logging::say!("client: the egress stopped sending: the destination paused it (e.g. it refused the API key)")
        }
        DrainStop::TimedOut => {
            logging::say!("client: --drain-secs ran out before the egress was empty")
        }
        DrainStop::Stopped => logging::say!("client: stopped draining on a second signal"),
    }
    if let Some((path, setting)) = &drained.buffer {
        if drained.left_on_disk > 0 {
            logging::say!(
                "client: {} events left on disk in {} ({setting}): the next client started with the same buffer path sends them first",
                drained.left_on_disk,
                path.display()
            );
        }
    }
    if drained.left_in_memory > 0 {
        logging::say!(
            "client: {} events were held in memory (the disk buffer was unusable) and are lost at exit",
            drained.left_in_memory
        );
    }
    if report.events_reconnects + report.events_resumed_segments + report.events_broken_segments > 0
    {
        logging::say!(
            "client: events channel reconnected {} time(s) after server outages; {} segment(s) resumed where they broke off, {} lost mid-way, {} skipped",
            report.events_reconnects,
            report.events_resumed_segments,
            report.events_broken_segments,
            report.events_skipped_segments
        );
    }
}
