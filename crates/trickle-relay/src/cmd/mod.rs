//! One module per subcommand: each has an `Args` (clap) and an async `run`.

pub mod client;
pub mod collector;
pub mod demo;
pub mod publish;
pub mod runner;
pub mod serve;
pub mod subscribe;

use anyhow::Context as _;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;
use trickle::client_tls::ClientTls;

/// How the trickle clients of a command treat an `https://` server's certificate. Default: any
/// certificate is accepted, as the reference clients do (orchestrators serve self-signed ones; the
/// channel name is the secret), with a one-time warning.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TrickleTlsArgs {
    /// Verify https:// trickle servers against this PEM file only: the server's own certificate
    /// (`serve --tls-cert-out`) or the CA that signed it.
    #[arg(long, env = "TRICKLE_CA_FILE", value_name = "FILE")]
    pub trickle_ca: Option<PathBuf>,
    /// Verify https:// trickle servers against the system's trusted roots (refuses the
    /// self-signed certificates orchestrators use; pin one with --trickle-ca instead).
    #[arg(long, conflicts_with = "trickle_ca")]
    pub trickle_verify_tls: bool,
}

impl TrickleTlsArgs {
    /// The trust mode these flags select.
    pub fn client_tls(&self) -> anyhow::Result<ClientTls> {
        ClientTls::from_flags(self.trickle_ca.as_deref(), self.trickle_verify_tls)
            .context("--trickle-ca (TRICKLE_CA_FILE) is unusable")
    }
}

/// Re-reads the certificate and key on SIGHUP; a bad pair is refused and the current one kept.
/// The handler is in place when this returns (before the server listens), so an early SIGHUP
/// never takes the default action (ending the process).
pub fn reload_tls_on_sighup(tls: tls::ServerTls) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; the TLS certificate will not be reloaded");
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match tls.reload() {
                    Ok(Some(fingerprint)) => {
                        tracing::info!(%fingerprint, "SIGHUP: TLS certificate reloaded; new connections use it")
                    }
                    Ok(None) => tracing::info!(
                        "SIGHUP: the self-signed certificate was made at start; nothing to reload"
                    ),
                    Err(e) => tracing::error!(
                        error = %e,
                        "SIGHUP: TLS certificate NOT reloaded; the current one stays in service"
                    ),
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = tls;
}

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
