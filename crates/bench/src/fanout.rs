//! `trickle-relay bench fanout`: trickle server fan-out of one segment to many subscribers.
//!
//! Throughput: one publisher streams one large segment in fixed-size chunks to subscribers that
//! preconnected to it (GET of the write head before the POST starts); the figure is aggregate
//! delivered payload bytes per second (subscribers × segment bytes / wall time).
//! Latency: a subscriber preconnects to the next seq, a small segment is published, and the time
//! from POST start to the subscriber's first body byte is recorded.
//!
//! `--plot` draws the first-byte latency distribution and, per run, the bytes all subscribers
//! received per time bucket.

use super::report::{
    self, CommonArgs, Labels, LatencySeries, Recording, Spread, ThroughputSeries, Timeline,
};
use anyhow::{bail, Context as _};
use bytes::Bytes;
use serde_json::json;
use std::time::{Duration, Instant};
use trickle::server::{random_channel_name, Server, ServerConfig};

/// Arguments of this benchmark.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Benchmark this server (base URL, with autocreate on) instead of an in-process one.
    #[arg(long)]
    pub server: Option<String>,
    /// Size of the segment streamed in the throughput part, in bytes.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub bytes: u64,
    /// Size of each publisher write, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub chunk_bytes: usize,
    /// Preconnected subscribers reading the segment.
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// Runs of the throughput part (median and spread are reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Segments published in the first-byte latency part.
    #[arg(long, default_value_t = 200)]
    pub latency_iters: usize,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// One throughput run.
struct Run {
    secs: f64,
    delivered: u64,
    /// CPU time this process (server and clients) used during the run, if known.
    cpu_secs: Option<f64>,
    /// Bytes received by all subscribers over time (from the POST's start).
    timeline: Timeline,
}

/// Runs this benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.subscribers == 0 || args.repeat == 0 || args.chunk_bytes == 0 || args.bytes == 0 {
        bail!("--subscribers, --repeat, --chunk-bytes and --bytes must be at least 1");
    }
    args.common.check()?;
    let (server, base) = match &args.server {
        Some(url) => (None, url.trim_end_matches('/').to_string()),
        None => {
            let config = ServerConfig {
                autocreate: true,
                max_segment_bytes: args.bytes.max(64 * 1024 * 1024),
                max_connections: args.subscribers + 64,
                ..ServerConfig::default()
            };
            let server = Server::bind("127.0.0.1:0".parse()?, config)
                .await
                .context("cannot start the in-process server")?;
            let url = server.url();
            (Some(server), url)
        }
    };
    let client = reqwest::Client::builder()
        .no_gzip()
        .pool_max_idle_per_host(args.subscribers + 8)
        .build()?;

    let bar = report::progress(args.repeat as u64 + 1, "fanout");
    let mut runs = Vec::with_capacity(args.repeat);
    for _ in 0..args.repeat {
        runs.push(throughput_run(&client, &base, &args).await?);
        bar.inc(1);
    }
    let latencies = if args.latency_iters > 0 {
        latency_run(&client, &base, args.latency_iters).await?
    } else {
        Vec::new()
    };
    bar.finish_and_clear();
    if let Some(server) = server {
        server.shutdown().await;
    }
    report(&args, &runs, &latencies)
}

async fn create(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let ch = random_channel_name();
    client
        .post(format!("{base}/{ch}"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("cannot create a channel on {base} (is autocreate on?)"))?;
    Ok(ch)
}

async fn subscriber(
    client: reqwest::Client,
    url: String,
    origin: Instant,
) -> anyhow::Result<(u64, Timeline)> {
    let mut resp = client.get(&url).send().await?.error_for_status()?;
    let mut n = 0u64;
    let mut timeline = Timeline::new(origin);
    while let Some(chunk) = resp.chunk().await? {
        n += chunk.len() as u64;
        timeline.record(Instant::now(), chunk.len() as u64);
    }
    Ok((n, timeline))
}

async fn throughput_run(client: &reqwest::Client, base: &str, args: &Args) -> anyhow::Result<Run> {
    let ch = create(client, base).await?;
    let url = format!("{base}/{ch}/0");
    let mut subs = tokio::task::JoinSet::new();
    let origin = Instant::now();
    for _ in 0..args.subscribers {
        subs.spawn(subscriber(client.clone(), url.clone(), origin));
    }
    // Let every subscriber's GET reach the server and precreate the segment.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let chunk = Bytes::from((0..args.chunk_bytes).map(|i| i as u8).collect::<Vec<u8>>());
    let step = args.chunk_bytes as u64;
    let body = futures::stream::unfold(args.bytes, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(step);
            Some((
                Ok::<Bytes, std::io::Error>(chunk.slice(..n as usize)),
                left - n,
            ))
        }
    });
    let cpu_start = cpu_time();
    let start = Instant::now();
    client
        .post(&url)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .context("publishing the segment failed")?;
    let mut delivered = 0u64;
    // Time zero is the POST: the subscribers' preconnect wait is not part of the transfer.
    let mut timeline = Timeline::new(start);
    while let Some(r) = subs.join_next().await {
        let (n, t) = r.context("subscriber task failed")??;
        timeline.merge(&t);
        if n != args.bytes {
            bail!("a subscriber got {n} bytes, expected {}", args.bytes);
        }
        delivered += n;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = cpu_time().zip(cpu_start).map(|(end, start)| end - start);
    let _ = client.delete(format!("{base}/{ch}")).send().await;
    Ok(Run {
        secs,
        delivered,
        cpu_secs,
        timeline,
    })
}

async fn latency_run(
    client: &reqwest::Client,
    base: &str,
    iters: usize,
) -> anyhow::Result<Vec<Duration>> {
    let ch = create(client, base).await?;
    let mut out = Vec::with_capacity(iters);
    for seq in 0..iters {
        let url = format!("{base}/{ch}/{seq}");
        let sub = {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut resp = client.get(&url).send().await?.error_for_status()?;
                let first = resp.chunk().await?;
                let at = Instant::now();
                if first.is_none() {
                    bail!("segment {url} ended without data");
                }
                while resp.chunk().await?.is_some() {}
                anyhow::Ok(at)
            })
        };
        // Let the subscriber preconnect before the segment is published.
        tokio::time::sleep(Duration::from_millis(3)).await;
        let start = Instant::now();
        client
            .post(&url)
            .body(format!(
                "{{\"seq\":{seq},\"pad\":\"{}\"}}\n",
                "x".repeat(64)
            ))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .context("publishing a small segment failed")?;
        let first = sub.await.context("subscriber task failed")??;
        out.push(first.saturating_duration_since(start));
    }
    let _ = client.delete(format!("{base}/{ch}")).send().await;
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU time (user + system) used so far by this process, in seconds (Linux).
fn cpu_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    // Clock ticks are 100 per second on every Linux this runs on (USER_HZ).
    Some((utime + stime) / 100.0)
}

/// Peak resident memory of this process (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn report(args: &Args, runs: &[Run], latencies: &[Duration]) -> anyhow::Result<()> {
    let rates = Spread::of(runs.iter().map(|r| r.delivered as f64 / r.secs).collect());
    let mut lat_us: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    lat_us.sort_by(f64::total_cmp);
    let (median_rate, min_rate, max_rate) = (rates.median, rates.min, rates.max);
    let rss = peak_rss();
    // CPU cost per delivered GB, and the share of the cores this process got (under 100% per
    // core means something else was running: the wall-clock figures are then pessimistic).
    let cpu: Option<f64> = runs.iter().map(|r| r.cpu_secs).sum();
    let wall: f64 = runs.iter().map(|r| r.secs).sum();
    let delivered_gb = runs.iter().map(|r| r.delivered).sum::<u64>() as f64 / 1e9;
    let cpu_per_gb = cpu.map(|c| c / delivered_gb);
    let cores_used = cpu.map(|c| c / wall);
    let where_ = args.server.as_deref().unwrap_or("in-process server");
    let mut hist = report::histogram();
    for d in latencies {
        report::record(&mut hist, *d);
    }
    let mut recording = Recording {
        latency: vec![LatencySeries {
            label: "first byte".into(),
            hist,
        }],
        throughput: Vec::new(),
    };
    for (i, r) in runs.iter().enumerate() {
        recording.throughput.push(ThroughputSeries {
            label: format!("run {}", i + 1),
            timeline: r.timeline.clone(),
            dashed: false,
            color: i,
        });
    }
    let labels = Labels {
        title: format!(
            "trickle-relay bench fanout: {} subscribers x {:.1} MiB segment",
            args.subscribers,
            args.bytes as f64 / (1024.0 * 1024.0)
        ),
        params: format!(
            "{where_}, {} KiB writes, {} run(s), median {:.2} GB/s delivered; {} latency segments; {} CPU(s)",
            args.chunk_bytes / 1024,
            runs.len(),
            median_rate / 1e9,
            latencies.len(),
            report::cpus()
        ),
        latency: "POST start to a subscriber's first byte".into(),
        throughput: "bytes received by all subscribers".into(),
        unit: "GB/s".into(),
        scale: 1e9,
        since: "the publisher's POST started".into(),
    };
    let summary = json!({
            "server": where_,
            "subscribers": args.subscribers,
            "segment_bytes": args.bytes,
            "chunk_bytes": args.chunk_bytes,
            "runs": runs.len(),
            "aggregate_bytes_per_sec": { "median": median_rate, "min": min_rate, "max": max_rate },
            "run_secs": runs.iter().map(|r| r.secs).collect::<Vec<_>>(),
            "first_byte_latency_us": {
                "samples": lat_us.len(),
                "median": percentile(&lat_us, 0.5),
                "p99": percentile(&lat_us, 0.99),
                "max": lat_us.last().copied().unwrap_or(0.0),
            },
            "cpu_secs_per_gb": cpu_per_gb,
            "cores_used": cores_used,
            "peak_rss_bytes": rss,
    });
    report::finish("fanout", &args.common, summary, &recording, &labels, || {
        print_human(args, runs, &lat_us, rates, cpu_per_gb.zip(cores_used), rss)
    })
}

/// The text summary.
fn print_human(
    args: &Args,
    runs: &[Run],
    lat_us: &[f64],
    rates: Spread,
    cpu: Option<(f64, f64)>,
    rss: Option<u64>,
) {
    let where_ = args.server.as_deref().unwrap_or("in-process server");
    let (median_rate, min_rate, max_rate) = (rates.median, rates.min, rates.max);
    println!(
        "fanout ({where_}): {} subscribers x {} MiB segment in {} KiB writes, {} run(s)",
        args.subscribers,
        args.bytes as f64 / (1024.0 * 1024.0),
        args.chunk_bytes / 1024,
        runs.len()
    );
    println!(
        "  aggregate delivered: median {:.2} GB/s (min {:.2}, max {:.2})",
        median_rate / 1e9,
        min_rate / 1e9,
        max_rate / 1e9
    );
    if let Some((per_gb, cores)) = cpu {
        println!(
            "  cpu: {per_gb:.2} core-seconds per GB delivered (server and clients); {cores:.2} cores busy on average"
        );
    }
    if !lat_us.is_empty() {
        println!(
            "  first-byte latency over {} segments: median {:.0} us, p99 {:.0} us, max {:.0} us",
            lat_us.len(),
            percentile(lat_us, 0.5),
            percentile(lat_us, 0.99),
            lat_us.last().copied().unwrap_or(0.0)
        );
    }
    if let Some(rss) = rss {
        println!(
            "  peak RSS of this process (server and clients): {:.0} MiB",
            rss as f64 / (1024.0 * 1024.0)
        );
    }
}
