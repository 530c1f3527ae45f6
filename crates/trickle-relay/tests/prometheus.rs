//! `GET /metrics` on every long-running process, scraped by a real Prometheus (Debian's
//! `prometheus` package, which `scripts/test.sh` installs) during a relay run over real
//! processes: `serve` and `runner` with `--metrics-listen`, `client` on its `--http` listener,
//! `collector` on its own listener. The numbers are read back through Prometheus's HTTP query API;
//! every exposition passes `promtool check metrics`; every metric the Grafana dashboard
//! (`docs/grafana/trickle-relay.json`) queries exists in them. A client with the Kafka egress
//! (a real broker, `tansu`, which `scripts/test-broker.sh` installs) exports its producer's acks.

mod common;

use common::{free_addr, get_json, log_file, tail, wait_listening, wait_until, Proc};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "prometheus-test-key";
const SESSION: &str = "sess-prom";
const CONNECTION: &str = "conn-prom";

/// The four processes of a relay run, each exporting `/metrics`.
struct Stack {
    _server: Proc,
    _runner: Proc,
    _collector: Proc,
    _client: Proc,
    /// `/metrics` of the server, the runner, the client, the collector (in that order).
    targets: [(&'static str, SocketAddr); 4],
    ingest: SocketAddr,
    client_http: SocketAddr,
    dir: tempfile::TempDir,
}

fn spawn(args: &[&str], env: &[(&str, String)], stderr: &Path) -> Proc {
    let mut cmd = common::relay(args);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.stderr(log_file(stderr));
    Proc::start(&mut cmd)
}

/// Server, channels, runner (queue of 8, so a burst sheds), collector, and a client whose egress
/// is the HTTP reporter sending to that collector; returns once the client relays.
fn stack() -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let (addr, server_metrics) = (free_addr(), free_addr());
    let server = spawn(
        &[
            "serve",
            "--listen",
            &addr.to_string(),
            "--autocreate",
            "--metrics-listen",
            &server_metrics.to_string(),
        ],
        &[],
        &log("server"),
    );
    wait_listening(addr);
    wait_listening(server_metrics);
    let (control, events) = common::create_session_channels(addr);

    let (ingest, runner_metrics) = (free_addr(), free_addr());
    let runner = spawn(
        &[
            "runner",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--session-id",
            SESSION,
            "--connection-id",
            CONNECTION,
            "--queue-capacity",
            "8",
            "--ingest",
            &ingest.to_string(),
            "--no-forward-logs",
            "--metrics-listen",
            &runner_metrics.to_string(),
        ],
        &[],
        &log("runner"),
    );
    wait_listening(ingest);
    wait_listening(runner_metrics);

    let collector_addr = free_addr();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    let out = dir.path().join("collected.jsonl");
    let collector = spawn(
        &[
            "collector",
            "--listen",
            &collector_addr.to_string(),
            "--api-keys",
            keys.to_str().unwrap(),
            "--output",
            &format!("jsonl:{}", out.display()),
        ],
        &[],
        &log("collector"),
    );
    wait_listening(collector_addr);

    let client_http = free_addr();
    let env = [
        ("SCOPE_CLOUD_API_KEY", KEY.to_string()),
        (
            "DAYDREAM_METRICS_URL",
            format!("http://{collector_addr}/v1/metrics"),
        ),
        (
            "SCOPE_METRICS_BUFFER_PATH",
            dir.path().join("buffer").display().to_string(),
        ),
        ("SCOPE_METRICS_FLUSH_INTERVAL_MS", "100".to_string()),
    ];
    let client = spawn(
        &[
            "client",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--session-id",
            SESSION,
            "--connection-id",
            CONNECTION,
            "--http",
            &client_http.to_string(),
        ],
        &env,
        &log("client"),
    );
    wait_listening(client_http);
    // runner_ready reaches the client: it reads the events channel.
    wait_until("the client relays", Duration::from_secs(40), || {
        get_json(&format!("http://{client_http}/health"))
            .is_some_and(|h| h["client"]["relayed"].as_u64().unwrap_or(0) >= 1)
    });
    Stack {
        _server: server,
        _runner: runner,
        _collector: collector,
        _client: client,
        targets: [
            ("server", server_metrics),
            ("runner", runner_metrics),
            ("client", client_http),
            ("collector", collector_addr),
        ],
        ingest,
        client_http,
        dir,
    }
}

impl Stack {
    /// Posts `n` heartbeats to the runner's ingest ([`Stack::burst_to`]).
    fn burst(&self, n: u32) {
        Stack::burst_to(self.ingest, n);
    }

    /// Posts `n` heartbeats in Scope's event shape to the runner's ingest at `ingest` (they go
    /// through its telemetry sink: a queue of 8 sheds most of them), an error event every 1,000.
    fn burst_to(ingest: SocketAddr, n: u32) {
        let mut body = String::new();
        for i in 0..n {
            let kind = if i % 1000 == 0 {
                "error"
            } else {
                "stream_heartbeat"
            };
            let line = serde_json::json!({"event_type": kind, "session_id": SESSION,
                "connection_id": CONNECTION, "metadata": {"i": i}});
            body.push_str(&line.to_string());
            body.push('\n');
        }
        let answer: Value = reqwest::blocking::Client::new()
            .post(format!("http://{ingest}/v1/events"))
            .body(body)
            .send()
            .expect("ingest")
            .json()
            .expect("ingest answers JSON");
        assert_eq!(answer["accepted"], n, "{answer}");
    }

    /// Each process's exposition now, by name.
    fn expositions(&self) -> Vec<(&'static str, String)> {
        self.targets
            .iter()
            .map(|&(name, addr)| {
                let answer = reqwest::blocking::get(format!("http://{addr}/metrics"))
                    .unwrap_or_else(|e| panic!("GET {name} /metrics: {e}"));
                assert!(answer.status().is_success(), "{name}: {}", answer.status());
                let kind = answer.headers()["content-type"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                assert!(
                    kind.starts_with("text/plain; version=0.0.4"),
                    "{name}: {kind}"
                );
                (name, answer.text().unwrap())
            })
            .collect()
    }

    fn logs(&self) -> String {
        ["server", "runner", "client", "collector"]
            .iter()
            .map(|n| {
                format!(
                    "--- {n}\n{}",
                    tail(&self.dir.path().join(format!("{n}.log")))
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A real Prometheus server on a free loopback port, scraping `targets` every 250 ms.
struct Prometheus {
    _proc: Proc,
    addr: SocketAddr,
}

fn prometheus(targets: &[(&str, SocketAddr)], dir: &Path) -> Prometheus {
    let mut config = String::from(
        "global:\n  scrape_interval: 250ms\n  scrape_timeout: 250ms\nscrape_configs:\n",
    );
    for (name, addr) in targets {
        config.push_str(&format!(
            "  - job_name: {name}\n    static_configs:\n      - targets: ['{addr}']\n"
        ));
    }
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let addr = free_addr();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&dir.join("prometheus.log")));
    let proc = Proc(cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot start prometheus ({e}); scripts/test.sh installs Debian's prometheus package"
        )
    }));
    wait_until("prometheus ready", Duration::from_secs(60), || {
        reqwest::blocking::get(format!("http://{addr}/-/ready"))
            .is_ok_and(|r| r.status().is_success())
    });
    Prometheus { _proc: proc, addr }
}

impl Prometheus {
    /// The value of the instant query `q` (one sample), `None` when it has none yet.
    fn query(&self, q: &str) -> Option<f64> {
        let answer: Value = reqwest::blocking::Client::new()
            .get(format!("http://{}/api/v1/query", self.addr))
            .query(&[("query", q)])
            .timeout(Duration::from_secs(5))
            .send()
            .ok()?
            .json()
            .ok()?;
        assert_eq!(answer["status"], "success", "{q}: {answer}");
        let result = answer["data"]["result"].as_array()?;
        let sample = result.first()?;
        sample["value"][1].as_str()?.parse().ok()
    }

    /// Every target's scrape is up.
    fn all_up(&self, n: usize) -> bool {
        self.query("sum(up)") == Some(n as f64)
    }
}

/// The counts a relay run is judged by, all read through Prometheus at one moment.
#[derive(Debug, PartialEq)]
struct Counts {
    emitted: f64,
    dropped: f64,
    dropped_high: f64,
    reports: f64,
    queued: f64,
    relayed: f64,
    reported_drops: f64,
    egressed: f64,
    egress_queued: f64,
    collected: f64,
}

fn counts(p: &Prometheus) -> Option<Counts> {
    Some(Counts {
        emitted: p.query("sum(trickle_relay_runner_events_emitted_total)")?,
        dropped: p.query("sum(trickle_relay_runner_events_dropped_total)")?,
        dropped_high: p
            .query(r#"sum(trickle_relay_runner_events_dropped_total{priority="high"})"#)?,
        reports: p.query("sum(trickle_relay_runner_loss_reports_total)")?,
        queued: p.query("sum(trickle_relay_runner_queue_depth)")?,
        relayed: p.query("sum(trickle_relay_client_events_relayed_total)")?,
        reported_drops: p.query("sum(trickle_relay_client_runner_dropped_events_total)")?,
        egressed: p
            .query(r#"sum(trickle_relay_client_egress_events_total{outcome="delivered"})"#)?,
        egress_queued: p.query("sum(trickle_relay_client_egress_queued)")?,
        collected: p.query("sum(trickle_relay_collector_events_accepted_total)")?,
    })
}

#[test]
fn prometheus_scrapes_every_process_during_a_relay_run() {
    let stack = stack();
    let prom_dir = stack.dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom = prometheus(&stack.targets, &prom_dir);
    wait_until(
        "prometheus scrapes all four processes",
        Duration::from_secs(60),
        || prom.all_up(4),
    );

    const BURST: u32 = 20_000;
    stack.burst(BURST);
    // Quiet again: the runner's queue drained, its drops reported, the client's relays delivered
    // to the collector. Then, in one scrape: what the client relayed is what the runner emitted
    // minus what it dropped, plus its own loss reports (envelopes too); the drops the client
    // learned of (telemetry_dropped) are the drops the runner counted.
    let deadline = Instant::now() + Duration::from_secs(90);
    let last = loop {
        let c = counts(&prom);
        if let Some(c) = c {
            let settled = c.emitted > BURST as f64
                && c.queued == 0.0
                && c.egress_queued == 0.0
                && c.relayed == c.emitted - c.dropped + c.reports
                && c.reported_drops == c.dropped
                && c.collected == c.egressed
                && c.egressed == c.relayed;
            if settled {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "the counters in Prometheus never settled into the relay's identities: {c:?}\n{}",
                stack.logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had every counter\n{}",
            stack.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!("settled: {last:?}");
    assert!(
        last.dropped > 0.0,
        "a burst of {BURST} into a queue of 8 sheds: {last:?}"
    );
    assert_eq!(last.dropped_high, 0.0, "only heartbeats are shed: {last:?}");
    assert!(last.reports > 0.0, "the drops were reported: {last:?}");

    // The same counters as the client's own JSON endpoint (one source of truth).
    let health = get_json(&format!("http://{}/health", stack.client_http)).unwrap();
    assert_eq!(
        health["client"]["relayed"].as_f64(),
        Some(last.relayed),
        "{health}"
    );
    assert_eq!(
        health["client"]["dropped_reported"].as_f64(),
        Some(last.reported_drops),
        "{health}"
    );

    // The server carried it: channels exist, segments and bytes went through, requests counted.
    let server = |q: &str| prom.query(q).unwrap_or_else(|| panic!("no sample for {q}"));
    assert!(server("sum(trickle_relay_server_channels)") >= 2.0);
    assert!(server("sum(trickle_relay_server_segments_total)") >= 1.0);
    assert!(server("sum(trickle_relay_server_received_bytes_total)") > 0.0);
    assert!(server("sum(trickle_relay_server_sent_bytes_total)") > 0.0);
    assert!(
        server(r#"sum(trickle_relay_server_requests_total{route="create_channel",class="2xx"})"#)
            >= 2.0
    );
    let batches = server(r#"sum(trickle_relay_collector_requests_total{status="200"})"#);
    assert!(batches >= 1.0);
    // Every 200 wrote to the output once at least, and was timed.
    assert!(server("sum(trickle_relay_collector_output_latency_seconds_count)") >= batches);
    assert!(
        server("sum(trickle_relay_client_relay_latency_seconds_count)")
            >= last.relayed - last.reports
    );

    // Every exposition is valid Prometheus text, as promtool reads it.
    for (name, text) in stack.expositions() {
        promtool_check(name, &text);
    }
}

/// Fails the test unless `promtool check metrics` accepts `text` (the exposition of `name`).
fn promtool_check(name: &str, text: &str) {
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) is installed");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics fails on the {name}'s exposition:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the unlabelled sample `name` in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_kafka_egress_exports_its_producer_counters() {
    let topic = format!("scope-events-{}", uuid::Uuid::new_v4().simple());
    let broker = kafka::broker::TestBroker::start().unwrap_or_else(|e| panic!("{e}"));
    broker.create_topic(&topic, 1).expect("create topic");
    let dir = tempfile::tempdir().unwrap();
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let addr = free_addr();
    let _server = spawn(
        &["serve", "--listen", &addr.to_string(), "--autocreate"],
        &[],
        &log("server"),
    );
    wait_listening(addr);
    let (control, events) = common::create_session_channels(addr);
    let ingest = free_addr();
    let _runner = common::runner_with_ingest(
        (&control, &events),
        (SESSION, CONNECTION),
        ingest,
        &[],
        Some(&log("runner")),
    );
    let http = free_addr();
    let env = [
        ("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap()),
        ("KAFKA_TOPIC", topic.clone()),
        (
            "SCOPE_KAFKA_BUFFER_PATH",
            dir.path().join("kafka-buffer").display().to_string(),
        ),
    ];
    let _client = spawn(
        &[
            "client",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--session-id",
            SESSION,
            "--connection-id",
            CONNECTION,
            "--egress",
            "kafka",
            "--http",
            &http.to_string(),
        ],
        &env,
        &log("client"),
    );
    wait_listening(http);
    Stack::burst_to(ingest, 200);
    // Every relayed envelope acknowledged by the broker, as the client's /metrics says.
    let mut text = String::new();
    wait_until(
        "the Kafka sink's acks in /metrics",
        Duration::from_secs(60),
        || {
            text = reqwest::blocking::get(format!("http://{http}/metrics"))
                .and_then(|r| r.text())
                .unwrap_or_default();
            let relayed = sample(&text, "trickle_relay_client_events_relayed_total");
            let acks = sample(&text, "trickle_relay_client_kafka_acks_total");
            relayed.is_some_and(|r| r >= 200.0) && acks == relayed
        },
    );
    assert_eq!(
        sample(&text, "trickle_relay_client_kafka_timeouts_total"),
        Some(0.0)
    );
    assert!(text
        .contains(r#"trickle_relay_client_egress_events_total{sink="kafka",outcome="delivered"}"#));
    promtool_check("client (Kafka egress)", &text);
}

/// The metric names (`trickle_relay_*`) every panel query of the dashboard uses.
fn dashboard_metrics() -> BTreeSet<String> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/grafana/trickle-relay.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut names = BTreeSet::new();
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .expect("every target has a PromQL expr");
            exprs += 1;
            let mut rest = expr;
            while let Some(at) = rest.find("trickle_relay_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.insert(name);
            }
        }
    }
    assert!(
        exprs >= 10,
        "the dashboard has its panels' queries ({exprs})"
    );
    names
}

#[test]
fn every_metric_the_grafana_dashboard_queries_exists() {
    let stack = stack();
    stack.burst(100);
    let mut exported = BTreeSet::new();
    for (_, text) in stack.expositions() {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            exported.insert(name);
        }
    }
    let missing: Vec<_> = dashboard_metrics()
        .into_iter()
        .filter(|m| !exported.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no process exports: {missing:?}\nexported: {exported:?}"
    );
}

#[test]
fn a_collector_with_redis_dedup_exports_the_stores_state() {
    let dir = tempfile::tempdir().unwrap();
    let redis_addr = free_addr();
    let _redis = Proc(
        Command::new("redis-server")
            .args([
                "--port",
                &redis_addr.port().to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(log_file(&dir.path().join("redis.log")))
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)"),
    );
    wait_listening(redis_addr);
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    let addr = free_addr();
    let _collector = spawn(
        &[
            "collector",
            "--listen",
            &addr.to_string(),
            "--api-keys",
            keys.to_str().unwrap(),
            "--output",
            &format!("jsonl:{}", dir.path().join("out.jsonl").display()),
            "--dedup",
            &format!("redis://{redis_addr}"),
        ],
        &[],
        &dir.path().join("collector.log"),
    );
    wait_listening(addr);
    let text = reqwest::blocking::get(format!("http://{addr}/metrics"))
        .and_then(|r| r.text())
        .expect("GET /metrics");
    assert_eq!(
        sample(&text, "trickle_relay_collector_dedup_store_up"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "trickle_relay_collector_dedup_claims_lost_total"),
        Some(0.0)
    );
    promtool_check("collector (Redis dedup)", &text);
}
