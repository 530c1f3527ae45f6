//! `trickle-relay demo` (not built yet).

/// Arguments of `trickle-relay demo`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `trickle-relay demo`.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`trickle-relay demo` is not built yet")
}
