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
//!
//! `--tls` measures HTTPS against plain HTTP in the same run: a second in-process server with a
//! self-signed certificate (the clients pin it), its throughput runs interleaved with the plain
//! ones, and reports both, the HTTPS/plain throughput ratio and the CPU per GB of each (the
//! cost of encryption is CPU: on a machine with idle cores the wall-clock ratio hides it).

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
    /// Benchmark this server (base URL, with autocreate on) instead of an in-process one; an
    /// `https://` one is accepted with any certificate, as the trickle clients' default mode does.
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
    /// Also measure over HTTPS (an in-process TLS server, self-signed, pinned by the clients),
    /// interleaved with the plain runs; reports both and TLS's cost.
    #[arg(long, conflicts_with = "server")]
    pub tls: bool,
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

/// One server measured (plain, or HTTPS with `--tls`), the client that talks to it, and what
/// was measured on it.
struct Target {
    /// `plain` or `https`.
    label: &'static str,
    base: String,
    client: reqwest::Client,
    server: Option<Server>,
    runs: Vec<Run>,
    latencies: Vec<Duration>,
}

/// An in-process server for this benchmark, over TLS when `tls` is given.
async fn in_process(args: &Args, tls: Option<tls::ServerTls>) -> anyhow::Result<Server> {
    let config = ServerConfig {
        autocreate: true,
        max_segment_bytes: args.bytes.max(64 * 1024 * 1024),
        max_connections: args.subscribers + 64,
        tls,
        ..ServerConfig::default()
    };
    Server::bind("127.0.0.1:0".parse()?, config)
        .await
        .context("cannot start the in-process server")
}

/// The target measured over HTTPS: a server with a self-signed certificate the client pins.
async fn https_target(args: &Args) -> anyhow::Result<Target> {
    let tls = tls::ServerTls::self_signed(&["127.0.0.1".into()], &[b"http/1.1"])?;
    let cert = reqwest::Certificate::from_pem(tls.cert_pem().as_bytes())?;
    let server = in_process(args, Some(tls)).await?;
    let client = reqwest::Client::builder()
        .no_gzip()
        .pool_max_idle_per_host(args.subscribers + 8)
        .tls_built_in_root_certs(false)
        .add_root_certificate(cert)
        .build()?;
    Ok(Target {
        label: "https",
        base: server.url(),
        client,
        server: Some(server),
        runs: Vec::new(),
        latencies: Vec::new(),
    })
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
            let server = in_process(&args, None).await?;
            let url = server.url();
            (Some(server), url)
        }
    };
    // A given https:// server is treated as the trickle clients' default mode treats it (any
    // certificate: orchestrators' are self-signed); only TLS's cost is measured, not its trust.
    let given_https = args
        .server
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"));
    if given_https && args.tls {
        bail!("--tls compares an in-process HTTPS server with a plain one: leave it out with an https:// --server");
    }
    let client = reqwest::Client::builder()
        .no_gzip()
        .pool_max_idle_per_host(args.subscribers + 8)
        .danger_accept_invalid_certs(given_https)
        .build()?;
    let mut targets = vec![Target {
        label: if given_https { "https" } else { "plain" },
        base,
        client,
        server,
        runs: Vec::with_capacity(args.repeat),
        latencies: Vec::new(),
    }];
    if args.tls {
        targets.push(https_target(&args).await?);
    }

    let bar = report::progress((args.repeat as u64 + 1) * targets.len() as u64, "fanout");
    // Interleaved, so that a change in the machine's load affects both alike.
    for _ in 0..args.repeat {
        for t in targets.iter_mut() {
            let run = throughput_run(&t.client, &t.base, &args).await?;
            t.runs.push(run);
            bar.inc(1);
        }
    }
    if args.latency_iters > 0 {
        for t in targets.iter_mut() {
            t.latencies = latency_run(&t.client, &t.base, args.latency_iters).await?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    for t in targets.iter_mut() {
        if let Some(server) = t.server.take() {
            server.shutdown().await;
        }
    }
    report(&args, &targets)
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

/// What one target's runs come to.
struct Measured {
    rates: Spread,
    /// Sorted first-byte latencies, µs.
    lat_us: Vec<f64>,
    /// CPU core-seconds per delivered GB, and the cores busy on average.
    cpu: Option<(f64, f64)>,
}

impl Measured {
    fn of(t: &Target) -> Measured {
        let rates = Spread::of(t.runs.iter().map(|r| r.delivered as f64 / r.secs).collect());
        let mut lat_us: Vec<f64> = t.latencies.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        lat_us.sort_by(f64::total_cmp);
        // CPU cost per delivered GB, and the share of the cores this process got (under 100% per
        // core means something else was running: the wall-clock figures are then pessimistic).
        let cpu: Option<f64> = t.runs.iter().map(|r| r.cpu_secs).sum();
        let wall: f64 = t.runs.iter().map(|r| r.secs).sum();
        let delivered_gb = t.runs.iter().map(|r| r.delivered).sum::<u64>() as f64 / 1e9;
        let cpu = cpu.map(|c| (c / delivered_gb, c / wall));
        Measured { rates, lat_us, cpu }
    }

    fn json(&self, t: &Target) -> serde_json::Value {
        json!({
            "aggregate_bytes_per_sec": { "median": self.rates.median, "min": self.rates.min, "max": self.rates.max },
            "run_secs": t.runs.iter().map(|r| r.secs).collect::<Vec<_>>(),
            "first_byte_latency_us": {
                "samples": self.lat_us.len(),
                "median": percentile(&self.lat_us, 0.5),
                "p99": percentile(&self.lat_us, 0.99),
                "max": self.lat_us.last().copied().unwrap_or(0.0),
            },
            "cpu_secs_per_gb": self.cpu.map(|c| c.0),
            "cores_used": self.cpu.map(|c| c.1),
        })
    }
}

fn report(args: &Args, targets: &[Target]) -> anyhow::Result<()> {
    let measured: Vec<Measured> = targets.iter().map(Measured::of).collect();
    let rss = peak_rss();
    let where_ = args.server.as_deref().unwrap_or("in-process server");
    let both = targets.len() > 1;
    let mut recording = Recording {
        latency: Vec::new(),
        throughput: Vec::new(),
    };
    for (k, t) in targets.iter().enumerate() {
        let mut hist = report::histogram();
        for d in &t.latencies {
            report::record(&mut hist, *d);
        }
        recording.latency.push(LatencySeries {
            label: if both {
                format!("first byte ({})", t.label)
            } else {
                "first byte".into()
            },
            hist,
        });
        for (i, r) in t.runs.iter().enumerate() {
            recording.throughput.push(ThroughputSeries {
                label: if both {
                    format!("{} run {}", t.label, i + 1)
                } else {
                    format!("run {}", i + 1)
                },
                timeline: r.timeline.clone(),
                // Dashed: over HTTPS.
                dashed: k > 0,
                color: i,
            });
        }
    }
    let labels = Labels {
        title: format!(
            "trickle-relay bench fanout: {} subscribers x {:.1} MiB segment{}",
            args.subscribers,
            args.bytes as f64 / (1024.0 * 1024.0),
            if both { " (dashed: HTTPS)" } else { "" }
        ),
        params: format!(
            "{where_}, {} KiB writes, {} run(s), median {:.2} GB/s delivered{}; {} latency segments; {} CPU(s)",
            args.chunk_bytes / 1024,
            targets[0].runs.len(),
            measured[0].rates.median / 1e9,
            match measured.get(1) {
                Some(m) => format!(" ({:.2} GB/s over HTTPS)", m.rates.median / 1e9),
                None => String::new(),
            },
            targets[0].latencies.len(),
            report::cpus()
        ),
        latency: "POST start to a subscriber's first byte".into(),
        throughput: "bytes received by all subscribers".into(),
        unit: "GB/s".into(),
        scale: 1e9,
        since: "the publisher's POST started".into(),
    };
    // The plain figures at the top level (as without --tls); HTTPS under "tls".
    let mut summary = measured[0].json(&targets[0]);
    let extra = json!({
        "server": where_,
        "subscribers": args.subscribers,
        "segment_bytes": args.bytes,
        "chunk_bytes": args.chunk_bytes,
        "runs": targets[0].runs.len(),
        "peak_rss_bytes": rss,
    });
    if let (Some(map), Some(extra)) = (summary.as_object_mut(), extra.as_object()) {
        map.extend(extra.clone());
        if let (Some(t), Some(m)) = (targets.get(1), measured.get(1)) {
            map.insert("tls".into(), m.json(t));
            map.insert("tls_vs_plain".into(), compare(&measured[0], m));
        }
    }
    report::finish("fanout", &args.common, summary, &recording, &labels, || {
        print_human(args, targets, &measured, rss)
    })
}

/// HTTPS against plain: throughput ratio (1.0: no cost), cost (1 - ratio), CPU per GB ratio.
fn compare(plain: &Measured, tls: &Measured) -> serde_json::Value {
    let ratio = tls.rates.median / plain.rates.median;
    json!({
        "throughput_ratio": ratio,
        "throughput_cost": 1.0 - ratio,
        "cpu_per_gb_ratio": plain.cpu.zip(tls.cpu).map(|(p, t)| t.0 / p.0),
    })
}

/// The text summary.
fn print_human(args: &Args, targets: &[Target], measured: &[Measured], rss: Option<u64>) {
    let where_ = args.server.as_deref().unwrap_or("in-process server");
    println!(
        "fanout ({where_}): {} subscribers x {} MiB segment in {} KiB writes, {} run(s)",
        args.subscribers,
        args.bytes as f64 / (1024.0 * 1024.0),
        args.chunk_bytes / 1024,
        targets[0].runs.len()
    );
    for (t, m) in targets.iter().zip(measured) {
        let over = if targets.len() > 1 {
            format!(
                " over {}",
                if t.label == "https" {
                    "HTTPS"
                } else {
                    "plain HTTP"
                }
            )
        } else {
            String::new()
        };
        println!(
            "  aggregate delivered{over}: median {:.2} GB/s (min {:.2}, max {:.2})",
            m.rates.median / 1e9,
            m.rates.min / 1e9,
            m.rates.max / 1e9
        );
        if let Some((per_gb, cores)) = m.cpu {
            println!(
                "  cpu{over}: {per_gb:.2} core-seconds per GB delivered (server and clients); {cores:.2} cores busy on average"
            );
        }
        if !m.lat_us.is_empty() {
            println!(
                "  first-byte latency{over} over {} segments: median {:.0} us, p99 {:.0} us, max {:.0} us",
                m.lat_us.len(),
                percentile(&m.lat_us, 0.5),
                percentile(&m.lat_us, 0.99),
                m.lat_us.last().copied().unwrap_or(0.0)
            );
        }
    }
    if let (Some(plain), Some(tls)) = (measured.first(), measured.get(1)) {
        let c = compare(plain, tls);
        let cost = c["throughput_cost"].as_f64().unwrap_or(0.0);
        println!(
            "  HTTPS: {:.0}% of plain throughput (costs {:.0}%){}",
            (1.0 - cost) * 100.0,
            cost * 100.0,
            match c["cpu_per_gb_ratio"].as_f64() {
                Some(r) => format!("; {r:.2}x the CPU per GB"),
                None => String::new(),
            }
        );
    }
    if let Some(rss) = rss {
        println!(
            "  peak RSS of this process (server and clients): {:.0} MiB",
            rss as f64 / (1024.0 * 1024.0)
        );
    }
}
