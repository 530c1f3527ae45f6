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

/// Counts Ctrl-C and SIGTERM as they come: a command that ends gracefully takes the first as
/// "finish up" and a later one as "exit now".
#[derive(Clone)]
pub struct Signals(tokio::sync::watch::Receiver<u32>);

impl Signals {
    /// Starts counting (call once, from within the runtime).
    pub fn install() -> Signals {
        let (tx, rx) = tokio::sync::watch::channel(0u32);
        tokio::spawn(async move {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                // Held for the life of the process, so no signal falls between two waits.
                if let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) {
                    loop {
                        let name = tokio::select! {
                            _ = term.recv() => "SIGTERM",
                            _ = int.recv() => "Ctrl-C",
                        };
                        tracing::info!("{name} received");
                        tx.send_modify(|n| *n += 1);
                    }
                }
            }
            loop {
                wait_for_signal().await;
                tx.send_modify(|n| *n += 1);
            }
        });
        Signals(rx)
    }

    /// Signals received so far.
    pub fn count(&self) -> u32 {
        *self.0.borrow()
    }

    /// Resolves once `n` signals were received (at once if they already were).
    pub async fn reached(&self, n: u32) {
        let mut rx = self.0.clone();
        // An error only means the counting task is gone: no signal will come.
        if rx.wait_for(|count| *count >= n).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
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
