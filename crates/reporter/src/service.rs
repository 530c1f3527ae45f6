//! The reporter's service: POSTs a batch to `/v1/metrics` and classifies the answer by the
//! response contract (see the crate docs); the driver keeps, retries, splits or drops the batch
//! accordingly.

use crate::config::GzipMode;
use crate::encoding::BodyBuilder;
use crate::Http;
use egress::{Batch, Cx, Outcome, Reason, Service};
use flate2::write::GzEncoder;
use flate2::Compression;
use reqwest::header::{
    HeaderMap, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER,
};
use reqwest::StatusCode;
use std::io::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Bodies smaller than this are not worth compressing (under `GzipMode::Auto`).
const GZIP_MIN_BYTES: usize = 1024;
/// The longest `Retry-After` honoured; a larger one is clamped (a typo must not stall for days).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A batch answered 400: malformed, dropped (the server knows; not reported downstream).
pub(crate) const REFUSED_400: Reason = Reason {
    name: "400",
    reported: false,
};
/// A lone event answered 413: too large for the API, dropped (the server knows).
pub(crate) const REFUSED_413: Reason = Reason {
    name: "413",
    reported: false,
};

/// What one request came to.
enum Answer {
    Status(StatusCode, HeaderMap, String),
    Network(String),
}

pub(crate) struct HttpService {
    http: Arc<Http>,
    client: reqwest::Client,
    body_builder: BodyBuilder,
    /// The server advertised `Accept-Encoding: gzip`.
    server_gzip: bool,
    /// A gzip body was refused with 415: never compress again.
    gzip_refused: bool,
    body: Vec<u8>,
}

impl HttpService {
    /// `extra_roots`: certificates trusted besides the system's (`SCOPE_METRICS_CA_FILE`).
    pub fn new(
        http: Arc<Http>,
        body_builder: BodyBuilder,
        extra_roots: &[tls::CertificateDer<'static>],
    ) -> Result<HttpService, reqwest::Error> {
        let timeout = http.config.request_timeout;
        let mut builder = reqwest::Client::builder();
        for der in extra_roots {
            builder = builder.add_root_certificate(reqwest::Certificate::from_der(der)?);
        }
        let client = builder
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!(
                "trickle-relay-reporter/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()?;
        Ok(HttpService {
            http,
            client,
            body_builder,
            server_gzip: false,
            gzip_refused: false,
            body: Vec::new(),
        })
    }

    /// One POST of the current body; the answer, or why there was none.
    async fn post(&self, gzip: bool) -> Answer {
        let key = self.http.api_key.lock().clone();
        let mut req = self
            .client
            .post(&self.http.config.url)
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
        match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let headers = resp.headers().clone();
                // The body only matters for logging errors; a short read is enough.
                let text = if status.is_success() {
                    String::new()
                } else {
                    resp.text().await.unwrap_or_default()
                };
                Answer::Status(status, headers, text)
            }
            // A refused certificate is kept and retried like a network error, named as what it is.
            Err(e) => Answer::Network(match tls::certificate_error(&e) {
                Some(reason) => format!(
                    "TLS certificate of {} refused: {reason}; trusted are the system's roots{}: \
                     put a private CA or the collector's own certificate in SCOPE_METRICS_CA_FILE",
                    self.http.config.url,
                    match &self.http.config.ca_file {
                        Some(p) => format!(" and SCOPE_METRICS_CA_FILE {}", p.display()),
                        None => String::new(),
                    }
                ),
                None => error_chain(&e),
            }),
        }
    }
}

impl Service for HttpService {
    async fn send(&mut self, batch: &mut Batch, cx: &Cx<'_>) -> Outcome {
        let http = Arc::clone(&self.http);
        let (config, c) = (&http.config, &http.counters);
        let n = batch.pending_count() as u64;
        self.body_builder
            .build(batch.pending().map(|i| batch.record(i)), &mut self.body);
        let gzip = !self.gzip_refused
            && match config.gzip {
                GzipMode::Always => true,
                GzipMode::Never => false,
                GzipMode::Auto => self.server_gzip && self.body.len() >= GZIP_MIN_BYTES,
            };
        c.gzip.store(gzip, Relaxed);
        c.requests.fetch_add(1, Relaxed);
        c.sent.fetch_add(n, Relaxed);
        let (status, headers, text) = match self.post(gzip).await {
            Answer::Network(e) => {
                c.network_errors.fetch_add(1, Relaxed);
                cx.write_errors(1);
                tracing::warn!(target: "reporter", events = n, error = %e,
                    "metrics reporter: network error; keeping the batch and retrying with backoff");
                return Outcome::Retry(None);
            }
            Answer::Status(status, headers, text) => (status, headers, text),
        };
        if config.gzip == GzipMode::Auto {
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
                c.status_2xx.fetch_add(1, Relaxed);
                tracing::debug!(target: "reporter", events = n, gzip, "metrics reporter: batch delivered");
                Outcome::Delivered
            }
            400 => {
                c.status_400.fetch_add(1, Relaxed);
                tracing::error!(target: "reporter", events = n, answer = %snippet,
                    "metrics reporter: the metrics API rejected the batch as malformed (400); dropped it (counted as dropped_400)");
                Outcome::Dropped(&REFUSED_400)
            }
            401 => {
                c.status_401.fetch_add(1, Relaxed);
                cx.write_errors(1);
                tracing::error!(target: "reporter", buffered = cx.buffered(),
                    "metrics reporter: the metrics API refused the API key (401); keeping every event and pausing until the key changes (set SCOPE_CLOUD_API_KEY / --api-key-file and send SIGHUP)");
                Outcome::Pause
            }
            413 if n > 1 => {
                c.status_413.fetch_add(1, Relaxed);
                c.splits_413.fetch_add(1, Relaxed);
                tracing::warn!(target: "reporter", events = n, bytes = self.body.len(),
                    "metrics reporter: batch too large (413); splitting it in halves and retrying");
                Outcome::Split
            }
            413 => {
                c.status_413.fetch_add(1, Relaxed);
                tracing::error!(target: "reporter", bytes = self.body.len(), answer = %snippet,
                    "metrics reporter: a single event is too large for the metrics API (413); dropped it (counted as dropped_oversize)");
                Outcome::Dropped(&REFUSED_413)
            }
            415 if gzip => {
                self.gzip_refused = true;
                c.status_other.fetch_add(1, Relaxed);
                cx.write_errors(1);
                tracing::warn!(target: "reporter",
                    "metrics reporter: the metrics API refused a gzip body (415); sending uncompressed from now on");
                Outcome::Retry(Some(Duration::ZERO))
            }
            429 => {
                c.status_429.fetch_add(1, Relaxed);
                cx.write_errors(1);
                let wait = retry_after(&headers).unwrap_or(config.default_retry_after);
                tracing::warn!(target: "reporter", events = n, retry_in = ?wait,
                    "metrics reporter: rate limited (429); keeping the batch and waiting");
                Outcome::Retry(Some(wait))
            }
            500..=599 => {
                c.status_5xx.fetch_add(1, Relaxed);
                cx.write_errors(1);
                tracing::warn!(target: "reporter", status = status.as_u16(), events = n, answer = %snippet,
                    "metrics reporter: server error; keeping the batch and retrying with backoff");
                Outcome::Retry(None)
            }
            other => {
                c.status_other.fetch_add(1, Relaxed);
                cx.write_errors(1);
                tracing::warn!(target: "reporter", status = other, events = n, answer = %snippet,
                    "metrics reporter: unexpected answer; keeping the batch and retrying with backoff (check DAYDREAM_METRICS_URL)");
                Outcome::Retry(None)
            }
        }
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
