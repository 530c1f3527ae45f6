//! [`KafkaSink`]: the telemetry sink that produces every envelope to Kafka, over a crash-safe
//! disk buffer. See the crate docs for the path of an event and the delivery guarantees.
//!
//! It is one service of the buffered-egress driver ([`egress`]), which owns the handoff, the disk
//! buffer with its memory fallback, batching, retries and loss reports; here is only what is
//! about Kafka: `encoding` (the stored record: the id, then the envelope's bytes) and `service`
//! (produce a batch, one delivery report per record). The settings are [`KafkaConfig`], shared
//! with the collector's output. [`KafkaSink`] dereferences to its [`Driver`]: `emit`,
//! `flush_timeout` and the telemetry `Sink` methods are the driver's.

mod encoding;
mod service;

use crate::config::{ConfigError, KafkaConfig};
use crate::producer::BrokerHealth;
use egress::{Cap, Driver, DriverConfig, DriverStats, Reason};
use rdkafka::error::KafkaError;
use serde::Serialize;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// librdkafka refused the producer configuration (e.g. SASL_SSL without SSL support).
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[source] KafkaError),
    /// A worker thread could not be started.
    #[error("cannot start the Kafka sink: {0}")]
    Start(String),
}

/// Every reason the sink drops an event for, in the order loss reports list them.
const DROPS: &[Reason] = &[Reason::OVERSIZE, service::REJECTED];

/// Counters of a [`KafkaSink`]: the driver's (events emitted, accepted, buffered, `delivered`
/// (records the broker acknowledged), `retries` (re-sends of failed records after a backoff),
/// drops..., reached through `Deref`) and the producer's. Invariant: `emitted + recovered +
/// reports == delivered + dropped() + buffered + handoff_pending` (exact once idle; a loss report
/// is an event the sink stores itself).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KafkaStats {
    /// The driver's counters.
    #[serde(flatten)]
    pub driver: DriverStats,
    /// Records handed to librdkafka (a retried record counts again).
    pub produced: u64,
    /// Delivery reports with an error (the record is retried, unless it is `dropped_rejected`).
    pub delivery_failures: u64,
    /// Of `delivery_failures`, those that timed out (`message.timeout.ms`, during an outage
    /// longer than it): the broker may have written the record before the cut, and it is
    /// produced again, so it may be in the topic twice (consumers dedup by key = envelope id).
    pub timed_out: u64,
    /// Producers replaced (before each retry, and after a fatal error).
    pub producer_restarts: u64,
    /// Error events from librdkafka (broker unreachable and the like).
    pub broker_errors: u64,
    /// Dropped: too large for the disk buffer, or an id longer than 65,535 bytes.
    pub dropped_oversize: u64,
    /// Dropped: refused for good by librdkafka or the broker (message too large, invalid).
    pub dropped_rejected: u64,
}

egress::deref_driver!(stats KafkaStats);

/// The producer's counters (the driver keeps the rest).
#[derive(Debug, Default)]
struct KafkaCounters {
    produced: AtomicU64,
    delivery_failures: AtomicU64,
    timed_out: AtomicU64,
    producer_restarts: AtomicU64,
}

/// What the service shares with the sink's handle.
#[derive(Debug)]
struct KafkaShared {
    config: KafkaConfig,
    health: Arc<BrokerHealth>,
    counters: KafkaCounters,
}

/// The Kafka telemetry sink: key = envelope id, value = the envelope's exact JSON bytes, on an
/// idempotent producer, over a disk buffer. See the crate docs.
#[derive(Debug)]
pub struct KafkaSink {
    driver: Arc<Driver>,
    kafka: Arc<KafkaShared>,
}

egress::deref_driver!(handle KafkaSink);

impl KafkaSink {
    /// Creates the producer and starts the driver with it; the driver opens (and recovers) the
    /// disk buffer first. A broker that is down is not an error (events wait in the buffer); a
    /// configuration librdkafka refuses is. A disk buffer that cannot be opened is logged and
    /// replaced by memory, never a reason to fail.
    pub fn start(config: KafkaConfig) -> Result<KafkaSink, KafkaSinkError> {
        config.validate()?;
        let driver_config = DriverConfig {
            sink: "kafka",
            display: "Kafka sink",
            buffer_setting: "SCOPE_KAFKA_BUFFER_PATH",
            buffer_path: config.buffer_path.clone(),
            spool: config.spool.clone(),
            cap: Cap::Memory(config.max_memory_buffer),
            handoff_capacity: config.handoff_capacity,
            disk_retry: config.disk_retry,
            report_interval: config.report_interval,
            // Produced as soon as buffered: librdkafka batches by `linger.ms` itself.
            flush_interval: Duration::ZERO,
            flush_timeout: config.flush_timeout,
            max_batch: config.batch_max_events,
            max_batch_bytes: config.batch_max_bytes,
            backoff_base: config.backoff_base,
            backoff_max: config.backoff_max,
            drops: DROPS,
        };
        let kafka = Arc::new(KafkaShared {
            config,
            health: Arc::new(BrokerHealth::default()),
            counters: KafkaCounters::default(),
        });
        let service =
            service::KafkaService::new(Arc::clone(&kafka)).map_err(KafkaSinkError::Producer)?;
        let driver = Driver::start(driver_config, encoding::KafkaEncoder::default(), service)
            .map_err(|e| KafkaSinkError::Start(e.to_string()))?;
        let c = &kafka.config;
        tracing::info!(target: "kafka", kafka = %c.describe(), buffer = ?c.buffer_path, "Kafka sink started");
        Ok(KafkaSink {
            driver: Arc::new(driver),
            kafka,
        })
    }

    /// All counters now.
    pub fn kafka_stats(&self) -> KafkaStats {
        self.stats_of(self.driver.driver_stats())
    }

    fn stats_of(&self, driver: DriverStats) -> KafkaStats {
        let c = &self.kafka.counters;
        KafkaStats {
            produced: c.produced.load(Relaxed),
            delivery_failures: c.delivery_failures.load(Relaxed),
            timed_out: c.timed_out.load(Relaxed),
            producer_restarts: c.producer_restarts.load(Relaxed),
            broker_errors: self.kafka.health.errors.load(Relaxed),
            dropped_oversize: driver.dropped_by(Reason::OVERSIZE.name),
            dropped_rejected: driver.dropped_by(service::REJECTED.name),
            driver,
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &KafkaConfig {
        &self.kafka.config
    }

    /// Flushes for up to `timeout` (waiting for outstanding deliveries), then stops; what is
    /// left stays on disk for the next start (see [`Driver::shutdown`]). Idempotent; returns the
    /// final counters.
    pub fn shutdown(&self, timeout: Duration) -> KafkaStats {
        self.stats_of(self.driver.shutdown(timeout))
    }
}
