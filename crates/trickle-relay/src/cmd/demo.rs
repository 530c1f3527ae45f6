//! `trickle-relay demo`: the main job on embedded defaults.
//!
//! One program runs an embedded trickle server, a runner and a client over loopback TCP, drives a
//! realistic simulated session (start, media through the runner's passthrough, heartbeats, a
//! pipeline error, an API call, stop), and ends with a summary that accounts for every event:
//! emitted, relayed, egressed, dropped, rejected, and the origin-to-egress latency.
//!
//! With `SCOPE_TELEMETRY_DISABLED` / `DO_NOT_TRACK` set, the session runs but no telemetry is
//! published or egressed (the summary shows zeros, every one accounted for).

use anyhow::Context as _;
use relay::accounting::Accounting;
use relay::client::{Client, ClientConfig, ClientReport};
use relay::runner::{self, RunnerConfig, RunnerReport};
use relay::SessionIds;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::sinks::{FileSink, LogSink};
use telemetry::{Fields, Sink, SinkStats};
use tokio_util::sync::CancellationToken;
use trickle::server::{random_channel_name, Server, ServerConfig};

/// Arguments of `trickle-relay demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// How long the simulated stream runs, in seconds.
    #[arg(long, default_value_t = 3.0)]
    pub duration_secs: f64,
    /// Heartbeat interval of the simulated stream, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub heartbeat_ms: u64,
    /// Also emit a burst of this many heartbeats as fast as possible, to show drop accounting.
    #[arg(long, default_value_t = 0)]
    pub burst: u64,
    /// The runner's telemetry queue capacity.
    #[arg(long, default_value_t = 256)]
    pub queue_capacity: usize,
    /// Egress to this file (each envelope's exact JSON per line) instead of the log sink.
    #[arg(long)]
    pub egress_file: Option<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the demo.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    // Autocreate: the runner creates each stream's media channels over HTTP.
    let server_config = ServerConfig {
        autocreate: true,
        ..ServerConfig::default()
    };
    let server = Server::bind(([127, 0, 0, 1], 0).into(), server_config)
        .await
        .context("cannot start the embedded trickle server on loopback")?;
    let (control, events) = (random_channel_name(), random_channel_name());
    for name in [&control, &events] {
        server.channels().create(name, Some("application/jsonl"))?;
    }
    let control_url = format!("{}/{}", server.url(), control);
    let events_url = format!("{}/{}", server.url(), events);
    logging::say!(
        "demo: trickle server at {}, control …/{:.8}…, events …/{:.8}…",
        server.url(),
        control,
        events
    );

    let opted_out = telemetry::egress::opted_out_by(|k| std::env::var(k).ok());
    let egress: Option<Arc<dyn Sink>> = match (&args.egress_file, opted_out) {
        (_, Some(by)) => {
            logging::say!("demo: telemetry disabled by {by}: nothing is published or egressed");
            telemetry::set_telemetry_enabled(false);
            None
        }
        (Some(path), None) => {
            Some(Arc::new(FileSink::create(path).with_context(|| {
                format!("cannot open {}", path.display())
            })?))
        }
        (None, None) => Some(Arc::new(LogSink::new())),
    };
    let session = SessionIds::generate();

    let mut runner_config = RunnerConfig::new(control_url.clone(), events_url.clone());
    runner_config.session = session.clone();
    runner_config.runner_job_id = Some(format!("demo-{}", &control[..8]));
    runner_config.heartbeat_interval = Duration::from_millis(args.heartbeat_ms.max(1));
    runner_config.queue_capacity = args.queue_capacity.max(1);
    // Runner and client share this process's log; forwarding it would echo the client's own lines.
    runner_config.forward_logs = false;
    let stop_runner = CancellationToken::new();
    let runner_task = tokio::spawn(runner::run(runner_config, stop_runner.clone()));

    let mut client_config = ClientConfig::new(control_url, events_url);
    client_config.session = session.clone();
    client_config.request_timeout = Duration::from_secs(10);
    let client = Client::connect(client_config, egress.clone());

    let session_result = drive(&client, &args, &session).await;
    if let Err(e) = &session_result {
        tracing::error!(error = %e, "the simulated session failed");
    }
    let client_report = client.close(Duration::from_secs(10)).await;
    stop_runner.cancel();
    let runner_report = runner_task
        .await
        .context("the runner task panicked")?
        .context("the runner failed")?;
    server.shutdown().await;
    if let Some(egress) = &egress {
        egress.flush();
    }
    let summary = Summary {
        runner: runner_report,
        client: client_report,
        egress: egress.as_ref().map(|e| e.stats()).unwrap_or_default(),
        elapsed: started.elapsed(),
    };
    if args.json {
        println!("{}", summary.to_json());
    } else {
        summary.print();
    }
    session_result?;
    anyhow::ensure!(
        summary.accounted(),
        "events are unaccounted for: see the summary above"
    );
    Ok(())
}

/// The simulated session, as a client application drives it.
async fn drive(client: &Client, args: &Args, session: &SessionIds) -> anyhow::Result<()> {
    client
        .wait_ready(Duration::from_secs(10))
        .await
        .context("the runner never reported runner_ready")?;
    logging::say!("demo: runner ready; starting the stream");
    let started = client
        .start_stream(json!({"pipeline_id": "passthrough", "width": 512, "height": 512}))
        .await?;
    let (input, output) =
        relay::client::media_channels(&started).map_err(|e| anyhow::anyhow!(e))?;
    let segments: Vec<bytes::Bytes> = (0..MEDIA_SEGMENTS).map(ts_segment).collect();
    let back =
        relay::client::media::roundtrip(&input, &output, segments.clone(), Duration::from_secs(10))
            .await
            .context("media did not pass through the runner")?;
    anyhow::ensure!(
        back == segments,
        "media came back changed: {} of {MEDIA_SEGMENTS} segments identical",
        back.iter().zip(&segments).filter(|(a, b)| a == b).count()
    );
    logging::say!("demo: {MEDIA_SEGMENTS} MPEG-TS segments published to the stream's input came back from its output byte for byte");
    let half = Duration::from_secs_f64(args.duration_secs.max(0.2) / 2.0);
    tokio::time::sleep(half).await;

    logging::say!("demo: injecting a pipeline error (simulated CUDA OOM in the output loop)");
    client
        .set_parameters(
            json!({"inject_error": "CUDA out of memory (simulated)", "media_loop": "output"}),
        )
        .await?;
    if args.burst > 0 {
        logging::say!(
            "demo: bursting {} heartbeats as fast as possible",
            args.burst
        );
        burst(args.burst, session).await;
    }
    tokio::time::sleep(half).await;
    let status = client.api("GET", "/api/v1/pipeline/status", None).await?;
    tracing::info!(answer = %serde_json::to_string(&status).unwrap_or_default(), "api answered");
    logging::say!("demo: stopping the stream");
    client.stop_stream().await?;
    Ok(())
}

/// Media segments the demo sends through the runner's passthrough.
const MEDIA_SEGMENTS: u64 = 3;

/// A synthetic MPEG-TS segment: 188-byte packets (sync byte 0x47, a PID, a counter, a payload
/// that differs per segment), which the passthrough must return unchanged.
fn ts_segment(n: u64) -> bytes::Bytes {
    let mut out = Vec::with_capacity(188 * 64);
    for packet in 0..64u64 {
        out.push(0x47);
        out.extend_from_slice(&[0x01, 0x00, 0x10 | (packet % 16) as u8]);
        out.extend((0..184u64).map(|i| ((n * 131 + packet * 7 + i) % 251) as u8));
    }
    bytes::Bytes::from(out)
}

/// Emits `n` heartbeats from a plain thread, as a busy media loop would.
async fn burst(n: u64, session: &SessionIds) {
    let session = session.clone();
    let emitting = tokio::task::spawn_blocking(move || {
        for i in 0..n {
            let mut fields = Fields::new().meta("burst_seq", i).meta("mode", "local");
            if let Some(id) = &session.session_id {
                fields = fields.session_id(id.clone());
            }
            if let Some(id) = &session.connection_id {
                fields = fields.connection_id(id.clone());
            }
            telemetry::publish_event("stream_heartbeat", fields);
        }
    });
    if emitting.await.is_err() {
        tracing::warn!("the burst thread panicked");
    }
}

struct Summary {
    runner: RunnerReport,
    client: ClientReport,
    egress: SinkStats,
    elapsed: Duration,
}

impl Summary {
    /// Every event the runner emitted was egressed, counted as dropped, or counted lost in
    /// transit (and each of those reported downstream).
    fn accounted(&self) -> bool {
        let c = &self.client;
        let relayed_events = c.relayed.saturating_sub(c.runner_loss_reports);
        let dropped = self.dropped();
        self.runner.sink.emitted == relayed_events + dropped + c.lost_in_transit
            && c.dropped_reported == dropped
            && self.egress.delivered + self.egress.dropped() == c.relayed + c.transit_gaps
    }

    /// The runner's drops, less lines its writer lost after taking them (the client counts
    /// those as lost in transit).
    fn dropped(&self) -> u64 {
        self.runner.sink.dropped() - self.runner.transit.lost_downstream
    }

    /// The runner's accounting (delivered: acknowledged by the trickle server) and the egress's.
    fn hops(&self) -> (Accounting, Accounting) {
        (self.runner.telemetry(), Accounting::of_sink(&self.egress))
    }

    fn to_json(&self) -> serde_json::Value {
        let (runner, egress) = self.hops();
        json!({
            "telemetry": runner,
            "egress": egress,
            "emitted": self.runner.sink.emitted,
            "relayed": self.client.relayed,
            "egressed": self.egress.delivered,
            "dropped": self.dropped(),
            "dropped_reported": self.client.dropped_reported,
            "lost_in_transit": self.client.lost_in_transit,
            "drop_reports": self.runner.sink.reports,
            "rejected": self.client.rejected_foreign + self.client.rejected_invalid,
            "bad_lines": self.client.bad_lines,
            "latency_ms": self.client.latency_ms,
            "accounted": self.accounted(),
            "elapsed_ms": self.elapsed.as_millis() as u64,
        })
    }

    fn print(&self) {
        let r = &self.runner.sink;
        let c = &self.client;
        logging::say!("");
        logging::say!("demo summary ({:.1} s)", self.elapsed.as_secs_f64());
        logging::say!("  emitted by the runner      {:>8}", r.emitted);
        logging::say!(
            "  relayed by the client      {:>8}  (incl. {} telemetry_dropped reports)",
            c.relayed,
            r.reports
        );
        logging::say!("  egressed                   {:>8}", self.egress.delivered);
        logging::say!(
            "  dropped (runner counted)   {:>8}  (lifecycle/error {}, heartbeats {}); reported downstream {}",
            r.dropped(),
            r.dropped_high,
            r.dropped_low,
            c.dropped_reported
        );
        logging::say!(
            "  lost in transit            {:>8}  (counted by the client in {} gap(s), reported downstream)",
            c.lost_in_transit, c.transit_gaps
        );
        logging::say!(
            "  rejected                   {:>8}  (foreign session {}, invalid {})",
            c.rejected_foreign + c.rejected_invalid,
            c.rejected_foreign,
            c.rejected_invalid
        );
        logging::say!("  bad lines skipped          {:>8}", c.bad_lines);
        let (runner, egress) = self.hops();
        logging::say!("  runner telemetry           {runner}");
        logging::say!("  client egress              {egress}");
        match c.latency_ms {
            Some([p50, p99, max]) => logging::say!(
                "  latency origin->egress     median {p50} ms, p99 {p99} ms, max {max} ms"
            ),
            None => logging::say!("  latency                    n/a"),
        }
        logging::say!(
            "  every event accounted for  {}",
            if self.accounted() {
                "yes: emitted = relayed + dropped + lost in transit"
            } else {
                "NO"
            }
        );
    }
}
