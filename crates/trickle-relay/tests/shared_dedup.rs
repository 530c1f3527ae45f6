//! Three `trickle-relay collector --dedup redis://...` processes sharing one real `redis-server`
//! (started on a free loopback port; `scripts/test.sh` installs it), as several collectors behind
//! a load balancer: every batch is sent to every instance, by concurrent senders, twice over; and
//! Redis is killed (`kill -9`) and restarted mid-run. Each event must be in exactly one output.

mod common;

use collector::test_redis::TestRedis;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "shared-dedup-test-key";
const BATCHES: usize = 90;
const PER_BATCH: usize = 40;

struct Instance {
    _proc: Proc,
    addr: SocketAddr,
    out: PathBuf,
    log: PathBuf,
}

fn collectors(dir: &Path, redis_url: &str) -> Vec<Instance> {
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    (0..3)
        .map(|i| {
            let addr = free_addr();
            let out = dir.join(format!("out-{i}.jsonl"));
            let log = dir.join(format!("collector-{i}.log"));
            let proc = Proc::spawn(
                &[
                    "collector",
                    "--listen",
                    &addr.to_string(),
                    "--api-keys",
                    keys.to_str().unwrap(),
                    "--output",
                    &format!("jsonl:{}", out.display()),
                    "--dedup",
                    redis_url,
                    "--rate",
                    "0",
                ],
                Some(&log),
            );
            wait_listening(addr);
            Instance {
                _proc: proc,
                addr,
                out,
                log,
            }
        })
        .collect()
}

/// `BATCHES` request bodies of `PER_BATCH` events with fresh ids; returns (ids, bodies).
fn batches() -> (Vec<String>, Vec<String>) {
    let mut all = Vec::new();
    let bodies = (0..BATCHES)
        .map(|b| {
            let events: Vec<Value> = (0..PER_BATCH)
                .map(|i| {
                    let id = uuid::Uuid::new_v4().to_string();
                    all.push(id.clone());
                    json!({"type": "stream_heartbeat", "id": id, "timestamp": "1700000000000",
                           "data": {"type": "stream_heartbeat", "batch": b, "i": i}})
                })
                .collect();
            json!({"app": "scope", "host": "test", "events": events}).to_string()
        })
        .collect();
    (all, bodies)
}

/// What the senders saw.
#[derive(Default)]
struct Seen {
    sent: AtomicU64,
    unavailable: AtomicU64,
}

/// Six concurrent senders: sender `s` sends every batch, in order (senders 3-5 in reverse), to
/// instance `(batch + s) % 3`, so each batch reaches each instance twice, often at the same
/// moment; each send is repeated until it is answered 200, as the reporter does.
fn send_all(instances: &[Instance], bodies: &[String], seen: &Arc<Seen>) {
    let urls: Vec<String> = instances
        .iter()
        .map(|i| format!("http://{}/v1/metrics", i.addr))
        .collect();
    std::thread::scope(|scope| {
        for s in 0..6usize {
            let (urls, seen) = (&urls, seen.clone());
            scope.spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(20))
                    .build()
                    .unwrap();
                let order: Vec<usize> = if s < 3 {
                    (0..bodies.len()).collect()
                } else {
                    (0..bodies.len()).rev().collect()
                };
                for b in order {
                    let url = &urls[(b + s) % 3];
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let status = http
                            .post(url)
                            .bearer_auth(KEY)
                            .header("content-type", "application/json")
                            .body(bodies[b].clone())
                            .send()
                            .map(|r| r.status().as_u16());
                        match status {
                            Ok(200) => break,
                            Ok(503) => {
                                seen.unavailable.fetch_add(1, Ordering::Relaxed);
                            }
                            other => panic!("batch {b} to {url}: unexpected answer {other:?}"),
                        }
                        assert!(
                            Instant::now() < deadline,
                            "batch {b} never accepted by {url}"
                        );
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    seen.sent.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
}

/// Every id in exactly one output (and nothing else there); returns the count per output.
fn assert_each_once(instances: &[Instance], ids: &[String]) -> Vec<usize> {
    let mut count: HashMap<String, usize> = HashMap::new();
    let mut per = Vec::new();
    for inst in instances {
        let lines = collector_output(&inst.out);
        per.push(lines.len());
        for v in lines {
            *count
                .entry(v["id"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} ids written more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(3)]
    );
    let missing: Vec<_> = ids.iter().filter(|id| !count.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} ids never written, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    assert_eq!(count.len(), ids.len(), "only the sent ids are written");
    per
}

fn health(addr: SocketAddr) -> Option<Value> {
    reqwest::blocking::get(format!("http://{addr}/health"))
        .ok()?
        .json()
        .ok()
}

#[test]
fn three_collectors_sharing_one_redis_write_every_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let redis = TestRedis::start(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let instances = collectors(dir.path(), &redis.url());
    let (ids, bodies) = batches();
    let seen = Arc::new(Seen::default());
    send_all(&instances, &bodies, &seen);
    assert_eq!(seen.sent.load(Ordering::Relaxed), 6 * BATCHES as u64);
    let per = assert_each_once(&instances, &ids);
    // The counters agree with the outputs: each instance accepted what it wrote, and every other
    // delivery of an event was counted a duplicate.
    let (mut accepted, mut duplicates) = (0, 0);
    for (inst, n) in instances.iter().zip(&per) {
        let h = health(inst.addr).expect("health");
        assert_eq!(h["dedup"]["kind"], "redis", "{h}");
        assert_eq!(h["counters"]["accepted"].as_u64(), Some(*n as u64), "{h}");
        accepted += h["counters"]["accepted"].as_u64().unwrap();
        duplicates += h["counters"]["duplicates"].as_u64().unwrap();
    }
    assert_eq!(accepted, ids.len() as u64);
    assert_eq!(duplicates, 5 * ids.len() as u64);
    assert!(
        per.iter().filter(|n| **n > 0).count() >= 2,
        "the writes are spread over the instances: {per:?}"
    );
}

#[test]
fn redis_killed_mid_run_collectors_answer_503_and_nothing_is_lost_or_duplicated() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = TestRedis::start(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let instances = collectors(dir.path(), &redis.url());
    let (ids, bodies) = batches();
    let seen = Arc::new(Seen::default());
    let degraded_seen = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // A third of the way in: kill Redis, see the collectors say so, bring it back.
            wait_until("a third sent", Duration::from_secs(60), || {
                seen.sent.load(Ordering::Relaxed) >= 2 * BATCHES as u64
            });
            redis.kill9();
            wait_until("a 503 answered", Duration::from_secs(20), || {
                seen.unavailable.load(Ordering::Relaxed) > 0
            });
            wait_until("/health degraded", Duration::from_secs(20), || {
                instances.iter().any(|i| {
                    health(i.addr).is_some_and(|h| {
                        h["status"] == "degraded" && h["dedup"]["reachable"] == false
                    })
                })
            });
            degraded_seen.store(true, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1500)); // the outage itself, not a wait for an event
            redis.restart().unwrap_or_else(|e| panic!("{e}"));
        });
        send_all(&instances, &bodies, &seen);
    });
    assert!(degraded_seen.load(Ordering::Relaxed));
    assert!(seen.unavailable.load(Ordering::Relaxed) > 0);
    assert_each_once(&instances, &ids);
    let logs: String = instances
        .iter()
        .map(|i| std::fs::read_to_string(&i.log).unwrap_or_default())
        .collect();
    assert!(
        logs.contains("dedup store unreachable"),
        "the outage is in the log: {}",
        tail(&instances[0].log)
    );
    for inst in &instances {
        wait_until(
            "every instance healthy again",
            Duration::from_secs(10),
            || {
                health(inst.addr)
                    .is_some_and(|h| h["status"] == "ok" && h["dedup"]["repair_backlog"] == 0)
            },
        );
    }
}
