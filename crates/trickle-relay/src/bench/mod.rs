//! The bench harness: `trickle-relay bench <path>`, one module per measured path.
//!
//! Every benchmark prints a human summary (or JSON with `--json`) of the same shape:
//! what ran, the counts, and each latency or throughput figure as median and spread.

use clap::Subcommand;

/// Arguments of `trickle-relay bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(Subcommand, Debug)]
enum Which {}

/// Runs the chosen benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.which {}
}
