//! End to end over real processes: a `trickle-relay serve`, a `trickle-relay runner` and a
//! `trickle-relay client`, talking over loopback TCP (and over HTTPS, with the server's own
//! self-signed certificate).

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;
use common::{free_addr, read_json, read_lines, unrelay_or_fail, wait_listening, wait_until, Proc};

/// A trickle server process with autocreate, and two fresh channels on it.
struct Setup {
    _server: Proc,
    control: String,
    events: String,
    dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let addr = free_addr();
    let server = Proc::spawn(
        &["serve", "--listen", &addr.to_string(), "--autocreate"],
        None,
    );
    wait_listening(addr);
    let (control, events) = common::create_session_channels(addr);
    Setup {
        _server: server,
        control,
        events,
        dir: tempfile::tempdir().expect("tempdir"),
    }
}

/// [`setup`] over HTTPS: the server makes a self-signed certificate and writes it to
/// `cert.pem` in the setup's directory (returned too), for clients to pin.
fn setup_https() -> (Setup, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("cert.pem");
    let addr = free_addr();
    let server = Proc::spawn(
        &[
            "serve",
            "--listen",
            &addr.to_string(),
            "--autocreate",
            "--tls-self-signed",
            "--tls-cert-out",
            cert.to_str().unwrap(),
        ],
        None,
    );
    wait_listening(addr);
    let (control, events) = common::create_session_channels_at(&format!("https://{addr}"));
    let setup = Setup {
        _server: server,
        control,
        events,
        dir,
    };
    (setup, cert)
}

fn data_type(line: &str) -> String {
    let v: Value = serde_json::from_str(line).expect("egressed line is JSON");
    v["data"]["type"].as_str().unwrap_or_default().to_string()
}

fn path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// The client's counters (`GET /health` on its `--http` address); fails the test when it does not
/// answer.
fn client_health(http: SocketAddr) -> Value {
    let health: Value = reqwest::blocking::Client::new()
        .get(format!("http://{http}/health"))
        .timeout(Duration::from_secs(10))
        .send()
        .expect("client /health")
        .json()
        .expect("client /health answers JSON");
    assert!(health["client"].is_object(), "{health}");
    health["client"].clone()
}

/// The counter `key` of the client's `/health`; a missing one fails the test.
fn counter(client: &Value, key: &str) -> u64 {
    client[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter `{key}` in {client}"))
}

fn post_ingest(addr: SocketAddr, body: String) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let http = reqwest::blocking::Client::new();
    loop {
        match http
            .post(format!("http://{addr}/v1/events"))
            .body(body.clone())
            .send()
        {
            Ok(r) => return r.json().expect("ingest answers JSON"),
            Err(e) => {
                assert!(Instant::now() < deadline, "ingest unreachable: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn three_processes_relay_every_event_verbatim_and_in_order() {
    relay_every_event_verbatim_and_in_order(setup(), &[], &[]);
}

/// The same session over HTTPS: the runner accepts the server's self-signed certificate as the
/// reference clients do (the default), the client pins it with `--trickle-ca`.
#[test]
fn three_processes_relay_every_event_over_https() {
    let (s, cert) = setup_https();
    assert!(s.control.starts_with("https://"), "{}", s.control);
    let cert = cert.to_str().unwrap().to_string();
    relay_every_event_verbatim_and_in_order(s, &[], &["--trickle-ca", &cert]);
}

/// A runner (plus `runner_flags`) and a client (plus `client_flags`) on `s`'s channels: every
/// envelope the runner emitted is egressed verbatim, in order, and the counts add up.
fn relay_every_event_verbatim_and_in_order(s: Setup, runner_flags: &[&str], client_flags: &[&str]) {
    let (runner_out, client_out) = (path(&s.dir, "runner.jsonl"), path(&s.dir, "client.jsonl"));
    let (runner_report, client_report) = (path(&s.dir, "runner.json"), path(&s.dir, "client.json"));
    let (ingest, client_http) = (free_addr(), free_addr());
    let (ingest_s, client_http_s) = (ingest.to_string(), client_http.to_string());
    let (session, connection) = ("sess-e2e", "conn-e2e");
    let mut args = vec![
        "runner",
        "--control-url",
        &s.control,
        "--events-url",
        &s.events,
        "--session-id",
        session,
        "--connection-id",
        connection,
        "--heartbeat-ms",
        "20",
        "--ingest",
        &ingest_s,
        "--emitted-file",
        runner_out.to_str().unwrap(),
        "--report",
        runner_report.to_str().unwrap(),
    ];
    args.extend_from_slice(runner_flags);
    let mut runner = Proc::spawn(&args, None);
    let mut args = vec![
        "client",
        "--control-url",
        &s.control,
        "--events-url",
        &s.events,
        "--session-id",
        session,
        "--connection-id",
        connection,
        "--egress",
        "file",
        "--egress-file",
        client_out.to_str().unwrap(),
        "--start-stream",
        r#"{"pipeline_id":"passthrough"}"#,
        "--report",
        client_report.to_str().unwrap(),
        "--http",
        &client_http_s,
    ];
    args.extend_from_slice(client_flags);
    let mut client = Proc::spawn(&args, None);

    // A local process hands the runner envelopes it built itself, and publish_event requests.
    let built: Vec<String> = (0..50)
        .map(|i| {
            json!({"id": uuid::Uuid::new_v4().to_string(), "type": "stream_trace", "timestamp": format!("{}", 1_700_000_000_000u64 + i),
                   "data": {"type": "pipeline_loaded", "client_source": "scope", "timestamp": format!("{}", 1_700_000_000_000u64 + i),
                            "session_id": session, "connection_id": connection, "seq": i}})
            .to_string()
        })
        .collect();
    let answer = post_ingest(ingest, built.join("\n"));
    assert_eq!(answer["accepted"], 50, "{answer}");
    let requests: Vec<String> = (0..50)
        .map(|i| json!({"event_type": "notification_sent", "session_id": session, "connection_id": connection, "metadata": {"seq": i}}).to_string())
        .collect();
    let answer = post_ingest(ingest, requests.join("\n"));
    assert_eq!(answer["accepted"], 50, "{answer}");

    let http = reqwest::blocking::Client::new();
    let status = http
        .post(format!("http://{ingest}/v1/notifications"))
        .body(r#"{"kind":"pipeline_status","text":"warming up"}"#)
        .send()
        .expect("notify")
        .status();
    assert_eq!(status.as_u16(), 202);

    // The runner took all of it; once the client has the notification and the stream has run a
    // while (100 ingested + lifecycle + a few dozen heartbeats relayed), end the session as an
    // operator would: the client stops the stream, and both sides drain what is in flight.
    wait_listening(client_http);
    wait_until(
        "the notification and 120 envelopes at the client",
        Duration::from_secs(40),
        || {
            let c = client_health(client_http);
            counter(&c, "notifications") >= 1 && counter(&c, "relayed") >= 120
        },
    );
    client.terminate();
    assert!(
        client.wait(Duration::from_secs(40)).success(),
        "client failed"
    );
    assert!(
        runner.wait(Duration::from_secs(20)).success(),
        "runner failed"
    );

    let sent = read_lines(&runner_out);
    let got = read_lines(&client_out);
    let runner = read_json(&runner_report);
    let client = read_json(&client_report);
    eprintln!(
        "runner {runner}\nclient {client}\nsent {} got {}",
        sent.len(),
        got.len()
    );

    // Every envelope the runner emitted arrived byte for byte, plus the relay's two annotations
    // inside `data`, stamped when the client received it (not before the runner emitted it).
    let originals: Vec<String> = got
        .iter()
        .map(|g| {
            let (original, received) = unrelay_or_fail(g);
            let ts: u64 = serde_json::from_str::<Value>(&original).unwrap()["timestamp"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                received >= ts,
                "received {received} before it was emitted {ts}: {g}"
            );
            original
        })
        .collect();
    let got_set: std::collections::HashSet<&str> = originals.iter().map(String::as_str).collect();
    for line in &sent {
        assert!(
            got_set.contains(line.as_str()),
            "not egressed verbatim: {line}"
        );
    }
    // The envelopes a local process built kept their id, timestamps and ids, in order.
    let positions: Vec<usize> = built
        .iter()
        .map(|b| {
            originals
                .iter()
                .position(|g| g == b)
                .expect("built envelope egressed verbatim")
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "order kept");
    // Lifecycle of the simulated session is all there.
    let types: Vec<String> = got.iter().map(|l| data_type(l)).collect();
    for t in [
        "runner_ready",
        "session_created",
        "stream_started",
        "stream_heartbeat",
        "stream_stopped",
        "session_closed",
    ] {
        assert!(types.iter().any(|x| x == t), "missing {t}");
    }
    // In the seed's shapes: runner_ready and session_created say `mode: livepeer` (the former
    // with the cold start), heartbeats carry the seed's fields with `mode: local`, cumulative.
    let data_of = |t: &str| -> Vec<Value> {
        got.iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["data"].clone())
            .filter(|d| d["type"] == t)
            .collect()
    };
    let ready = &data_of("runner_ready")[0];
    assert_eq!(ready["mode"], "livepeer", "{ready}");
    assert!(ready["startup_ms"].is_u64(), "{ready}");
    assert_eq!(data_of("session_created")[0]["mode"], "livepeer");
    let beats = data_of("stream_heartbeat");
    for hb in &beats {
        assert_eq!(hb["mode"], "local", "{hb}");
        for key in [
            "frames_in",
            "frames_out",
            "fps_in",
            "fps_out",
            "elapsed_ms",
            "since_last_heartbeat_ms",
            "pipeline_fps",
        ] {
            assert!(hb[key].is_number(), "heartbeat without {key}: {hb}");
        }
    }
    let elapsed: Vec<u64> = beats
        .iter()
        .map(|b| b["elapsed_ms"].as_u64().unwrap())
        .collect();
    assert!(
        elapsed.windows(2).all(|w| w[0] <= w[1]),
        "cumulative: {elapsed:?}"
    );
    // The counts add up: emitted = egressed + counted drops.
    let dropped = runner["dropped"].as_u64().unwrap();
    assert_eq!(runner["emitted"].as_u64().unwrap(), sent.len() as u64);
    let reports = types.iter().filter(|t| *t == "telemetry_dropped").count() as u64;
    assert_eq!(sent.len() as u64, got.len() as u64 - reports + dropped);
    assert_eq!(client["egressed"].as_u64().unwrap(), got.len() as u64);
    assert_eq!(client["rejected_foreign"], 0);
    assert_eq!(client["bad_lines"], 0);
    assert_eq!(
        client["notifications"], 1,
        "the local process's notification reached the client"
    );
}

#[test]
fn overload_sheds_heartbeats_keeps_lifecycle_and_reports_every_drop() {
    let s = setup();
    let client_out = path(&s.dir, "client.jsonl");
    let (runner_report, client_report) = (path(&s.dir, "runner.json"), path(&s.dir, "client.json"));
    let (ingest, client_http) = (free_addr(), free_addr());
    let mut runner = Proc::spawn(
        &[
            "runner",
            "--control-url",
            &s.control,
            "--events-url",
            &s.events,
            "--session-id",
            "s",
            "--connection-id",
            "c",
            "--queue-capacity",
            "8",
            "--ingest",
            &ingest.to_string(),
            "--no-forward-logs",
            "--report",
            runner_report.to_str().unwrap(),
        ],
        None,
    );
    let mut client = Proc::spawn(
        &[
            "client",
            "--control-url",
            &s.control,
            "--events-url",
            &s.events,
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
            "--report",
            client_report.to_str().unwrap(),
            "--http",
            &client_http.to_string(),
        ],
        None,
    );
    // The client reads the events channel before the burst starts (it relayed runner_ready).
    wait_listening(client_http);
    wait_until("the client relays", Duration::from_secs(40), || {
        counter(&client_health(client_http), "relayed") >= 1
    });
    // Far past the queue: 100,000 heartbeats in bursts of 20,000 (each body under the ingest's
    // 5 MiB limit), with an error event every 2,000.
    let mut bursts = vec![String::with_capacity(3 << 20)];
    let mut errors = 0;
    for i in 0..100_000u32 {
        if i > 0 && i % 20_000 == 0 {
            bursts.push(String::with_capacity(3 << 20));
        }
        let burst = bursts.last_mut().unwrap();
        if i % 2000 == 0 {
            errors += 1;
            burst.push_str(
                &json!({"event_type": "error", "session_id": "s", "connection_id": "c",
                "error": {"error_type": "burst", "message": format!("e{i}")}})
                .to_string(),
            );
        } else {
            burst.push_str(&json!({"event_type": "stream_heartbeat", "session_id": "s", "connection_id": "c", "metadata": {"i": i}}).to_string());
        }
        burst.push('\n');
    }
    for burst in bursts {
        let answer = post_ingest(ingest, burst);
        assert_eq!(answer["accepted"], 20_000, "rejected: {}", answer["errors"]);
    }
    let peak_kib = runner.peak_rss_kib();

    // The runner accepted the whole burst: end the session. It drains its queue and sends its
    // final `telemetry_dropped`; the client reads the events channel to its end.
    client.terminate();
    assert!(
        client.wait(Duration::from_secs(60)).success(),
        "client failed"
    );
    assert!(
        runner.wait(Duration::from_secs(30)).success(),
        "runner failed"
    );
    let runner = read_json(&runner_report);
    let client = read_json(&client_report);
    let got = read_lines(&client_out);
    eprintln!("runner {runner}\nclient {client}\npeak rss {peak_kib:?} KiB");

    let dropped = runner["dropped"].as_u64().unwrap();
    assert!(
        dropped > 0,
        "a burst of 100,000 into a queue of 8 must shed something"
    );
    assert_eq!(
        runner["dropped_high"], 0,
        "no lifecycle or error event dropped for heartbeats"
    );
    let burst_errors = got
        .iter()
        .filter(|l| l.contains("\"error_type\":\"burst\""))
        .count();
    assert_eq!(
        burst_errors, errors,
        "every error event of the burst arrived"
    );
    // The drops the client learned of equal the drops the runner counted.
    assert_eq!(client["dropped_reported"].as_u64().unwrap(), dropped);
    let reported_in_band: u64 = got
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["data"]["type"] == "telemetry_dropped")
        .map(|v| v["data"]["dropped"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(reported_in_band, dropped);
    let reports = got
        .iter()
        .filter(|l| data_type(l) == "telemetry_dropped")
        .count() as u64;
    assert_eq!(
        runner["emitted"].as_u64().unwrap(),
        got.len() as u64 - reports + dropped
    );
    if let Some(kib) = peak_kib {
        assert!(kib < 64 * 1024, "runner peak RSS {kib} KiB is over 64 MiB");
    }
}

#[test]
fn bad_lines_are_counted_and_skipped_while_valid_telemetry_flows() {
    let s = setup();
    let client_out = path(&s.dir, "client.jsonl");
    let client_report = path(&s.dir, "client.json");
    let client_http = free_addr();
    let mut client = Proc::spawn(
        &[
            "client",
            "--control-url",
            &s.control,
            "--events-url",
            &s.events,
            "--session-id",
            "mine",
            "--connection-id",
            "conn",
            "--egress",
            "file",
            "--egress-file",
            client_out.to_str().unwrap(),
            "--max-event-bytes",
            "4096",
            "--report",
            client_report.to_str().unwrap(),
            "--http",
            &client_http.to_string(),
        ],
        None,
    );
    // No wait for the subscription: the client starts at seq -2, which on this channel is
    // segment 0 whether it subscribes before the publish below (it waits for it) or after.
    wait_listening(client_http);
    let envelope = |i: u32, session: &str| {
        json!({"id": format!("00000000-0000-4000-8000-{i:012}"), "type": "stream_trace", "timestamp": "1700000000000",
               "data": {"type": "stream_heartbeat", "client_source": "scope", "timestamp": "1700000000000", "session_id": session, "connection_id": "conn"}})
    };
    let good = |i: u32| json!({"type": "telemetry", "event": envelope(i, "mine")}).to_string();
    let mut body = Vec::new();
    let mut push = |line: &[u8]| {
        body.extend_from_slice(line);
        body.push(b'\n');
    };
    push(good(1).as_bytes());
    push(b"this is not json");
    push(good(2).as_bytes());
    push(b"[1,2,3]");
    push(b"\"a string\"");
    push(good(3).as_bytes());
    push(&[b'{', 0xff, 0xfe, b'}']);
    push(
        format!(
            "{{\"type\":\"telemetry\",\"pad\":\"{}\"}}",
            "x".repeat(10_000)
        )
        .as_bytes(),
    );
    push(good(4).as_bytes());
    push(br#"{"type":"mystery_type","x":1}"#);
    push(
        json!({"type": "telemetry", "event": envelope(99, "someone-else")})
            .to_string()
            .as_bytes(),
    );
    push(br#"{"type":"telemetry","event":[1]}"#);
    push(good(5).as_bytes());

    let http = reqwest::blocking::Client::new();
    let status = http
        .post(format!("{}/0", s.events))
        .body(body)
        .send()
        .expect("publish")
        .status();
    assert!(status.is_success(), "{status}");
    // Every one of the 13 lines handled (relayed, rejected, or counted as bad or unknown) before
    // the channel goes: a DELETE drops a segment nobody has read yet.
    wait_until(
        "the client to handle all 13 lines",
        Duration::from_secs(30),
        || {
            let c = client_health(client_http);
            [
                "relayed",
                "rejected_foreign",
                "rejected_invalid",
                "bad_lines",
                "unknown_messages",
            ]
            .iter()
            .map(|k| counter(&c, k))
            .sum::<u64>()
                >= 13
        },
    );
    // The channel's end ends the client's events loop, and the client exits.
    http.delete(&s.events).send().expect("delete channel");
    assert!(
        client.wait(Duration::from_secs(30)).success(),
        "client failed"
    );

    let report = read_json(&client_report);
    let got = read_lines(&client_out);
    eprintln!("client {report}");
    let ids: Vec<String> = got
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let want: Vec<String> = (1..=5)
        .map(|i| format!("00000000-0000-4000-8000-{i:012}"))
        .collect();
    assert_eq!(ids, want, "every good line delivered, in order");
    assert_eq!(
        report["bad_lines"], 5,
        "garbage, array, string, bad UTF-8, oversized"
    );
    assert_eq!(report["unknown_messages"], 1);
    assert_eq!(report["rejected_foreign"], 1);
    assert_eq!(
        report["rejected_invalid"], 1,
        "an event that is not an envelope"
    );
    assert_eq!(report["egressed"], 5);
}

#[test]
fn client_serves_its_log_tail_with_telemetry_lines_and_health() {
    let s = setup();
    let http_addr = free_addr();
    let mut client = Proc::spawn(
        &[
            "client",
            "--control-url",
            &s.control,
            "--events-url",
            &s.events,
            "--session-id",
            "mine",
            "--egress",
            "log",
            "--http",
            &http_addr.to_string(),
        ],
        None,
    );
    wait_listening(http_addr);
    let line = json!({"type": "telemetry", "event": {"id": "11111111-2222-4333-8444-555555555555", "type": "stream_trace",
        "timestamp": "1700000000000", "data": {"type": "stream_heartbeat", "client_source": "scope",
        "timestamp": "1700000000000", "session_id": "mine", "connection_id": "c1"}}});
    let http = reqwest::blocking::Client::new();
    let status = http
        .post(format!("{}/0", s.events))
        .body(format!("{line}\n"))
        .send()
        .expect("publish")
        .status();
    assert!(status.is_success());
    let want = "TELEMETRY type=stream_heartbeat id=11111111-2222-4333-8444-555555555555 session=mine connection=c1 relayed_via=trickle";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tail: Value = http
            .get(format!("http://{http_addr}/api/v1/logs/tail?lines=500"))
            .send()
            .expect("logs tail")
            .json()
            .expect("JSON");
        let lines = tail["lines"].as_array().expect("lines");
        if lines
            .iter()
            .any(|l| l.as_str().unwrap_or("").contains(want))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no TELEMETRY line in the tail: {tail}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let health: Value = http
        .get(format!("http://{http_addr}/health"))
        .send()
        .expect("health")
        .json()
        .expect("JSON");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["client"]["relayed"], 1);
    http.delete(&s.events).send().expect("delete channel");
    assert!(client.wait(Duration::from_secs(30)).success());
}
