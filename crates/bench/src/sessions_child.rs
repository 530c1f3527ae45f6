//! The two child processes of `trickle-relay bench sessions` (hidden subcommands): every runner in
//! one process, every client in another, each session on its own pair of channels.
//!
//! - `bench sessions-clients` sets the sessions up, at most `--window` at a time: it creates a
//!   session's two channels, connects the real client role ([`relay::client::Client`], egressing
//!   to a per-session [`SessionSink`]), prints `start I` (the parent forwards it to the runners'
//!   stdin), waits for that runner's `runner_ready`, and starts the stream. Once every session
//!   streams it prints `up SECS`. On stdin, `mark` answers `count N` (telemetry egressed so far)
//!   and switches the steady-state latency recording on (first mark) or off (second); `stop`
//!   tears every session down (`stop_stream`, then closing the client, which ends its runner)
//!   and prints `down SECS` once every events channel has ended, then writes its report.
//! - `bench sessions-runners` starts the real runner role ([`relay::runner::run`]) for session I
//!   on `start I`, each with its own sink (not the process-wide one: there are N of them here) and
//!   its simulated pipeline emitting a heartbeat every `--heartbeat-ms`. It writes its report once
//!   every runner it started has ended (its control channel closed), or when stdin ends and
//!   nothing runs.
//!
//! Both spread their connections over `--source-ips` (session I connects from address I mod K):
//! one source address has ~28,000 ephemeral ports towards one server port.

use anyhow::Context as _;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use relay::client::{Client, ClientConfig};
use relay::runner::RunnerConfig;
use relay::SessionIds;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::{Event, Sink, SinkStats};
use tokio::io::AsyncBufReadExt as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::relay_child::{cpu_secs, peak_rss_kib, unix_us};

/// The event type runners report their drops with (not an event of the session itself).
const DROPPED: &str = relay::client::DROPPED_EVENT_TYPE;

/// Arguments shared by both children.
#[derive(clap::Args, Debug, Clone)]
pub struct SessionArgs {
    /// Base URL of the trickle server (autocreate on).
    #[arg(long)]
    pub server: String,
    /// Channel name prefix of this run: session I uses `{tag}-{I}-control` and `{tag}-{I}-events`.
    #[arg(long)]
    pub tag: String,
    /// Sessions.
    #[arg(long)]
    pub sessions: usize,
    /// Source addresses, comma-separated (session I connects from address I mod K).
    #[arg(long, value_delimiter = ',', required = true)]
    pub source_ips: Vec<IpAddr>,
    /// Where to write the report (JSON).
    #[arg(long)]
    pub report: PathBuf,
}

impl SessionArgs {
    fn url(&self, i: usize, channel: &str) -> String {
        format!(
            "{}/{}-{i}-{channel}",
            self.server.trim_end_matches('/'),
            self.tag
        )
    }

    fn ids(&self, i: usize) -> SessionIds {
        SessionIds {
            session_id: Some(format!("{}-{i}", self.tag)),
            connection_id: Some(format!("{}-{i}-c", self.tag)),
        }
    }

    fn source(&self, i: usize) -> IpAddr {
        self.source_ips[i % self.source_ips.len()]
    }
}

/// Arguments of the hidden `bench sessions-runners`.
#[derive(clap::Args, Debug)]
pub struct RunnersArgs {
    #[command(flatten)]
    pub common: SessionArgs,
    /// Heartbeat interval of every session's pipeline, in ms.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
}

/// Arguments of the hidden `bench sessions-clients`.
#[derive(clap::Args, Debug)]
pub struct ClientsArgs {
    #[command(flatten)]
    pub common: SessionArgs,
    /// Sessions being set up, or torn down, at once.
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// How long one session may take to set up (runner ready, stream started), in seconds.
    #[arg(long, default_value_t = 120)]
    pub setup_timeout_secs: u64,
}

/// One line on stdout for the parent (a closed pipe is not our problem).
fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn write_report<T: Serialize>(path: &std::path::Path, value: &T) -> anyhow::Result<()> {
    let json = serde_json::to_vec(value)?;
    std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Runners
// ---------------------------------------------------------------------------------------------

/// What one runner counted.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct RunnerCounts {
    /// Events its sink was handed (lifecycle and heartbeats).
    pub emitted: u64,
    /// Events written to its events channel.
    pub delivered: u64,
    /// Events dropped (counted, reported as `telemetry_dropped`).
    pub dropped: u64,
    /// Loss reports written.
    pub reports: u64,
    /// Events-channel lines lost in failed segments.
    pub lines_lost: u64,
    /// The runner ended with an error.
    pub failed: bool,
}

/// What `bench sessions-runners` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunnersReport {
    /// Per session, by index (`None`: never started).
    pub sessions: Vec<Option<RunnerCounts>>,
    /// The first runner error, if any.
    pub first_error: Option<String>,
    /// Peak resident memory (VmHWM), in KiB.
    pub peak_rss_kib: Option<u64>,
    /// CPU time of the process, in seconds.
    pub cpu_secs: Option<f64>,
}

/// Runs `bench sessions-runners`.
pub async fn run_runners(args: RunnersArgs) -> anyhow::Result<()> {
    telemetry::set_telemetry_enabled(true);
    let n = args.common.sessions;
    let shutdown = CancellationToken::new();
    let mut runners: JoinSet<(usize, anyhow::Result<relay::runner::RunnerReport>)> = JoinSet::new();
    let mut report = RunnersReport {
        sessions: vec![None; n],
        ..RunnersReport::default()
    };
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let (mut started, mut ended) = (0usize, 0usize);
    let mut last_progress = Instant::now();
    loop {
        if ended == n || (!stdin_open && runners.is_empty()) {
            break;
        }
        tokio::select! {
            line = stdin.next_line(), if stdin_open => match line {
                Ok(Some(line)) => {
                    let Some(i) = line.strip_prefix("start ").and_then(|i| i.trim().parse::<usize>().ok()) else {
                        continue;
                    };
                    if i >= n || report.sessions[i].is_some() {
                        continue;
                    }
                    report.sessions[i] = Some(RunnerCounts::default());
                    started += 1;
                    let mut config = RunnerConfig::new(args.common.url(i, "control"), args.common.url(i, "events"));
                    config.session = args.common.ids(i);
                    config.runner_job_id = Some(format!("bench-{i}"));
                    config.heartbeat_interval = Duration::from_millis(args.heartbeat_ms.max(1));
                    config.forward_logs = false;
                    config.install_sink = false;
                    config.local_address = Some(args.common.source(i));
                    let token = shutdown.child_token();
                    runners.spawn(async move { (i, relay::runner::run(config, token).await) });
                }
                _ => stdin_open = false,
            },
            Some(done) = runners.join_next(), if !runners.is_empty() => {
                ended += 1;
                let (i, result) = done.context("a runner task panicked")?;
                let counts = match result {
                    Ok(r) => RunnerCounts {
                        emitted: r.sink.emitted,
                        delivered: r.sink.delivered,
                        dropped: r.sink.dropped(),
                        reports: r.sink.reports,
                        lines_lost: r.events.lines_lost,
                        failed: false,
                    },
                    Err(e) => {
                        report.first_error.get_or_insert_with(|| format!("session {i}: {e:#}"));
                        RunnerCounts { failed: true, ..RunnerCounts::default() }
                    }
                };
                report.sessions[i] = Some(counts);
                if last_progress.elapsed() >= Duration::from_millis(200) || ended == n {
                    last_progress = Instant::now();
                    say(format_args!("ended {ended} of {started}"));
                }
            }
        }
    }
    shutdown.cancel();
    while let Some(done) = runners.join_next().await {
        let _ = done;
    }
    report.peak_rss_kib = peak_rss_kib("self");
    report.cpu_secs = cpu_secs("self");
    write_report(&args.common.report, &report)
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// Latency recordings shared by every session's sink.
struct Recorder {
    /// Every event egressed, in µs (origin timestamp to egress).
    all: Mutex<Histogram<u64>>,
    /// Events egressed between the two `mark`s (all sessions up, before teardown).
    steady: Mutex<Histogram<u64>>,
    steady_on: AtomicBool,
    /// Events egressed so far (loss reports excluded).
    egressed: AtomicU64,
}

impl Recorder {
    fn new() -> Recorder {
        // 1 µs .. 1 h at 3 significant figures: constant, valid bounds.
        let h = || {
            Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("constant histogram bounds are valid")
        };
        Recorder {
            all: Mutex::new(h()),
            steady: Mutex::new(h()),
            steady_on: AtomicBool::new(false),
            egressed: AtomicU64::new(0),
        }
    }
}

/// One session's egress: counts what its client egressed, finds duplicates by envelope id, and
/// records origin-to-egress latency (the envelope's `timestamp`, unix ms, to now: 1 ms resolution).
pub struct SessionSink {
    recorder: Arc<Recorder>,
    hasher: RandomState,
    state: Mutex<SessionState>,
}

#[derive(Default)]
struct SessionState {
    /// Hashes of the ids seen (64-bit: a false duplicate among a session's events is ~1e-12).
    ids: HashSet<u64>,
    egressed: u64,
    duplicates: u64,
    reports: u64,
    by_type: Vec<(String, u64)>,
}

impl Sink for SessionSink {
    fn emit(&self, event: Event) {
        let now = unix_us();
        let ts_ms = event.timestamp().and_then(|t| t.parse::<u64>().ok());
        let id = self.hasher.hash_one(event.id().as_ref());
        let event_type = event.event_type().unwrap_or("-");
        let mut s = self.state.lock();
        if event_type == DROPPED {
            s.reports += 1;
            return;
        }
        if !s.ids.insert(id) {
            s.duplicates += 1;
            return;
        }
        s.egressed += 1;
        match s.by_type.iter_mut().find(|(t, _)| t == event_type) {
            Some((_, n)) => *n += 1,
            None => s.by_type.push((event_type.to_string(), 1)),
        }
        drop(s);
        self.recorder.egressed.fetch_add(1, Relaxed);
        if let Some(ts) = ts_ms {
            let us = now.saturating_sub(ts.saturating_mul(1000)).max(1);
            self.recorder.all.lock().saturating_record(us);
            if self.recorder.steady_on.load(Relaxed) {
                self.recorder.steady.lock().saturating_record(us);
            }
        }
    }

    fn stats(&self) -> SinkStats {
        let n = self.state.lock().egressed;
        SinkStats {
            emitted: n,
            delivered: n,
            ..SinkStats::default()
        }
    }

    fn name(&self) -> &'static str {
        "bench_session"
    }
}

/// What one client counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientCounts {
    /// Session events egressed (distinct ids; loss reports excluded).
    pub egressed: u64,
    /// Events egressed more than once (extra copies).
    pub duplicates: u64,
    /// Loss reports (`telemetry_dropped`) received.
    pub reports: u64,
    /// Drops the runner reported in them.
    pub dropped_reported: u64,
    /// Telemetry rejected (foreign or invalid) and bad lines: must be 0.
    pub rejected: u64,
    /// Events-channel segments skipped or broken off (their events lost): must be 0.
    pub skipped_segments: u64,
    /// The events channel ended (the runner closed it) within the teardown.
    pub ended: bool,
    /// Egressed per event type.
    pub by_type: Vec<(String, u64)>,
    /// Why the session failed to set up or tear down, if it did.
    pub error: Option<String>,
}

/// Latency quantiles, in µs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Quantiles {
    /// Samples.
    pub samples: u64,
    /// Median.
    pub median: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Quantiles {
    fn of(h: &Histogram<u64>) -> Quantiles {
        if h.is_empty() {
            return Quantiles::default();
        }
        Quantiles {
            samples: h.len(),
            median: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What `bench sessions-clients` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientsReport {
    /// Per session, by index.
    pub sessions: Vec<ClientCounts>,
    /// From the first channel creation to every session streaming, in seconds.
    pub setup_secs: f64,
    /// From `stop` to every events channel ended, in seconds.
    pub teardown_secs: f64,
    /// Sessions that failed to set up.
    pub setup_failures: u64,
    /// Latency of every event egressed.
    pub latency_all_us: Quantiles,
    /// Latency of the events egressed between the two marks (steady state).
    pub latency_steady_us: Quantiles,
    /// The steady-state latency's percentile curve, `[quantile, µs]`, for the plot.
    pub steady_curve: Vec<(f64, f64)>,
    /// Peak resident memory (VmHWM), in KiB.
    pub peak_rss_kib: Option<u64>,
    /// CPU time of the process, in seconds.
    pub cpu_secs: Option<f64>,
}

/// A set-up session: its client and its sink.
struct Live {
    client: Client,
    sink: Arc<SessionSink>,
}

/// Creates a channel by `POST {url}` on a shared keep-alive client (thousands of them: one
/// connection each would fill the source address's ports with TIME_WAITs).
async fn create_channel(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let response = http
        .post(url)
        .header(trickle::headers::EXPECT_CONTENT, "application/jsonl")
        .send()
        .await
        .with_context(|| format!("cannot create {url}"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "creating {url} answered {} (is autocreate on?)",
        response.status()
    );
    Ok(())
}

/// Sets up session `i`: channels, client, runner (through the parent), ready, stream started.
async fn set_up(
    args: Arc<ClientsArgs>,
    http: reqwest::Client,
    recorder: Arc<Recorder>,
    i: usize,
) -> anyhow::Result<Live> {
    let (control, events) = (args.common.url(i, "control"), args.common.url(i, "events"));
    create_channel(&http, &control).await?;
    create_channel(&http, &events).await?;
    let sink = Arc::new(SessionSink {
        recorder,
        hasher: RandomState::new(),
        state: Mutex::new(SessionState::default()),
    });
    let mut config = ClientConfig::new(control, events);
    config.session = args.common.ids(i);
    // The runner starts after the client subscribed: its first line is in segment 0.
    config.events_start_seq = 0;
    config.local_address = Some(args.common.source(i));
    let client = Client::connect(config, Some(sink.clone() as Arc<dyn Sink>));
    say(format_args!("start {i}"));
    let timeout = Duration::from_secs(args.setup_timeout_secs);
    let started = async {
        anyhow::ensure!(
            client.wait_ready(timeout).await.is_some(),
            "session {i}: no runner_ready within {timeout:?}"
        );
        client
            .start_stream(serde_json::json!({}))
            .await
            .with_context(|| format!("session {i}: start_stream"))?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = started {
        // Its runner ends when its control channel goes; nothing else would end it.
        for url in [args.common.url(i, "control"), args.common.url(i, "events")] {
            let _ = http.delete(url).send().await;
        }
        return Err(e);
    }
    Ok(Live { client, sink })
}

/// Tears session `i` down: stop the stream, close the client (its runner then ends and closes
/// the events channel), and count what its sink saw.
async fn tear_down(i: usize, live: Live) -> (usize, ClientCounts) {
    let mut error = live
        .client
        .stop_stream()
        .await
        .err()
        .map(|e| format!("session {i}: stop_stream: {e}"));
    let report = live.client.close(Duration::from_secs(60)).await;
    let s = live.sink.state.lock();
    let ended = report.events_ended;
    if !ended && error.is_none() {
        error = Some(format!(
            "session {i}: the events channel did not end within 60 s (events reconnects {}, resumed {}, broken {}, skipped {})",
            report.events_reconnects,
            report.events_resumed_segments,
            report.events_broken_segments,
            report.events_skipped_segments
        ));
    }
    let counts = ClientCounts {
        egressed: s.egressed,
        duplicates: s.duplicates,
        reports: s.reports,
        dropped_reported: report.dropped_reported,
        rejected: report.rejected_foreign + report.rejected_invalid + report.bad_lines,
        skipped_segments: report.events_skipped_segments + report.events_broken_segments,
        ended,
        by_type: s.by_type.clone(),
        error,
    };
    (i, counts)
}

/// Runs `bench sessions-clients`.
pub async fn run_clients(args: ClientsArgs) -> anyhow::Result<()> {
    let n = args.common.sessions;
    let window = args.window.max(1);
    let args = Arc::new(args);
    let recorder = Arc::new(Recorder::new());
    let http = reqwest::Client::builder()
        .http1_only()
        .no_gzip()
        .local_address(args.common.source_ips.first().copied())
        .pool_max_idle_per_host(window)
        .build()?;
    let mut report = ClientsReport {
        sessions: vec![ClientCounts::default(); n],
        ..ClientsReport::default()
    };
    let mut live: Vec<Option<Live>> = (0..n).map(|_| None).collect();

    // Set up, at most `window` sessions at once.
    let setup_start = Instant::now();
    let mut setting_up = JoinSet::new();
    let mut next = 0usize;
    let mut up = 0usize;
    let mut last_progress = Instant::now();
    while next < n || !setting_up.is_empty() {
        while next < n && setting_up.len() < window {
            let i = next;
            next += 1;
            let (args, http, recorder) = (args.clone(), http.clone(), recorder.clone());
            setting_up.spawn(async move { (i, set_up(args, http, recorder, i).await) });
        }
        let Some(done) = setting_up.join_next().await else {
            break;
        };
        let (i, result) = done.context("a set-up task panicked")?;
        match result {
            Ok(session) => {
                live[i] = Some(session);
                up += 1;
            }
            Err(e) => {
                report.setup_failures += 1;
                report.sessions[i].error = Some(format!("{e:#}"));
            }
        }
        if last_progress.elapsed() >= Duration::from_millis(200) {
            last_progress = Instant::now();
            say(format_args!("progress {up} of {n}"));
        }
    }
    report.setup_secs = setup_start.elapsed().as_secs_f64();
    say(format_args!("up {:.3} {up}", report.setup_secs));

    // Steady state: answer marks until told to stop.
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        match stdin.next_line().await {
            Ok(Some(line)) if line == "mark" => {
                let on = !recorder.steady_on.load(Relaxed);
                // Count first when switching on, last when switching off: the window is inside.
                let count = recorder.egressed.load(Relaxed);
                recorder.steady_on.store(on, Relaxed);
                say(format_args!("count {count}"));
            }
            Ok(Some(line)) if line == "stop" => break,
            Ok(Some(_)) => {}
            // The parent went away: tear down anyway, so the runners end.
            _ => break,
        }
    }

    // Tear down, at most `window` sessions at once.
    let teardown_start = Instant::now();
    let mut tearing_down = JoinSet::new();
    let mut pending = live
        .iter_mut()
        .enumerate()
        .filter_map(|(i, l)| l.take().map(|l| (i, l)));
    let mut down = 0usize;
    loop {
        while tearing_down.len() < window {
            let Some((i, l)) = pending.next() else {
                break;
            };
            tearing_down.spawn(tear_down(i, l));
        }
        let Some(done) = tearing_down.join_next().await else {
            break;
        };
        let (i, counts) = done.context("a teardown task panicked")?;
        report.sessions[i] = counts;
        down += 1;
        if last_progress.elapsed() >= Duration::from_millis(200) {
            last_progress = Instant::now();
            say(format_args!("progress {down} of {up}"));
        }
    }
    report.teardown_secs = teardown_start.elapsed().as_secs_f64();
    report.latency_all_us = Quantiles::of(&recorder.all.lock());
    let steady = recorder.steady.lock();
    report.latency_steady_us = Quantiles::of(&steady);
    if !steady.is_empty() {
        report.steady_curve = super::report::percentile_curve(&steady, 1.0);
    }
    drop(steady);
    report.peak_rss_kib = peak_rss_kib("self");
    report.cpu_secs = cpu_secs("self");
    write_report(&args.common.report, &report)?;
    say(format_args!("down {:.3}", report.teardown_secs));
    Ok(())
}
