//! `trickle-relay serve`: run a trickle server until Ctrl-C or SIGTERM, then shut down gracefully.
//!
//! Listens on 127.0.0.1:2939 by default (`--listen 0.0.0.0:2939` to serve other hosts).
//!
//! HTTPS: `--tls-cert FILE --tls-key FILE` (PEM; both re-read on SIGHUP, a bad pair refused and
//! the certificate in service kept), or `--tls-self-signed`, which makes a key and certificate at
//! start for the listen address and `localhost` (plus `--tls-name`), prints its SHA-256
//! fingerprint and, with `--tls-cert-out FILE`, writes the certificate for clients to pin with
//! `--trickle-ca FILE`.

use anyhow::Context as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use trickle::server::limits::{raise_open_file_limit, sized_limits, OpenFiles};
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
    /// Most channels at once; creating one more gets 503. Default: half of --max-connections,
    /// at least 10,000.
    #[arg(long)]
    pub max_channels: Option<usize>,
    /// Most open connections; one more gets 503 and is closed. Default: the open-file limit
    /// (raised to its hard limit at start) less a reserve of an eighth (at most 1,024). A relay
    /// session holds about 9 connections.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Close a channel with no new segment for this many seconds (`_`-prefixed ones never).
    #[arg(long, default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// Run the `_changes` feed channel announcing added and removed channels.
    #[arg(long)]
    pub changes_feed: bool,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key. Re-read on
    /// SIGHUP.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1). Re-read on SIGHUP.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS with a key and certificate made at start for the listen address and
    /// localhost (and each --tls-name); prints its SHA-256 fingerprint. A new one at every start.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub tls_self_signed: bool,
    /// With --tls-self-signed: write the certificate (PEM) to this file, for clients to pin with
    /// --trickle-ca FILE.
    #[arg(long, value_name = "FILE", requires = "tls_self_signed")]
    pub tls_cert_out: Option<PathBuf>,
    /// With --tls-self-signed: one more DNS name or IP address the certificate is valid for
    /// (repeat for more), e.g. the host name clients use.
    #[arg(long, value_name = "NAME", requires = "tls_self_signed")]
    pub tls_name: Vec<String>,
    /// Serve `GET /metrics` (Prometheus text format) on this address; off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// The names a self-signed certificate for `listen` is valid for: its address (loopback for an
/// unspecified one, which the server URL shows too), `localhost`, and `extra`.
fn self_signed_names(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let ips: Vec<IpAddr> = match listen.ip() {
        ip if ip.is_unspecified() => vec![
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ],
        ip => vec![ip],
    };
    let mut names: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
    names.push("localhost".into());
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// The certificate the flags ask for, if any; a self-signed one is written to --tls-cert-out.
fn server_tls(args: &Args) -> anyhow::Result<Option<tls::ServerTls>> {
    const ALPN: &[&[u8]] = &[b"http/1.1"];
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        return Ok(Some(tls::ServerTls::from_pem_files(cert, key, ALPN)?));
    }
    if !args.tls_self_signed {
        return Ok(None);
    }
    let names = self_signed_names(args.listen, &args.tls_name);
    let tls = tls::ServerTls::self_signed(&names, ALPN)?;
    if let Some(out) = &args.tls_cert_out {
        std::fs::write(out, tls.cert_pem())
            .with_context(|| format!("cannot write --tls-cert-out {}", out.display()))?;
    }
    Ok(Some(tls))
}

/// Runs `trickle-relay serve`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // Every connection is a descriptor: take all the hard limit allows, as Go servers do.
    let files = raise_open_file_limit(None);
    let (sized_connections, sized_channels) = sized_limits(files.soft);
    let max_connections = args.max_connections.unwrap_or(sized_connections);
    let max_channels = args
        .max_channels
        .unwrap_or(if args.max_connections.is_some() {
            (max_connections / 2).max(10_000)
        } else {
            sized_channels
        });
    let tls = server_tls(&args)?;
    if let Some(tls) = &tls {
        super::reload_tls_on_sighup(tls.clone());
    }
    let config = ServerConfig {
        base_path: args.base_path,
        autocreate: args.autocreate,
        max_segment_bytes: args.max_segment_bytes,
        max_channels,
        max_connections,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        changes_feed: args.changes_feed,
        tls: tls.clone(),
        ..ServerConfig::default()
    };
    let server = Server::bind(args.listen, config)
        .await
        .with_context(|| format!("cannot listen on {} (in use? try --listen)", args.listen))?;
    let started = Instant::now();
    // The URL stays the first line's last word: scripts (and `bench relay`) read it there.
    println!("trickle server listening on {}", server.url());
    println!("{}", limits_line(max_connections, max_channels, &files));
    if let Some(tls) = tls {
        println!("TLS certificate SHA-256 fingerprint {}", tls.fingerprint());
        if let Some(out) = &args.tls_cert_out {
            println!(
                "certificate written to {0}; clients pin it with --trickle-ca {0}",
                out.display()
            );
        }
    }
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
    // Whoever read our stdout may be gone by now (killed with us): that is no reason to panic.
    let _ = writeln!(
        std::io::stdout(),
        "trickle server stopped on {signal} after {:.1} s; closed {channels} channel(s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The start-up line stating the limits and where they come from.
fn limits_line(connections: usize, channels: usize, files: &OpenFiles) -> String {
    let raised = files
        .raised_from
        .map(|from| format!(", raised from {from}"))
        .unwrap_or_default();
    format!(
        "limits: {connections} connections, {channels} channels (open-file limit {}{raised}, hard {}; a relay session holds about 9 connections: raise `ulimit -n` for more)",
        files.soft, files.hard
    )
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
