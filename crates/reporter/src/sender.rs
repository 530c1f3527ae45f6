//! The sender: reads batches from the buffer, POSTs them, and applies the response contract.
//!
//! It runs on its own thread with its own single-threaded tokio runtime, so the reporter works
//! whatever runtime (if any) its caller uses, and its blocking disk reads and acks (fsyncs) never
//! stall anyone else's tasks.

use crate::buffer::{Batch, Item, Source};
use crate::config::GzipMode;
use crate::Shared;
use flate2::write::GzEncoder;
use flate2::Compression;
use rand::Rng;
use reqwest::header::{
    HeaderMap, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER,
};
use reqwest::StatusCode;
use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Bodies smaller than this are not worth compressing (under `GzipMode::Auto`).
const GZIP_MIN_BYTES: usize = 1024;
/// The longest `Retry-After` honoured; a larger one is clamped (a typo must not stall for days).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What one request came to.
enum Outcome {
    Status(StatusCode, HeaderMap, String),
    Network(String),
    Stopped,
}

/// One part of a batch: a run of consecutive events of one source, resolved as a whole.
struct Part {
    source: Source,
    items: Vec<Item>,
}

impl Part {
    fn last_key(&self) -> u64 {
        self.items.last().map_or(0, |i| i.key)
    }
}

pub(crate) struct Sender {
    shared: Arc<Shared>,
    client: reqwest::Client,
    /// The current batch, split by 413s; the front part is sent next.
    parts: VecDeque<Part>,
    /// The front part failed before and is being re-sent.
    retrying: bool,
    /// Consecutive 5xx / network failures (the backoff exponent).
    failures: u32,
    /// No request before this (backoff or Retry-After).
    not_before: Option<Instant>,
    /// Paused by a 401 sent with this key generation.
    paused_gen: Option<u64>,
    /// When the last batch was taken, for the flush interval.
    last_batch: Instant,
    /// The server advertised `Accept-Encoding: gzip`.
    server_gzip: bool,
    /// A gzip body was refused with 415: never compress again.
    gzip_refused: bool,
    body: Vec<u8>,
}

impl Sender {
    pub fn new(shared: Arc<Shared>) -> Result<Sender, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(shared.config.request_timeout)
            .connect_timeout(shared.config.request_timeout.min(Duration::from_secs(10)))
            .user_agent(concat!(
                "trickle-relay-reporter/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()?;
        Ok(Sender {
            shared,
            client,
            parts: VecDeque::new(),
            retrying: false,
            failures: 0,
            not_before: None,
            paused_gen: None,
            last_batch: Instant::now(),
            server_gzip: false,
            gzip_refused: false,
            body: Vec::new(),
        })
    }

    /// Waits for a wake-up (new data, flush, key change, stop) or `until`.
    async fn wait(&self, until: Option<Instant>) {
        let s = &self.shared;
        match until {
            Some(t) => {
                tokio::select! {
                    _ = s.wake.notified() => {}
                    _ = s.stop.cancelled() => {}
                    _ = tokio::time::sleep_until(t) => {}
                }
            }
            None => {
                tokio::select! {
                    _ = s.wake.notified() => {}
                    _ = s.stop.cancelled() => {}
                }
            }
        }
    }

    pub async fn run(mut self) {
        let s = Arc::clone(&self.shared);
        let interval = s.config.flush_interval;
        // A flush cuts a backoff short once: the epoch it was cut for.
        let mut cut_for_epoch = s.flush_epoch.load(Relaxed);
        loop {
            if s.stop.is_cancelled() {
                return;
            }
            if let Some(g) = self.paused_gen {
                if s.key_generation() == g {
                    self.wait(None).await;
                    continue;
                }
                self.paused_gen = None;
                s.counters.paused.store(false, Relaxed);
                tracing::info!(target: "reporter", "metrics reporter: API key changed; resuming sending");
            }
            if let Some(t) = self.not_before {
                let epoch = s.flush_epoch.load(Relaxed);
                let flush_cut = s.flushers.load(Relaxed) > 0 && epoch != cut_for_epoch;
                if Instant::now() < t && !flush_cut {
                    self.wait(Some(t)).await;
                    continue;
                }
                cut_for_epoch = epoch;
                self.not_before = None;
            }
            if self.parts.is_empty() {
                let force = s.flushers.load(Relaxed) > 0;
                let available = s.buffer.len();
                let due = self.last_batch.elapsed() >= interval;
                if available == 0 {
                    self.last_batch = Instant::now();
                    self.wait(Some(Instant::now() + interval)).await;
                    continue;
                }
                if !(force || due || self.retrying || available >= s.config.max_batch as u64) {
                    self.wait(Some(self.last_batch + interval)).await;
                    continue;
                }
                let budget = s
                    .config
                    .max_body_bytes
                    .saturating_sub(s.body.overhead(s.config.max_batch));
                match s.buffer.peek(s.config.max_batch, budget) {
                    Ok(Some(Batch { source, items })) => {
                        self.parts.push_back(Part { source, items });
                    }
                    Ok(None) => {
                        self.wait(Some(Instant::now() + interval)).await;
                        continue;
                    }
                    Err(e) => {
                        s.counters.disk.disk_errors.fetch_add(1, Relaxed);
                        tracing::error!(target: "reporter", error = %e, "metrics reporter: cannot read the disk buffer; retrying");
                        self.not_before = Some(Instant::now() + s.config.backoff_base);
                        continue;
                    }
                }
                self.last_batch = Instant::now();
            }
            self.send_front().await;
            s.progress();
        }
    }

    /// Sends the front part and applies the answer.
    async fn send_front(&mut self) {
        let s = Arc::clone(&self.shared);
        let c = &s.counters;
        let Some(part) = self.parts.front() else {
            return;
        };
        let n = part.items.len() as u64;
        s.body.build(
            part.items.iter().map(|i| i.bytes.as_slice()),
            &mut self.body,
        );
        let gzip = !self.gzip_refused
            && match s.config.gzip {
                GzipMode::Always => true,
                GzipMode::Never => false,
                GzipMode::Auto => self.server_gzip && self.body.len() >= GZIP_MIN_BYTES,
            };
        c.gzip.store(gzip, Relaxed);
        let (key, key_gen) = s.api_key();
        let mut req = self
            .client
            .post(&s.config.url)
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, format!("Bearer {key}"));
        req = if gzip {
            match gzip_bytes(&self.body) {
                Ok(z) => req.header(CONTENT_ENCODING, "gzip").body(z),
                Err(_) => req.body(self.body.clone()),
            }
        } else {
            req.body(self.body.clone())
        };
        c.requests.fetch_add(1, Relaxed);
        c.sent.fetch_add(n, Relaxed);
        if self.retrying {
            c.retries.fetch_add(1, Relaxed);
        }
        let outcome = tokio::select! {
            r = async {
                match req.send().await {
                    Ok(resp) => {
                        let status = resp.status();
                        let headers = resp.headers().clone();
                        // The body only matters for logging errors; a short read is enough.
                        let text = if status.is_success() { String::new() } else { resp.text().await.unwrap_or_default() };
                        Outcome::Status(status, headers, text)
                    }
                    Err(e) => Outcome::Network(error_chain(&e)),
                }
            } => r,
            _ = s.stop.cancelled() => Outcome::Stopped,
        };
        let (status, headers, text) = match outcome {
            Outcome::Stopped => return,
            Outcome::Network(e) => {
                c.network_errors.fetch_add(1, Relaxed);
                self.keep();
                let wait = self.backoff();
                tracing::warn!(target: "reporter", events = n, error = %e, retry_in = ?wait,
                    "metrics reporter: network error; keeping the batch and retrying");
                return;
            }
            Outcome::Status(status, headers, text) => (status, headers, text),
        };
        if s.config.gzip == GzipMode::Auto {
            let advertised = headers.get_all(ACCEPT_ENCODING).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains("gzip"))
            });
            if advertised && !self.server_gzip {
                tracing::debug!(target: "reporter", "metrics reporter: server accepts gzip; compressing bodies from now on");
            }
            self.server_gzip = advertised;
        }
        let snippet: String = text.chars().take(300).collect();
        match status.as_u16() {
            200..=299 => {
                let removed = self.resolve_front("acked");
                c.acked.fetch_add(removed.unwrap_or(n), Relaxed);
                self.failures = 0;
                tracing::debug!(target: "reporter", events = n, gzip, "metrics reporter: batch delivered");
            }
            400 => {
                self.resolve_front("dropped (400)");
                c.dropped_400.fetch_add(n, Relaxed);
                tracing::error!(target: "reporter", events = n, answer = %snippet,
                    "metrics reporter: the metrics API rejected the batch as malformed (400); dropped it (counted as dropped_400)");
            }
            401 => {
                c.status_401.fetch_add(1, Relaxed);
                self.keep();
                self.paused_gen = Some(key_gen);
                c.paused.store(true, Relaxed);
                tracing::error!(target: "reporter", buffered = s.buffer.len(),
                    "metrics reporter: the metrics API refused the API key (401); keeping every event and pausing until the key changes (set SCOPE_CLOUD_API_KEY / --api-key-file and send SIGHUP)");
            }
            413 => {
                self.retrying = false;
                if n > 1 {
                    c.splits_413.fetch_add(1, Relaxed);
                    if let Some(mut front) = self.parts.pop_front() {
                        let back = front.items.split_off(front.items.len() / 2);
                        tracing::warn!(target: "reporter", events = n, bytes = self.body.len(),
                            "metrics reporter: batch too large (413); splitting it in halves and retrying");
                        self.parts.push_front(Part {
                            source: front.source,
                            items: back,
                        });
                        self.parts.push_front(front);
                    }
                } else {
                    self.resolve_front("dropped (413)");
                    c.dropped_oversize.fetch_add(1, Relaxed);
                    tracing::error!(target: "reporter", bytes = self.body.len(), answer = %snippet,
                        "metrics reporter: a single event is too large for the metrics API (413); dropped it (counted as dropped_oversize)");
                }
            }
            415 if gzip => {
                self.gzip_refused = true;
                c.status_other.fetch_add(1, Relaxed);
                self.keep();
                tracing::warn!(target: "reporter",
                    "metrics reporter: the metrics API refused a gzip body (415); sending uncompressed from now on");
            }
            429 => {
                c.status_429.fetch_add(1, Relaxed);
                self.keep();
                let wait = retry_after(&headers).unwrap_or(s.config.default_retry_after);
                self.not_before = Some(Instant::now() + wait);
                tracing::warn!(target: "reporter", events = n, retry_in = ?wait,
                    "metrics reporter: rate limited (429); keeping the batch and waiting");
            }
            500..=599 => {
                c.status_5xx.fetch_add(1, Relaxed);
                self.keep();
                let wait = self.backoff();
                tracing::warn!(target: "reporter", status = status.as_u16(), events = n, retry_in = ?wait, answer = %snippet,
                    "metrics reporter: server error; keeping the batch and retrying with backoff");
            }
            other => {
                c.status_other.fetch_add(1, Relaxed);
                self.keep();
                let wait = self.backoff();
                tracing::warn!(target: "reporter", status = other, events = n, retry_in = ?wait, answer = %snippet,
                    "metrics reporter: unexpected answer; keeping the batch and retrying with backoff (check DAYDREAM_METRICS_URL)");
            }
        }
    }

    /// A keep-outcome: forget the in-hand parts, so the retry re-reads the buffer's head (events
    /// the cap dropped meanwhile are then not sent, and not counted twice).
    fn keep(&mut self) {
        self.parts.clear();
        self.retrying = true;
    }

    /// Removes the front part from the buffer (a 200, or a drop) and forgets it.
    /// Returns how many events it removed where that is known exactly (memory), else `None`.
    fn resolve_front(&mut self, what: &str) -> Option<u64> {
        let part = self.parts.pop_front()?;
        self.retrying = false;
        match self
            .shared
            .buffer
            .remove_through(part.source, part.last_key())
        {
            Ok(removed) => removed,
            Err(e) => {
                self.shared.counters.disk.disk_errors.fetch_add(1, Relaxed);
                tracing::error!(target: "reporter", error = %e, events = part.items.len(),
                    "metrics reporter: batch {what} but the disk buffer could not record it; it will be sent again (the collector drops duplicates by id)");
                None
            }
        }
    }

    /// Schedules the next try after a failure: 1 s doubling to 60 s (configurable), with jitter.
    fn backoff(&mut self) -> Duration {
        let cfg = &self.shared.config;
        let exp = self.failures.min(30);
        self.failures = self.failures.saturating_add(1);
        let base = cfg
            .backoff_base
            .saturating_mul(1u32 << exp.min(20))
            .min(cfg.backoff_max);
        // +-20% jitter, so many clients do not retry in lockstep; never beyond the cap.
        let factor = rand::thread_rng().gen_range(0.8..1.2);
        let wait = base.mul_f64(factor).min(cfg.backoff_max);
        self.not_before = Some(Instant::now() + wait);
        wait
    }
}

/// `Retry-After` in seconds (an HTTP date is not honoured: the default applies).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let secs: f64 = v.parse().ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(secs).min(MAX_RETRY_AFTER))
}

fn gzip_bytes(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::with_capacity(body.len() / 4 + 64), Compression::fast());
    enc.write_all(body)?;
    enc.finish()
}

/// The error and its causes on one line (reqwest's top-level message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_reads_seconds_only() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("999999999"));
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
    }
}
