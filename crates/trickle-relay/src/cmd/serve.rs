//! `trickle-relay serve` (not built yet).

/// Arguments of `trickle-relay serve`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `trickle-relay serve`.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`trickle-relay serve` is not built yet")
}
