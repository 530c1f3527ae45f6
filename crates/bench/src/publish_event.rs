//! `trickle-relay bench publish-event`: what one `telemetry::publish_event` call costs its caller.
//!
//! Each call builds a realistic `stream_heartbeat` (session and connection ids plus the seed's eight
//! heartbeat metadata fields) and publishes it through the real [`TrickleEventsSink`], whose drain
//! writes to a real `JsonlWriter` on an in-process trickle server (loopback HTTP), read back by a
//! `JsonlReader` (or, with `--output discard`, to a discarding output). Each call is timed alone
//! with `Instant` (the timer's own cost is measured and reported). Scenarios: no sink installed
//! (the no-op), one thread, and `--threads` threads contending on the same sink.
//!
//! By default callers run flat out (`--rate 0`), so the 256-event queue is full and most calls also
//! evict (and free) an older heartbeat: the worst case. `--rate` paces each thread instead.
//!
//! `--plot` draws each scenario's per-call latency and its calls per time bucket (all threads).

use super::report::{
    self, CommonArgs, Labels, LatencySeries, Recording, ThroughputSeries, Timeline,
};
use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::output::Discard;
use telemetry::sinks::{SessionContext, TrickleEventsConfig, TrickleEventsSink};
use telemetry::{install_sink, publish_event, set_telemetry_enabled, Fields, SinkStats};
use tokio::runtime::Handle;
use trickle::jsonl::{
    JsonlReader, JsonlReaderOptions, JsonlWriter, JsonlWriterOptions, JSONL_CONTENT_TYPE,
};
use trickle::publisher::{Publisher, PublisherOptions};
use trickle::server::{Server, ServerConfig};
use trickle::subscriber::{Subscriber, SubscriberOptions};

/// Where the sink's drain writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// A real JsonlWriter on an in-process trickle server, read back by a JsonlReader.
    Trickle,
    /// Count and forget (isolates the caller-side cost from HTTP).
    Discard,
}

/// Arguments of this benchmark.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Measured calls per thread (after the warm-up).
    #[arg(long, default_value_t = 1_000_000)]
    pub calls: u64,
    /// Threads in the contended scenario (the single-thread scenario always runs too).
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Unmeasured calls per thread before measuring.
    #[arg(long, default_value_t = 20_000)]
    pub warmup: u64,
    /// Calls per second per thread; 0 runs flat out (queue full: the worst case).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// With `--rate`, wait between calls by spinning (the caller's core stays busy and its
    /// caches warm, like a media thread's) instead of sleeping and yielding.
    #[arg(long)]
    pub spin: bool,
    /// Capacity of the sink's queue.
    #[arg(long, default_value_t = 256)]
    pub capacity: usize,
    /// Where the sink's drain writes.
    #[arg(long, value_enum, default_value_t = OutputKind::Trickle)]
    pub output: OutputKind,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The seed's heartbeat: ids plus eight metadata fields, values varying per call.
fn heartbeat(i: u64) -> Fields {
    Fields::new()
        .session_id("5b0d8c1e-3f2a-4c47-9d51-8f2e4b6a7c90")
        .connection_id("conn-7f3a9b2c")
        .meta("mode", "video")
        .meta("frames_in", i)
        .meta("frames_out", i.saturating_sub(3))
        .meta("fps_in", 30.0 - (i % 7) as f64 * 0.01)
        .meta("fps_out", 29.5 - (i % 5) as f64 * 0.01)
        .meta("elapsed_ms", i * 33)
        .meta("since_last_heartbeat_ms", 1000 + i % 13)
        .meta("pipeline_fps", 24.75)
}

fn new_histogram() -> Histogram<u64> {
    report::histogram()
}

/// Median cost of `Instant::now()` + `elapsed()`, the measurement's own overhead.
fn timer_overhead_ns() -> u64 {
    let mut h = new_histogram();
    for _ in 0..200_000 {
        let t = Instant::now();
        let d = t.elapsed();
        h.saturating_record(d.as_nanos() as u64);
    }
    h.value_at_quantile(0.5)
}

/// What one calling thread measured: each call's latency, calls over time, and its wall time.
type Called = (Histogram<u64>, Timeline, Duration);

/// One calling thread: warm-up, then `calls` timed calls.
fn caller(calls: u64, warmup: u64, rate: u64, spin: bool, seed: u64) -> Called {
    let mut h = new_histogram();
    for i in 0..warmup {
        publish_event("stream_heartbeat", heartbeat(seed + i));
    }
    let period = (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64));
    let start = Instant::now();
    let mut timeline = Timeline::new(start);
    for i in 0..calls {
        if let Some(p) = period {
            // Pace without spinning, so paced callers leave the CPUs to the drain.
            let due = start + p.mul_f64(i as f64);
            loop {
                let now = Instant::now();
                if now >= due {
                    break;
                }
                if spin {
                    std::hint::spin_loop();
                } else if due - now > Duration::from_micros(200) {
                    std::thread::sleep(due - now - Duration::from_micros(100));
                } else {
                    std::thread::yield_now();
                }
            }
        }
        let t = Instant::now();
        publish_event("stream_heartbeat", heartbeat(seed + warmup + i));
        let done = Instant::now();
        h.saturating_record((done - t).as_nanos() as u64);
        timeline.record(done, 1);
    }
    (h, timeline, start.elapsed())
}

struct Scenario {
    name: &'static str,
    threads: usize,
    hist: Histogram<u64>,
    /// Calls over time, all threads.
    timeline: Timeline,
    wall: Duration,
    sink: Option<SinkStats>,
    received: Option<u64>,
    /// From the first call to the last line received (sink drained, writer closed).
    end_to_end: Option<Duration>,
}

async fn run_callers(threads: usize, args: &Args) -> anyhow::Result<Called> {
    let (calls, warmup, rate, spin) = (args.calls, args.warmup, args.rate, args.spin);
    let joined = tokio::task::spawn_blocking(move || {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                std::thread::Builder::new()
                    .name(format!("caller-{t}"))
                    .spawn(move || caller(calls, warmup, rate, spin, t as u64 * 1_000_000_000))
            })
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for h in handles {
            out.push(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a caller thread panicked"))?,
            );
        }
        anyhow::Ok(out)
    })
    .await??;
    let mut hist = new_histogram();
    let mut wall = Duration::ZERO;
    let origin = joined
        .iter()
        .map(|(_, t, _)| t.origin())
        .min()
        .unwrap_or_else(Instant::now);
    let mut timeline = Timeline::new(origin);
    for (h, t, w) in joined {
        hist.add(&h).context("merging histograms")?;
        timeline.merge(&t);
        wall = wall.max(w);
    }
    Ok((hist, timeline, wall))
}

/// A sink draining to the chosen output; returns it, and what ends the output afterwards.
struct Target {
    sink: Arc<TrickleEventsSink>,
    finish: Box<dyn FnOnce() -> tokio::task::JoinHandle<anyhow::Result<Option<u64>>> + Send>,
}

async fn target(args: &Args, name: &str) -> anyhow::Result<Target> {
    let session = SessionContext {
        session_id: Some("bench-session".into()),
        connection_id: Some("bench-connection".into()),
    };
    let config = TrickleEventsConfig {
        capacity: args.capacity,
        ..TrickleEventsConfig::default()
    };
    match args.output {
        OutputKind::Discard => {
            let out = Discard::new();
            let sink =
                TrickleEventsSink::spawn_on(&Handle::current(), out.clone(), session, config);
            Ok(Target {
                sink,
                finish: Box::new(move || tokio::spawn(async move { Ok(Some(out.lines())) })),
            })
        }
        OutputKind::Trickle => {
            // No autocreate: the channel is created here, and a late POST must not bring it back
            // after the writer's DELETE (the reader would then wait on a live channel).
            let server = Server::bind("127.0.0.1:0".parse()?, ServerConfig::default())
                .await
                .context("binding the in-process trickle server")?;
            server
                .channels()
                .create(name, Some(JSONL_CONTENT_TYPE))
                .map_err(|e| anyhow::anyhow!("creating channel {name}: {e}"))?;
            let url = format!("{}/{name}", server.url());
            let mut reader = JsonlReader::new(
                Subscriber::new(
                    &url,
                    SubscriberOptions {
                        start_seq: 0,
                        ..Default::default()
                    },
                ),
                JsonlReaderOptions::default(),
            );
            let reading = tokio::spawn(async move {
                let mut n = 0u64;
                while reader.next::<serde::de::IgnoredAny>().await?.is_some() {
                    n += 1;
                }
                anyhow::Ok(n)
            });
            let writer = JsonlWriter::new(
                Publisher::new(
                    &url,
                    PublisherOptions {
                        content_type: JSONL_CONTENT_TYPE.to_string(),
                        ..Default::default()
                    },
                ),
                JsonlWriterOptions::default(),
            );
            let sink =
                TrickleEventsSink::spawn_on(&Handle::current(), writer.clone(), session, config);
            Ok(Target {
                sink,
                finish: Box::new(move || {
                    tokio::spawn(async move {
                        writer.close().await.context("closing the events writer")?;
                        let n = tokio::time::timeout(Duration::from_secs(60), reading)
                            .await
                            .context("the events reader did not finish")???;
                        server.shutdown().await;
                        Ok(Some(n))
                    })
                }),
            })
        }
    }
}

async fn with_sink(name: &'static str, threads: usize, args: &Args) -> anyhow::Result<Scenario> {
    let t = target(args, name).await?;
    let guard = install_sink(t.sink.clone());
    let started = Instant::now();
    let (hist, timeline, wall) = run_callers(threads, args).await?;
    drop(guard);
    let stats = t.sink.shutdown().await;
    let received = (t.finish)().await??;
    Ok(Scenario {
        name,
        threads,
        hist,
        timeline,
        wall,
        sink: Some(stats),
        received,
        end_to_end: Some(started.elapsed()),
    })
}

/// Events delivered to the output per second, from the first call until the sink drained.
fn delivered_per_s(s: &Scenario) -> Option<f64> {
    let (stats, e2e) = (s.sink.as_ref()?, s.end_to_end?);
    Some(stats.delivered as f64 / e2e.as_secs_f64())
}

/// Runs the benchmark and prints the summary.
pub async fn run(args: Args) -> anyhow::Result<()> {
    args.common.check()?;
    anyhow::ensure!(args.calls > 0, "--calls must be at least 1");
    anyhow::ensure!(args.threads > 0, "--threads must be at least 1");
    set_telemetry_enabled(true);
    let timer_ns = timer_overhead_ns();

    let mut scenarios = Vec::new();
    let (hist, timeline, wall) = run_callers(1, &args).await?;
    scenarios.push(Scenario {
        name: "no_sink",
        threads: 1,
        hist,
        timeline,
        wall,
        sink: None,
        received: None,
        end_to_end: None,
    });
    scenarios.push(with_sink("one_thread", 1, &args).await?);
    if args.threads > 1 {
        scenarios.push(with_sink("contended", args.threads, &args).await?);
    }

    let cpus = report::cpus();
    let mut recording = Recording::default();
    for (i, s) in scenarios.iter().enumerate() {
        let label = format!(
            "{} ({} thread{})",
            s.name,
            s.threads,
            if s.threads == 1 { "" } else { "s" }
        );
        recording.latency.push(LatencySeries {
            label: label.clone(),
            hist: s.hist.clone(),
        });
        recording.throughput.push(ThroughputSeries {
            label,
            timeline: s.timeline.clone(),
            dashed: false,
            color: i,
        });
    }
    let rate = if args.rate == 0 {
        "flat out".to_string()
    } else {
        format!("{}/s per thread", args.rate)
    };
    let labels = Labels {
        title: format!(
            "trickle-relay bench publish-event: {} calls per thread, {rate}",
            args.calls
        ),
        params: format!(
            "stream_heartbeat (2 ids + 8 metadata), output {:?}, queue {}, {} contending threads, {cpus} CPU(s); timer overhead {timer_ns} ns included",
            args.output, args.capacity, args.threads
        ),
        latency: "per publish_event call".into(),
        throughput: "calls, all threads".into(),
        unit: "calls/s".into(),
        scale: 1.0,
        since: "the first measured call".into(),
    };
    let list: Vec<_> = scenarios
        .iter()
        .map(|s| {
            let h = &s.hist;
            json!({
                "scenario": s.name,
                "threads": s.threads,
                "calls": h.len(),
                "ns": {
                    "median": h.value_at_quantile(0.5),
                    "p99": h.value_at_quantile(0.99),
                    "p999": h.value_at_quantile(0.999),
                    "max": h.max(),
                    "mean": h.mean(),
                },
                "calls_per_s": h.len() as f64 / s.wall.as_secs_f64(),
                "sink": s.sink,
                "lines_received": s.received,
                "delivered_per_s": delivered_per_s(s),
            })
        })
        .collect();
    // The bench name stays `publish_event` in the JSON (scripts match on it); the
    // shared printer adds the other common fields.
    let body = json!({
        "output": format!("{:?}", args.output).to_lowercase(),
        "capacity": args.capacity,
        "rate_per_thread": args.rate,
        "timer_overhead_ns": timer_ns,
        "scenarios": list,
    });
    report::finish(
        "publish_event",
        &args.common,
        body,
        &recording,
        &labels,
        || print_human(&args, &scenarios, timer_ns, cpus),
    )
}

/// The text summary.
fn print_human(args: &Args, scenarios: &[Scenario], timer_ns: u64, cpus: usize) {
    println!(
        "publish_event: stream_heartbeat (2 ids + 8 metadata), output {:?}, capacity {}, rate {}, {} CPUs",
        args.output,
        args.capacity,
        if args.rate == 0 { "flat out".to_string() } else { format!("{}/s per thread", args.rate) },
        cpus
    );
    println!("timer overhead (Instant::now + elapsed, median): {timer_ns} ns, included below");
    println!(
        "{:<11} {:>7} {:>10} {:>9} {:>9} {:>9} {:>10} {:>12}",
        "scenario", "threads", "calls", "median", "p99", "p99.9", "max", "calls/s"
    );
    for s in scenarios {
        let h = &s.hist;
        println!(
            "{:<11} {:>7} {:>10} {:>7}ns {:>7}ns {:>7}ns {:>8}ns {:>12.0}",
            s.name,
            s.threads,
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
            h.len() as f64 / s.wall.as_secs_f64()
        );
    }
    for s in scenarios {
        if let Some(st) = &s.sink {
            println!(
                "{:<11} sink: emitted {} delivered {} ({:.0}/s end to end) dropped {} (high {}, low {}) loss reports {} write errors {}; lines received {}",
                s.name,
                st.emitted,
                st.delivered,
                delivered_per_s(s).unwrap_or(0.0),
                st.dropped(),
                st.dropped_high,
                st.dropped_low,
                st.reports,
                st.write_errors,
                s.received.map_or("-".to_string(), |n| n.to_string()),
            );
        }
    }
}
