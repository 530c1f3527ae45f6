//! `trickle-relay publish` (not built yet).

/// Arguments of `trickle-relay publish`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `trickle-relay publish`.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`trickle-relay publish` is not built yet")
}
