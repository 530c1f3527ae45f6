//! The newcomer's path through separate processes (issue #18): a channel that was never there is
//! an error naming the fix, every summary adds up (`emitted = delivered + dropped + queued`), and
//! a client whose session ended drains its egress before it exits.

mod common;

use common::{
    assert_accounted, assert_json_accounted, free_addr, get_json, log_file, read_json, signal,
    tail, wait_listening, wait_until, Proc,
};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const SESSION: &str = "sess-newcomer";
const CONNECTION: &str = "conn-newcomer";

fn spawn(args: &[&str], env: &[(&str, String)], stderr: &Path) -> Proc {
    let mut cmd = common::relay(args);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.stderr(log_file(stderr));
    Proc::start(&mut cmd)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A built envelope of this session with a fresh id; returns (id, JSON line).
fn envelope(i: u64) -> (String, String) {
    let id = uuid::Uuid::new_v4().to_string();
    let ts = (1_700_000_000_000u64 + i).to_string();
    let line = json!({"id": id, "type": "stream_trace", "timestamp": ts,
        "data": {"type": "pipeline_loaded", "client_source": "scope", "timestamp": ts,
                 "session_id": SESSION, "connection_id": CONNECTION, "seq": i}})
    .to_string();
    (id, line)
}

/// Posts `lines` to a runner's loopback ingest; every one must be accepted.
fn post(ingest: SocketAddr, lines: &[String]) {
    let answer: Value = reqwest::blocking::Client::new()
        .post(format!("http://{ingest}/v1/events"))
        .body(lines.join("\n"))
        .send()
        .expect("ingest")
        .json()
        .expect("ingest answers JSON");
    assert_eq!(
        answer["accepted"].as_u64(),
        Some(lines.len() as u64),
        "{answer}"
    );
}

/// Waits (up to `limit`) for the client behind `http` to have relayed at least `n` envelopes.
fn wait_relayed(http: SocketAddr, n: u64, limit: Duration) {
    wait_until(&format!("{n} envelopes relayed"), limit, || {
        get_json(&format!("http://{http}/health"))
            .is_some_and(|h| h["client"]["relayed"].as_u64().unwrap_or(0) >= n)
    });
}

#[test]
fn a_runner_or_client_whose_channel_was_never_there_exits_non_zero_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    // A plain server: no autocreate, and nobody created the session's channels.
    let addr = free_addr();
    let _server = Proc::spawn(&["serve", "--listen", &addr.to_string()], None);
    wait_listening(addr);
    let (control, events) = (
        format!("http://{addr}/never-control"),
        format!("http://{addr}/never-events"),
    );

    let (log, report) = (
        dir.path().join("runner.log"),
        dir.path().join("runner.json"),
    );
    let mut runner = spawn(
        &[
            "runner",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--report",
            report.to_str().unwrap(),
        ],
        &[],
        &log,
    );
    let status = runner.wait(Duration::from_secs(30));
    let err = read(&log);
    assert!(!status.success(), "the runner exited 0:\n{err}");
    assert!(
        err.contains(&format!(
            "the control channel {control} does not exist (HTTP 404)"
        )),
        "{err}"
    );
    assert!(
        err.contains("--create-channels") && err.contains("serve --autocreate"),
        "the fix is named: {err}"
    );
    assert!(!err.contains("control channel ended"), "not an end: {err}");
    // Its summary adds up: what it emitted was lost with the events channel, counted as dropped.
    let [t] = assert_accounted("runner summary", &err)[..] else {
        panic!("one accounting expected:\n{err}");
    };
    assert!(t.emitted > 0 && t.delivered == 0, "{t}");
    let json = read_json(&report);
    assert_json_accounted("runner --report", &json);
    assert_eq!(json["control_missing"], true, "{json}");
    assert_eq!(
        json["lost_in_failed_segments"].as_u64(),
        Some(t.dropped),
        "the drops are the events lost with the missing events channel: {json}"
    );

    let log = dir.path().join("client.log");
    let mut client = spawn(
        &[
            "client",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--egress",
            "none",
        ],
        &[],
        &log,
    );
    let status = client.wait(Duration::from_secs(30));
    let err = read(&log);
    assert!(!status.success(), "the client exited 0:\n{err}");
    assert!(
        err.contains(&format!(
            "the events channel {events} does not exist (HTTP 404)"
        )),
        "{err}"
    );
    assert!(
        err.contains("--create-channels") && err.contains("serve --autocreate"),
        "the fix is named: {err}"
    );
}

/// Every summary of a lossless session and of the demo (text and JSON, with and without
/// overload) adds up; the lossy runner of the test above is checked there.
#[test]
fn every_summary_adds_up() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let _server = common::serve(addr, &[]);
    let (control, events) = (
        format!("http://{addr}/sum-control"),
        format!("http://{addr}/sum-events"),
    );
    let http = free_addr();
    let (client_log, client_report) = (dir.path().join("client.log"), dir.path().join("c.json"));
    let egressed = dir.path().join("egressed.jsonl");
    let mut client = spawn(
        &[
            "client",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--create-channels",
            "--session-id",
            SESSION,
            "--connection-id",
            CONNECTION,
            "--egress",
            "file",
            "--egress-file",
            egressed.to_str().unwrap(),
            "--http",
            &http.to_string(),
            "--report",
            client_report.to_str().unwrap(),
        ],
        &[],
        &client_log,
    );
    wait_listening(http);
    let (runner_log, runner_report) = (dir.path().join("runner.log"), dir.path().join("r.json"));
    let ingest = free_addr();
    let mut runner = common::runner_with_ingest(
        (&control, &events),
        (SESSION, CONNECTION),
        ingest,
        &["--report", runner_report.to_str().unwrap()],
        Some(&runner_log),
    );
    let lines: Vec<String> = (0..200).map(|i| envelope(i).1).collect();
    post(ingest, &lines);
    wait_relayed(http, 200, Duration::from_secs(30));
    let health = get_json(&format!("http://{http}/health")).expect("/health");
    assert_json_accounted("/health", &health);

    // An ordinary end: the client ends the session, the runner's control channel ends.
    client.terminate();
    let status = client.wait(Duration::from_secs(40));
    assert!(status.success(), "client:\n{}", tail(&client_log));
    let status = runner.wait(Duration::from_secs(30));
    assert!(status.success(), "runner:\n{}", tail(&runner_log));

    let runner_err = read(&runner_log);
    let [r] = assert_accounted("runner summary", &runner_err)[..] else {
        panic!("one accounting expected:\n{runner_err}");
    };
    assert!(r.emitted >= 200 && r.dropped == 0, "{r}");
    assert_eq!(r.delivered, r.emitted, "lossless: {r}");
    let (e, d, x, q) = assert_json_accounted("runner --report", &read_json(&runner_report));
    assert_eq!((e, d, x, q), (r.emitted, r.delivered, r.dropped, r.queued));

    let client_err = read(&client_log);
    let [c] = assert_accounted("client summary", &client_err)[..] else {
        panic!("one accounting expected:\n{client_err}");
    };
    let client_json = read_json(&client_report);
    let (e, d, ..) = assert_json_accounted("client --report", &client_json);
    assert_eq!((e, d), (c.emitted, c.delivered));
    assert_eq!(
        c.emitted,
        client_json["relayed"].as_u64().unwrap(),
        "the egress took in what the client relayed"
    );
    assert_eq!(
        c.delivered,
        common::read_lines(&egressed).len() as u64,
        "delivered is what the file holds"
    );
    assert_eq!(
        r.delivered,
        client_json["relayed"].as_u64().unwrap(),
        "what the trickle server acknowledged, the client relayed"
    );

    for args in [
        &["demo", "--duration-secs", "0.4"][..],
        &[
            "demo",
            "--duration-secs",
            "0.4",
            "--burst",
            "20000",
            "--queue-capacity",
            "64",
        ][..],
    ] {
        let out = common::relay(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}:\n{err}");
        let found = assert_accounted("demo summary", &err);
        assert_eq!(found.len(), 2, "runner and egress: {err}");
        let mut json_args = args.to_vec();
        json_args.push("--json");
        let out = common::relay(&json_args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_json_accounted("demo --json", &v);
        let egress = json!({"telemetry": v["egress"]});
        assert_json_accounted("demo --json egress", &egress);
    }
}

/// The real metrics API allows 30 requests a minute; a client whose session ends with thousands
/// of events buffered keeps sending them for `--drain-secs`, then says exactly what is left on
/// disk and where; a second signal exits at once; the next start sends what was left, and every
/// event arrives once.
#[test]
fn a_client_drains_its_egress_at_exit_against_a_rate_limiting_collector() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let _server = common::serve(addr, &[]);
    let key = "drain-key";
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{key}\n")).unwrap();
    let metrics = free_addr();
    let out = dir.path().join("metrics.jsonl");
    let _collector = Proc::spawn(
        &[
            "collector",
            "--listen",
            &metrics.to_string(),
            "--api-keys",
            keys.to_str().unwrap(),
            "--output",
            &format!("jsonl:{}", out.display()),
            "--rate",
            "0.5",
            "--burst",
            "2",
        ],
        None,
    );
    wait_listening(metrics);
    let buffer = dir.path().join("buffer");
    let env = |batch: &str| {
        vec![
            ("SCOPE_CLOUD_API_KEY", key.to_string()),
            (
                "DAYDREAM_METRICS_URL",
                format!("http://{metrics}/v1/metrics"),
            ),
            ("SCOPE_METRICS_BUFFER_PATH", buffer.display().to_string()),
            ("SCOPE_METRICS_FLUSH_INTERVAL_MS", "100".to_string()),
            ("SCOPE_METRICS_MAX_BATCH", batch.to_string()),
        ]
    };
    let client = |n: usize, channels: (&str, &str), batch: &str, drain: &str| {
        let http = free_addr();
        let log = dir.path().join(format!("client{n}.log"));
        let report = dir.path().join(format!("client{n}.json"));
        let p = spawn(
            &[
                "client",
                "--control-url",
                channels.0,
                "--events-url",
                channels.1,
                "--create-channels",
                "--session-id",
                SESSION,
                "--connection-id",
                CONNECTION,
                "--http",
                &http.to_string(),
                "--drain-secs",
                drain,
                "--report",
                report.to_str().unwrap(),
            ],
            &env(batch),
            &log,
        );
        wait_listening(http);
        (p, http, log, report)
    };

    // 1. A session of 1,000 events: 20 per request at one request per 2 s cannot keep up.
    let (control, events) = (
        format!("http://{addr}/drain-control"),
        format!("http://{addr}/drain-events"),
    );
    let (mut first, http, log1, report1) = client(1, (&control, &events), "20", "3");
    let ingest = free_addr();
    let mut runner = common::runner_with_ingest(
        (&control, &events),
        (SESSION, CONNECTION),
        ingest,
        &[],
        None,
    );
    let sent: Vec<(String, String)> = (0..1000).map(envelope).collect();
    let lines: Vec<String> = sent.iter().map(|(_, l)| l.clone()).collect();
    post(ingest, &lines);
    wait_relayed(http, 1000, Duration::from_secs(30));
    let delivered_before = egress_delivered(http);
    let ended = Instant::now();
    first.terminate();
    let status = first.wait(Duration::from_secs(40));
    let took = ended.elapsed();
    let err1 = read(&log1);
    assert!(status.success(), "{err1}");
    assert!(runner.wait(Duration::from_secs(30)).success());
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(20),
        "drained for {took:?}, not the 3 s asked:\n{err1}"
    );
    assert!(
        err1.contains("client: session over; sending the ") && err1.contains("client: draining: "),
        "progress: {err1}"
    );
    assert!(err1.contains("--drain-secs ran out"), "{err1}");
    let [a] = assert_accounted("client summary", &err1)[..] else {
        panic!("one accounting expected:\n{err1}");
    };
    let report = read_json(&report1);
    let left1 = report["left_on_disk"].as_u64().unwrap();
    assert!(
        left1 > 0 && a.queued == left1 && a.dropped == 0,
        "{a}; {report}"
    );
    let spool = report["buffer_path"].as_str().unwrap().to_string();
    assert!(
        err1.contains(&format!(
            "client: {left1} events left on disk in {spool} (SCOPE_METRICS_BUFFER_PATH)"
        )),
        "exactly what is left and where: {err1}"
    );
    assert!(
        a.delivered > delivered_before,
        "it kept sending after the session ended: {a}, {delivered_before} before"
    );

    // 2. A client started on what is left; its job ends (the orchestrator deletes its events
    // channel), it starts draining, and a signal then exits at once, keeping the rest on disk.
    let (control, events) = (
        format!("http://{addr}/drain2-control"),
        format!("http://{addr}/drain2-events"),
    );
    let (mut second, http, log2, report2) = client(2, (&control, &events), "20", "60");
    let recovered = get_json(&format!("http://{http}/egress")).expect("/egress")["reporter"]
        ["recovered"]
        .as_u64();
    assert_eq!(recovered, Some(left1), "the next start found what was left");
    first_sigterm_then_second(&mut second, &log2, &events);
    let err2 = read(&log2);
    assert!(
        err2.contains("stopped draining on a second signal"),
        "{err2}"
    );
    assert_accounted("client summary", &err2);
    let left2 = read_json(&report2)["left_on_disk"].as_u64().unwrap();
    assert!(left2 > 0, "{err2}");
    assert!(
        err2.contains(&format!("client: {left2} events left on disk in {spool}")),
        "{err2}"
    );

    // 3. A client that may send 500 per request drains the rest within its default 30 s.
    let (control, events) = (
        format!("http://{addr}/drain3-control"),
        format!("http://{addr}/drain3-events"),
    );
    let (mut third, _http, log3, report3) = client(3, (&control, &events), "500", "30");
    common::delete_channel(&events);
    let status = third.wait(Duration::from_secs(60));
    let err3 = read(&log3);
    assert!(status.success(), "{err3}");
    assert!(!err3.contains("left on disk"), "{err3}");
    assert_accounted("client summary", &err3);
    assert_eq!(read_json(&report3)["left_on_disk"], 0);

    // Every event once: nothing was lost from disk, nothing written twice.
    let written = common::collector_output(&out);
    let mut ids = HashSet::new();
    for v in &written {
        assert!(
            ids.insert(v["id"].as_str().unwrap().to_string()),
            "written twice: {v}"
        );
    }
    for (id, _) in &sent {
        assert!(ids.contains(id), "event {id} never arrived");
    }
}

/// What the egress behind `http` delivered so far (`GET /egress`).
fn egress_delivered(http: SocketAddr) -> u64 {
    let v = get_json(&format!("http://{http}/egress")).expect("/egress");
    v["reporter"]["delivered"]
        .as_u64()
        .unwrap_or_else(|| panic!("no reporter.delivered in {v}"))
}

/// SIGTERM (the session ends: the client waits for the events channel, which the test then
/// deletes, as an orchestrator ending the job), then, once the drain has started, SIGTERM again:
/// the client must exit within 2 s.
fn first_sigterm_then_second(client: &mut Proc, log: &Path, events: &str) {
    client.terminate();
    common::delete_channel(events);
    wait_until("the drain starts", Duration::from_secs(30), || {
        read(log).contains("client: session over; sending the ")
    });
    let at = Instant::now();
    signal(client.pid(), "TERM");
    let status = client.wait(Duration::from_secs(10));
    assert!(
        at.elapsed() < Duration::from_secs(2),
        "a second signal exits at once, not after {:?}:\n{}",
        at.elapsed(),
        tail(log)
    );
    assert!(status.success(), "{}", tail(log));
}

/// The `sh` blocks of the README's section "Run the roles as separate processes", joined: the
/// recipe exactly as a reader copies it.
fn readme_recipe() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .expect("README.md");
    let start = readme
        .find("\n## Run the roles as separate processes\n")
        .expect("the README has the section \"Run the roles as separate processes\"");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut script = String::new();
    let mut rest = section;
    while let Some(open) = rest.find("```sh\n") {
        let body = &rest[open + 6..];
        let close = body.find("\n```").expect("a closed sh block");
        script.push_str(&body[..close]);
        script.push('\n');
        rest = &body[close + 4..];
    }
    assert!(!script.is_empty(), "no sh block in the section");
    script
}

/// The README's recipe, run as written (its port variables set to free ports, `RELAY` to the
/// binary under test): every command exists with the flags it uses, the event it publishes
/// reaches the logs tail and the collector, and every summary it prints adds up.
#[test]
fn the_readme_recipe_runs_as_written() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let script = readme_recipe();
    let mut cmd = std::process::Command::new("bash");
    cmd.arg("-c")
        // Stricter than a pasted shell: any failing command fails the test.
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir.path())
        .env("RELAY", common::BIN)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(log_file(&dir.path().join("stdout")))
        .stderr(log_file(&dir.path().join("stderr")))
        // Its own process group, so whatever it left running is stopped with it.
        .process_group(0);
    for (var, addr) in ["PORT", "CLIENT_HTTP", "INGEST", "COLLECTOR"].map(|v| (v, free_addr())) {
        cmd.env(var, addr.port().to_string());
    }
    for var in [
        "SCOPE_TELEMETRY_DISABLED",
        "DO_NOT_TRACK",
        "SCOPE_TELEMETRY_LOG_SINK",
        "SCOPE_CLOUD_API_KEY",
        "KAFKA_BOOTSTRAP_SERVERS",
    ] {
        cmd.env_remove(var);
    }
    let mut shell = Proc::start(&mut cmd);
    let group = shell.pid();
    let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        shell.wait(Duration::from_secs(120))
    }));
    // Whatever is left of the recipe's processes goes with the test.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .status();
    let logs = || {
        [
            "stdout",
            "stderr",
            "serve.log",
            "client.log",
            "runner.log",
            "client-http.log",
        ]
        .iter()
        .map(|f| format!("--- {f}\n{}", tail(&dir.path().join(f))))
        .collect::<Vec<_>>()
        .join("\n")
    };
    let status = finished.unwrap_or_else(|_| panic!("the recipe did not finish:\n{}", logs()));
    assert!(status.success(), "the recipe failed:\n{}", logs());

    let out = read(&dir.path().join("stdout"));
    assert!(
        out.contains("TELEMETRY type=stream_heartbeat"),
        "the event reached the logs tail:\n{}",
        logs()
    );
    assert!(
        out.contains("\"accepted\":1"),
        "the ingest took it:\n{}",
        logs()
    );
    // Every summary the recipe printed and wrote adds up, and nothing was dropped.
    for a in assert_accounted("recipe summaries", &out) {
        assert_eq!(a.dropped, 0, "{a}:\n{}", logs());
    }
    for f in ["client.json", "runner.json", "client-http.json"] {
        let (e, d, ..) = assert_json_accounted(f, &read_json(&dir.path().join(f)));
        assert!(e >= 1 && e == d, "{f}: everything delivered:\n{}", logs());
    }
    let metrics = common::collector_output(&dir.path().join("metrics.jsonl"));
    assert!(
        metrics
            .iter()
            .any(|v| v["data"]["type"] == "stream_heartbeat"
                || v.to_string().contains("stream_heartbeat")),
        "the collector has the event: {metrics:?}"
    );
}
