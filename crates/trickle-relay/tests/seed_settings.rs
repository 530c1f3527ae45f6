//! The seed application's settings work unchanged, over real processes: the seed's reporter
//! buffer file is imported once and delivered, out-of-range numbers are clamped (with one warning)
//! rather than refused, and the collector without `--output` publishes to Kafka when
//! `KAFKA_BOOTSTRAP_SERVERS` is set (else to a JSONL file it names in full).

mod common;

use common::{free_addr, get_json, log_file, wait_listening, wait_until, Proc};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const KEY: &str = "seed-settings-key";
const SESSION: &str = "sess-seed";
const CONNECTION: &str = "conn-seed";

fn keys_file(dir: &Path) -> std::path::PathBuf {
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    keys
}

/// A collector on `listen` writing to the JSONL file `out`.
fn collector(dir: &Path, listen: SocketAddr, out: &Path) -> Proc {
    let keys = keys_file(dir);
    let listen_s = listen.to_string();
    let output = format!("jsonl:{}", out.display());
    let args = [
        "collector",
        "--listen",
        &listen_s,
        "--api-keys",
        keys.to_str().unwrap(),
        "--output",
        &output,
    ];
    let p = Proc::spawn(&args, Some(&dir.join("collector.err")));
    wait_listening(listen);
    p
}

/// A client on `control`/`events` whose egress is the HTTP reporter to `metrics`, with the seed's
/// variables in `env`, serving `--http` on `http`.
fn client(
    (control, events): (&str, &str),
    metrics: SocketAddr,
    http: SocketAddr,
    env: &[(&str, &str)],
    stderr: &Path,
) -> Proc {
    let http_s = http.to_string();
    let mut cmd = common::relay(&[
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
        &http_s,
        "--egress",
        "http",
    ]);
    cmd.env("SCOPE_CLOUD_API_KEY", KEY)
        .env(
            "DAYDREAM_METRICS_URL",
            format!("http://{metrics}/v1/metrics"),
        )
        .env("SCOPE_METRICS_FLUSH_INTERVAL_MS", "100")
        .envs(env.iter().copied())
        .stderr(log_file(stderr));
    let p = Proc::start(&mut cmd);
    wait_listening(http);
    p
}

/// Waits until every one of `ids` is in the collector's output `out`.
fn wait_for_ids(out: &Path, ids: &[String], timeout: Duration) {
    wait_until("every event in the collector's output", timeout, || {
        let got: HashSet<String> = common::collector_output(out)
            .iter()
            .filter_map(|v| v["id"].as_str().map(str::to_owned))
            .collect();
        ids.iter().all(|id| got.contains(id))
    });
}

fn reporter_stats(http: SocketAddr) -> Value {
    get_json(&format!("http://{http}/egress")).map_or(Value::Null, |v| v["reporter"].clone())
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// An event as the seed's reporter writes it to its buffer file: `json.dumps` of the mapped
/// event (with Python's `", "` and `": "` separators), one per line.
fn seed_line(i: usize) -> (String, String) {
    let id = uuid::Uuid::new_v4().to_string();
    let line = format!(
        r#"{{"type": "stream_heartbeat", "data": {{"type": "stream_heartbeat", "client_source": "scope", "session_id": "{SESSION}", "fps": 29.97, "seq": {i}}}, "id": "{id}", "timestamp": "1700000000{i:03}"}}"#
    );
    (id, line)
}

#[test]
fn a_seed_buffer_file_is_imported_once_delivered_then_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let _server = common::serve(addr, &[]);
    let (control, events) = common::create_session_channels(addr);
    let metrics = free_addr();
    let out = dir.path().join("metrics.jsonl");
    let _collector = collector(dir.path(), metrics, &out);

    // What the seed left behind at its last clean stop, plus lines it could not send either.
    let file = dir.path().join("metrics_buffer.jsonl");
    let (ids, lines): (Vec<String>, Vec<String>) = (0..40).map(seed_line).unzip();
    let mut text = lines.join("\n");
    text.push_str("\nnot json at all\n\n{\"type\": \"x\", \"data\": {}}\n");
    std::fs::write(&file, text).unwrap();

    let env = [("SCOPE_METRICS_BUFFER_PATH", file.to_str().unwrap())];
    let http1 = free_addr();
    let err1 = dir.path().join("client1.err");
    let mut first = client((&control, &events), metrics, http1, &env, &err1);
    wait_for_ids(&out, &ids, Duration::from_secs(30));
    let s = reporter_stats(http1);
    assert_eq!(n(&s, "seed_imported"), 40, "{s}");
    assert_eq!(n(&s, "seed_skipped"), 2, "{s}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        0,
        "the seed's file is truncated, as the seed does after loading it"
    );
    assert!(
        dir.path().join("metrics_buffer.jsonl.spool").is_dir(),
        "the disk buffer lives beside the seed's file"
    );
    let log = std::fs::read_to_string(&err1).unwrap();
    // (Its counts are fields of that line; the counters above are the same numbers.)
    assert!(
        log.contains("imported the seed's buffer file"),
        "the import is logged:\n{log}"
    );
    // Delivered as the seed wrote them.
    let output = common::collector_output(&out);
    for (id, line) in ids.iter().zip(&lines) {
        let seed: Value = serde_json::from_str(line).unwrap();
        let got = output.iter().find(|v| v["id"] == id.as_str()).unwrap();
        assert_eq!(got, &seed, "event {id} changed on the way");
    }

    // A clean stop and a restart: nothing is imported or sent again.
    first.terminate();
    first.wait(Duration::from_secs(20));
    let http2 = free_addr();
    let err2 = dir.path().join("client2.err");
    let _second = client((&control, &events), metrics, http2, &env, &err2);
    wait_until(
        "the restarted reporter idle",
        Duration::from_secs(20),
        || {
            let s = reporter_stats(http2);
            s.is_object() && n(&s, "buffered") == 0 && n(&s, "handoff_pending") == 0
        },
    );
    let s = reporter_stats(http2);
    assert_eq!((n(&s, "seed_imported"), n(&s, "recovered")), (0, 0), "{s}");
    let output = common::collector_output(&out);
    let seed_ids: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let delivered = output
        .iter()
        .filter(|v| v["id"].as_str().is_some_and(|id| seed_ids.contains(id)))
        .count();
    assert_eq!(delivered, 40, "each imported event written once");
}

#[test]
fn out_of_range_seed_numbers_are_clamped_with_one_warning_and_the_client_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let session = common::session_with_runner((SESSION, CONNECTION));
    let (control, events, ingest) = (&session.control, &session.events, session.ingest);
    let metrics = free_addr();
    let out = dir.path().join("metrics.jsonl");
    let _collector = collector(dir.path(), metrics, &out);
    let buffer = dir.path().join("metrics_buffer.jsonl");
    // The seed runs with these; here they are past the API's 500 events per request, and the
    // collector refuses (413) any request of more than 500.
    let env = [
        ("SCOPE_METRICS_BUFFER_PATH", buffer.to_str().unwrap()),
        ("SCOPE_METRICS_MAX_BATCH", "1000"),
        ("SCOPE_METRICS_FLUSH_INTERVAL_MS", "1000"),
    ];
    let http = free_addr();
    let err = dir.path().join("client.err");
    let _client = client((control, events), metrics, http, &env, &err);

    let ids: Vec<String> = (0..1200)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let lines: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({"id": id, "type": "stream_trace", "timestamp": "1700000000000",
                "data": {"type": "stream_heartbeat", "session_id": SESSION,
                         "connection_id": CONNECTION, "seq": i}})
            .to_string()
        })
        .collect();
    let posted: Value = reqwest::blocking::Client::new()
        .post(format!("http://{ingest}/v1/events"))
        .body(lines.join("\n"))
        .send()
        .expect("ingest")
        .json()
        .expect("ingest answers JSON");
    assert_eq!(posted["accepted"], 1200, "{posted}");
    wait_for_ids(&out, &ids, Duration::from_secs(60));
    let s = reporter_stats(http);
    assert_eq!(n(&s, "splits_413"), 0, "no request over 500 events: {s}");
    let log = std::fs::read_to_string(&err).unwrap();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("SCOPE_METRICS_MAX_BATCH=1000"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning:\n{log}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("500 events per request"),
        "it names the variable and the limit: {}",
        warnings[0]
    );
}

/// `trickle-relay collector` without `--output`, in `cwd`, with `env`; returns it once it
/// listens, and its stderr file.
fn default_collector(
    dir: &Path,
    listen: SocketAddr,
    env: &[(&str, &str)],
) -> (Proc, std::path::PathBuf) {
    let keys = keys_file(dir);
    let listen_s = listen.to_string();
    let err = dir.join("collector.err");
    let mut cmd = common::relay(&[
        "collector",
        "--listen",
        &listen_s,
        "--api-keys",
        keys.to_str().unwrap(),
    ]);
    cmd.current_dir(dir)
        .envs(env.iter().copied())
        .stderr(log_file(&err));
    let p = Proc::start(&mut cmd);
    wait_until(
        "the collector's startup line",
        Duration::from_secs(20),
        || std::fs::read_to_string(&err).is_ok_and(|t| t.contains("listening on")),
    );
    (p, err)
}

/// POSTs `ids` as one batch of API events; the collector's answer status.
fn post_batch(listen: SocketAddr, ids: &[String]) -> u16 {
    let events: Vec<Value> = ids
        .iter()
        .map(|id| json!({"type": "stream_heartbeat", "data": {"type": "stream_heartbeat"}, "id": id, "timestamp": "1700000000000"}))
        .collect();
    reqwest::blocking::Client::new()
        .post(format!("http://{listen}/v1/metrics"))
        .bearer_auth(KEY)
        .json(&json!({"app": "scope", "host": "test", "events": events}))
        .send()
        .expect("post")
        .status()
        .as_u16()
}

#[test]
fn the_collector_without_output_publishes_to_kafka_when_bootstrap_servers_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let broker = kafka::broker::TestBroker::start().unwrap_or_else(|e| panic!("{e}"));
    let topic = "seed-default-output";
    broker.create_topic(topic, 2).expect("create topic");
    let listen = free_addr();
    let bootstrap = broker.bootstrap();
    let (_collector, err) = default_collector(
        dir.path(),
        listen,
        &[
            ("KAFKA_BOOTSTRAP_SERVERS", &bootstrap),
            ("KAFKA_TOPIC", topic),
        ],
    );
    let line = std::fs::read_to_string(&err).unwrap();
    assert!(
        line.contains("output kafka (KAFKA_BOOTSTRAP_SERVERS is set and no --output)"),
        "the startup line says where events go:\n{line}"
    );
    let ids: Vec<String> = (0..3).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    assert_eq!(post_batch(listen, &ids), 200);
    let got = kafka::broker::read_topic(
        &bootstrap,
        topic,
        3,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let keys: HashSet<String> = got
        .iter()
        .map(|m| String::from_utf8(m.key.clone().unwrap()).unwrap())
        .collect();
    assert_eq!(keys, ids.iter().cloned().collect());
    assert!(
        !dir.path().join("metrics.jsonl").exists(),
        "nothing appended to a file in the working directory"
    );
}

#[test]
fn the_collector_without_output_names_its_default_jsonl_file() {
    let dir = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let (_collector, err) = default_collector(dir.path(), listen, &[]);
    let file = std::path::absolute(dir.path().join("metrics.jsonl")).unwrap();
    let line = std::fs::read_to_string(&err).unwrap();
    assert!(
        line.contains(&format!("output jsonl:{} (the default", file.display())),
        "the startup line names the file in full:\n{line}"
    );
    let ids = vec![uuid::Uuid::new_v4().to_string()];
    assert_eq!(post_batch(listen, &ids), 200);
    let out = common::collector_output(&file);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["id"], ids[0].as_str());
}
