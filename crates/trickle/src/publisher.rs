//! The trickle publisher: writes a channel's segments, one streamed HTTP POST per segment.
//!
//! Reference behaviour (go-livepeer `trickle_publisher.go`, pytrickle `publisher.py`):
//! - Sequence numbers start at **0**, as both reference publishers do. A restarted publisher
//!   ([`PublisherOptions::reset`]) instead starts at the channel's write head (`GET {url}/next`, 0 if
//!   the channel does not exist) so it never collides with old data, and its first POST carries
//!   `Lp-Trickle-Reset: 1`, which makes the server close every older segment (readers stuck on a
//!   dead publisher wake up).
//! - While segment `n` is written, the POST of `n+1` is already open (preconnected), so switching
//!   segments costs no round trip.
//! - A failed POST is retried once (after [`PublisherOptions::retry_delay`], on a fresh connection,
//!   re-sending the bytes already written to the segment, which the segment keeps up to
//!   [`PublisherOptions::max_retry_bytes`]). After 3 consecutive failed segments the publisher is
//!   terminal: every call returns [`PublishError::Terminal`] and [`Publisher::state`] says so.
//! - Reconnect (an addition, off by default): with [`PublisherOptions::reconnect_window`] set, a
//!   segment whose POST fails with a transient error ([`PublishError::is_transient`]: no
//!   connection or 5xx start an outage; a 404 or a closed channel only continue one, as a
//!   restarted server recreates its channels, but alone they are a deliberate end) is retried with
//!   capped backoff (100 ms doubling to 2 s) until the server is back, for up to that window,
//!   re-sending its bytes on the same seq. Sequence numbers carry on across the outage, so
//!   subscribers resume where they were (the server, ours and go-livepeer's, accepts any seq on a
//!   recreated channel, and a subscriber that broke off mid-segment resumes it at its byte offset).
//!   One warning per outage, one info when it ends (when a segment is next acknowledged);
//!   [`PublisherStats::reconnects`] counts outages survived. Only when the window passes do
//!   failures count towards the terminal state.
//! - Memory is bounded when the server is slow: each segment's body is fed through a small bounded
//!   queue, so [`SegmentWriter::write`] waits (backpressure) instead of buffering without limit.
//! - [`Publisher::close`] DELETEs the channel, as the reference publisher does, so subscribers end
//!   (their next request answers 404).
//! - `https://` URLs: [`PublisherOptions::tls`] says how the server's certificate is treated (see
//!   [`crate::client_tls`]). A refused certificate ([`PublishError::Tls`]) makes the publisher
//!   terminal at once: it is not retried, not even within the reconnect window.
//!
//! A [`SegmentWriter`] dropped without [`SegmentWriter::close`] aborts its POST (the connection is
//! cut, never ended cleanly), so a half-written segment is never mistaken for a complete one.

use bytes::Bytes;
use parking_lot::Mutex;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::client_tls::{http_client, ClientTls, CONNECT_TIMEOUT};
use crate::headers;

/// Segments that fail in a row before the publisher gives up (reference publisher: 3).
pub const MAX_CONSECUTIVE_FAILURES: u32 = 3;

/// Chunks queued ahead of the HTTP connection per segment; small, so `write` feels backpressure.
const BODY_QUEUE: usize = 8;

/// Options of a [`Publisher`].
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    /// This publisher restarts an earlier one: start at the channel's `/next` and send
    /// `Lp-Trickle-Reset: 1` on the first POST.
    pub reset: bool,
    /// Pause before the single retry of a failed POST.
    pub retry_delay: Duration,
    /// Bytes of a segment kept for its retry; a segment that grows past this cannot be retried.
    pub max_retry_bytes: usize,
    /// `Content-Type` of every POST (the server takes the channel's MIME type from the first one).
    pub content_type: String,
    /// How long to keep retrying a segment through a server outage (see the module docs);
    /// `Duration::ZERO` (the default) keeps the reference behaviour: one retry per segment.
    pub reconnect_window: Duration,
    /// How an `https://` server's certificate is treated (default: any is accepted, as the
    /// reference clients do).
    pub tls: ClientTls,
    /// Local address to connect from (`None`: the system's choice). Spreading many publishers
    /// over several loopback addresses (`127.0.0.x`) multiplies the ~28,000 ephemeral ports one
    /// source address has towards one server port.
    pub local_address: Option<IpAddr>,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            reset: false,
            retry_delay: Duration::from_millis(500),
            max_retry_bytes: 8 << 20,
            content_type: "application/octet-stream".to_string(),
            reconnect_window: Duration::ZERO,
            tls: ClientTls::default(),
            local_address: None,
        }
    }
}

/// Why publishing failed. Every message names the URL and, where there is one, the fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// No TCP connection (or it broke): the server is down, restarting, or the URL is wrong.
    #[error("cannot reach {url} ({cause}): is the trickle server running?")]
    Unreachable {
        /// The request URL.
        url: String,
        /// The lowest-level cause, e.g. `connection refused`.
        cause: String,
    },
    /// The server's TLS certificate was refused ([`PublisherOptions::tls`] verifies it). Never
    /// retried: the publisher is terminal at once.
    #[error("TLS certificate of {url} refused: {reason}; {hint}")]
    Tls {
        /// The request URL.
        url: String,
        /// Why it was refused, e.g. an unknown issuer or another host name.
        reason: String,
        /// What to do about it, naming the flag.
        hint: String,
    },
    /// The channel does not exist (404) and the server does not create channels on POST.
    #[error(
        "channel {url} does not exist (HTTP 404): create it on the server or enable autocreate"
    )]
    ChannelGone {
        /// The request URL.
        url: String,
    },
    /// The server closed the channel while this segment's POST was open.
    #[error("channel of {url} was closed by the server (Lp-Trickle-Closed)")]
    ChannelClosed {
        /// The request URL.
        url: String,
    },
    /// The server answered before the segment was complete, so the rest could not be delivered.
    #[error("{url} answered HTTP {status} before the segment was complete")]
    EndedEarly {
        /// The request URL.
        url: String,
        /// The status it answered.
        status: u16,
    },
    /// Any other non-200 answer.
    #[error("{url} answered HTTP {status}: {body}")]
    Http {
        /// The request URL.
        url: String,
        /// The status.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
    /// This segment already failed (after its retry); open the next one.
    #[error("segment {seq} already failed; open the next segment")]
    SegmentFailed {
        /// The failed segment.
        seq: i64,
    },
    /// Too many consecutive failed segments: the publisher gave up.
    #[error("publisher gave up after {failures} consecutive failed segments; last error: {last}")]
    Terminal {
        /// Consecutive failures when it gave up.
        failures: u32,
        /// The last error, as text.
        last: String,
    },
    /// The publisher was closed.
    #[error("the publisher is closed")]
    Closed,
    /// A background task died (a bug, or the runtime is shutting down).
    #[error("internal error: {0}")]
    Internal(String),
}

impl PublishError {
    /// Whether the error is what a server outage or restart looks like (no connection, HTTP 5xx,
    /// a channel missing or closed while it is recreated): worth retrying within
    /// [`PublisherOptions::reconnect_window`].
    pub fn is_transient(&self) -> bool {
        match self {
            PublishError::Unreachable { .. }
            | PublishError::ChannelGone { .. }
            | PublishError::ChannelClosed { .. } => true,
            PublishError::Http { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// Where a [`Publisher`] stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublisherState {
    /// Publishing; `consecutive_failures` segments failed in a row so far (0 when healthy).
    Active {
        /// Failed segments since the last good one.
        consecutive_failures: u32,
    },
    /// Gave up after [`MAX_CONSECUTIVE_FAILURES`] failed segments.
    Terminal {
        /// The last error, as text.
        error: String,
    },
    /// [`Publisher::close`] was called.
    Closed,
}

/// Counters of a [`Publisher`] (all of its segments).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublisherStats {
    /// Segments handed out by [`Publisher::next_segment`].
    pub segments: u64,
    /// Segments closed and acknowledged (HTTP 200) by the server.
    pub segments_ok: u64,
    /// Segments that failed even after their retry.
    pub segments_failed: u64,
    /// Bytes accepted by [`SegmentWriter::write`].
    pub bytes: u64,
    /// POSTs retried.
    pub retries: u64,
    /// Outages (transient failures) the publisher got through by reconnecting.
    pub reconnects: u64,
}

#[derive(Default)]
struct Counters {
    segments: AtomicU64,
    segments_ok: AtomicU64,
    segments_failed: AtomicU64,
    bytes: AtomicU64,
    retries: AtomicU64,
    reconnects: AtomicU64,
}

#[derive(Default)]
struct Health {
    consecutive_failures: u32,
    terminal: Option<String>,
    closed: bool,
    /// When the current outage began (first transient failure since the last success).
    outage_since: Option<Instant>,
}

/// First pause of the reconnect backoff.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest pause of the reconnect backoff.
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// State shared by a publisher and its segment writers (they outlive `&mut Publisher` borrows).
struct Shared {
    client: reqwest::Client,
    url: String,
    opts: PublisherOptions,
    health: Mutex<Health>,
    counters: Counters,
}

impl Shared {
    fn check(&self) -> Result<(), PublishError> {
        let h = self.health.lock();
        if let Some(last) = &h.terminal {
            return Err(PublishError::Terminal {
                failures: h.consecutive_failures,
                last: last.clone(),
            });
        }
        if h.closed {
            return Err(PublishError::Closed);
        }
        Ok(())
    }

    fn record_success(&self) {
        self.counters.segments_ok.fetch_add(1, Ordering::Relaxed);
        let mut h = self.health.lock();
        if h.terminal.is_none() {
            h.consecutive_failures = 0;
        }
        if let Some(since) = h.outage_since.take() {
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(url = %self.url, down_ms = since.elapsed().as_millis() as u64,
                "trickle publisher reconnected; publishing resumes on the same sequence numbers");
        }
    }

    /// Notes a transient failure; true while the outage is within the reconnect window.
    /// Warns once per outage. Only a lost connection or a 5xx starts an outage.
    fn outage(&self, err: &PublishError) -> bool {
        let window = self.opts.reconnect_window;
        if window.is_zero() {
            return false;
        }
        let mut h = self.health.lock();
        match h.outage_since {
            Some(since) => since.elapsed() < window,
            // A missing or closed channel on a reachable server is an orchestrator's decision,
            // not an outage: it only continues one that a lost connection started.
            None if matches!(
                err,
                PublishError::ChannelGone { .. } | PublishError::ChannelClosed { .. }
            ) =>
            {
                false
            }
            None => {
                h.outage_since = Some(Instant::now());
                tracing::warn!(url = %self.url, error = %err, window_s = window.as_secs_f64(),
                    "trickle server unreachable; retrying the open segment until it is back");
                true
            }
        }
    }

    fn stats(&self) -> PublisherStats {
        let c = &self.counters;
        PublisherStats {
            segments: c.segments.load(Ordering::Relaxed),
            segments_ok: c.segments_ok.load(Ordering::Relaxed),
            segments_failed: c.segments_failed.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
        }
    }

    /// True while an outage is being ridden out within the reconnect window.
    fn reconnecting(&self) -> bool {
        let window = self.opts.reconnect_window;
        let h = self.health.lock();
        !window.is_zero() && h.outage_since.is_some_and(|since| since.elapsed() < window)
    }

    fn record_failure(&self, err: &PublishError) {
        self.counters
            .segments_failed
            .fetch_add(1, Ordering::Relaxed);
        // A segment lost within the reconnect window (e.g. too big to re-send) is counted, but
        // does not bring the publisher down while the outage may still end.
        if err.is_transient() && self.reconnecting() {
            return;
        }
        let mut h = self.health.lock();
        h.consecutive_failures += 1;
        // A refused certificate will not be accepted on the next try either.
        let refused = matches!(err, PublishError::Tls { .. });
        if (refused || h.consecutive_failures >= MAX_CONSECUTIVE_FAILURES) && h.terminal.is_none() {
            tracing::error!(url = %self.url, failures = h.consecutive_failures, error = %err, "trickle publisher gave up");
            h.terminal = Some(err.to_string());
        }
    }
}

/// One piece of a segment's request body.
enum BodyMsg {
    Data(Bytes),
    /// The segment is complete: end the body cleanly. A body whose sender goes away without this
    /// is cut with an error, so the server never sees an abandoned segment as complete.
    End,
}

/// An open (possibly preconnected) POST of one segment.
struct Post {
    seq: i64,
    tx: Option<mpsc::Sender<BodyMsg>>,
    task: JoinHandle<Result<(), PublishError>>,
    /// The POST's answer, once the task finished.
    done: Option<Result<(), PublishError>>,
}

impl Post {
    /// Sends `msg` into the body; false if the POST already ended (never waits on a dead POST).
    async fn send(&mut self, msg: BodyMsg) -> bool {
        if self.done.is_some() {
            return false;
        }
        let Some(tx) = &self.tx else {
            return false;
        };
        tokio::select! {
            biased;
            r = &mut self.task => {
                self.done = Some(join_result(r));
                false
            }
            r = tx.send(msg) => r.is_ok(),
        }
    }

    /// Cuts the body and waits until the request is over, so nothing of it is sent later: the
    /// cut body makes the HTTP client give the request up (after connecting and sending the
    /// head if it had not yet). Aborted if that takes longer than a connection attempt may.
    async fn cancel(mut self) {
        self.tx = None;
        if self.done.is_some() {
            return;
        }
        if tokio::time::timeout(CONNECT_TIMEOUT, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }

    /// Waits for the POST's answer (drops the body sender first, so an unfinished body is cut).
    async fn outcome(&mut self) -> Result<(), PublishError> {
        self.tx = None;
        match self.done.take() {
            Some(r) => r,
            None => join_result((&mut self.task).await),
        }
    }
}

fn join_result(
    r: Result<Result<(), PublishError>, tokio::task::JoinError>,
) -> Result<(), PublishError> {
    r.unwrap_or_else(|e| Err(PublishError::Internal(format!("POST task failed: {e}"))))
}

fn open_post(shared: &Arc<Shared>, seq: i64, reset: bool) -> Post {
    let (tx, rx) = mpsc::channel::<BodyMsg>(BODY_QUEUE);
    let url = format!("{}/{}", shared.url, seq);
    let client = shared.client.clone();
    let tls = shared.opts.tls.clone();
    let content_type = shared.opts.content_type.clone();
    tracing::debug!(%url, reset, "preconnecting segment POST");
    let task = tokio::spawn(async move {
        let body = futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Some(BodyMsg::Data(b)) => Some((Ok(b), rx)),
                Some(BodyMsg::End) => None,
                None => Some((
                    Err(std::io::Error::other("segment abandoned by the publisher")),
                    rx,
                )),
            }
        });
        let mut req = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(reqwest::Body::wrap_stream(body));
        if reset {
            req = req.header(headers::RESET, "1");
        }
        let resp = req
            .send()
            .await
            .map_err(|e| request_error(&url, &e, &tls))?;
        let status = resp.status().as_u16();
        let closed = resp.headers().contains_key(headers::CLOSED);
        let text = resp.text().await.unwrap_or_default();
        if closed {
            return Err(PublishError::ChannelClosed { url });
        }
        match status {
            200 => Ok(()),
            404 => Err(PublishError::ChannelGone { url }),
            status => Err(PublishError::Http {
                url,
                status,
                body: snippet(&text),
            }),
        }
    });
    Post {
        seq,
        tx: Some(tx),
        task,
        done: None,
    }
}

/// Writes segments to one channel. See the module docs for the protocol it follows.
pub struct Publisher {
    shared: Arc<Shared>,
    /// The seq the next [`Publisher::next_segment`] hands out; `None` until resolved.
    next_seq: Option<i64>,
    /// The preconnected POST of `next_seq`.
    pending: Option<Post>,
    /// Whether the first POST (which carries the reset header) was opened.
    started: bool,
}

impl Publisher {
    /// A publisher of the channel at `url` (e.g. `http://host:port/name`). Connects lazily.
    pub fn new(url: impl Into<String>, opts: PublisherOptions) -> Publisher {
        let url = url.into().trim_end_matches('/').to_string();
        Publisher {
            shared: Arc::new(Shared {
                client: http_client(&opts.tls, &url, opts.local_address),
                url,
                opts,
                health: Mutex::new(Health::default()),
                counters: Counters::default(),
            }),
            next_seq: None,
            pending: None,
            started: false,
        }
    }

    /// The channel URL.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// Opens the next segment (using the preconnected POST) and preconnects the one after it.
    pub async fn next_segment(&mut self) -> Result<SegmentWriter, PublishError> {
        self.shared.check()?;
        let seq = match self.next_seq {
            Some(seq) => seq,
            None => {
                let seq = self.initial_seq().await?;
                self.next_seq = Some(seq);
                seq
            }
        };
        let reset = self.shared.opts.reset && !self.started;
        self.started = true;
        let post = match self.pending.take() {
            // A preconnect that already ended (e.g. the server restarted) is replaced, not retried.
            Some(p) if p.seq == seq && p.done.is_none() && !p.task.is_finished() => p,
            _ => open_post(&self.shared, seq, reset),
        };
        self.next_seq = Some(seq + 1);
        self.pending = Some(open_post(&self.shared, seq + 1, false));
        self.shared
            .counters
            .segments
            .fetch_add(1, Ordering::Relaxed);
        Ok(SegmentWriter {
            shared: self.shared.clone(),
            seq,
            reset,
            post: Some(post),
            retained: Vec::new(),
            retained_bytes: 0,
            retaining: true,
            retried: false,
            failed: false,
            bytes: 0,
            backoff: RECONNECT_MIN,
        })
    }

    /// Makes `seq` the next segment [`Publisher::next_segment`] opens (and the numbering go on
    /// from there): for a publisher that mirrors another channel's sequence numbers, e.g. a
    /// passthrough re-publishing input segment `n` as output segment `n`, jumps included. A
    /// preconnected POST for another seq is cut (it carried no byte, so it is no segment).
    pub fn set_next_seq(&mut self, seq: i64) {
        if self.next_seq != Some(seq) {
            self.next_seq = Some(seq);
            if self.pending.as_ref().is_some_and(|p| p.seq != seq) {
                self.pending = None;
            }
        }
    }

    /// Where the publisher stands (active with its failure streak, terminal, or closed).
    pub fn state(&self) -> PublisherState {
        let h = self.shared.health.lock();
        if let Some(error) = &h.terminal {
            PublisherState::Terminal {
                error: error.clone(),
            }
        } else if h.closed {
            PublisherState::Closed
        } else {
            PublisherState::Active {
                consecutive_failures: h.consecutive_failures,
            }
        }
    }

    /// Counters over all segments.
    pub fn stats(&self) -> PublisherStats {
        self.shared.stats()
    }

    /// Reads [`Publisher::stats`] later, e.g. after the publisher was handed to a JSONL writer.
    pub fn stats_handle(&self) -> impl Fn() -> PublisherStats + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.stats()
    }

    /// Closes the channel: DELETE, which ends every segment still open (close your
    /// [`SegmentWriter`] first to know its data arrived) and makes subscribers end on 404.
    /// A channel that is already gone counts as closed.
    ///
    /// The preconnected POST of the next segment is cut (never ended, so it is no empty
    /// segment) and has finished before the DELETE goes out: a request still on its way after
    /// the DELETE would make a server with autocreate create the channel again, and its
    /// subscribers would wait for an end that never comes.
    pub async fn close(mut self) -> Result<(), PublishError> {
        self.shared.health.lock().closed = true;
        if let Some(post) = self.pending.take() {
            post.cancel().await;
        }
        let url = self.shared.url.clone();
        let result = self.shared.client.delete(&url).send().await;
        let resp = result.map_err(|e| request_error(&url, &e, &self.shared.opts.tls))?;
        let status = resp.status().as_u16();
        match status {
            200..=299 => Ok(()),
            // 404, or the reference server's 400 "Invalid stream": it is gone already.
            400 | 404 => Ok(()),
            status => Err(PublishError::Http {
                url,
                status,
                body: snippet(&resp.text().await.unwrap_or_default()),
            }),
        }
    }

    /// 0 as the reference publishers do; after a restart (`reset`), the channel's write head.
    async fn initial_seq(&self) -> Result<i64, PublishError> {
        if !self.shared.opts.reset {
            return Ok(0);
        }
        match self.fetch_next().await {
            Ok(seq) => Ok(seq),
            Err(refused @ PublishError::Tls { .. }) => {
                self.shared.record_failure(&refused);
                Err(refused)
            }
            Err(first) => {
                tracing::warn!(url = %self.shared.url, error = %first, "GET /next failed; retrying once");
                self.shared.counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(self.shared.opts.retry_delay).await;
                self.fetch_next()
                    .await
                    .inspect_err(|e| self.shared.record_failure(e))
            }
        }
    }

    async fn fetch_next(&self) -> Result<i64, PublishError> {
        let url = format!("{}/next", self.shared.url);
        let resp = self
            .shared
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| request_error(&url, &e, &self.shared.opts.tls))?;
        let status = resp.status().as_u16();
        if status == 404 {
            return Ok(0);
        }
        let header = resp
            .headers()
            .get(headers::LATEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok());
        let text = resp.text().await.unwrap_or_default();
        if status != 200 {
            return Err(PublishError::Http {
                url,
                status,
                body: snippet(&text),
            });
        }
        match header.or_else(|| text.trim().parse::<i64>().ok()) {
            Some(seq) if seq >= 0 => Ok(seq),
            _ => Err(PublishError::Http {
                url,
                status,
                body: format!("no usable {} header: {}", headers::LATEST, snippet(&text)),
            }),
        }
    }
}

/// One segment being written. Write with [`SegmentWriter::write`], finish with
/// [`SegmentWriter::close`]; dropping it instead aborts the segment.
///
/// Close segment `n` before writing the first byte of `n+1` (as the reference publisher does):
/// each segment has its own connection, so otherwise `n+1` may reach the server first, and a
/// reader asking for `n` would then find `n+1` at the live edge.
pub struct SegmentWriter {
    shared: Arc<Shared>,
    seq: i64,
    reset: bool,
    post: Option<Post>,
    /// What was written so far, for the retry (cheap: `Bytes` are reference-counted).
    retained: Vec<Bytes>,
    retained_bytes: usize,
    retaining: bool,
    retried: bool,
    failed: bool,
    bytes: u64,
    /// Next pause of the reconnect backoff.
    backoff: Duration,
}

impl SegmentWriter {
    /// The segment's sequence number.
    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// Bytes written into this segment so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// True when the segment's POST already ended (the server answered or the connection broke)
    /// before [`close`](SegmentWriter::close): the next write or close will retry. A line-based
    /// writer rotates instead, so readers that saw part of this segment do not miss new lines.
    pub fn post_ended(&self) -> bool {
        self.post
            .as_ref()
            .is_none_or(|p| p.done.is_some() || p.task.is_finished())
    }

    /// Streams `data` into the segment. Waits while the server is slow (bounded memory).
    pub async fn write(&mut self, data: Bytes) -> Result<(), PublishError> {
        self.check()?;
        if data.is_empty() {
            return Ok(());
        }
        loop {
            let sent = match self.post.as_mut() {
                Some(post) => post.send(BodyMsg::Data(data.clone())).await,
                None => false,
            };
            if sent {
                break;
            }
            // The POST ended before the segment did: learn why, then retry once.
            let err = self
                .take_outcome()
                .await
                .err()
                .unwrap_or_else(|| self.ended_early());
            self.retry(err).await?;
        }
        let len = data.len();
        self.bytes += len as u64;
        self.shared
            .counters
            .bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        if self.retaining && self.retained_bytes + len <= self.shared.opts.max_retry_bytes {
            self.retained_bytes += len;
            self.retained.push(data);
        } else if self.retaining {
            self.retaining = false;
            self.retained = Vec::new();
        }
        Ok(())
    }

    /// Ends the segment and waits for the server to acknowledge it (retrying once on failure).
    pub async fn close(mut self) -> Result<(), PublishError> {
        self.check()?;
        loop {
            let ended = match self.post.as_mut() {
                Some(post) => post.send(BodyMsg::End).await,
                None => false,
            };
            let err = match self.take_outcome().await {
                Ok(()) if ended => {
                    self.shared.record_success();
                    return Ok(());
                }
                Ok(()) => self.ended_early(),
                Err(e) => e,
            };
            self.retry(err).await?;
        }
    }

    fn check(&self) -> Result<(), PublishError> {
        if self.failed {
            return Err(PublishError::SegmentFailed { seq: self.seq });
        }
        Ok(())
    }

    fn ended_early(&self) -> PublishError {
        PublishError::EndedEarly {
            url: format!("{}/{}", self.shared.url, self.seq),
            status: 200,
        }
    }

    async fn take_outcome(&mut self) -> Result<(), PublishError> {
        match self.post.take() {
            Some(mut post) => post.outcome().await,
            None => Err(PublishError::Internal("segment has no open POST".into())),
        }
    }

    /// The single retry: a fresh POST of the same seq, re-sending what was written. With a
    /// reconnect window, transient failures are retried with backoff until the window passes.
    async fn retry(&mut self, err: PublishError) -> Result<(), PublishError> {
        if self.retaining && err.is_transient() && self.shared.outage(&err) {
            return self.reconnect(err).await;
        }
        if self.retried || !self.retaining || matches!(err, PublishError::Tls { .. }) {
            return Err(self.fail(err));
        }
        self.retried = true;
        self.shared.counters.retries.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(url = %self.shared.url, seq = self.seq, error = %err, "segment POST failed; retrying once");
        tokio::time::sleep(self.shared.opts.retry_delay).await;
        let mut post = open_post(&self.shared, self.seq, self.reset);
        for chunk in &self.retained {
            if !post.send(BodyMsg::Data(chunk.clone())).await {
                self.post = Some(post);
                let err = self
                    .take_outcome()
                    .await
                    .err()
                    .unwrap_or_else(|| self.ended_early());
                return Err(self.fail(err));
            }
        }
        self.post = Some(post);
        Ok(())
    }

    /// Re-opens the segment's POST after the backoff and re-sends what was written, until the
    /// data is queued on a live POST or the outage outlasts the reconnect window.
    async fn reconnect(&mut self, mut err: PublishError) -> Result<(), PublishError> {
        loop {
            tracing::debug!(url = %self.shared.url, seq = self.seq, error = %err, backoff_ms = self.backoff.as_millis() as u64, "segment POST failed; reconnecting");
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
            self.shared.counters.retries.fetch_add(1, Ordering::Relaxed);
            let mut post = open_post(&self.shared, self.seq, self.reset);
            let mut sent = true;
            for chunk in &self.retained {
                if !post.send(BodyMsg::Data(chunk.clone())).await {
                    sent = false;
                    break;
                }
            }
            self.post = Some(post);
            if sent {
                return Ok(());
            }
            err = self
                .take_outcome()
                .await
                .err()
                .unwrap_or_else(|| self.ended_early());
            if !(err.is_transient() && self.shared.outage(&err)) {
                return Err(self.fail(err));
            }
        }
    }

    fn fail(&mut self, err: PublishError) -> PublishError {
        tracing::warn!(url = %self.shared.url, seq = self.seq, error = %err, "segment failed");
        self.failed = true;
        self.retained = Vec::new();
        self.shared.record_failure(&err);
        match self.shared.check() {
            // A refused certificate is the error itself; later calls say Terminal.
            Err(terminal @ PublishError::Terminal { .. })
                if !matches!(err, PublishError::Tls { .. }) =>
            {
                terminal
            }
            _ => err,
        }
    }
}

/// The lowest-level cause of a request error, e.g. `connection refused`.
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let text = cur.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "unknown error".to_string(),
    }
}

/// A request that got no answer: a refused certificate, or no connection.
fn request_error(url: &str, e: &reqwest::Error, tls: &ClientTls) -> PublishError {
    match tls.refusal(e) {
        Some((reason, hint)) => PublishError::Tls {
            url: url.to_string(),
            reason,
            hint,
        },
        None => PublishError::Unreachable {
            url: url.to_string(),
            cause: root_cause(e),
        },
    }
}

/// At most 200 characters of an answer's body, for error messages.
pub(crate) fn snippet(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &t[..i]),
        None => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_cause_is_short_and_lowercase() {
        let io = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        assert_eq!(root_cause(&io), "connection refused");
    }

    #[test]
    fn snippet_truncates() {
        assert_eq!(snippet("  hi \n"), "hi");
        assert_eq!(snippet(&"x".repeat(500)).len(), 203);
    }

    #[tokio::test]
    async fn unreachable_server_makes_the_publisher_terminal_after_three_segments() {
        // A port nobody listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/ch");
        let mut p = Publisher::new(
            url.clone(),
            PublisherOptions {
                retry_delay: Duration::from_millis(10),
                ..Default::default()
            },
        );
        let mut last = None;
        for _ in 0..MAX_CONSECUTIVE_FAILURES {
            let mut seg = p.next_segment().await.unwrap();
            let r = match seg.write(Bytes::from_static(b"x")).await {
                Ok(()) => seg.close().await,
                Err(e) => Err(e),
            };
            last = Some(r.unwrap_err());
        }
        let last = last.unwrap();
        assert!(
            matches!(last, PublishError::Terminal { failures: 3, .. }),
            "{last}"
        );
        assert!(
            last.to_string().contains("is the trickle server running?"),
            "{last}"
        );
        assert!(matches!(p.state(), PublisherState::Terminal { .. }));
        assert!(matches!(
            p.next_segment().await,
            Err(PublishError::Terminal { .. })
        ));
        let s = p.stats();
        assert_eq!((s.segments_failed, s.retries), (3, 3));
    }
}
