//! The librdkafka client context shared by the sink and the collector's output: librdkafka's log
//! lines and error events into `tracing` (an outage is logged once at warn, then quietly until a
//! delivery succeeds again), and the sink's delivery reports into a channel.

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::ProducerContext;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;

/// Broker-side trouble as librdkafka reports it, shared with the owner for counters and to
/// quiet repeated logging during an outage.
#[derive(Debug, Default)]
pub struct BrokerHealth {
    /// Error events from librdkafka (connection refused, all brokers down, ...).
    pub errors: AtomicU64,
    /// Set after the first error was logged at warn; cleared by [`BrokerHealth::recovered`].
    quiet: AtomicBool,
    /// A fatal error was raised: the producer must be replaced.
    pub fatal: AtomicBool,
}

impl BrokerHealth {
    /// A delivery succeeded: the next error is worth a warning again. Returns whether an outage
    /// had been reported (so the caller can log the recovery).
    pub fn recovered(&self) -> bool {
        self.quiet.swap(false, Relaxed)
    }

    /// Whether an outage is being reported now.
    pub fn in_outage(&self) -> bool {
        self.quiet.load(Relaxed)
    }

    fn error(&self, error: &KafkaError, reason: &str) {
        self.errors.fetch_add(1, Relaxed);
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            self.fatal.store(true, Relaxed);
            tracing::error!(target: "kafka", %error, reason, "Kafka producer fatal error; it will be replaced");
            return;
        }
        if self.quiet.swap(true, Relaxed) {
            tracing::debug!(target: "kafka", %error, reason, "Kafka broker error");
        } else {
            tracing::warn!(target: "kafka", %error, reason,
                "Kafka broker unreachable or failing; events stay buffered and are retried (further errors logged at debug until it recovers)");
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning
                if !self.in_outage() =>
            {
                tracing::warn!(target: "librdkafka", "{fac} {message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "{fac} {message}")
            }
            _ => tracing::debug!(target: "librdkafka", "{fac} {message}"),
        }
    }
}

/// The outcome of one produced record, by its index in the sender's current batch.
#[derive(Debug)]
pub(crate) struct Report {
    /// Index in the batch (the delivery opaque).
    pub idx: usize,
    /// `Ok(partition)` or the error code.
    pub result: Result<i32, KafkaError>,
}

/// Context of the sink's producer: delivery reports go to the sender thread.
pub(crate) struct SinkContext {
    pub health: Arc<BrokerHealth>,
    pub reports: mpsc::Sender<Report>,
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.health.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.health.error(&error, reason);
    }
}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, delivery_result: &DeliveryResult<'_>, idx: usize) {
        use rdkafka::Message as _;
        let result = match delivery_result {
            Ok(m) => Ok(m.partition()),
            Err((e, _)) => Err(e.clone()),
        };
        // The receiver is gone only when the producer is being replaced: nothing to tell.
        let _ = self.reports.send(Report { idx, result });
    }
}

/// Context of the collector output's `FutureProducer`: logging only.
#[derive(Clone)]
pub(crate) struct LogContext {
    pub health: Arc<BrokerHealth>,
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.health.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.health.error(&error, reason);
    }
}

/// Whether a failed produce or delivery can never succeed for this record (it is dropped and
/// counted rather than retried forever): too large, or refused as invalid by the broker.
pub(crate) fn permanent(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::BadMessage
        )
    )
}
