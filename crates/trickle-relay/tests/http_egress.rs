//! Lossless HTTP egress over real processes: `serve`, `runner`, `client` (HTTP metrics reporter
//! with its disk buffer) and `collector`, on loopback, with the client killed by SIGKILL.

mod common;

use common::{free_addr, log_file, signal, wait_listening, wait_until, Proc};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const KEY: &str = "crash-test-key";
const SESSION: &str = "sess-crash";
const CONNECTION: &str = "conn-crash";

/// `trickle-relay args` with `env` added, stderr into `stderr` when given.
fn spawn(args: &[&str], env: &[(&str, String)], stderr: Option<&Path>) -> Proc {
    let mut cmd = common::relay(args);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(path) = stderr {
        cmd.stderr(log_file(path));
    }
    Proc::start(&mut cmd)
}

fn get_json(url: &str) -> Option<Value> {
    reqwest::blocking::Client::new()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .ok()?
        .json()
        .ok()
}

/// Trickle server, channels, runner (with ingest), ready to take events.
struct Relay {
    _server: Proc,
    _runner: Proc,
    control: String,
    events: String,
    ingest: SocketAddr,
    dir: tempfile::TempDir,
}

fn relay() -> Relay {
    let addr = free_addr();
    let server = common::serve(addr, &[]);
    let (control, events) = common::create_session_channels(addr);
    let ingest = free_addr();
    let runner = common::runner_with_ingest(
        (&control, &events),
        (SESSION, CONNECTION),
        ingest,
        &[],
        None,
    );
    Relay {
        _server: server,
        _runner: runner,
        control,
        events,
        ingest,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Relay {
    /// A client whose egress is the HTTP reporter, buffering in `buffer`, sending to `metrics`.
    fn client(&self, metrics: SocketAddr, buffer: &Path, http: SocketAddr, stderr: &Path) -> Proc {
        let env = [
            ("SCOPE_CLOUD_API_KEY", KEY.to_string()),
            (
                "DAYDREAM_METRICS_URL",
                format!("http://{metrics}/v1/metrics"),
            ),
            ("SCOPE_METRICS_BUFFER_PATH", buffer.display().to_string()),
            ("SCOPE_METRICS_FLUSH_INTERVAL_MS", "100".to_string()),
        ];
        let p = spawn(
            &[
                "client",
                "--control-url",
                &self.control,
                "--events-url",
                &self.events,
                "--session-id",
                SESSION,
                "--connection-id",
                CONNECTION,
                "--http",
                &http.to_string(),
            ],
            &env,
            Some(stderr),
        );
        wait_listening(http);
        p
    }

    fn post(&self, lines: &[String]) {
        let http = reqwest::blocking::Client::new();
        let answer: Value = http
            .post(format!("http://{}/v1/events", self.ingest))
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

    /// Posts one event and waits until the client relayed it: the client is subscribed.
    fn warm_up(&self, client_http: SocketAddr) {
        let (_, line) = envelope(u64::MAX, "warmup");
        self.post(&[line]);
        wait_until("the client relays", Duration::from_secs(20), || {
            get_json(&format!("http://{client_http}/health"))
                .is_some_and(|h| h["client"]["relayed"].as_u64().unwrap_or(0) >= 1)
        });
    }

    fn collector(&self, listen: SocketAddr, out: &Path) -> Proc {
        let keys = self.dir.path().join("keys");
        std::fs::write(&keys, format!("# test keys\n{KEY}\n")).unwrap();
        let p = spawn(
            &[
                "collector",
                "--listen",
                &listen.to_string(),
                "--api-keys",
                keys.to_str().unwrap(),
                "--output",
                &format!("jsonl:{}", out.display()),
            ],
            &[],
            None,
        );
        wait_listening(listen);
        p
    }
}

/// A built envelope with a known id; returns (id, JSON line).
fn envelope(i: u64, kind: &str) -> (String, String) {
    let id = uuid::Uuid::new_v4().to_string();
    let ts = format!("{}", 1_700_000_000_000u64 + (i % 1_000_000));
    let line = json!({"id": id, "type": "stream_trace", "timestamp": ts,
        "data": {"type": "pipeline_loaded", "client_source": "scope", "timestamp": ts,
                 "session_id": SESSION, "connection_id": CONNECTION, "seq": i, "kind": kind,
                 "payload": "x".repeat(200)}})
    .to_string();
    (id, line)
}

fn data_of(line: &str) -> Value {
    serde_json::from_str::<Value>(line).unwrap()["data"].clone()
}

/// Ids of the records in the spool's segment files (read-only, as a second process may).
/// The record frame is `[len u32 LE][crc u32 LE][payload]`; a torn tail ends the scan.
fn spool_ids(dir: &Path) -> HashSet<String> {
    let mut ids = HashSet::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return ids;
    };
    for e in entries.flatten() {
        if e.path().extension().is_none_or(|x| x != "log") {
            continue;
        }
        let Ok(bytes) = std::fs::read(e.path()) else {
            continue;
        };
        let mut off = 0usize;
        while off + 8 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            let Some(payload) = bytes.get(off + 8..off + 8 + len) else {
                break;
            };
            if let Ok(v) = serde_json::from_slice::<Value>(payload) {
                if let Some(id) = v["id"].as_str() {
                    ids.insert(id.to_string());
                }
            }
            off += 8 + len;
        }
    }
    ids
}

fn reporter_stats(client_http: SocketAddr) -> Option<Value> {
    get_json(&format!("http://{client_http}/egress")).map(|v| v["reporter"].clone())
}

/// Every output event: unique by id, and each of ours carrying exactly the data we sent.
fn check_output(lines: &[Value], sent: &HashMap<String, Value>) -> (usize, usize) {
    let mut seen = HashSet::new();
    let mut ours = 0;
    for v in lines {
        let id = v["id"].as_str().unwrap();
        assert!(seen.insert(id.to_string()), "event {id} written twice");
        match sent.get(id) {
            Some(data) => {
                // The client's two annotations are inside `data`; the rest is what was sent.
                let mut got = v["data"].clone();
                let annotations = got.as_object_mut().unwrap();
                assert_eq!(
                    annotations.remove("relayed_via"),
                    Some(Value::from("trickle"))
                );
                let received = annotations.remove("relay_received_timestamp");
                assert!(
                    received
                        .as_ref()
                        .and_then(Value::as_str)
                        .is_some_and(|t| t.parse::<u64>().is_ok()),
                    "event {id}: relay_received_timestamp {received:?}"
                );
                assert_eq!(&got, data, "event {id} changed on the way");
                assert_eq!(v["type"], "pipeline_loaded");
                ours += 1;
            }
            None => {
                let t = v["data"]["type"].as_str().unwrap_or_default();
                let warmup = v["data"]["kind"] == "warmup";
                assert!(
                    warmup || t == "runner_ready" || t == "telemetry_dropped",
                    "unexpected event: {v}"
                );
            }
        }
    }
    (ours, seen.len())
}

#[test]
fn killed_client_resends_its_disk_buffer_and_every_event_arrives_once() {
    let r = relay();
    let dead = free_addr(); // the collector's port: nothing listens there yet
    let buffer = r.dir.path().join("buffer");
    let (http1, http2) = (free_addr(), free_addr());
    let client = r.client(dead, &buffer, http1, &r.dir.path().join("client1.err"));
    r.warm_up(http1);

    let n = 2000u64;
    let (ids, lines): (Vec<String>, Vec<String>) = (0..n).map(|i| envelope(i, "crash")).unzip();
    let sent: HashMap<String, Value> = ids
        .iter()
        .cloned()
        .zip(lines.iter().map(|l| data_of(l)))
        .collect();
    for chunk in lines.chunks(500) {
        r.post(chunk);
    }
    // Accepted = appended to the disk buffer: read the segment files themselves.
    wait_until(
        "all events in the client's disk buffer",
        Duration::from_secs(30),
        || {
            let on_disk = spool_ids(&buffer);
            ids.iter().all(|id| on_disk.contains(id))
        },
    );
    wait_until(
        "the reporter retrying against the dead collector",
        Duration::from_secs(20),
        || reporter_stats(http1).is_some_and(|s| s["network_errors"].as_u64().unwrap_or(0) >= 1),
    );
    let before = reporter_stats(http1).unwrap();
    client.kill9();

    let out = r.dir.path().join("metrics.jsonl");
    let collector = r.collector(dead, &out);
    let err2 = r.dir.path().join("client2.err");
    let _client = r.client(dead, &buffer, http2, &err2);
    wait_until(
        "every event in the collector's output",
        Duration::from_secs(30),
        || {
            let got: HashSet<String> = common::collector_output(&out)
                .iter()
                .map(|v| v["id"].as_str().unwrap().to_string())
                .collect();
            ids.iter().all(|id| got.contains(id))
        },
    );
    let lines_out = common::collector_output(&out);
    let (ours, unique) = check_output(&lines_out, &sent);
    let health = get_json(&format!("http://{dead}/health")).unwrap();
    let dups = health["counters"]["duplicates"].as_u64().unwrap();
    let stderr = std::fs::read_to_string(&err2).unwrap();
    assert!(
        stderr.contains("disk buffer recovered"),
        "the restarted client recovered its buffer:\n{stderr}"
    );
    eprintln!(
        "http_egress crash (collector down, kill -9 while retrying): N={n}, accepted before the kill {}, \
         delivered {ours} of {n} exactly once ({unique} events in the output), duplicates suppressed by the collector {dups}",
        before["accepted"]
    );
    assert_eq!(ours as u64, n);
    drop(collector);
}

#[test]
fn kill_during_a_burst_of_appends_loses_nothing_accepted_and_writes_no_garbage() {
    let r = relay();
    let metrics = free_addr();
    let out = r.dir.path().join("metrics.jsonl");
    let _collector = r.collector(metrics, &out);
    let buffer = r.dir.path().join("buffer");
    let (http1, http2) = (free_addr(), free_addr());
    let client = r.client(metrics, &buffer, http1, &r.dir.path().join("client1.err"));
    r.warm_up(http1);

    let n = 20_000u64;
    let (ids, lines): (Vec<String>, Vec<String>) = (0..n).map(|i| envelope(i, "burst")).unzip();
    let sent: HashMap<String, Value> = ids
        .iter()
        .cloned()
        .zip(lines.iter().map(|l| data_of(l)))
        .collect();
    let poster = {
        let (ingest, lines) = (r.ingest, lines.clone());
        std::thread::spawn(move || {
            let http = reqwest::blocking::Client::new();
            for chunk in lines.chunks(2000) {
                let _ = http
                    .post(format!("http://{ingest}/v1/events"))
                    .body(chunk.join("\n"))
                    .send();
            }
        })
    };
    // Kill while the burst is being appended: a third of it accepted, most of it not yet.
    let mut accepted_before_kill = 0;
    wait_until(
        "a third of the burst accepted",
        Duration::from_secs(30),
        || {
            if let Some(s) = reporter_stats(http1) {
                accepted_before_kill = s["accepted"].as_u64().unwrap_or(0);
            }
            accepted_before_kill >= n / 3
        },
    );
    client.kill9();
    poster.join().unwrap();

    let err2 = r.dir.path().join("client2.err");
    let _client = r.client(metrics, &buffer, http2, &err2);
    // Done when the restarted reporter has nothing left and the output stopped growing.
    let mut last = usize::MAX;
    wait_until("the output to settle", Duration::from_secs(40), || {
        let idle =
            reporter_stats(http2).is_some_and(|s| s["buffered"] == 0 && s["handoff_pending"] == 0);
        let len = common::collector_output(&out).len();
        let stable = idle && len == last;
        last = len;
        std::thread::sleep(Duration::from_millis(300));
        stable
    });
    let lines_out = common::collector_output(&out);
    let (ours, unique) = check_output(&lines_out, &sent);
    let got: HashSet<&str> = lines_out
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    // What the reporter accepted before the kill is a prefix of the stream (warm-up and maybe
    // runner_ready first, then our events in order): all of it must be there.
    let surely = (accepted_before_kill as usize).saturating_sub(2);
    let missing: Vec<&String> = ids[..surely]
        .iter()
        .filter(|id| !got.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} accepted events lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    let health = get_json(&format!("http://{metrics}/health")).unwrap();
    let dups = health["counters"]["duplicates"].as_u64().unwrap();
    let stderr = std::fs::read_to_string(&err2).unwrap();
    let recovery = stderr
        .lines()
        .find(|l| l.contains("disk buffer recovered"))
        .unwrap_or("(nothing left to recover)");
    eprintln!(
        "http_egress crash (kill -9 mid-burst): N={n}, accepted before the kill {accepted_before_kill}, \
         delivered {ours} of ours exactly once ({unique} events in the output), duplicates suppressed by the collector {dups}; \
         restart: {recovery}"
    );
}

#[test]
fn a_401_pauses_the_client_until_sighup_reloads_its_api_key_file() {
    let r = relay();
    let metrics = free_addr();
    let out = r.dir.path().join("metrics.jsonl");
    let _collector = r.collector(metrics, &out);
    let key_file = r.dir.path().join("api-key");
    std::fs::write(&key_file, "not-the-key\n").unwrap();
    let http = free_addr();
    let env = [
        (
            "DAYDREAM_METRICS_URL",
            format!("http://{metrics}/v1/metrics"),
        ),
        (
            "SCOPE_METRICS_BUFFER_PATH",
            r.dir.path().join("buffer").display().to_string(),
        ),
        ("SCOPE_METRICS_FLUSH_INTERVAL_MS", "100".to_string()),
    ];
    let client = spawn(
        &[
            "client",
            "--control-url",
            &r.control,
            "--events-url",
            &r.events,
            "--session-id",
            SESSION,
            "--connection-id",
            CONNECTION,
            "--http",
            &http.to_string(),
            "--egress",
            "http",
            "--api-key-file",
            key_file.to_str().unwrap(),
        ],
        &env,
        Some(&r.dir.path().join("client.err")),
    );
    wait_listening(http);
    r.warm_up(http);
    let (ids, lines): (Vec<String>, Vec<String>) = (0..100).map(|i| envelope(i, "hup")).unzip();
    r.post(&lines);
    wait_until(
        "paused by the collector's 401",
        Duration::from_secs(20),
        || {
            reporter_stats(http)
                .is_some_and(|s| s["paused"] == true && s["buffered"].as_u64() >= Some(100))
        },
    );
    assert!(common::collector_output(&out).is_empty());
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    signal(client.pid(), "HUP");
    wait_until(
        "delivered with the reloaded key",
        Duration::from_secs(20),
        || {
            let got: HashSet<String> = common::collector_output(&out)
                .iter()
                .map(|v| v["id"].as_str().unwrap().to_string())
                .collect();
            ids.iter().all(|id| got.contains(id))
        },
    );
    let s = reporter_stats(http).unwrap();
    assert!(
        s["status_401"].as_u64().unwrap() >= 1 && s["paused"] == false,
        "{s}"
    );
}
