//! A stream's media channels and the passthrough loop that serves them.
//!
//! `start_stream` makes the runner create two channels on the trickle server, each named with 128
//! random bits: `in` (the client publishes MPEG-TS segments there) and `out` (the client reads the
//! processed media there). They are announced in `stream_started.channels`, in the shapes Scope's
//! runner uses, and deleted at `stop_stream` and at shutdown.
//!
//! There is no GPU pipeline here, so the runner does what the spec asks of a runner without one:
//! it **passes each input segment through**: input segment `n` is re-published, byte for byte, as
//! output segment `n` (a jump of the input, e.g. after falling out of the server's window, is
//! mirrored on the output). It streams: each chunk is written to the output as it is read from the
//! input, so memory stays bounded whatever the segment size (at most the publisher's retry copy
//! of one segment, `PublisherOptions::max_retry_bytes`, plus a few chunks in flight).
//!
//! When the input ends (the client deleted it) the output is closed too, so its readers end. A
//! failure of either side ends the loop and is reported as the seed reports it: an `error`
//! telemetry event whose `error.error_type` is `media_input_loop_failed` or
//! `media_output_loop_failed` (`recoverable: false`, metadata `{"mode": "livepeer"}`). The stream
//! itself stays up until `stop_stream`, as in Scope.

use crate::channels;
use crate::runner::pipeline::Emit;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use telemetry::ErrorInfo;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trickle::publisher::{Publisher, PublisherOptions, SegmentWriter};
use trickle::subscriber::{SegmentReader, Subscriber, SubscriberOptions};

/// MIME type of the media channels (MPEG-TS segments).
pub const MEDIA_MIME: &str = "video/MP2T";

/// How long a stopping stream waits for its loop to finish before cutting it.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How the media loop connects.
#[derive(Debug, Clone)]
pub struct MediaOptions {
    /// Where the channels are created: the trickle server's base URL (`http://host:port/base`).
    pub base_url: String,
    /// Ride out a trickle server outage of up to this long (see the subscriber and publisher).
    pub reconnect_window: Duration,
    /// Largest input segment accepted; a bigger one fails the input loop.
    pub max_segment_bytes: usize,
    /// How an `https://` server's certificate is treated (the runner's `trickle_tls`).
    pub tls: trickle::client_tls::ClientTls,
    /// Local address the media channels connect from (`None`: the system's choice).
    pub local_address: Option<std::net::IpAddr>,
}

/// What a media loop did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MediaStats {
    /// Segments passed through whole.
    pub segments: u64,
    /// Bytes passed through.
    pub bytes: u64,
    /// Loop failures reported as `error` events (input or output).
    pub failures: u64,
}

#[derive(Default)]
struct Counters {
    segments: AtomicU64,
    bytes: AtomicU64,
    failures: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> MediaStats {
        MediaStats {
            segments: self.segments.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

/// Publishes a media loop failure (the runner's `publish` with the stream's ids).
pub type FailureSink = Arc<dyn Fn(Emit) + Send + Sync>;

/// A running stream's media: its two channels and the passthrough loop between them.
pub struct MediaStream {
    input_url: String,
    output_url: String,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    tls: trickle::client_tls::ClientTls,
}

impl MediaStream {
    /// Creates the `in` and `out` channels and starts the passthrough loop. On failure, any
    /// channel created is deleted again and the error says what to do.
    pub async fn start(opts: &MediaOptions, on_failure: FailureSink) -> anyhow::Result<Self> {
        let base = opts.base_url.trim_end_matches('/');
        let input_url = format!("{base}/{}-in", channels::random_name());
        let output_url = format!("{base}/{}-out", channels::random_name());
        channels::create_channel(&input_url, MEDIA_MIME, &opts.tls).await?;
        if let Err(e) = channels::create_channel(&output_url, MEDIA_MIME, &opts.tls).await {
            let _ = channels::delete_channel(&input_url, &opts.tls).await;
            return Err(e);
        }
        let stop = CancellationToken::new();
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(passthrough(
            input_url.clone(),
            output_url.clone(),
            opts.clone(),
            stop.clone(),
            counters.clone(),
            on_failure,
        ));
        tracing::info!(input = %input_url, output = %output_url, "media channels created; passing input segments through");
        Ok(MediaStream {
            input_url,
            output_url,
            stop,
            task: Some(task),
            counters,
            tls: opts.tls.clone(),
        })
    }

    /// The `channels` list of `stream_started`, in Scope's shapes.
    pub fn channels_json(&self) -> Value {
        json!([
            {
                "url": self.input_url,
                "direction": "in",
                "mime_type": MEDIA_MIME,
                "role": "input",
                "input_track_index": 0,
                "source_node_id": null,
            },
            {
                "url": self.output_url,
                "direction": "out",
                "mime_type": MEDIA_MIME,
                "role": "output",
                "output_track_index": 0,
                "sink_node_id": null,
                "record_node_id": null,
            },
        ])
    }

    /// The input channel's URL (the client publishes there).
    pub fn input_url(&self) -> &str {
        &self.input_url
    }

    /// The output channel's URL (the client subscribes there).
    pub fn output_url(&self) -> &str {
        &self.output_url
    }

    /// What the loop did so far.
    pub fn stats(&self) -> MediaStats {
        self.counters.snapshot()
    }

    /// Stops the loop (waiting briefly for it) and deletes both channels.
    pub async fn stop(mut self) -> MediaStats {
        self.stop.cancel();
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
                task.abort();
            }
        }
        for url in [&self.input_url, &self.output_url] {
            if let Err(e) = channels::delete_channel(url, &self.tls).await {
                tracing::warn!(error = %format!("{e:#}"), "media channel not deleted");
            }
        }
        self.counters.snapshot()
    }
}

impl Drop for MediaStream {
    fn drop(&mut self) {
        // A stream dropped without `stop` (a runner task cancelled) still ends its loop.
        self.stop.cancel();
    }
}

/// Which side of the loop failed, and how.
enum Failure {
    Input(String),
    Output(String),
}

/// Re-publishes input segment `n` as output segment `n` until stopped or the input ends.
async fn passthrough(
    input_url: String,
    output_url: String,
    opts: MediaOptions,
    stop: CancellationToken,
    counters: Arc<Counters>,
    on_failure: FailureSink,
) {
    // Seq 0: the channel is new, so nothing the client publishes is missed.
    let mut input = Subscriber::new(
        input_url.clone(),
        SubscriberOptions {
            start_seq: 0,
            max_segment_bytes: opts.max_segment_bytes,
            reconnect_window: opts.reconnect_window,
            tls: opts.tls.clone(),
            local_address: opts.local_address,
            ..SubscriberOptions::default()
        },
    );
    let mut output = Publisher::new(
        output_url.clone(),
        PublisherOptions {
            content_type: MEDIA_MIME.into(),
            reconnect_window: opts.reconnect_window,
            tls: opts.tls.clone(),
            local_address: opts.local_address,
            ..PublisherOptions::default()
        },
    );
    let run = async {
        loop {
            let segment = match input.next_segment().await {
                Ok(Some(segment)) => segment,
                // The client deleted the input: the stream's media is over.
                Ok(None) => return Ok(()),
                Err(e) => return Err(Failure::Input(e.to_string())),
            };
            output.set_next_seq(segment.seq());
            let writer = output
                .next_segment()
                .await
                .map_err(|e| Failure::Output(e.to_string()))?;
            copy_segment(segment, writer, &counters).await?;
        }
    };
    let outcome = tokio::select! {
        _ = stop.cancelled() => return,
        outcome = run => outcome,
    };
    match outcome {
        Ok(()) => {
            tracing::info!(input = %input_url, "media input ended; closing the output");
            if let Err(e) = output.close().await {
                tracing::warn!(error = %e, "closing the media output failed");
            }
        }
        Err(failure) => {
            let (error_type, message, exception_type) = match failure {
                Failure::Input(m) => ("media_input_loop_failed", m, "SubscribeError"),
                Failure::Output(m) => ("media_output_loop_failed", m, "PublishError"),
            };
            // Scope logs these as "Media input/output loop failed: <error>".
            let side = if error_type == "media_input_loop_failed" {
                "input"
            } else {
                "output"
            };
            tracing::error!("Media {side} loop failed: {message}");
            counters.failures.fetch_add(1, Ordering::Relaxed);
            on_failure(media_loop_error(error_type, &message, exception_type));
        }
    }
}

/// Streams one segment from `reader` into `writer`, chunk by chunk.
async fn copy_segment(
    mut reader: SegmentReader,
    mut writer: SegmentWriter,
    counters: &Counters,
) -> Result<(), Failure> {
    loop {
        match reader.chunk().await {
            Ok(Some(chunk)) => {
                let len = chunk.len() as u64;
                writer
                    .write(chunk)
                    .await
                    .map_err(|e| Failure::Output(e.to_string()))?;
                counters.bytes.fetch_add(len, Ordering::Relaxed);
            }
            Ok(None) => break,
            // Dropping the writer cuts the output segment: a partial copy never looks whole.
            Err(e) => return Err(Failure::Input(e.to_string())),
        }
    }
    writer
        .close()
        .await
        .map_err(|e| Failure::Output(e.to_string()))?;
    counters.segments.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The seed's media loop failure event: `error` with that `error_type`, not recoverable.
pub fn media_loop_error(error_type: &'static str, message: &str, exception_type: &str) -> Emit {
    Emit {
        error: Some(ErrorInfo::new(error_type, message, exception_type, false)),
        ..Emit::new("error")
    }
    .with("mode", json!("livepeer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use parking_lot::Mutex;
    use trickle::server::{Server, ServerConfig};

    /// A real trickle server on loopback that does not create channels over HTTP.
    async fn server() -> Server {
        Server::bind(([127, 0, 0, 1], 0).into(), ServerConfig::default())
            .await
            .unwrap()
    }

    fn options(base_url: String, max_segment_bytes: usize) -> MediaOptions {
        MediaOptions {
            base_url,
            reconnect_window: Duration::ZERO,
            max_segment_bytes,
            tls: Default::default(),
            local_address: None,
        }
    }

    /// Runs the passthrough between `input` and `output` and returns the failures it reported.
    async fn failures_of(
        server: &Server,
        opts: MediaOptions,
        output: &str,
        publish: Bytes,
    ) -> Vec<Emit> {
        let input = format!("{}/in", server.url());
        let reported = Arc::new(Mutex::new(Vec::new()));
        let sink = reported.clone();
        let on_failure: FailureSink = Arc::new(move |e| sink.lock().push(e));
        let loop_task = tokio::spawn(passthrough(
            input.clone(),
            format!("{}/{output}", server.url()),
            opts,
            CancellationToken::new(),
            Arc::new(Counters::default()),
            on_failure,
        ));
        let mut publisher = Publisher::new(input, PublisherOptions::default());
        let mut w = publisher.next_segment().await.unwrap();
        // The server may cut an oversized body; what matters is what the loop reports.
        let _ = w.write(publish).await;
        let _ = w.close().await;
        tokio::time::timeout(Duration::from_secs(20), loop_task)
            .await
            .expect("the loop ended on the failure")
            .unwrap();
        let out = reported.lock().clone();
        out
    }

    fn assert_seed_error(emits: &[Emit], error_type: &str) {
        assert_eq!(emits.len(), 1, "{emits:?}");
        let e = &emits[0];
        assert_eq!(e.event_type, "error");
        let error = e.error.as_ref().unwrap();
        assert_eq!(error.error_type, error_type);
        assert!(!error.recoverable);
        assert!(!error.message.is_empty());
        assert_eq!(e.metadata["mode"], json!("livepeer"));
    }

    #[tokio::test]
    async fn an_input_failure_is_the_seeds_media_input_loop_failed_error() {
        let server = server().await;
        server.channels().create("in", Some(MEDIA_MIME)).unwrap();
        server.channels().create("out", Some(MEDIA_MIME)).unwrap();
        // An input segment past the loop's limit fails the input side.
        let opts = options(server.url(), 1000);
        let emits = failures_of(&server, opts, "out", Bytes::from(vec![0x47; 5000])).await;
        assert_seed_error(&emits, "media_input_loop_failed");
    }

    #[tokio::test]
    async fn an_output_failure_is_the_seeds_media_output_loop_failed_error() {
        let server = server().await;
        server.channels().create("in", Some(MEDIA_MIME)).unwrap();
        // The output channel does not exist (and the server creates none): the POST is refused.
        let opts = options(server.url(), 1 << 20);
        let emits = failures_of(&server, opts, "gone", Bytes::from(vec![0x47; 188])).await;
        assert_seed_error(&emits, "media_output_loop_failed");
    }
}
