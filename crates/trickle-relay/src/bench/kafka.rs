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

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use collector::Output;
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
    events: usize,
    events_per_sec: Spread,
    seconds: Spread,
    #[serde(skip_serializing_if = "Option::is_none")]
    emit_per_sec: Option<Spread>,
}

/// The whole report.
#[derive(Serialize, Debug)]
struct Report {
    bench: &'static str,
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
    anyhow::ensure!(args.repeat > 0, "--repeat must be at least 1");
    anyhow::ensure!(args.events > 0, "--events must be at least 1");
    anyhow::ensure!(args.partitions > 0, "--partitions must be at least 1");
    let json = args.json;
    let report = run_all(args).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(())
}

async fn run_all(args: Args) -> anyhow::Result<Report> {
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
    for name in ["sink_disk", "sink_memory", "collector_output"] {
        let mut rates = Vec::new();
        let mut secs = Vec::new();
        let mut emits = Vec::new();
        for _ in 0..args.repeat {
            let topic = format!("bench-{}", uuid::Uuid::new_v4().simple());
            let (b, t, p) = (bootstrap.clone(), topic.clone(), args.partitions);
            tokio::task::spawn_blocking(move || broker::create_topic(&b, &t, p))
                .await?
                .map_err(anyhow::Error::msg)?;
            let events = build_events(args.events, args.event_bytes);
            let (elapsed, emit_rate) = match name {
                "collector_output" => (run_output(&bootstrap, &topic, events).await?, None),
                _ => {
                    let (b, t, disk) = (bootstrap.clone(), topic.clone(), name == "sink_disk");
                    let batch = args.batch;
                    let (e, r) =
                        tokio::task::spawn_blocking(move || run_sink(&b, &t, disk, batch, events))
                            .await??;
                    (e, Some(r))
                }
            };
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
        scenarios.push(Scenario {
            name,
            events: args.events,
            events_per_sec: Spread::of(rates),
            seconds: Spread::of(secs),
            emit_per_sec: (!emits.is_empty()).then(|| Spread::of(emits)),
        });
    }
    Ok(Report {
        bench: "kafka",
        broker: broker_desc,
        partitions: args.partitions,
        batch: args.batch,
        event_bytes: args.event_bytes,
        repeat: args.repeat,
        verified: args.verify,
        scenarios,
    })
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
) -> anyhow::Result<(Duration, f64)> {
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
    let sink = KafkaSink::start(config).context("cannot start the Kafka sink")?;
    let start = Instant::now();
    for e in events {
        sink.emit(e);
    }
    let emitted = start.elapsed();
    let outcome = sink.flush_timeout(Duration::from_secs(300));
    let elapsed = start.elapsed();
    let stats = sink.shutdown(Duration::from_secs(5));
    drop(sink);
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(
        outcome == FlushOutcome::Drained && stats.delivered == n && stats.dropped() == 0,
        "not everything was delivered: {outcome:?}, {stats:?}"
    );
    Ok((elapsed, n as f64 / emitted.as_secs_f64()))
}

/// Appends every event (as the API events the collector receives) 500 at a time, each append
/// awaited before the next, as sequential metrics requests would be.
async fn run_output(bootstrap: &str, topic: &str, events: Vec<Event>) -> anyhow::Result<Duration> {
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
    for chunk in api.chunks(500) {
        output
            .append(chunk.to_vec())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(start.elapsed())
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
