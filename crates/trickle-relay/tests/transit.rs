//! Every event accounted for between the runner and the client, over real processes: `serve`,
//! `runner` (events fed through its loopback ingest) and `client` (egress to a file).
//!
//! A client is forced out of the server's window by stopping it (`SIGSTOP`: a client that does
//! not get the CPU, as a slow egress or a paused process would leave it) while the runner writes a
//! burst; the trickle server is `kill -9`ed while the client is still reading an older segment;
//! a runner is killed and another takes its place. In each case the sums must close exactly:
//! `emitted = delivered + dropped + lost in transit`, and every gap the client counted is in its
//! egress as a `telemetry_lost_in_transit` envelope. With flow control on, the same stalled
//! client loses nothing: the runner sheds heartbeats instead, and every lifecycle and `error`
//! event arrives; with a deep runner queue (`--queue-capacity 100000`) the runner holds the
//! queue to the client's reading even while it stops, so nothing is lost there either.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

const SESSION: &str = "transit-session";
const CONNECTION: &str = "transit-connection";

/// Paths of one runner process's files.
struct RunnerFiles {
    emitted: PathBuf,
    report: PathBuf,
    log: PathBuf,
}

/// A server, a runner fed through its ingest, and a client egressing to a file.
struct Relay {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    server: Option<Proc>,
    control: String,
    events: String,
    runner: Option<Proc>,
    runners: Vec<RunnerFiles>,
    ingest: SocketAddr,
    client: Option<Proc>,
    client_http: SocketAddr,
    /// SIGTERM already sent to the runner ([`Relay::terminate_runner`]).
    runner_terminated: bool,
}

impl Relay {
    /// Starts everything; the runner gets `runner_extra` flags. Returns once telemetry flows.
    fn start(runner_extra: &[&str]) -> Relay {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = free_addr();
        let server = serve(addr, &[]);
        let (control, events) = create_session_channels(addr);
        let mut r = Relay {
            dir,
            addr,
            server: Some(server),
            control,
            events,
            runner: None,
            runners: Vec::new(),
            ingest: free_addr(),
            client: None,
            client_http: free_addr(),
            runner_terminated: false,
        };
        let client_out = r.path("egress.jsonl");
        let client_report = r.path("client.json");
        let client_log = r.path("client.err");
        let client = Proc::start(
            relay(&[
                "client",
                "--control-url",
                &r.control,
                "--events-url",
                &r.events,
                "--session-id",
                SESSION,
                "--connection-id",
                CONNECTION,
                "--egress",
                "file",
                "--egress-file",
                client_out.to_str().unwrap(),
                "--report",
                client_report.to_str().unwrap(),
                "--http",
                &r.client_http.to_string(),
            ])
            .env("RUST_LOG", "info,trickle::subscriber=debug")
            .stderr(log_file(&client_log)),
        );
        r.client = Some(client);
        wait_listening(r.client_http);
        r.start_runner(runner_extra);
        r
    }

    /// [`Relay::start`], then 20 heartbeats through to the client; returns the events channel's
    /// write head then.
    fn start_warm(runner_extra: &[&str]) -> (Relay, i64) {
        let r = Relay::start(runner_extra);
        r.post(&heartbeats("warm", 20));
        wait_relayed(&r, 21); // + the runner's runner_ready event
        let head = r.events_head();
        (r, head)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts a runner (the first, or one taking a killed one's place: pass `--reset`).
    fn start_runner(&mut self, extra: &[&str]) {
        let n = self.runners.len();
        let files = RunnerFiles {
            emitted: self.path(&format!("runner{n}.emitted.jsonl")),
            report: self.path(&format!("runner{n}.json")),
            log: self.path(&format!("runner{n}.err")),
        };
        self.ingest = free_addr();
        let mut args = vec![
            "--emitted-file",
            files.emitted.to_str().unwrap(),
            "--report",
            files.report.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let ingest = self.ingest.to_string();
        let mut full = vec![
            "runner",
            "--control-url",
            &self.control,
            "--events-url",
            &self.events,
            "--session-id",
            SESSION,
            "--connection-id",
            CONNECTION,
            "--ingest",
            &ingest,
            "--no-forward-logs",
        ];
        full.extend_from_slice(&args);
        self.runner = Some(Proc::spawn(&full, Some(&files.log)));
        self.runners.push(files);
        wait_listening(self.ingest);
    }

    /// Posts `events` to the runner's ingest, 500 per request; each must be accepted.
    fn post(&self, events: &[Value]) {
        let http = reqwest::blocking::Client::new();
        for chunk in events.chunks(500) {
            let body: String = chunk.iter().map(|e| format!("{e}\n")).collect();
            let answer: Value = http
                .post(format!("http://{}/v1/events", self.ingest))
                .body(body)
                .send()
                .expect("ingest")
                .json()
                .expect("ingest answers JSON");
            assert_eq!(
                answer["accepted"].as_u64(),
                Some(chunk.len() as u64),
                "{answer}"
            );
        }
    }

    /// The client's counters now (`GET /health`), if it answers.
    fn client_report(&self) -> Option<Value> {
        reqwest::blocking::Client::new()
            .get(format!("http://{}/health", self.client_http))
            .timeout(Duration::from_secs(2))
            .send()
            .ok()?
            .json::<Value>()
            .ok()
            .map(|h| h["client"].clone())
    }

    fn client_counter(&self, name: &str) -> u64 {
        self.client_report()
            .and_then(|c| c[name].as_u64())
            .unwrap_or(0)
    }

    /// The channel's write head on the server (`GET {events}/next`).
    fn events_head(&self) -> i64 {
        reqwest::blocking::get(format!("{}/next", self.events))
            .ok()
            .and_then(|r| r.text().ok())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(-1)
    }

    /// Sends the runner SIGTERM (it drains, announces `telemetry_end`, waits for the client);
    /// [`Relay::finish`] then only waits for it.
    fn terminate_runner(&mut self) {
        self.runner.as_ref().expect("runner").terminate();
        self.runner_terminated = true;
    }

    /// The current runner's log so far.
    fn runner_log(&self) -> String {
        let log = &self.runners.last().expect("a runner").log;
        std::fs::read_to_string(log).unwrap_or_default()
    }

    fn client_pid(&self) -> u32 {
        self.client.as_ref().expect("client").pid()
    }

    /// Ends the session as an operator would (SIGTERM to the runner: it drains, announces
    /// `telemetry_end`, waits for the client to read it, closes the channel; the client then
    /// ends by itself) and reads what everyone saw.
    fn finish(mut self) -> Outcome {
        let mut runner = self.runner.take().expect("runner");
        if !self.runner_terminated {
            runner.terminate();
        }
        let runner_status = runner.wait(Duration::from_secs(60));
        let mut client = self.client.take().expect("client");
        let client_status = client.wait(Duration::from_secs(60));
        let logs = self.logs();
        assert!(runner_status.success(), "runner failed\n{logs}");
        assert!(client_status.success(), "client failed\n{logs}");
        assert!(!logs.contains("panicked"), "a process panicked\n{logs}");
        // A runner that was killed wrote no report; its emitted file counts all the same.
        let runners: Vec<Value> = self
            .runners
            .iter()
            .filter(|f| f.report.exists())
            .map(|f| read_json(&f.report))
            .collect();
        let emitted: Vec<String> = self
            .runners
            .iter()
            .flat_map(|f| read_lines(&f.emitted))
            .collect();
        Outcome {
            runners,
            client: read_json(&self.path("client.json")),
            emitted,
            egressed: read_lines(&self.path("egress.jsonl")),
            logs,
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for f in &self.runners {
            out += &format!("--- {}\n{}\n", f.log.display(), tail(&f.log));
        }
        out + &format!("--- client\n{}", tail(&self.path("client.err")))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // A client left stopped would outlive the test.
        if let Some(c) = &self.client {
            signal(c.pid(), "CONT");
        }
    }
}

/// What one session left behind.
struct Outcome {
    runners: Vec<Value>,
    client: Value,
    emitted: Vec<String>,
    egressed: Vec<String>,
    logs: String,
}

fn id_of(line: &str) -> String {
    serde_json::from_str::<Value>(line).expect("JSON line")["id"]
        .as_str()
        .expect("an id")
        .to_string()
}

fn data_type(line: &str) -> String {
    serde_json::from_str::<Value>(line).expect("JSON line")["data"]["type"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

impl Outcome {
    fn sum(&self, key: &str) -> u64 {
        self.runners
            .iter()
            .map(|r| r[key].as_u64().unwrap_or(0))
            .sum()
    }

    fn client(&self, key: &str) -> u64 {
        self.client[key]
            .as_u64()
            .unwrap_or_else(|| panic!("client report has no {key}: {}", self.client))
    }

    /// The sums close, and what the client counted is what its egress says. Returns
    /// `(delivered, dropped, lost)`.
    fn check_accounting(&self) -> (u64, u64, u64) {
        let ctx = || {
            format!(
                "runners {:?}\nclient {}\n{}",
                self.runners, self.client, self.logs
            )
        };
        let emitted = self.sum("emitted");
        // Lines the runner's writer lost after taking them are counted by the client instead.
        let dropped = self.sum("dropped") - self.sum("lost_downstream");
        let lost = self.client("lost_in_transit");
        let delivered = self.client("telemetry_received") - self.client("runner_loss_reports");
        assert_eq!(
            emitted,
            delivered + dropped + lost,
            "emitted = delivered + dropped + lost in transit\n{}",
            ctx()
        );
        assert_eq!(
            self.client("dropped_reported"),
            dropped,
            "the drops reported downstream are the drops counted\n{}",
            ctx()
        );
        assert_eq!(emitted, self.emitted.len() as u64, "{}", ctx());

        // The egress: each emitted event at most once, nothing invented; one
        // telemetry_lost_in_transit per gap, their counts summing to the client's.
        let emitted_ids: HashSet<String> = self.emitted.iter().map(|l| id_of(l)).collect();
        let mut seen = HashSet::new();
        let (mut lost_reported, mut lost_envelopes, mut events) = (0, 0, 0u64);
        let mut ranges = Vec::new();
        for line in &self.egressed {
            let id = id_of(line);
            assert!(seen.insert(id.clone()), "egressed twice: {line}");
            match data_type(line).as_str() {
                "telemetry_lost_in_transit" => {
                    let d = &serde_json::from_str::<Value>(line).unwrap()["data"];
                    assert_eq!(d["session_id"], SESSION, "{line}");
                    assert_eq!(d["connection_id"], CONNECTION, "{line}");
                    let (from, to, n) = (
                        d["seq_from"].as_u64().unwrap(),
                        d["seq_to"].as_u64().unwrap(),
                        d["lost"].as_u64().unwrap(),
                    );
                    assert_eq!(n, to - from + 1, "{line}");
                    lost_reported += n;
                    lost_envelopes += 1;
                    assert_eq!(d["lost_total"].as_u64(), Some(lost_reported), "{line}");
                    ranges.push((from, to));
                }
                "telemetry_dropped" => {}
                _ => {
                    assert!(
                        emitted_ids.contains(&id),
                        "egressed but never emitted: {line}"
                    );
                    events += 1;
                }
            }
        }
        assert_eq!(lost_reported, lost, "{}", ctx());
        assert_eq!(lost_envelopes, self.client("transit_gaps"), "{}", ctx());
        assert_eq!(
            events,
            delivered,
            "every received event egressed\n{}",
            ctx()
        );
        assert!(
            self.client["runner_ended"] == true,
            "the client read the runner's telemetry_end\n{}",
            ctx()
        );
        (delivered, dropped, lost)
    }
}

/// `n` heartbeats of ~650 bytes a line, as `publish_event` requests to the ingest.
fn heartbeats(tag: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"event_type": "stream_heartbeat", "session_id": SESSION, "connection_id": CONNECTION,
                   "metadata": {"tag": tag, "i": i, "mode": "local", "pad": "h".repeat(400)}})
        })
        .collect()
}

/// One event of `event_type` (high priority unless a heartbeat).
fn event(event_type: &str, tag: &str, i: usize) -> Value {
    let mut e = json!({"event_type": event_type, "session_id": SESSION, "connection_id": CONNECTION,
                       "metadata": {"tag": tag, "i": i}});
    if event_type == "error" {
        e["error"] = json!({"error_type": "media_output_loop_failed", "message": format!("boom {i}"),
                            "exception_type": "RuntimeError", "recoverable": false});
    }
    e
}

/// Posts `rounds` of 500 heartbeats (tagged `tag{round}`), each followed by an `error` or a
/// `pipeline_loaded` event tagged `important`; returns those.
fn post_burst(r: &Relay, tag: &str, rounds: usize) -> Vec<Value> {
    let mut important = Vec::new();
    for round in 0..rounds {
        r.post(&heartbeats(&format!("{tag}{round}"), 500));
        let kind = if round % 2 == 0 {
            "error"
        } else {
            "pipeline_loaded"
        };
        let e = event(kind, "important", round);
        r.post(std::slice::from_ref(&e));
        important.push(e);
    }
    important
}

/// Waits until the client has relayed `n` telemetry envelopes.
fn wait_relayed(r: &Relay, n: u64) {
    wait_until(
        &format!("the client relays {n}"),
        Duration::from_secs(30),
        || r.client_counter("telemetry_received") >= n,
    );
}

/// Small segments, so a few hundred kilobytes are the whole 5-segment window.
const SMALL_SEGMENTS: &[&str] = &["--events-segment-bytes", "65536"];

#[test]
fn a_client_stalled_out_of_the_window_counts_every_lost_line_and_the_sums_close() {
    let mut flags = vec!["--no-flow-control", "--queue-capacity", "100000"];
    flags.extend_from_slice(SMALL_SEGMENTS);
    let r = Relay::start(&flags);
    r.post(&heartbeats("warm", 20));
    wait_relayed(&r, 21); // + the runner's runner_ready event
    let stopped_at = r.events_head();

    signal(r.client_pid(), "STOP");
    // ~3.9 MB: some 60 segments of 64 KiB, twelve times the server's window.
    r.post(&heartbeats("burst", 6000));
    wait_until(
        "the runner wrote the burst past the stopped client's window",
        Duration::from_secs(60),
        || r.events_head() >= stopped_at + 30,
    );
    signal(r.client_pid(), "CONT");
    r.post(&heartbeats("after", 20));

    let out = r.finish();
    let (delivered, dropped, lost) = out.check_accounting();
    eprintln!("delivered {delivered}, dropped {dropped}, lost in transit {lost}");
    assert!(
        lost > 0,
        "the client was forced out of the window\n{}",
        out.logs
    );
    assert!(out.client("events_skipped_segments") > 0, "{}", out.client);
    assert!(out.client("transit_gaps") >= 1);
}

#[test]
fn a_server_killed_while_the_client_reads_an_older_segment_loses_only_what_is_counted() {
    let mut flags = vec!["--no-flow-control", "--queue-capacity", "100000"];
    flags.extend_from_slice(SMALL_SEGMENTS);
    let (mut r, stopped_at) = Relay::start_warm(&flags);

    // The client stops mid-read; the runner writes three more segments past it.
    signal(r.client_pid(), "STOP");
    r.post(&heartbeats("behind", 350));
    wait_until(
        "the runner wrote past the stopped client",
        Duration::from_secs(30),
        || r.events_head() >= stopped_at + 3,
    );
    // The server dies with those segments; a new one takes its port, channels recreated.
    r.server.take().expect("server").kill9();
    r.server = Some(serve(r.addr, &[]));
    create_channel(&r.control);
    create_channel(&r.events);
    signal(r.client_pid(), "CONT");
    // The runner reconnects and writes on; the client follows it to the new server.
    let before = r.client_counter("telemetry_received");
    r.post(&heartbeats("after", 50));
    wait_until(
        "the client reads the runner's lines on the new server",
        Duration::from_secs(60),
        || r.client_counter("telemetry_received") >= before + 50,
    );

    let out = r.finish();
    let (delivered, dropped, lost) = out.check_accounting();
    eprintln!("delivered {delivered}, dropped {dropped}, lost in transit {lost}");
    assert!(
        lost > 0,
        "the segments the client had not read died with the server\n{}",
        out.logs
    );
}

#[test]
fn a_runner_restart_is_no_gap() {
    let mut r = Relay::start(&[]);
    r.post(&heartbeats("first", 30));
    wait_relayed(&r, 31);
    // The first runner dies (no telemetry_end); a new one takes over the same channels.
    r.runner.take().expect("runner").kill9();
    r.start_runner(&["--reset"]);
    r.post(&heartbeats("second", 30));
    wait_relayed(&r, 62);

    let out = r.finish();
    let ctx = || format!("client {}\n{}", out.client, out.logs);
    assert_eq!(out.client("lost_in_transit"), 0, "{}", ctx());
    assert_eq!(out.client("transit_gaps"), 0, "{}", ctx());
    assert_eq!(out.client("runner_restarts"), 1, "{}", ctx());
    assert_eq!(
        out.runners.len(),
        1,
        "only the second runner exited normally"
    );
    // Both runners' events were delivered, each once (the killed runner's emitted copy may have
    // died unflushed with it, so the test counts what it posted).
    let ids: HashSet<String> = out.egressed.iter().map(|l| id_of(l)).collect();
    assert_eq!(
        ids.len(),
        out.egressed.len(),
        "nothing egressed twice\n{}",
        ctx()
    );
    for tag in ["first", "second"] {
        let got: HashSet<u64> = out
            .egressed
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).expect("JSON line"))
            .filter(|v| v["data"]["tag"] == tag)
            .filter_map(|v| v["data"]["i"].as_u64())
            .collect();
        assert_eq!(
            got,
            (0..30).collect(),
            "every {tag} event delivered\n{}",
            ctx()
        );
    }
}

#[test]
fn flow_control_keeps_a_stalled_client_inside_the_window_and_every_lifecycle_and_error_arrives() {
    let (r, stopped_at) = Relay::start_warm(&["--events-segment-bytes", "262144"]);

    signal(r.client_pid(), "STOP");
    // ~13 MB of heartbeats (50 segments: ten times the window) with lifecycle and error events
    // among them, while the client does not read.
    let important = post_burst(&r, "flood", 40);
    let head = r.events_head();
    signal(r.client_pid(), "CONT");
    r.post(&heartbeats("after", 20));

    let out = r.finish();
    let (delivered, dropped, lost) = out.check_accounting();
    eprintln!(
        "delivered {delivered}, dropped {dropped} (shed at the runner), lost in transit {lost}; the runner wrote {} segment(s) while the client was stopped",
        head - stopped_at
    );
    let ctx = || {
        format!(
            "runner {:?}\nclient {}\n{}",
            out.runners, out.client, out.logs
        )
    };
    assert_eq!(lost, 0, "flow control: nothing lost in transit\n{}", ctx());
    assert_eq!(out.client("events_skipped_segments"), 0, "{}", ctx());
    assert!(dropped > 0, "the runner shed heartbeats instead\n{}", ctx());
    assert_eq!(
        out.sum("dropped_high"),
        0,
        "only heartbeats shed\n{}",
        ctx()
    );
    let got: Vec<String> = out
        .egressed
        .iter()
        .filter(|l| l.contains(r#""tag":"important""#))
        .cloned()
        .collect();
    assert_eq!(
        got.len(),
        important.len(),
        "every lifecycle and error event\n{}",
        ctx()
    );
}

#[test]
fn flow_control_with_a_deep_runner_queue_loses_nothing_even_when_the_runner_stops_with_it_full() {
    // The large queue with which the overload bench lost 32k-40k events a run in transit.
    let mut flags = vec!["--queue-capacity", "100000"];
    flags.extend_from_slice(SMALL_SEGMENTS);
    let (mut r, stopped_at) = Relay::start_warm(&flags);

    // A slow egress under a burst: the client stops reading while ~4 MB (60 segments of 64 KiB,
    // twelve times the server's window) is queued in the runner, lifecycle and error events
    // among the heartbeats.
    signal(r.client_pid(), "STOP");
    let important = post_burst(&r, "burst", 12);
    // The runner stops with its queue full and the client still stopped. Its closing drain must
    // not write the queue past the client's window (it wrote it all at once before).
    r.terminate_runner();
    wait_until(
        "the stopping runner holds its queue to the client's reading",
        Duration::from_secs(30),
        || {
            r.runner_log()
                .contains("the queued telemetry goes out as the client reads it")
        },
    );
    let head = r.events_head();
    signal(r.client_pid(), "CONT");

    let out = r.finish();
    let (delivered, dropped, lost) = out.check_accounting();
    eprintln!(
        "delivered {delivered}, dropped {dropped}, lost in transit {lost}; the runner was {} segment(s) ahead when it stopped",
        head - stopped_at
    );
    let ctx = || {
        format!(
            "runner {:?}\nclient {}\n{}",
            out.runners, out.client, out.logs
        )
    };
    assert!(
        head - stopped_at <= 4,
        "the runner stayed inside the stopped client's window (5 segments)\n{}",
        ctx()
    );
    assert_eq!(lost, 0, "flow control: nothing lost in transit\n{}", ctx());
    assert_eq!(out.client("events_skipped_segments"), 0, "{}", ctx());
    assert_eq!(
        out.sum("dropped_high"),
        0,
        "no lifecycle or error event shed\n{}",
        ctx()
    );
    // The queue held the burst, and the client read all of it once it came back.
    assert_eq!(
        (delivered, dropped),
        (out.sum("emitted"), 0),
        "the whole queue delivered\n{}",
        ctx()
    );
    let got = out
        .egressed
        .iter()
        .filter(|l| l.contains(r#""tag":"important""#))
        .count();
    assert_eq!(
        got,
        important.len(),
        "every lifecycle and error event\n{}",
        ctx()
    );
}
