//! `trickle-relay publish`: publish stdin to a trickle channel.
//!
//! Raw mode sends all of stdin as one segment. `--jsonl` sends each line of stdin as one message
//! through the JSONL writer (segments rotate by size and time); lines that are not a JSON object are
//! reported on stderr and skipped. When stdin ends the channel is closed (DELETE), as the reference
//! publisher does, so subscribers end. A summary goes to stderr.

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use serde::de::IgnoredAny;
use tokio::io::AsyncReadExt;
use trickle::jsonl::{
    decode_line, JsonlWriter, JsonlWriterOptions, LineError, LineSplitter, SplitEvent,
    JSONL_CONTENT_TYPE,
};
use trickle::publisher::{Publisher, PublisherOptions};

/// Bad lines reported one by one before only counting them.
const REPORT_BAD_LINES: u64 = 10;

/// Arguments of `trickle-relay publish`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Channel URL, e.g. `http://127.0.0.1:7000/control`.
    pub url: String,
    /// Send each line of stdin as one JSON message (invalid lines are reported and skipped).
    #[arg(long)]
    pub jsonl: bool,
    /// This publisher replaces one that died: start at the channel's live edge and close the
    /// segments the old one left open (`Lp-Trickle-Reset: 1`).
    #[arg(long)]
    pub reset: bool,
    /// With --jsonl: longest line accepted.
    #[arg(long, default_value_t = 5 << 20)]
    pub max_line_bytes: usize,
    /// With --jsonl: rotate to a new segment before one grows past this many bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_segment_bytes: usize,
    #[command(flatten)]
    pub tls: super::TrickleTlsArgs,
}

/// Runs `trickle-relay publish`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let opts = PublisherOptions {
        reset: args.reset,
        content_type: if args.jsonl {
            JSONL_CONTENT_TYPE.to_string()
        } else {
            "application/octet-stream".to_string()
        },
        tls: args.tls.client_tls()?,
        ..Default::default()
    };
    let publisher = Publisher::new(&args.url, opts);
    if args.jsonl {
        publish_jsonl(&args, publisher).await
    } else {
        publish_raw(&args, publisher).await
    }
}

async fn publish_raw(args: &Args, mut publisher: Publisher) -> anyhow::Result<()> {
    let mut stdin = tokio::io::stdin();
    let mut seg = publisher
        .next_segment()
        .await
        .with_context(|| format!("publishing to {}", args.url))?;
    let seq = seg.seq();
    let mut total = 0u64;
    loop {
        let mut buf = BytesMut::with_capacity(64 << 10);
        let n = stdin.read_buf(&mut buf).await.context("reading stdin")?;
        if n == 0 {
            break;
        }
        total += n as u64;
        seg.write(buf.freeze())
            .await
            .with_context(|| format!("publishing to {}", args.url))?;
    }
    seg.close()
        .await
        .with_context(|| format!("publishing to {}", args.url))?;
    publisher
        .close()
        .await
        .with_context(|| format!("closing {}", args.url))?;
    logging::say!(
        "publish: 1 segment (seq {seq}), {total} bytes to {}; channel closed",
        args.url
    );
    Ok(())
}

async fn publish_jsonl(args: &Args, publisher: Publisher) -> anyhow::Result<()> {
    let writer = JsonlWriter::new(
        publisher,
        JsonlWriterOptions {
            max_segment_bytes: args.max_segment_bytes,
            ..Default::default()
        },
    );
    let mut stdin = tokio::io::stdin();
    let mut splitter = LineSplitter::new(args.max_line_bytes);
    let mut line_no = 0u64;
    let mut bad = 0u64;
    let mut stopped = None;
    'read: loop {
        let mut buf = BytesMut::with_capacity(64 << 10);
        let n = stdin.read_buf(&mut buf).await.context("reading stdin")?;
        let mut events = Vec::new();
        if n == 0 {
            events.extend(splitter.finish());
        } else {
            splitter.push(buf.freeze());
            while let Some(event) = splitter.next_event() {
                events.push(event);
            }
        }
        for event in events {
            line_no += 1;
            let line = match event {
                SplitEvent::Line(line) | SplitEvent::Unterminated(line) => line,
                SplitEvent::Oversize { len } => {
                    bad += 1;
                    report_bad(
                        bad,
                        line_no,
                        &LineError::Oversize {
                            len,
                            max: args.max_line_bytes,
                        },
                    );
                    continue;
                }
            };
            let line = trim(line);
            if let Err(e) = decode_line::<IgnoredAny>(&line, args.max_line_bytes) {
                bad += 1;
                report_bad(bad, line_no, &e);
                continue;
            }
            if let Err(e) = writer.write_line(line).await {
                stopped = Some(e);
                break 'read;
            }
        }
        if n == 0 {
            break;
        }
    }
    if bad > REPORT_BAD_LINES {
        logging::say!(
            "publish: ... {} more bad lines not shown",
            bad - REPORT_BAD_LINES
        );
    }
    let closed = writer.close().await;
    let s = writer.stats();
    logging::say!(
        "publish: {} lines in {} segments ({} bytes) to {}; {} bad lines skipped{}",
        s.lines_acked,
        s.segments,
        s.bytes_written,
        args.url,
        bad,
        if s.lines_lost > 0 {
            format!("; {} lines NOT delivered", s.lines_lost)
        } else {
            String::new()
        }
    );
    if let Some(e) = stopped {
        bail!("publishing to {}: {e}", args.url);
    }
    closed.with_context(|| format!("publishing to {}", args.url))?;
    Ok(())
}

fn report_bad(bad: u64, line_no: u64, e: &LineError) {
    if bad <= REPORT_BAD_LINES {
        logging::say!("publish: message {line_no} skipped: {e}");
    }
}

/// Without surrounding ASCII whitespace (a `\r` from CRLF input included).
fn trim(line: Bytes) -> Bytes {
    let start = line
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(line.len());
    let end = line
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    line.slice(start..end.max(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_strips_surrounding_whitespace_only() {
        assert_eq!(
            trim(Bytes::from_static(b"  {\"a\": 1}\r")),
            Bytes::from_static(b"{\"a\": 1}")
        );
        assert_eq!(trim(Bytes::from_static(b"   ")), Bytes::new());
    }
}
