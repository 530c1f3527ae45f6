//! The trickle subscriber: reads a channel's segments in order, following the live edge.
//!
//! Reference behaviour (go-livepeer `trickle_subscriber.go`, pytrickle `subscriber.py`):
//! - Starts at seq `-2` by default (the segment being written now).
//! - While segment `n` is read, the GET of `n+1` is already open (preconnected).
//! - 470 ("channel exists, segment does not"): jump to `Lp-Trickle-Latest`, unless that is behind the
//!   seq asked for (the server is behind us, e.g. it restarted); then wait 250 ms and ask again.
//! - 404 ends the subscription ([`Subscriber::next_segment`] returns `Ok(None)`). A 404 before
//!   the server ever showed the channel (no segment, no 470, no close) ends it the same way, but
//!   [`Subscriber::channel_missing`] then says so: the channel never existed as far as this
//!   subscriber can tell, which callers report as an error that names the fix, not as an end.
//! - Other failures (no connection, 5xx...) are retried: [`SubscriberOptions::retries`] attempts,
//!   [`SubscriberOptions::retry_delay`] apart, then an error.
//! - A segment larger than [`SubscriberOptions::max_segment_bytes`] is an error for that segment
//!   (counted); the next segment reads normally.
//!
//! An option (off by default): [`SubscriberOptions::jump_to_current`] makes the 470 jump land on the
//! segment being written (`Lp-Trickle-Latest - 1`, still whole in the server's window) instead of
//! the next one to be written. A reader that must lose as little as possible (the events channel)
//! then reads the open segment from its start, instead of skipping it whole and waiting for the
//! writer's next rotation.
//!
//! One deliberate difference: an empty answer marked `Lp-Trickle-Closed` (the channel was closed
//! while we waited) is confirmed with one more request after `retry_delay` instead of ending at once.
//! A 404 then ends the subscription as usual, but a server that was merely restarting (and closed its
//! channels on the way down) is followed to its new incarnation, so subscribers survive restarts.
//!
//! Reconnect (an addition, off by default): with [`SubscriberOptions::reconnect_window`] set,
//! - a request that spent its retries on failures keeps retrying with capped backoff (100 ms
//!   doubling to 2 s) until the server is back or the window (from its first failure) passes; a
//!   404 after such failures means the channel is being recreated, not that it ended, and is
//!   retried too. A channel that ends normally (closed, then 404, with the server reachable
//!   throughout) still ends the subscription at once;
//! - a segment whose body broke off is asked for again (same seq) and read on from the byte it
//!   broke at, so no line is lost or repeated: the publisher re-sends a segment it could not finish
//!   byte for byte on the same seq (see [`crate::publisher`]). If that seq is gone (the live edge
//!   moved past it) the segment ends with [`SubscribeError::Body`] as before, counted.
//!
//! One warning per outage, one info when it ends; [`SubscriberStats::reconnects`] counts outages
//! survived and [`SubscriberStats::resumed_segments`] the segments read on after a break.
//!
//! `https://` URLs: [`SubscriberOptions::tls`] says how the server's certificate is treated (see
//! [`crate::client_tls`]). A refused certificate ends the request at once with
//! [`SubscribeError::Tls`]: no retry, no reconnect loop.

use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

use crate::client_tls::{http_client, ClientTls};
use crate::headers;
use crate::publisher::{root_cause, snippet};

/// Pause before asking again when the server's live edge is behind the seq we want.
const BEHIND_DELAY: Duration = Duration::from_millis(250);
/// First pause of the reconnect backoff.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest pause of the reconnect backoff.
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// How often a subscriber waiting for a broken segment's re-send checks the publisher moved on.
const MOVED_PAST_POLL: Duration = Duration::from_secs(1);
/// How long a broken segment's channel may answer 404 on a server that never went away before
/// the segment counts as gone: a channel deleted on a live server (the runner closed it while
/// this reader lagged) must not hold the reader for the whole reconnect window.
const NOT_FOUND_GRACE: Duration = Duration::from_secs(3);

/// Options of a [`Subscriber`].
#[derive(Debug, Clone)]
pub struct SubscriberOptions {
    /// First seq to ask for: `-2` the segment being written now, `-1` the next one, or `n >= 0`.
    pub start_seq: i64,
    /// Largest segment accepted; a bigger one is cut and reported as an error.
    pub max_segment_bytes: usize,
    /// Attempts per segment for failures other than 404 / 470.
    pub retries: u32,
    /// Pause between those attempts.
    pub retry_delay: Duration,
    /// How long to keep reconnecting through a server outage once the retries are spent (see
    /// the module docs); `Duration::ZERO` (the default) keeps the reference behaviour.
    pub reconnect_window: Duration,
    /// How an `https://` server's certificate is treated (default: any is accepted, as the
    /// reference clients do).
    pub tls: ClientTls,
    /// Local address to connect from (`None`: the system's choice); see
    /// [`crate::publisher::PublisherOptions::local_address`].
    pub local_address: Option<std::net::IpAddr>,
    /// On 470, jump to the segment being written (`Lp-Trickle-Latest - 1`) rather than the next
    /// one (the reference behaviour, `false`): skip as little as possible.
    pub jump_to_current: bool,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        SubscriberOptions {
            start_seq: -2,
            max_segment_bytes: 64 << 20,
            retries: 5,
            retry_delay: Duration::from_millis(500),
            reconnect_window: Duration::ZERO,
            tls: ClientTls::default(),
            local_address: None,
            jump_to_current: false,
        }
    }
}

/// Why subscribing failed. Every message names the URL and, where there is one, the fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubscribeError {
    /// No connection after all retries: the server is down or the URL is wrong.
    #[error("cannot reach {url} ({cause}): is the trickle server running?")]
    Unreachable {
        /// The request URL.
        url: String,
        /// The lowest-level cause, e.g. `connection refused`.
        cause: String,
    },
    /// The server's TLS certificate was refused ([`SubscriberOptions::tls`] verifies it).
    /// Never retried.
    #[error("TLS certificate of {url} refused: {reason}; {hint}")]
    Tls {
        /// The request URL.
        url: String,
        /// Why it was refused, e.g. an unknown issuer or another host name.
        reason: String,
        /// What to do about it, naming the flag.
        hint: String,
    },
    /// A non-200 answer other than 404 / 470, after all retries.
    #[error("{url} answered HTTP {status}: {body}")]
    Http {
        /// The request URL.
        url: String,
        /// The status.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
    /// The segment outgrew [`SubscriberOptions::max_segment_bytes`]; the rest of it is skipped.
    #[error("segment {seq} of {url} exceeds {limit} bytes: skipped the rest (raise max_segment_bytes if it is legitimate)")]
    SegmentTooLarge {
        /// The channel URL.
        url: String,
        /// The segment.
        seq: i64,
        /// The limit.
        limit: usize,
    },
    /// The segment's body broke off (connection lost mid-segment).
    #[error("segment {seq} of {url} broke off: {cause}")]
    Body {
        /// The channel URL.
        url: String,
        /// The segment.
        seq: i64,
        /// The lowest-level cause.
        cause: String,
    },
    /// A background task died (a bug, or the runtime is shutting down).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Counters of a [`Subscriber`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriberStats {
    /// Segments opened.
    pub segments: u64,
    /// Bytes read.
    pub bytes: u64,
    /// 470 answers that made it jump forward to the live edge.
    pub jumps: u64,
    /// Segments skipped by those jumps (sum of `latest - requested`).
    pub skipped_segments: u64,
    /// Requests retried after a failure.
    pub retries: u64,
    /// Waits because the server's live edge was behind the seq asked for.
    pub behind_waits: u64,
    /// Segments cut for exceeding the byte cap.
    pub oversize_segments: u64,
    /// Segments whose body broke off and could not be resumed (their rest is lost).
    pub broken_segments: u64,
    /// Outages the subscriber got through by reconnecting (reconnect window set).
    pub reconnects: u64,
    /// Segments whose body broke off and were read on from where they broke.
    pub resumed_segments: u64,
}

impl SubscriberStats {
    /// What went unusually, as `; ...` clauses to append to a summary (empty when nothing did).
    pub fn notes(&self) -> String {
        let mut text = String::new();
        if self.jumps > 0 {
            let skipped = self.skipped_segments;
            text.push_str(&format!(
                "; {} jumps to the live edge ({skipped} segments skipped)",
                self.jumps
            ));
        }
        if self.oversize_segments > 0 {
            text.push_str(&format!(
                "; {} segments over the size cap cut",
                self.oversize_segments
            ));
        }
        if self.retries > 0 {
            text.push_str(&format!("; {} retries", self.retries));
        }
        text
    }
}

/// A one-line summary: `N segments, B bytes` and the [`SubscriberStats::notes`].
impl std::fmt::Display for SubscriberStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} segments, {} bytes{}",
            self.segments,
            self.bytes,
            self.notes()
        )
    }
}

#[derive(Default)]
struct Counters {
    segments: AtomicU64,
    bytes: AtomicU64,
    jumps: AtomicU64,
    skipped_segments: AtomicU64,
    retries: AtomicU64,
    behind_waits: AtomicU64,
    oversize_segments: AtomicU64,
    broken_segments: AtomicU64,
    reconnects: AtomicU64,
    resumed_segments: AtomicU64,
}

struct Shared {
    client: reqwest::Client,
    url: String,
    opts: SubscriberOptions,
    counters: Counters,
    /// When the current outage was declared (warned about); `None` while the server answers.
    outage: Mutex<Option<Instant>>,
    /// The server showed the channel exists (a segment, a 470, a close marker).
    seen: AtomicBool,
    /// The subscription ended or failed on a 404 before the channel was ever seen.
    missing: AtomicBool,
}

impl Shared {
    /// Declares an outage (one warning per outage).
    fn enter_outage(&self, err: &SubscribeError) {
        let mut outage = self.outage.lock();
        if outage.is_none() {
            *outage = Some(Instant::now());
            tracing::warn!(url = %self.url, error = %err,
                window_s = self.opts.reconnect_window.as_secs_f64(),
                "trickle server unreachable; reconnecting until it is back");
        }
    }

    /// The server answered in a way only an existing channel does.
    fn saw_channel(&self) {
        self.seen.store(true, Ordering::Relaxed);
    }

    /// A 404 ends (or fails) the subscription: missing if the channel was never seen.
    fn ended_on_404(&self) {
        if !self.seen.load(Ordering::Relaxed) {
            self.missing.store(true, Ordering::Relaxed);
        }
    }

    /// The server answered: ends a declared outage (counted, one info).
    fn leave_outage(&self) {
        if let Some(since) = self.outage.lock().take() {
            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(url = %self.url, down_ms = since.elapsed().as_millis() as u64,
                "trickle subscriber reconnected");
        }
    }
}

/// What a GET loop found.
enum Found {
    Segment { resp: reqwest::Response, seq: i64 },
    End,
}

/// Reads segments of one channel in order. See the module docs for the protocol it follows.
pub struct Subscriber {
    shared: Arc<Shared>,
    next_seq: i64,
    pending: Option<JoinHandle<Result<Found, SubscribeError>>>,
    ended: bool,
}

impl Subscriber {
    /// A subscriber of the channel at `url` (e.g. `http://host:port/name`). Connects lazily.
    pub fn new(url: impl Into<String>, opts: SubscriberOptions) -> Subscriber {
        let url = url.into().trim_end_matches('/').to_string();
        let next_seq = opts.start_seq;
        Subscriber {
            shared: Arc::new(Shared {
                client: http_client(&opts.tls, &url, opts.local_address),
                url,
                opts,
                counters: Counters::default(),
                outage: Mutex::new(None),
                seen: AtomicBool::new(false),
                missing: AtomicBool::new(false),
            }),
            next_seq,
            pending: None,
            ended: false,
        }
    }

    /// The channel URL.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// The next segment, or `None` once the channel is gone (404). Preconnects the one after it.
    /// After an error the subscriber stays usable: the next call tries again.
    ///
    /// Cancel-safe: if the future is dropped while waiting, the request keeps running and the
    /// next call picks it up, so it can be used in `tokio::select!`.
    pub async fn next_segment(&mut self) -> Result<Option<SegmentReader>, SubscribeError> {
        if self.ended {
            return Ok(None);
        }
        let shared = self.shared.clone();
        let seq = self.next_seq;
        let task = self
            .pending
            .get_or_insert_with(|| tokio::spawn(fetch(shared, seq)));
        let joined = task.await;
        self.pending = None;
        let found =
            joined.map_err(|e| SubscribeError::Internal(format!("request task failed: {e}")))??;
        match found {
            Found::End => {
                self.ended = true;
                Ok(None)
            }
            Found::Segment { resp, seq } => {
                self.next_seq = if seq >= 0 { seq + 1 } else { -1 };
                self.shared
                    .counters
                    .segments
                    .fetch_add(1, Ordering::Relaxed);
                self.pending = Some(tokio::spawn(fetch(self.shared.clone(), self.next_seq)));
                Ok(Some(SegmentReader {
                    shared: self.shared.clone(),
                    seq,
                    resp: Some(resp),
                    bytes: 0,
                    skip: 0,
                    broken: None,
                }))
            }
        }
    }

    /// Whether the subscription ended (or gave up) on a 404 before the server ever showed the
    /// channel: it does not exist, as far as this subscriber can tell (never created, or deleted
    /// before the first request). `false` for an ordinary end of a channel that was there.
    pub fn channel_missing(&self) -> bool {
        self.shared.missing.load(Ordering::Relaxed)
    }

    /// Counters so far.
    pub fn stats(&self) -> SubscriberStats {
        let c = &self.shared.counters;
        SubscriberStats {
            segments: c.segments.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            jumps: c.jumps.load(Ordering::Relaxed),
            skipped_segments: c.skipped_segments.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            behind_waits: c.behind_waits.load(Ordering::Relaxed),
            oversize_segments: c.oversize_segments.load(Ordering::Relaxed),
            broken_segments: c.broken_segments.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            resumed_segments: c.resumed_segments.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Some(task) = self.pending.take() {
            task.abort();
        }
    }
}

/// GETs `seq` until it yields a segment or the end, following 470s and retrying failures.
async fn fetch(shared: Arc<Shared>, mut seq: i64) -> Result<Found, SubscribeError> {
    let opts = &shared.opts;
    let c = &shared.counters;
    let mut failures = 0u32;
    let mut first_failure: Option<Instant> = None;
    let mut backoff = RECONNECT_MIN;
    let mut confirming_close = false;
    loop {
        let url = format!("{}/{}", shared.url, seq);
        let sent = shared.client.get(&url).send().await;
        if failures > 0
            && sent
                .as_ref()
                .is_ok_and(|r| r.status().as_u16() != 404 && !r.status().is_server_error())
        {
            shared.leave_outage();
        }
        let err = match sent {
            Err(e) => match opts.tls.refusal(&e) {
                // A refused certificate is refused again on every retry: stop now.
                Some((reason, hint)) => {
                    let err = SubscribeError::Tls { url, reason, hint };
                    tracing::error!(error = %err, "trickle subscriber stopped");
                    return Err(err);
                }
                None => SubscribeError::Unreachable {
                    url,
                    cause: root_cause(&e),
                },
            },
            Ok(resp) => match resp.status().as_u16() {
                // After failures, a 404 is a channel being recreated by a restarted server.
                404 if failures > 0 && !opts.reconnect_window.is_zero() => SubscribeError::Http {
                    url,
                    status: 404,
                    body: "channel not found (being recreated after a restart?)".into(),
                },
                200 if resp.headers().contains_key(headers::CLOSED) => {
                    shared.saw_channel();
                    if confirming_close {
                        return Ok(Found::End);
                    }
                    // Closed under us: gone for good (404 next) or a restarting server?
                    tracing::debug!(%url, "segment closed with the channel; confirming");
                    confirming_close = true;
                    tokio::time::sleep(opts.retry_delay).await;
                    continue;
                }
                200 => {
                    shared.saw_channel();
                    let served = header_i64(&resp, headers::SEQ).unwrap_or(seq);
                    return Ok(Found::Segment { resp, seq: served });
                }
                404 => {
                    tracing::debug!(%url, "channel not found; subscription ends");
                    shared.ended_on_404();
                    return Ok(Found::End);
                }
                headers::STATUS_SEGMENT_GONE => {
                    shared.saw_channel();
                    match header_i64(&resp, headers::LATEST) {
                        Some(latest) if latest > seq || (seq < 0 && latest >= 0) => {
                            // The segment being written is `latest - 1`, whole in the window.
                            let target = if opts.jump_to_current && seq >= 0 && latest - 1 > seq {
                                latest - 1
                            } else {
                                latest
                            };
                            tracing::debug!(%url, latest, target, "segment gone; jumping to the live edge");
                            c.jumps.fetch_add(1, Ordering::Relaxed);
                            if seq >= 0 {
                                c.skipped_segments
                                    .fetch_add((target - seq) as u64, Ordering::Relaxed);
                            }
                            seq = target;
                        }
                        Some(_) => {
                            c.behind_waits.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(BEHIND_DELAY).await;
                        }
                        None => seq = -1,
                    }
                    continue;
                }
                status => {
                    let body = resp.text().await.unwrap_or_default();
                    SubscribeError::Http {
                        url,
                        status,
                        body: snippet(&body),
                    }
                }
            },
        };
        failures += 1;
        let since = *first_failure.get_or_insert_with(Instant::now);
        if failures >= opts.retries.max(1) {
            if since.elapsed() < opts.reconnect_window {
                shared.enter_outage(&err);
                tracing::debug!(error = %err, attempt = failures, "trickle GET failed; reconnecting");
                c.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_MAX);
                continue;
            }
            tracing::warn!(error = %err, attempts = failures, "trickle subscriber gave up");
            if matches!(err, SubscribeError::Http { status: 404, .. }) {
                shared.ended_on_404();
            }
            return Err(err);
        }
        tracing::debug!(error = %err, attempt = failures, "trickle GET failed; retrying");
        c.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(opts.retry_delay).await;
    }
}

/// What asking again for a segment that broke off found.
enum Resumed {
    /// The segment again, from its first byte.
    Again(reqwest::Response),
    /// The segment is gone for good (or the window passed): its rest is lost.
    Gone,
}

/// GETs segment `seq` again after its body broke off, riding out an outage for up to the
/// reconnect window: no connection, 5xx and 404 (channel being recreated) are retried with
/// backoff, and so is a 470 whose live edge is still behind `seq` (the publisher has not re-sent
/// it yet). A 470 past `seq`, or a closed channel, means the segment will not come back; so does
/// a 404 that lasts [`NOT_FOUND_GRACE`] from a server that answered every request (no outage).
async fn refetch(shared: &Shared, seq: i64) -> Resumed {
    let started = Instant::now();
    let mut backoff = RECONNECT_MIN;
    // Whether this refetch met the server down (no connection or 5xx): only then is a 404 a
    // channel still being recreated after a restart, worth the whole window.
    let mut server_was_down = false;
    let url = format!("{}/{}", shared.url, seq);
    loop {
        if started.elapsed() >= shared.opts.reconnect_window {
            return Resumed::Gone;
        }
        // A GET of a seq not written yet waits for it; if the publisher moves on without
        // re-sending it, it never comes.
        let sent = tokio::select! {
            sent = shared.client.get(&url).send() => sent,
            _ = moved_past(shared, seq) => return Resumed::Gone,
        };
        let err = match sent {
            Err(e) if shared.opts.tls.refusal(&e).is_some() => {
                tracing::error!(%url, error = %e, "TLS certificate refused; the broken segment is lost");
                return Resumed::Gone;
            }
            Err(e) => {
                server_was_down = true;
                SubscribeError::Unreachable {
                    url: url.clone(),
                    cause: root_cause(&e),
                }
            }
            Ok(resp) => {
                let status = resp.status().as_u16();
                if resp.status().is_server_error() {
                    server_was_down = true;
                }
                if status == 404 && !server_was_down {
                    if started.elapsed() >= NOT_FOUND_GRACE {
                        tracing::debug!(url = %shared.url, seq, "channel gone from a live server; the broken segment is lost");
                        return Resumed::Gone;
                    }
                    // Maybe a restart so quick this reader never saw it down: ask again shortly.
                    tokio::time::sleep(BEHIND_DELAY).await;
                    continue;
                }
                if status != 404 && !resp.status().is_server_error() {
                    shared.leave_outage();
                }
                match status {
                    200 if resp.headers().contains_key(headers::CLOSED) => return Resumed::Gone,
                    200 if header_i64(&resp, headers::SEQ).unwrap_or(seq) == seq => {
                        return Resumed::Again(resp)
                    }
                    200 => return Resumed::Gone,
                    headers::STATUS_SEGMENT_GONE => match header_i64(&resp, headers::LATEST) {
                        // The restarted server has not seen this seq yet: wait for the re-send.
                        Some(latest) if latest <= seq => {
                            tokio::time::sleep(BEHIND_DELAY).await;
                            continue;
                        }
                        _ => return Resumed::Gone,
                    },
                    status => SubscribeError::Http {
                        url: url.clone(),
                        status,
                        body: String::new(),
                    },
                }
            }
        };
        shared.enter_outage(&err);
        shared.counters.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// Resolves once the channel's write head is past `seq + 1`: the publisher writes a later
/// segment, so `seq` will not be re-sent. Polls `GET {url}/next` every [`MOVED_PAST_POLL`].
async fn moved_past(shared: &Shared, seq: i64) {
    let url = format!("{}/next", shared.url);
    loop {
        tokio::time::sleep(MOVED_PAST_POLL).await;
        let Ok(resp) = shared.client.get(&url).send().await else {
            continue;
        };
        if header_i64(&resp, headers::LATEST).is_some_and(|latest| latest > seq + 1) {
            return;
        }
    }
}

fn header_i64(resp: &reqwest::Response, name: &str) -> Option<i64> {
    resp.headers()
        .get(name)?
        .to_str()
        .ok()?
        .trim()
        .parse::<i64>()
        .ok()
}

/// One segment being read; [`SegmentReader::chunk`] yields its bytes as they arrive.
pub struct SegmentReader {
    shared: Arc<Shared>,
    seq: i64,
    resp: Option<reqwest::Response>,
    bytes: usize,
    /// Bytes of a re-fetched segment to pass over (already read before it broke off).
    skip: usize,
    /// Why the body broke off, while it is being asked for again (kept for cancel safety).
    broken: Option<SubscribeError>,
}

impl SegmentReader {
    /// The segment's sequence number (from `Lp-Trickle-Seq`).
    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// Bytes read from this segment so far.
    pub fn bytes_read(&self) -> usize {
        self.bytes
    }

    /// The next piece of the segment, or `None` at its end. After an error the segment is over.
    /// With a reconnect window, a body that breaks off is asked for again and read on from the
    /// same byte (invisible to the caller) before it counts as an error. Cancel-safe.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, SubscribeError> {
        loop {
            if let Some(err) = self.broken.clone() {
                match refetch(&self.shared, self.seq).await {
                    Resumed::Again(resp) => {
                        self.resp = Some(resp);
                        self.skip = self.bytes;
                        self.broken = None;
                        self.shared
                            .counters
                            .resumed_segments
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(url = %self.shared.url, seq = self.seq, offset = self.bytes, "segment resumed");
                    }
                    Resumed::Gone => {
                        self.broken = None;
                        self.shared
                            .counters
                            .broken_segments
                            .fetch_add(1, Ordering::Relaxed);
                        return Err(err);
                    }
                }
            }
            let Some(resp) = self.resp.as_mut() else {
                return Ok(None);
            };
            let mut chunk = match resp.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    self.resp = None;
                    if self.skip > 0 {
                        // The segment came back shorter than what was read: not a re-send of it.
                        self.skip = 0;
                        self.shared
                            .counters
                            .broken_segments
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(url = %self.shared.url, seq = self.seq, "resumed segment is shorter than before it broke off; its rest is lost");
                    }
                    return Ok(None);
                }
                Err(e) => {
                    self.resp = None;
                    let err = SubscribeError::Body {
                        url: self.shared.url.clone(),
                        seq: self.seq,
                        cause: root_cause(&e),
                    };
                    if !self.shared.opts.reconnect_window.is_zero() {
                        self.broken = Some(err);
                        continue;
                    }
                    self.shared
                        .counters
                        .broken_segments
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(err);
                }
            };
            if self.skip > 0 {
                if chunk.len() <= self.skip {
                    self.skip -= chunk.len();
                    continue;
                }
                chunk = chunk.slice(self.skip..);
                self.skip = 0;
            }
            return self.accept(chunk);
        }
    }

    /// Counts a new chunk against the segment cap.
    fn accept(&mut self, chunk: Bytes) -> Result<Option<Bytes>, SubscribeError> {
        self.bytes += chunk.len();
        let limit = self.shared.opts.max_segment_bytes;
        if self.bytes > limit {
            self.resp = None;
            self.shared
                .counters
                .oversize_segments
                .fetch_add(1, Ordering::Relaxed);
            return Err(SubscribeError::SegmentTooLarge {
                url: self.shared.url.clone(),
                seq: self.seq,
                limit,
            });
        }
        self.shared
            .counters
            .bytes
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        Ok(Some(chunk))
    }
}
