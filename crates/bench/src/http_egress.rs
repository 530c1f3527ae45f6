//! `trickle-relay bench http-egress`: the HTTP metrics reporter, into its disk buffer and through
//! to a collector.
//!
//! Scenarios, each repeated `--repeat` times in fresh directories (median, min and max reported):
//! * `accept`: events/s accepted by the reporter, i.e. `emit` until every event is appended to
//!   the disk buffer (default group-commit sync policy), with nothing listening for the sender.
//!   Also the cost of the `emit` calls alone.
//! * `e2e_plain` / `e2e_gzip`: events/s from the first `emit` until a real in-process collector
//!   (loopback HTTP, JSONL output fsynced before each 200) acknowledged every event, with bodies
//!   uncompressed or gzip-compressed. Each event is a ~500-byte forwarded envelope.
//!
//! `--plot` draws each `emit` call's latency (every call is timed, which adds the timer's
//! ~40 ns to `emit_ns_per_event`) and, for the first run of each scenario, events emitted
//! (dashed) and accepted or acknowledged (solid) per time bucket.

use super::report::{
    self, CommonArgs, Labels, LatencySeries, Recording, Sampler, ScratchDir, Spread, Timeline,
};
use collector::{ApiKeys, Collector, CollectorConfig, JsonlOutput, Output};
use hdrhistogram::Histogram;
use reporter::{FlushOutcome, GzipMode, Reporter, ReporterConfig};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::{Envelope, Event, Fields, RawEnvelope, Sink};

/// Arguments of this benchmark.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Events per run.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Runs of each scenario; the summary gives the median, min and max.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Directory to run in (fresh subdirectories per run, removed afterwards); default: a
    /// temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Serialize, Debug)]
struct Scenario {
    name: &'static str,
    what: &'static str,
    events: u64,
    events_per_sec: Spread,
    #[serde(skip_serializing_if = "Option::is_none")]
    emit_ns_per_event: Option<Spread>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requests: Option<Spread>,
}

#[derive(Serialize, Debug)]
struct Report {
    dir: String,
    event_bytes: usize,
    repeat: usize,
    scenarios: Vec<Scenario>,
}

/// Runs this benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    args.common.check()?;
    anyhow::ensure!(args.repeat > 0, "--repeat must be at least 1");
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    let root = ScratchDir::new(args.dir.as_deref(), "http")?;
    let (scenarios, event_bytes, recording) = scenarios(&args, root.path()).await?;
    let report = Report {
        dir: root.path().display().to_string(),
        event_bytes,
        repeat: args.repeat,
        scenarios,
    };
    let labels = Labels {
        title: format!(
            "trickle-relay bench http-egress: {} x {}-byte envelopes per run",
            args.events, event_bytes
        ),
        params: format!(
            "reporter into its disk buffer (accept) and to a loopback collector (e2e); {} run(s) per scenario, {} CPU(s)",
            args.repeat,
            report::cpus()
        ),
        latency: "per emit call, all runs".into(),
        throughput: "first run; dashed: emitted".into(),
        unit: "events/s".into(),
        scale: 1.0,
        since: "the first emit".into(),
    };
    report::finish(
        "http-egress",
        &args.common,
        &report,
        &recording,
        &labels,
        || print_human(&report),
    )
}

/// What one run records for the plot: each emit call's latency, and the emitted and
/// accepted-or-acknowledged counts over time.
struct Traced {
    hist: Histogram<u64>,
    emitted: Timeline,
    done: Timeline,
}

/// Emits every event, timing each call.
fn emit_all(reporter: &Reporter, events: Vec<RawEnvelope>) -> Histogram<u64> {
    let mut hist = report::histogram();
    for e in events {
        let t = Instant::now();
        reporter.emit(Event::Raw(e));
        report::record(&mut hist, t.elapsed());
    }
    hist
}

/// `n` forwarded envelopes (as the client hands them to its egress), each with its own id.
fn envelopes(n: u64) -> Vec<RawEnvelope> {
    (0..n)
        .map(|i| {
            let fields = Fields::new()
                .session_id("bench-session")
                .connection_id("bench-connection")
                .pipeline_ids(["passthrough"])
                .meta("mode", "video")
                .meta("frames_in", i)
                .meta("frames_out", i)
                .meta("fps_in", 29.97)
                .meta("fps_out", 29.97)
                .meta("elapsed_ms", i * 33)
                .meta("since_last_heartbeat_ms", 1000)
                .meta("pipeline_fps", 30.0)
                .meta("vram_allocated_mb", 10240.5)
                .meta("vram_reserved_mb", 12288.0);
            let mut raw = RawEnvelope::parse(Envelope::new("stream_heartbeat", fields).to_json())
                .expect("a built envelope parses");
            raw.annotate_relayed_via("trickle");
            raw
        })
        .collect()
}

fn base_config(url: &str, dir: &Path, n: u64) -> ReporterConfig {
    ReporterConfig::new(url, "bench-key")
        .with_buffer_path(Some(dir.to_path_buf()))
        .with_max_buffer(n as usize + 1000)
        .with_handoff_capacity((n as usize).max(65_536))
        .with_flush_timeout(Duration::from_secs(120))
}

async fn scenarios(args: &Args, root: &Path) -> anyhow::Result<(Vec<Scenario>, usize, Recording)> {
    let n = args.events;
    let sample = envelopes(1);
    let event_bytes = sample[0].as_bytes().len();
    let (mut acc_rate, mut emit_ns) = (vec![], vec![]);
    let (mut plain_rate, mut plain_req, mut gz_rate, mut gz_req) = (vec![], vec![], vec![], vec![]);
    let names = ["accept", "e2e_plain", "e2e_gzip"];
    let mut hists: Vec<Histogram<u64>> = names.iter().map(|_| report::histogram()).collect();
    let mut firsts: Vec<Option<Traced>> = names.iter().map(|_| None).collect();
    let mut keep = |i: usize, traced: Traced| -> anyhow::Result<()> {
        hists[i].add(&traced.hist)?;
        firsts[i].get_or_insert(traced);
        Ok(())
    };
    let bar = report::progress(args.repeat as u64 * 3, "http-egress");
    for r in 0..args.repeat {
        let events = envelopes(n);
        let dir = root.join(format!("accept-{r}"));
        let (rate, ns, traced) =
            tokio::task::spawn_blocking(move || accept_run(&dir, events)).await??;
        acc_rate.push(rate);
        emit_ns.push(ns);
        keep(0, traced)?;
        bar.inc(1);

        for (i, gzip, rates, reqs) in [
            (1, GzipMode::Never, &mut plain_rate, &mut plain_req),
            (2, GzipMode::Auto, &mut gz_rate, &mut gz_req),
        ] {
            let (rate, requests, traced) = e2e_run(root, r, n, gzip).await?;
            rates.push(rate);
            reqs.push(requests);
            keep(i, traced)?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let mut recording = Recording::default();
    for (i, (name, (hist, first))) in names.iter().zip(hists.into_iter().zip(firsts)).enumerate() {
        recording.latency.push(LatencySeries {
            label: name.to_string(),
            hist,
        });
        if let Some(t) = first {
            let what = if i == 0 { "accepted" } else { "acked" };
            recording.achieved_vs_emitted(name, what, t.done, t.emitted, i);
        }
    }
    Ok((
        vec![
            Scenario {
                name: "accept",
                what: "emit until appended to the disk buffer (default group commit), sender idle",
                events: n,
                events_per_sec: Spread::of(acc_rate),
                emit_ns_per_event: Some(Spread::of(emit_ns)),
                requests: None,
            },
            Scenario {
                name: "e2e_plain",
                what: "emit until a loopback collector acknowledged all (JSONL fsynced), no gzip",
                events: n,
                events_per_sec: Spread::of(plain_rate),
                emit_ns_per_event: None,
                requests: Some(Spread::of(plain_req)),
            },
            Scenario {
                name: "e2e_gzip",
                what: "the same with gzip bodies (the collector advertises gzip)",
                events: n,
                events_per_sec: Spread::of(gz_rate),
                emit_ns_per_event: None,
                requests: Some(Spread::of(gz_req)),
            },
        ],
        event_bytes,
        recording,
    ))
}

/// Emits every event into a reporter whose endpoint is down; returns (accepted/s, emit ns/event).
fn accept_run(dir: &Path, events: Vec<RawEnvelope>) -> anyhow::Result<(f64, f64, Traced)> {
    let n = events.len() as u64;
    // Nothing listens on port 9 of loopback: the sender backs off and stays out of the way.
    let config = base_config("http://127.0.0.1:9/v1/metrics", dir, n)
        .with_backoff(Duration::from_secs(60), Duration::from_secs(60));
    let reporter = Arc::new(Reporter::start(config)?);
    let start = Instant::now();
    let sampled = Arc::clone(&reporter);
    let sampler = Sampler::start(start, move || {
        let s = sampled.reporter_stats();
        [s.emitted, s.accepted]
    });
    let hist = emit_all(&reporter, events);
    let emitted = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = reporter.reporter_stats();
        anyhow::ensure!(s.dropped() == 0, "the benchmark dropped events: {s:?}");
        if s.accepted >= n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "events not accepted within 300 s: {s:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = start.elapsed();
    let [emitted_line, done] = sampler.stop()?;
    drop(reporter);
    let _ = std::fs::remove_dir_all(dir);
    Ok((
        n as f64 / elapsed.as_secs_f64(),
        emitted.as_nanos() as f64 / n as f64,
        Traced {
            hist,
            emitted: emitted_line,
            done,
        },
    ))
}

/// Reporter to an in-process collector; returns (acknowledged events/s, requests made).
async fn e2e_run(
    root: &Path,
    r: usize,
    n: u64,
    gzip: GzipMode,
) -> anyhow::Result<(f64, f64, Traced)> {
    let tag = if gzip == GzipMode::Never {
        "plain"
    } else {
        "gzip"
    };
    let dir = root.join(format!("e2e-{tag}-{r}"));
    let out = root.join(format!("e2e-{tag}-{r}.jsonl"));
    let output: Arc<dyn Output> = Arc::new(JsonlOutput::open(&out)?);
    let keys = Arc::new(ApiKeys::from_keys(["bench-key"]));
    let config = CollectorConfig {
        rate_per_sec: 0.0,
        ..CollectorConfig::default()
    };
    let collector = Collector::new(config, keys, output);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/metrics", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(collector.clone().serve(listener, async move {
        let _ = stop_rx.await;
    }));
    let events = envelopes(n);
    let rdir = dir.clone();
    let (rate, requests, traced) = tokio::task::spawn_blocking(move || {
        let reporter = Arc::new(Reporter::start(
            base_config(&url, &rdir, n).with_gzip(gzip),
        )?);
        let start = Instant::now();
        let sampled = Arc::clone(&reporter);
        let sampler = Sampler::start(start, move || {
            let s = sampled.reporter_stats();
            [s.emitted, s.acked]
        });
        let hist = emit_all(&reporter, events);
        let outcome = reporter.flush_timeout(Duration::from_secs(300));
        let elapsed = start.elapsed();
        let [emitted, done] = sampler.stop()?;
        let s = reporter.reporter_stats();
        anyhow::ensure!(
            outcome == FlushOutcome::Drained && s.acked == n,
            "not all delivered: {outcome:?} {s:?}"
        );
        drop(reporter);
        let traced = Traced {
            hist,
            emitted,
            done,
        };
        anyhow::Ok((n as f64 / elapsed.as_secs_f64(), s.requests as f64, traced))
    })
    .await??;
    let written = collector.stats().accepted;
    let _ = stop_tx.send(());
    let _ = server.await;
    anyhow::ensure!(written == n, "the collector wrote {written} of {n} events");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&out);
    Ok((rate, requests, traced))
}

fn print_human(r: &Report) {
    println!(
        "http-egress: {}-byte envelopes, {} runs each, in {}",
        r.event_bytes, r.repeat, r.dir
    );
    for s in &r.scenarios {
        let e = s.events_per_sec;
        println!(
            "  {:<10} {:>10.0} events/s  (min {:.0}, max {:.0}; {} events) {}",
            s.name, e.median, e.min, e.max, s.events, s.what
        );
        if let Some(ns) = s.emit_ns_per_event {
            println!(
                "  {:<10} emit {:.0} ns/event (min {:.0}, max {:.0})",
                "", ns.median, ns.min, ns.max
            );
        }
        if let Some(q) = s.requests {
            println!(
                "  {:<10} {:.0} requests (min {:.0}, max {:.0})",
                "", q.median, q.min, q.max
            );
        }
    }
}
