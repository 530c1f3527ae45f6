//! The shared dedup (`--dedup redis://...`) against a real `redis-server` over loopback: several
//! collectors in this process sharing one Redis, each with its own JSONL output.
//!
//! Two faults here cannot be caused for real at the right instant, so the output is wrapped: a
//! write that fails (as a full disk would) and a write that takes its time (as a slow disk or a
//! Kafka broker would). Both wrappers say so where they are defined; everything else is real.

use collector::redis_dedup::{RedisDedup, RedisDedupConfig};
use collector::test_redis::TestRedis;
use collector::{ApiKeys, Collector, CollectorConfig, JsonlOutput, Output, OutputError};
use futures::future::BoxFuture;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "test-key-123";

/// Fault injection, not a real output: fails its first `fail_first` appends (a disk that is full,
/// then has room again) and delays every append by `delay` (a slow disk), around a real JSONL file.
struct Faulty {
    real: JsonlOutput,
    fail_first: AtomicU64,
    delay: Duration,
    started: tokio::sync::Notify,
}

impl Output for Faulty {
    fn name(&self) -> &'static str {
        "faulty-jsonl"
    }

    fn append(&self, events: Vec<bytes::Bytes>) -> BoxFuture<'_, Result<(), OutputError>> {
        Box::pin(async move {
            self.started.notify_one();
            tokio::time::sleep(self.delay).await;
            let left = self.fail_first.load(Ordering::SeqCst);
            if left > 0 {
                self.fail_first.store(left - 1, Ordering::SeqCst);
                return Err(OutputError {
                    output: "faulty-jsonl",
                    reason: "injected: no space left on device".into(),
                });
            }
            self.real.append(events).await
        })
    }

    fn check_ready(&self) -> BoxFuture<'_, Result<(), OutputError>> {
        self.real.check_ready()
    }

    fn recent_ids(&self, limit: usize) -> Vec<String> {
        self.real.recent_ids(limit)
    }
}

struct Running {
    addr: SocketAddr,
    out: PathBuf,
    faulty: Arc<Faulty>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Running {
    fn url(&self) -> String {
        format!("http://{}/v1/metrics", self.addr)
    }

    fn ids(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("every output line is JSON");
                v["id"].as_str().expect("id").to_owned()
            })
            .collect()
    }

    async fn health(&self) -> Value {
        reqwest::get(format!("http://{}/health", self.addr))
            .await
            .expect("health")
            .json()
            .await
            .expect("health JSON")
    }

    async fn ready(&self) -> u16 {
        reqwest::get(format!("http://{}/ready", self.addr))
            .await
            .expect("ready")
            .status()
            .as_u16()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

fn redis(dir: &Path) -> TestRedis {
    TestRedis::start(dir).unwrap_or_else(|e| panic!("{e}"))
}

/// A collector sharing `redis_url`, writing to `out` through the fault wrapper.
async fn start(redis_url: &str, out: &Path, fail_first: u64, delay: Duration) -> Running {
    let config = CollectorConfig {
        rate_per_sec: 0.0,
        ..CollectorConfig::default()
    };
    let mut dedup = RedisDedupConfig::new(redis_url, config.dedup_ttl);
    dedup.wait_for_others = Duration::from_secs(5);
    let dedup = RedisDedup::start(dedup).expect("redis url");
    let faulty = Arc::new(Faulty {
        real: JsonlOutput::open(out).expect("open output"),
        fail_first: AtomicU64::new(fail_first),
        delay,
        started: tokio::sync::Notify::new(),
    });
    let keys = Arc::new(ApiKeys::from_keys([KEY]));
    let collector = Collector::with_redis_dedup(config, keys, faulty.clone(), dedup);
    collector.check_dedup().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = collector
            .serve(listener, async move {
                let _ = rx.await;
            })
            .await;
    });
    Running {
        addr,
        out: out.to_owned(),
        faulty,
        stop: Some(tx),
    }
}

fn batch(tag: &str, n: usize) -> (Vec<String>, String) {
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    let events: Vec<Value> = ids
        .iter()
        .map(|id| json!({"type": "stream_heartbeat", "data": {"type": "stream_heartbeat"}, "id": id, "timestamp": "1700000000000"}))
        .collect();
    (
        ids,
        json!({"app": "scope", "host": "h", "events": events}).to_string(),
    )
}

/// Status and JSON answer of one POST.
async fn post(url: &str, body: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Posts `body` to `to` in the background; returns once its output started writing the batch.
async fn post_until_writing(to: &Running, body: &str) -> tokio::task::JoinHandle<(u16, Value)> {
    let (url, body) = (to.url(), body.to_owned());
    let task = tokio::spawn(async move { post(&url, &body).await });
    to.faulty.started.notified().await;
    task
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_resent_to_another_collector_is_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let r = redis(dir.path());
    let a = start(&r.url(), &dir.path().join("a.jsonl"), 0, Duration::ZERO).await;
    let b = start(&r.url(), &dir.path().join("b.jsonl"), 0, Duration::ZERO).await;
    let (ids, body) = batch("resent", 40);
    let (status, v) = post(&a.url(), &body).await;
    assert_eq!((status, v["accepted"].as_u64()), (200, Some(40)), "{v}");
    let (status, v) = post(&b.url(), &body).await;
    assert_eq!(
        (status, v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (200, Some(0), Some(40)),
        "{v}"
    );
    assert_eq!(a.ids(), ids);
    assert!(b.ids().is_empty());
    // The same id twice in one request is one event.
    let ev = json!({"type": "error", "data": {"type": "error"}, "id": "twice", "timestamp": "1"});
    let doubled = json!({"app": "scope", "host": "h", "events": [ev, ev]}).to_string();
    let (status, v) = post(&b.url(), &doubled).await;
    assert_eq!(
        (status, v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (200, Some(1), Some(1)),
        "{v}"
    );
    let h = b.health().await;
    assert_eq!(h["dedup"]["kind"], "redis", "{h}");
    assert_eq!(h["dedup"]["reachable"], true, "{h}");
    assert_eq!(h["status"], "ok", "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_releases_its_claims_so_the_retry_elsewhere_writes_them_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let r = redis(dir.path());
    let failing = start(&r.url(), &dir.path().join("a.jsonl"), 1, Duration::ZERO).await;
    let b = start(&r.url(), &dir.path().join("b.jsonl"), 0, Duration::ZERO).await;
    let (ids, body) = batch("released", 30);
    let (status, v) = post(&failing.url(), &body).await;
    assert_eq!(status, 503, "the write failed after the claim: {v}");
    // Had the claims stayed, B would wait for them (5 s here, then 503) until they expired (60 s).
    let started = Instant::now();
    let (status, v) = post(&b.url(), &body).await;
    assert_eq!((status, v["accepted"].as_u64()), (200, Some(30)), "{v}");
    // Released claims: at once. Held ones: the whole 5 s wait, then 503.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the retry waited {:?} for claims of a failed write",
        started.elapsed()
    );
    assert_eq!(b.ids(), ids);
    assert!(failing.ids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_another_collector_is_writing_are_waited_for_and_counted_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let r = redis(dir.path());
    let slow = start(
        &r.url(),
        &dir.path().join("a.jsonl"),
        0,
        Duration::from_millis(800),
    )
    .await;
    let b = start(&r.url(), &dir.path().join("b.jsonl"), 0, Duration::ZERO).await;
    let (ids, body) = batch("concurrent", 25);
    // B gets the batch while A is inside its (slow) write, holding the claims.
    let first = post_until_writing(&slow, &body).await;
    let (status, v) = post(&b.url(), &body).await;
    assert_eq!(
        (status, v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (200, Some(0), Some(25)),
        "B must wait for A's write, then count duplicates: {v}"
    );
    let (status, v) = first.await.unwrap();
    assert_eq!((status, v["accepted"].as_u64()), (200, Some(25)), "{v}");
    assert_eq!(slow.ids(), ids);
    assert!(b.ids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_503_in_health_and_ready_then_everything_once_when_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = redis(dir.path());
    let a = start(&r.url(), &dir.path().join("a.jsonl"), 0, Duration::ZERO).await;
    let b = start(&r.url(), &dir.path().join("b.jsonl"), 0, Duration::ZERO).await;
    let (before, body_before) = batch("before", 20);
    assert_eq!(post(&a.url(), &body_before).await.0, 200);
    assert_eq!(a.ready().await, 200);

    r.kill9();
    let (during, body_during) = batch("during", 20);
    let (status, v) = post(&a.url(), &body_during).await;
    assert_eq!(status, 503, "no dedup, no write: {v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("dedup store"),
        "the answer says why: {v}"
    );
    let h = a.health().await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["dedup"]["reachable"], false, "{h}");
    assert!(h["dedup"]["error"].is_string(), "{h}");
    assert!(
        h["counters"]["rejected"]["dedup_unavailable"].as_u64() >= Some(1),
        "{h}"
    );
    assert_eq!(a.ready().await, 503);
    assert!(a.ids().len() == 20, "nothing written while Redis is down");

    r.restart().unwrap();
    // The retries: the failed batch to B, the earlier one resent to B (it was committed before
    // the kill; the append-only file kept it).
    let (status, v) = post(&b.url(), &body_during).await;
    assert_eq!((status, v["accepted"].as_u64()), (200, Some(20)), "{v}");
    let (status, v) = post(&b.url(), &body_before).await;
    assert_eq!((status, v["duplicates"].as_u64()), (200, Some(20)), "{v}");
    assert_eq!(a.ids(), before);
    assert_eq!(b.ids(), during);
    wait_for("A healthy again", Duration::from_secs(5), async || {
        a.health().await["status"] == "ok"
    })
    .await;
    assert_eq!(a.ready().await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_lost_to_a_redis_crash_is_repaired_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = redis(dir.path());
    let slow = start(
        &r.url(),
        &dir.path().join("a.jsonl"),
        0,
        Duration::from_millis(600),
    )
    .await;
    let b = start(&r.url(), &dir.path().join("b.jsonl"), 0, Duration::ZERO).await;
    let (ids, body) = batch("repaired", 15);
    // Redis dies after the claim, while the events are being written: the commit cannot land.
    let first = post_until_writing(&slow, &body).await;
    r.kill9();
    let (status, v) = first.await.unwrap();
    assert_eq!(
        (status, v["accepted"].as_u64()),
        (200, Some(15)),
        "the events are durable, so the request succeeded: {v}"
    );
    let h = slow.health().await;
    assert_eq!(h["dedup"]["repair_backlog"], 15, "{h}");

    r.restart().unwrap();
    wait_for("the commit repaired", Duration::from_secs(10), async || {
        slow.health().await["dedup"]["repair_backlog"] == 0
    })
    .await;
    let (status, v) = post(&b.url(), &body).await;
    assert_eq!(
        (status, v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (200, Some(0), Some(15)),
        "{v}"
    );
    assert_eq!(slow.ids(), ids);
    assert!(b.ids().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_collector_recommits_the_latest_ids_of_its_own_output() {
    let dir = tempfile::tempdir().unwrap();
    let r = redis(dir.path());
    // What a collector killed between its write and its commit leaves: the events in its output,
    // no commit in Redis (its claims expire).
    let (ids, body) = batch("orphan", 12);
    let out_a = dir.path().join("a.jsonl");
    let written: String = serde_json::from_str::<Value>(&body).unwrap()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{e}\n"))
        .collect();
    std::fs::write(&out_a, written).unwrap();
    let a = start(&r.url(), &out_a, 0, Duration::ZERO).await;
    wait_for("the recommit", Duration::from_secs(10), async || {
        a.health().await["dedup"]["repair_backlog"] == 0
    })
    .await;
    let b = start(&r.url(), &dir.path().join("b.jsonl"), 0, Duration::ZERO).await;
    let (status, v) = post(&b.url(), &body).await;
    assert_eq!(
        (status, v["accepted"].as_u64(), v["duplicates"].as_u64()),
        (200, Some(0), Some(12)),
        "{v}"
    );
    assert_eq!(a.ids(), ids);
    assert!(b.ids().is_empty());
}
