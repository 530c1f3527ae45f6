//! Lossless HTTP egress over real processes: `serve`, `runner`, `client` (HTTP metrics reporter
//! with its disk buffer) and `collector`, on loopback, with the client killed by SIGKILL.

mod common;

use common::proxy::{FaultProxy, Mode};
use common::{free_addr, get_json, log_file, signal, wait_listening, wait_until, Proc};
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

/// Trickle server, channels, runner (with ingest), ready to take events.
struct Relay {
    _session: common::Session,
    server: SocketAddr,
    control: String,
    events: String,
    ingest: SocketAddr,
    dir: tempfile::TempDir,
}

fn relay() -> Relay {
    let session = common::session_with_runner((SESSION, CONNECTION));
    Relay {
        control: session.control.clone(),
        events: session.events.clone(),
        ingest: session.ingest,
        server: session.addr,
        _session: session,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Relay {
    /// A client whose egress is the HTTP reporter, buffering in `buffer`, sending to `metrics`.
    fn client(&self, metrics: SocketAddr, buffer: &Path, http: SocketAddr, stderr: &Path) -> Proc {
        let channels = (self.control.as_str(), self.events.as_str());
        self.client_on(channels, metrics, buffer, http, stderr, &[])
    }

    /// A client restarted on the disk buffer a killed one left, on fresh channels no runner
    /// publishes to: everything it delivers comes from that buffer. (On the runner's channels it
    /// would read the segment being written from its start again, and deliver the events a second
    /// way, hiding a buffer that was lost.)
    fn restarted_client(
        &self,
        metrics: SocketAddr,
        buffer: &Path,
        http: SocketAddr,
        stderr: &Path,
    ) -> Proc {
        let (control, events) = common::create_session_channels(self.server);
        self.client_on((&control, &events), metrics, buffer, http, stderr, &[])
    }

    /// A client on `control`/`events` whose egress is the HTTP reporter, with `extra` environment
    /// variables.
    fn client_on(
        &self,
        (control, events): (&str, &str),
        metrics: SocketAddr,
        buffer: &Path,
        http: SocketAddr,
        stderr: &Path,
        extra: &[(&str, String)],
    ) -> Proc {
        let mut env = vec![
            ("SCOPE_CLOUD_API_KEY", KEY.to_string()),
            (
                "DAYDREAM_METRICS_URL",
                format!("http://{metrics}/v1/metrics"),
            ),
            ("SCOPE_METRICS_BUFFER_PATH", buffer.display().to_string()),
            ("SCOPE_METRICS_FLUSH_INTERVAL_MS", "100".to_string()),
        ];
        env.extend(extra.iter().cloned());
        let p = spawn(
            &[
                "client",
                "--control-url",
                control,
                "--events-url",
                events,
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

/// Ids of our events (`ids`) that are in the collector's output now.
fn landed(out: &Path, ids: &[String]) -> HashSet<String> {
    let got: HashSet<String> = common::collector_output(out)
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    ids.iter().filter(|id| got.contains(*id)).cloned().collect()
}

fn collector_duplicates(addr: SocketAddr) -> u64 {
    let health = get_json(&format!("http://{addr}/health")).expect("collector /health");
    health["counters"]["duplicates"]
        .as_u64()
        .unwrap_or_else(|| panic!("no duplicates counter: {health}"))
}

/// The collector writes the batches the reporter sends, but every answer is lost on the way
/// back (a proxy throws them away), so the reporter times out and keeps them on disk. The client
/// is killed (SIGKILL) while it retries; the restarted client recovers its disk buffer and sends
/// it all again. Every event arrives exactly once: each one the collector had already written
/// comes back as a duplicate and is suppressed by id.
#[test]
fn killed_client_resends_its_disk_buffer_and_every_event_arrives_once() {
    let r = relay();
    let metrics = free_addr();
    let out = r.dir.path().join("metrics.jsonl");
    let collector = r.collector(metrics, &out);
    let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), metrics);
    proxy.set(Mode::LoseAnswers);
    let buffer = r.dir.path().join("buffer");
    let (http1, http2) = (free_addr(), free_addr());
    let client = r.client_on(
        (&r.control, &r.events),
        proxy.addr,
        &buffer,
        http1,
        &r.dir.path().join("client1.err"),
        &[("SCOPE_METRICS_REQUEST_TIMEOUT_MS", "1000".to_string())],
    );
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
    // Accepted = appended to the disk buffer: read the segment files themselves (beside the
    // file SCOPE_METRICS_BUFFER_PATH names, as for the seed's buffer file).
    let spool = reporter::spool_beside(&buffer);
    wait_until(
        "all events in the client's disk buffer",
        Duration::from_secs(30),
        || {
            let on_disk = spool_ids(&spool);
            ids.iter().all(|id| on_disk.contains(id))
        },
    );
    // Some batches landed in the collector's output, and the reporter timed out on them.
    wait_until(
        "batches written by the collector, their answers lost",
        Duration::from_secs(30),
        || {
            !landed(&out, &ids).is_empty()
                && reporter_stats(http1)
                    .is_some_and(|s| s["network_errors"].as_u64().unwrap_or(0) >= 1)
        },
    );
    let before = reporter_stats(http1).expect("reporter counters");
    client.kill9();
    // Whatever the collector wrote by now (and a request still in flight may add to it) was
    // never acknowledged: it is all still in the disk buffer and will be sent again.
    let landed_before = landed(&out, &ids);
    let dups_before = collector_duplicates(metrics);
    assert_eq!(
        before["acked"].as_u64(),
        Some(0),
        "no answer reached the reporter: {before}"
    );
    assert!(proxy.count(&proxy.counts.lost_answers) > 0);

    let err2 = r.dir.path().join("client2.err");
    let _client = r.restarted_client(metrics, &buffer, http2, &err2);
    wait_until(
        "every event in the collector's output",
        Duration::from_secs(30),
        || landed(&out, &ids).len() == ids.len(),
    );
    let lines_out = common::collector_output(&out);
    let (ours, unique) = check_output(&lines_out, &sent);
    let dups = collector_duplicates(metrics);
    let after = reporter_stats(http2).expect("reporter counters");
    assert_eq!(
        (after["accepted"].as_u64(), after["recovered"].as_u64()),
        (Some(0), Some(n + 2)),
        "the restarted client relayed nothing new and sent what it recovered (ours, the warm-up, runner_ready): {after}"
    );
    let stderr = std::fs::read_to_string(&err2).unwrap();
    assert!(
        stderr.contains("disk buffer recovered"),
        "the restarted client recovered its buffer:\n{stderr}"
    );
    eprintln!(
        "http_egress crash (answers lost, kill -9 while retrying): N={n}, accepted before the kill {}, \
         written by the collector before the kill {} (answers lost {}), delivered {ours} of {n} exactly once \
         ({unique} events in the output), duplicates suppressed by the collector {dups_before} before the kill, {dups} in all",
        before["accepted"],
        landed_before.len(),
        proxy.count(&proxy.counts.lost_answers),
    );
    assert_eq!(ours as u64, n);
    assert!(
        dups - dups_before >= landed_before.len() as u64,
        "the {} events written before the kill were resent by the restarted client and \
         suppressed, but the collector counted only {} duplicates since",
        landed_before.len(),
        dups - dups_before
    );
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
    let _client = r.restarted_client(metrics, &buffer, http2, &err2);
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
