//! `trickle-relay subscribe` (not built yet).

/// Arguments of `trickle-relay subscribe`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `trickle-relay subscribe`.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`trickle-relay subscribe` is not built yet")
}
