//! The client's side of a stream's media: publish segments to the `in` channel that
//! `stream_started` named, read what comes back on `out`.
//!
//! Scope's client does this with livepeer-gateway's `MediaPublish` / `MediaOutput` (encoding and
//! decoding frames); here it moves whole MPEG-TS segments with this project's trickle publisher
//! and subscriber, which is what a passthrough runner needs to be checked end to end.

use bytes::{Bytes, BytesMut};
use std::time::Duration;
use trickle::publisher::{Publisher, PublisherOptions};
use trickle::subscriber::{Subscriber, SubscriberOptions};

/// Publishes `segments` to `input_url` (segment `n` as seq `n`) and reads as many segments from
/// `output_url`, from seq 0; returns what came back, in order. Closing the input at the end
/// (DELETE) tells the runner the media is over. Fails after `timeout`.
pub async fn roundtrip(
    input_url: &str,
    output_url: &str,
    segments: Vec<Bytes>,
    timeout: Duration,
) -> anyhow::Result<Vec<Bytes>> {
    let want = segments.len();
    let mut output = Subscriber::new(
        output_url.to_string(),
        SubscriberOptions {
            start_seq: 0,
            ..SubscriberOptions::default()
        },
    );
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(want);
        while got.len() < want {
            let Some(mut segment) = output.next_segment().await? else {
                break;
            };
            let mut body = BytesMut::new();
            while let Some(chunk) = segment.chunk().await? {
                body.extend_from_slice(&chunk);
            }
            got.push(body.freeze());
        }
        anyhow::Ok(got)
    });
    let mut input = Publisher::new(
        input_url.to_string(),
        PublisherOptions {
            content_type: crate::runner::media::MEDIA_MIME.into(),
            ..PublisherOptions::default()
        },
    );
    let published = async {
        for segment in segments {
            let mut writer = input.next_segment().await?;
            writer.write(segment).await?;
            writer.close().await?;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(timeout, published)
        .await
        .map_err(|_| anyhow::anyhow!("publishing media to {input_url} took over {timeout:?}"))??;
    let got = tokio::time::timeout(timeout, reader)
        .await
        .map_err(|_| anyhow::anyhow!("no media back from {output_url} within {timeout:?}"))???;
    input.close().await?;
    Ok(got)
}
