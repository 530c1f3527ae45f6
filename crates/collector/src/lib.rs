//! The `/v1/metrics` collector: the receiving side of the HTTP metrics reporter.
//!
//! `POST /v1/metrics`, checked in this order, each refusal counted:
//!
//! | check | answer |
//! | --- | --- |
//! | `Authorization: Bearer <key>` is one of the keys (constant time, see [`auth`]) | 401 |
//! | the key's token bucket has a token ([`ratelimit`]) | 429 + `Retry-After` (seconds) |
//! | `Content-Encoding` is absent, `identity` or `gzip` | 415 |
//! | `Content-Length` at most `max_body_bytes` (checked before reading any of the body) | 413 |
//! | the body, read as a stream, stays within `max_body_bytes` (cut off as soon as it exceeds) | 413 |
//! | a gzip body decompresses to at most `max_body_bytes` (decompression stops there) | 413 |
//! | the JSON shape: object, `events` array, each event an object with `id`, `type`, `data` | 400 + message |
//! | at most `max_events` events | 413 |
//! | the dedup store answers (only with `--dedup redis://...`, see [`redis_dedup`]) | 503 + `Retry-After` |
//! | the output durably has every new event (duplicates by id skipped) | 200, else 503 |
//!
//! The 200 is sent only after [`Output::append`] resolved, i.e. for the JSONL output after the
//! lines were written and fsynced. Events whose id was accepted within the dedup window are
//! counted as duplicates and not written again, so the reporter's at-least-once delivery becomes
//! exactly-once in the output: within one process by default ([`dedup`]), across any number of
//! collectors sharing one Redis with [`Collector::with_redis_dedup`] ([`redis_dedup`]). Every
//! response carries `Accept-Encoding: gzip`, which tells the reporter it may compress.
//!
//! `GET /health`: liveness plus the counters and the dedup store (`"status": "degraded"` while a
//! shared one is unreachable). `GET /ready`: 200 when the output is writable and the dedup store
//! answers, else 503.
//!
//! [`Collector::serve`] speaks plain HTTP; [`Collector::serve_tls`] the same routes over TLS
//! (HTTP/1.1 and HTTP/2 by ALPN), with the certificate of a [`tls::ServerTls`], which can be
//! reloaded (`collector --tls-cert/--tls-key`, on SIGHUP) without dropping a connection.

pub mod auth;
pub mod dedup;
pub mod output;
pub mod ratelimit;
pub mod redis_dedup;
pub mod test_redis;
pub mod validate;

pub use auth::{ApiKeys, KeysError};
pub use output::{JsonlOutput, Output, OutputError};

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, RETRY_AFTER, WWW_AUTHENTICATE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use dedup::{Dedup, Verdict};
use futures::StreamExt;
use ratelimit::RateLimiter;
use redis_dedup::{Claim, RedisDedup};
use serde::Serialize;
use serde_json::json;
use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use validate::Invalid;

/// Limits and windows of a collector.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectorConfig {
    /// Largest body, compressed or not (default 1,000,000 bytes).
    pub max_body_bytes: usize,
    /// Most events per request (default 500).
    pub max_events: usize,
    /// Requests per second per key on average (default 50; 0 turns limiting off).
    pub rate_per_sec: f64,
    /// Burst per key (default 100).
    pub burst: f64,
    /// Ids remembered for dedup (default 1,000,000).
    pub dedup_capacity: usize,
    /// How long an id is remembered (default 1 h).
    pub dedup_ttl: Duration,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            max_body_bytes: 1_000_000,
            max_events: 500,
            rate_per_sec: 50.0,
            burst: 100.0,
            dedup_capacity: 1_000_000,
            dedup_ttl: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    batches: AtomicU64,
    accepted: AtomicU64,
    duplicates: AtomicU64,
    unauthorized: AtomicU64,
    rate_limited: AtomicU64,
    too_large: AtomicU64,
    bad_request: AtomicU64,
    unsupported_encoding: AtomicU64,
    output_failed: AtomicU64,
    dedup_unavailable: AtomicU64,
    /// How long each write to the output took (`GET /metrics`).
    output_latency: LatencyCounters,
}

/// Upper bounds of the output-latency buckets ([`Collector::output_latency`]), in microseconds.
pub const OUTPUT_LATENCY_BOUNDS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// One relaxed add per bucket hit: the cost of a write to the output is milliseconds.
#[derive(Debug, Default)]
struct LatencyCounters {
    buckets: [AtomicU64; OUTPUT_LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyCounters {
    fn record(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let i = OUTPUT_LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(OUTPUT_LATENCY_BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }
}

/// How long the writes to the output took (each attempt, failed ones too): the count per bucket of
/// [`OUTPUT_LATENCY_BOUNDS_US`] (not cumulative; a last one for the slower), and their sum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputLatency {
    /// Writes per bucket.
    pub counts: Vec<u64>,
    /// Their total time, in microseconds.
    pub sum_us: u64,
}

/// A snapshot of the collector's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CollectorStats {
    /// `POST /v1/metrics` requests.
    pub requests: u64,
    /// Requests answered 200.
    pub batches: u64,
    /// Events written to the output.
    pub accepted: u64,
    /// Events skipped because their id was already accepted.
    pub duplicates: u64,
    /// Requests refused by reason.
    pub rejected: Rejected,
}

/// Refusals by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// 401.
    pub unauthorized: u64,
    /// 429.
    pub rate_limited: u64,
    /// 413.
    pub too_large: u64,
    /// 400.
    pub bad_request: u64,
    /// 415.
    pub unsupported_encoding: u64,
    /// 503 (the output failed).
    pub output_failed: u64,
    /// 503 (the shared dedup store was unreachable, or other collectors held ids too long).
    pub dedup_unavailable: u64,
}

impl CollectorStats {
    /// All refusals.
    pub fn rejected_total(&self) -> u64 {
        let r = &self.rejected;
        r.unauthorized
            + r.rate_limited
            + r.too_large
            + r.bad_request
            + r.unsupported_encoding
            + r.output_failed
            + r.dedup_unavailable
    }
}

struct Inner {
    config: CollectorConfig,
    keys: Arc<ApiKeys>,
    output: Arc<dyn Output>,
    limiter: RateLimiter,
    dedup: DedupStore,
    counters: Counters,
}

/// Where the ids already written are remembered.
enum DedupStore {
    /// This process's window.
    Memory(Dedup),
    /// Shared by every collector on one Redis.
    Redis(RedisDedup),
}

/// A collector: cheap to clone (shared state).
#[derive(Clone)]
pub struct Collector {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector")
            .field("config", &self.inner.config)
            .field("output", &self.inner.output.name())
            .finish()
    }
}

/// Why a request was refused.
enum Reject {
    Unauthorized,
    RateLimited(u64),
    Unsupported(String),
    TooLarge(String),
    BadRequest(String),
    Output(String),
    Dedup(String),
}

impl Collector {
    /// A collector over `output`, accepting `keys`. Seeds the dedup window with the ids of the
    /// output's latest events, so duplicates are caught across restarts.
    pub fn new(config: CollectorConfig, keys: Arc<ApiKeys>, output: Arc<dyn Output>) -> Collector {
        let dedup = Dedup::new(config.dedup_capacity, config.dedup_ttl);
        let recent = output.recent_ids(config.dedup_capacity);
        let seeded = dedup.seed(recent.iter().map(String::as_str));
        if seeded > 0 {
            tracing::info!(target: "collector", seeded, "dedup window seeded from the output's latest events");
        }
        Self::build(config, keys, output, DedupStore::Memory(dedup))
    }

    /// A collector whose dedup is shared through Redis with every other collector on it
    /// (`config.dedup_capacity` and `dedup_ttl` are the Redis dedup's own settings then). Queues a
    /// re-commit of the output's latest ids (up to 10,000), in case this collector was killed
    /// between a write and its commit.
    pub fn with_redis_dedup(
        config: CollectorConfig,
        keys: Arc<ApiKeys>,
        output: Arc<dyn Output>,
        dedup: RedisDedup,
    ) -> Collector {
        dedup.recommit(output.recent_ids(config.dedup_capacity.min(10_000)));
        Self::build(config, keys, output, DedupStore::Redis(dedup))
    }

    fn build(
        config: CollectorConfig,
        keys: Arc<ApiKeys>,
        output: Arc<dyn Output>,
        dedup: DedupStore,
    ) -> Collector {
        Collector {
            inner: Arc::new(Inner {
                limiter: RateLimiter::new(config.rate_per_sec, config.burst),
                config,
                keys,
                output,
                dedup,
                counters: Counters::default(),
            }),
        }
    }

    /// The accepted keys (to reload them).
    pub fn keys(&self) -> &Arc<ApiKeys> {
        &self.inner.keys
    }

    /// The counters now.
    pub fn stats(&self) -> CollectorStats {
        let c = &self.inner.counters;
        CollectorStats {
            requests: c.requests.load(Relaxed),
            batches: c.batches.load(Relaxed),
            accepted: c.accepted.load(Relaxed),
            duplicates: c.duplicates.load(Relaxed),
            rejected: Rejected {
                unauthorized: c.unauthorized.load(Relaxed),
                rate_limited: c.rate_limited.load(Relaxed),
                too_large: c.too_large.load(Relaxed),
                bad_request: c.bad_request.load(Relaxed),
                unsupported_encoding: c.unsupported_encoding.load(Relaxed),
                output_failed: c.output_failed.load(Relaxed),
                dedup_unavailable: c.dedup_unavailable.load(Relaxed),
            },
        }
    }

    /// How long the writes to the output took so far.
    pub fn output_latency(&self) -> OutputLatency {
        let l = &self.inner.counters.output_latency;
        OutputLatency {
            counts: l.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum_us: l.sum_us.load(Relaxed),
        }
    }

    /// Logs the counters (one line).
    pub fn log_stats(&self) {
        let s = self.stats();
        let r = s.rejected;
        tracing::info!(target: "collector",
            requests = s.requests, accepted = s.accepted, duplicates = s.duplicates,
            unauthorized = r.unauthorized, rate_limited = r.rate_limited, too_large = r.too_large,
            bad_request = r.bad_request, unsupported_encoding = r.unsupported_encoding, output_failed = r.output_failed,
            dedup_unavailable = r.dedup_unavailable, "collector counters");
    }

    /// The routes: `POST /v1/metrics`, `GET /health`, `GET /ready`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/metrics", post(metrics))
            .route("/health", get(health))
            .route("/ready", get(ready))
            .layer(axum::middleware::map_response(advertise_gzip))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.serve_with(listener, Router::new(), shutdown).await
    }

    /// [`Collector::serve`] with `extra` routes beside the collector's (e.g. `GET /metrics`).
    pub async fn serve_with(
        self,
        listener: tokio::net::TcpListener,
        extra: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = self.router().merge(extra);
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
    }

    /// Serves on `listener` over TLS until `shutdown` resolves, then lets open requests finish.
    /// Each connection's handshake (at most 10 s) uses the certificate in service when it was
    /// accepted; a failed handshake is logged at debug level and costs nothing else.
    pub async fn serve_tls(
        self,
        listener: tokio::net::TcpListener,
        tls: tls::ServerTls,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.serve_tls_with(listener, Router::new(), tls, shutdown)
            .await
    }

    /// [`Collector::serve_tls`] with `extra` routes beside the collector's (e.g. `GET /metrics`).
    pub async fn serve_tls_with(
        self,
        listener: tokio::net::TcpListener,
        extra: Router,
        tls: tls::ServerTls,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use tower::ServiceExt as _;
        const HANDSHAKE: Duration = Duration::from_secs(10);
        let app = self.router().merge(extra);
        let stop = tokio_util::sync::CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            on_signal.cancel();
        });
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (acceptor, app, stop) = (tls.acceptor(), app.clone(), stop.clone());
            conns.spawn(async move {
                let _ = tcp.set_nodelay(true);
                let stream = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                // The handlers see the peer address, as over plain HTTP.
                let service = hyper::service::service_fn(
                    move |mut req: axum::http::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(ConnectInfo(peer));
                        app.clone().oneshot(req.map(Body::new))
                    },
                );
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
        drop(listener);
        while conns.join_next().await.is_some() {}
        Ok(())
    }

    async fn handle(
        &self,
        headers: &HeaderMap,
        body: Body,
        peer: Option<SocketAddr>,
    ) -> Result<(u64, u64), Reject> {
        let inner = &self.inner;
        let cfg = &inner.config;
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        let Some(key) = token.and_then(|t| inner.keys.check(t.as_bytes())) else {
            let n = inner.counters.unauthorized.fetch_add(1, Relaxed) + 1;
            // The key is never logged; the first refusals and then powers of two are warned.
            if n.is_power_of_two() {
                tracing::warn!(target: "collector", peer = ?peer, refused_so_far = n, "request with a missing or unknown API key refused (401)");
            }
            return Err(Reject::Unauthorized);
        };
        if let Err(wait) = inner.limiter.take(&key) {
            inner.counters.rate_limited.fetch_add(1, Relaxed);
            return Err(Reject::RateLimited(ratelimit::retry_after_secs(wait)));
        }
        let gzip = match headers
            .get(CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
        {
            None => false,
            Some(e) if e.is_empty() || e == "identity" => false,
            Some(e) if e == "gzip" || e == "x-gzip" => true,
            Some(e) => {
                inner.counters.unsupported_encoding.fetch_add(1, Relaxed);
                return Err(Reject::Unsupported(format!(
                    "Content-Encoding {e:?} is not supported; send identity or gzip"
                )));
            }
        };
        let max = cfg.max_body_bytes;
        let too_large = |what: String| {
            inner.counters.too_large.fetch_add(1, Relaxed);
            Reject::TooLarge(what)
        };
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(len) = declared {
            if len > max as u64 {
                return Err(too_large(format!(
                    "body of {len} bytes; at most {max} are accepted, split the batch"
                )));
            }
        }
        let bad = |what: String| {
            inner.counters.bad_request.fetch_add(1, Relaxed);
            Reject::BadRequest(what)
        };
        let mut raw = Vec::with_capacity(declared.unwrap_or(0).min(max as u64) as usize);
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| bad(format!("cannot read the body: {e}")))?;
            if raw.len() + chunk.len() > max {
                return Err(too_large(format!(
                    "body exceeds {max} bytes; split the batch"
                )));
            }
            raw.extend_from_slice(&chunk);
        }
        let body = if gzip {
            let mut out = Vec::with_capacity((raw.len() * 4).min(max));
            let mut dec = flate2::read::MultiGzDecoder::new(raw.as_slice()).take(max as u64 + 1);
            dec.read_to_end(&mut out)
                .map_err(|e| bad(format!("gzip body is corrupt: {e}")))?;
            if out.len() > max {
                return Err(too_large(format!(
                    "gzip body decompresses past {max} bytes; split the batch"
                )));
            }
            out
        } else {
            raw
        };
        let events = match validate::validate(&body, cfg.max_events) {
            Ok(ev) => ev,
            Err(Invalid::Shape(m)) => return Err(bad(m)),
            Err(e @ Invalid::TooManyEvents { .. }) => return Err(too_large(e.to_string())),
        };
        // In its own task: a reporter that disconnects (or is killed) mid-request cancels this
        // handler, and a write cancelled between the output and the dedup commit would let the
        // resent batch be written twice.
        let this = self.clone();
        match tokio::spawn(async move { this.accept(events).await }).await {
            Ok(result) => result,
            Err(e) => Err(Reject::Output(format!("the write task failed: {e}"))),
        }
    }

    /// Writes the events not seen before, durably; returns (accepted, duplicates).
    async fn accept(&self, events: Vec<validate::ValidEvent>) -> Result<(u64, u64), Reject> {
        let result = match &self.inner.dedup {
            DedupStore::Memory(dedup) => self.accept_memory(dedup, events).await,
            DedupStore::Redis(dedup) => self.accept_redis(dedup, events).await,
        };
        if result.is_ok() {
            self.inner.counters.batches.fetch_add(1, Relaxed);
        }
        result
    }

    /// [`Self::accept`] with this process's window.
    async fn accept_memory(
        &self,
        dedup: &Dedup,
        events: Vec<validate::ValidEvent>,
    ) -> Result<(u64, u64), Reject> {
        let inner = &self.inner;
        let (mut accepted, mut dups) = (0u64, 0u64);
        let mut todo = events;
        while !todo.is_empty() {
            let mut res = dedup.reservation();
            let mut fresh: Vec<Bytes> = Vec::new();
            let mut waits = Vec::new();
            let mut later = Vec::new();
            for ev in todo.drain(..) {
                match res.reserve(&ev.id) {
                    Verdict::Fresh => fresh.push(ev.json),
                    Verdict::Duplicate => dups += 1,
                    Verdict::Wait(rx) => {
                        waits.push(rx);
                        later.push(ev);
                    }
                }
            }
            if !fresh.is_empty() {
                let n = fresh.len() as u64;
                let began = Instant::now();
                let written = inner.output.append(fresh).await;
                inner.counters.output_latency.record(began.elapsed());
                if let Err(e) = written {
                    inner.counters.output_failed.fetch_add(1, Relaxed);
                    tracing::error!(target: "collector", error = %e, "cannot write accepted events; answering 503 so the reporter retries");
                    return Err(Reject::Output(e.to_string()));
                }
                res.commit();
                accepted += n;
            } else {
                drop(res);
            }
            // Another request is writing some of these ids: its outcome decides (see `dedup`).
            for mut rx in waits {
                let _ = rx.wait_for(|done| *done).await;
            }
            todo = later;
        }
        inner.counters.accepted.fetch_add(accepted, Relaxed);
        inner.counters.duplicates.fetch_add(dups, Relaxed);
        Ok((accepted, dups))
    }

    /// [`Self::accept`] with the dedup shared through Redis: claim the batch's ids in one script,
    /// write the fresh ones, commit them (or release them if the write failed), and poll for the
    /// ids another collector is writing until it settles them.
    async fn accept_redis(
        &self,
        dedup: &RedisDedup,
        events: Vec<validate::ValidEvent>,
    ) -> Result<(u64, u64), Reject> {
        let inner = &self.inner;
        let token = dedup.token();
        let deadline = Instant::now() + dedup.wait_for_others();
        let mut pause = Duration::from_millis(5);
        let mut todo = events;
        let (mut accepted, mut dups) = (0u64, 0u64);
        let unavailable = |m: String| {
            inner.counters.dedup_unavailable.fetch_add(1, Relaxed);
            Reject::Dedup(m)
        };
        loop {
            let ids: Vec<&str> = todo.iter().map(|e| e.id.as_str()).collect();
            let verdicts = dedup
                .claim(&token, &ids)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let (mut fresh_ids, mut fresh) = (Vec::new(), Vec::new());
            let mut later = Vec::new();
            for (ev, verdict) in todo.into_iter().zip(verdicts) {
                match verdict {
                    Claim::Fresh => {
                        fresh_ids.push(ev.id);
                        fresh.push(ev.json);
                    }
                    Claim::Duplicate => dups += 1,
                    Claim::Pending => later.push(ev),
                }
            }
            if !fresh.is_empty() {
                let n = fresh.len() as u64;
                let began = Instant::now();
                let written = inner.output.append(fresh).await;
                inner.counters.output_latency.record(began.elapsed());
                if let Err(e) = written {
                    // Free the claims so the retry (here or on another collector) writes them.
                    dedup.release(&token, fresh_ids).await;
                    inner.counters.output_failed.fetch_add(1, Relaxed);
                    inner.counters.duplicates.fetch_add(dups, Relaxed);
                    tracing::error!(target: "collector", error = %e, "cannot write accepted events; answering 503 so the reporter retries");
                    return Err(Reject::Output(e.to_string()));
                }
                dedup.commit(&token, fresh_ids).await;
                accepted += n;
                inner.counters.accepted.fetch_add(n, Relaxed);
            }
            if later.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                inner.counters.duplicates.fetch_add(dups, Relaxed);
                return Err(unavailable(format!(
                    "{} ids are being written by another collector; retry",
                    later.len()
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
            todo = later;
        }
        inner.counters.duplicates.fetch_add(dups, Relaxed);
        Ok((accepted, dups))
    }

    /// Says whether a shared dedup store answers now (logged either way), and warns when it would
    /// forget its ids on a restart. Nothing to check for the in-memory window.
    pub async fn check_dedup(&self) {
        if let DedupStore::Redis(d) = &self.inner.dedup {
            match d.ping().await {
                Ok(()) => {
                    tracing::info!(target: "collector", redis = %d.addr(), "dedup shared through redis");
                    d.check_persistence().await;
                }
                Err(e) => {
                    tracing::error!(target: "collector", error = %e, "dedup store unreachable at start: answering 503 until it answers")
                }
            }
        }
    }

    /// The shared dedup store's state (`--dedup redis://...`; `None` with the in-memory one).
    pub fn redis_dedup_health(&self) -> Option<redis_dedup::RedisDedupHealth> {
        match &self.inner.dedup {
            DedupStore::Memory(_) => None,
            DedupStore::Redis(d) => Some(d.health()),
        }
    }

    /// The dedup store as `/health` shows it.
    fn dedup_health(&self) -> (bool, serde_json::Value) {
        match &self.inner.dedup {
            DedupStore::Memory(d) => (true, json!({ "kind": "memory", "ids": d.len() })),
            DedupStore::Redis(d) => {
                let h = d.health();
                let mut v = json!({ "kind": "redis" });
                if let (Some(obj), Ok(serde_json::Value::Object(fields))) =
                    (v.as_object_mut(), serde_json::to_value(&h))
                {
                    obj.extend(fields);
                }
                (h.reachable, v)
            }
        }
    }
}

async fn advertise_gzip(mut r: Response) -> Response {
    r.headers_mut()
        .insert(ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
    r
}

fn error(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

async fn metrics(
    State(c): State<Collector>,
    peer: Option<ConnectInfo<SocketAddr>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    c.inner.counters.requests.fetch_add(1, Relaxed);
    match c.handle(&headers, body, peer.map(|p| p.0)).await {
        Ok((accepted, duplicates)) => (
            StatusCode::OK,
            Json(json!({ "accepted": accepted, "duplicates": duplicates })),
        )
            .into_response(),
        Err(Reject::Unauthorized) => {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "missing or unknown API key (Authorization: Bearer <key>)",
            );
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
        Err(Reject::RateLimited(secs)) => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate limit exceeded for this API key; retry after Retry-After seconds",
            );
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
            r
        }
        Err(Reject::Unsupported(m)) => error(StatusCode::UNSUPPORTED_MEDIA_TYPE, &m),
        Err(Reject::TooLarge(m)) => error(StatusCode::PAYLOAD_TOO_LARGE, &m),
        Err(Reject::BadRequest(m)) => error(StatusCode::BAD_REQUEST, &m),
        Err(Reject::Output(m) | Reject::Dedup(m)) => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("events not stored: {m}"),
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

async fn health(State(c): State<Collector>) -> Json<serde_json::Value> {
    let (dedup_ok, dedup) = c.dedup_health();
    let status = if dedup_ok { "ok" } else { "degraded" };
    Json(
        json!({ "status": status, "output": c.inner.output.name(), "dedup": dedup, "counters": c.stats() }),
    )
}

async fn ready(State(c): State<Collector>) -> Response {
    let mut check = c
        .inner
        .output
        .check_ready()
        .await
        .map_err(|e| e.to_string());
    if let (Ok(()), DedupStore::Redis(d)) = (&check, &c.inner.dedup) {
        check = d.ping().await.map_err(|e| e.to_string());
    }
    match check {
        Ok(()) => Json(json!({ "ready": true })).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "error": e })),
        )
            .into_response(),
    }
}
