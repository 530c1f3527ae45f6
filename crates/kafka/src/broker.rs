//! A disposable Kafka-compatible broker for tests and benchmarks, and a reader of whole topics.
//!
//! [`TestBroker`] runs `tansu broker` (a Kafka-compatible broker in Rust) on a free loopback port
//! with in-memory storage, and kills it when dropped. `tansu` comes from `$TANSU_BIN`, else
//! `PATH`, else `~/.cargo/bin`; `scripts/test-broker.sh` installs it. In-memory storage means a
//! killed broker forgets its topics: [`TestBroker::restart`] brings back an empty broker on the
//! same port.
//!
//! [`read_topic`] reads a topic from the beginning with a real consumer (librdkafka) until the
//! expected count arrived and then a quiet period passed, so duplicates and extras are seen too.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to do when `tansu` is missing.
pub const INSTALL_HINT: &str = "the test Kafka broker `tansu` is not installed: run scripts/test-broker.sh \
(it runs `cargo install tansu --version '^0.6' --features dynostore --locked`), or point TANSU_BIN at a tansu binary";

/// The `tansu` binary: `$TANSU_BIN`, else the first `tansu` on `PATH`, else `~/.cargo/bin/tansu`.
/// The error names `scripts/test-broker.sh`.
pub fn tansu_bin() -> Result<PathBuf, String> {
    tansu_bin_with(|k| std::env::var_os(k))
}

/// [`tansu_bin`] over the variables `env` returns (`TANSU_BIN`, `PATH`, `CARGO_HOME`, `HOME`).
pub fn tansu_bin_with(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf, String> {
    if let Some(p) = env("TANSU_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "TANSU_BIN={} is not a file; {INSTALL_HINT}",
                p.display()
            ))
        };
    }
    let on_path = env("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("tansu"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let cargo_bin = env("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin").join("tansu"));
    on_path
        .into_iter()
        .chain(cargo_bin)
        .find(|p| p.is_file())
        .ok_or_else(|| INSTALL_HINT.to_owned())
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A `tansu broker` child process on 127.0.0.1, killed on drop.
#[derive(Debug)]
pub struct TestBroker {
    bin: PathBuf,
    port: u16,
    /// The port clients are told to connect to, when not `port` (a proxy in front).
    advertised: Option<u16>,
    child: Option<Child>,
}

impl TestBroker {
    /// Starts a broker on a free port and waits until it answers metadata requests.
    pub fn start() -> Result<TestBroker, String> {
        TestBroker::start_on_a_free_port(None)
    }

    /// Starts a broker on `port` (e.g. one a client was already pointed at while no broker ran).
    pub fn start_on(port: u16) -> Result<TestBroker, String> {
        let mut b = TestBroker {
            bin: tansu_bin()?,
            port,
            advertised: None,
            child: None,
        };
        b.launch()?;
        Ok(b)
    }

    /// Starts a broker on a free port that tells clients to connect to `advertised_port` (on
    /// 127.0.0.1) instead: a proxy there in front of it sees every connection (fault tests).
    pub fn start_advertising(advertised_port: u16) -> Result<TestBroker, String> {
        TestBroker::start_on_a_free_port(Some(advertised_port))
    }

    /// Starts a broker on a free port (advertising `advertised` when given). A port can be
    /// taken between picking and binding: tries a few.
    fn start_on_a_free_port(advertised: Option<u16>) -> Result<TestBroker, String> {
        let bin = tansu_bin()?;
        let mut last = String::new();
        for _ in 0..5 {
            let mut b = TestBroker {
                bin: bin.clone(),
                port: free_port(),
                advertised,
                child: None,
            };
            match b.launch() {
                Ok(()) => return Ok(b),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port it listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the process is running now.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the broker (SIGKILL) and waits for it: clients see connections reset and refused.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same port (empty: storage is in memory).
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                // The old socket may linger a moment.
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn launch(&mut self) -> Result<(), String> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised.unwrap_or(self.port));
        let verbose = std::env::var_os("TANSU_VERBOSE").is_some();
        let mut child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdin(Stdio::null())
            .stdout(if verbose {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(if verbose {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}; {INSTALL_HINT}", self.bin.display()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "tansu broker on port {} exited at start ({status}); run with TANSU_VERBOSE=1 to see why",
                    self.port
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("tansu broker did not listen on {addr} within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Creates `topic` with `partitions` partitions (replication 1). An existing topic is fine.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), String> {
        create_topic(&self.bootstrap(), topic, partitions)
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates `topic` on the brokers at `bootstrap` with `partitions` partitions (replication 1),
/// retrying for up to 20 s while the broker starts; an existing topic is fine.
pub fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| format!("admin client: {e}"))?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let outcome = futures::executor::block_on(admin.create_topics([&new], &opts));
        let err = match outcome {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(_)) | None => return Ok(()),
                Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => return Ok(()),
                Some(Err((_, code))) => format!("create topic {topic}: {code}"),
            },
            Err(e) => format!("create topic {topic}: {e}"),
        };
        if Instant::now() > deadline {
            return Err(err);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One message read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// The key bytes (`None`: no key).
    pub key: Option<Vec<u8>>,
    /// The value bytes (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
}

fn consumer(bootstrap: &str) -> Result<BaseConsumer, String> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| format!("consumer: {e}"))
}

/// The number of partitions of `topic`.
pub fn partition_count(bootstrap: &str, topic: &str) -> Result<i32, String> {
    let c = consumer(bootstrap)?;
    partitions_of(&c, topic).map(|p| p.len() as i32)
}

fn partitions_of(c: &BaseConsumer, topic: &str) -> Result<Vec<i32>, String> {
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| format!("topic {topic} not in metadata"))?;
    if let Some(e) = t.error() {
        return Err(format!("topic {topic}: {:?}", RDKafkaErrorCode::from(e)));
    }
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

/// Reads `topic` from the beginning with a real consumer until at least `expect` messages
/// arrived, then keeps reading until nothing new came for `settle`, so duplicates and extras
/// are seen too. Fails after `timeout` with the count it got.
///
/// Watermarks are not used to know where a partition ends: tansu 0.6 answers ListOffsets(latest)
/// with the last *batch's* base offset + 1, not the partition's end.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    expect: usize,
    settle: Duration,
    timeout: Duration,
) -> Result<Vec<Consumed>, String> {
    let c = consumer(bootstrap)?;
    let deadline = Instant::now() + timeout;
    let mut tpl = TopicPartitionList::new();
    for p in partitions_of(&c, topic)? {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| format!("assign {topic}/{p}: {e}"))?;
    }
    c.assign(&tpl).map_err(|e| format!("assign: {e}"))?;
    let mut out = Vec::new();
    let mut last_new = Instant::now();
    loop {
        let now = Instant::now();
        if out.len() >= expect && now.duration_since(last_new) >= settle {
            return Ok(out);
        }
        if now > deadline {
            if out.len() >= expect {
                return Ok(out);
            }
            return Err(format!(
                "read {} messages of {topic} in {timeout:?}, expected {expect}",
                out.len()
            ));
        }
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push(Consumed {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                });
                last_new = Instant::now();
            }
            Some(Err(e)) => {
                tracing::debug!(target: "kafka", error = %e, "read_topic: consumer error");
            }
            None => {}
        }
    }
}

/// The partition this project's producers (sink and collector output, `partitioner =
/// murmur2_random`) pick for a non-empty `key`: the Java client's, `murmur2(key) & 0x7fffffff`
/// modulo the partition count, so the seed's producer and ours place an id identically.
pub fn default_partition(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) as u32 & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// MurmurHash2 as the Java Kafka client computes it (`Utils.murmur2`: seed `0x9747b28c`,
/// little-endian 4-byte words, signed result).
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        let mut k = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        h = h.wrapping_mul(M) ^ k.wrapping_mul(M);
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        for (i, b) in tail.iter().enumerate() {
            h ^= (*b as u32) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}
