//! `trickle-relay client`: the client role, as its own process.
//!
//! Egress is chosen by `--egress`; `auto` (the default) follows the seed's environment variables
//! in the spec's order (`SCOPE_TELEMETRY_LOG_SINK`, then `SCOPE_CLOUD_API_KEY`, then
//! `KAFKA_BOOTSTRAP_SERVERS`), honouring `SCOPE_TELEMETRY_DISABLED` / `DO_NOT_TRACK`.

use anyhow::{bail, Context as _};
use relay::client::{http, Client, ClientConfig, ClientReport};
use relay::logtail::LogTail;
use relay::SessionIds;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use telemetry::sinks::{FileSink, LogSink};
use telemetry::{Egress, Sink};
use tokio_util::sync::CancellationToken;

/// Where relayed telemetry goes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EgressArg {
    /// From the environment, in the spec's order.
    Auto,
    /// One `TELEMETRY ...` log line per event.
    Log,
    /// Each envelope's exact JSON, one per line, appended to `--egress-file`.
    File,
    /// Count and discard.
    None,
}

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
    #[arg(long, value_enum, default_value_t = EgressArg::Auto)]
    pub egress: EgressArg,
    /// The file of `--egress file`.
    #[arg(long, required_if_eq("egress", "file"))]
    pub egress_file: Option<PathBuf>,
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
}

/// Runs the client until Ctrl-C / SIGTERM, `--duration-secs`, or the end of the events channel.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let egress = build_egress(args.egress, args.egress_file.as_deref())?;
    if args.create_channels {
        relay::client::create_channel(&args.control_url).await?;
        relay::client::create_channel(&args.events_url).await?;
    }
    let mut config = ClientConfig::new(args.control_url, args.events_url);
    config.session = SessionIds {
        session_id: args.session_id,
        connection_id: args.connection_id,
    };
    config.max_event_bytes = args.max_event_bytes;
    let client = Arc::new(Client::connect(config, egress.clone()));

    let shutdown = CancellationToken::new();
    super::cancel_on_signal(shutdown.clone());
    if let Some(addr) = args.http {
        serve_http(addr, client.clone(), shutdown.clone()).await?;
    }
    if let Some(params) = &args.start_stream {
        let params: Value = serde_json::from_str(params).context(
            "--start-stream takes a JSON object, e.g. '{\"pipeline_id\":\"passthrough\"}'",
        )?;
        if client.wait_ready(Duration::from_secs(30)).await.is_none() {
            tracing::warn!("no runner_ready within 30 s; starting the stream anyway");
        }
        client
            .start_stream(params)
            .await
            .context("start_stream failed")?;
    }
    let deadline = args.duration_secs.map(Duration::from_secs_f64);
    let watch = client.clone();
    let ended = async move {
        while !watch.events_ended() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
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
    let report = client.close(Duration::from_secs(10)).await;
    let egress_stats = egress.as_ref().map(|s| s.stats());
    if let Some(sink) = &egress {
        sink.flush();
    }
    print_summary(&report, egress_stats.as_ref());
    if let Some(path) = args.report {
        let mut json = serde_json::to_value(&report)?;
        if let (Some(stats), Some(obj)) = (egress_stats, json.as_object_mut()) {
            obj.insert("egressed".into(), stats.delivered.into());
            obj.insert("egress_dropped".into(), stats.dropped().into());
        }
        std::fs::write(&path, json.to_string())
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    Ok(())
}

/// The egress sink `choice` names, or the environment's.
pub fn build_egress(
    choice: EgressArg,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<Arc<dyn Sink>>> {
    let sink: Option<Arc<dyn Sink>> = match choice {
        EgressArg::Log => Some(Arc::new(LogSink::new())),
        EgressArg::None => None,
        EgressArg::File => {
            let Some(path) = file else {
                bail!("--egress file needs --egress-file PATH");
            };
            let sink = FileSink::create(path)
                .with_context(|| format!("cannot open the egress file {}", path.display()))?;
            Some(Arc::new(sink))
        }
        EgressArg::Auto => match telemetry::select_from_env() {
            Egress::Log => Some(Arc::new(LogSink::new())),
            Egress::None => {
                tracing::info!("no telemetry egress configured (set SCOPE_TELEMETRY_LOG_SINK=1 to log events); relayed events are counted and discarded");
                None
            }
            Egress::Disabled { by } => {
                tracing::info!("telemetry disabled by {by}");
                telemetry::set_telemetry_enabled(false);
                None
            }
            other => bail!(
                "egress `{}` is selected by the environment but this build has no such sink yet; unset its variable or pass --egress log|file|none",
                other.as_str()
            ),
        },
    };
    Ok(sink)
}

async fn serve_http(
    addr: SocketAddr,
    client: Arc<Client>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --http"))?;
    eprintln!(
        "client: logs at http://{}/api/v1/logs/tail",
        listener.local_addr()?
    );
    let state = http::HttpState {
        tail: LogTail::global().clone(),
        report: client.reporter(),
    };
    tokio::spawn(async move {
        let served = axum::serve(listener, http::router(state))
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "client HTTP endpoint stopped");
        }
    });
    Ok(())
}

fn print_summary(report: &ClientReport, egress: Option<&telemetry::SinkStats>) {
    eprintln!(
        "client: telemetry received {}, relayed {}, egressed {}, rejected {} (foreign session) + {} (invalid), runner-reported drops {}, bad lines {}",
        report.telemetry_received,
        report.relayed,
        egress.map(|s| s.delivered).unwrap_or(0),
        report.rejected_foreign,
        report.rejected_invalid,
        report.dropped_reported,
        report.bad_lines
    );
}
