//! `trickle-relay client` (not built yet).

/// Arguments of `trickle-relay client`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `trickle-relay client`.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`trickle-relay client` is not built yet")
}
