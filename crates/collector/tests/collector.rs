//! The collector over real loopback HTTP with a real JSONL file: every refusal of the contract,
//! durability, dedup; then the reporter against it, row by row.

use collector::{ApiKeys, Collector, CollectorConfig, JsonlOutput, Output};
use flate2::write::GzEncoder;
use flate2::Compression;
use reporter::{Reporter, ReporterConfig, ReporterStats};
use serde_json::{json, Value};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use telemetry::{Envelope, Event, Fields, Sink};

const KEY: &str = "test-key-123";

struct Running {
    addr: SocketAddr,
    collector: Collector,
    out: PathBuf,
    _dir: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn url(&self) -> String {
        format!("http://{}/v1/metrics", self.addr)
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("every output line is JSON"))
            .collect()
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

async fn start(config: CollectorConfig) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut r = start_on(config, &out).await;
    r._dir = Some(dir);
    r
}

async fn start_on(config: CollectorConfig, out: &Path) -> Running {
    let output: Arc<dyn Output> = Arc::new(JsonlOutput::open(out).unwrap());
    let keys = Arc::new(ApiKeys::from_keys([KEY, "other-key"]));
    let collector = Collector::new(config, keys, output);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let c = collector.clone();
    let task = tokio::spawn(async move {
        c.serve(listener, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Running {
        addr,
        collector,
        out: out.to_owned(),
        _dir: None,
        stop: Some(tx),
        task: Some(task),
    }
}

fn ev(id: &str) -> Value {
    json!({"type": "stream_started", "data": {"type": "stream_started", "client_source": "scope", "n": 1.50}, "id": id, "timestamp": "1700000000000"})
}

fn body(events: &[Value]) -> String {
    json!({"app": "scope", "host": "h", "events": events}).to_string()
}

async fn post(
    url: &str,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.body(body).send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let v = resp.json().await.unwrap_or(Value::Null);
    (status, headers, v)
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_unknown_key_is_401() {
    let c = start(CollectorConfig::default()).await;
    let b = body(&[ev("a")]);
    for key in [
        None,
        Some("wrong"),
        Some("test-key-12"),
        Some("test-key-1234"),
    ] {
        let (status, headers, v) = post(&c.url(), key, b.clone()).await;
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert!(v["error"].as_str().unwrap().contains("API key"));
    }
    let resp = reqwest::Client::new()
        .post(c.url())
        .header("authorization", format!("Basic {KEY}"))
        .body(b.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "only the Bearer scheme");
    assert_eq!(c.collector.stats().rejected.unauthorized, 5);
    assert!(c.lines().is_empty());
    let (status, headers, _) = post(&c.url(), Some(KEY), b).await;
    assert_eq!(status, 200);
    assert_eq!(headers["accept-encoding"], "gzip", "gzip is advertised");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_413_without_buffering_them() {
    let c = start(CollectorConfig::default()).await;
    // Declared too large: refused on the header.
    let (status, _, v) = post(&c.url(), Some(KEY), vec![b' '; 1_000_001]).await;
    assert_eq!(status, 413);
    assert!(v["error"].as_str().unwrap().contains("1000001"), "{v}");

    // Streamed (chunked, no Content-Length): cut off once past the limit, long before its end.
    let produced = Arc::new(AtomicU64::new(0));
    let p = Arc::clone(&produced);
    let total: u64 = 64 << 20;
    let chunks = futures::stream::iter((0..total / 65536).map(move |_| {
        p.fetch_add(65536, Ordering::Relaxed);
        Ok::<_, std::io::Error>(vec![b' '; 65536])
    }));
    let resp = reqwest::Client::new()
        .post(c.url())
        .bearer_auth(KEY)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    match resp {
        Ok(r) => assert_eq!(r.status(), 413),
        // The server may close while the client is still writing; either way it stopped early.
        Err(e) => eprintln!("streamed upload ended with {e}"),
    }
    assert!(
        produced.load(Ordering::Relaxed) < total / 2,
        "the server did not read the whole stream"
    );

    // Gzip: small on the wire, too large once decompressed.
    let bomb = gzip(&vec![b' '; 3_000_000]);
    assert!(bomb.len() < 1_000_000);
    let resp = reqwest::Client::new()
        .post(c.url())
        .bearer_auth(KEY)
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    // Too many events.
    let many: Vec<Value> = (0..501).map(|i| ev(&format!("e{i}"))).collect();
    let (status, _, v) = post(&c.url(), Some(KEY), body(&many)).await;
    assert_eq!(status, 413);
    assert!(v["error"].as_str().unwrap().contains("501 events"), "{v}");
    let (status, _, _) = post(&c.url(), Some(KEY), body(&many[..500])).await;
    assert_eq!(status, 200, "500 is fine");
    assert_eq!(c.collector.stats().rejected.too_large, 4);
    assert_eq!(c.lines().len(), 500);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shapes_are_400_with_a_message() {
    let c = start(CollectorConfig::default()).await;
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "JSON object"),
        ("[1,2]".into(), "JSON object"),
        (r#"{"app":"scope"}"#.into(), "no `events`"),
        (r#"{"events":{"a":1}}"#.into(), "must be an array"),
        (r#"{"events":["x"]}"#.into(), "not an object"),
        (body(&[json!({"type":"x","data":{}})]), "no `id`"),
        (body(&[json!({"id":"a","data":{}})]), "no `type`"),
        (body(&[json!({"id":"a","type":"x"})]), "no `data`"),
        (
            body(&[ev("ok"), json!({"id":"b","type":"x","data":"str"})]),
            "event 1",
        ),
    ];
    for (b, want) in &cases {
        let (status, _, v) = post(&c.url(), Some(KEY), b.clone()).await;
        assert_eq!(status, 400, "{b}");
        assert!(v["error"].as_str().unwrap().contains(want), "{b}: {v}");
    }
    let resp = reqwest::Client::new()
        .post(c.url())
        .bearer_auth(KEY)
        .header("content-encoding", "gzip")
        .body("not gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = reqwest::Client::new()
        .post(c.url())
        .bearer_auth(KEY)
        .header("content-encoding", "br")
        .body(body(&[ev("a")]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    assert!(
        c.lines().is_empty(),
        "a bad batch writes nothing, not even its valid events"
    );
    assert_eq!(
        c.collector.stats().rejected.bad_request,
        cases.len() as u64 + 1
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_is_429_with_retry_after_per_key() {
    let c = start(CollectorConfig {
        rate_per_sec: 1.0,
        burst: 2.0,
        ..CollectorConfig::default()
    })
    .await;
    let b = body(&[ev("r")]);
    for _ in 0..2 {
        assert_eq!(post(&c.url(), Some(KEY), b.clone()).await.0, 200);
    }
    let (status, headers, _) = post(&c.url(), Some(KEY), b.clone()).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        post(&c.url(), Some("other-key"), b.clone()).await.0,
        200,
        "buckets are per key"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(post(&c.url(), Some(KEY), b).await.0, 200, "refilled");
    assert_eq!(c.collector.stats().rejected.rate_limited, 1);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_events_are_written_once_and_duplicates_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let c = start_on(CollectorConfig::default(), &out).await;
    let raw_event = r#"{"type":"x","data":{ "type":"x",
  "keep":  1.50 },"id":"pretty","timestamp":"1"}"#;
    let b = format!(
        r#"{{"app":"scope","host":"h","events":[{},{},{raw_event}]}}"#,
        ev("a"),
        ev("b")
    );
    let (status, _, v) = post(&c.url(), Some(KEY), b).await;
    assert_eq!(
        (status, v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (200, Some(3), Some(0)),
        "{v}"
    );
    // Re-sent (at-least-once) plus one new, plus a repeat inside the same request.
    let (status, _, v) = post(
        &c.url(),
        Some(KEY),
        gzip(body(&[ev("a"), ev("b"), ev("c"), ev("c")]).as_bytes()),
    )
    .await;
    assert_eq!(
        status, 400,
        "gzip without Content-Encoding is not JSON: {v}"
    );
    let resp = reqwest::Client::new()
        .post(c.url())
        .bearer_auth(KEY)
        .header("content-encoding", "gzip")
        .body(gzip(body(&[ev("a"), ev("b"), ev("c"), ev("c")]).as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (Some(1), Some(3)),
        "{v}"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0], ev("a").to_string(), "event bytes as received");
    assert_eq!(
        lines[2],
        raw_event.replace('\n', " "),
        "a newline inside JSON whitespace becomes a space"
    );
    let s = c.collector.stats();
    assert_eq!((s.accepted, s.duplicates, s.batches), (4, 3, 2));
    let health: Value = reqwest::get(format!("http://{}/health", c.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["counters"]["accepted"], 4);
    assert_eq!(health["counters"]["duplicates"], 3);
    let ready = reqwest::get(format!("http://{}/ready", c.addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    c.stop().await;

    // A restarted collector remembers the ids in its output: still exactly once.
    let c = start_on(CollectorConfig::default(), &out).await;
    let (status, _, v) = post(&c.url(), Some(KEY), body(&[ev("a"), ev("d")])).await;
    assert_eq!(
        (status, v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (200, Some(1), Some(1)),
        "{v}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 5);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_line_is_cut_when_the_output_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    std::fs::write(&out, format!("{}\n{{\"type\":\"x\",\"da", ev("whole"))).unwrap();
    let c = start_on(CollectorConfig::default(), &out).await;
    assert_eq!(post(&c.url(), Some(KEY), body(&[ev("next")])).await.0, 200);
    let lines = c.lines();
    assert_eq!(
        lines
            .iter()
            .map(|l| l["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["whole", "next"]
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_with_the_same_ids_write_each_once() {
    let c = start(CollectorConfig {
        rate_per_sec: 0.0,
        ..CollectorConfig::default()
    })
    .await;
    let events: Vec<Value> = (0..200).map(|i| ev(&format!("id-{i}"))).collect();
    let b = body(&events);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (url, b) = (c.url(), b.clone());
            tokio::spawn(async move { post(&url, Some(KEY), b).await })
        })
        .collect();
    let mut accepted = 0;
    for t in tasks {
        let (status, _, v) = t.await.unwrap();
        assert_eq!(status, 200);
        accepted += v["accepted"].as_u64().unwrap();
    }
    assert_eq!(accepted, 200);
    assert_eq!(c.lines().len(), 200);
    assert_eq!(c.collector.stats().duplicates, 7 * 200);
    c.stop().await;
}

// ---- The reporter against the real collector ----

fn reporter_config(url: &str, key: &str, dir: &Path) -> ReporterConfig {
    ReporterConfig::new(url, key)
        .with_buffer_path(Some(dir.to_path_buf()))
        .with_flush_interval(Duration::from_millis(30))
        .with_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .with_host("it")
}

fn emit(r: &Reporter, n: u64, tag: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            let e = Event::Built(Box::new(Envelope::new(
                "stream_heartbeat",
                Fields::new().session_id(tag).meta("i", i),
            )));
            let id = e.id().into_owned();
            r.emit(e);
            id
        })
        .collect()
}

async fn settle(
    r: &Arc<Reporter>,
    what: &str,
    cond: impl Fn(&ReporterStats) -> bool,
) -> ReporterStats {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = r.reporter_stats();
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ids_of(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_with_a_wrong_key_pauses_then_delivers_after_the_key_changes() {
    let c = start(CollectorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(Reporter::start(reporter_config(&c.url(), "wrong", dir.path())).unwrap());
    let ids = emit(&r, 50, "s401");
    settle(&r, "paused by 401", |s| s.paused && s.buffered == 50).await;
    assert!(c.lines().is_empty());
    r.set_api_key(KEY);
    let s = settle(&r, "delivered", |s| s.acked == 50).await;
    assert_eq!(s.status_401, 1);
    assert_eq!(ids_of(&c.lines()), ids);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_splits_on_413_from_the_collector_and_drops_a_lone_oversized_event() {
    // The collector takes 16 events or 8 KB per request; the reporter sends up to 500 / 1 MB.
    let c = start(CollectorConfig {
        max_events: 16,
        max_body_bytes: 8_000,
        rate_per_sec: 0.0,
        ..CollectorConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(
        Reporter::start(
            reporter_config(&c.url(), KEY, dir.path())
                .with_flush_interval(Duration::from_millis(200)),
        )
        .unwrap(),
    );
    let mut ids = emit(&r, 100, "s413");
    let big = Event::Built(Box::new(Envelope::new(
        "error",
        Fields::new().meta("blob", "x".repeat(10_000)),
    )));
    r.emit(big);
    ids.extend(emit(&r, 20, "s413b"));
    let s = settle(&r, "resolved", |s| {
        s.acked + s.dropped() == 121 && s.buffered == 0
    })
    .await;
    assert_eq!(s.dropped_oversize, 1, "{s:?}");
    assert!(s.splits_413 > 0);
    assert_eq!(
        ids_of(&c.lines()),
        ids,
        "every other event exactly once, in order"
    );
    assert!(c.collector.stats().rejected.too_large > 0);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_waits_out_the_collectors_rate_limit() {
    let c = start(CollectorConfig {
        rate_per_sec: 1.0,
        burst: 1.0,
        max_events: 10,
        ..CollectorConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(
        Reporter::start(reporter_config(&c.url(), KEY, dir.path()).with_max_batch(10)).unwrap(),
    );
    let ids = emit(&r, 30, "s429");
    let s = settle(&r, "delivered", |s| s.acked == 30).await;
    assert!(s.status_429 >= 1, "{s:?}");
    assert_eq!(ids_of(&c.lines()), ids);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_events_reach_the_output_once() {
    let c = start(CollectorConfig::default()).await;
    // Two reporters (e.g. a crashed run and its restart) deliver the same envelopes.
    let envelopes: Vec<telemetry::RawEnvelope> = (0..40)
        .map(|i| {
            let e = Envelope::new("stream_started", Fields::new().meta("i", i));
            telemetry::RawEnvelope::parse(e.to_json()).unwrap()
        })
        .collect();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for d in [&d1, &d2] {
        let r = Arc::new(Reporter::start(reporter_config(&c.url(), KEY, d.path())).unwrap());
        for e in &envelopes {
            r.emit(Event::Raw(e.clone()));
        }
        settle(&r, "delivered", |s| s.acked == 40).await;
    }
    let lines = c.lines();
    assert_eq!(lines.len(), 40);
    let s = c.collector.stats();
    assert_eq!((s.accepted, s.duplicates), (40, 40));
    eprintln!(
        "dedup: sent 80, written {}, duplicates suppressed {}",
        s.accepted, s.duplicates
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporter_splits_megabyte_bodies_the_collector_refuses_on_content_length() {
    // 500 events of ~2 KB: a ~1 MB body against a 100 KB limit, refused before it is read.
    let c = start(CollectorConfig {
        max_body_bytes: 100_000,
        rate_per_sec: 0.0,
        ..CollectorConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(
        Reporter::start(
            reporter_config(&c.url(), KEY, dir.path())
                .with_flush_interval(Duration::from_millis(300)),
        )
        .unwrap(),
    );
    let ids: Vec<String> = (0..500)
        .map(|i| {
            let e = Event::Built(Box::new(Envelope::new(
                "stream_heartbeat",
                Fields::new().meta("i", i).meta("pad", "p".repeat(2000)),
            )));
            let id = e.id().into_owned();
            r.emit(e);
            id
        })
        .collect();
    let s = settle(&r, "delivered", |s| s.acked == 500).await;
    assert!(s.splits_413 >= 3, "{s:?}");
    assert_eq!(ids_of(&c.lines()), ids);
    c.stop().await;
}
