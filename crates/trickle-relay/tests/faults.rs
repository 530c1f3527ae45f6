//! Faults over real processes: peers that stall, and a trickle server killed mid-stream.
//!
//! The outage tests run `serve`, `runner` and `client` as separate processes, SIGKILL the server
//! mid-stream and restart it on the same port (channels recreated, as an orchestrator would), and
//! then account for every envelope: what the runner emitted (`--emitted-file`), what the client
//! egressed, what the runner counted as dropped and what the client was told of.

mod common;

use common::{free_addr, read_json, read_lines, serve, wait_until, Proc};
use serde_json::Value;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One request on a fresh connection; the answer's status line and body, as text.
fn request(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The server keeps the last 5 segments of a channel (the reference server's ring); an older
/// one is evicted and its data dropped, even while a reader is stuck on it. So however much is
/// published past readers that never read, the server holds about 5 segments: bounded here by
/// the window plus two segments of slack (the one being received, allocator reuse) and 8 MiB,
/// with 15 times that window published.
#[test]
fn stalled_subscriber_and_silent_publishers_keep_server_memory_bounded() {
    const SEGMENT: usize = 4 << 20;
    const WINDOW: usize = 5;
    const SEGMENTS: usize = 15 * WINDOW;
    let addr = free_addr();
    let server = serve(addr, &["--max-segment-bytes", &(8 << 20).to_string()]);
    assert!(
        request(addr, b"POST /ch HTTP/1.1\r\nConnection: close\r\n\r\n")
            .starts_with("HTTP/1.1 200")
    );
    let base = server.rss_kib().expect("serve RSS");

    // Subscribers that ask for segments and then never read a byte.
    let mut stalled: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut s = TcpStream::connect(addr).expect("connect");
            write!(s, "GET /ch/{i} HTTP/1.1\r\n\r\n").expect("write");
            s
        })
        .collect();
    // Publishers that open a segment (chunked, preconnected) and never send a byte of it.
    let silent: Vec<TcpStream> = (100..300)
        .map(|i| {
            let mut s = TcpStream::connect(addr).expect("connect");
            write!(
                s,
                "POST /ch{i}/0 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            .expect("write");
            s
        })
        .collect();
    // A publisher pushes 75 segments of 4 MiB (300 MiB) past the stalled readers.
    let payload = vec![b'x'; SEGMENT];
    for seq in 0..SEGMENTS {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "POST /ch/{seq} HTTP/1.1\r\nContent-Length: {SEGMENT}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        s.write_all(&payload).expect("publish segment");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    // The kernel's high-water mark: the true peak, not a sample between segments.
    let peak = server.peak_rss_kib().expect("serve peak RSS");
    let after = server.rss_kib().expect("serve RSS");
    let window_kib = (WINDOW * SEGMENT / 1024) as u64;
    let bound = base + window_kib + 2 * (SEGMENT / 1024) as u64 + 8 * 1024;
    eprintln!(
        "serve RSS: {base} KiB idle, peak {peak} KiB (+{} KiB; the {WINDOW}-segment window is {window_kib} KiB, bound +{} KiB), {after} KiB after {SEGMENTS} x {} MiB with 4 stalled readers and 200 silent publishers",
        peak - base,
        bound - base,
        SEGMENT >> 20
    );
    assert!(
        peak <= bound,
        "RSS grew from {base} KiB to {peak} KiB: more than the {WINDOW}-segment window ({window_kib} KiB) and slack"
    );
    // It still serves: the live edge is the last segment.
    let next = request(addr, b"GET /ch/next HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
    assert!(next.ends_with(&SEGMENTS.to_string()), "{next}");
    // A stalled reader that finally reads gets an HTTP answer for its segment, not garbage.
    let mut head = [0u8; 12];
    stalled[0]
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stalled[0].read_exact(&mut head);
    assert!(head.starts_with(b"HTTP/1.1 "), "{head:?}");
    drop(silent);
}

/// What one kill-and-restart run saw.
struct Outage {
    sent: Vec<String>,
    got: Vec<String>,
    runner: Value,
    client: Value,
    recovered_after: Option<Duration>,
    runner_log: String,
    client_log: String,
}

impl Outage {
    fn logs(&self) -> String {
        format!(
            "--- runner\n{}\n--- client\n{}",
            self.runner_log, self.client_log
        )
    }
}

/// Runner and client relaying heartbeats (every 20 ms) through a `serve` that is SIGKILLed after
/// `run_for` and restarted on the same port `down_for` later, its channels recreated (as an
/// orchestrator would). Both run with `--reconnect-secs reconnect_secs`.
fn kill_server_mid_stream(
    run_for: Duration,
    down_for: Duration,
    reconnect_secs: &str,
    runner_extra: &[&str],
) -> Outage {
    let addr = free_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(addr, &[]);
    let (control, events) = common::create_session_channels(addr);
    let create = common::create_channel;
    let p = |n: &str| dir.path().join(n);
    let (runner_out, client_out) = (p("runner.jsonl"), p("client.jsonl"));
    let (runner_report, client_report) = (p("runner.json"), p("client.json"));
    let mut runner = Proc::spawn(
        &[
            "runner",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--session-id",
            "s",
            "--connection-id",
            "c",
            "--heartbeat-ms",
            "20",
            "--no-forward-logs",
            "--reconnect-secs",
            reconnect_secs,
            "--emitted-file",
            runner_out.to_str().unwrap(),
            "--report",
            runner_report.to_str().unwrap(),
        ]
        .iter()
        .chain(runner_extra)
        .copied()
        .collect::<Vec<_>>(),
        Some(&p("runner.err")),
    );
    let client_http = free_addr();
    let relayed = || -> u64 {
        reqwest::blocking::Client::new()
            .get(format!("http://{client_http}/health"))
            .timeout(Duration::from_secs(2))
            .send()
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .and_then(|h| h["client"]["relayed"].as_u64())
            .unwrap_or(0)
    };
    let mut client = Proc::spawn(
        &[
            "client",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--session-id",
            "s",
            "--connection-id",
            "c",
            "--egress",
            "file",
            "--egress-file",
            client_out.to_str().unwrap(),
            "--start-stream",
            "{}",
            "--reconnect-secs",
            reconnect_secs,
            "--report",
            client_report.to_str().unwrap(),
            "--http",
            &client_http.to_string(),
        ],
        Some(&p("client.err")),
    );
    wait_until(
        "heartbeats flow to the client",
        Duration::from_secs(20),
        || relayed() >= 20,
    );
    std::thread::sleep(run_for);
    let before = relayed();
    server.kill9();
    std::thread::sleep(down_for);
    let _server = serve(addr, &[]);
    create(&control);
    create(&events);
    let restarted = Instant::now();
    let mut recovered_after = None;
    if reconnect_secs != "0" {
        while restarted.elapsed() < Duration::from_secs(5) {
            if relayed() > before + 20 {
                recovered_after = Some(restarted.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The test's condition holds (or never will): end the session as an operator would. The
        // client stops the stream and closes its control channel; the runner drains its sink
        // (a final `telemetry_dropped` when it dropped anything) and closes the events channel,
        // which the client reads to its end.
        client.terminate();
    }
    // With no reconnect window both sides end by themselves once their retries run out.
    let client_status = client.wait(Duration::from_secs(60));
    let runner_status = runner.wait(Duration::from_secs(30));
    let runner_log = std::fs::read_to_string(p("runner.err")).unwrap_or_default();
    let client_log = std::fs::read_to_string(p("client.err")).unwrap_or_default();
    assert!(client_status.success(), "client failed\n{client_log}");
    assert!(runner_status.success(), "runner failed\n{runner_log}");
    Outage {
        sent: read_lines(&runner_out),
        got: read_lines(&client_out),
        runner: read_json(&runner_report),
        client: read_json(&client_report),
        recovered_after,
        runner_log,
        client_log,
    }
}

/// What one outage lost, against what the runner counted as dropped.
struct Accounting {
    /// Emitted envelopes that never reached the client's egress.
    lost: u64,
    /// The runner's drop count (`dropped` in its report).
    counted: u64,
}

/// What every outage must satisfy: nothing panics, nothing is duplicated or invented, and (when
/// `reported`: the events channel came back) the drops the runner counted are the drops the
/// client was told of. Prints the figures; returns what was lost and what was counted.
fn check_accounting(name: &str, o: &Outage, reported: bool) -> Accounting {
    let logs = o.logs();
    let quiet: String = logs
        .lines()
        .filter(|l| {
            !l.contains("TELEMETRY")
                && (l.contains("WARN") || l.contains("ERROR") || l.contains("reconnected"))
        })
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("{name}:\nrunner {}\nclient {}\n{quiet}", o.runner, o.client);
    assert!(!logs.contains("panicked"), "a process panicked\n{logs}");
    assert!(!o.sent.is_empty(), "the runner emitted nothing\n{logs}");
    let id = |l: &String| -> String {
        serde_json::from_str::<Value>(l).expect("JSON line")["id"]
            .as_str()
            .expect("an envelope id")
            .to_string()
    };
    let sent_ids: HashSet<String> = o.sent.iter().map(id).collect();
    let mut got_ids = HashSet::new();
    for line in &o.got {
        let i = id(line);
        assert!(got_ids.insert(i.clone()), "egressed twice: {line}");
        if !line.contains("\"type\":\"telemetry_dropped\"") {
            assert!(sent_ids.contains(&i), "egressed but never emitted: {line}");
        }
    }
    let lost = sent_ids.iter().filter(|i| !got_ids.contains(*i)).count() as u64;
    let counted = o.runner["dropped"]
        .as_u64()
        .unwrap_or_else(|| panic!("no `dropped` in the runner's report: {}", o.runner));
    if reported {
        assert_eq!(
            o.client["dropped_reported"].as_u64(),
            Some(counted),
            "every drop the runner counted was reported downstream"
        );
    }
    eprintln!(
        "{name}: sent {}, got {}, lost {lost}, counted {counted}, recovered after {:?}",
        o.sent.len(),
        o.got.len(),
        o.recovered_after
    );
    Accounting { lost, counted }
}

/// How many times `log` warns that the trickle server is unreachable (once per outage per
/// channel is the goal, not once per attempt).
fn outage_warnings(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("WARN") && l.contains("trickle server unreachable"))
        .count()
}

/// With the default queues (telemetry 256, events writer 8192 lines) an outage of a few seconds
/// at 50 heartbeats a second fits in them: nothing may be lost, and nothing dropped either.
fn assert_nothing_lost_or_dropped(a: &Accounting, o: &Outage) {
    assert_eq!(
        (a.lost, a.counted),
        (0, 0),
        "(lost, dropped) with queues large enough for the outage\n{}",
        o.logs()
    );
}

/// An outage past the clients' retry budget (subscriber: 5 attempts 500 ms apart; publisher: 3
/// failed segments): with the default reconnect window both sides reconnect by themselves and
/// resume where they broke off. The runner's events publisher re-sends its open segment on the
/// same seq; the client resumes that segment at the byte where it broke off; the runner's control
/// subscription reconnects the same way. Envelopes emitted meanwhile wait in the events writer's
/// queue, which holds the whole outage: nothing is lost or dropped.
fn long_outage(down_for: Duration) {
    let name = format!("kill -9, down {down_for:?}");
    let o = kill_server_mid_stream(Duration::from_secs(2), down_for, "60", &[]);
    let a = check_accounting(&name, &o, true);
    let logs = o.logs();
    assert!(
        o.recovered_after.is_some(),
        "the relay did not resume within 5 s of the restart\n{logs}"
    );
    assert!(
        !logs.contains("control subscription failed")
            && !logs.contains("events subscription failed"),
        "a subscription gave up instead of reconnecting\n{logs}"
    );
    assert!(
        o.runner["control_reconnects"].as_u64() >= Some(1),
        "the runner's control subscription reconnected: {}",
        o.runner
    );
    assert!(
        o.client["events_reconnects"].as_u64() >= Some(1),
        "the client's events subscription reconnected: {}",
        o.client
    );
    assert!(
        o.runner["events_reconnects"].as_u64() >= Some(1),
        "the runner's events publisher reconnected: {}",
        o.runner
    );
    // One warning per channel per outage (runner: control + events + the stream's media `in`
    // and `out`; client: events + control).
    for (who, log, channels) in [("runner", &o.runner_log, 4), ("client", &o.client_log, 2)] {
        let n = outage_warnings(log);
        assert!(
            (1..=channels).contains(&n),
            "{who} warned {n} times about the outage\n{log}"
        );
    }
    assert_nothing_lost_or_dropped(&a, &o);
}

/// A short outage: the publisher re-sends the interrupted segment, the client resumes it at the
/// byte where it broke off, and the preconnected requests retry: nothing is lost or dropped.
#[test]
fn server_killed_briefly_mid_stream_resumes_losing_nothing() {
    let o = kill_server_mid_stream(
        Duration::from_secs(2),
        Duration::from_millis(200),
        "60",
        &[],
    );
    let a = check_accounting("kill -9, down 0.2 s", &o, true);
    assert!(
        o.recovered_after.is_some(),
        "the relay did not resume after the restart\n{}",
        o.logs()
    );
    assert_nothing_lost_or_dropped(&a, &o);
}

/// Down 3 s: past the subscriber's 2.5 s retry budget.
#[test]
fn server_down_3s_both_sides_reconnect_and_lose_nothing() {
    long_outage(Duration::from_secs(3));
}

/// Down 8 s: well past every retry budget, and the reconnect backoff reaches its 2 s cap.
#[test]
fn server_down_8s_both_sides_reconnect_and_lose_nothing() {
    long_outage(Duration::from_secs(8));
}

/// `--reconnect-secs 0` keeps the reference behaviour: past the retry budget the runner's control
/// subscription fails and the runner ends the session; the client's events loop ends. Both exit
/// cleanly, nothing is duplicated or invented, and every envelope lost is counted by the runner
/// (its count is an upper bound: a failed segment's answers and log batches count too).
#[test]
fn reconnect_window_0_ends_the_session_when_the_server_stays_down() {
    let o = kill_server_mid_stream(Duration::from_secs(2), Duration::from_secs(3), "0", &[]);
    // The events channel never comes back, so the runner's count cannot reach the client.
    let a = check_accounting("kill -9, down 3 s, --reconnect-secs 0", &o, false);
    let logs = o.logs();
    assert!(
        logs.contains("control subscription failed") && logs.contains("events subscription failed"),
        "expected both subscriptions to give up\n{logs}"
    );
    assert!(
        a.lost <= a.counted,
        "{} envelopes lost but only {} counted by the runner\n{logs}",
        a.lost,
        a.counted
    );
}

/// Down 3 s with small queues (events writer: 16 lines, telemetry: 16 events) at 50 heartbeats a
/// second: the runner's telemetry cannot wait out the outage, so its sink sheds heartbeats, never
/// blocking, and counts them; once the server is back the count reaches the client in
/// `telemetry_dropped`. Every envelope either arrives or is counted, exactly.
#[test]
fn server_down_3s_with_small_queues_sheds_and_reports_every_drop() {
    let o = kill_server_mid_stream(
        Duration::from_secs(2),
        Duration::from_secs(3),
        "60",
        &["--queue-capacity", "16", "--events-queue-lines", "16"],
    );
    let a = check_accounting("kill -9, down 3 s, small queues", &o, true);
    let logs = o.logs();
    assert!(o.recovered_after.is_some(), "did not resume\n{logs}");
    assert!(
        a.counted > 0,
        "3 s of heartbeats cannot fit in 32 slots: {}",
        o.runner
    );
    assert_eq!(
        a.lost, a.counted,
        "every shed envelope counted once, nothing else\n{logs}"
    );
}
