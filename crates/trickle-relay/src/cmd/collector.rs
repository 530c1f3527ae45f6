//! `trickle-relay collector`: the `/v1/metrics` collector as its own process.
//!
//! Authenticates each request against `--api-keys` (one key per line; reloaded on SIGHUP),
//! enforces the size, count and rate limits, drops duplicates by event id, and answers 200 only
//! once the output has the events: `--output jsonl:PATH` (appended and fsynced) or `kafka[:TOPIC]`;
//! without `--output`, Kafka when `KAFKA_BOOTSTRAP_SERVERS` is set (as the seed's collector
//! publishes to Kafka), else `metrics.jsonl` in the working directory, named in full in the
//! startup line. Duplicates are remembered in this process (`--dedup memory`, the default) or, for
//! several collectors behind one load balancer, in a Redis they share (`--dedup
//! redis://HOST:PORT`). See the `collector` crate for the full contract.
//!
//! HTTPS: `--tls-cert FILE --tls-key FILE` (PEM; re-read on SIGHUP, a bad pair refused and the
//! certificate in service kept). A reporter trusts a private CA with `SCOPE_METRICS_CA_FILE`.

use anyhow::Context as _;
use collector::redis_dedup::{RedisDedup, RedisDedupConfig};
use collector::{ApiKeys, Collector, CollectorConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Arguments of `trickle-relay collector`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// File of accepted API keys, one per line (blank lines and # comments skipped); re-read on SIGHUP.
    #[arg(long, env = "COLLECTOR_API_KEYS")]
    pub api_keys: PathBuf,
    /// Where accepted events go: `jsonl:PATH` (appended, fsynced before each 200), or
    /// `kafka[:TOPIC]` (produced, acknowledged by Kafka before each 200; `KAFKA_BOOTSTRAP_SERVERS`).
    /// Default: `kafka` when `KAFKA_BOOTSTRAP_SERVERS` is set, else `jsonl:metrics.jsonl`.
    #[arg(long)]
    pub output: Option<String>,
    /// Largest request body in bytes, compressed or not.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_body_bytes: usize,
    /// Most events per request.
    #[arg(long, default_value_t = 500)]
    pub max_events: usize,
    /// Requests per second per API key (token bucket refill); 0 turns rate limiting off.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Burst per API key (token bucket size).
    #[arg(long, default_value_t = 100.0)]
    pub burst: f64,
    /// Where written event ids are remembered: `memory` (this process; seeded from the output at
    /// start) or `redis://[:PASSWORD@]HOST:PORT[/DB]`, shared by every collector using it (run
    /// Redis with `--appendonly yes --appendfsync always`). While Redis is unreachable, requests
    /// are answered 503 and the reporter retries; `/health` says so.
    #[arg(long, default_value = "memory", env = "COLLECTOR_DEDUP")]
    pub dedup: String,
    /// Event ids remembered for dedup (`--dedup memory`).
    #[arg(long, default_value_t = 1_000_000)]
    pub dedup_window: usize,
    /// Seconds an event id is remembered for dedup.
    #[arg(long, default_value_t = 3600)]
    pub dedup_ttl_secs: u64,
    /// Seconds a Redis claim lives if its collector dies before committing it: longer than any
    /// write to the output may take (`--dedup redis://...`).
    #[arg(long, default_value_t = 60)]
    pub dedup_claim_secs: u64,
    /// Seconds between two counter log lines (only when they changed).
    #[arg(long, default_value_t = 10)]
    pub log_interval_secs: u64,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key. Re-read on
    /// SIGHUP.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1). Re-read on SIGHUP.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Runs the collector until Ctrl-C / SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = tls::ServerTls::from_pem_files(cert, key, &[b"h2", b"http/1.1"])?;
            super::reload_tls_on_sighup(tls.clone());
            Some(tls)
        }
        _ => None,
    };
    let keys = Arc::new(ApiKeys::load(&args.api_keys)?);
    let (spec, why) = match &args.output {
        Some(spec) => (spec.clone(), ""),
        None => kafka::output::default_spec(),
    };
    let output = kafka::output::open(&spec).map_err(anyhow::Error::msg)?;
    let config = CollectorConfig {
        max_body_bytes: args.max_body_bytes,
        max_events: args.max_events,
        rate_per_sec: args.rate,
        burst: args.burst,
        dedup_capacity: args.dedup_window,
        dedup_ttl: Duration::from_secs(args.dedup_ttl_secs),
    };
    let mut dedup_name = "memory".to_owned();
    let collector = match args.dedup.as_str() {
        "memory" => Collector::new(config, keys.clone(), output),
        url if url.starts_with("redis://") => {
            let mut cfg = RedisDedupConfig::new(url, config.dedup_ttl);
            cfg.claim_ttl = Duration::from_secs(args.dedup_claim_secs.max(1));
            let dedup = RedisDedup::start(cfg).map_err(anyhow::Error::msg)?;
            dedup_name = format!("redis at {}", dedup.addr());
            Collector::with_redis_dedup(config, keys.clone(), output, dedup)
        }
        // Not echoed: the value may carry a password.
        _ => anyhow::bail!("--dedup: unknown store; use memory or redis://HOST:PORT"),
    };
    collector.check_dedup().await;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}; pick another --listen address",
                args.listen
            )
        })?;
    let addr = listener.local_addr()?;
    logging::say!(
        "collector: listening on {}://{addr}/v1/metrics ({} keys, output {spec}{why}, dedup {dedup_name})",
        if tls.is_some() { "https" } else { "http" },
        keys.len(),
    );
    if let Some(tls) = &tls {
        logging::say!(
            "collector: TLS certificate SHA-256 fingerprint {}",
            tls.fingerprint()
        );
    }

    let shutdown = CancellationToken::new();
    super::cancel_on_signal(shutdown.clone());
    reload_keys_on_sighup(keys, args.api_keys.clone());
    let logger = {
        let (c, stop) = (collector.clone(), shutdown.clone());
        let every = Duration::from_secs(args.log_interval_secs.max(1));
        tokio::spawn(async move {
            let mut last = c.stats();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let now = c.stats();
                if now != last {
                    c.log_stats();
                    last = now;
                }
            }
        })
    };
    let stop = shutdown.clone();
    let stopped = async move { stop.cancelled().await };
    // `GET /metrics` (Prometheus text format) beside `/v1/metrics`, on the same listener.
    let exported = metrics::Metrics::new().with(metrics::collector(collector.clone()));
    match tls {
        Some(tls) => {
            collector
                .clone()
                .serve_tls_with(listener, exported.router(), tls, stopped)
                .await
        }
        None => {
            collector
                .clone()
                .serve_with(listener, exported.router(), stopped)
                .await
        }
    }
    .context("collector server failed")?;
    shutdown.cancel();
    let _ = logger.await;
    collector.log_stats();
    Ok(())
}

/// Re-reads the keys file on SIGHUP; a bad file keeps the current keys (and says why).
fn reload_keys_on_sighup(keys: Arc<ApiKeys>, path: PathBuf) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; API keys will not be reloaded");
            return;
        };
        while hup.recv().await.is_some() {
            match keys.reload() {
                Ok(n) => tracing::info!(keys = n, file = %path.display(), "API keys reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "API keys NOT reloaded; keeping the current ones")
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (keys, path);
}
