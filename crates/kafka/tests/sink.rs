//! The Kafka sink against a real broker (`tansu`, started per test on a free loopback port) and
//! a real consumer reading the topic back.

use kafka::broker::{self, Consumed, TestBroker};
use kafka::{FlushOutcome, KafkaConfig, KafkaSink};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use telemetry::{Envelope, Event, Fields, RawEnvelope, Sink};

const TOPIC: &str = "scope-events";
const PARTITIONS: i32 = 4;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kafka=info,librdkafka=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A broker with the topic created, or a failure naming scripts/test-broker.sh.
fn broker() -> TestBroker {
    init_tracing();
    let b = TestBroker::start().unwrap_or_else(|e| panic!("{e}"));
    b.create_topic(TOPIC, PARTITIONS).expect("create topic");
    b
}

fn config(bootstrap: &str, buffer: Option<&Path>) -> KafkaConfig {
    let mut c = KafkaConfig::new(bootstrap);
    c.buffer_path = buffer.map(Path::to_path_buf);
    c.backoff_base = Duration::from_millis(100);
    c.backoff_max = Duration::from_millis(500);
    c.reconnect_backoff_max = Duration::from_millis(500);
    // A restarted (in-memory) broker forgot the producer's id: fail over to a fresh producer soon.
    c.message_timeout = Duration::from_secs(4);
    if let Ok(d) = std::env::var("RDKAFKA_DEBUG") {
        c.extra.push(("debug".into(), d));
    }
    c
}

/// Built envelopes and forwarded (raw, annotated) ones, with their exact JSON bytes.
fn events(n: usize, tag: &str) -> Vec<(Event, String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let event = if i % 2 == 0 {
                Event::Built(Box::new(Envelope::new(
                    "stream_heartbeat",
                    Fields::new()
                        .session_id("sess")
                        .meta("seq", i as u64)
                        .meta("tag", tag),
                )))
            } else {
                let json = format!(
                    r#"{{"id":"{}","type":"stream_trace","timestamp":"1700000000000","data":{{"type":"pipeline_loaded","client_source":"scope","timestamp":"1700000000000","seq":{i},"tag":"{tag}","f":1.50}}}}"#,
                    uuid::Uuid::new_v4()
                );
                let mut raw = RawEnvelope::parse(json.into()).expect("valid envelope");
                raw.annotate_relayed_via("trickle");
                Event::Raw(raw)
            };
            let id = event.id().into_owned();
            let json = event.to_json().to_vec();
            (event, id, json)
        })
        .collect()
}

/// Every expected event is in `got` exactly once, key = id, value byte-identical, in the
/// partition the default partitioner picks; and nothing else is there.
fn assert_exactly(got: &[Consumed], want: &[(String, Vec<u8>)]) {
    let mut per_partition: HashMap<i32, (usize, i64, i64)> = HashMap::new();
    for m in got {
        let e = per_partition
            .entry(m.partition)
            .or_insert((0, i64::MAX, -1));
        e.0 += 1;
        e.1 = e.1.min(m.offset);
        e.2 = e.2.max(m.offset);
    }
    eprintln!(
        "topic holds {} messages, {} expected; per partition (count, first, last offset): {per_partition:?}",
        got.len(),
        want.len()
    );
    let mut by_key: HashMap<Vec<u8>, Vec<&Consumed>> = HashMap::new();
    for m in got {
        by_key
            .entry(m.key.clone().expect("every message has a key"))
            .or_default()
            .push(m);
    }
    for (id, json) in want {
        let ms = by_key
            .get(id.as_bytes())
            .unwrap_or_else(|| panic!("event {id} is not in the topic"));
        assert_eq!(ms.len(), 1, "event {id} is in the topic {} times", ms.len());
        let m = ms[0];
        assert_eq!(
            m.value.as_deref(),
            Some(json.as_slice()),
            "value of {id} is not the envelope byte for byte"
        );
        assert_eq!(
            m.partition,
            broker::default_partition(id.as_bytes(), PARTITIONS),
            "event {id} is not in its key's partition"
        );
    }
    assert_eq!(got.len(), want.len(), "extra messages in the topic");
}

/// The whole topic: at least `n` messages, then 1 s without new ones.
fn read(b: &TestBroker, n: usize) -> Vec<Consumed> {
    broker::read_topic(
        &b.bootstrap(),
        TOPIC,
        n,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn emit_all(sink: &KafkaSink, evs: Vec<(Event, String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    evs.into_iter()
        .map(|(e, id, json)| {
            sink.emit(e);
            (id, json)
        })
        .collect()
}

#[test]
fn every_event_arrives_once_keyed_by_id_with_the_exact_envelope_bytes() {
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    let sink = KafkaSink::start(config(&b.bootstrap(), Some(dir.path()))).expect("start");
    let want = emit_all(&sink, events(2000, "a"));
    assert_eq!(
        sink.flush_timeout(Duration::from_secs(30)),
        FlushOutcome::Drained
    );
    let stats = sink.shutdown(Duration::from_secs(5));
    eprintln!("{stats:?}");
    assert_eq!(stats.emitted, 2000);
    assert_eq!(stats.delivered, 2000);
    assert_eq!(stats.dropped(), 0);
    assert_eq!(stats.buffered, 0);
    assert!(stats.disk_ok, "events went through the disk buffer");
    assert_exactly(&read(&b, want.len()), &want);
}

#[test]
fn broker_outage_keeps_events_buffered_and_delivers_them_when_it_returns() {
    let mut b = broker();
    let dir = tempfile::tempdir().unwrap();
    let sink = KafkaSink::start(config(&b.bootstrap(), Some(dir.path()))).expect("start");
    let before = emit_all(&sink, events(300, "before"));
    assert_eq!(
        sink.flush_timeout(Duration::from_secs(30)),
        FlushOutcome::Drained
    );
    assert_exactly(&read(&b, before.len()), &before);

    // Down: nothing is lost, emit never blocks, everything waits in the buffer.
    b.kill();
    let t = Instant::now();
    let during = emit_all(&sink, events(500, "during"));
    assert!(t.elapsed() < Duration::from_secs(1), "emit blocked");
    std::thread::sleep(Duration::from_secs(2));
    let mid = sink.kafka_stats();
    eprintln!("during the outage: {mid:?}");
    assert_eq!(mid.buffered, 500, "everything emitted waits in the buffer");
    assert_eq!(
        sink.flush_timeout(Duration::from_millis(300)),
        FlushOutcome::TimedOut { left: 500 }
    );

    // Back (empty: in-memory storage), with the topic recreated.
    b.restart().expect("restart");
    b.create_topic(TOPIC, PARTITIONS).expect("recreate topic");
    assert_eq!(
        sink.flush_timeout(Duration::from_secs(40)),
        FlushOutcome::Drained,
        "{:?}",
        sink.kafka_stats()
    );
    let stats = sink.shutdown(Duration::from_secs(5));
    eprintln!("{stats:?}");
    assert_eq!(stats.delivered, 800);
    assert_eq!(stats.dropped(), 0);
    assert_exactly(&read(&b, during.len()), &during);
}

#[test]
fn events_buffered_on_disk_survive_a_restart_of_the_sink() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let port = broker::free_port();
    let bootstrap = format!("127.0.0.1:{port}");
    // No broker yet: everything stays on disk, and a shutdown leaves it there.
    let sink = KafkaSink::start(config(&bootstrap, Some(dir.path()))).expect("start");
    let want = emit_all(&sink, events(400, "restart"));
    let stats = sink.shutdown(Duration::from_millis(500));
    assert_eq!(stats.buffered_disk, 400, "{stats:?}");
    assert_eq!(stats.delivered, 0);
    drop(sink);

    let b = TestBroker::start_on(port).unwrap_or_else(|e| panic!("{e}"));
    b.create_topic(TOPIC, PARTITIONS).expect("create topic");
    let sink = KafkaSink::start(config(&bootstrap, Some(dir.path()))).expect("restart sink");
    assert_eq!(
        sink.flush_timeout(Duration::from_secs(30)),
        FlushOutcome::Drained
    );
    let stats = sink.shutdown(Duration::from_secs(5));
    assert_eq!(stats.recovered, 400, "{stats:?}");
    assert_eq!(stats.delivered, 400);
    assert_exactly(&read(&b, want.len()), &want);
}

#[test]
fn memory_buffer_works_without_a_disk_buffer() {
    let b = broker();
    let sink = KafkaSink::start(config(&b.bootstrap(), None)).expect("start");
    let want = emit_all(&sink, events(500, "mem"));
    assert_eq!(
        sink.flush_timeout(Duration::from_secs(30)),
        FlushOutcome::Drained
    );
    let stats = sink.shutdown(Duration::from_secs(5));
    assert_eq!(stats.accepted_memory, 500);
    assert!(!stats.disk_ok);
    assert_exactly(&read(&b, want.len()), &want);
}

#[test]
fn emitting_after_shutdown_is_counted_and_reported() {
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    let sink = KafkaSink::start(config(&b.bootstrap(), Some(dir.path()))).expect("start");
    sink.shutdown(Duration::from_secs(5));
    let before = sink.kafka_stats();
    for (e, _, _) in events(3, "late") {
        sink.emit(e);
    }
    let after = sink.kafka_stats();
    assert_eq!(after.dropped_handoff - before.dropped_handoff, 3);
    assert_eq!(sink.stats().dropped(), after.dropped());
    assert_eq!(sink.name(), "kafka");
}

#[test]
fn a_missing_broker_binary_fails_with_the_install_script_named() {
    let e = broker::tansu_bin_with(|k| match k {
        "TANSU_BIN" => Some("/nonexistent/tansu".into()),
        _ => None,
    })
    .unwrap_err();
    assert!(e.contains("scripts/test-broker.sh"), "{e}");
    let e = broker::tansu_bin_with(|k| match k {
        "PATH" => Some("/nonexistent".into()),
        "HOME" => Some("/nonexistent".into()),
        _ => None,
    })
    .unwrap_err();
    assert!(e.contains("scripts/test-broker.sh"), "{e}");
}

#[test]
fn sasl_ssl_settings_are_accepted_by_the_bundled_librdkafka_and_the_password_stays_hidden() {
    init_tracing();
    let mut c = config(&format!("127.0.0.1:{}", broker::free_port()), None);
    c.sasl = Some(kafka::SaslPlain {
        username: "api-key".into(),
        password: "very-secret-password".into(),
    });
    // librdkafka refuses SASL_SSL at creation when it was built without SSL or SASL support.
    let sink = KafkaSink::start(c).expect("SASL_SSL/PLAIN producer created");
    assert!(!format!("{sink:?}").contains("very-secret-password"));
    assert!(!format!("{:?}", sink.config()).contains("very-secret-password"));
    assert!(sink
        .config()
        .describe()
        .contains("SASL_SSL/PLAIN user=api-key"));
    sink.shutdown(Duration::from_millis(100));
}

#[test]
fn oversized_events_are_dropped_counted_and_reported_downstream() {
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&b.bootstrap(), Some(dir.path()));
    c.report_interval = Duration::from_millis(100);
    let sink = KafkaSink::start(c).expect("start");
    let big = |bytes: usize| {
        Event::Built(Box::new(Envelope::new(
            "pipeline_loaded",
            Fields::new().meta("pad", "x".repeat(bytes)),
        )))
    };
    let mut want = emit_all(&sink, events(1, "a"));
    sink.emit(big(1_500_000)); // over the disk buffer's 1 MiB record limit
    sink.emit(big(1_000_100)); // fits the disk buffer, over Kafka's message.max.bytes
    want.extend(emit_all(&sink, events(1, "b")));

    let deadline = Instant::now() + Duration::from_secs(30);
    let reported = loop {
        assert_eq!(
            sink.flush_timeout(Duration::from_secs(30)),
            FlushOutcome::Drained
        );
        let got = read(&b, want.len() + 1);
        let reports: Vec<serde_json::Value> = got
            .iter()
            .filter_map(|m| serde_json::from_slice(m.value.as_deref()?).ok())
            .filter(|v: &serde_json::Value| v["data"]["type"] == "telemetry_dropped")
            .collect();
        let n: u64 = reports
            .iter()
            .map(|v| v["data"]["dropped"].as_u64().unwrap_or(0))
            .sum();
        if n >= 2 || Instant::now() > deadline {
            let ours: Vec<_> = got
                .iter()
                .filter(|m| {
                    want.iter()
                        .any(|(id, _)| m.key.as_deref() == Some(id.as_bytes()))
                })
                .cloned()
                .collect();
            assert_exactly(&ours, &want);
            break reports;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stats = sink.shutdown(Duration::from_secs(5));
    assert_eq!(stats.dropped_oversize, 1, "{stats:?}");
    assert_eq!(stats.dropped_rejected, 1, "{stats:?}");
    assert!(stats.reports >= 1);
    let sum = |k: &str| -> u64 {
        reported
            .iter()
            .map(|v| v["data"][k].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(sum("dropped"), 2, "{reported:?}");
    assert_eq!(sum("dropped_oversize"), 1);
    assert_eq!(sum("dropped_rejected"), 1);
    assert!(reported.iter().all(|v| v["data"]["sink"] == "kafka"));
}
