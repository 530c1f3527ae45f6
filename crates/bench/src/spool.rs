//! `trickle-relay bench spool`: accepted events per second through the durable disk buffer.
//!
//! Scenarios, each repeated `--repeat` times in a fresh directory (median and spread reported):
//! * `append_group`: `append` of `--event-bytes` events under the default group commit, one
//!   thread; also the per-append latency (p50/p99/p99.9/max) and the final `sync`.
//! * `append_group_threads`: the same from `--threads` threads at once (when above 1).
//! * `append_never`: no fsync at all, the floor the other figures compare to.
//! * `append_always`: fsync before every append returns (`--always-events` of them).
//! * `read_ack`: drain what `append_group` wrote with `read_batch(500, 1,000,000)` + `ack`
//!   (each ack is a durable cursor write: two fsyncs).
//! * `read_ack_never`: the same drain under `SyncPolicy::Never`: what reading alone costs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::report::{
    self, CommonArgs, Labels, LatencySeries, Recording, ScratchDir, Spread, ThroughputSeries,
    Timeline,
};
use hdrhistogram::Histogram;
use serde::Serialize;
use spool::{Spool, SpoolOptions, SyncPolicy};

/// Arguments of this benchmark.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Events appended per run in the group-commit, never-fsync and read+ack scenarios.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Events appended per run under `SyncPolicy::Always` (each one waits for an fsync).
    #[arg(long, default_value_t = 2_000)]
    always_events: u64,
    /// Size of each event in bytes (a typical telemetry envelope is 200 to 2000).
    #[arg(long, default_value_t = 400)]
    event_bytes: usize,
    /// Appending threads in the `append_group_threads` scenario (1 skips it).
    #[arg(long, default_value_t = 4)]
    threads: u64,
    /// Runs of each scenario; the summary gives the median, min and max.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Directory to run in (a fresh subdirectory per run, removed afterwards); default: a
    /// temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

/// One scenario's summary.
#[derive(Serialize, Debug)]
struct Scenario {
    name: &'static str,
    policy: String,
    events: u64,
    events_per_sec: Spread,
    #[serde(skip_serializing_if = "Option::is_none")]
    append_latency_us: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    final_sync_ms: Option<Spread>,
}

/// Per-append latency, each percentile as median over the repeats.
#[derive(Serialize, Debug)]
struct Latency {
    p50: Spread,
    p99: Spread,
    p999: Spread,
    max: Spread,
}

/// The whole report.
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
    anyhow::ensure!(
        args.events > 0 && args.always_events > 0,
        "--events and --always-events must be at least 1"
    );
    let (args, report, recording) = tokio::task::spawn_blocking(move || {
        let (report, recording) = run_blocking(&args)?;
        anyhow::Ok((args, report, recording))
    })
    .await??;
    let labels = Labels {
        title: format!(
            "trickle-relay bench spool: {} x {}-byte events per run",
            args.events, args.event_bytes
        ),
        params: format!(
            "{} run(s) per scenario, {} always-fsync events, {} threads, {} CPU(s), in {}",
            args.repeat,
            args.always_events,
            args.threads,
            report::cpus(),
            args.dir
                .as_ref()
                .map_or("a temporary directory".to_string(), |d| d
                    .display()
                    .to_string())
        ),
        latency: "per append, all runs".into(),
        throughput: "first run of each scenario".into(),
        unit: "events/s".into(),
        scale: 1.0,
        since: "the scenario started".into(),
    };
    report::finish("spool", &args.common, &report, &recording, &labels, || {
        print_human(&report)
    })
}

/// A realistic envelope padded to `len` bytes.
fn event(len: usize) -> Vec<u8> {
    let mut e = br#"{"id":"6f1c2a0e-5b7d-4c1e-9a53-2f0f6d1b8c44","type":"stream_trace","timestamp":"1718000000000","data":{"type":"stream_heartbeat","client_source":"scope","session_id":"s-1","connection_id":"c-1","frames_in":1234,"pad":""#.to_vec();
    while e.len() + 3 < len {
        e.push(b'x');
    }
    e.extend_from_slice(b"\"}}");
    e.truncate(len.max(1));
    e
}

fn run_blocking(args: &Args) -> anyhow::Result<(Report, Recording)> {
    let root = ScratchDir::new(args.dir.as_deref(), "spool")?;
    let (scenarios, recording) = scenarios(args, root.path())?;
    Ok((
        Report {
            dir: root.path().display().to_string(),
            event_bytes: args.event_bytes,
            repeat: args.repeat,
            scenarios,
        },
        recording,
    ))
}

/// Options sized so the benchmark never hits the cap (drops would flatter the figures).
fn options(args: &Args, sync: SyncPolicy) -> SpoolOptions {
    let need = (args.events + args.always_events) * (args.event_bytes as u64 + 8) * 2;
    let defaults = SpoolOptions::default();
    SpoolOptions {
        max_bytes: defaults.max_bytes.max(need),
        max_record_bytes: defaults.max_record_bytes.max(args.event_bytes),
        sync,
        ..defaults
    }
}

/// The figures of one scenario over its runs.
struct Runs {
    rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    max: Vec<f64>,
    sync_ms: Vec<f64>,
    /// Every timed call of every run, for the plot.
    hist: Histogram<u64>,
    /// The first run's counts over time, for the plot.
    timeline: Option<Timeline>,
}

impl Default for Runs {
    fn default() -> Runs {
        Runs {
            rate: Vec::new(),
            p50: Vec::new(),
            p99: Vec::new(),
            p999: Vec::new(),
            max: Vec::new(),
            sync_ms: Vec::new(),
            hist: report::histogram(),
            timeline: None,
        }
    }
}

impl Runs {
    /// Keeps the first run's timeline.
    fn keep(&mut self, timeline: Timeline) {
        self.timeline.get_or_insert(timeline);
    }

    /// Adds this scenario's lines to the plot.
    fn plot(&self, name: &str, color: usize, rec: &mut Recording) {
        if !self.hist.is_empty() {
            rec.latency.push(LatencySeries {
                label: name.to_string(),
                hist: self.hist.clone(),
            });
        }
        if let Some(t) = &self.timeline {
            rec.throughput.push(ThroughputSeries {
                label: name.to_string(),
                timeline: t.clone(),
                dashed: name.starts_with("read"),
                color,
            });
        }
    }

    fn summary(self, name: &'static str, policy: String, events: u64) -> Scenario {
        let latency = (!self.p50.is_empty()).then(|| Latency {
            p50: Spread::of(self.p50),
            p99: Spread::of(self.p99),
            p999: Spread::of(self.p999),
            max: Spread::of(self.max),
        });
        Scenario {
            name,
            policy,
            events,
            events_per_sec: Spread::of(self.rate),
            append_latency_us: latency,
            final_sync_ms: (!self.sync_ms.is_empty()).then(|| Spread::of(self.sync_ms)),
        }
    }
}

fn scenarios(args: &Args, root: &Path) -> anyhow::Result<(Vec<Scenario>, Recording)> {
    let payload = event(args.event_bytes);
    let steps = args.repeat as u64 * if args.threads > 1 { 4 } else { 3 };
    let bar = report::progress(steps, "spool");
    let group = SyncPolicy::default();
    let (mut g, mut t, mut n) = (Runs::default(), Runs::default(), Runs::default());
    let (mut a, mut ra, mut rn) = (Runs::default(), Runs::default(), Runs::default());
    for r in 0..args.repeat {
        // Group commit, one thread; then drain it as the reporter does (read, POST, ack).
        let dir = root.join(format!("group-{r}"));
        let spool = append_run(&dir, options(args, group), &payload, args.events, &mut g)?;
        let start = Instant::now();
        spool.sync()?;
        g.sync_ms.push(ms(start.elapsed()));
        drain(&spool, args.events, &mut ra)?;
        drop(spool);
        let _ = std::fs::remove_dir_all(&dir);
        bar.inc(1);

        // No fsync at all; the drain then shows what reading alone costs.
        let dir = root.join(format!("never-{r}"));
        let spool = append_run(
            &dir,
            options(args, SyncPolicy::Never),
            &payload,
            args.events,
            &mut n,
        )?;
        drain(&spool, args.events, &mut rn)?;
        drop(spool);
        let _ = std::fs::remove_dir_all(&dir);
        bar.inc(1);

        let dir = root.join(format!("always-{r}"));
        let spool = append_run(
            &dir,
            options(args, SyncPolicy::Always),
            &payload,
            args.always_events,
            &mut a,
        )?;
        drop(spool);
        let _ = std::fs::remove_dir_all(&dir);
        bar.inc(1);

        // Group commit from several threads at once.
        if args.threads > 1 {
            let dir = root.join(format!("threads-{r}"));
            let (spool, _) = Spool::open(&dir, options(args, group))?;
            let spool = Arc::new(spool);
            let per = args.events / args.threads;
            let start = Instant::now();
            let handles: Vec<_> = (0..args.threads)
                .map(|_| {
                    let (s, p) = (Arc::clone(&spool), payload.clone());
                    std::thread::spawn(move || -> Result<_, spool::SpoolError> {
                        let (mut hist, mut timeline) = (report::histogram(), Timeline::new(start));
                        for _ in 0..per {
                            let t = Instant::now();
                            s.append(&p)?;
                            let done = Instant::now();
                            report::record(&mut hist, done - t);
                            timeline.record(done, 1);
                        }
                        Ok((hist, timeline))
                    })
                })
                .collect();
            let mut timeline = Timeline::new(start);
            for h in handles {
                let (hist, tl) = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("an appending thread panicked"))??;
                t.hist.add(&hist)?;
                timeline.merge(&tl);
            }
            t.rate
                .push((per * args.threads) as f64 / start.elapsed().as_secs_f64());
            t.keep(timeline);
            drop(spool);
            let _ = std::fs::remove_dir_all(&dir);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let mut rec = Recording::default();
    g.plot("append_group", 0, &mut rec);
    t.plot("append_group_threads", 1, &mut rec);
    n.plot("append_never", 2, &mut rec);
    a.plot("append_always", 3, &mut rec);
    ra.plot("read_ack", 0, &mut rec);
    rn.plot("read_ack_never", 2, &mut rec);
    let mut out = vec![g.summary("append_group", format!("{group:?}"), args.events)];
    if args.threads > 1 {
        let policy = format!("{group:?}, {} threads", args.threads);
        out.push(t.summary(
            "append_group_threads",
            policy,
            args.events / args.threads * args.threads,
        ));
    }
    out.push(n.summary("append_never", "Never".into(), args.events));
    out.push(a.summary("append_always", "Always".into(), args.always_events));
    let read = "read_batch(500, 1000000) + ack";
    out.push(ra.summary("read_ack", format!("{read}, {group:?}"), args.events));
    out.push(rn.summary("read_ack_never", format!("{read}, Never"), args.events));
    Ok((out, rec))
}

/// Appends `events` copies of `payload` into a fresh spool at `dir`, timing each append; returns
/// the spool for what comes next.
fn append_run(
    dir: &Path,
    opts: SpoolOptions,
    payload: &[u8],
    events: u64,
    runs: &mut Runs,
) -> anyhow::Result<Spool> {
    let (spool, _) = Spool::open(dir, opts)?;
    let mut hist = report::histogram();
    let start = Instant::now();
    let mut timeline = Timeline::new(start);
    for _ in 0..events {
        let t = Instant::now();
        spool.append(payload)?;
        let done = Instant::now();
        report::record(&mut hist, done - t);
        timeline.record(done, 1);
    }
    runs.rate
        .push(events as f64 / start.elapsed().as_secs_f64());
    runs.hist.add(&hist)?;
    runs.keep(timeline);
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    runs.p50.push(us(0.5));
    runs.p99.push(us(0.99));
    runs.p999.push(us(0.999));
    runs.max.push(hist.max() as f64 / 1000.0);
    anyhow::ensure!(spool.dropped_records() == 0, "the benchmark hit the cap");
    Ok(spool)
}

/// Reads and acknowledges batches until the spool is empty; records events per second.
fn drain(spool: &Spool, expected: u64, runs: &mut Runs) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut timeline = Timeline::new(start);
    let mut drained = 0u64;
    loop {
        let batch = spool.read_batch(500, 1_000_000)?;
        let Some(last) = batch.last() else { break };
        spool.ack(last.id)?;
        drained += batch.len() as u64;
        timeline.record(Instant::now(), batch.len() as u64);
    }
    anyhow::ensure!(
        drained == expected,
        "drained {drained} of {expected} events"
    );
    runs.rate
        .push(drained as f64 / start.elapsed().as_secs_f64());
    runs.keep(timeline);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_human(r: &Report) {
    println!(
        "spool: {}-byte events, {} runs each, in {}",
        r.event_bytes, r.repeat, r.dir
    );
    for s in &r.scenarios {
        let e = s.events_per_sec;
        println!(
            "  {:<22} {:>12.0} events/s  (min {:.0}, max {:.0}; {} events; {})",
            s.name, e.median, e.min, e.max, s.events, s.policy
        );
        if let Some(l) = &s.append_latency_us {
            println!(
                "  {:<22} append latency p50 {:.2} us, p99 {:.2} us, p99.9 {:.1} us, max {:.0} us \
                 (medians over runs; max ranged {:.0}..{:.0} us)",
                "", l.p50.median, l.p99.median, l.p999.median, l.max.median, l.max.min, l.max.max
            );
        }
        if let Some(f) = &s.final_sync_ms {
            println!(
                "  {:<22} final sync {:.2} ms (min {:.2}, max {:.2})",
                "", f.median, f.min, f.max
            );
        }
    }
}
