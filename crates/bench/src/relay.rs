//! `trickle-relay bench relay`: the real relay path, as separate processes.
//!
//! Per run: a trickle server process (`trickle-relay serve --autocreate`, unless `--server` names
//! one), two channels created over HTTP, a client process (`bench relay-client`: the real client
//! role egressing to a counting sink) and a runner process (`bench relay-runner`: the real runner
//! role and its `TrickleEventsSink`, fed `--events` heartbeats by `publish_event` from a plain
//! thread at `--rate`). The runner is held until the client has seen `runner_ready`, so every
//! heartbeat is on the channel while the client reads it.
//!
//! Reported per run, then as median and spread over `--repeat` runs: emitted, delivered (distinct
//! heartbeats egressed), dropped (counted by the runner's sink; also what reached the client in
//! `telemetry_dropped`), lost (`emitted - delivered - dropped` of the heartbeats), lost in transit
//! as the client counted it from the runner's line numbers (`telemetry_lost_in_transit`; with
//! flow control on, which is the default, it must be 0), whether the sums close
//! (`emitted = received + dropped + lost in transit` over every event the runner's sink took),
//! duplicates,
//! offered and sustained events/s, end-to-end latency (emission to egress, µs), and each process's
//! peak RSS (VmHWM) and CPU (per event, and per GB carried on the events channel).
//!
//! `--tls` measures HTTPS against plain HTTP in the same invocation: each run is done twice, over
//! plain HTTP and over HTTPS (`serve --tls-self-signed`; runner and client accept its
//! certificate as the reference clients do), alternating, and both are reported with the
//! HTTPS/plain ratios.

use super::plot::{Axis, Figure, Panel, Series};
use super::relay_child::{cpu_secs, peak_rss_kib, ClientReport, LatencyUs, RunnerReport};
use anyhow::{bail, Context as _};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

/// Arguments of `trickle-relay bench relay`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Heartbeats the runner emits per run.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Heartbeats per second (paced); 0 emits as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Use this trickle server (base URL, started with --autocreate) instead of starting one.
    #[arg(long)]
    pub server: Option<String>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Draw the latency percentiles and the throughput over time to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Capacity of the runner's telemetry queue (the seed's is 256).
    #[arg(long, default_value_t = 256)]
    pub queue_capacity: usize,
    /// Runs (each with fresh processes); figures are reported as median and spread.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// The runner's telemetry drain poll interval, in µs (default: the runner's, 1 ms).
    #[arg(long)]
    pub poll_us: Option<u64>,
    /// How long the runner's idle telemetry drain must be parked before an event wakes it, in
    /// µs (default: the runner's, 50 µs); 0 turns the wake off (the drain only polls).
    #[arg(long)]
    pub min_idle_us: Option<u64>,
    /// The runner's events segment size, in bytes (default: the runner's).
    #[arg(long)]
    pub segment_bytes: Option<usize>,
    /// Turn the runner's flow control off: it writes as fast as events come, and a client that
    /// falls out of the server's window loses segments in transit (counted).
    #[arg(long)]
    pub no_flow_control: bool,
    /// Keep the children's logs and reports (their folder is printed on stderr).
    #[arg(long)]
    pub keep_logs: bool,
    /// Also do every run over HTTPS (a server with a self-signed certificate), alternating with
    /// the plain runs; reports both and the HTTPS/plain ratios.
    #[arg(long, conflicts_with = "server")]
    pub tls: bool,
}

/// What one run measured.
struct RunResult {
    /// `run N`, or `plain run N` / `https run N` with `--tls`.
    label: String,
    /// Over HTTPS.
    tls: bool,
    runner: RunnerReport,
    client: ClientReport,
    server_rss_kib: Option<u64>,
    server_cpu_secs: Option<f64>,
}

impl RunResult {
    fn dropped(&self) -> u64 {
        self.runner.sink.dropped()
    }

    fn lost(&self) -> i64 {
        self.runner.emitted as i64 - self.client.delivered as i64 - self.dropped() as i64
    }

    /// One of the client's counters (0 when missing).
    fn relay_count(&self, key: &str) -> u64 {
        self.client
            .relay
            .get(key)
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// Event lines lost between runner and client, as the client counted them (its
    /// `telemetry_lost_in_transit` reports).
    fn lost_in_transit(&self) -> u64 {
        self.relay_count("lost_in_transit")
    }

    /// Every event the runner's sink took is received, dropped at the runner, or counted lost in
    /// transit: `emitted = received + dropped + lost in transit` (loss reports are not events;
    /// lines the writer lost after taking them are counted by the client, not as drops).
    fn sums_close(&self) -> bool {
        let received = self
            .relay_count("telemetry_received")
            .saturating_sub(self.relay_count("runner_loss_reports"));
        let dropped = self.dropped().saturating_sub(self.runner.lost_downstream);
        self.runner.sink.emitted == received + dropped + self.lost_in_transit()
    }

    fn emit_secs(&self) -> f64 {
        (self
            .runner
            .last_emit_us
            .saturating_sub(self.runner.first_emit_us)) as f64
            / 1e6
    }

    fn offered_per_s(&self) -> f64 {
        per_s(self.runner.emitted, self.emit_secs())
    }

    /// From the first emission to the last egress.
    fn duration_secs(&self) -> f64 {
        (self
            .client
            .last_receive_us
            .saturating_sub(self.runner.first_emit_us)) as f64
            / 1e6
    }

    fn sustained_per_s(&self) -> f64 {
        per_s(self.client.delivered, self.duration_secs())
    }

    fn latency(&self) -> Option<&LatencyUs> {
        self.client.latency_us.as_ref()
    }

    fn to_json(&self) -> Value {
        let l = self.latency();
        json!({
            "emitted": self.runner.emitted,
            "delivered": self.client.delivered,
            "dropped": self.dropped(),
            "dropped_reported": self.client.relay.get("dropped_reported"),
            "lost": self.lost(),
            "lost_in_transit": self.lost_in_transit(),
            "sums_close": self.sums_close(),
            "duplicates": self.client.duplicates,
            "malformed": self.client.malformed,
            "emit_secs": self.emit_secs(),
            "duration_secs": self.duration_secs(),
            "offered_events_per_s": self.offered_per_s(),
            "sustained_events_per_s": self.sustained_per_s(),
            "latency_us": l.map(|l| json!({
                "median": l.median, "p90": l.p90, "p99": l.p99, "p999": l.p999,
                "max": l.max, "mean": l.mean,
            })),
            "peak_rss_kib": {
                "server": self.server_rss_kib,
                "runner": self.runner.peak_rss_kib,
                "client": self.client.peak_rss_kib,
            },
            "cpu_secs": {
                "server": self.server_cpu_secs,
                "runner": self.runner.cpu_secs,
                "runner_emitter": self.runner.emitter_cpu_secs,
                "client": self.client.cpu_secs,
            },
            "events_bytes": self.runner.events_bytes,
            "runner_sink": self.runner.sink,
            "client_relay": self.client.relay,
            "events_channel_ended": self.client.ended,
        })
    }
}

fn per_s(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Median, min and max of `values` (all zero when empty).
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

fn spread_json(values: &[f64]) -> Value {
    let (median, min, max) = spread(values);
    json!({"median": median, "min": min, "max": max})
}

/// Runs the benchmark: `--repeat` runs, then the summary (and the plot).
pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(args.repeat > 0, "--repeat must be at least 1");
    anyhow::ensure!(
        args.queue_capacity > 0,
        "--queue-capacity must be at least 1"
    );
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let dir = std::env::temp_dir().join(format!(
        "trickle-relay-bench-relay-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut runs = Vec::with_capacity(args.repeat);
    let mut failure = None;
    let modes: &[bool] = if args.tls { &[false, true] } else { &[false] };
    'runs: for i in 0..args.repeat {
        // Alternating, so that a change in the machine's load affects both alike.
        for &tls in modes {
            match run_once(&exe, &dir, &args, i, tls).await {
                Ok(r) => runs.push(r),
                Err(e) => {
                    let over = if tls { " (HTTPS)" } else { "" };
                    failure = Some(e.context(format!("run {} of {}{over}", i + 1, args.repeat)));
                    break 'runs;
                }
            }
        }
    }
    if failure.is_none() && !args.keep_logs {
        // Keep the children's logs when something failed; they are named in the error.
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        logging::say!(
            "bench relay: children's logs and reports in {}",
            dir.display()
        );
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some(path) = &args.plot {
        figure(&args, &runs).write(path)?;
    }
    let (plain, https): (Vec<RunResult>, Vec<RunResult>) = runs.into_iter().partition(|r| !r.tls);
    if args.json {
        let mut json = summary_json(&args, &plain);
        if !https.is_empty() {
            json["tls"] = summary_json(&args, &https);
            json["tls_vs_plain"] = compare(&plain, &https);
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        if https.is_empty() {
            print_human(&args, &plain, "");
        } else {
            print_human(&args, &plain, " over plain HTTP");
            print_human(&args, &https, " over HTTPS");
            print_comparison(&compare(&plain, &https));
        }
        if let Some(path) = &args.plot {
            println!("plot: {}", path.display());
        }
    }
    Ok(())
}

/// CPU seconds per GB carried on the events channel: (server, runner, client), where known.
fn cpu_per_gb(r: &RunResult) -> [Option<f64>; 3] {
    let gb = r.runner.events_bytes as f64 / 1e9;
    let per = |s: Option<f64>| s.filter(|_| gb > 0.0).map(|s| s / gb);
    [
        per(r.server_cpu_secs),
        per(r.runner.cpu_secs),
        per(r.client.cpu_secs),
    ]
}

/// HTTPS against plain: medians' ratios of sustained events/s (1.0: no cost) and CPU per GB.
fn compare(plain: &[RunResult], https: &[RunResult]) -> Value {
    let median = |runs: &[RunResult], f: &dyn Fn(&RunResult) -> Option<f64>| {
        spread(&runs.iter().filter_map(f).collect::<Vec<_>>()).0
    };
    let ratio = |f: &dyn Fn(&RunResult) -> Option<f64>| {
        let (p, t) = (median(plain, f), median(https, f));
        (p > 0.0).then(|| t / p)
    };
    let sustained = ratio(&|r| Some(r.sustained_per_s()));
    json!({
        "sustained_ratio": sustained,
        "sustained_cost": sustained.map(|r| 1.0 - r),
        "cpu_per_gb_ratio": {
            "server": ratio(&|r| cpu_per_gb(r)[0]),
            "runner": ratio(&|r| cpu_per_gb(r)[1]),
            "client": ratio(&|r| cpu_per_gb(r)[2]),
        },
        "latency_p99_ratio": ratio(&|r| r.latency().map(|l| l.p99 as f64)),
    })
}

fn print_comparison(c: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}x"));
    println!(
        "HTTPS against plain HTTP (medians): sustained events/s {} (cost {}), CPU per GB server {}, runner {}, client {}, latency p99 {}",
        f(&c["sustained_ratio"]),
        c["sustained_cost"]
            .as_f64()
            .map_or("-".to_string(), |x| format!("{:.0}%", x * 100.0)),
        f(&c["cpu_per_gb_ratio"]["server"]),
        f(&c["cpu_per_gb_ratio"]["runner"]),
        f(&c["cpu_per_gb_ratio"]["client"]),
        f(&c["latency_p99_ratio"]),
    );
}

fn rate_text(rate: u64) -> String {
    if rate == 0 {
        "as fast as possible".into()
    } else {
        format!("{}/s", super::plot::fmt_num(rate as f64))
    }
}

fn summary_json(args: &Args, runs: &[RunResult]) -> Value {
    let collect = |f: &dyn Fn(&RunResult) -> Option<f64>| -> Value {
        spread_json(&runs.iter().filter_map(f).collect::<Vec<_>>())
    };
    let kib = |v: Option<u64>| v.map(|k| k as f64);
    json!({
        "bench": "relay",
        "processes": ["server", "runner", "client"],
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "events": args.events,
        "rate": args.rate,
        "queue_capacity": args.queue_capacity,
        "flow_control": !args.no_flow_control,
        "external_server": args.server.is_some(),
        "repeat": runs.len(),
        "runs": runs.iter().map(RunResult::to_json).collect::<Vec<_>>(),
        "summary": {
            "emitted": collect(&|r| Some(r.runner.emitted as f64)),
            "delivered": collect(&|r| Some(r.client.delivered as f64)),
            "dropped": collect(&|r| Some(r.dropped() as f64)),
            "lost": collect(&|r| Some(r.lost() as f64)),
            "lost_in_transit": collect(&|r| Some(r.lost_in_transit() as f64)),
            "runs_whose_sums_close": runs.iter().filter(|r| r.sums_close()).count(),
            "duplicates": collect(&|r| Some(r.client.duplicates as f64)),
            "offered_events_per_s": collect(&|r| Some(r.offered_per_s())),
            "sustained_events_per_s": collect(&|r| Some(r.sustained_per_s())),
            "latency_us": {
                "median": collect(&|r| r.latency().map(|l| l.median as f64)),
                "p99": collect(&|r| r.latency().map(|l| l.p99 as f64)),
                "max": collect(&|r| r.latency().map(|l| l.max as f64)),
            },
            "peak_rss_kib": {
                "server": collect(&|r| kib(r.server_rss_kib)),
                "runner": collect(&|r| kib(r.runner.peak_rss_kib)),
                "client": collect(&|r| kib(r.client.peak_rss_kib)),
            },
        },
    })
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

fn print_human(args: &Args, runs: &[RunResult], over: &str) {
    println!(
        "bench relay{over}: server, runner and client as separate processes on {} CPU(s); {} heartbeats per run, rate {}, queue capacity {}, flow control {}, {} run(s)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.events,
        rate_text(args.rate),
        args.queue_capacity,
        if args.no_flow_control { "off" } else { "on" },
        runs.len()
    );
    println!(
        "{:>3} {:>9} {:>9} {:>8} {:>5} {:>7} {:>4} {:>4} {:>11} {:>11} {:>8} {:>8} {:>8}  peak RSS MiB server/runner/client",
        "run",
        "emitted",
        "delivered",
        "dropped",
        "lost",
        "transit",
        "sums",
        "dup",
        "offered/s",
        "sustained/s",
        "p50 ms",
        "p99 ms",
        "max ms"
    );
    for (i, r) in runs.iter().enumerate() {
        let l = r.latency();
        let q = |f: fn(&LatencyUs) -> u64| l.map_or("-".into(), |l| ms(f(l) as f64));
        println!(
            "{:>3} {:>9} {:>9} {:>8} {:>5} {:>7} {:>4} {:>4} {:>11.0} {:>11.0} {:>8} {:>8} {:>8}  {}/{}/{}",
            i + 1,
            r.runner.emitted,
            r.client.delivered,
            r.dropped(),
            r.lost(),
            r.lost_in_transit(),
            if r.sums_close() { "ok" } else { "NO" },
            r.client.duplicates,
            r.offered_per_s(),
            r.sustained_per_s(),
            q(|l| l.median),
            q(|l| l.p99),
            q(|l| l.max),
            mib(r.server_rss_kib),
            mib(r.runner.peak_rss_kib),
            mib(r.client.peak_rss_kib),
        );
    }
    let line = |name: &str, values: Vec<f64>, fmt: &dyn Fn(f64) -> String| {
        let (m, lo, hi) = spread(&values);
        println!("  {name:<30} {} [{} .. {}]", fmt(m), fmt(lo), fmt(hi));
    };
    let count = |v: f64| format!("{v:.0}");
    let msf = |v: f64| format!("{} ms", ms(v));
    let mibf = |v: f64| format!("{:.1} MiB", v / 1024.0);
    println!("median [min .. max] over {} run(s):", runs.len());
    line(
        "sustained events/s",
        runs.iter().map(RunResult::sustained_per_s).collect(),
        &count,
    );
    line(
        "dropped (runner-counted)",
        runs.iter().map(|r| r.dropped() as f64).collect(),
        &count,
    );
    line(
        "lost (emitted-delivered-dropped)",
        runs.iter().map(|r| r.lost() as f64).collect(),
        &count,
    );
    line(
        "lost in transit (client-counted)",
        runs.iter().map(|r| r.lost_in_transit() as f64).collect(),
        &count,
    );
    line(
        "latency median",
        runs.iter()
            .filter_map(|r| r.latency().map(|l| l.median as f64))
            .collect(),
        &msf,
    );
    line(
        "latency p99",
        runs.iter()
            .filter_map(|r| r.latency().map(|l| l.p99 as f64))
            .collect(),
        &msf,
    );
    line(
        "latency max",
        runs.iter()
            .filter_map(|r| r.latency().map(|l| l.max as f64))
            .collect(),
        &msf,
    );
    for (name, f) in [
        (
            "peak RSS server",
            (|r: &RunResult| r.server_rss_kib) as fn(&RunResult) -> Option<u64>,
        ),
        ("peak RSS runner", |r| r.runner.peak_rss_kib),
        ("peak RSS client", |r| r.client.peak_rss_kib),
    ] {
        let v: Vec<f64> = runs.iter().filter_map(|r| f(r).map(|k| k as f64)).collect();
        if !v.is_empty() {
            line(name, v, &mibf);
        }
    }
    // CPU per event: the runner's per emitted event (it handles every one, dropped or not),
    // the server's and the client's per delivered event (what they carried).
    type CpuOf = fn(&RunResult) -> Option<(f64, u64)>;
    let cpu: [(&str, CpuOf); 4] = [
        ("CPU µs/emitted event runner", |r| {
            r.runner.cpu_secs.map(|s| (s, r.runner.emitted))
        }),
        ("  of which the emitter", |r| {
            r.runner.emitter_cpu_secs.map(|s| (s, r.runner.emitted))
        }),
        ("CPU µs/delivered event server", |r| {
            r.server_cpu_secs.map(|s| (s, r.client.delivered))
        }),
        ("CPU µs/delivered event client", |r| {
            r.client.cpu_secs.map(|s| (s, r.client.delivered))
        }),
    ];
    for (name, f) in cpu {
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|r| f(r).map(|(s, n)| s * 1e6 / n.max(1) as f64))
            .collect();
        if !v.is_empty() {
            line(name, v, &|x| format!("{x:.2}"));
        }
    }
    // CPU per GB on the events channel (what TLS adds to is bytes, not events).
    for (k, name) in ["server", "runner", "client"].iter().enumerate() {
        let v: Vec<f64> = runs.iter().filter_map(|r| cpu_per_gb(r)[k]).collect();
        if !v.is_empty() {
            line(&format!("CPU s/GB events channel {name}"), v, &|x| {
                format!("{x:.2}")
            });
        }
    }
    let skipped: u64 = runs
        .iter()
        .filter_map(|r| {
            r.client
                .relay
                .get("events_skipped_segments")
                .and_then(Value::as_u64)
        })
        .sum();
    if skipped > 0 {
        println!(
            "the client fell out of the server's 5-segment window {skipped} time(s): those segments' events are the ones lost in transit"
        );
    }
    let closing = runs.iter().filter(|r| r.sums_close()).count();
    println!(
        "sums (emitted = received + dropped + lost in transit, every event the runner's sink took): close in {closing} of {} run(s)",
        runs.len()
    );
    let reported: u64 = runs
        .iter()
        .filter_map(|r| {
            r.client
                .relay
                .get("dropped_reported")
                .and_then(Value::as_u64)
        })
        .sum();
    let dropped: u64 = runs.iter().map(RunResult::dropped).sum();
    println!(
        "drops reported downstream (telemetry_dropped): {reported} of {dropped} counted by the runners"
    );
}

/// The plot: latency percentiles (left) and throughput over time (right), one colour per run.
fn figure(args: &Args, runs: &[RunResult]) -> Figure {
    let mut latency = Vec::new();
    let mut throughput = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let label = r.label.clone();
        if let Some(l) = r.latency() {
            latency.push(Series {
                label: label.clone(),
                points: l.curve.iter().map(|&(q, us)| (q, us / 1000.0)).collect(),
                color: i,
                dashed: false,
            });
        }
        // The first emission window's start: every window of both sides is at or after it.
        let origin = r.runner.windows.start_us.min(r.runner.first_emit_us) as f64;
        let rate_points = |w: &super::relay_child::Windows| -> Vec<(f64, f64)> {
            let width = w.width_us.max(1) as f64;
            w.counts
                .iter()
                .enumerate()
                .map(|(k, &c)| {
                    let mid = w.start_us as f64 + (k as f64 + 0.5) * width;
                    ((mid - origin) / 1e6, c as f64 * 1e6 / width)
                })
                .collect()
        };
        throughput.push(Series {
            label: format!("{label} delivered"),
            points: rate_points(&r.client.windows),
            color: i,
            dashed: false,
        });
        throughput.push(Series {
            label: format!("{label} emitted"),
            points: rate_points(&r.runner.windows),
            color: i,
            dashed: true,
        });
    }
    let (sustained, _, _) = spread(
        &runs
            .iter()
            .map(RunResult::sustained_per_s)
            .collect::<Vec<_>>(),
    );
    let (p99, _, _) = spread(
        &runs
            .iter()
            .filter_map(|r| r.latency().map(|l| l.p99 as f64))
            .collect::<Vec<_>>(),
    );
    let dropped: u64 = runs.iter().map(RunResult::dropped).sum();
    Figure {
        title: format!(
            "trickle-relay bench relay: {} heartbeats, rate {}, queue {}",
            args.events,
            rate_text(args.rate),
            args.queue_capacity
        ),
        subtitle: format!(
            "server, runner and client as separate processes, {} CPU(s); median of {} run(s): {:.0} events/s sustained, p99 {} ms; {} dropped over all runs",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            runs.len(),
            sustained,
            ms(p99),
            dropped
        ),
        panels: vec![
            Panel {
                title: "End-to-end latency (emission to egress)".into(),
                x_label: "percentile of delivered events".into(),
                y_label: "latency (ms, log scale)".into(),
                x_axis: Axis::Nines,
                y_axis: Axis::Log10,
                series: latency,
            },
            Panel {
                title: "Throughput per 100 ms (dashed: emitted)".into(),
                x_label: "time since the first emission (s)".into(),
                y_label: "events/s".into(),
                x_axis: Axis::Linear,
                y_axis: Axis::Linear,
                series: throughput,
            },
        ],
    }
}

/// A child process whose stderr goes to a log file (shown when it fails).
pub(crate) struct Proc {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `exe --log warn ARGS` (or `--log $BENCH_CHILD_LOG`; telemetry opt-outs removed),
    /// stdout piped, stderr to `DIR/{prefix}-{name}.log` (`prefix` names this run's files, e.g.
    /// `run1` or `run1-tls`); stdin piped when `stdin`.
    pub(crate) fn spawn(
        name: &'static str,
        exe: &Path,
        args: &[&str],
        dir: &Path,
        prefix: &str,
        stdin: bool,
    ) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{prefix}-{name}.log"));
        let stderr = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        // `BENCH_CHILD_LOG` (an `EnvFilter` directive) traces a run, e.g.
        // `warn,telemetry::flow=debug` for the runner's flow control every 100 ms.
        let level = std::env::var("BENCH_CHILD_LOG").unwrap_or_else(|_| "warn".into());
        let child = Command::new(exe)
            .arg("--log")
            .arg(level)
            .args(args)
            .env_remove("SCOPE_TELEMETRY_DISABLED")
            .env_remove("DO_NOT_TRACK")
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start the {name} process ({})", exe.display()))?;
        Ok(Proc { name, child, log })
    }

    /// The process id, while it runs.
    pub(crate) fn pid(&self) -> Option<String> {
        self.child.id().map(|p| p.to_string())
    }

    /// The last lines of its stderr, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("{} log ({}):\n{tail}", self.name, self.log.display())
    }

    /// An error saying `what`, with the last lines of the process's log.
    pub(crate) fn failed(&self, what: String) -> anyhow::Error {
        anyhow::anyhow!("{what}\n{}", self.log_tail())
    }

    /// Kills the process and waits for it.
    pub(crate) async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// An error (with the log's tail) unless the process exited successfully.
pub(crate) fn check_exit(proc: &Proc, status: ExitStatus) -> anyhow::Result<()> {
    if status.success() {
        Ok(())
    } else {
        Err(proc.failed(format!("the {} process failed ({status})", proc.name)))
    }
}

/// Reads the JSON report a child wrote to `path`.
pub(crate) fn read_report<T: serde::de::DeserializeOwned>(
    path: &Path,
    who: &Proc,
) -> anyhow::Result<T> {
    let text = std::fs::read(path)
        .map_err(|e| who.failed(format!("no report at {} ({e})", path.display())))?;
    serde_json::from_slice(&text).with_context(|| format!("bad report {}", path.display()))
}

/// Starts `trickle-relay serve` on a free loopback port (over TLS with a certificate made at
/// start when `tls`); returns it and its base URL. `prefix` names its log, as in [`Proc::spawn`].
pub(crate) async fn start_server(
    exe: &Path,
    dir: &Path,
    prefix: &str,
    tls: bool,
) -> anyhow::Result<(Proc, String)> {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--autocreate"];
    if tls {
        args.push("--tls-self-signed");
    }
    let mut server = Proc::spawn("server", exe, &args, dir, prefix, false)?;
    let stdout = server.child.stdout.take().context("server stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await;
    let url = match first {
        Ok(Ok(Some(line))) => line
            .split_whitespace()
            .last()
            .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
            .map(str::to_string),
        _ => None,
    };
    let Some(url) = url else {
        return Err(server.failed("the server did not print its URL within 20 s".into()));
    };
    // Keep reading its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((server, url))
}

async fn run_once(
    exe: &Path,
    dir: &Path,
    args: &Args,
    run: usize,
    tls: bool,
) -> anyhow::Result<RunResult> {
    let prefix = format!("run{}{}", run + 1, if tls { "-tls" } else { "" });
    let prefix = prefix.as_str();
    let (mut server, base) = match &args.server {
        Some(url) => (None, url.trim_end_matches('/').to_string()),
        None => {
            let (p, url) = start_server(exe, dir, prefix, tls).await?;
            (Some(p), url)
        }
    };
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let control = format!("{base}/bench-{tag}-control");
    let events = format!("{base}/bench-{tag}-events");
    for url in [&control, &events] {
        relay::client::create_channel(url).await?;
    }
    let runner_report = dir.join(format!("{prefix}-runner.json"));
    let client_report = dir.join(format!("{prefix}-client.json"));
    let n = args.events.to_string();
    let mut client = Proc::spawn(
        "client",
        exe,
        &[
            "bench",
            "relay-client",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--events",
            &n,
            "--report",
            &client_report.to_string_lossy(),
            "--timeout-secs",
            &args.timeout_secs.to_string(),
        ],
        dir,
        prefix,
        false,
    )?;
    let mut runner_args = vec![
        "bench".to_string(),
        "relay-runner".into(),
        "--control-url".into(),
        control.clone(),
        "--events-url".into(),
        events.clone(),
        "--events".into(),
        n.clone(),
        "--rate".into(),
        args.rate.to_string(),
        "--queue-capacity".into(),
        args.queue_capacity.to_string(),
        "--report".into(),
        runner_report.to_string_lossy().into_owned(),
    ];
    if let Some(us) = args.poll_us {
        runner_args.extend(["--poll-us".into(), us.to_string()]);
    }
    if let Some(us) = args.min_idle_us {
        runner_args.extend(["--min-idle-us".into(), us.to_string()]);
    }
    if let Some(bytes) = args.segment_bytes {
        runner_args.extend(["--segment-bytes".into(), bytes.to_string()]);
    }
    if args.no_flow_control {
        runner_args.push("--no-flow-control".into());
    }
    let runner_args: Vec<&str> = runner_args.iter().map(String::as_str).collect();
    let mut runner = Proc::spawn("runner", exe, &runner_args, dir, prefix, true)?;
    let result = drive(&mut runner, &mut client, args, run).await;
    if result.is_err() {
        runner.stop().await;
        client.stop().await;
    }
    let server_pid = server.as_ref().and_then(Proc::pid);
    let server_rss_kib = server_pid.as_deref().and_then(peak_rss_kib);
    let server_cpu_secs = server_pid.as_deref().and_then(cpu_secs);
    if let Some(s) = server.as_mut() {
        s.stop().await;
    }
    result?;
    let label = match (args.tls, tls) {
        (false, _) => format!("run {}", run + 1),
        (true, false) => format!("plain run {}", run + 1),
        (true, true) => format!("https run {}", run + 1),
    };
    Ok(RunResult {
        label,
        tls,
        runner: read_report(&runner_report, &runner)?,
        client: read_report(&client_report, &client)?,
        server_rss_kib,
        server_cpu_secs,
    })
}

/// Holds the runner until the client is ready, then follows both to their end.
async fn drive(
    runner: &mut Proc,
    client: &mut Proc,
    args: &Args,
    run: usize,
) -> anyhow::Result<()> {
    let mut client_out =
        BufReader::new(client.child.stdout.take().context("client stdout")?).lines();
    let mut runner_out =
        BufReader::new(runner.child.stdout.take().context("runner stdout")?).lines();
    let mut go = runner.child.stdin.take().context("runner stdin")?;

    let ready = tokio::time::timeout(Duration::from_secs(45), async {
        loop {
            tokio::select! {
                line = client_out.next_line() => match line {
                    Ok(Some(l)) if l == "ready" => return Ok(()),
                    Ok(Some(_)) => {}
                    _ => {
                        let status = client.child.wait().await?;
                        return Err(client.failed(format!("the client ended before it was ready ({status})")));
                    }
                },
                status = runner.child.wait() => {
                    let status = status?;
                    return Err(runner.failed(format!("the runner ended before the client was ready ({status})")));
                }
            }
        }
    })
    .await;
    match ready {
        Ok(r) => r?,
        Err(_) => return Err(client.failed("the client saw no runner_ready within 45 s".into())),
    }
    go.write_all(b"go\n").await.context("starting the runner")?;
    drop(go);

    let bar = ProgressBar::new(args.events);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} delivered ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(format!("run {}/{}", run + 1, args.repeat));
    let deadline = tokio::time::sleep(Duration::from_secs(args.timeout_secs));
    tokio::pin!(deadline);
    let (mut client_done, mut runner_done) = (false, false);
    while !(client_done && runner_done) {
        tokio::select! {
            line = client_out.next_line(), if !client_done => match line {
                Ok(Some(l)) => {
                    if let Some(n) = l.strip_prefix("delivered ").and_then(|n| n.parse().ok()) {
                        bar.set_position(n);
                    }
                }
                _ => {
                    client_done = true;
                    let status = client.child.wait().await?;
                    check_exit(client, status)?;
                }
            },
            line = runner_out.next_line(), if !runner_done => match line {
                Ok(Some(l)) => {
                    if let Some(n) = l.strip_prefix("emitted ") {
                        bar.set_message(format!("emitted {n}"));
                    }
                }
                _ => {
                    runner_done = true;
                    let status = runner.child.wait().await?;
                    check_exit(runner, status)?;
                }
            },
            _ = &mut deadline => {
                bar.abandon();
                bail!("run {} did not finish within {} s (--timeout-secs)", run + 1, args.timeout_secs);
            }
        }
    }
    bar.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_median_min_max() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert_eq!(spread(&[]), (0.0, 0.0, 0.0));
    }
}
