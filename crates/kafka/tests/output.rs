//! The collector's Kafka output against a real broker (`tansu`, per test) and a real consumer.

use bytes::Bytes;
use collector::Output;
use kafka::broker::{self, TestBroker};
use kafka::{KafkaConfig, KafkaOutput};
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 3;

fn config(bootstrap: &str, topic: &str) -> KafkaConfig {
    let mut c = KafkaConfig::new(bootstrap);
    c.topic = topic.to_owned();
    c.message_timeout = Duration::from_secs(3);
    c
}

/// An API event (the reporter's shape) and the envelope it came from.
fn api_event(i: usize) -> (String, Bytes, String) {
    let id = uuid::Uuid::new_v4().to_string();
    let data = format!(
        r#"{{"type":"stream_heartbeat","client_source":"scope","timestamp":"1700000000000","seq":{i},"fps":30.10}}"#
    );
    let api = format!(
        r#"{{"type":"stream_heartbeat","data":{data},"id":"{id}","timestamp":"1700000000000","relayed_via":"trickle"}}"#
    );
    let envelope = format!(
        r#"{{"id":"{id}","type":"stream_trace","timestamp":"1700000000000","data":{data},"relayed_via":"trickle"}}"#
    );
    (id, Bytes::from(api), envelope)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn append_resolves_after_kafka_acknowledged_every_event_as_its_envelope() {
    let b = TestBroker::start().unwrap_or_else(|e| panic!("{e}"));
    let topic = "collected";
    b.create_topic(topic, PARTITIONS).unwrap();
    let output = KafkaOutput::new(&config(&b.bootstrap(), topic)).unwrap();
    let rt = runtime();
    rt.block_on(output.check_ready()).expect("ready");
    let events: Vec<_> = (0..1000).map(api_event).collect();
    for chunk in events.chunks(500) {
        let batch = chunk.iter().map(|(_, api, _)| api.clone()).collect();
        rt.block_on(output.append(batch)).expect("append");
    }
    let got = broker::read_topic(
        &b.bootstrap(),
        topic,
        events.len(),
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(got.len(), events.len(), "each event once");
    let by_key: std::collections::HashMap<Vec<u8>, &broker::Consumed> =
        got.iter().map(|m| (m.key.clone().unwrap(), m)).collect();
    for (id, _, envelope) in &events {
        let m = by_key.get(id.as_bytes()).expect("event in the topic");
        assert_eq!(m.value.as_deref(), Some(envelope.as_bytes()));
        assert_eq!(
            m.partition,
            broker::default_partition(id.as_bytes(), PARTITIONS)
        );
    }
}

#[test]
fn append_fails_when_kafka_cannot_take_the_events_and_readiness_says_why() {
    let b = TestBroker::start().unwrap_or_else(|e| panic!("{e}"));
    let output = KafkaOutput::new(&config(&b.bootstrap(), "not-created")).unwrap();
    let rt = runtime();
    let e = rt.block_on(output.check_ready()).unwrap_err();
    assert!(e.reason.contains("not-created"), "{e}");

    let dead =
        KafkaOutput::new(&config(&format!("127.0.0.1:{}", broker::free_port()), "t")).unwrap();
    assert!(rt.block_on(dead.check_ready()).is_err());
    let t = Instant::now();
    let (_, api, _) = api_event(0);
    let e = rt.block_on(dead.append(vec![api])).unwrap_err();
    assert_eq!(e.output, "kafka");
    assert!(e.reason.contains("not acknowledged"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "bounded by message_timeout"
    );

    let e = rt
        .block_on(output.append(vec![Bytes::from_static(b"[1]")]))
        .unwrap_err();
    assert!(e.reason.contains("not a JSON object"), "{e}");
}
