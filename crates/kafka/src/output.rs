//! [`KafkaOutput`]: the collector's Kafka output (`--output kafka[:TOPIC]`).
//!
//! # What is produced
//!
//! The collector receives API events `{"type": data.type, "data": {...}, "id", "timestamp",
//! ...}` (the reporter's shape). Each is produced as the **envelope** it came from:
//! `{"id":<id>,"type":"stream_trace","timestamp":<timestamp>,"data":<data>,<other members>}`,
//! with key = the id. The raw JSON of `id`, `timestamp`, `data` and every other member (the
//! members a producer added beside them) is copied byte for byte, never re-serialized
//! ([`envelope_from_api_event`]). So the topic carries one shape whichever path an event took:
//! for an envelope in the canonical member order (`id`, `type`, `timestamp`, `data`,
//! annotations; everything this project stamps) the value is byte-identical to what the client's
//! Kafka sink would have produced, and `data` is byte-identical always.
//!
//! # When the collector answers 200
//!
//! [`Output::append`] resolves `Ok` only after the broker acknowledged every event of the request
//! (idempotent producer, acks=all). Any failure, or no acknowledgement within
//! `message_timeout` (10 s by default here, well inside the reporter's 30 s request timeout),
//! resolves `Err`: the collector answers 503 and the reporter re-sends the batch. Events of that
//! batch that did reach the broker are then produced again: at-least-once, duplicates by key.

use crate::config::KafkaConfig;
use crate::producer::{BrokerHealth, LogContext};
use bytes::Bytes;
use collector::{Output, OutputError};
use futures::future::BoxFuture;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use telemetry::envelope::{first_byte, Members};

/// Opens the collector's output a spec names: `kafka` or `kafka:TOPIC` (this crate's: each event
/// produced as its envelope, broker and credentials from `KAFKA_BOOTSTRAP_SERVERS` /
/// `KAFKA_SASL_*`), else the collector's own (`jsonl:PATH`).
pub fn open(spec: &str) -> Result<Arc<dyn Output>, String> {
    if spec == "kafka" || spec.starts_with("kafka:") {
        return Ok(Arc::new(KafkaOutput::from_spec(spec)?));
    }
    collector::output::open(spec)
}

/// The output spec when none is given, and why (for the collector's startup line): `kafka` when
/// `KAFKA_BOOTSTRAP_SERVERS` is set, as the seed's deployment publishes the metrics API's events
/// to Kafka; else `metrics.jsonl` in the working directory, named in full.
pub fn default_spec() -> (String, &'static str) {
    if std::env::var("KAFKA_BOOTSTRAP_SERVERS").is_ok_and(|v| !v.trim().is_empty()) {
        let why = " (KAFKA_BOOTSTRAP_SERVERS is set and no --output)";
        return ("kafka".into(), why);
    }
    let file = std::path::Path::new("metrics.jsonl");
    let path = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let why = " (the default: no --output, KAFKA_BOOTSTRAP_SERVERS unset)";
    (format!("jsonl:{}", path.display()), why)
}

/// The collector's Kafka output. See the module docs.
pub struct KafkaOutput {
    producer: FutureProducer<LogContext>,
    topic: String,
    describe: String,
}

impl fmt::Debug for KafkaOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaOutput")
            .field("kafka", &self.describe)
            .finish()
    }
}

impl KafkaOutput {
    /// An output producing to `config.topic` with `config`'s producer settings. The broker is
    /// not contacted yet (see [`Output::check_ready`]).
    pub fn new(config: &KafkaConfig) -> Result<KafkaOutput, KafkaError> {
        let ctx = LogContext {
            health: Arc::new(BrokerHealth::default()),
        };
        let producer = FutureProducer::from_config_and_context(&config.producer_config(), ctx)?;
        Ok(KafkaOutput {
            producer,
            topic: config.topic.clone(),
            describe: config.describe(),
        })
    }

    /// Opens the output an `--output kafka[:TOPIC]` spec names: the broker and credentials from
    /// the environment (`KAFKA_BOOTSTRAP_SERVERS`, `KAFKA_SASL_*`), the topic from the spec, else
    /// `KAFKA_TOPIC`, else `scope-events`.
    pub fn from_spec(spec: &str) -> Result<KafkaOutput, String> {
        let topic = match spec.split_once(':') {
            Some(("kafka", t)) if !t.is_empty() => Some(t.to_owned()),
            None if spec == "kafka" => None,
            _ => {
                return Err(format!(
                    "not a Kafka output spec: {spec:?}; use kafka or kafka:TOPIC"
                ))
            }
        };
        let mut config = KafkaConfig::from_env().map_err(|e| format!("--output kafka: {e}"))?;
        if let Some(t) = topic {
            config.topic = t;
            config
                .validate()
                .map_err(|e| format!("--output {spec}: {e}"))?;
        }
        config.message_timeout = Duration::from_secs(10);
        KafkaOutput::new(&config)
            .map_err(|e| format!("--output kafka: cannot create the producer: {e}"))
    }

    /// The topic it produces to.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl Output for KafkaOutput {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn append(&self, events: Vec<Bytes>) -> BoxFuture<'_, Result<(), OutputError>> {
        Box::pin(async move {
            let fail = |reason: String| OutputError {
                output: "kafka",
                reason,
            };
            let mut pending = Vec::with_capacity(events.len());
            for event in &events {
                let (id, value) = envelope_from_api_event(event).map_err(fail)?;
                loop {
                    let record = FutureRecord::to(&self.topic).key(&id).payload(&value);
                    match self.producer.send_result(record) {
                        Ok(delivery) => {
                            pending.push(delivery);
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err((e, _)) => return Err(fail(format!("cannot produce event {id}: {e}"))),
                    }
                }
            }
            let n = pending.len();
            let mut failed = 0usize;
            let mut first = None;
            for result in futures::future::join_all(pending).await {
                let err = match result {
                    Ok(Ok(_)) => continue,
                    Ok(Err((e, _))) => e.to_string(),
                    Err(_) => "the producer went away".to_owned(),
                };
                failed += 1;
                first.get_or_insert(err);
            }
            match first {
                None => Ok(()),
                Some(e) => Err(fail(format!(
                    "{failed} of {n} events not acknowledged by Kafka (first error: {e})"
                ))),
            }
        })
    }

    fn check_ready(&self) -> BoxFuture<'_, Result<(), OutputError>> {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        Box::pin(async move {
            let checked = tokio::task::spawn_blocking(move || {
                let md = producer
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(5))
                    .map_err(|e| format!("broker unreachable: {e}"))?;
                match md.topics().iter().find(|t| t.name() == topic) {
                    Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
                    Some(t) => Err(format!(
                        "topic {topic} is not usable: {:?}",
                        t.error().map(RDKafkaErrorCode::from)
                    )),
                    None => Err(format!("topic {topic} does not exist")),
                }
            })
            .await
            .unwrap_or_else(|e| Err(format!("readiness check failed: {e}")));
            checked.map_err(|reason| OutputError {
                output: "kafka",
                reason,
            })
        })
    }
}

/// Turns one API event (`{"type","data","id","timestamp",...}`) back into its envelope
/// `{"id","type":"stream_trace","timestamp","data",...other members in order}` by splicing raw
/// JSON slices. Returns the id (unescaped: the Kafka key) and the envelope bytes.
pub fn envelope_from_api_event(event: &[u8]) -> Result<(String, Vec<u8>), String> {
    let text = std::str::from_utf8(event).map_err(|e| format!("event is not UTF-8: {e}"))?;
    let Members(members) =
        serde_json::from_str(text).map_err(|e| format!("event is not a JSON object: {e}"))?;
    let find = |key: &str| members.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
    let id_raw = find("id")
        .filter(|v| first_byte(v) == b'"')
        .ok_or("event has no string `id`")?;
    let id: String =
        serde_json::from_str(id_raw.get()).map_err(|e| format!("event `id` is invalid: {e}"))?;
    let data = find("data")
        .filter(|v| first_byte(v) == b'{')
        .ok_or("event has no object `data`")?;
    let mut out = Vec::with_capacity(event.len() + 32);
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(id_raw.get().as_bytes());
    out.extend_from_slice(b",\"type\":\"stream_trace\"");
    if let Some(ts) = find("timestamp") {
        out.extend_from_slice(b",\"timestamp\":");
        out.extend_from_slice(ts.get().as_bytes());
    }
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data.get().as_bytes());
    let mut seen: Vec<&str> = Vec::new();
    for (k, v) in &members {
        if matches!(k.as_str(), "type" | "data" | "id" | "timestamp") || seen.contains(&k.as_str())
        {
            continue;
        }
        seen.push(k);
        out.push(b',');
        // Serializing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, k);
        out.push(b':');
        out.extend_from_slice(v.get().as_bytes());
    }
    out.push(b'}');
    Ok((id, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_event_becomes_the_canonical_envelope_byte_for_byte() {
        let envelope = r#"{"id":"3f1c0c1e-8d4a-4c1e-9c7e-1a2b3c4d5e6f","type":"stream_trace","timestamp":"1700000000000","data":{"type":"stream_heartbeat","client_source":"scope","timestamp":"1700000000000","fps":29.970,"nested":{"a":[1, 2]}},"producer_note":"kept"}"#;
        let api = r#"{"type":"stream_heartbeat","data":{"type":"stream_heartbeat","client_source":"scope","timestamp":"1700000000000","fps":29.970,"nested":{"a":[1, 2]}},"id":"3f1c0c1e-8d4a-4c1e-9c7e-1a2b3c4d5e6f","timestamp":"1700000000000","producer_note":"kept"}"#;
        let (id, value) = envelope_from_api_event(api.as_bytes()).unwrap();
        assert_eq!(id, "3f1c0c1e-8d4a-4c1e-9c7e-1a2b3c4d5e6f");
        assert_eq!(std::str::from_utf8(&value).unwrap(), envelope);
    }

    #[test]
    fn escaped_ids_are_unescaped_for_the_key_and_kept_raw_in_the_value() {
        let (id, value) =
            envelope_from_api_event(br#"{"type":"x","data":{},"id":"a\u0062c"}"#).unwrap();
        assert_eq!(id, "abc");
        assert_eq!(
            std::str::from_utf8(&value).unwrap(),
            r#"{"id":"a\u0062c","type":"stream_trace","data":{}}"#
        );
    }

    #[test]
    fn malformed_events_are_refused_with_a_reason() {
        for bad in [
            &b"nope"[..],
            br#"{"type":"x","data":{}}"#,
            br#"{"id":1,"type":"x","data":{}}"#,
            br#"{"id":"a","type":"x","data":[]}"#,
            &[0xff, 0xfe],
        ] {
            assert!(envelope_from_api_event(bad).is_err());
        }
    }
}
