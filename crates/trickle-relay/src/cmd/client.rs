//! `trickle-relay client`: the client role, as its own process.
//!
//! Egress is chosen by `--egress` (see [`relay::client::egress`]); `auto` (the default) follows
//! the seed's environment variables. The HTTP reporter's API key comes from `--api-key-file` or
//! `SCOPE_CLOUD_API_KEY` and is re-read on SIGHUP. With `--http`, `GET /egress` serves the egress
//! sink's counters.

use anyhow::Context as _;
use relay::client::egress::{self, EgressChoice, EgressSinks};
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
    /// Serve `GET /api/v1/logs/tail` and `GET /health` here.
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
    /// Ride out a trickle server outage (killed, restarting, unreachable) of up to this many
    /// seconds: both channels keep reconnecting (backoff 100 ms doubling to 2 s) and resume where
    /// they broke off; nothing is lost uncounted. 0: give up after the reference clients' retries
    /// (~2.5 s) and end the session.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub reconnect_secs: f64,
    #[command(flatten)]
    pub tls: super::TrickleTlsArgs,
}

/// Runs the client until Ctrl-C / SIGTERM, `--duration-secs`, or the end of the events channel.
pub async fn run(args: Args) -> anyhow::Result<()> {
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

    let shutdown = CancellationToken::new();
    super::cancel_on_signal(shutdown.clone());
    if let Some(addr) = args.http {
        serve_http(addr, client.clone(), egress.clone(), shutdown.clone()).await?;
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
        _ = shutdown.cancelled() => {}
        _ = ended => {}
        _ = async { match deadline { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => {}
    }
    if args.start_stream.is_some() && !client.events_ended() {
        if let Err(e) = client.stop_stream().await {
            tracing::warn!(error = %e, "stop_stream failed");
        }
    }
    shutdown.cancel();
    let client =
        Arc::try_unwrap(client).map_err(|_| anyhow::anyhow!("client still in use at shutdown"))?;
    let refused = client.tls_refused();
    let report = client.close(Duration::from_secs(10)).await;
    // Before the counters are read, so that they include what the flush delivered.
    egress.finish().await;
    let egress_stats = egress.sink.as_ref().map(|s| s.stats());
    print_summary(&report, egress_stats.as_ref());
    if let Some(path) = args.report {
        let mut json = serde_json::to_value(&report)?;
        if let Some(obj) = json.as_object_mut() {
            // No egress sink (none configured, or opted out): nothing egressed.
            let stats = egress_stats.unwrap_or_default();
            obj.insert("egressed".into(), stats.delivered.into());
            obj.insert("egress_dropped".into(), stats.dropped().into());
        }
        std::fs::write(&path, json.to_string())
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    if let Some(refused) = refused {
        anyhow::bail!("the events channel cannot be read: {refused}");
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
    let state = http::HttpState {
        tail: LogTail::global().clone(),
        report: client.reporter(),
    };
    // `GET /egress`: the egress sink's counters (and the HTTP reporter's, when it is the egress).
    let egress_route = axum::Router::new().route(
        "/egress",
        axum::routing::get(move || std::future::ready(axum::Json(egress.stats_json()))),
    );
    tokio::spawn(async move {
        let served = axum::serve(listener, http::router(state).merge(egress_route))
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "client HTTP endpoint stopped");
        }
    });
    Ok(())
}

fn print_summary(report: &ClientReport, egress: Option<&telemetry::SinkStats>) {
    logging::say!(
        "client: telemetry received {}, relayed {}, egressed {}, discarded {} (no egress), rejected {} (foreign session) + {} (invalid), runner-reported drops {}, bad lines {}",
        report.telemetry_received,
        report.relayed,
        egress.map(|s| s.delivered).unwrap_or(0),
        report.discarded,
        report.rejected_foreign,
        report.rejected_invalid,
        report.dropped_reported,
        report.bad_lines
    );
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
