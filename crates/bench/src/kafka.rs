//! `trickle-relay bench kafka`: throughput into a Kafka broker.
//!
//! Scenarios, each repeated `--repeat` times into a fresh topic (median, min and max reported):
//! * `sink_disk`: the Kafka sink as the client runs it: `emit` of `--events` pre-built envelopes
//!   from one thread, through the disk buffer, produced and acknowledged by the broker. The
//!   figure is events/s from the first `emit` to the last delivery report; `emit_per_sec` is
//!   how fast `emit` itself returned.
//! * `sink_memory`: the same without the disk buffer: what the disk costs.
//! * `collector_output`: the collector's Kafka output, `append` of 500 events at a time (one
//!   metrics request each), awaited one after another as sequential requests would be.
//!
//! The broker is a `tansu` started by the bench on a free loopback port (in-memory storage), or
//! an existing one with `--bootstrap`. Delivery is checked from the sink's counters; `--verify`
//! also reads every topic back with a consumer and checks the count.
//!
//! `--plot` draws the latency of each `emit` call (sinks; every call is timed) or each awaited
//! 500-event `append` (collector output), and, for the first run of each scenario, events
//! emitted (dashed) and delivered (solid) per time bucket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::report::{
    self, CommonArgs, Labels, LatencySeries, Recording, Sampler, Spread, Timeline,
};
use anyhow::Context;
use bytes::Bytes;
use collector::Output;
use hdrhistogram::Histogram;
use kafka::broker::{self, TestBroker};
use kafka::{FlushOutcome, KafkaConfig, KafkaOutput, KafkaSink};
use serde::Serialize;
use telemetry::{Envelope, Event, Fields, Sink};

/// Arguments of this benchmark.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Events per run.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Approximate size of each envelope in bytes.
    #[arg(long, default_value_t = 400)]
    event_bytes: usize,
    /// Runs of each scenario; the summary gives the median, min and max.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Most events the sink hands to the producer at once (`KafkaConfig::batch_max_events`).
    #[arg(long, default_value_t = kafka::KafkaConfig::new("").batch_max_events)]
    batch: usize,
    /// Partitions of each topic the bench creates.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Use this broker (`host:port`) instead of starting a tansu.
    #[arg(long)]
    bootstrap: Option<String>,
    /// Read every topic back with a consumer and check the count.
    #[arg(long)]
    verify: bool,
    #[command(flatten)]
    common: CommonArgs,
}

/// One scenario's summary.
#[derive(Serialize, Debug)]
struct Scenario {
    name: &'static str,
    events: usize,
    events_per_sec: Spread,
    seconds: Spread,
    #[serde(skip_serializing_if = "Option::is_none")]
    emit_per_sec: Option<Spread>,
}

/// The whole report.
#[derive(Serialize, Debug)]
struct Report {
    broker: String,
    partitions: i32,
    batch: usize,
    event_bytes: usize,
    repeat: usize,
    verified: bool,
    scenarios: Vec<Scenario>,
}

/// Runs this benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    args.common.check()?;
    anyhow::ensure!(args.repeat > 0, "--repeat must be at least 1");
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(args.partitions > 0, "--partitions must be at least 1");
    let (report, recording) = run_all(&args).await?;
    let labels = Labels {
        title: format!(
            "trickle-relay bench kafka: {} x ~{}-byte events per run",
            args.events, args.event_bytes
        ),
        params: format!(
            "broker {}, {} partitions, batch {}, {} run(s) per scenario, {} CPU(s)",
            report.broker,
            args.partitions,
            args.batch,
            args.repeat,
            report::cpus()
        ),
        latency: "per emit call; collector: per 500-event append".into(),
        throughput: "first run; dashed: emitted".into(),
        unit: "events/s".into(),
        scale: 1.0,
        since: "the first emit".into(),
    };
    report::finish("kafka", &args.common, &report, &recording, &labels, || {
        print_human(&report)
    })
}

/// What one run records for the plot: call latencies, and events emitted and delivered over time.
struct Traced {
    hist: Histogram<u64>,
    emitted: Timeline,
    delivered: Timeline,
}

async fn run_all(args: &Args) -> anyhow::Result<(Report, Recording)> {
    let (_broker, bootstrap, broker_desc) = match &args.bootstrap {
        Some(b) => (None, b.clone(), b.clone()),
        None => {
            let b = tokio::task::spawn_blocking(TestBroker::start)
                .await?
                .map_err(anyhow::Error::msg)?;
            let addr = b.bootstrap();
            (
                Some(b),
                addr.clone(),
                format!("tansu on {addr}, started by the bench"),
            )
        }
    };
    let mut scenarios = Vec::new();
    let mut recording = Recording::default();
    let bar = report::progress(args.repeat as u64 * 3, "kafka");
    for (i, name) in ["sink_disk", "sink_memory", "collector_output"]
        .into_iter()
        .enumerate()
    {
        let mut rates = Vec::new();
        let mut secs = Vec::new();
        let mut emits = Vec::new();
        let mut hist = report::histogram();
        let mut first: Option<Traced> = None;
        for _ in 0..args.repeat {
            let topic = format!("bench-{}", uuid::Uuid::new_v4().simple());
            let (b, t, p) = (bootstrap.clone(), topic.clone(), args.partitions);
            tokio::task::spawn_blocking(move || broker::create_topic(&b, &t, p))
                .await?
                .map_err(anyhow::Error::msg)?;
            let events = build_events(args.events, args.event_bytes);
            let (elapsed, emit_rate, traced) = match name {
                "collector_output" => {
                    let (e, t) = run_output(&bootstrap, &topic, events).await?;
                    (e, None, t)
                }
                _ => {
                    let (b, t, disk) = (bootstrap.clone(), topic.clone(), name == "sink_disk");
                    let batch = args.batch;
                    let (e, r, traced) =
                        tokio::task::spawn_blocking(move || run_sink(&b, &t, disk, batch, events))
                            .await??;
                    (e, Some(r), traced)
                }
            };
            hist.add(&traced.hist)?;
            first.get_or_insert(traced);
            bar.inc(1);
            if args.verify {
                let (b, t, n) = (bootstrap.clone(), topic.clone(), args.events);
                let got = tokio::task::spawn_blocking(move || {
                    broker::read_topic(&b, &t, n, Duration::from_secs(1), Duration::from_secs(120))
                })
                .await?
                .map_err(anyhow::Error::msg)?;
                anyhow::ensure!(
                    got.len() == args.events,
                    "{name}: topic {topic} holds {} messages, {} were sent",
                    got.len(),
                    args.events
                );
            }
            rates.push(args.events as f64 / elapsed.as_secs_f64());
            secs.push(elapsed.as_secs_f64());
            if let Some(r) = emit_rate {
                emits.push(r);
            }
        }
        recording.latency.push(LatencySeries {
            label: name.to_string(),
            hist,
        });
        if let Some(t) = first {
            recording.achieved_vs_emitted(name, "delivered", t.delivered, t.emitted, i);
        }
        scenarios.push(Scenario {
            name,
            events: args.events,
            events_per_sec: Spread::of(rates),
            seconds: Spread::of(secs),
            emit_per_sec: (!emits.is_empty()).then(|| Spread::of(emits)),
        });
    }
    bar.finish_and_clear();
    let report = Report {
        broker: broker_desc,
        partitions: args.partitions,
        batch: args.batch,
        event_bytes: args.event_bytes,
        repeat: args.repeat,
        verified: args.verify,
        scenarios,
    };
    Ok((report, recording))
}

/// Heartbeat envelopes padded to about `bytes` each, built before the clock starts.
fn build_events(n: usize, bytes: usize) -> Vec<Event> {
    let pad = "x".repeat(bytes.saturating_sub(260));
    (0..n)
        .map(|i| {
            Event::Built(Box::new(Envelope::new(
                "stream_heartbeat",
                Fields::new()
                    .session_id("bench-session")
                    .connection_id("bench-connection")
                    .meta("frames_in", i as u64)
                    .meta("pad", pad.as_str()),
            )))
        })
        .collect()
}

/// Emits every event into a fresh sink and waits until all are delivered; returns the time from
/// the first emit to the last delivery, and the emit rate.
fn run_sink(
    bootstrap: &str,
    topic: &str,
    disk: bool,
    batch: usize,
    events: Vec<Event>,
) -> anyhow::Result<(Duration, f64, Traced)> {
    let n = events.len() as u64;
    let dir = std::env::temp_dir().join(format!(
        "trickle-relay-bench-kafka-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let mut config = KafkaConfig::new(bootstrap);
    config.topic = topic.to_owned();
    config.buffer_path = disk.then(|| dir.clone());
    config.batch_max_events = batch.max(1);
    // The bench emits faster than any producer drains: make room for the whole burst.
    config.handoff_capacity = events.len().max(1);
    config.max_memory_buffer = events.len().max(1);
    let sink = Arc::new(KafkaSink::start(config).context("cannot start the Kafka sink")?);
    let start = Instant::now();
    let sampled = Arc::clone(&sink);
    let sampler = Sampler::start(start, move || {
        let s = sampled.kafka_stats();
        [s.emitted, s.delivered]
    });
    let mut hist = report::histogram();
    for e in events {
        let t = Instant::now();
        sink.emit(e);
        report::record(&mut hist, t.elapsed());
    }
    let emitted = start.elapsed();
    let outcome = sink.flush_timeout(Duration::from_secs(300));
    let elapsed = start.elapsed();
    let [emitted_line, delivered] = sampler.stop()?;
    let stats = sink.shutdown(Duration::from_secs(5));
    drop(sink);
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(
        outcome == FlushOutcome::Drained && stats.delivered == n && stats.dropped() == 0,
        "not everything was delivered: {outcome:?}, {stats:?}"
    );
    let traced = Traced {
        hist,
        emitted: emitted_line,
        delivered,
    };
    Ok((elapsed, n as f64 / emitted.as_secs_f64(), traced))
}

/// Appends every event (as the API events the collector receives) 500 at a time, each append
/// awaited before the next, as sequential metrics requests would be.
async fn run_output(
    bootstrap: &str,
    topic: &str,
    events: Vec<Event>,
) -> anyhow::Result<(Duration, Traced)> {
    let mut config = KafkaConfig::new(bootstrap);
    config.topic = topic.to_owned();
    let output = Arc::new(KafkaOutput::new(&config).context("cannot create the Kafka output")?);
    let api: Vec<Bytes> = events
        .iter()
        .map(|e| {
            let mut out = Vec::new();
            reporter::api_event(&e.to_json(), &mut out)
                .map(|()| Bytes::from(out))
                .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let start = Instant::now();
    let mut hist = report::histogram();
    let (mut emitted, mut delivered) = (Timeline::new(start), Timeline::new(start));
    for chunk in api.chunks(500) {
        let t = Instant::now();
        emitted.record(t, chunk.len() as u64);
        output
            .append(chunk.to_vec())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let done = Instant::now();
        report::record(&mut hist, done - t);
        delivered.record(done, chunk.len() as u64);
    }
    let traced = Traced {
        hist,
        emitted,
        delivered,
    };
    Ok((start.elapsed(), traced))
}

fn print_human(r: &Report) {
    println!(
        "bench kafka: broker {}, {} partitions, ~{} B events, {} runs each{}",
        r.broker,
        r.partitions,
        r.event_bytes,
        r.repeat,
        if r.verified {
            ", topics read back and counted"
        } else {
            ""
        }
    );
    for s in &r.scenarios {
        let e = &s.events_per_sec;
        print!(
            "  {:<17} {:>9} events: {:>9.0} events/s median (min {:.0}, max {:.0})",
            s.name, s.events, e.median, e.min, e.max
        );
        if let Some(x) = &s.emit_per_sec {
            print!("; emit {:.0}/s median", x.median);
        }
        println!();
    }
}
