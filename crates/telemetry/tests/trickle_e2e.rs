//! TrickleEventsSink over the real thing: JsonlWriter -> trickle server (loopback TCP) -> JsonlReader.

use bytes::Bytes;
use serde_json::Value;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use telemetry::sinks::{SessionContext, TrickleEventsSink};
use telemetry::{
    install_sink, publish_event, set_telemetry_enabled, Envelope, Event, Fields, RawEnvelope, Sink,
};
use tokio::task::JoinHandle;
use trickle::jsonl::{
    JsonlReader, JsonlReaderOptions, JsonlWriter, JsonlWriterOptions, JSONL_CONTENT_TYPE,
};
use trickle::messages::EventMessage;
use trickle::publisher::{Publisher, PublisherOptions};
use trickle::server::{Server, ServerConfig};
use trickle::subscriber::{Subscriber, SubscriberOptions};

const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

struct Channel {
    server: Server,
    writer: JsonlWriter,
    reader: JoinHandle<Vec<RawEnvelope>>,
    /// Telemetry envelopes the reader has so far.
    seen: Arc<AtomicU64>,
}

impl Channel {
    /// Waits until the reader has `n` envelopes: closing deletes the channel, and a reader more
    /// than a segment behind then misses the tail (the protocol's rule, not a loss to test here).
    async fn caught_up(&self, n: u64) {
        within("reader caught up", async {
            while self.seen.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }
}

/// A server with one events channel, a writer on it, and a reader collecting telemetry envelopes
/// (exact bytes) until the channel closes.
async fn events_channel(name: &str) -> Channel {
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            autocreate: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    server
        .channels()
        .create(name, Some(JSONL_CONTENT_TYPE))
        .unwrap();
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
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(msg) = reader.next::<EventMessage>().await.expect("reader") {
            if let EventMessage::Telemetry(t) = msg {
                got.push(RawEnvelope::from_raw_value(t.event).expect("envelope parses"));
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        assert_eq!(reader.stats().bad_lines(), 0);
        got
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
    Channel {
        server,
        writer,
        reader,
        seen,
    }
}

fn session() -> SessionContext {
    SessionContext {
        session_id: Some("sess-e2e".into()),
        connection_id: Some("conn-e2e".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_events_cross_a_real_trickle_server_in_order_byte_for_byte() {
    let ch = events_channel("events-order").await;
    let sink = TrickleEventsSink::spawn(ch.writer.clone(), session(), 4096).unwrap();
    const N: usize = 2000;
    let mut sent: Vec<Bytes> = Vec::with_capacity(N);
    for i in 0..N {
        let env = Envelope::new(
            if i % 5 == 0 {
                "pipeline_loaded"
            } else {
                "stream_heartbeat"
            },
            Fields::new()
                .session_id("sess-e2e")
                .connection_id("conn-e2e")
                .meta("i", i)
                .meta("fps_in", 29.97)
                .meta("note", "caf\u{e9} \"quoted\" \\ back"),
        );
        sent.push(env.to_json());
        sink.emit(Event::from(env));
    }
    let stats = within("sink shutdown", sink.shutdown()).await;
    ch.caught_up(stats.delivered + stats.reports).await;
    within("writer close", ch.writer.close()).await.unwrap();
    let got = within("reader", ch.reader).await.unwrap();
    assert_eq!(stats.delivered, N as u64);
    assert_eq!(stats.dropped(), 0);
    assert_eq!(got.len(), N);
    for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
        assert_eq!(g.as_bytes(), s, "event {i} differs");
    }
    let ids: Vec<&str> = got.iter().map(|e| e.id()).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), N);
    ch.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_burst_over_a_real_channel_keeps_lifecycle_and_reports_losses() {
    let ch = events_channel("events-burst").await;
    let sink = TrickleEventsSink::spawn(ch.writer.clone(), session(), 256).unwrap();
    set_telemetry_enabled(true);
    let guard = install_sink(sink.clone());
    const PER_THREAD: usize = 20_000;
    let producers: Vec<_> = (0..2)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..PER_THREAD {
                    publish_event(
                        "stream_heartbeat",
                        Fields::new()
                            .session_id("sess-e2e")
                            .meta("t", t)
                            .meta("i", i),
                    );
                    if i % 400 == 0 {
                        publish_event("stream_started", Fields::new().meta("t", t).meta("i", i));
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    drop(guard);
    let stats = within("sink shutdown", sink.shutdown()).await;
    ch.caught_up(stats.delivered + stats.reports).await;
    within("writer close", ch.writer.close()).await.unwrap();
    let got = within("reader", ch.reader).await.unwrap();

    let lifecycle = 2 * PER_THREAD.div_ceil(400);
    assert_eq!(stats.emitted as usize, 2 * PER_THREAD + lifecycle);
    assert_eq!(stats.emitted, stats.delivered + stats.dropped());
    assert_eq!(stats.dropped_high, 0);
    let started = got
        .iter()
        .filter(|e| e.event_type() == Some("stream_started"))
        .count();
    assert_eq!(started, lifecycle, "every lifecycle event arrives");

    let reports: Vec<Value> = got
        .iter()
        .filter(|e| e.event_type() == Some("telemetry_dropped"))
        .map(|e| serde_json::from_slice(e.as_bytes()).unwrap())
        .collect();
    assert_eq!(reports.len() as u64, stats.reports);
    assert_eq!(got.len() as u64, stats.delivered + stats.reports);
    let reported: u64 = reports
        .iter()
        .map(|r| r["data"]["dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(
        reported,
        stats.dropped(),
        "the client sees exactly the counted loss"
    );
    for r in &reports {
        assert_eq!(r["data"]["session_id"], "sess-e2e");
        assert_eq!(r["data"]["connection_id"], "conn-e2e");
    }
    ch.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_channel_never_blocks_emit_and_counts_every_event() {
    let ch = events_channel("events-dead").await;
    // Close the writer first: every write fails from now on.
    ch.writer.close().await.unwrap();
    let sink = TrickleEventsSink::spawn(ch.writer.clone(), session(), 64).unwrap();
    for i in 0..1000 {
        sink.emit(Event::from(Envelope::new(
            "stream_started",
            Fields::new().meta("i", i),
        )));
    }
    let stats = within("sink shutdown", sink.shutdown()).await;
    assert_eq!(stats.emitted, 1000);
    assert_eq!(stats.delivered, 0);
    assert_eq!(stats.dropped(), 1000);
    assert!(stats.write_errors > 0);
    assert_eq!(stats.reports, 0);
    let got = within("reader", ch.reader).await.unwrap();
    assert!(got.is_empty());
    ch.server.shutdown().await;
}
