//! Dedup shared by any number of collectors through one Redis (`--dedup redis://HOST:PORT`).
//!
//! The in-memory window ([`crate::dedup`]) catches a resent batch only when it comes back to the
//! same process. Behind a load balancer, a retry lands on another instance; so each id is
//! *claimed* in Redis before its event is written, and the claim becomes a *commit* once the
//! output has it:
//!
//! ```text
//!   key  trickle-relay:dedup:<id>
//!   claim    SET key <request token> NX PX claim_ttl   (one Lua script per batch, atomic)
//!   commit   SET key "c" PX ttl                        (only where the token is still ours)
//!   release  DEL key                                   (only where the token is still ours)
//! ```
//!
//! An id whose key holds `"c"` is a duplicate. One held by another request's token is being
//! written elsewhere right now: the request polls until that write commits (duplicate) or is
//! released (it writes the event itself), and answers 503 if that takes longer than
//! `wait_for_others`, so the reporter keeps the batch and retries. A claim left by a collector
//! that died mid-write expires after `claim_ttl`, so no event is ever hidden by a dead claim.
//!
//! Redis unreachable (or erroring): the collector answers 503 rather than write without dedup,
//! logs the change once each way, and shows it in `/health` and `/ready`. A commit or release that
//! fails *after* the write was decided (Redis died in between) goes to a repair queue retried
//! every 100 ms until Redis answers: the events are durable, so the request is answered 200 and
//! the commit lands as soon as Redis is back; a released claim is never left to hide an event.
//!
//! What this needs from Redis: persistence that survives its own crash (`appendonly yes`,
//! `appendfsync always`); a Redis that restarts empty forgets every commit, and a batch resent
//! after that is written again. At start the collector warns when `appendonly` is off, and
//! re-commits the latest ids of its own output (a collector killed between its write and its
//! commit leaves a claim that would otherwise expire and let a resend through).

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Prefix of every key this collector writes.
const PREFIX: &str = "trickle-relay:dedup:";
/// Most ids waiting in the repair queue; past it the oldest repair is given up (counted, logged).
const REPAIR_CAP: usize = 1_000_000;

/// Claims each key for `ARGV[1]` unless it exists; 0 fresh (claimed now), 1 duplicate
/// (committed, or earlier in this batch), 2 being written by another request. A key already
/// holding this token was claimed by an earlier attempt of this same call whose answer was lost
/// (the connection broke): still fresh, so the call can be retried safely.
const CLAIM: &str = r#"
local out, seen = {}, {}
for i, k in ipairs(KEYS) do
  if seen[k] then
    out[i] = 1
  elseif redis.call('SET', k, ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = 0
  else
    local v = redis.call('GET', k)
    if v == ARGV[1] then out[i] = 0 elseif v == 'c' then out[i] = 1 else out[i] = 2 end
  end
  seen[k] = true
end
return out
"#;

/// Marks keys committed where they are still ours or gone (our claim expired: the event *was*
/// written); with `ARGV[3] == "force"` whatever holds them. Returns how many belonged to another
/// request (a claim that expired mid-write and was taken over: a possible duplicate).
const COMMIT: &str = r#"
local foreign = 0
for _, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v == ARGV[1] or v == false or ARGV[3] == 'force' then
    redis.call('SET', k, 'c', 'PX', ARGV[2])
  elseif v ~= 'c' then
    foreign = foreign + 1
  end
end
return foreign
"#;

/// Deletes keys still claimed by `ARGV[1]`.
const RELEASE: &str = r#"
for _, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k) end
end
return 0
"#;

/// How one id of a batch was classified by [`RedisDedup::claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Claimed for this request: write it, then commit or release.
    Fresh,
    /// Already written (or earlier in this same request): skip it.
    Duplicate,
    /// Another request is writing it now: ask again later.
    Pending,
}

/// The settings of a shared dedup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisDedupConfig {
    /// `redis://[:PASSWORD@]HOST:PORT[/DB]`.
    pub url: String,
    /// How long a committed id is remembered (the collector's dedup TTL).
    pub ttl: Duration,
    /// How long a claim lives if its collector never commits or releases it (default 60 s):
    /// longer than any output write may take.
    pub claim_ttl: Duration,
    /// How long a request waits for ids another collector is writing before answering 503
    /// (default 5 s).
    pub wait_for_others: Duration,
    /// Timeout of one Redis connect or command (default 1 s).
    pub timeout: Duration,
}

impl RedisDedupConfig {
    /// The defaults for `url` with committed ids remembered for `ttl`.
    pub fn new(url: impl Into<String>, ttl: Duration) -> RedisDedupConfig {
        RedisDedupConfig {
            url: url.into(),
            ttl,
            claim_ttl: Duration::from_secs(60),
            wait_for_others: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
        }
    }
}

/// Why Redis could not answer (the request is answered 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dedup store (redis at {addr}) unavailable: {reason}")]
pub struct Unavailable {
    /// Host and port (never the password).
    pub addr: String,
    /// What failed.
    pub reason: String,
}

/// A commit or release still owed to Redis.
struct Repair {
    token: String,
    keys: Vec<String>,
    /// Commit (`Some(force)`) or release (`None`).
    commit: Option<bool>,
}

/// What `/health` shows of the shared dedup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RedisDedupHealth {
    /// Host and port.
    pub addr: String,
    /// The last command reached Redis.
    pub reachable: bool,
    /// Why the last command failed, while unreachable.
    pub error: Option<String>,
    /// Ids whose commit or release waits for Redis.
    pub repair_backlog: usize,
    /// Ids whose repair was given up (the queue was full): each may be written twice.
    pub repairs_given_up: u64,
    /// Commits that found their id claimed by another request (a claim expired mid-write).
    pub claims_lost: u64,
}

struct Inner {
    client: Client,
    addr: String,
    config: RedisDedupConfig,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    claim: Script,
    commit: Script,
    release: Script,
    reachable: AtomicBool,
    last_error: Mutex<Option<String>>,
    repairs: Mutex<VecDeque<Repair>>,
    repair_ids: AtomicU64,
    repairs_given_up: AtomicU64,
    claims_lost: AtomicU64,
    wake_repair: tokio::sync::Notify,
}

/// The shared dedup: cheap to clone. Must be created inside a Tokio runtime (it starts the
/// repair task, which ends when the last clone is dropped).
#[derive(Clone)]
pub struct RedisDedup {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisDedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDedup")
            .field("addr", &self.inner.addr)
            .finish()
    }
}

impl RedisDedup {
    /// Parses the URL (no connection yet: an unreachable Redis is answered 503 per request, not
    /// refused at start) and starts the repair task.
    pub fn start(config: RedisDedupConfig) -> Result<RedisDedup, String> {
        let client = Client::open(config.url.as_str())
            .map_err(|e| format!("--dedup: {e}; expected redis://[:PASSWORD@]HOST:PORT[/DB]"))?;
        let info = client.get_connection_info();
        let addr = format!("{}/{}", info.addr, info.redis.db);
        let inner = Arc::new(Inner {
            client,
            addr,
            config,
            conn: tokio::sync::Mutex::new(None),
            claim: Script::new(CLAIM),
            commit: Script::new(COMMIT),
            release: Script::new(RELEASE),
            reachable: AtomicBool::new(true),
            last_error: Mutex::new(None),
            repairs: Mutex::new(VecDeque::new()),
            repair_ids: AtomicU64::new(0),
            repairs_given_up: AtomicU64::new(0),
            claims_lost: AtomicU64::new(0),
            wake_repair: tokio::sync::Notify::new(),
        });
        tokio::spawn(repair_loop(Arc::downgrade(&inner)));
        Ok(RedisDedup { inner })
    }

    /// Host, port and database (for logs; never the password).
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// A token naming one request's claims.
    pub fn token(&self) -> String {
        uuid::Uuid::new_v4().simple().to_string()
    }

    /// Claims `ids` for `token` in one atomic script; one [`Claim`] per id, in order.
    pub async fn claim(&self, token: &str, ids: &[&str]) -> Result<Vec<Claim>, Unavailable> {
        let claim_ms = self.inner.config.claim_ttl.as_millis().max(1) as u64;
        let mut call = self.inner.claim.prepare_invoke();
        for id in ids {
            call.key(key(id));
        }
        call.arg(token).arg(claim_ms);
        let call = &call;
        let codes: Vec<u8> = self
            .run(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        if codes.len() != ids.len() {
            return Err(self.failed(format!(
                "the claim script answered {} verdicts for {} ids",
                codes.len(),
                ids.len()
            )));
        }
        Ok(codes
            .into_iter()
            .map(|c| match c {
                0 => Claim::Fresh,
                1 => Claim::Duplicate,
                _ => Claim::Pending,
            })
            .collect())
    }

    /// The output has the events of `ids` claimed by `token`: remember them. If Redis cannot be
    /// reached now, the commit is queued and retried until it can (the events are durable).
    pub async fn commit(&self, token: &str, ids: Vec<String>) {
        let keys = ids.iter().map(|id| key(id)).collect();
        if let Err(repair) = self
            .apply(Repair {
                token: token.to_owned(),
                keys,
                commit: Some(false),
            })
            .await
        {
            self.queue_repair(repair);
        }
    }

    /// The write of `ids` claimed by `token` failed: free them for the retry (queued and retried
    /// if Redis cannot be reached now; the claims expire after `claim_ttl` in any case).
    pub async fn release(&self, token: &str, ids: Vec<String>) {
        let keys = ids.iter().map(|id| key(id)).collect();
        if let Err(repair) = self
            .apply(Repair {
                token: token.to_owned(),
                keys,
                commit: None,
            })
            .await
        {
            self.queue_repair(repair);
        }
    }

    /// Marks `ids` committed whoever claims them, in the background (the latest events of this
    /// collector's own output, at start).
    pub fn recommit(&self, ids: Vec<String>) {
        for chunk in ids.chunks(500) {
            self.queue_repair(Repair {
                token: String::new(),
                keys: chunk.iter().map(|id| key(id)).collect(),
                commit: Some(true),
            });
        }
    }

    /// `PING`: `Ok` when Redis answers now (`/ready`).
    pub async fn ping(&self) -> Result<(), Unavailable> {
        self.run(|mut c| async move {
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .map(drop)
        })
        .await
    }

    /// Warns (once, at start) when Redis would forget every commit on its own restart. Best
    /// effort: a Redis that refuses `CONFIG GET` (managed services) is not second-guessed.
    pub async fn check_persistence(&self) {
        let got = self
            .run(|mut c| async move {
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg("appendonly")
                    .query_async::<Vec<String>>(&mut c)
                    .await
            })
            .await;
        if let Ok(kv) = got {
            if kv.get(1).is_some_and(|v| v == "no") {
                tracing::warn!(target: "collector", redis = %self.inner.addr,
                    "the dedup Redis runs without appendonly: if it restarts, every remembered id is forgotten and a batch resent after that is written again (run it with --appendonly yes --appendfsync always)");
            }
        }
    }

    /// What `/health` shows.
    pub fn health(&self) -> RedisDedupHealth {
        let i = &self.inner;
        let reachable = i.reachable.load(Relaxed);
        RedisDedupHealth {
            addr: i.addr.clone(),
            reachable,
            error: if reachable {
                None
            } else {
                i.last_error.lock().clone()
            },
            repair_backlog: i.repair_ids.load(Relaxed) as usize,
            repairs_given_up: i.repairs_given_up.load(Relaxed),
            claims_lost: i.claims_lost.load(Relaxed),
        }
    }

    /// How long a request waits for ids another collector is writing.
    pub fn wait_for_others(&self) -> Duration {
        self.inner.config.wait_for_others
    }

    async fn apply(&self, r: Repair) -> Result<(), Repair> {
        let res = match r.commit {
            Some(force) => {
                let ttl_ms = self.inner.config.ttl.as_millis().max(1) as u64;
                let mut call = self.inner.commit.prepare_invoke();
                for k in &r.keys {
                    call.key(k);
                }
                call.arg(&r.token)
                    .arg(ttl_ms)
                    .arg(if force { "force" } else { "" });
                let call = &call;
                self.run(|mut c| async move { call.invoke_async::<u64>(&mut c).await })
                    .await
            }
            None => {
                let mut call = self.inner.release.prepare_invoke();
                for k in &r.keys {
                    call.key(k);
                }
                call.arg(&r.token);
                let call = &call;
                self.run(|mut c| async move { call.invoke_async::<u64>(&mut c).await })
                    .await
            }
        };
        match res {
            Ok(foreign) => {
                if foreign > 0 {
                    self.inner.claims_lost.fetch_add(foreign, Relaxed);
                    tracing::warn!(target: "collector", ids = foreign,
                        "ids written here were claimed by another request meanwhile (this write outlived its claim): they may be written twice; raise --dedup-claim-secs");
                }
                Ok(())
            }
            Err(_) => Err(r),
        }
    }

    fn queue_repair(&self, r: Repair) {
        let i = &self.inner;
        let mut q = i.repairs.lock();
        i.repair_ids.fetch_add(r.keys.len() as u64, Relaxed);
        q.push_back(r);
        while i.repair_ids.load(Relaxed) > REPAIR_CAP as u64 {
            let Some(old) = q.pop_front() else { break };
            let n = old.keys.len() as u64;
            i.repair_ids.fetch_sub(n, Relaxed);
            i.repairs_given_up.fetch_add(n, Relaxed);
            tracing::error!(target: "collector", ids = n, "dedup repair queue full while Redis is unreachable: giving up the oldest commit (those ids may be written twice if resent)");
        }
        drop(q);
        i.wake_repair.notify_one();
    }

    /// Runs one Redis command on the shared connection, (re)connecting first when needed. A
    /// command that fails on a connection made earlier is tried once more on a fresh one (Redis
    /// may have restarted since; every script here is safe to repeat). A failure drops the
    /// connection and marks Redis unreachable.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, Unavailable>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let i = &self.inner;
        let cached = i.conn.lock().await.clone();
        let first = match cached {
            Some(c) => match f(c).await {
                Ok(v) => Ok(v),
                Err(_) => {
                    *i.conn.lock().await = None;
                    self.connect_and(&f).await
                }
            },
            None => self.connect_and(&f).await,
        };
        match first {
            Ok(v) => {
                if !i.reachable.swap(true, Relaxed) {
                    tracing::info!(target: "collector", redis = %i.addr, "dedup store reachable again; accepting batches");
                }
                Ok(v)
            }
            Err(e) => {
                *i.conn.lock().await = None;
                Err(self.failed(e))
            }
        }
    }

    async fn connect_and<T, F, Fut>(&self, f: &F) -> Result<T, String>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let i = &self.inner;
        let c = {
            let mut slot = i.conn.lock().await;
            match slot.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let cfg = AsyncConnectionConfig::new()
                        .set_connection_timeout(i.config.timeout)
                        .set_response_timeout(i.config.timeout);
                    let c = i
                        .client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await
                        .map_err(|e| e.to_string())?;
                    *slot = Some(c.clone());
                    c
                }
            }
        };
        f(c).await.map_err(|e| e.to_string())
    }

    fn failed(&self, reason: String) -> Unavailable {
        let i = &self.inner;
        if i.reachable.swap(false, Relaxed) {
            tracing::error!(target: "collector", redis = %i.addr, error = %reason,
                "dedup store unreachable: answering 503 (the reporter keeps and retries) rather than writing without dedup");
        }
        *i.last_error.lock() = Some(reason.clone());
        Unavailable {
            addr: i.addr.clone(),
            reason,
        }
    }
}

fn key(id: &str) -> String {
    let mut k = String::with_capacity(PREFIX.len() + id.len());
    k.push_str(PREFIX);
    k.push_str(id);
    k
}

/// Retries queued commits and releases in order, every 100 ms while Redis is unreachable (and,
/// with nothing queued, pings it every 250 ms until it answers). Holds
/// the dedup only while working or waiting (at most 1 s), so it ends soon after the last clone.
async fn repair_loop(weak: Weak<Inner>) {
    while let Some(inner) = weak.upgrade() {
        let this = RedisDedup { inner };
        let next = this.inner.repairs.lock().pop_front();
        let Some(r) = next else {
            if this.inner.reachable.load(Relaxed) {
                let wake = this.inner.wake_repair.notified();
                let _ = tokio::time::timeout(Duration::from_secs(1), wake).await;
            } else {
                // Unreachable and idle: find out when it is back, so `/health` says so.
                let _ = this.ping().await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            continue;
        };
        let n = r.keys.len() as u64;
        match this.apply(r).await {
            Ok(()) => {
                this.inner.repair_ids.fetch_sub(n, Relaxed);
            }
            Err(r) => {
                this.inner.repairs.lock().push_front(r);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
