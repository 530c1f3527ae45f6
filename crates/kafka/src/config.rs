//! [`KafkaConfig`]: the spec's environment variables, the producer settings shared by the sink and
//! the collector's output, and the disk buffer's location.

use rdkafka::ClientConfig;
use spool::SpoolOptions;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The topic used when `KAFKA_TOPIC` is unset (the seed's).
pub const DEFAULT_TOPIC: &str = "scope-events";

/// Why a configuration cannot be used. Each message names the variable or setting to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `KAFKA_BOOTSTRAP_SERVERS` is unset or empty.
    #[error(
        "KAFKA_BOOTSTRAP_SERVERS is not set; set it to the brokers, e.g. host1:9092,host2:9092"
    )]
    NoBootstrap,
    /// Only one of the two SASL variables is set.
    #[error("only one of KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD is set; set both (SASL_SSL/PLAIN) or neither")]
    HalfSasl,
    /// An environment variable holds something unusable.
    #[error("{name}={value:?} is not valid: {why}")]
    BadVar {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        why: &'static str,
    },
    /// A setting is out of range.
    #[error("invalid Kafka setting: {0}")]
    Invalid(String),
}

/// SASL/PLAIN credentials (Confluent Cloud: the API key and secret). `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SaslPlain {
    /// `KAFKA_SASL_USERNAME`.
    pub username: String,
    /// `KAFKA_SASL_PASSWORD`; never logged.
    pub password: String,
}

impl fmt::Debug for SaslPlain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaslPlain")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Everything the Kafka sink and the collector's Kafka output need. Build it with
/// [`KafkaConfig::from_env`] or [`KafkaConfig::new`] and set fields directly.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `KAFKA_BOOTSTRAP_SERVERS`: `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    /// `KAFKA_TOPIC` (default [`DEFAULT_TOPIC`]).
    pub topic: String,
    /// `KAFKA_SASL_USERNAME` + `KAFKA_SASL_PASSWORD`: SASL_SSL with mechanism PLAIN when set;
    /// plaintext otherwise.
    pub sasl: Option<SaslPlain>,
    /// `SCOPE_KAFKA_BUFFER_PATH`: the sink's disk buffer directory (unset: [`default_buffer_path`];
    /// empty: a bounded in-memory buffer only, lost on a crash).
    pub buffer_path: Option<PathBuf>,
    /// Options of the disk buffer (size cap 128 MiB by default, group commit every 10 ms).
    pub spool: SpoolOptions,
    /// `SCOPE_KAFKA_MAX_BUFFER` (default 100,000): events held in memory when the disk buffer is
    /// off or unusable, before the oldest are dropped (the disk buffer is capped by
    /// `spool.max_bytes` instead).
    pub max_memory_buffer: usize,
    /// Events that may wait between `emit` and the buffer (default 65,536); when full, `emit`
    /// drops and counts.
    pub handoff_capacity: usize,
    /// Most events the sender hands to the producer at once (default 10,000). Also caps
    /// librdkafka's queue: `queue.buffering.max.messages` is set to this.
    pub batch_max_events: usize,
    /// Most payload bytes per batch (default 16 MiB); librdkafka's `queue.buffering.max.kbytes`
    /// is set to twice this (for its per-message overhead).
    pub batch_max_bytes: usize,
    /// `linger.ms` (default 5 ms): how long librdkafka waits to fill a request.
    pub linger: Duration,
    /// `message.timeout.ms` (`SCOPE_KAFKA_MESSAGE_TIMEOUT_MS`, default 30 s): a message not
    /// acknowledged by then fails its delivery report; the sink then re-produces it after a
    /// backoff, on a fresh producer (nothing is lost). It bounds how long a broker that lost its
    /// producer state (`UNKNOWN_PRODUCER_ID` forever) can stall delivery.
    pub message_timeout: Duration,
    /// `reconnect.backoff.max.ms` (default 2 s): how soon a broker that came back is noticed.
    pub reconnect_backoff_max: Duration,
    /// First backoff before re-producing failed deliveries (default 500 ms); doubles per
    /// failed round.
    pub backoff_base: Duration,
    /// Longest backoff (default 30 s).
    pub backoff_max: Duration,
    /// How long after a disk failure the disk is tried again (default 5 s).
    pub disk_retry: Duration,
    /// Least time between two `telemetry_dropped` loss reports (default 1 s).
    pub report_interval: Duration,
    /// How long `Sink::flush` (and the client's shutdown) waits for outstanding deliveries
    /// (default 10 s).
    pub flush_timeout: Duration,
    /// `client.id` (default `trickle-relay`).
    pub client_id: String,
    /// Extra librdkafka properties, applied last (tests and operators; e.g. `compression.type`).
    pub extra: Vec<(String, String)>,
}

impl KafkaConfig {
    /// A configuration for `bootstrap_servers`, topic [`DEFAULT_TOPIC`], no SASL, no disk buffer
    /// (set `buffer_path`), every other setting at its default.
    pub fn new(bootstrap_servers: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: bootstrap_servers.into(),
            topic: DEFAULT_TOPIC.into(),
            sasl: None,
            buffer_path: None,
            spool: SpoolOptions::default(),
            max_memory_buffer: 100_000,
            handoff_capacity: 65_536,
            batch_max_events: 10_000,
            batch_max_bytes: 16 << 20,
            linger: Duration::from_millis(5),
            message_timeout: Duration::from_secs(30),
            reconnect_backoff_max: Duration::from_secs(2),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            disk_retry: Duration::from_secs(5),
            report_interval: Duration::from_secs(1),
            flush_timeout: Duration::from_secs(10),
            client_id: "trickle-relay".into(),
            extra: Vec::new(),
        }
    }

    /// From the process environment (see [`KafkaConfig::from_env_with`]).
    pub fn from_env() -> Result<KafkaConfig, ConfigError> {
        KafkaConfig::from_env_with(|k| std::env::var(k).ok())
    }

    /// From the variables `env` returns: `KAFKA_BOOTSTRAP_SERVERS` (required), `KAFKA_TOPIC`,
    /// `KAFKA_SASL_USERNAME` + `KAFKA_SASL_PASSWORD`, `SCOPE_KAFKA_BUFFER_PATH` (unset:
    /// [`default_buffer_path`]; empty: memory only), `SCOPE_KAFKA_MAX_BUFFER`,
    /// `SCOPE_KAFKA_FLUSH_TIMEOUT_MS` and `SCOPE_KAFKA_MESSAGE_TIMEOUT_MS`.
    pub fn from_env_with(env: impl Fn(&str) -> Option<String>) -> Result<KafkaConfig, ConfigError> {
        let get = |k: &str| env(k).map(|v| v.trim().to_owned());
        let servers = get("KAFKA_BOOTSTRAP_SERVERS")
            .filter(|v| !v.is_empty())
            .ok_or(ConfigError::NoBootstrap)?;
        let mut c = KafkaConfig::new(servers);
        if let Some(t) = get("KAFKA_TOPIC").filter(|v| !v.is_empty()) {
            c.topic = t;
        }
        // The password is taken as is (it may legitimately start or end with spaces).
        let user = get("KAFKA_SASL_USERNAME").filter(|v| !v.is_empty());
        let pass = env("KAFKA_SASL_PASSWORD").filter(|v| !v.is_empty());
        c.sasl = match (user, pass) {
            (Some(username), Some(password)) => Some(SaslPlain { username, password }),
            (None, None) => None,
            _ => return Err(ConfigError::HalfSasl),
        };
        c.buffer_path = match env("SCOPE_KAFKA_BUFFER_PATH") {
            None => Some(default_buffer_path()),
            Some(p) if p.trim().is_empty() => None,
            Some(p) => Some(PathBuf::from(p)),
        };
        if let Some(v) = get("SCOPE_KAFKA_MAX_BUFFER").filter(|v| !v.is_empty()) {
            c.max_memory_buffer = v.parse().map_err(|_| ConfigError::BadVar {
                name: "SCOPE_KAFKA_MAX_BUFFER",
                value: v.clone(),
                why: "expected a number of events",
            })?;
        }
        let ms = |name: &'static str| -> Result<Option<Duration>, ConfigError> {
            match get(name).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Some(Duration::from_millis(n))),
                    _ => Err(ConfigError::BadVar {
                        name,
                        value: v,
                        why: "expected a positive number of milliseconds",
                    }),
                },
            }
        };
        if let Some(d) = ms("SCOPE_KAFKA_FLUSH_TIMEOUT_MS")? {
            c.flush_timeout = d;
        }
        if let Some(d) = ms("SCOPE_KAFKA_MESSAGE_TIMEOUT_MS")? {
            c.message_timeout = d;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the ranges the sink relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.bootstrap_servers.trim().is_empty() {
            return Err(ConfigError::NoBootstrap);
        }
        if self.topic.is_empty()
            || self.topic.len() > 249
            || !self
                .topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(ConfigError::BadVar {
                name: "KAFKA_TOPIC",
                value: self.topic.clone(),
                why: "a topic name is 1 to 249 of [a-zA-Z0-9._-]",
            });
        }
        if self.max_memory_buffer == 0 {
            return bad("max_memory_buffer (SCOPE_KAFKA_MAX_BUFFER) must be at least 1");
        }
        if self.handoff_capacity == 0 {
            return bad("handoff_capacity must be at least 1");
        }
        if self.batch_max_events == 0 || self.batch_max_events > 10_000_000 {
            return bad("batch_max_events must be 1 to 10,000,000");
        }
        if self.batch_max_bytes == 0 {
            return bad("batch_max_bytes must be at least 1");
        }
        if self.message_timeout.is_zero() {
            return bad("message_timeout must be positive");
        }
        if self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return bad("backoff_base must be positive and at most backoff_max");
        }
        Ok(())
    }

    /// The librdkafka producer properties: bootstrap servers, idempotence, bounded queue,
    /// timeouts, and SASL_SSL/PLAIN when credentials are set. Shared by the sink and the
    /// collector's output. Never log the result: it holds the password.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", &self.client_id)
            // Idempotence: librdkafka's internal retries never duplicate or reorder (acks=all).
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // The Java client's partitioner (the seed's producer uses it): an id lands on the
            // same partition whichever producer wrote it. librdkafka's default is CRC-32.
            .set("partitioner", "murmur2_random")
            .set(
                "queue.buffering.max.messages",
                self.batch_max_events.max(1).to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                ((self.batch_max_bytes.saturating_mul(2) / 1024).clamp(1024, 2_097_151))
                    .to_string(),
            )
            .set("linger.ms", self.linger.as_millis().to_string())
            .set(
                "message.timeout.ms",
                self.message_timeout.as_millis().max(1).to_string(),
            )
            .set(
                "reconnect.backoff.max.ms",
                self.reconnect_backoff_max.as_millis().max(10).to_string(),
            )
            .set("reconnect.backoff.ms", "50");
        if let Some(s) = &self.sasl {
            c.set("security.protocol", "SASL_SSL")
                .set("sasl.mechanisms", "PLAIN")
                .set("sasl.username", &s.username)
                .set("sasl.password", &s.password);
        }
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    /// A one-line description for logs: servers, topic, security; never the password.
    pub fn describe(&self) -> String {
        format!(
            "bootstrap={} topic={} security={}",
            self.bootstrap_servers,
            self.topic,
            match &self.sasl {
                Some(s) => format!("SASL_SSL/PLAIN user={}", s.username),
                None => "PLAINTEXT".into(),
            }
        )
    }
}

/// The default disk buffer directory: `kafka-buffer` in [`egress::state_dir`]
/// (`$XDG_STATE_HOME/trickle-relay/kafka-buffer`, else `~/.local/state/...`), beside the HTTP
/// reporter's.
pub fn default_buffer_path() -> PathBuf {
    egress::state_dir().join("kafka-buffer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry::egress::env_from_pairs as env;

    #[test]
    fn bootstrap_is_required_and_topic_defaults() {
        assert_eq!(
            KafkaConfig::from_env_with(env(&[])).unwrap_err(),
            ConfigError::NoBootstrap
        );
        let c = KafkaConfig::from_env_with(env(&[("KAFKA_BOOTSTRAP_SERVERS", "b:9092")])).unwrap();
        assert_eq!(c.topic, "scope-events");
        assert!(c.sasl.is_none());
        assert_eq!(c.buffer_path, Some(default_buffer_path()));
        let p = c.producer_config();
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("partitioner"), Some("murmur2_random"));
        assert_eq!(p.get("security.protocol"), None);
    }

    #[test]
    fn sasl_needs_both_and_never_shows_the_password() {
        let half = env(&[
            ("KAFKA_BOOTSTRAP_SERVERS", "b"),
            ("KAFKA_SASL_USERNAME", "u"),
        ]);
        assert_eq!(
            KafkaConfig::from_env_with(half).unwrap_err(),
            ConfigError::HalfSasl
        );
        let c = KafkaConfig::from_env_with(env(&[
            ("KAFKA_BOOTSTRAP_SERVERS", "b"),
            ("KAFKA_SASL_USERNAME", "key"),
            ("KAFKA_SASL_PASSWORD", "s3cret"),
            ("KAFKA_TOPIC", "t-1"),
            ("SCOPE_KAFKA_BUFFER_PATH", ""),
        ]))
        .unwrap();
        assert_eq!(c.topic, "t-1");
        assert_eq!(c.buffer_path, None);
        let p = c.producer_config();
        assert_eq!(p.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(p.get("sasl.mechanisms"), Some("PLAIN"));
        assert_eq!(p.get("sasl.password"), Some("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!c.describe().contains("s3cret"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = KafkaConfig::from_env_with(env(&[
            ("KAFKA_BOOTSTRAP_SERVERS", "b"),
            ("KAFKA_TOPIC", "no spaces"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("KAFKA_TOPIC"), "{e}");
        let e = KafkaConfig::from_env_with(env(&[
            ("KAFKA_BOOTSTRAP_SERVERS", "b"),
            ("SCOPE_KAFKA_MAX_BUFFER", "lots"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("SCOPE_KAFKA_MAX_BUFFER"), "{e}");
    }
}
