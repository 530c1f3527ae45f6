//! The privacy opt-out wins over everything: with `SCOPE_TELEMETRY_DISABLED` or `DO_NOT_TRACK`
//! set, no process egresses telemetry, whatever `--egress` or the environment asks for.
//!
//! Every egress is pointed at something that would notice: a file, the log, and for the HTTP
//! reporter and Kafka a listening socket that must never see a connection (and buffer paths that
//! must never be created). The client must still relay control (its `start_stream` is answered)
//! and count what it discarded; the runner must publish nothing and its ingest endpoint discard.

mod common;

use common::{
    create_session_channels, free_addr, log_file, read_json, relay, serve, tail, wait_listening,
    Proc,
};
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

/// A listener that records whether anything connected (it never answers).
struct Trap(TcpListener);

impl Trap {
    fn new() -> Trap {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        Trap(l)
    }

    fn addr(&self) -> SocketAddr {
        self.0.local_addr().expect("addr")
    }

    fn touched(&self) -> bool {
        self.0.accept().is_ok()
    }
}

/// One client run with `var=1` and `--egress egress` against a live runner; checks that nothing
/// left and that control still worked.
fn opted_out_client(server: SocketAddr, egress: &str, var: &str, dir: &Path) {
    let (control, events) = create_session_channels(server);
    let trap = Trap::new();
    let work = dir.join(format!("{egress}-{var}"));
    std::fs::create_dir_all(&work).unwrap();
    let (runner_err, client_err) = (work.join("runner.err"), work.join("client.err"));
    let (egress_file, report) = (work.join("egressed.jsonl"), work.join("report.json"));
    let (metrics_buffer, kafka_buffer) = (work.join("metrics"), work.join("kafka"));
    let mut runner = Proc::start(
        relay(&[
            "runner",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--heartbeat-ms",
            "100",
        ])
        .stderr(log_file(&runner_err)),
    );
    let trap_url = format!("http://{}/v1/metrics", trap.addr());
    let mut cmd = relay(&[
        "client",
        "--control-url",
        &control,
        "--events-url",
        &events,
        "--egress",
        egress,
        "--egress-file",
        egress_file.to_str().unwrap(),
        "--start-stream",
        "{}",
        "--duration-secs",
        "1.5",
        "--report",
        report.to_str().unwrap(),
    ]);
    // Every egress is configured to work, and to be noticed if it does.
    cmd.env(var, "1")
        .env("SCOPE_TELEMETRY_LOG_SINK", "1")
        .env("SCOPE_CLOUD_API_KEY", "test-key")
        .env("DAYDREAM_METRICS_URL", &trap_url)
        .env(
            "SCOPE_METRICS_BUFFER_PATH",
            metrics_buffer.join("metrics_buffer.jsonl"),
        )
        .env("KAFKA_BOOTSTRAP_SERVERS", trap.addr().to_string())
        .env("SCOPE_KAFKA_BUFFER_PATH", &kafka_buffer)
        .stderr(log_file(&client_err));
    let mut client = Proc::start(&mut cmd);
    let what = format!("--egress {egress} with {var}=1");
    assert!(
        client.wait(Duration::from_secs(60)).success(),
        "{what}: the client failed (control must still be relayed):\n{}",
        tail(&client_err)
    );
    assert!(
        runner.wait(Duration::from_secs(30)).success(),
        "{what}: runner failed"
    );

    let log = std::fs::read_to_string(&client_err).unwrap();
    let said = log.matches(&format!("telemetry disabled by {var}")).count();
    assert_eq!(
        said, 1,
        "{what}: say once which variable turned it off:\n{log}"
    );
    assert!(
        !log.contains("TELEMETRY type="),
        "{what}: the log sink wrote:\n{log}"
    );
    let written = std::fs::read_to_string(&egress_file).unwrap_or_default();
    assert!(
        written.is_empty(),
        "{what}: the file egress wrote {written}"
    );
    assert!(
        !trap.touched(),
        "{what}: something connected to the metrics API or Kafka"
    );
    assert!(
        !metrics_buffer.exists() && !kafka_buffer.exists(),
        "{what}: an egress buffer was created"
    );
    let report = read_json(&report);
    let received = report["telemetry_received"].as_u64().unwrap();
    assert!(
        received >= 4,
        "{what}: the runner's telemetry reached the client: {report}"
    );
    assert_eq!(
        report["discarded"], received,
        "{what}: every envelope counted discarded: {report}"
    );
    assert_eq!(report["egressed"], 0, "{what}: {report}");
    assert_eq!(report["request_timeouts"], 0, "{what}: {report}");
}

#[test]
fn opt_out_wins_over_every_egress_choice() {
    let dir = tempfile::tempdir().unwrap();
    let server = free_addr();
    let _serve = serve(server, &[]);
    let cases = [
        ("auto", "DO_NOT_TRACK"),
        ("log", "SCOPE_TELEMETRY_DISABLED"),
        ("file", "DO_NOT_TRACK"),
        ("http", "SCOPE_TELEMETRY_DISABLED"),
        ("kafka", "DO_NOT_TRACK"),
        ("none", "SCOPE_TELEMETRY_DISABLED"),
        ("auto", "SCOPE_TELEMETRY_DISABLED"),
        ("log", "DO_NOT_TRACK"),
        ("file", "SCOPE_TELEMETRY_DISABLED"),
        ("http", "DO_NOT_TRACK"),
        ("kafka", "SCOPE_TELEMETRY_DISABLED"),
        ("none", "DO_NOT_TRACK"),
    ];
    // Two at a time: each is a runner and a client, and the machine may be small.
    for pair in cases.chunks(2) {
        std::thread::scope(|s| {
            for (egress, var) in pair {
                let dir = dir.path();
                s.spawn(move || opted_out_client(server, egress, var, dir));
            }
        });
    }
}

#[test]
fn an_opted_out_runner_publishes_nothing_and_its_ingest_discards() {
    let dir = tempfile::tempdir().unwrap();
    let server = free_addr();
    let _serve = serve(server, &[]);
    let (control, events) = create_session_channels(server);
    let ingest = free_addr();
    let runner_err = dir.path().join("runner.err");
    let (egress_file, report) = (
        dir.path().join("egressed.jsonl"),
        dir.path().join("report.json"),
    );
    // The runner opted out; the client is not (it would egress anything that arrived).
    let ingest_s = ingest.to_string();
    let mut runner = Proc::start(
        relay(&[
            "runner",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--ingest",
            &ingest_s,
            "--heartbeat-ms",
            "100",
        ])
        .env("DO_NOT_TRACK", "1")
        .stderr(log_file(&runner_err)),
    );
    wait_listening(ingest);
    let mut client = Proc::spawn(
        &[
            "client",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--egress",
            "file",
            "--egress-file",
            egress_file.to_str().unwrap(),
            "--start-stream",
            "{}",
            "--duration-secs",
            "1.5",
            "--report",
            report.to_str().unwrap(),
        ],
        None,
    );
    let body = [
        json!({"event_type": "pipeline_loaded", "session_id": "s", "metadata": {"load_ms": 5}}),
        json!({"id": "11111111-2222-4333-8444-555555555555", "type": "stream_trace",
               "timestamp": "1700000000000", "data": {"type": "error", "client_source": "scope"}}),
    ]
    .iter()
    .map(Value::to_string)
    .collect::<Vec<_>>()
    .join("\n");
    let answer: Value = reqwest::blocking::Client::new()
        .post(format!("http://{ingest}/v1/events"))
        .body(body)
        .send()
        .expect("ingest")
        .json()
        .expect("ingest answers JSON");
    assert_eq!(
        (
            &answer["accepted"],
            &answer["discarded"],
            &answer["rejected"]
        ),
        (&json!(0), &json!(2), &json!(0)),
        "{answer}"
    );
    assert!(
        client.wait(Duration::from_secs(60)).success(),
        "client failed"
    );
    assert!(
        runner.wait(Duration::from_secs(30)).success(),
        "runner failed"
    );
    let log = std::fs::read_to_string(&runner_err).unwrap();
    assert_eq!(
        log.matches("telemetry disabled by DO_NOT_TRACK").count(),
        1,
        "{log}"
    );
    let report = read_json(&report);
    assert_eq!(
        report["telemetry_received"], 0,
        "nothing left the runner: {report}"
    );
    assert_eq!(report["request_timeouts"], 0, "control answered: {report}");
    let written = std::fs::read_to_string(&egress_file).unwrap_or_default();
    assert!(written.is_empty(), "{written}");
}
