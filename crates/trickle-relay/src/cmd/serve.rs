//! `trickle-relay serve`: run a trickle server until Ctrl-C or SIGTERM, then shut down gracefully.
//!
//! Listens on 127.0.0.1:2939 by default (`--listen 0.0.0.0:2939` to serve other hosts).

use anyhow::Context as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use trickle::server::{Server, ServerConfig};

/// Arguments of `trickle-relay serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:2939")]
    pub listen: SocketAddr,
    /// Path prefix of every route, e.g. `/ai/trickle/`.
    #[arg(long, default_value = "/")]
    pub base_path: String,
    /// Let clients create channels over HTTP (`POST /{channel}`, or a first segment POST).
    #[arg(long)]
    pub autocreate: bool,
    /// Largest segment accepted, in bytes; a POST past it gets 413.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_segment_bytes: u64,
    /// Most channels at once; creating one more gets 503.
    #[arg(long, default_value_t = 10_000)]
    pub max_channels: usize,
    /// Most open connections; one more gets 503 and is closed.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Close a channel with no new segment for this many seconds (`_`-prefixed ones never).
    #[arg(long, default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// Run the `_changes` feed channel announcing added and removed channels.
    #[arg(long)]
    pub changes_feed: bool,
    /// Serve `GET /metrics` (Prometheus text format) on this address; off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Runs `trickle-relay serve`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = ServerConfig {
        base_path: args.base_path,
        autocreate: args.autocreate,
        max_segment_bytes: args.max_segment_bytes,
        max_channels: args.max_channels,
        max_connections: args.max_connections,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        changes_feed: args.changes_feed,
        ..ServerConfig::default()
    };
    let server = Server::bind(args.listen, config)
        .await
        .with_context(|| format!("cannot listen on {} (in use? try --listen)", args.listen))?;
    let started = Instant::now();
    println!("trickle server listening on {}", server.url());
    let stop_metrics = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = args.metrics_listen {
        let probe = metrics::server(server.channels().clone());
        let bound = metrics::serve(
            addr,
            metrics::Metrics::new().with(probe),
            stop_metrics.clone(),
        )
        .await?;
        println!("trickle server metrics at http://{bound}/metrics");
    }
    let signal = wait_for_signal().await?;
    let channels = server.channels().list().len();
    server.shutdown().await;
    stop_metrics.cancel();
    println!(
        "trickle server stopped on {signal} after {:.1} s; closed {channels} channel(s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits for Ctrl-C or (on Unix) SIGTERM; returns its name.
async fn wait_for_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map(|_| "Ctrl-C").context("cannot watch Ctrl-C"),
            _ = term.recv() => Ok("SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("cannot watch Ctrl-C")?;
        Ok("Ctrl-C")
    }
}
