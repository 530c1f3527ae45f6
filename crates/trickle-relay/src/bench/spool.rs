//! `trickle-relay bench spool`: accepted events per second through the durable disk buffer.
//!
//! Scenarios, each repeated `--repeat` times in a fresh directory (median and spread reported):
//! * `append_group`: `append` of `--event-bytes` events under the default group commit, one
//!   thread; also the per-append latency (p50/p99/max) and the final `sync`.
//! * `append_group_threads`: the same from `--threads` threads at once (when above 1).
//! * `append_never`: no fsync at all, the floor the other figures compare to.
//! * `append_always`: fsync before every append returns (`--always-events` of them).
//! * `read_ack`: drain what `append_group` wrote with `read_batch(500, 1,000,000)` + `ack`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
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
    max: Spread,
}

/// The whole report.
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
    anyhow::ensure!(
        args.events > 0 && args.always_events > 0,
        "--events and --always-events must be at least 1"
    );
    let json = args.json;
    let report = tokio::task::spawn_blocking(move || run_blocking(&args)).await??;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(())
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

fn run_blocking(args: &Args) -> anyhow::Result<Report> {
    let (root, remove_root) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos();
            (
                std::env::temp_dir().join(format!(
                    "trickle-relay-bench-spool-{}-{nanos}",
                    std::process::id()
                )),
                true,
            )
        }
    };
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let result = scenarios(args, &root);
    if remove_root {
        let _ = std::fs::remove_dir_all(&root);
    }
    let scenarios = result?;
    Ok(Report {
        bench: "spool",
        dir: root.display().to_string(),
        event_bytes: args.event_bytes,
        repeat: args.repeat,
        scenarios,
    })
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

fn scenarios(args: &Args, root: &Path) -> anyhow::Result<Vec<Scenario>> {
    let payload = event(args.event_bytes);
    let group = SyncPolicy::default();
    let mut g_rate = vec![];
    let (mut p50, mut p99, mut pmax, mut g_sync) = (vec![], vec![], vec![], vec![]);
    let (mut t_rate, mut n_rate, mut a_rate, mut r_rate) = (vec![], vec![], vec![], vec![]);
    for r in 0..args.repeat {
        // Group commit, one thread, with per-append latency.
        let dir = root.join(format!("group-{r}"));
        let (spool, _) = Spool::open(&dir, options(args, group))?;
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
        let start = Instant::now();
        for _ in 0..args.events {
            let t = Instant::now();
            spool.append(&payload)?;
            hist.saturating_record(t.elapsed().as_nanos() as u64);
        }
        let elapsed = start.elapsed();
        let t = Instant::now();
        spool.sync()?;
        g_sync.push(ms(t.elapsed()));
        g_rate.push(args.events as f64 / elapsed.as_secs_f64());
        p50.push(hist.value_at_quantile(0.5) as f64 / 1000.0);
        p99.push(hist.value_at_quantile(0.99) as f64 / 1000.0);
        pmax.push(hist.max() as f64 / 1000.0);
        anyhow::ensure!(spool.dropped_records() == 0, "the benchmark hit the cap");

        // Drain it: read a batch, ack it, as the reporter does after a 200.
        let start = Instant::now();
        let mut drained = 0u64;
        loop {
            let batch = spool.read_batch(500, 1_000_000)?;
            let Some(last) = batch.last() else { break };
            spool.ack(last.id)?;
            drained += batch.len() as u64;
        }
        r_rate.push(drained as f64 / start.elapsed().as_secs_f64());
        anyhow::ensure!(
            drained == args.events,
            "drained {drained} of {} events",
            args.events
        );
        drop(spool);
        let _ = std::fs::remove_dir_all(&dir);

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
                    std::thread::spawn(move || -> Result<(), spool::SpoolError> {
                        for _ in 0..per {
                            s.append(&p)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("an appending thread panicked"))??;
            }
            t_rate.push((per * args.threads) as f64 / start.elapsed().as_secs_f64());
            drop(spool);
            let _ = std::fs::remove_dir_all(&dir);
        }

        n_rate.push(append_rate(
            &root.join(format!("never-{r}")),
            options(args, SyncPolicy::Never),
            &payload,
            args.events,
        )?);
        a_rate.push(append_rate(
            &root.join(format!("always-{r}")),
            options(args, SyncPolicy::Always),
            &payload,
            args.always_events,
        )?);
    }

    let mut out = vec![Scenario {
        name: "append_group",
        policy: format!("{group:?}"),
        events: args.events,
        events_per_sec: Spread::of(g_rate),
        append_latency_us: Some(Latency {
            p50: Spread::of(p50),
            p99: Spread::of(p99),
            max: Spread::of(pmax),
        }),
        final_sync_ms: Some(Spread::of(g_sync)),
    }];
    if args.threads > 1 {
        out.push(Scenario {
            name: "append_group_threads",
            policy: format!("{group:?}, {} threads", args.threads),
            events: args.events / args.threads * args.threads,
            events_per_sec: Spread::of(t_rate),
            append_latency_us: None,
            final_sync_ms: None,
        });
    }
    out.push(plain(
        "append_never",
        SyncPolicy::Never,
        args.events,
        n_rate,
    ));
    out.push(plain(
        "append_always",
        SyncPolicy::Always,
        args.always_events,
        a_rate,
    ));
    out.push(Scenario {
        name: "read_ack",
        policy: format!("read_batch(500, 1000000) + ack, {group:?}"),
        events: args.events,
        events_per_sec: Spread::of(r_rate),
        append_latency_us: None,
        final_sync_ms: None,
    });
    Ok(out)
}

fn plain(name: &'static str, policy: SyncPolicy, events: u64, rates: Vec<f64>) -> Scenario {
    Scenario {
        name,
        policy: format!("{policy:?}"),
        events,
        events_per_sec: Spread::of(rates),
        append_latency_us: None,
        final_sync_ms: None,
    }
}

/// Appends `events` copies of `payload` into a fresh spool at `dir`; returns events per second.
fn append_rate(dir: &Path, opts: SpoolOptions, payload: &[u8], events: u64) -> anyhow::Result<f64> {
    let (spool, _) = Spool::open(dir, opts)?;
    let start = Instant::now();
    for _ in 0..events {
        spool.append(payload)?;
    }
    let rate = events as f64 / start.elapsed().as_secs_f64();
    drop(spool);
    let _ = std::fs::remove_dir_all(dir);
    Ok(rate)
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
                "  {:<22} append latency p50 {:.2} us, p99 {:.2} us, max {:.0} us (medians over runs; max spread {:.0}..{:.0} us)",
                "", l.p50.median, l.p99.median, l.max.median, l.max.min, l.max.max
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
