//! Faults over real processes: peers that stall, and a trickle server killed mid-stream.

use serde_json::Value;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_trickle-relay");

/// A child process killed when the test ends, whatever happens.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn spawn(args: &[&str], stderr: Option<&Path>) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args(args).env("RUST_LOG", "info").stdin(Stdio::null());
        if let Some(path) = stderr {
            cmd.stderr(Stdio::from(
                std::fs::File::create(path).expect("stderr file"),
            ));
        }
        Proc(cmd.spawn().expect("spawn trickle-relay"))
    }

    /// Resident memory now, in KiB (Linux).
    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).expect("status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS");
        line.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("VmRSS value")
    }

    /// SIGKILL, and reap.
    fn kill9(mut self) {
        self.0.kill().expect("kill -9");
        let _ = self.0.wait();
    }

    /// Waits for the process to exit on its own; fails the test after `timeout`.
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve(addr: SocketAddr, extra: &[&str]) -> Proc {
    let listen = addr.to_string();
    let mut args = vec!["serve", "--listen", &listen, "--autocreate"];
    args.extend_from_slice(extra);
    let p = Proc::spawn(&args, None);
    wait_until(
        &format!("{addr} listening"),
        Duration::from_secs(20),
        || TcpStream::connect(addr).is_ok(),
    );
    p
}

/// One request on a fresh connection; the answer's status line and body, as text.
fn request(addr: SocketAddr, req: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn stalled_subscriber_and_silent_publishers_keep_server_memory_bounded() {
    const SEGMENT: usize = 4 << 20;
    const SEGMENTS: usize = 20;
    let addr = free_addr();
    let server = serve(addr, &["--max-segment-bytes", &(8 << 20).to_string()]);
    assert!(
        request(addr, b"POST /ch HTTP/1.1\r\nConnection: close\r\n\r\n")
            .starts_with("HTTP/1.1 200")
    );
    let base = server.rss_kib();

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
    // A publisher pushes 20 segments of 4 MiB (80 MiB) past the stalled readers.
    let payload = vec![b'x'; SEGMENT];
    let mut peak = base;
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
        peak = peak.max(server.rss_kib());
    }
    let after = server.rss_kib();
    eprintln!(
        "serve RSS: {base} KiB idle, peak {peak} KiB, {after} KiB after {SEGMENTS} x {} MiB with 4 stalled readers and 200 silent publishers",
        SEGMENT >> 20
    );
    // The server keeps 5 segments per channel; stalled readers must not pin the rest.
    assert!(
        peak < base + 64 * 1024,
        "RSS grew from {base} KiB to {peak} KiB: more than the 5-segment window"
    );
    // It still serves: the live edge is the 20th segment.
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

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("report is JSON")
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// What one kill-and-restart run saw.
struct Outage {
    sent: Vec<String>,
    got: Vec<String>,
    runner: Value,
    client: Value,
    recovered_after: Option<Duration>,
    logs: String,
}

/// Runner and client relaying heartbeats through a `serve` that is SIGKILLed after `run_for`
/// and restarted on the same port `down_for` later, its channels recreated (as an orchestrator
/// would).
fn kill_server_mid_stream(run_for: Duration, down_for: Duration) -> Outage {
    let addr = free_addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = serve(addr, &[]);
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let control = format!("http://{addr}/{tag}-control");
    let events = format!("http://{addr}/{tag}-events");
    let create = |url: &str| {
        let status = reqwest::blocking::Client::new()
            .post(url)
            .header("Expect-Content", "application/jsonl")
            .send()
            .expect("create channel")
            .status();
        assert!(status.is_success(), "creating {url}: {status}");
    };
    create(&control);
    create(&events);
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
            "--emitted-file",
            runner_out.to_str().unwrap(),
            "--report",
            runner_report.to_str().unwrap(),
        ],
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
    let duration = (run_for + down_for + Duration::from_secs(6))
        .as_secs()
        .to_string();
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
            "--duration-secs",
            &duration,
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
    while restarted.elapsed() < Duration::from_secs(5) {
        if relayed() > before + 20 {
            recovered_after = Some(restarted.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let client_status = client.wait(Duration::from_secs(60));
    let runner_status = runner.wait(Duration::from_secs(30));
    assert!(client_status.success(), "client failed");
    assert!(runner_status.success(), "runner failed");
    let logs = format!(
        "--- runner\n{}\n--- client\n{}",
        std::fs::read_to_string(p("runner.err")).unwrap_or_default(),
        std::fs::read_to_string(p("client.err")).unwrap_or_default()
    );
    Outage {
        sent: read_lines(&runner_out),
        got: read_lines(&client_out),
        runner: read_json(&runner_report),
        client: read_json(&client_report),
        recovered_after,
        logs,
    }
}

/// What every outage must satisfy: nothing panics, nothing is duplicated or invented, and the
/// drops the runner counted are the drops the client was told of. Returns how many emitted
/// envelopes neither arrived nor were counted.
fn check_accounting(name: &str, o: &Outage) -> u64 {
    let quiet: String = o
        .logs
        .lines()
        .filter(|l| !l.contains("TELEMETRY"))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!(
        "{name}: recovered after {:?}; sent {}, got {}\nrunner {}\nclient {}\n{quiet}",
        o.recovered_after,
        o.sent.len(),
        o.got.len(),
        o.runner,
        o.client
    );
    assert!(!o.logs.contains("panicked"), "a process panicked");
    let id = |l: &String| -> String {
        serde_json::from_str::<Value>(l).expect("JSON line")["id"]
            .as_str()
            .unwrap_or_default()
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
    let dropped = o.runner["dropped"].as_u64().unwrap_or(0);
    assert_eq!(
        o.client["dropped_reported"].as_u64(),
        Some(dropped),
        "every drop the runner counted was reported downstream"
    );
    let uncounted = lost.saturating_sub(dropped);
    eprintln!("{name}: lost {lost}, counted {dropped}, uncounted {uncounted}");
    uncounted
}

/// A short outage: runner and client resume on their own (the publisher retries the interrupted
/// segment, the subscriber retries its request). What can be lost: the lines the old server had
/// received but not yet passed to the client when it died (the client moves on to the next
/// segment, the runner re-posts the old one); seen: 0 in most runs, 1 of ~460 in some.
#[test]
fn server_killed_briefly_mid_stream_resumes_losing_at_most_the_lines_in_flight() {
    let o = kill_server_mid_stream(Duration::from_secs(2), Duration::from_millis(200));
    let uncounted = check_accounting("kill -9, down 0.2 s", &o);
    assert!(
        o.recovered_after.is_some(),
        "the relay did not resume after the restart"
    );
    // Heartbeats every 20 ms: 25 is half a second of them, far more than are ever in flight.
    assert!(
        uncounted <= 25,
        "{uncounted} envelopes lost without being counted in a 0.2 s outage"
    );
}

/// Today's behaviour when the server stays down past the clients' retry budget (subscriber: 5
/// attempts 500 ms apart; publisher: 3 failed segments): the runner's control subscription fails
/// and the runner ends the session; the client's events subscription fails and its events loop
/// ends. Both exit cleanly, nothing is duplicated or invented, but the envelopes in flight are
/// lost and only part of the loss is counted (see RELIABILITY.md, "not covered yet").
#[test]
fn server_down_past_the_retry_budget_ends_the_session_cleanly() {
    let o = kill_server_mid_stream(Duration::from_secs(2), Duration::from_secs(3));
    let quiet: String = o
        .logs
        .lines()
        .filter(|l| !l.contains("TELEMETRY"))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!(
        "kill -9, down 3 s: recovered after {:?}; sent {}, got {}\nrunner {}\nclient {}\n{quiet}",
        o.recovered_after,
        o.sent.len(),
        o.got.len(),
        o.runner,
        o.client
    );
    assert!(!o.logs.contains("panicked"), "a process panicked");
    let sent: HashSet<&str> = o.sent.iter().map(String::as_str).collect();
    let mut seen = HashSet::new();
    for line in &o.got {
        assert!(seen.insert(line.as_str()), "egressed twice: {line}");
        if !line.contains("\"type\":\"telemetry_dropped\"") {
            let original = line.replacen(",\"relayed_via\":\"trickle\"}", "}", 1);
            assert!(
                sent.contains(original.as_str()),
                "egressed but never emitted: {line}"
            );
        }
    }
    assert!(o.got.len() <= o.sent.len());
    assert!(
        o.logs.contains("control subscription failed")
            && o.logs.contains("events subscription failed"),
        "expected both subscriptions to give up"
    );
}
