//! The trickle server: a hand-written HTTP/1.1 server that speaks the protocol byte for byte as
//! go-livepeer's reference does (see `docs/trickle.md`).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use trickle::server::{Server, ServerConfig};
//! let server = Server::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::default()).await?;
//! server.channels().create("events", Some("application/jsonl")).ok();
//! println!("serving {}", server.url());
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Over TLS ([`ServerConfig::tls`]) every route, limit and answer is the same; the handshake is
//! done in the connection's task, under the first-request deadline, with the certificate in
//! service when the connection was accepted (so a reload on SIGHUP never disturbs open ones).
//! A client that speaks plain HTTP to a TLS port is answered in plain text, naming `https://`.
//!
//! Modules: `http` (request heads, framing, bodies, responses), `segment` (one growing segment),
//! `channel` (the five-segment ring and the registry), `routes` (the handlers).
//!
//! One addition to the reference: with autocreate, a deleted channel is not created again by a
//! request on a connection that was ready for it before the delete (accepted, or done with its
//! previous answer on a keep-alive connection), for 10 s after it. Such a request may have been
//! on its way before the DELETE, typically the publisher's preconnected POST of its next segment
//! read late by a busy server; recreating the channel from it would leave the channel's
//! subscribers waiting for an end that never comes. It is answered 404, as without autocreate.

mod channel;
mod http;
pub mod limits;
mod routes;
mod segment;
mod stats;

pub use stats::{Refused, RequestCount, ServerStats};

use channel::Registry;
use http::{error_response, read_head, Conn, HeadError, Io};
use routes::Outcome;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

/// How long a keep-alive connection may sit idle between requests.
const IDLE_CONNECTION: Duration = Duration::from_secs(300);
/// How long a new connection may take to send its first request head: a connection that never
/// speaks must not hold one of the `max_connections` slots for the whole idle timeout.
const FIRST_REQUEST: Duration = Duration::from_secs(10);
/// How long shutdown waits for connections to finish before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Server settings. Build with `ServerConfig { autocreate: true, ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Path prefix of every route, e.g. `/` or `/ai/trickle/`.
    pub base_path: String,
    /// Allow channel creation over HTTP (`POST /{ch}`, and a first `POST /{ch}/{seq}`).
    pub autocreate: bool,
    /// Largest segment accepted; a POST past it gets 413 and the segment is closed.
    pub max_segment_bytes: u64,
    /// Most channels at once; creating one more gets 503 (HTTP) or `TooManyChannels`.
    /// Default: sized from the open-file limit ([`limits::sized_limits`]).
    pub max_channels: usize,
    /// Most open connections; one more is answered 503 and closed.
    /// Default: just under the open-file limit ([`limits::sized_limits`]).
    pub max_connections: usize,
    /// A channel with no new segment for this long is closed (`_`-prefixed ones never are).
    pub idle_timeout: Duration,
    /// Interval of `100 Continue` keepalives on a preconnected POST that has sent no byte.
    pub keepalive_interval: Duration,
    /// Run the `_changes` feed channel (`{"added":[..]}` / `{"removed":[..]}` segments).
    pub changes_feed: bool,
    /// Serve HTTPS with this certificate (offer it ALPN `http/1.1`); `None`: plain HTTP.
    pub tls: Option<tls::ServerTls>,
}

impl Default for ServerConfig {
    /// The defaults, with the connection and channel limits sized from this process's open-file
    /// limit as it is now (raise it first: [`limits::raise_open_file_limit`]).
    fn default() -> Self {
        let (max_connections, max_channels) = limits::sized_limits(limits::open_file_limit().soft);
        ServerConfig {
            base_path: "/".to_string(),
            autocreate: false,
            max_segment_bytes: 64 * 1024 * 1024,
            max_channels,
            max_connections,
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(10),
            changes_feed: false,
            tls: None,
        }
    }
}

/// Why a channel could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// The server holds `max_channels` channels already.
    #[error("too many channels (limit {limit}); close idle channels or raise max_channels")]
    TooManyChannels {
        /// The configured limit.
        limit: usize,
    },
    /// The name is empty, too long, or has characters that need escaping in a URL path.
    #[error("invalid channel name {0:?}: use 1 to 256 characters from A-Z a-z 0-9 and -._~!$&'()*+,;=:@")]
    InvalidName(String),
}

/// A random channel name with 128 bits of randomness (32 hex digits), hard to guess.
pub fn random_channel_name() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The in-process API to a server's channels (what an orchestrator uses). Cheap to clone.
#[derive(Clone)]
pub struct Channels {
    registry: Arc<Registry>,
}

impl Channels {
    /// Creates a channel (ok if it already exists; its MIME type is then unchanged).
    pub fn create(&self, name: &str, mime: Option<&str>) -> Result<(), ServerError> {
        channel::validate_name(name)?;
        match self.registry.get_or_create(name, mime.unwrap_or(""), true) {
            Ok(_) => Ok(()),
            Err(channel::Lookup::Refused(e)) => Err(e),
            // Only reachable during shutdown, when the channel would be closed at once anyway.
            Err(channel::Lookup::NotFound | channel::Lookup::ShuttingDown) => Ok(()),
        }
    }

    /// Closes a channel, waking every reader and preconnected publisher; true if it existed.
    pub fn close(&self, name: &str) -> bool {
        self.registry.close(name)
    }

    /// Names of all channels, sorted.
    pub fn list(&self) -> Vec<String> {
        self.registry.list()
    }

    /// The segments a channel holds now, oldest first, with the requests on each; `None` if
    /// there is no such channel. Shows what HTTP cannot: a subscriber parked on a segment, a
    /// publisher preconnected to one.
    pub fn segments(&self, name: &str) -> Option<Vec<SegmentInfo>> {
        self.registry.get(name).map(|ch| ch.segments())
    }

    /// The server's counters now: channels, connections, requests by route and status class,
    /// bytes, segments, refusals by limit (what `serve --metrics-listen` exports).
    pub fn stats(&self) -> ServerStats {
        self.registry.stats()
    }
}

/// One segment of a channel, as [`Channels::segments`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Its sequence number.
    pub seq: i64,
    /// GET requests streaming it or waiting for its data.
    pub readers: usize,
    /// POST requests writing it, or preconnected and waiting for their first byte.
    pub writers: usize,
    /// Bytes it holds.
    pub bytes: u64,
    /// Whether it is complete (or was closed).
    pub closed: bool,
}

/// What every connection task shares.
pub(crate) struct Ctx {
    pub(crate) registry: Arc<Registry>,
    /// Base path, with leading and trailing `/`.
    pub(crate) base: String,
    pub(crate) autocreate: bool,
    pub(crate) max_segment_bytes: u64,
    pub(crate) keepalive: Duration,
}

/// A running trickle server; serves in background tasks until [`Server::shutdown`] or drop.
pub struct Server {
    local_addr: SocketAddr,
    url: String,
    registry: Arc<Registry>,
    stop: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
    sweeper: Option<JoinHandle<()>>,
}

fn normalize_base(base: &str) -> String {
    let trimmed = base.trim_matches('/');
    if trimmed.is_empty() {
        "/".to_string()
    } else {
        format!("/{trimmed}/")
    }
}

impl Server {
    /// Binds `addr` and starts serving in background tasks.
    pub async fn bind(addr: SocketAddr, config: ServerConfig) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let base = normalize_base(&config.base_path);
        let shown_ip = match local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let url = format!(
            "{}://{}{}",
            if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            SocketAddr::new(shown_ip, local_addr.port()),
            base.trim_end_matches('/')
        );
        let registry = Arc::new(Registry::new(
            config.max_channels.max(1),
            config.changes_feed,
        ));
        let ctx = Arc::new(Ctx {
            registry: registry.clone(),
            base,
            autocreate: config.autocreate,
            max_segment_bytes: config.max_segment_bytes,
            keepalive: config.keepalive_interval,
        });
        let (stop, stop_rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(config.max_connections.max(1)));
        let accept = tokio::spawn(accept_loop(
            listener,
            ctx,
            limit,
            config.max_connections,
            config.tls,
            stop_rx.clone(),
        ));
        let sweeper = tokio::spawn(sweep_loop(registry.clone(), config.idle_timeout, stop_rx));
        tracing::info!(
            %url,
            max_connections = config.max_connections,
            max_channels = config.max_channels,
            "trickle server listening"
        );
        Ok(Server {
            local_addr,
            url,
            registry,
            stop,
            accept: Some(accept),
            sweeper: Some(sweeper),
        })
    }

    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Base URL of the server, without trailing slash, e.g. `http://127.0.0.1:4000/ai/trickle`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A handle to create, close and list channels in process.
    pub fn channels(&self) -> Channels {
        Channels {
            registry: self.registry.clone(),
        }
    }

    /// Stops accepting, closes every channel (so every waiter returns), and waits briefly for
    /// connections to finish before cutting the rest.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let closed = self.registry.close_all();
        if let Some(sweeper) = self.sweeper.take() {
            let _ = sweeper.await;
        }
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        tracing::info!(channels = closed, "trickle server stopped");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Dropped without shutdown(): still stop serving and wake every waiter.
        let _ = self.stop.send(true);
        self.registry.close_all();
    }
}

/// Resolves once shutdown is signalled (or the server is gone).
async fn stopped_signal(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn sweep_loop(registry: Arc<Registry>, idle: Duration, mut stop: watch::Receiver<bool>) {
    let every = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stopped_signal(&mut stop) => return,
            _ = tick.tick() => {
                registry.sweep(idle);
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    limit: Arc<Semaphore>,
    max_connections: usize,
    tls: Option<tls::ServerTls>,
    stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let mut stopped = stop.clone();
    loop {
        tokio::select! {
            _ = stopped_signal(&mut stopped) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    // The certificate in service now; a reload affects only later connections.
                    let acceptor = tls.as_ref().map(tls::ServerTls::acceptor);
                    match limit.clone().try_acquire_owned() {
                        Ok(permit) => {
                            // Numbered here, in accept order, so a DELETE knows which connections came before it.
                            let serial = ctx.registry.ready();
                            conns.spawn(serve_conn(stream, acceptor, ctx.clone(), permit, stop.clone(), serial));
                        }
                        Err(_) => {
                            ctx.registry.counters.refused_connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            conns.spawn(reject_conn(stream, acceptor, max_connections));
                        }
                    }
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while !conns.is_empty() {
        match tokio::time::timeout_at(deadline, conns.join_next()).await {
            Ok(_) => {}
            Err(_) => break,
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// The connection's stream: plain, or TLS once the handshake is done. `None` when there is
/// nothing to serve: the handshake failed or timed out, or the client spoke plain HTTP to a TLS
/// port (answered here, in plain text).
async fn open(stream: TcpStream, acceptor: Option<tls::TlsAcceptor>) -> Option<Io> {
    let Some(acceptor) = acceptor else {
        return Some(Io::Plain(stream));
    };
    let handshake = async {
        // A TLS record starts with 0x16 (handshake); a letter is a plain HTTP request line.
        let mut first = [0u8; 1];
        if matches!(stream.peek(&mut first).await, Ok(1) if first[0].is_ascii_alphabetic()) {
            let mut conn = Conn::new(Io::Plain(stream));
            let msg = "this server speaks HTTPS only: use an https:// URL";
            if conn
                .write(&error_response(400, &[], msg, true))
                .await
                .is_ok()
            {
                conn.linger_close().await;
            }
            return None;
        }
        match acceptor.accept(stream).await {
            Ok(tls) => Some(Io::Tls(Box::new(tls))),
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
        }
    };
    tokio::time::timeout(FIRST_REQUEST, handshake)
        .await
        .ok()
        .flatten()
}

async fn reject_conn(stream: TcpStream, acceptor: Option<tls::TlsAcceptor>, limit: usize) {
    let Some(io) = open(stream, acceptor).await else {
        return;
    };
    let mut conn = Conn::new(io);
    let msg = format!(
        "too many connections (limit {limit}); retry later or raise the server's max_connections"
    );
    if conn
        .write(&error_response(503, &[], &msg, true))
        .await
        .is_ok()
    {
        conn.linger_close().await;
    }
}

async fn serve_conn(
    stream: TcpStream,
    acceptor: Option<tls::TlsAcceptor>,
    ctx: Arc<Ctx>,
    _permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
    serial: u64,
) {
    let _ = stream.set_nodelay(true);
    let _open = ctx.registry.counters.connection();
    let io = tokio::select! {
        biased;
        _ = stopped_signal(&mut stop) => return,
        io = open(stream, acceptor) => match io {
            Some(io) => io,
            None => return,
        },
    };
    let mut conn = Conn::new(io);
    let mut wait_for_head = FIRST_REQUEST;
    // When the connection became ready for its next request: accepted, then after each answer
    // (clients reuse keep-alive connections for preconnected requests too).
    let mut ready_at = serial;
    loop {
        conn.shrink();
        let head = tokio::select! {
            biased;
            _ = stopped_signal(&mut stop) => return,
            r = tokio::time::timeout(wait_for_head, read_head(&mut conn)) => match r {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        wait_for_head = IDLE_CONNECTION;
        let head = match head {
            Ok(head) => head,
            Err(HeadError::Closed) => return,
            Err(e) => {
                let (status, msg) = match e {
                    HeadError::TooLarge => {
                        (431, "request head too large (limit 16 KiB, 64 headers)")
                    }
                    HeadError::Unsupported => (
                        501,
                        "unsupported transfer coding: only chunked is implemented",
                    ),
                    HeadError::Bad(msg) => (400, msg),
                    HeadError::Closed => return,
                };
                ctx.registry.counters.bad_head(status);
                if conn
                    .write(&error_response(status, &[], msg, true))
                    .await
                    .is_ok()
                {
                    conn.linger_close().await;
                }
                return;
            }
        };
        match routes::handle(&ctx, &mut conn, head, ready_at).await {
            Outcome::KeepAlive if !*stop.borrow() => ready_at = ctx.registry.ready(),
            Outcome::KeepAlive | Outcome::Abort => return,
            Outcome::Close => {
                conn.linger_close().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_paths() {
        assert_eq!(normalize_base("/"), "/");
        assert_eq!(normalize_base(""), "/");
        assert_eq!(normalize_base("/ai/trickle"), "/ai/trickle/");
        assert_eq!(normalize_base("ai/trickle/"), "/ai/trickle/");
    }

    #[test]
    fn random_names() {
        let a = random_channel_name();
        let b = random_channel_name();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
