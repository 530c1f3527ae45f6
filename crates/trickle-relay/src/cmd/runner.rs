//! `trickle-relay runner` (not built yet).

/// Arguments of `trickle-relay runner`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `trickle-relay runner`.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`trickle-relay runner` is not built yet")
}
