//! Drop-in with Daydream Scope's real Python stack: the `livepeer-gateway` trickle clients (from
//! PyPI, in the venv `scripts/python-env.sh` makes) against this project's processes.
//!
//! - A Python client shaped like Scope's `LivepeerClient` drives our runner through our server:
//!   every control answer in Scope's shape, our numbered telemetry lines (`seq`) read as Scope's
//!   dispatch reads them, media published to the stream's `in` channel with the
//!   gateway's `TricklePublisher` and read back from `out` with its `TrickleSubscriber`, byte for
//!   byte (`tests/python/scope_client.py` checks each answer; this test checks what it reports and
//!   what the runner reports).
//! - A Python runner shaped like Scope's writes `{"type": "telemetry", "event": ...}` lines with
//!   the gateway's `JSONLWriter`; our client egresses every envelope with exactly the two
//!   annotations added inside `data` and every other byte unchanged.

mod common;

use common::{
    create_session_channels, free_addr, log_file, python_script, read_json, read_lines, relay,
    serve, tail, unrelay, venv_python, wait_until, Proc,
};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn a_scope_shaped_python_client_drives_our_runner_and_gets_its_media_back_byte_for_byte() {
    let python = venv_python();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let _server = serve(addr, &[]);
    let (control, events) = create_session_channels(addr);
    let runner_err = dir.path().join("runner.err");
    let runner_report = dir.path().join("runner.json");

    // The client reads the events channel first, as Scope's client does before the runner is up.
    // Four small segments, then one of 40 MiB that the runner must stream, not hold.
    let big: u64 = 40 * 1024 * 1024 / 188 * 188;
    let client = Command::new(&python)
        .arg(python_script("scope_client.py"))
        .args([&control, &events, "4", "200000", &big.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the Python client");
    let mut runner = Proc::start(
        relay(&[
            "runner",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--report",
            runner_report.to_str().unwrap(),
        ])
        .stderr(log_file(&runner_err)),
    );
    // The runner's peak memory while the media flows (VmHWM only grows; read until it exits).
    wait_until("the runner is up", Duration::from_secs(20), || {
        runner.peak_rss_kib().is_some()
    });
    let before_kib = runner.peak_rss_kib().unwrap();
    let pid = runner.pid();
    let peak = std::thread::spawn(move || {
        let mut peak: u64 = 0;
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let kib = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
            match kib {
                Some(kib) => peak = kib,
                None => break,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        peak
    });
    let out = client.wait_with_output().expect("Python client ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Scope-shaped client failed: {stderr}\n--- runner log:\n{}",
        tail(&runner_err)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("client report is JSON");
    assert_eq!(seen["segments"], 5, "{seen}");
    // Four segments of 200,000 + n*1,000 bytes and the big one came back whole.
    assert_eq!(seen["bytes"], 4 * 200_000 + 6_000 + big, "{seen}");
    let channels = seen["channels"].as_array().expect("channels");
    assert_eq!(channels.len(), 2, "{seen}");
    // Our runner numbers its telemetry lines (`seq`); Scope's dispatch takes `event` and never
    // looks at the extra member: each line gave it a whole envelope.
    let types: Vec<&str> = seen["telemetry_types"]
        .as_array()
        .expect("telemetry_types")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in ["runner_ready", "session_created", "stream_started"] {
        assert!(types.contains(&want), "{want} not read: {seen}");
    }
    assert_eq!(
        seen["telemetry_numbered"], seen["telemetry_lines"],
        "{seen}"
    );
    for channel in channels {
        let name = channel["url"].as_str().unwrap().rsplit('/').next().unwrap();
        // 128 random bits in hex, then the direction.
        let (random, direction) = name.split_once('-').unwrap();
        assert_eq!(random.len(), 32, "{name}");
        assert!(random.chars().all(|c| c.is_ascii_hexdigit()), "{name}");
        assert_eq!(direction, channel["direction"].as_str().unwrap());
    }

    // The client closed the control channel: the runner ends on its own and reports the media.
    assert!(
        runner.wait(Duration::from_secs(30)).success(),
        "runner failed: {}",
        tail(&runner_err)
    );
    let report = read_json(&runner_report);
    assert_eq!(report["media_segments"], 5, "{report}");
    assert_eq!(report["media_failures"], 0, "{report}");
    // Streamed, not held. Measured here: the runner grows about 15 MiB from its first moments
    // to serving a session, and the 40 MiB segment adds about 13 (the publisher's 8 MiB retry
    // copy and chunks in flight); holding the segment whole would add 40 on top of that.
    let grew_kib = peak.join().unwrap().saturating_sub(before_kib);
    assert!(
        grew_kib < 40 * 1024,
        "the runner's peak memory grew {grew_kib} KiB passing a 40 MiB segment through"
    );
}

#[test]
fn a_scope_shaped_python_runner_is_relayed_with_the_annotations_inside_data() {
    let python = venv_python();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let _server = serve(addr, &[]);
    let (control, events) = create_session_channels(addr);
    let egressed = dir.path().join("egressed.jsonl");
    let manifest = dir.path().join("sent.jsonl");
    let client_err = dir.path().join("client.err");
    let client_report = dir.path().join("client.json");
    let http = free_addr();

    let mut client = Proc::start(
        relay(&[
            "client",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--http",
            &http.to_string(),
            "--egress",
            "file",
            "--egress-file",
            egressed.to_str().unwrap(),
            "--report",
            client_report.to_str().unwrap(),
        ])
        .stderr(log_file(&client_err)),
    );
    let mut runner = Command::new(&python)
        .arg(python_script("scope_runner.py"))
        .args([&events, manifest.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the Python runner");
    let mut said = String::new();
    BufReader::new(runner.stdout.take().unwrap())
        .read_line(&mut said)
        .unwrap();
    assert_eq!(
        said.trim(),
        "sent",
        "the Python runner did not finish writing"
    );
    let sent = read_lines(&manifest);
    assert_eq!(sent.len(), 7);
    // The file sink writes through a buffer (flushed at exit): its counters say what it took.
    let egressed_so_far = || {
        reqwest::blocking::get(format!("http://{http}/egress"))
            .and_then(|r| r.json::<Value>())
            .map(|v| v["stats"]["delivered"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };
    wait_until("every envelope egressed", Duration::from_secs(30), || {
        egressed_so_far() >= sent.len() as u64
    });
    // Now the runner may close (which deletes the events channel); the client then ends.
    runner.stdin.take().unwrap().write_all(b"close\n").unwrap();
    assert!(runner.wait().unwrap().success(), "the Python runner failed");
    assert!(
        client.wait(Duration::from_secs(30)).success(),
        "client failed: {}",
        tail(&client_err)
    );

    let got = read_lines(&egressed);
    assert_eq!(got.len(), sent.len(), "{got:#?}");
    for (line, original) in got.iter().zip(&sent) {
        let out: Value = serde_json::from_str(line).unwrap();
        let before: Value = serde_json::from_str(original).unwrap();
        assert_eq!(out["id"], before["id"], "order kept");
        if before["data"].get("relayed_via").is_some() {
            // A second hop: its annotations kept as they were, nothing added.
            assert_eq!(line, original, "a second hop's envelope changed");
            continue;
        }
        // Exactly the two annotations spliced inside `data`; every other byte as Python wrote it.
        let (unannotated, received) = unrelay(line).unwrap_or_else(|| {
            panic!("not annotated inside data as the spec asks:\n{line}\nsent:\n{original}")
        });
        assert_eq!(&unannotated, original);
        let stamped: u64 = before["timestamp"].as_str().unwrap().parse().unwrap();
        assert!(received >= stamped, "received {received} before {stamped}");
        assert_eq!(out["data"]["relayed_via"], "trickle");
        assert_eq!(
            out["data"]["relay_received_timestamp"],
            received.to_string()
        );
        let mut data = out["data"].clone();
        let data = data.as_object_mut().unwrap();
        data.remove("relayed_via");
        data.remove("relay_received_timestamp");
        assert_eq!(Value::Object(data.clone()), before["data"], "data changed");
        for key in ["id", "type", "timestamp"] {
            assert_eq!(out[key], before[key], "{key} changed");
        }
    }
    let report = read_json(&client_report);
    assert_eq!(report["relayed"], sent.len(), "{report}");
    assert_eq!(report["egressed"], sent.len(), "{report}");
    assert_eq!(report["bad_lines"], 0, "{report}");
}

/// A runner shut down (SIGTERM) while its stream runs deletes the stream's media channels.
#[test]
fn a_runner_shut_down_mid_stream_deletes_its_media_channels() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let _server = serve(addr, &[]);
    let (control, events) = create_session_channels(addr);
    let runner_err = dir.path().join("runner.err");
    let mut runner = Proc::start(
        relay(&["runner", "--control-url", &control, "--events-url", &events])
            .stderr(log_file(&runner_err)),
    );
    let mut client = Proc::spawn(
        &[
            "client",
            "--control-url",
            &control,
            "--events-url",
            &events,
            "--start-stream",
            "{}",
        ],
        None,
    );
    // The runner names the channels it made in its log.
    let mut urls = Vec::new();
    wait_until("the media channels", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(&runner_err).unwrap_or_default();
        // URLs up to whitespace or a colour escape, ending in the channel's direction.
        urls = log
            .split("http://")
            .skip(1)
            .map(|rest| {
                rest.split(|c: char| c.is_whitespace() || c == '\x1b')
                    .next()
                    .unwrap()
            })
            .filter(|u| u.ends_with("-in") || u.ends_with("-out"))
            .map(|u| format!("http://{u}"))
            .collect();
        urls.len() == 2
    });
    let status = |url: &str| {
        reqwest::blocking::get(format!("{url}/next"))
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    for url in &urls {
        assert_eq!(status(url), 200, "{url} exists while the stream runs");
    }
    runner.terminate();
    assert!(
        runner.wait(Duration::from_secs(30)).success(),
        "runner failed: {}",
        tail(&runner_err)
    );
    for url in &urls {
        assert_eq!(status(url), 404, "{url} deleted at shutdown");
    }
    // The runner closed the events channel on its way out: the client ends too.
    assert!(client.wait(Duration::from_secs(30)).success());
}
