//! One module per subcommand: each has an `Args` (clap) and an async `run`.

pub mod client;
pub mod collector;
pub mod demo;
pub mod publish;
pub mod runner;
pub mod serve;
pub mod subscribe;

use tokio_util::sync::CancellationToken;

/// Cancels `token` on Ctrl-C or SIGTERM, so every command shuts down gracefully and flushes.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received, shutting down");
        token.cancel();
    });
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
