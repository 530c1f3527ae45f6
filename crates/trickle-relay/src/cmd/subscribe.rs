//! `trickle-relay subscribe`: print a trickle channel to stdout (the curl of trickle).
//!
//! Raw mode copies every segment's bytes to stdout as they arrive. `--jsonl` decodes the channel
//! as JSON lines and prints one compact object per line (bad lines are counted and skipped). Runs
//! until the channel ends (404) or Ctrl-C, then prints a summary on stderr.

use anyhow::{bail, Context};
use serde_json::value::RawValue;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufWriter, Stdout};
use trickle::jsonl::{compact_json, JsonlReader, JsonlReaderOptions};
use trickle::subscriber::{Subscriber, SubscriberOptions};

/// How long printed lines may sit in the stdout buffer while the channel is quiet.
const FLUSH_AFTER: Duration = Duration::from_millis(50);

/// Arguments of `trickle-relay subscribe`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Channel URL, e.g. `http://127.0.0.1:7000/events`.
    pub url: String,
    /// First segment: -2 the one being written now, -1 the next one, N that one.
    #[arg(long, default_value_t = -2, allow_negative_numbers = true)]
    pub from: i64,
    /// Decode JSON lines and print one compact JSON object per line.
    #[arg(long)]
    pub jsonl: bool,
    /// With --jsonl: longest line accepted (longer ones are counted and skipped).
    #[arg(long, default_value_t = 5 << 20)]
    pub max_line_bytes: usize,
    /// Largest segment accepted (a bigger one is cut and counted).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_segment_bytes: usize,
    #[command(flatten)]
    pub tls: super::TrickleTlsArgs,
}

/// How the subscription stopped.
enum Stop {
    /// The channel is gone (404): the normal end.
    Ended,
    /// Ctrl-C.
    Interrupted,
    /// stdout was closed (e.g. `| head`).
    StdoutClosed,
}

/// Runs `trickle-relay subscribe`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.from < -2 {
        bail!(
            "--from {} is not a segment: use -2 (current), -1 (next) or N >= 0",
            args.from
        );
    }
    let sub = Subscriber::new(
        &args.url,
        SubscriberOptions {
            start_seq: args.from,
            max_segment_bytes: args.max_segment_bytes,
            tls: args.tls.client_tls()?,
            ..Default::default()
        },
    );
    let mut out = BufWriter::with_capacity(64 << 10, tokio::io::stdout());
    if args.jsonl {
        run_jsonl(&args, sub, &mut out).await
    } else {
        run_raw(&args, sub, &mut out).await
    }
}

async fn run_raw(
    args: &Args,
    mut sub: Subscriber,
    out: &mut BufWriter<Stdout>,
) -> anyhow::Result<()> {
    let result = tokio::select! {
        r = copy_raw(&mut sub, out) => r,
        _ = tokio::signal::ctrl_c() => Ok(Stop::Interrupted),
    };
    let _ = out.flush().await;
    let stats = sub.stats();
    logging::say!("subscribe: {stats}");
    finish(args, result, stats.segments)
}

async fn copy_raw(sub: &mut Subscriber, out: &mut BufWriter<Stdout>) -> anyhow::Result<Stop> {
    while let Some(mut seg) = sub.next_segment().await? {
        loop {
            match seg.chunk().await {
                Ok(Some(chunk)) => {
                    if out.write_all(&chunk).await.is_err() || out.flush().await.is_err() {
                        return Ok(Stop::StdoutClosed);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    logging::say!("subscribe: {e}");
                    break;
                }
            }
        }
    }
    Ok(Stop::Ended)
}

async fn run_jsonl(
    args: &Args,
    sub: Subscriber,
    out: &mut BufWriter<Stdout>,
) -> anyhow::Result<()> {
    let mut reader = JsonlReader::new(
        sub,
        JsonlReaderOptions {
            max_line_bytes: args.max_line_bytes,
        },
    );
    let result = tokio::select! {
        r = print_jsonl(&mut reader, out) => r,
        _ = tokio::signal::ctrl_c() => Ok(Stop::Interrupted),
    };
    let _ = out.flush().await;
    let stats = reader.stats();
    logging::say!("subscribe: {stats}");
    finish(args, result, stats.subscriber.segments)
}

async fn print_jsonl(
    reader: &mut JsonlReader,
    out: &mut BufWriter<Stdout>,
) -> anyhow::Result<Stop> {
    let mut dirty = false;
    let mut line = Vec::new();
    loop {
        // `JsonlReader::next` is cancel-safe, so a quiet channel can flush what was printed.
        let msg = tokio::select! {
            r = reader.next::<Box<RawValue>>() => r?,
            _ = tokio::time::sleep(FLUSH_AFTER), if dirty => {
                if out.flush().await.is_err() {
                    return Ok(Stop::StdoutClosed);
                }
                dirty = false;
                continue;
            }
        };
        let Some(msg) = msg else {
            return Ok(Stop::Ended);
        };
        line.clear();
        compact_json(msg.get(), &mut line);
        line.push(b'\n');
        if out.write_all(&line).await.is_err() {
            return Ok(Stop::StdoutClosed);
        }
        dirty = true;
    }
}

/// Exit status: a channel that never existed is an error that names the fix.
fn finish(args: &Args, result: anyhow::Result<Stop>, segments: u64) -> anyhow::Result<()> {
    match result.with_context(|| format!("subscribing to {}", args.url))? {
        Stop::Ended if segments == 0 => bail!(
            "channel {} does not exist (HTTP 404): check the channel name, or start the publisher first \
             (it creates the channel when the server allows autocreate)",
            args.url
        ),
        Stop::Ended => logging::say!("subscribe: the channel ended"),
        Stop::Interrupted => logging::say!("subscribe: interrupted"),
        Stop::StdoutClosed => {}
    }
    Ok(())
}
