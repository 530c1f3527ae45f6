//! The bench harness: `trickle-relay bench <path>`, one module per measured path.
//!
//! Every benchmark prints a human summary (or JSON with `--json`) of the same shape:
//! what ran, the counts, and each latency or throughput figure as median and spread.

mod fanout;
mod publish_event;
mod spool;

use clap::Subcommand;

/// Arguments of `trickle-relay bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(Subcommand, Debug)]
enum Which {
    /// Trickle server fan-out: one publisher, many subscribers of one large segment.
    Fanout(fanout::Args),
    /// Cost of one `publish_event` call, single-threaded and contended.
    PublishEvent(publish_event::Args),
    /// Accepted events per second through the durable disk buffer.
    Spool(spool::Args),
}

/// Runs the chosen benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.which {
        Which::Fanout(a) => fanout::run(a).await,
        Which::PublishEvent(a) => publish_event::run(a).await,
        Which::Spool(a) => spool::run(a).await,
    }
}
