//! Records keyed by id land on the partition the Java client's partitioner picks (the seed's
//! producer, aiokafka, uses it), against a real broker (`tansu`) with a multi-partition topic.
//! The expected partitions are computed here, independently of the crate, by a transcription of
//! the Java client's `Utils.murmur2` and `toPositive(murmur2(key)) % partitions`, checked first
//! against the vectors of Kafka's own `UtilsTest.testMurmur2`.

use collector::Output;
use kafka::broker::{self, TestBroker};
use kafka::{FlushOutcome, KafkaConfig, KafkaOutput, KafkaSink};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use telemetry::{Event, RawEnvelope, Sink};

const PARTITIONS: i32 = 12;

/// `org.apache.kafka.common.utils.Utils.murmur2`, statement by statement (Java's `int` is
/// `i32` with wrapping arithmetic; `>>>` is a shift of the unsigned bits).
fn java_murmur2(data: &[u8]) -> i32 {
    let length = data.len() as i32;
    let seed: i32 = 0x9747b28c_u32 as i32;
    let m: i32 = 0x5bd1e995;
    let r = 24;
    let mut h: i32 = seed ^ length;
    let length4 = length / 4;
    let byte = |i: i32| data[i as usize] as i32 & 0xff;
    for i in 0..length4 {
        let i4 = i * 4;
        let mut k: i32 =
            byte(i4) + (byte(i4 + 1) << 8) + (byte(i4 + 2) << 16) + (byte(i4 + 3) << 24);
        k = k.wrapping_mul(m);
        k ^= ((k as u32) >> r) as i32;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    let rest = length & !3;
    match length % 4 {
        3 => {
            h ^= byte(rest + 2) << 16;
            h ^= byte(rest + 1) << 8;
            h ^= byte(rest);
            h = h.wrapping_mul(m);
        }
        2 => {
            h ^= byte(rest + 1) << 8;
            h ^= byte(rest);
            h = h.wrapping_mul(m);
        }
        1 => {
            h ^= byte(rest);
            h = h.wrapping_mul(m);
        }
        _ => {}
    }
    h ^= ((h as u32) >> 13) as i32;
    h = h.wrapping_mul(m);
    h ^= ((h as u32) >> 15) as i32;
    h
}

/// The Java client's partition for a keyed record: `toPositive(murmur2(key)) % numPartitions`.
fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (java_murmur2(key) & 0x7fffffff) % partitions
}

#[test]
fn the_java_transcription_matches_kafkas_own_vectors() {
    for (key, want) in [
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58897971,
        ),
        ("abc", 479470107),
    ] {
        assert_eq!(java_murmur2(key.as_bytes()), want, "{key}");
    }
    assert_eq!(java_partition(b"foobar", 50), 16);
}

/// Known ids: Kafka's test keys, the shapes of this project's ids, and a spread of others.
fn ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "21",
        "foobar",
        "a-little-bit-long-string",
        "a-little-bit-longer-string",
        "abc",
        "6f1c2a9e-3b7d-4c21-9a5e-0d8f7b6c5a43",
        "00000000-0000-0000-0000-000000000000",
        "runner-ready-1",
        "é-ünïcödé-id",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ids.extend((0..40).map(|i| format!("evt-{i:04}-{}", i * 7919)));
    ids
}

fn envelope(id: &str) -> Event {
    let json = format!(
        r#"{{"id":"{id}","type":"stream_trace","timestamp":"1700000000000","data":{{"type":"partition_probe"}}}}"#
    );
    Event::Raw(RawEnvelope::parse(json.into_bytes().into()).expect("valid envelope"))
}

/// A broker with `topic` created, and a producer configuration for it.
fn broker(topic: &str) -> (TestBroker, KafkaConfig) {
    let b = TestBroker::start().unwrap_or_else(|e| panic!("{e}"));
    b.create_topic(topic, PARTITIONS).expect("create topic");
    let mut config = KafkaConfig::new(b.bootstrap());
    config.topic = topic.into();
    (b, config)
}

/// Every id read back once, on the Java client's partition for it.
fn assert_java_partitions(b: &TestBroker, topic: &str, ids: &[String]) {
    let got = broker::read_topic(
        &b.bootstrap(),
        topic,
        ids.len(),
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.len(), ids.len(), "each id once");
    let placed: HashMap<String, i32> = got
        .iter()
        .map(|m| {
            let key = m.key.clone().expect("keyed");
            (String::from_utf8(key).expect("UTF-8 id"), m.partition)
        })
        .collect();
    for id in ids {
        assert_eq!(
            placed.get(id),
            Some(&java_partition(id.as_bytes(), PARTITIONS)),
            "id {id:?} is not on the Java client's partition"
        );
    }
    let used: HashSet<i32> = placed.values().copied().collect();
    assert!(used.len() > PARTITIONS as usize / 2, "spread over {used:?}");
    // The check tells the partitioners apart: librdkafka's default (CRC-32) would have put many
    // of these ids elsewhere.
    let crc_elsewhere = ids
        .iter()
        .filter(|id| {
            (crc32fast::hash(id.as_bytes()) % PARTITIONS as u32) as i32
                != java_partition(id.as_bytes(), PARTITIONS)
        })
        .count();
    assert!(crc_elsewhere > ids.len() / 2, "{crc_elsewhere} differ");
}

#[test]
fn the_sink_places_ids_on_the_java_clients_partitions() {
    let topic = "partition-sink";
    let (b, config) = broker(topic);
    let sink = KafkaSink::start(config).expect("start");
    let ids = ids();
    for id in &ids {
        sink.emit(envelope(id));
    }
    assert_eq!(
        sink.flush_timeout(Duration::from_secs(30)),
        FlushOutcome::Drained
    );
    sink.shutdown(Duration::from_secs(5));
    assert_java_partitions(&b, topic, &ids);
}

#[test]
fn the_collector_output_places_ids_on_the_java_clients_partitions() {
    let topic = "partition-output";
    let (b, config) = broker(topic);
    let output = KafkaOutput::new(&config).expect("output");
    let ids = ids();
    let events: Vec<bytes::Bytes> = ids
        .iter()
        .map(|id| {
            format!(r#"{{"type":"partition_probe","data":{{}},"id":"{id}","timestamp":"1"}}"#)
                .into()
        })
        .collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime
        .block_on(output.append(events))
        .expect("the broker acknowledged every event");
    assert_java_partitions(&b, topic, &ids);
}
