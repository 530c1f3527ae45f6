//! The two child processes of `trickle-relay bench relay` (hidden subcommands).
//!
//! - `bench relay-runner`: runs the real runner role ([`relay::runner::run`], which installs the
//!   real `TrickleEventsSink`), waits for `go` on stdin, then publishes `--events` synthetic
//!   `stream_heartbeat`s with `telemetry::publish_event` from a plain std thread, each carrying
//!   `bench_seq` (0..N) and `emit_us` (unix µs just before the call). It prints `emitted N` progress
//!   lines on stdout and writes a [`RunnerReport`] JSON file when the runner has drained and closed.
//! - `bench relay-client`: runs the real client role ([`relay::client::Client`]) with a
//!   [`CountingSink`] as its egress, prints `ready` once the runner is ready, then `delivered N`
//!   lines, and writes a [`ClientReport`] JSON file when the events channel ends.
//!
//! The parent ([`super::relay`]) starts the server and both children, and reads both reports.

use anyhow::Context as _;
use hdrhistogram::Histogram;
use memchr::memmem::Finder;
use parking_lot::Mutex;
use relay::client::{Client, ClientConfig};
use relay::runner::RunnerConfig;
use relay::SessionIds;
use serde::{Deserialize, Serialize};
use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::{Event, Fields, Sink, SinkStats};
use tokio_util::sync::CancellationToken;

/// The key of each heartbeat's sequence number, as it appears in the envelope.
const SEQ_KEY: &[u8] = b"\"bench_seq\":";
/// The key of each heartbeat's emission time (unix µs).
const EMIT_KEY: &[u8] = b"\"emit_us\":";

/// Session id both children agree on (the client rejects any other).
pub const SESSION_ID: &str = "bench-session";
/// Connection id both children agree on.
pub const CONNECTION_ID: &str = "bench-connection";
/// Width of the throughput windows, in microseconds.
pub const WINDOW_US: u64 = 100_000;
/// An emitter this far ahead of its schedule sleeps; closer, it emits early. It never spins (a
/// spinning emitter would take one of the machine's cores from the pipeline it measures), and it
/// sleeps at most ~2,000 times a second (each sleep is a syscall billed to the runner process).
const SLEEP_AHEAD: Duration = Duration::from_micros(500);

/// Arguments of the hidden `bench relay-runner`.
#[derive(clap::Args, Debug)]
pub struct RunnerArgs {
    /// The control channel (the runner subscribes).
    #[arg(long)]
    pub control_url: String,
    /// The events channel (the runner publishes).
    #[arg(long)]
    pub events_url: String,
    /// Heartbeats to emit.
    #[arg(long)]
    pub events: u64,
    /// Heartbeats per second; 0 emits as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Capacity of the runner's telemetry queue.
    #[arg(long, default_value_t = 256)]
    pub queue_capacity: usize,
    /// The telemetry drain's poll interval, in µs (default: the runner's).
    #[arg(long)]
    pub poll_us: Option<u64>,
    /// The idle drain's wake threshold, in µs (default: the runner's; 0 disables the wake).
    #[arg(long)]
    pub min_idle_us: Option<u64>,
    /// The events writer's segment size, in bytes (default: the runner's).
    #[arg(long)]
    pub segment_bytes: Option<usize>,
    /// Turn the runner's flow control off (it writes as fast as events come).
    #[arg(long)]
    pub no_flow_control: bool,
    /// Where to write the report (JSON).
    #[arg(long)]
    pub report: PathBuf,
}

/// Arguments of the hidden `bench relay-client`.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// The control channel (the client publishes).
    #[arg(long)]
    pub control_url: String,
    /// The events channel (the client subscribes, from its first segment).
    #[arg(long)]
    pub events_url: String,
    /// Heartbeats the runner will emit (sizes the duplicate detector).
    #[arg(long)]
    pub events: u64,
    /// Where to write the report (JSON).
    #[arg(long)]
    pub report: PathBuf,
    /// Give up when the events channel has not ended after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

/// Event counts per fixed window of unix time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Windows {
    /// Unix time of the first window's start, in µs (a multiple of [`WINDOW_US`]).
    pub start_us: u64,
    /// Window width, in µs.
    pub width_us: u64,
    /// Events per window.
    pub counts: Vec<u64>,
}

impl Windows {
    fn new() -> Windows {
        Windows {
            start_us: 0,
            width_us: WINDOW_US,
            counts: Vec::new(),
        }
    }

    /// Counts one event at unix time `t_us`.
    fn add(&mut self, t_us: u64) {
        if self.counts.is_empty() {
            self.start_us = t_us - t_us % self.width_us;
        }
        let Some(i) = t_us
            .checked_sub(self.start_us)
            .map(|d| (d / self.width_us) as usize)
        else {
            return;
        };
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
    }
}

/// What the runner child reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunnerReport {
    /// Heartbeats published.
    pub emitted: u64,
    /// Unix µs of the first and last publish.
    pub first_emit_us: u64,
    /// Unix µs of the last publish.
    pub last_emit_us: u64,
    /// Publishes per window.
    pub windows: Windows,
    /// The runner's telemetry sink counters (all events, heartbeats and lifecycle).
    pub sink: SinkCounts,
    /// Peak resident memory of the process (VmHWM), in KiB.
    pub peak_rss_kib: Option<u64>,
    /// CPU time the process used, in seconds.
    pub cpu_secs: Option<f64>,
    /// Of which the emitter thread (the `publish_event` calls and the pacing), in seconds.
    pub emitter_cpu_secs: Option<f64>,
    /// Bytes the runner wrote on the events channel (newlines included).
    #[serde(default)]
    pub events_bytes: u64,
    /// Of the sink's drops, lines its writer lost after taking them (the client counts those
    /// as lost in transit).
    #[serde(default)]
    pub lost_downstream: u64,
}

/// [`SinkStats`], as the runner child reports it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct SinkCounts {
    /// Events handed to the sink.
    pub emitted: u64,
    /// Events written to the events channel.
    pub delivered: u64,
    /// `High` events dropped.
    pub dropped_high: u64,
    /// `Low` events (heartbeats) dropped.
    pub dropped_low: u64,
    /// Loss reports (`telemetry_dropped`) written.
    pub reports: u64,
    /// Failed writes.
    pub write_errors: u64,
}

impl SinkCounts {
    /// All drops.
    pub fn dropped(&self) -> u64 {
        self.dropped_high + self.dropped_low
    }
}

impl From<SinkStats> for SinkCounts {
    fn from(s: SinkStats) -> Self {
        SinkCounts {
            emitted: s.emitted,
            delivered: s.delivered,
            dropped_high: s.dropped_high,
            dropped_low: s.dropped_low,
            reports: s.reports,
            write_errors: s.write_errors,
        }
    }
}

/// End-to-end latency (emission to egress) quantiles, in µs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyUs {
    /// Median.
    pub median: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
    /// The percentile curve: `[quantile, µs]` points, for plots.
    pub curve: Vec<(f64, f64)>,
}

/// What the client child reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientReport {
    /// Distinct heartbeats egressed.
    pub delivered: u64,
    /// Heartbeats egressed more than once (extra copies).
    pub duplicates: u64,
    /// Heartbeats whose `bench_seq` was missing, unparsable or out of range.
    pub malformed: u64,
    /// Other envelopes egressed (runner_ready, session_closed, telemetry_dropped...).
    pub other_events: u64,
    /// Unix µs of the first and last heartbeat egressed.
    pub first_receive_us: u64,
    /// Unix µs of the last heartbeat egressed.
    pub last_receive_us: u64,
    /// Heartbeats egressed per window.
    pub windows: Windows,
    /// End-to-end latency.
    pub latency_us: Option<LatencyUs>,
    /// The client role's own counters (relayed, rejected, drops the runner reported...), as
    /// [`relay::client::ClientReport`] serializes them.
    pub relay: serde_json::Value,
    /// The events channel ended (else the client timed out).
    pub ended: bool,
    /// Peak resident memory of the process (VmHWM), in KiB.
    pub peak_rss_kib: Option<u64>,
    /// CPU time the process used, in seconds.
    pub cpu_secs: Option<f64>,
}

/// Unix time now, in µs.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Peak resident memory (VmHWM) of process `pid` (`"self"` for this one), in KiB (Linux only).
pub fn peak_rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) used so far by process `pid` (`"self"` for this one,
/// `"thread-self"` for the calling thread), in seconds
/// (Linux only; /proc counts in USER_HZ ticks, 100 per second on every Linux ABI).
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after its ')' are plain numbers.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Writes `value` as JSON to `path`.
fn write_report<T: Serialize>(path: &std::path::Path, value: &T) -> anyhow::Result<()> {
    let json = serde_json::to_vec(value)?;
    std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))
}

/// One progress line on stdout (the parent reads them; a closed pipe is not our problem).
fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

// ---------------------------------------------------------------------------------------------
// Runner child
// ---------------------------------------------------------------------------------------------

/// A realistic heartbeat (the seed's eight metadata fields), tagged with its sequence and time.
fn heartbeat(seq: u64, emit_us: u64) -> Fields {
    Fields::new()
        .session_id(SESSION_ID)
        .connection_id(CONNECTION_ID)
        .pipeline_ids(["passthrough"])
        .meta("bench_seq", seq)
        .meta("emit_us", emit_us)
        .meta("mode", "video")
        .meta("frames_in", seq)
        .meta("frames_out", seq.saturating_sub(1))
        .meta("fps_in", 30.0 - (seq % 7) as f64 * 0.01)
        .meta("fps_out", 29.5 - (seq % 5) as f64 * 0.01)
        .meta("elapsed_ms", seq * 33)
        .meta("since_last_heartbeat_ms", 1000 + seq % 13)
        .meta("pipeline_fps", 30.0)
}

/// What the emitter thread did.
struct Emitted {
    cpu_secs: Option<f64>,
    emitted: u64,
    first_us: u64,
    last_us: u64,
    windows: Windows,
}

/// Waits for `go` on stdin, then publishes `n` heartbeats at `rate` per second (0: flat out).
fn emit_all(n: u64, rate: u64) -> anyhow::Result<Emitted> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the go signal on stdin")?;
    anyhow::ensure!(
        line.trim() == "go",
        "expected `go` on stdin, got {line:?} (this subcommand is driven by `bench relay`)"
    );
    let period_ns = (rate > 0).then(|| 1e9 / rate as f64);
    let mut windows = Windows::new();
    let start = Instant::now();
    let mut next_progress = start + Duration::from_millis(100);
    let first_us = unix_us();
    let mut last_us = first_us;
    for seq in 0..n {
        if let Some(p) = period_ns {
            let due = start + Duration::from_nanos((seq as f64 * p) as u64);
            let now = Instant::now();
            if due > now + SLEEP_AHEAD {
                std::thread::sleep(due - now);
            }
        }
        let t = unix_us();
        telemetry::publish_event("stream_heartbeat", heartbeat(seq, t));
        windows.add(t);
        last_us = t;
        if seq % 256 == 0 && Instant::now() >= next_progress {
            next_progress += Duration::from_millis(100);
            say(format_args!("emitted {seq}"));
        }
    }
    say(format_args!("emitted {n}"));
    Ok(Emitted {
        cpu_secs: cpu_secs("thread-self"),
        emitted: n,
        first_us,
        last_us,
        windows,
    })
}

/// Runs `bench relay-runner`.
pub async fn run_runner(args: RunnerArgs) -> anyhow::Result<()> {
    telemetry::set_telemetry_enabled(true);
    let mut config = RunnerConfig::new(args.control_url, args.events_url);
    config.session = SessionIds {
        session_id: Some(SESSION_ID.into()),
        connection_id: Some(CONNECTION_ID.into()),
    };
    config.runner_job_id = Some("bench".into());
    config.queue_capacity = args.queue_capacity.max(1);
    config.forward_logs = false;
    if let Some(us) = args.poll_us {
        config.telemetry_poll_interval = Duration::from_micros(us);
    }
    match args.min_idle_us {
        Some(0) => config.telemetry_min_idle = Duration::MAX,
        Some(us) => config.telemetry_min_idle = Duration::from_micros(us),
        None => {}
    }
    if let Some(bytes) = args.segment_bytes {
        config.events_segment_bytes = bytes;
    }
    config.flow_control = !args.no_flow_control;
    config.heartbeat_interval = Duration::from_secs(3600);
    let shutdown = CancellationToken::new();
    let mut runner = tokio::spawn(relay::runner::run(config, shutdown.clone()));

    // A plain thread: a tokio worker would keep the sink's drain task waiting in its LIFO slot.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (n, rate) = (args.events, args.rate);
    std::thread::Builder::new()
        .name("bench-emitter".into())
        .spawn(move || {
            let _ = done_tx.send(emit_all(n, rate));
        })
        .context("cannot start the emitter thread")?;

    let emitted = tokio::select! {
        done = done_rx => done.context("the emitter thread died")??,
        ended = &mut runner => {
            let report = ended.context("the runner task failed")??;
            anyhow::bail!("the runner ended before the emitter finished (control channel closed?): {report:?}");
        }
    };
    shutdown.cancel();
    let runner_report = runner.await.context("the runner task failed")??;
    let report = RunnerReport {
        emitted: emitted.emitted,
        first_emit_us: emitted.first_us,
        last_emit_us: emitted.last_us,
        windows: emitted.windows,
        sink: runner_report.sink.into(),
        peak_rss_kib: peak_rss_kib("self"),
        cpu_secs: cpu_secs("self"),
        emitter_cpu_secs: emitted.cpu_secs,
        events_bytes: runner_report.events.bytes_written,
        lost_downstream: runner_report.transit.lost_downstream,
    };
    write_report(&args.report, &report)
}

// ---------------------------------------------------------------------------------------------
// Client child
// ---------------------------------------------------------------------------------------------

/// The client's egress in this bench: records latency, duplicates and throughput per heartbeat.
///
/// Parses only what it needs from each envelope's bytes (`bench_seq`, `emit_us`), so the client
/// process spends its time relaying, not measuring.
pub struct CountingSink {
    state: Mutex<CountState>,
    seq_key: Finder<'static>,
    emit_key: Finder<'static>,
    delivered: AtomicU64,
    events: u64,
}

struct CountState {
    seen: Vec<u64>,
    duplicates: u64,
    malformed: u64,
    other: u64,
    first_us: u64,
    last_us: u64,
    windows: Windows,
    latency: Histogram<u64>,
}

impl CountingSink {
    /// A sink expecting heartbeats `0..events`.
    pub fn new(events: u64) -> CountingSink {
        // 1 µs .. 1 h at 3 significant figures: constant, valid bounds.
        let latency = Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .expect("constant histogram bounds are valid");
        CountingSink {
            state: Mutex::new(CountState {
                seen: vec![0; events.div_ceil(64) as usize],
                duplicates: 0,
                malformed: 0,
                other: 0,
                first_us: 0,
                last_us: 0,
                windows: Windows::new(),
                latency,
            }),
            delivered: AtomicU64::new(0),
            seq_key: Finder::new(SEQ_KEY),
            emit_key: Finder::new(EMIT_KEY),
            events,
        }
    }

    /// Distinct heartbeats so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Relaxed)
    }

    /// Fills the counting part of a report.
    fn report(&self) -> ClientReport {
        let s = self.state.lock();
        let h = &s.latency;
        let latency_us = (!h.is_empty()).then(|| LatencyUs {
            median: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
            curve: super::report::percentile_curve(h, 1.0),
        });
        ClientReport {
            delivered: self.delivered(),
            duplicates: s.duplicates,
            malformed: s.malformed,
            other_events: s.other,
            first_receive_us: s.first_us,
            last_receive_us: s.last_us,
            windows: s.windows.clone(),
            latency_us,
            ..ClientReport::default()
        }
    }
}

/// The unsigned integer right after the key `finder` looks for (e.g. `"bench_seq":`), if any.
pub fn find_u64(bytes: &[u8], finder: &Finder<'_>) -> Option<u64> {
    let at = finder.find(bytes)? + finder.needle().len();
    let (value, digits) = bytes[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold((0u64, 0usize), |(v, n), b| {
            (v.wrapping_mul(10).wrapping_add(u64::from(b - b'0')), n + 1)
        });
    (digits > 0 && digits <= 19).then_some(value)
}

impl Sink for CountingSink {
    fn emit(&self, event: Event) {
        let now = unix_us();
        let bytes = event.to_json();
        let mut s = self.state.lock();
        if event.event_type() != Some("stream_heartbeat") {
            s.other += 1;
            return;
        }
        // `emit_us` follows `bench_seq` (the runner adds them in that order).
        let seq_at = self.seq_key.find(&bytes);
        let (Some(seq), Some(emit_us)) = (
            seq_at.and_then(|at| find_u64(&bytes[at..], &self.seq_key)),
            seq_at.and_then(|at| find_u64(&bytes[at..], &self.emit_key)),
        ) else {
            s.malformed += 1;
            return;
        };
        if seq >= self.events {
            s.malformed += 1;
            return;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if s.seen[word] & bit != 0 {
            s.duplicates += 1;
            return;
        }
        s.seen[word] |= bit;
        self.delivered.fetch_add(1, Relaxed);
        s.latency
            .saturating_record(now.saturating_sub(emit_us).max(1));
        if s.first_us == 0 {
            s.first_us = now;
        }
        s.last_us = now;
        s.windows.add(now);
    }

    fn stats(&self) -> SinkStats {
        let d = self.delivered();
        SinkStats {
            emitted: d,
            delivered: d,
            ..SinkStats::default()
        }
    }

    fn name(&self) -> &'static str {
        "bench_counting"
    }
}

/// Runs `bench relay-client`.
pub async fn run_client(args: ClientArgs) -> anyhow::Result<()> {
    let sink = Arc::new(CountingSink::new(args.events));
    let mut config = ClientConfig::new(args.control_url, args.events_url);
    config.session = SessionIds {
        session_id: Some(SESSION_ID.into()),
        connection_id: Some(CONNECTION_ID.into()),
    };
    // The parent holds the runner until we are ready, so nothing precedes segment 0.
    config.events_start_seq = 0;
    config.ping_interval = Duration::from_secs(3600);
    let client = Client::connect(config, Some(sink.clone() as Arc<dyn Sink>));
    if client.wait_ready(Duration::from_secs(30)).await.is_none() {
        anyhow::bail!("no runner_ready on the events channel within 30 s");
    }
    say(format_args!("ready"));
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    while !client.events_ended() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        say(format_args!("delivered {}", sink.delivered()));
    }
    let ended = client.events_ended();
    let relay_report = client.close(Duration::from_secs(5)).await;
    let mut report = sink.report();
    report.relay = serde_json::to_value(&relay_report)?;
    report.ended = ended;
    report.peak_rss_kib = peak_rss_kib("self");
    report.cpu_secs = cpu_secs("self");
    write_report(&args.report, &report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_integers_after_keys() {
        let line = br#"{"data":{"bench_seq":42,"emit_us":1700000000123456,"x":"y"}}"#;
        let (seq, emit) = (Finder::new(SEQ_KEY), Finder::new(EMIT_KEY));
        assert_eq!(find_u64(line, &seq), Some(42));
        assert_eq!(find_u64(line, &emit), Some(1_700_000_000_123_456));
        assert_eq!(find_u64(line, &Finder::new(b"\"nope\":")), None);
        assert_eq!(find_u64(br#"{"bench_seq":"a"}"#, &seq), None);
    }

    #[test]
    fn windows_count_by_time() {
        let mut w = Windows::new();
        w.add(1_000_050_000);
        w.add(1_000_099_999);
        w.add(1_000_350_000);
        assert_eq!(w.start_us, 1_000_000_000);
        assert_eq!(w.counts, vec![2, 0, 0, 1]);
    }

    #[test]
    fn counting_sink_finds_duplicates_and_others() {
        let sink = CountingSink::new(10);
        let hb = |seq: u64| {
            telemetry::Envelope::new("stream_heartbeat", heartbeat(seq, unix_us())).into()
        };
        sink.emit(hb(1));
        sink.emit(hb(2));
        sink.emit(hb(2));
        sink.emit(hb(11));
        sink.emit(telemetry::Envelope::new("session_closed", Fields::new()).into());
        let r = sink.report();
        assert_eq!(
            (r.delivered, r.duplicates, r.malformed, r.other_events),
            (2, 1, 1, 1)
        );
        assert!(r.latency_us.is_some());
    }
}
