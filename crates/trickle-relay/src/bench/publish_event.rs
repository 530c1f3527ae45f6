//! `trickle-relay bench publish_event` (not built yet).

/// Arguments of this benchmark.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs this benchmark.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("this benchmark is not built yet")
}
