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

use anyhow::Context as _;
use collector::{ApiKeys, Collector, CollectorConfig, JsonlOutput, Output};
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
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// Median and spread of one figure over the repeats.
#[derive(Serialize, Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
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
    bench: &'static str,
    dir: String,
    event_bytes: usize,
    repeat: usize,
    scenarios: Vec<Scenario>,
}

/// Runs this benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.repeat > 0, "--repeat must be at least 1");
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    let (root, remove_root) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos();
            let d = std::env::temp_dir().join(format!(
                "trickle-relay-bench-http-{}-{nanos}",
                std::process::id()
            ));
            (d, true)
        }
    };
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let result = scenarios(&args, &root).await;
    if remove_root {
        let _ = std::fs::remove_dir_all(&root);
    }
    let (scenarios, event_bytes) = result?;
    let report = Report {
        bench: "http-egress",
        dir: root.display().to_string(),
        event_bytes,
        repeat: args.repeat,
        scenarios,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(())
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

async fn scenarios(args: &Args, root: &Path) -> anyhow::Result<(Vec<Scenario>, usize)> {
    let n = args.events;
    let sample = envelopes(1);
    let event_bytes = sample[0].as_bytes().len();
    let (mut acc_rate, mut emit_ns) = (vec![], vec![]);
    let (mut plain_rate, mut plain_req, mut gz_rate, mut gz_req) = (vec![], vec![], vec![], vec![]);
    for r in 0..args.repeat {
        let events = envelopes(n);
        let dir = root.join(format!("accept-{r}"));
        let (rate, ns) = tokio::task::spawn_blocking(move || accept_run(&dir, events)).await??;
        acc_rate.push(rate);
        emit_ns.push(ns);

        for (gzip, rates, reqs) in [
            (GzipMode::Never, &mut plain_rate, &mut plain_req),
            (GzipMode::Auto, &mut gz_rate, &mut gz_req),
        ] {
            let (rate, requests) = e2e_run(root, r, n, gzip).await?;
            rates.push(rate);
            reqs.push(requests);
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
    ))
}

/// Emits every event into a reporter whose endpoint is down; returns (accepted/s, emit ns/event).
fn accept_run(dir: &Path, events: Vec<RawEnvelope>) -> anyhow::Result<(f64, f64)> {
    let n = events.len() as u64;
    // Nothing listens on port 9 of loopback: the sender backs off and stays out of the way.
    let config = base_config("http://127.0.0.1:9/v1/metrics", dir, n)
        .with_backoff(Duration::from_secs(60), Duration::from_secs(60));
    let reporter = Reporter::start(config)?;
    let start = Instant::now();
    for e in events {
        reporter.emit(Event::Raw(e));
    }
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
    drop(reporter);
    let _ = std::fs::remove_dir_all(dir);
    Ok((
        n as f64 / elapsed.as_secs_f64(),
        emitted.as_nanos() as f64 / n as f64,
    ))
}

/// Reporter to an in-process collector; returns (acknowledged events/s, requests made).
async fn e2e_run(root: &Path, r: usize, n: u64, gzip: GzipMode) -> anyhow::Result<(f64, f64)> {
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
    let (rate, requests) = tokio::task::spawn_blocking(move || -> anyhow::Result<(f64, f64)> {
        let reporter = Reporter::start(base_config(&url, &rdir, n).with_gzip(gzip))?;
        let start = Instant::now();
        for e in events {
            reporter.emit(Event::Raw(e));
        }
        let outcome = reporter.flush_timeout(Duration::from_secs(300));
        let elapsed = start.elapsed();
        let s = reporter.reporter_stats();
        anyhow::ensure!(
            outcome == FlushOutcome::Drained && s.acked == n,
            "not all delivered: {outcome:?} {s:?}"
        );
        drop(reporter);
        Ok((n as f64 / elapsed.as_secs_f64(), s.requests as f64))
    })
    .await??;
    let written = collector.stats().accepted;
    let _ = stop_tx.send(());
    let _ = server.await;
    anyhow::ensure!(written == n, "the collector wrote {written} of {n} events");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&out);
    Ok((rate, requests))
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
