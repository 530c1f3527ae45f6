//! Kafka egress end to end over real processes: `trickle-relay serve`, `runner`, `client` (and
//! `collector`), a real Kafka-compatible broker (`tansu`, one per test on a free loopback port,
//! killed after), and a real consumer (librdkafka) reading the topic back from the beginning.
//!
//! Needs `tansu` (on `PATH`, in `~/.cargo/bin`, or `$TANSU_BIN`): `scripts/test-broker.sh`
//! installs it, and `scripts/test.sh` runs that first. Without it these tests fail, saying so.

mod common;

use common::{free_addr, log_file, tail, unrelay_or_fail, wait_listening, wait_until, Proc};
use kafka::broker::{self, Consumed, TestBroker};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

const SESSION: &str = "sess-kafka";
const CONNECTION: &str = "conn-kafka";
const KEY: &str = "kafka-e2e-key";
const PARTITIONS: i32 = 4;

/// Spawns `trickle-relay` with `args`, a clean egress environment plus `env`, and stderr
/// into `stderr` (kept for the failure message).
fn spawn(args: &[&str], env: &[(&str, String)], stderr: &Path) -> Proc {
    let mut cmd = common::relay(args);
    cmd.env("RUST_LOG", "info,librdkafka=warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(log_file(stderr));
    Proc::start(&mut cmd)
}

/// Waits for `p` to exit on its own; fails the test with its stderr's tail after `timeout`.
fn wait_exit(p: &mut Proc, timeout: Duration, stderr: &Path) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = p.0.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {timeout:?}; its stderr:\n{}",
            tail(stderr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A broker (fails naming scripts/test-broker.sh when tansu is missing) with a fresh topic.
fn broker(topic: &str) -> TestBroker {
    let b = TestBroker::start().unwrap_or_else(|e| panic!("{e}"));
    b.create_topic(topic, PARTITIONS).expect("create topic");
    b
}

/// Trickle server with two fresh channels, and a runner (ingest on, emitted envelopes
/// recorded), in a temp dir.
struct Relay {
    _server: Proc,
    runner: Proc,
    control: String,
    events: String,
    ingest: SocketAddr,
    dir: tempfile::TempDir,
}

impl Relay {
    fn start() -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_addr();
        let server = common::serve(addr, &[]);
        let (control, events) = common::create_session_channels(addr);
        let ingest = free_addr();
        let emitted = dir.path().join("emitted.jsonl");
        let report = dir.path().join("runner.json");
        let runner = common::runner_with_ingest(
            (&control, &events),
            (SESSION, CONNECTION),
            ingest,
            &[
                // Quiet between the events the test posts: no heartbeat until the end.
                "--heartbeat-ms",
                "600000",
                "--emitted-file",
                emitted.to_str().unwrap(),
                "--report",
                report.to_str().unwrap(),
            ],
            Some(&dir.path().join("runner.err")),
        );
        Relay {
            _server: server,
            runner,
            control,
            events,
            ingest,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A client that starts the stream, with `egress` and its environment.
    fn client(&self, egress: &str, duration_secs: Option<&str>, env: &[(&str, String)]) -> Proc {
        let report = self.path("client.json");
        let mut args = vec![
            "client",
            "--control-url",
            &self.control,
            "--events-url",
            &self.events,
            "--session-id",
            SESSION,
            "--connection-id",
            CONNECTION,
            "--egress",
            egress,
            "--start-stream",
            r#"{"pipeline_id":"passthrough"}"#,
            "--report",
            report.to_str().unwrap(),
        ];
        if let Some(d) = duration_secs {
            args.extend(["--duration-secs", d]);
        }
        spawn(&args, env, &self.path("client.err"))
    }

    /// Posts envelopes to the runner's ingest; all must be accepted.
    fn post(&self, lines: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let http = reqwest::blocking::Client::new();
        let answer: Value = loop {
            match http
                .post(format!("http://{}/v1/events", self.ingest))
                .body(lines.join("\n"))
                .send()
            {
                Ok(r) => break r.json().expect("ingest answers JSON"),
                Err(e) => {
                    assert!(Instant::now() < deadline, "ingest unreachable: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        assert_eq!(
            answer["accepted"].as_u64(),
            Some(lines.len() as u64),
            "{answer}"
        );
    }

    /// Every envelope the runner emitted so far (its exact JSON lines).
    fn emitted(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("emitted.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn finish_runner(&mut self) -> Value {
        let err = self.path("runner.err");
        if !matches!(self.runner.0.try_wait(), Ok(Some(_))) {
            self.runner.terminate();
        }
        assert!(
            wait_exit(&mut self.runner, Duration::from_secs(20), &err).success(),
            "runner failed:\n{}",
            tail(&err)
        );
        let text = std::fs::read_to_string(self.path("runner.json")).expect("runner report");
        serde_json::from_str(&text).expect("runner report is JSON")
    }
}

/// Envelopes built by "a local process", in the canonical member order (`id`, `type`,
/// `timestamp`, `data`), with numbers and escapes whose bytes must survive.
fn envelopes(n: usize, phase: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            let ts = 1_700_000_000_000u64 + i as u64;
            format!(
                r#"{{"id":"{}","type":"stream_trace","timestamp":"{ts}","data":{{"type":"pipeline_loaded","client_source":"scope","timestamp":"{ts}","session_id":"{SESSION}","connection_id":"{CONNECTION}","seq":{i},"phase":"{phase}","fps":29.970,"note":"caf\u00e9 \"q\""}}}}"#,
                uuid::Uuid::new_v4()
            )
        })
        .collect()
}

fn id_of(line: &str) -> String {
    let v: Value = serde_json::from_str(line).expect("emitted line is JSON");
    v["id"].as_str().expect("envelope id").to_string()
}

fn key_of(m: &Consumed) -> String {
    String::from_utf8(m.key.clone().expect("message has a key")).expect("UTF-8 key")
}

fn read_all(bootstrap: &str, topic: &str, expect: usize) -> Vec<Consumed> {
    broker::read_topic(
        bootstrap,
        topic,
        expect,
        Duration::from_millis(1500),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The topic holds exactly the `sent` envelopes (as relayed), once each by id: key = id, value
/// byte-identical, each in the partition its key hashes to.
fn assert_topic_is_exactly(got: &[Consumed], sent: &[String]) {
    let mut by_key: HashMap<String, Vec<&Consumed>> = HashMap::new();
    for m in got {
        by_key.entry(key_of(m)).or_default().push(m);
    }
    for line in sent {
        let id = id_of(line);
        let ms = by_key
            .get(&id)
            .unwrap_or_else(|| panic!("event {id} is not in the topic: {line}"));
        assert_eq!(ms.len(), 1, "event {id} is in the topic {} times", ms.len());
        let value = ms[0].value.as_deref().expect("message has a value");
        let (original, _) = unrelay_or_fail(std::str::from_utf8(value).expect("UTF-8 value"));
        assert_eq!(
            &original, line,
            "event {id}: value is not the envelope byte for byte (plus the annotations in data)"
        );
        assert_eq!(
            ms[0].partition,
            broker::default_partition(id.as_bytes(), PARTITIONS),
            "event {id} is not in the partition of its key"
        );
    }
    let sent_ids: HashSet<String> = sent.iter().map(|l| id_of(l)).collect();
    let extra: Vec<&String> = by_key.keys().filter(|k| !sent_ids.contains(*k)).collect();
    assert!(extra.is_empty(), "messages nobody emitted: {extra:?}");
    assert_eq!(got.len(), sent.len());
}

fn kafka_env(bootstrap: &str, topic: &str, dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.to_string()),
        ("KAFKA_TOPIC", topic.to_string()),
        (
            "SCOPE_KAFKA_BUFFER_PATH",
            dir.join("kafka-buffer").display().to_string(),
        ),
        ("SCOPE_KAFKA_FLUSH_TIMEOUT_MS", "30000".to_string()),
        // A restarted in-memory broker forgets producer ids: fail over to a fresh producer soon.
        ("SCOPE_KAFKA_MESSAGE_TIMEOUT_MS", "4000".to_string()),
    ]
}

#[test]
fn runner_server_client_kafka_every_event_once_keyed_by_id_byte_identical() {
    let topic = format!("scope-events-{}", uuid::Uuid::new_v4().simple());
    let b = broker(&topic);
    let mut r = Relay::start();
    let env = kafka_env(&b.bootstrap(), &topic, r.dir.path());
    let mut client = r.client("kafka", Some("4"), &env);
    r.post(&envelopes(300, "only"));
    let requests: Vec<String> = (0..100)
        .map(|i| format!(r#"{{"event_type":"notification_sent","session_id":"{SESSION}","connection_id":"{CONNECTION}","metadata":{{"seq":{i}}}}}"#))
        .collect();
    r.post(&requests);

    let err = r.path("client.err");
    assert!(
        wait_exit(&mut client, Duration::from_secs(40), &err).success(),
        "client failed:\n{}",
        tail(&err)
    );
    let runner = r.finish_runner();
    let sent = r.emitted();
    assert_eq!(runner["dropped"], 0, "the runner dropped nothing: {runner}");
    assert_eq!(runner["emitted"].as_u64(), Some(sent.len() as u64));
    assert!(
        sent.len() >= 400 + 3,
        "lifecycle + posted events: {}",
        sent.len()
    );

    let got = read_all(&b.bootstrap(), &topic, sent.len());
    assert_topic_is_exactly(&got, &sent);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(r.path("client.json")).unwrap()).unwrap();
    assert_eq!(
        report["egressed"].as_u64(),
        Some(sent.len() as u64),
        "{report}"
    );
    assert_eq!(report["egress_dropped"], 0);
}

#[test]
fn runner_client_http_reporter_collector_kafka_every_event_once_byte_identical() {
    let topic = format!("scope-events-{}", uuid::Uuid::new_v4().simple());
    let b = broker(&topic);
    let mut r = Relay::start();
    let keys = r.path("keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    let listen = free_addr();
    let collector_err = r.path("collector.err");
    let _collector = spawn(
        &[
            "collector",
            "--listen",
            &listen.to_string(),
            "--api-keys",
            keys.to_str().unwrap(),
            "--output",
            &format!("kafka:{topic}"),
        ],
        &[("KAFKA_BOOTSTRAP_SERVERS", b.bootstrap())],
        &collector_err,
    );
    wait_listening(listen);
    let env = [
        ("SCOPE_CLOUD_API_KEY", KEY.to_string()),
        (
            "DAYDREAM_METRICS_URL",
            format!("http://{listen}/v1/metrics"),
        ),
        (
            "SCOPE_METRICS_BUFFER_PATH",
            r.path("metrics-buffer").display().to_string(),
        ),
        ("SCOPE_METRICS_FLUSH_INTERVAL_MS", "100".to_string()),
    ];
    let mut client = r.client("http", Some("4"), &env);
    for chunk in envelopes(1200, "http").chunks(400) {
        r.post(chunk);
    }
    let err = r.path("client.err");
    assert!(
        wait_exit(&mut client, Duration::from_secs(40), &err).success(),
        "client failed:\n{}",
        tail(&err)
    );
    let runner = r.finish_runner();
    let sent = r.emitted();
    assert_eq!(runner["dropped"], 0, "the runner dropped nothing: {runner}");
    assert!(sent.len() >= 1200 + 3);

    let got = read_all(&b.bootstrap(), &topic, sent.len());
    assert_topic_is_exactly(&got, &sent);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(r.path("client.json")).unwrap()).unwrap();
    assert_eq!(
        report["egressed"].as_u64(),
        Some(sent.len() as u64),
        "{report}"
    );
}

#[test]
fn broker_killed_mid_run_then_back_nothing_lost_nothing_duplicated() {
    let topic = format!("scope-events-{}", uuid::Uuid::new_v4().simple());
    let mut b = broker(&topic);
    let mut r = Relay::start();
    let env = kafka_env(&b.bootstrap(), &topic, r.dir.path());
    let mut client = r.client("kafka", None, &env);

    // Phase 1, broker up: the posted events and the session's first lifecycle events reach
    // the topic; the runner is quiet after that (no heartbeats), so nothing is in flight when
    // the broker dies. (The runner's --emitted-file is buffered until it exits, so the topic,
    // not the file, tells when phase 1 is through.)
    let posted = envelopes(200, "before");
    r.post(&posted);
    let posted_ids: HashSet<String> = posted.iter().map(|l| id_of(l)).collect();
    let mut before: Vec<Consumed> = Vec::new();
    wait_until("phase 1 in the topic", Duration::from_secs(30), || {
        before = read_all(&b.bootstrap(), &topic, posted.len());
        let keys: HashSet<String> = before.iter().map(key_of).collect();
        posted_ids.is_subset(&keys)
    });

    // The broker dies (SIGKILL) while events keep coming; emit never waits for it.
    b.kill();
    let t = Instant::now();
    r.post(&envelopes(500, "down"));
    assert!(t.elapsed() < Duration::from_secs(5), "ingest stalled");
    std::thread::sleep(Duration::from_secs(3));

    // Back on the same port. Its storage is in memory: it comes back empty, so the topic is
    // created again before the flow resumes (the client keeps retrying meanwhile).
    b.restart().expect("restart broker");
    b.create_topic(&topic, PARTITIONS).expect("recreate topic");
    r.post(&envelopes(300, "after"));

    // A graceful stop: the client stops the stream, relays the last events, flushes Kafka.
    client.terminate();
    let err = r.path("client.err");
    assert!(
        wait_exit(&mut client, Duration::from_secs(45), &err).success(),
        "client failed:\n{}",
        tail(&err)
    );
    let client_log = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(
        client_log.contains("Kafka broker unreachable"),
        "the client saw the outage:\n{}",
        tail(&err)
    );
    let runner = r.finish_runner();
    let sent = r.emitted();
    assert_eq!(runner["dropped"], 0, "the runner dropped nothing: {runner}");
    // What the old broker held (read before it died) and what the restarted one holds split the
    // emitted events between them: nothing lost, nothing twice, every byte kept.
    let before_ids: HashSet<String> = before.iter().map(key_of).collect();
    let (phase1, rest): (Vec<String>, Vec<String>) = sent
        .iter()
        .cloned()
        .partition(|l| before_ids.contains(&id_of(l)));
    assert_topic_is_exactly(&before, &phase1);
    assert!(rest.len() >= 800, "{} events after the kill", rest.len());
    let after = read_all(&b.bootstrap(), &topic, rest.len());
    assert_topic_is_exactly(&after, &rest);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(r.path("client.json")).unwrap()).unwrap();
    assert_eq!(
        report["egressed"].as_u64(),
        Some(sent.len() as u64),
        "{report}"
    );
    assert_eq!(report["egress_dropped"], 0);
}
