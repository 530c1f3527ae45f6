//! Kafka egress for trickle-relay: the telemetry [`KafkaSink`], the collector's
//! [`KafkaOutput`], their shared producer configuration ([`KafkaConfig`]), and a disposable
//! test broker ([`broker`]).
//!
//! # Records
//!
//! Topic `KAFKA_TOPIC` (default `scope-events`); key = the envelope id (its UTF-8 bytes);
//! value = the envelope's exact JSON bytes, as the hop before built them (the client's
//! `data.relayed_via` / `data.relay_received_timestamp` annotations included). No headers. The
//! partition is the Java client's: librdkafka's `partitioner=murmur2_random`, murmur2 of the key
//! (`& 0x7fffffff`) modulo the partition count, which is what the seed's producer (aiokafka, whose
//! default partitioner is the Java one) picks; so an id lands on the same partition whichever of
//! them wrote it ([`broker::default_partition`] computes it). librdkafka's own default
//! (`consistent_random`, CRC-32, also confluent-kafka's) would place ids differently.
//!
//! # The path of one event through the sink
//!
//! The sink is a service of the buffered-egress driver ([`egress`]): the handoff, the writer
//! thread, the disk buffer and its memory fallback, the sender loop, backoff and loss reports
//! are the driver's, shared with the HTTP reporter; [`sink`]'s `encoding` frames a record and
//! its `service` produces a batch and classifies each delivery report.
//!
//! ```text
//! emit(event)                        any thread; never blocks, never fails
//!   -> handoff queue (bounded, lock-free; full: dropped, counted as dropped_handoff)
//!   -> writer thread: [id len][id][envelope JSON]
//!        -> Spool::append (disk; the event is now ACCEPTED)       or, disk unusable,
//!        -> memory queue  (bounded, retried to disk every `disk_retry`)
//!   -> sender thread: read <= batch_max_events from the oldest, produce each (idempotent
//!        producer, key = id), wait for EVERY delivery report of the batch; failed ones are
//!        produced again after a backoff (500 ms doubling to 30 s, +-20% jitter), on a fresh
//!        producer, until the broker takes them; then Spool::ack the batch (removes it).
//! ```
//!
//! # Delivery guarantees
//!
//! * **Nothing accepted is lost** while the broker is down, however long: events wait in the
//!   disk buffer (capped by `spool.max_bytes`, 128 MiB by default: past that the oldest are
//!   dropped and counted, and reported as a `telemetry_dropped` event), and are produced when
//!   it returns. librdkafka holds at most one batch (`queue.buffering.max.messages` /
//!   `queue.buffering.max.kbytes` follow the batch limits), so memory stays bounded.
//! * **Within one process, each event is written once.** The producer is idempotent
//!   (`enable.idempotence=true`, acks=all): librdkafka's own retries never duplicate. A record
//!   is produced again only after its delivery report said it failed (e.g. `message.timeout.ms`
//!   passed during an outage); if the broker had in fact stored it, that is a duplicate, which
//!   is the one exception.
//! * **Across a crash it is at-least-once.** The buffer is acknowledged only after the whole
//!   batch is confirmed; a `kill -9` between a delivery and the ack produces those events again
//!   on the next start. Consumers that need exactly-once deduplicate by key (the event id).
//! * A crash loses only what was still in the handoff queue (microseconds of events), plus,
//!   on power loss, the disk buffer's group-commit window (10 ms by default).
//!
//! # Configuration (environment)
//!
//! `KAFKA_BOOTSTRAP_SERVERS` (required), `KAFKA_TOPIC` (default `scope-events`),
//! `KAFKA_SASL_USERNAME` + `KAFKA_SASL_PASSWORD` (both: SASL_SSL with mechanism PLAIN; the
//! password is never logged), `SCOPE_KAFKA_BUFFER_PATH` (the disk buffer directory; default
//! [`default_buffer_path`], `$XDG_STATE_HOME/trickle-relay/kafka-buffer`, falling back to
//! `~/.local/state/...` and then the temp dir; empty: memory only), `SCOPE_KAFKA_MAX_BUFFER`
//! (events kept in memory when the disk is off, default 100,000),
//! `SCOPE_KAFKA_FLUSH_TIMEOUT_MS` (how long a flush waits, default 10,000) and
//! `SCOPE_KAFKA_MESSAGE_TIMEOUT_MS` (librdkafka's `message.timeout.ms`, default 30,000: how long
//! before an unacknowledged record is produced again on a fresh producer). One process at a
//! time can use a buffer directory (it is locked); a second one falls back to memory and says so.
//!
//! # Build
//!
//! `rdkafka` builds librdkafka from its bundled sources with gcc and make (no cmake), linked
//! against the system zlib and OpenSSL (`libssl-dev`, for SASL_SSL).

pub mod broker;
pub mod config;
pub mod output;
mod producer;
pub mod sink;

pub use config::{default_buffer_path, ConfigError, KafkaConfig, SaslPlain, DEFAULT_TOPIC};
pub use egress::FlushOutcome;
pub use output::{envelope_from_api_event, KafkaOutput};
pub use producer::BrokerHealth;
pub use sink::{KafkaSink, KafkaSinkError, KafkaStats};
