//! The Kafka sink's service: produces the pending records of a batch (key = id, value = the
//! envelope's bytes) on an idempotent producer and waits for every delivery report; each record is
//! resolved on its own (delivered, or refused for good and dropped). Records whose delivery failed
//! stay pending: the driver sends them again after its backoff, on a fresh producer.

use super::encoding;
use super::KafkaShared;
use crate::producer::{self, Report, SinkContext};
use egress::{Batch, Cx, Outcome, Reason, Service};
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Refused for good by librdkafka or the broker (message too large, invalid), or a record in the
/// buffer that is not one of ours: dropped and reported.
pub(crate) const REJECTED: Reason = Reason {
    name: "rejected",
    reported: true,
};

/// Where one record of the batch stands in this send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Resolved before this send: not ours to touch.
    Done,
    /// To be produced.
    Todo,
    /// Handed to librdkafka; its delivery report is awaited.
    InFlight,
    /// Its delivery failed: stays pending, produced again on the next send.
    Failed,
    /// The broker acknowledged it.
    Delivered,
    /// Refused for good.
    Rejected,
}

type SinkProducer = ThreadedProducer<SinkContext>;

pub(crate) struct KafkaService {
    kafka: Arc<KafkaShared>,
    producer: SinkProducer,
    reports: mpsc::Receiver<Report>,
}

impl KafkaService {
    pub fn new(kafka: Arc<KafkaShared>) -> Result<KafkaService, KafkaError> {
        let (producer, reports) = make_producer(&kafka)?;
        Ok(KafkaService {
            kafka,
            producer,
            reports,
        })
    }

    fn produce_todo(&mut self, batch: &Batch, slots: &mut [Slot], cx: &Cx<'_>) {
        let k = Arc::clone(&self.kafka);
        let topic = k.config.topic.as_str();
        for idx in 0..slots.len() {
            if slots[idx] != Slot::Todo {
                continue;
            }
            let Some((key, value)) = encoding::decode(batch.record(idx)) else {
                // Not a record this sink wrote (a foreign file in the buffer directory).
                slots[idx] = Slot::Rejected;
                tracing::error!(target: "kafka", "Kafka sink: unreadable record in the disk buffer; dropped");
                continue;
            };
            loop {
                let record = BaseRecord::with_opaque_to(topic, idx)
                    .key(key)
                    .payload(value);
                match self.producer.send(record) {
                    Ok(()) => {
                        slots[idx] = Slot::InFlight;
                        k.counters.produced.fetch_add(1, Relaxed);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        // librdkafka's queue is full: take delivery reports until it has room.
                        self.take_reports(slots, cx, Duration::from_millis(50));
                        if cx.stopping() {
                            return;
                        }
                    }
                    Err((e, _)) if producer::permanent(&e) => {
                        slots[idx] = Slot::Rejected;
                        tracing::error!(target: "kafka", error = %e, bytes = value.len(),
                            "Kafka sink: event refused by the producer for good; dropped (counted as dropped_rejected)");
                        break;
                    }
                    Err((e, _)) => {
                        slots[idx] = Slot::Failed;
                        k.counters.delivery_failures.fetch_add(1, Relaxed);
                        cx.write_errors(1);
                        tracing::debug!(target: "kafka", error = %e, "Kafka sink: produce failed; will retry");
                        break;
                    }
                }
            }
        }
    }

    /// Takes delivery reports until nothing of the batch is in flight (or the driver stops, or
    /// the producer has a fatal error).
    fn await_in_flight(&mut self, slots: &mut [Slot], cx: &Cx<'_>) {
        while slots.contains(&Slot::InFlight) {
            if cx.stopping() || self.kafka.health.fatal.load(Relaxed) {
                return;
            }
            self.take_reports(slots, cx, Duration::from_millis(100));
        }
    }

    fn take_reports(&mut self, slots: &mut [Slot], cx: &Cx<'_>, wait: Duration) {
        let Ok(first) = self.reports.recv_timeout(wait) else {
            return;
        };
        let mut next = Some(first);
        while let Some(r) = next {
            self.apply(r, slots, cx);
            next = self.reports.try_recv().ok();
        }
    }

    fn apply(&self, r: Report, slots: &mut [Slot], cx: &Cx<'_>) {
        let k = &self.kafka;
        let Some(slot) = slots.get_mut(r.idx).filter(|s| **s == Slot::InFlight) else {
            return;
        };
        match r.result {
            Ok(_) => {
                *slot = Slot::Delivered;
                if k.health.recovered() {
                    tracing::info!(target: "kafka", "Kafka sink: deliveries succeed again");
                }
            }
            Err(e) if producer::permanent(&e) => {
                *slot = Slot::Rejected;
                tracing::error!(target: "kafka", error = %e,
                    "Kafka sink: event refused by the broker for good; dropped (counted as dropped_rejected)");
            }
            Err(e) => {
                *slot = Slot::Failed;
                k.counters.delivery_failures.fetch_add(1, Relaxed);
                cx.write_errors(1);
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut)
                    && k.counters.timed_out.fetch_add(1, Relaxed) == 0
                {
                    tracing::warn!(target: "kafka", error = %e, timeout = ?k.config.message_timeout,
                        "Kafka sink: deliveries timed out (outage longer than SCOPE_KAFKA_MESSAGE_TIMEOUT_MS); producing them again: \
                         records the broker wrote before the cut may appear twice (same key = envelope id; counted as timed_out; warned once)");
                }
                tracing::debug!(target: "kafka", error = %e, "Kafka sink: delivery failed; will retry");
            }
        }
    }

    /// Replaces the producer before a retry: a fresh idempotent producer gets a new producer id
    /// from the broker, which clears whatever state the old one was stuck in (a broker that lost
    /// its producer state answers `UNKNOWN_PRODUCER_ID` to the old id forever; a fatal error
    /// disables a producer for good). Records still in flight (only after a fatal error or a
    /// stop) are purged with it and produced again.
    fn replace_producer(&mut self) {
        let k = Arc::clone(&self.kafka);
        let fatal = k.health.fatal.load(Relaxed) || self.producer.client().fatal_error().is_some();
        match make_producer(&k) {
            Ok((producer, reports)) => {
                self.producer = producer;
                self.reports = reports;
                k.health.fatal.store(false, Relaxed);
                k.counters.producer_restarts.fetch_add(1, Relaxed);
                if fatal {
                    tracing::warn!(target: "kafka", "Kafka sink: producer replaced after a fatal error");
                }
            }
            Err(e) => {
                tracing::error!(target: "kafka", error = %e, "Kafka sink: cannot replace the producer; retrying");
            }
        }
    }
}

impl Service for KafkaService {
    async fn send(&mut self, batch: &mut Batch, cx: &Cx<'_>) -> Outcome {
        if cx.is_retry() {
            self.replace_producer();
        }
        let mut slots = vec![Slot::Done; batch.len()];
        for idx in batch.pending() {
            slots[idx] = Slot::Todo;
        }
        self.produce_todo(batch, &mut slots, cx);
        self.await_in_flight(&mut slots, cx);
        for (idx, slot) in slots.iter().enumerate() {
            match slot {
                Slot::Delivered => batch.deliver(idx),
                Slot::Rejected => batch.drop_record(idx, &REJECTED),
                _ => {}
            }
        }
        let left = batch.pending_count();
        if left == 0 {
            return Outcome::Delivered;
        }
        tracing::debug!(target: "kafka", failed = left, "Kafka sink: retrying failed deliveries");
        Outcome::Retry(None)
    }
}

fn make_producer(
    kafka: &KafkaShared,
) -> Result<(SinkProducer, mpsc::Receiver<Report>), KafkaError> {
    let (tx, rx) = mpsc::channel();
    let ctx = SinkContext {
        health: Arc::clone(&kafka.health),
        reports: tx,
    };
    let producer = ThreadedProducer::from_config_and_context(&kafka.config.producer_config(), ctx)?;
    Ok((producer, rx))
}
